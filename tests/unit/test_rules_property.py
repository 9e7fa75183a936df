"""RulesEngine and the plain-Python reference evaluator agree on random policies and orders."""

from __future__ import annotations

import datetime as dt

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authsvc.adapters.policies import load_documents
from authsvc.adapters.rules_engine import RulesEngine
from authsvc.domain.determination import after_eligibility, check_invariants
from authsvc.domain.orders import LineFacts, OrderFacts
from tests.unit.reference_evaluator import after_eligibility as reference_after
from tests.unit.reference_evaluator import comparable, evaluate

CODES = {
    "CPT": ["72146", "72147", "72148", "72149", "72158", "0001T", "0002T", "0005T", "0003F",
            "0004M", "0007M"],
    "HCPCS": ["E0424", "E0425", "E0431", "J0585", "J0586", "J0588", "K0001"],
}
NPIS = ["1234567893", "1003000126"]
DATES = [dt.date(2025, 12, 31), dt.date(2026, 1, 1), dt.date(2026, 6, 15), dt.date(2026, 12, 31),
         dt.date(2027, 1, 1)]


def _shape(system: str, code: str) -> str:
    if system == "HCPCS":
        return code[0]
    return "N" if code[-1].isdigit() else code[-1]


@st.composite
def code_spec(draw, system: str) -> str:
    a = draw(st.sampled_from(CODES[system]))
    if draw(st.booleans()):
        return a
    same = [c for c in CODES[system] if _shape(system, c) == _shape(system, a)]
    b = draw(st.sampled_from(same))
    return f"{min(a, b)}-{max(a, b)}"


@st.composite
def codes_block(draw) -> dict:
    systems = draw(st.sets(st.sampled_from(["CPT", "HCPCS"]), min_size=1))
    return {s: draw(st.lists(code_spec(s), min_size=1, max_size=3)) for s in sorted(systems)}


def iso(d: dt.date) -> str:
    return d.isoformat()


@st.composite
def when_block(draw) -> dict:
    when: dict = {}
    if draw(st.booleans()):
        when["place_of_service"] = draw(st.lists(st.sampled_from(["11", "22", "23"]),
                                                 min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 3)) == 0:
        low = draw(st.integers(0, 70))
        when["age"] = draw(st.sampled_from([{"min": low}, {"max": low}, {"min": low, "max": 90}]))
    if draw(st.integers(0, 3)) == 0:
        when["sex"] = draw(st.lists(st.sampled_from(["female", "male", "other"]), min_size=1,
                                    max_size=2, unique=True))
    if draw(st.booleans()):
        when["quantity_over"] = draw(st.integers(0, 3))
    patterns = st.lists(st.sampled_from(["M54*", "M54.50", "C*", "E11.9", "M5416"]),
                        min_size=1, max_size=2)
    if draw(st.integers(0, 3)) == 0:
        when["diagnoses_none_of"] = draw(patterns)
    if draw(st.integers(0, 3)) == 0:
        when["diagnoses_any_of"] = draw(patterns)
    if draw(st.integers(0, 3)) == 0:
        a, b = sorted(draw(st.lists(st.sampled_from(DATES), min_size=2, max_size=2)))
        when["service_date"] = draw(st.sampled_from([{"from": iso(a)}, {"to": iso(b)},
                                                     {"from": iso(a), "to": iso(b)}]))
    if draw(st.integers(0, 2)) == 0:
        when["with_any_of"] = draw(codes_block())
    return when


@st.composite
def policy(draw, n: int) -> dict:
    p = {
        "id": f"p/{n}",
        "title": f"Policy {n}",
        "codes": draw(codes_block()),
        "pa_required": draw(st.sampled_from([True, False, "conditional"])),
    }
    docs = draw(st.lists(st.sampled_from(["clinical", "admin", "patient", "conditional"]),
                         unique=True, max_size=2))
    if docs:
        p["doc_required"] = docs
    for flag in ("hold_for_documentation", "eligibility_check"):
        if draw(st.booleans()):
            p[flag] = draw(st.booleans())
    when = draw(when_block())
    if when:
        p["when"] = when
    if draw(st.booleans()):
        p["link"] = f"https://payer.example/{draw(st.sampled_from(['a', 'b']))}"
    return p


