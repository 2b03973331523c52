"""Shared real parts: upstream PKI, fake TLS upstreams, an OTLP receiver."""

from __future__ import annotations

import pytest

from tests.harness.certs import make_upstream_pki
from tests.harness.otlp import OtlpReceiver
from tests.harness.upstream import FakeUpstream

UPSTREAM_HOSTS = [
    "allowed.test", "api.github.com", "api.openai.com", "api.anthropic.com",
    "generativelanguage.googleapis.com", "pastebin.com", "denied.test", "other.test", "llm-b.test",
]


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_upstream_pki(tmp_path_factory.mktemp("pki"), UPSTREAM_HOSTS)


@pytest.fixture(scope="session")
def upstream(pki):
    up = FakeUpstream(pki[1])
    yield up
    up.close()


@pytest.fixture(scope="session")
def forbidden_upstream(pki):
    """Where denied hosts would go if anything leaked through: it must never see a connection."""
    up = FakeUpstream(pki[1])
    yield up
    assert up.connections == 0, "a denied destination was contacted"
    up.close()


@pytest.fixture(scope="session")
def otlp():
    r = OtlpReceiver()
    yield r
    r.close()
