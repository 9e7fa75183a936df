"""The warm path of RulesEngine.determine: cached lines never leak across orders."""

from __future__ import annotations

import datetime as dt

from authsvc.adapters.policies import load_documents
from authsvc.adapters.rules_engine import RulesEngine
from authsvc.domain.orders import LineFacts, OrderFacts

PAIRS = """
payer_id: p
version: "1"
default: no-auth
policies:
  - {id: inj, title: Injection, codes: {CPT: ["64615"]}, pa_required: true,
     when: {with_any_of: {HCPCS: ["J0585-J0588"]}}}
  - {id: drug, title: Drug, codes: {HCPCS: ["J0585-J0588"]}, pa_required: true,
     when: {with_any_of: {CPT: ["64615"]}}}
  - {id: mri, title: MRI, codes: {CPT: ["72148"]}, pa_required: true,
     when: {age: {min: 18}, diagnoses_none_of: ["C*"]}}
"""
DOS = dt.date(2026, 12, 1)


def order(*codes: str, **kw) -> OrderFacts:
    lines = tuple(LineFacts(i, "HCPCS" if c[0].isalpha() else "CPT", c, 1, DOS)
                  for i, c in enumerate(codes, start=1))
    return OrderFacts(payer_id="p", lines=lines, **kw)


def test_warm_answers_equal_cold_answers_in_any_order():
    ruleset = load_documents({"p.yaml": PAIRS})
    warm, cold = RulesEngine(ruleset), RulesEngine(ruleset, memo_size=0)
    orders = [
        order("J0585"), order("64615", "J0585"), order("J0585"), order("64615"),
        order("J0586", "64615", "72148"), order("72148"), order("72148", diagnoses=("C50.911",)),
        order("72148", patient_birth_date=dt.date(2015, 1, 1)), order("72148"),
        order("64615", "J0585"), order("J0585", "J0585"),
    ]
    for _ in range(3):
        for o in orders:
            assert warm.determine(o) == cold.determine(o), o
    assert [d.pa_needed for d in warm.determine(order("J0585"))] == ["no-auth"]
    assert [d.pa_needed for d in warm.determine(order("64615", "J0585"))] == [
        "auth-needed", "auth-needed"]
    assert [d.pa_needed for d in warm.determine(order("72148", diagnoses=("C50.911",)))] == [
        "no-auth"]
