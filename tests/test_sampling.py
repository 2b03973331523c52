"""Export sampling (`clrk.recorder.sampling`), in-process: the rules that always keep, the ratio by trace id and
its agreement with OTel's TraceIdRatioBased, whole traces, the agent's sampled flag, and the policy fields."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from clrk import attributes as A
from clrk.policy import PolicyError
from clrk.policy.models import EgressGateway
from clrk.recorder.sampling import Sampler, trace_kept
from tests.harness.util import compile_policy

rng = random.Random(16)


def tid() -> str:
    return f"{rng.getrandbits(128):032x}"


def ordinary(trace: str | None = None, **kw) -> dict:
    return {A.TRACE_ID: trace or tid(), A.CLRK_DECISION: "allow", A.CLRK_DECISION_RULE: "EgressRoute/default/r",
            A.AGENT_NAMESPACE: "team-a", A.AGENT_NAME: "researcher", A.HTTP_RESPONSE_STATUS_CODE: 200, **kw}


def denied(**kw) -> dict:
    return ordinary(**{A.CLRK_DECISION: "deny", A.CLRK_DECISION_RULE: "EgressGateway/gw/defaultPolicy",
                       A.HTTP_RESPONSE_STATUS_CODE: 403, **kw})


def errored(**kw) -> dict:
    return ordinary(**{A.ERROR_TYPE: "upstream_reset", A.HTTP_RESPONSE_STATUS_CODE: 502, **kw})


def budget(**kw) -> dict:
    return ordinary(**{A.CLRK_DECISION: "deny", A.CLRK_BUDGET_DENIED: True, A.HTTP_RESPONSE_STATUS_CODE: 429, **kw})


def sampled(rows: list[dict]) -> list[bool]:
    return [r[A.CLRK_EXPORT_SAMPLED] for r in rows]


def test_the_ratio_agrees_with_otel_trace_id_ratio_based():
    for ratio in (0.0, 0.1, 0.5, 0.9, 1.0):
        otel = TraceIdRatioBased(ratio)
        s = Sampler({"ratio": ratio})
        for _ in range(2000):
            t = tid()
            assert trace_kept(t, s.bound) == otel.should_sample(None, int(t, 16), "x").decision.is_sampled()


def test_ratio_zero_keeps_only_the_always_kept_classes():
    s = Sampler({"ratio": 0.0})
    rows = [ordinary(), denied(), errored(), budget(), ordinary(**{A.ERROR_TYPE: None})]
    s.decide(rows)
    assert sampled(rows) == [False, True, True, True, False]


@pytest.mark.parametrize(("keep", "expect"), [
    (["denied"], [False, True, False, False]),
    (["error"], [False, False, True, False]),
    (["budget"], [False, False, False, True]),
    ([], [False, False, False, False]),
])
def test_each_class_is_kept_only_when_asked(keep, expect):
    s = Sampler({"ratio": 0.0, "always_keep": keep})
    rows = [ordinary(), denied(), errored(), budget()]
    s.decide(rows)
    assert sampled(rows) == expect


def test_a_tenth_of_2000_ordinary_transactions_and_every_denial_and_error_whole_traces_only():
    s = Sampler({"ratio": 0.1})
    traces = [tid() for _ in range(1000)]
    rows = []
    for t in traces:  # two ordinary transactions per trace: kept or dropped together
        rows += [ordinary(t), ordinary(t)]
    specials = [denied() for _ in range(100)] + [errored() for _ in range(100)] + [budget() for _ in range(50)]
    batch = rows + specials
    rng.shuffle(batch)
    s.decide(batch[:700])
    s.decide(batch[700:])
    kept = sum(sampled(rows))
    # Binomial(1000 traces, 0.1) × 2 records: 200 expected, sd ≈ 19 records; 4.5 sd either way.
    assert 115 <= kept <= 285, kept
    assert all(sampled(specials))
    by_trace: dict[str, set[bool]] = {}
    for r in rows:
        by_trace.setdefault(r[A.TRACE_ID], set()).add(r[A.CLRK_EXPORT_SAMPLED])
    assert all(len(v) == 1 for v in by_trace.values())
    # the same trace ids, decided again by another sampler: the same answer
    again = [ordinary(t) for t in traces]
    Sampler({"ratio": 0.1}).decide(again)
    assert sampled(again) == [r[A.CLRK_EXPORT_SAMPLED] for r in rows[::2]]


def test_a_trace_with_a_denial_is_kept_whole_from_then_on():
    s = Sampler({"ratio": 0.0})
    t = tid()
    first = [ordinary(t), denied(trace=t), ordinary(t)]  # one batch: all of it
    s.decide(first)
    assert sampled(first) == [True, True, True]
    later = [ordinary(t), ordinary()]
    s.decide(later)
    assert sampled(later) == [True, False]


def test_keep_agents_and_keep_rules():
    s = Sampler({"ratio": 0.0, "always_keep": [], "keep_agents": ["team-b/*"],
                 "keep_rules": ["AIProviderRoute/team-a/openai-*"]})
    rows = [
        ordinary(),
        ordinary(**{A.AGENT_NAMESPACE: "team-b", A.AGENT_NAME: "reviewer"}),
        ordinary(**{A.CLRK_DECISION_RULE: "AIProviderRoute/team-a/openai-chat#rules[2]"}),
        ordinary(**{A.CLRK_DECISION_RULE: "AIProviderRoute/team-a/claude#rules[0]"}),
    ]
    s.decide(rows)
    assert sampled(rows) == [False, True, True, False]


def test_parent_based_follows_the_agents_sampled_flag():
    s = Sampler({"ratio": 0.0, "parent_based": True})

    def child(flags: str) -> dict:
        t = tid()
        return ordinary(t, **{A.PARENT_SPAN_ID: "00f067aa0ba902b7",
                              A.REQUEST_HEADERS: {"traceparent": f"00-{t}-0123456789abcdef-{flags}"}})

    rows = [child("01"), child("00"), ordinary(), denied(**{A.PARENT_SPAN_ID: "00f067aa0ba902b7",
                                                          A.REQUEST_HEADERS: {"traceparent": "00-x-y-00"}})]
    s.decide(rows)
    assert sampled(rows) == [True, False, False, True]
    off = [child("01")]
    Sampler({"ratio": 0.0}).decide(off)  # without parentBased the flag is not looked at
    assert sampled(off) == [False]


def test_the_policy_fields():
    g = EgressGateway.model_validate({"kind": "EgressGateway", "metadata": {"name": "g"}, "spec": {"otlp": {
        "sampling": {"ratio": 0.25, "alwaysKeep": ["denied", "budget"], "keepAgents": ["team-a/*"], "parentBased": True},
        "metrics": {"intervalSeconds": 10}}, "metrics": {"prometheus": {"port": 9464}}}})
    assert g.spec.otlp.sampling.ratio == 0.25 and g.spec.otlp.sampling.always_keep == ["denied", "budget"]
    assert g.spec.metrics.prometheus.address == "127.0.0.1"
    for bad in ({"otlp": {"sampling": {"ratio": 1.5}}}, {"otlp": {"sampling": {"alwaysKeep": ["everything"]}}},
                {"metrics": {"prometheus": {"address": "localhost", "port": 9464}}},
                {"otlp": {"metrics": {"intervalSeconds": 0}}}, {"otlp": {"sampling": {"rate": 0.1}}}):
        with pytest.raises(ValueError):
            EgressGateway.model_validate({"kind": "EgressGateway", "metadata": {"name": "g"}, "spec": bad})


def _gw(name: str, **spec) -> dict:
    return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "EgressGateway", "metadata": {"name": name}, "spec": spec}


def test_what_the_recorder_is_sent_and_a_prometheus_port_taken_twice():
    p = compile_policy(_gw("g", listeners=[{"name": "l", "port": 8080}],
                           otlp={"sampling": {"ratio": 0.5, "keepRules": ["EgressRoute/*"]}, "metrics": {"enabled": False}},
                           metrics={"prometheus": {"address": "0.0.0.0", "port": 9464}}))
    t = p.gateways[0].telemetry
    assert t["metrics"] is None and t["prometheus"] == ["0.0.0.0", 9464]
    assert Sampler(t["sampling"]).config() == Sampler({"ratio": 0.5, "keep_rules": ["EgressRoute/*"]}).config()
    assert compile_policy(_gw("g")).gateways[0].telemetry["metrics"] == 60.0
    for docs in ([_gw("g", listeners=[{"name": "l", "port": 9464}], metrics={"prometheus": {"port": 9464}})],
                 [_gw("a", listeners=[{"name": "l", "port": 8080}], metrics={"prometheus": {"port": 9464}}),
                  _gw("b", listeners=[{"name": "l", "port": 8081}], metrics={"prometheus": {"port": 9464}})],
                 [_gw("a", listeners=[{"name": "l", "port": 8080}], metrics={"prometheus": {"port": 9464}}),
                  _gw("b", listeners=[{"name": "l", "port": 9464}])]):
        with pytest.raises(PolicyError, match="port 9464 is already used"):
            compile_policy(*docs)
