"""Proxy authentication in-process: fixed reasons and answers that never echo what the client sent."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from clrk import identity as I
from clrk.identity import authenticate
from clrk.policy.compiled import compile_documents
from clrk.policy.loader import SourcedDocument
from clrk.policy.models import Document


def _policy():
    docs = [{"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {}},
            {"kind": "Agent", "metadata": {"name": "bot", "namespace": "team-a"},
             "spec": {"credentials": {"tokenSha256": hashlib.sha256(b"tok").hexdigest()}}},
            {"kind": "EgressRoute", "metadata": {"name": "ok"}, "spec": {"hostnames": ["example.com"]}}]
    a = TypeAdapter(Document)
    return compile_documents([SourcedDocument(a.validate_python(d), "mem.yaml", i + 1) for i, d in enumerate(docs)], {})


POLICY = _policy()


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


REASONS = {I.AUTH_MISSING, I.AUTH_NOT_BASIC, I.AUTH_MALFORMED, I.AUTH_UNKNOWN_AGENT, I.AUTH_WRONG_TOKEN}


@pytest.mark.parametrize("header,reason,answer", [
    (None, I.AUTH_MISSING, None),
    ("Bearer xyz", I.AUTH_NOT_BASIC, None),
    ("Basic !!!", I.AUTH_MALFORMED, None),
    (basic("team-a.bot", "nope"), I.AUTH_WRONG_TOKEN, I.AUTH_FAILED),
    (basic("team-a.nobody", "tok"), I.AUTH_UNKNOWN_AGENT, I.AUTH_FAILED),
    (basic("sk-live-123456", "tok"), I.AUTH_UNKNOWN_AGENT, I.AUTH_FAILED),
])
def test_failures_are_fixed_phrases(header, reason, answer):
    r = authenticate(POLICY, header)
    assert (r.agent, r.failure, r.answer) == (None, reason, answer)


@given(user=st.text(max_size=40).filter(lambda u: ":" not in u), token=st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_nothing_the_client_sends_is_echoed(user, token):
    r = authenticate(POLICY, basic(user, token))
    if r.agent is None:
        assert r.failure in REASONS and r.answer in (None, I.AUTH_FAILED)
