"""A plain-Python evaluator of policy files, written from api.md alone, to check the engine.

It shares no code with authsvc.adapters.policies or rules_engine: no index, no durable-rules,
just loops over the raw YAML documents. RulesEngine and this evaluator must agree
(tests/unit/test_rules_property.py).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from authsvc.domain.determination import Determination, Reason
from authsvc.domain.orders import LineFacts, OrderFacts

_SHAPES = {"CPT": re.compile(r"[0-9]{4}[0-9FTUM]"), "HCPCS": re.compile(r"[A-V][0-9]{4}")}
_PA = {True: "auth-needed", "conditional": "conditional", False: "no-auth"}
_RANK = {"no-auth": 0, "conditional": 1, "auth-needed": 2}


def _shape(system: str, code: str) -> str:
    return code[-1] if system == "CPT" and not code[-1].isdigit() else (
        code[0] if system == "HCPCS" else "N"
    )


def code_named(codes: dict[str, list[str]], system: str, code: str) -> bool:
    """Does a ``codes`` block name this code (exactly or in a range of the same shape)?"""
    for spec in codes.get(system, []):
        if "-" not in spec:
            if spec == code:
                return True
            continue
        start, end = spec.split("-")
        if (
            _SHAPES[system].fullmatch(code)
            and _shape(system, code) == _shape(system, start)
            and start <= code <= end
        ):
            return True
    return False


def _dx_match(patterns: list[str], diagnoses: tuple[str, ...]) -> bool:
    for dx in diagnoses:
        plain = dx.replace(".", "")
        for pattern in patterns:
            p = pattern.replace(".", "")
            if p.endswith("*") and plain.startswith(p[:-1]):
                return True
            if plain == p:
                return True
    return False


def _age(birth: dt.date, on: dt.date) -> int:
    years = on.year - birth.year
    if (on.month, on.day) < (birth.month, birth.day):
        years -= 1
    return years


def _tests_hold(when: dict[str, Any], order: OrderFacts, i: int) -> bool:
    line = order.lines[i]
    if "quantity_over" in when and not line.quantity > when["quantity_over"]:
        return False
    if "place_of_service" in when and order.place_of_service is not None:
        if order.place_of_service not in when["place_of_service"]:
            return False
    if "sex" in when and order.patient_sex is not None:
        if order.patient_sex not in when["sex"]:
            return False
    if "age" in when and order.patient_birth_date is not None:
        age = _age(order.patient_birth_date, order.as_of or line.service_start)
        if age < when["age"].get("min", 0) or age > when["age"].get("max", 999):
            return False
    if "service_date" in when:
        window = when["service_date"]
        if "from" in window and line.service_start < dt.date.fromisoformat(window["from"]):
            return False
        if "to" in window and line.service_start > dt.date.fromisoformat(window["to"]):
            return False
    if "diagnoses_none_of" in when and _dx_match(when["diagnoses_none_of"], order.diagnoses):
        return False
    if "diagnoses_any_of" in when and not _dx_match(when["diagnoses_any_of"], order.diagnoses):
        return False
    if "with_any_of" in when:
        others = [other for j, other in enumerate(order.lines) if j != i]
        if not any(code_named(when["with_any_of"], o.code_system, o.code) for o in others):
            return False
    return True


def _gold_card(cards: list[dict[str, Any]], order: OrderFacts, line: LineFacts):
    best = None
    for card in cards:
        if card["npi"] != order.requester_npi:
            continue
        if not code_named(card["codes"], line.code_system, line.code):
            continue
        start, end = dt.date.fromisoformat(card["from"]), dt.date.fromisoformat(card["to"])
        if start <= line.service_start <= end and (best is None or end > best[1]):
            best = (card.get("id") or f"gc-{card['npi']}-{card['from']}", end)
    return best


def evaluate(documents: list[dict[str, Any]], order: OrderFacts) -> list[Determination]:
    """Documents in file-name order; only those of ``order.payer_id`` are read."""
    docs = [d for d in documents if d["payer_id"] == order.payer_id]
    policies = [p for d in docs for p in d.get("policies", [])]
    cards = [c for d in docs for c in d.get("gold_cards", [])]
    default = docs[0].get("default", "conditional")
    out = []
    for i, line in enumerate(order.lines):
        named = [p for p in policies if code_named(p["codes"], line.code_system, line.code)]
        applying = [p for p in named if _tests_hold(p.get("when", {}), order, i)]
        card = _gold_card(cards, order, line)
        out.append(_answer(order.payer_id, default, named, applying, card))
    return out


def _answer(payer, default, named, applying, card) -> Determination:
    if applying:
        pa = max((_PA[p["pa_required"]] for p in applying), key=_RANK.__getitem__)
        docs = [
            d for d in ("clinical", "admin", "patient", "conditional")
            if any(d in p.get("doc_required", []) for p in applying)
        ]
        links = []
        for p in applying:
            if p.get("link") and p["link"] not in links:
                links.append(p["link"])
        base = dict(
            doc_needed=tuple(docs),
            eligibility_check=any(p.get("eligibility_check", False) for p in applying),
            rules=tuple(p["id"] for p in applying),
            policy_links=tuple(links),
            reasons=tuple(Reason("policy", p["title"]) for p in applying),
        )
        if pa == "no-auth":
            return Determination(covered="covered", pa_needed="no-auth", **base)
        if card is not None:
            return Determination(
                covered="conditional", pa_needed="satisfied", info_needed=("OTH",),
                satisfied_pa_id=card[0], expiry_date=card[1].isoformat(),
                **{**base, "reasons": (*base["reasons"], Reason("gold-card", ""))},
            )
        return Determination(
            covered="conditional", pa_needed=pa, info_needed=("OTH",),
            hold_for_documentation=any(p.get("hold_for_documentation") for p in applying),
            **base,
        )
    if named:
        return Determination(
            covered="covered", pa_needed="no-auth", reasons=(Reason("conditions-not-met", ""),)
        )
    if default == "no-auth":
        return Determination(
            covered="covered", pa_needed="no-auth", reasons=(Reason("no-policy", ""),)
        )
    if card is not None:
        return Determination(
            covered="conditional", pa_needed="satisfied", info_needed=("OTH",),
            reasons=(Reason("no-policy", ""), Reason("gold-card", "")),
            satisfied_pa_id=card[0], expiry_date=card[1].isoformat(),
        )
    return Determination(
        covered="conditional", pa_needed="conditional", info_needed=("OTH",),
        reasons=(Reason("no-policy", ""),),
    )


def comparable(d: Determination) -> dict[str, Any]:
    """The record with reason texts kept only for policy reasons (their titles)."""
    record = d.to_record()
    record["reasons"] = [
        (r.code, r.text if r.code == "policy" else None) for r in d.reasons
    ]
    return record


def after_eligibility(d: Determination, status: str) -> dict[str, Any]:
    """What domain.md §4 says a line looks like once eligibility answered (scenarios 1–3),
    written from the text, as the fields a clinician sees: `covered`, `pa_needed`, the reason
    codes, and whether the line can still go to the payer."""
    if status == "inactive":  # scenario 2: not covered, no pa_needed (crd-ci-q2)
        return {"covered": "not-covered", "pa_needed": None,
                "reason_codes": ["no-active-coverage"], "sent": False}
    if status == "member_not_found":  # scenario 3: correct the member id and resubmit
        return {"covered": "indeterminate", "pa_needed": None,
                "reason_codes": ["no-member-found"], "sent": False}
    # active (the "auth required" flag is only a signal) and error: the rules' answer stands
    return {"covered": d.covered, "pa_needed": d.pa_needed,
            "reason_codes": [r.code for r in d.reasons],
            "sent": d.pa_needed in ("auth-needed", "conditional")}