@st.composite
def gold_card(draw, n: int) -> dict:
    a, b = sorted(draw(st.lists(st.sampled_from(DATES), min_size=2, max_size=2)))
    card = {"npi": draw(st.sampled_from(NPIS)), "codes": draw(codes_block()),
            "from": iso(a), "to": iso(b)}
    if draw(st.booleans()):
        card["id"] = f"gc/{n}"
    else:
        card["npi"] = NPIS[n % 2]
        card["from"] = iso(DATES[n % len(DATES)])
        card["to"] = iso(max(DATES[n % len(DATES)], b))
    return card


@st.composite
def documents(draw) -> list[dict]:
    """One or two files of payer `a` (agreeing on version and default) and one of payer `b`."""
    default = draw(st.sampled_from(["conditional", "no-auth"]))
    counter = iter(range(1000))
    docs = []
    for name, payer in [("a1.yaml", "a"), ("a2.yaml", "a"), ("b.yaml", "b")]:
        if name == "a2.yaml" and draw(st.booleans()):
            continue
        doc: dict = {"payer_id": payer, "version": "v1"}
        if payer == "b" or default != "conditional" or draw(st.booleans()):
            doc["default"] = default if payer == "a" else "conditional"
        doc["policies"] = [
            draw(policy(next(counter))) for _ in range(draw(st.integers(0, 5)))
        ]
        cards = [draw(gold_card(next(counter))) for _ in range(draw(st.integers(0, 2)))]
        if cards:
            doc["gold_cards"] = cards
        docs.append((name, doc))
    return docs


@st.composite
def order(draw) -> OrderFacts:
    lines = []
    for seq in range(1, draw(st.integers(1, 4)) + 1):
        system = draw(st.sampled_from(["CPT", "HCPCS"]))
        code = draw(st.sampled_from([*CODES[system], "99999" if system == "CPT" else "A9999"]))
        lines.append(LineFacts(seq, system, code, draw(st.integers(1, 4)),
                               draw(st.sampled_from(DATES))))
    return OrderFacts(
        payer_id=draw(st.sampled_from(["a", "b"])),
        lines=tuple(lines),
        diagnoses=tuple(draw(st.lists(st.sampled_from(["M54.50", "C50.911", "E11.9", "M54.16"]),
                                      max_size=2, unique=True))),
        place_of_service=draw(st.sampled_from([None, "11", "22", "23"])),
        requester_npi=draw(st.sampled_from([None, *NPIS])),
        patient_birth_date=draw(st.sampled_from([None, dt.date(1960, 7, 1), dt.date(2008, 1, 1),
                                                 dt.date(1990, 12, 31)])),
        patient_sex=draw(st.sampled_from([None, "female", "male", "other", "unknown"])),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=documents(), orders=st.lists(order(), min_size=1, max_size=6))
def test_engine_agrees_with_reference(docs, orders):
    texts = {name: yaml.safe_dump(doc, sort_keys=False) for name, doc in docs}
    engine = RulesEngine(load_documents(texts))
    raw = [doc for _, doc in sorted(docs, key=lambda x: x[0])]
    for o in orders:
        expected = [comparable(d) for d in evaluate(raw, o)]
        cold = [comparable(d) for d in engine.determine(o)]
        assert cold == expected, (o, texts)
        warm = [comparable(d) for d in engine.determine(o)]  # from the memo now
        assert warm == expected


ELIGIBILITY = st.sampled_from(["active", "inactive", "member_not_found", "error"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=documents(), orders=st.lists(order(), min_size=1, max_size=4),
       results=st.lists(ELIGIBILITY, min_size=4, max_size=4))
def test_lines_after_random_eligibility_results_follow_the_scenarios(docs, orders, results):
    """Rules, then a random eligibility answer: every line ends as domain.md §4 says, keeps
    the CRD invariants, and no line of an order without active coverage goes to the payer."""
    texts = {name: yaml.safe_dump(doc, sort_keys=False) for name, doc in docs}
    engine = RulesEngine(load_documents(texts))
    for o, status in zip(orders, results, strict=False):
        final = [after_eligibility(d, status) for d in engine.determine(o)]
        raw = [doc for _, doc in sorted(docs, key=lambda x: x[0])]
        expected = [reference_after(d, status) for d in evaluate(raw, o)]
        seen = [{"covered": d.covered, "pa_needed": d.pa_needed,
                 "reason_codes": [r.code for r in d.reasons], "sent": d.sent_to_payer}
                for d in final]
        assert seen == expected, (o, status, texts)
        for d in final:
            check_invariants(d)
            if status in ("inactive", "member_not_found"):
                assert not d.needs_no_auth and d.satisfied_pa_id is None
