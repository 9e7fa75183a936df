"""RulesEngine: the shipped demo policies, every `when` test, gold cards, cross-line joins,
multiple payers, invalid files, thread safety and 10,000 policies."""

from __future__ import annotations

import datetime as dt
import gc
import json
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from authsvc.adapters import rules_engine as rules_engine_module
from authsvc.adapters.policies import CodeIndex, PolicyError, load_documents, policy_schema
from authsvc.adapters.rules_engine import DECISION_RULES, RulesEngine, UnknownPayer
from authsvc.domain.determination import Determination
from authsvc.domain.orders import LineFacts, OrderFacts
from tests.unit.reference_evaluator import comparable, evaluate

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
GOLD_NPI = "1234567893"
OTHER_NPI = "1003000126"  # valid NPI, no gold card: the README walk-through's requester
DOS = dt.date(2026, 12, 1)


def line(code: str, system: str = "CPT", quantity: int = 1, start: dt.date = DOS, seq: int = 1):
    return LineFacts(seq, system, code, quantity, start)


def order(*lines: LineFacts, payer: str = "demo", **kw) -> OrderFacts:
    defaults = dict(
        requester_npi=OTHER_NPI, place_of_service="22", diagnoses=("M54.50",),
        patient_birth_date=dt.date(1984, 3, 2), patient_sex="female",
    )
    defaults.update(kw)
    numbered = tuple(
        LineFacts(i + 1, ln.code_system, ln.code, ln.quantity, ln.service_start)
        for i, ln in enumerate(lines)
    )
    return OrderFacts(payer_id=payer, lines=numbered, **defaults)


def one(engine: RulesEngine, *lines: LineFacts, **kw) -> Determination:
    (d,) = engine.determine(order(*lines, **kw))
    return d


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def engine_from(tmp_path: Path, text: str, **kw) -> RulesEngine:
    write(tmp_path, "p.yaml", text)
    return RulesEngine.from_directory(tmp_path, **kw)


@pytest.fixture(scope="module")
def demo() -> RulesEngine:
    return RulesEngine.from_directory(RULES_DIR)


# ------------------------------------------------------------------ the shipped demo policies

AUTH = ("conditional", "auth-needed", ("OTH",))
NO_AUTH = ("covered", "no-auth", ())


@pytest.mark.parametrize(
    ("code", "system", "quantity", "expected", "rules", "docs", "eligibility", "hold"),
    [
        ("72148", "CPT", 1, AUTH, ["demo/imaging/mri-lumbar"], ["clinical"], True, False),
        ("72149", "CPT", 1, AUTH, ["demo/imaging/mri-lumbar"], ["clinical"], True, False),
        ("72158", "CPT", 1, AUTH, ["demo/imaging/mri-lumbar"], ["clinical"], True, False),
        ("73722", "CPT", 1, AUTH, ["demo/imaging/mri-knee"], ["clinical"], True, False),
        ("99202", "CPT", 1, NO_AUTH, ["demo/office-visits"], [], True, False),
        ("99213", "CPT", 1, NO_AUTH, ["demo/office-visits"], [], True, False),
        ("99215", "CPT", 1, NO_AUTH, ["demo/office-visits"], [], True, False),
        ("E0424", "HCPCS", 1, AUTH, ["demo/dme/home-oxygen"], ["clinical"], True, True),
        ("97110", "CPT", 13, AUTH, ["demo/therapy/physical-therapy-over-12"], ["clinical"], True,
         False),
        ("97140", "CPT", 20, AUTH, ["demo/therapy/physical-therapy-over-12"], ["clinical"], True,
         False),
        ("97530", "CPT", 5, AUTH, ["demo/therapy/therapeutic-activities"], ["clinical"], True,
         False),
    ],
)
def test_demo_policy_answers(demo, code, system, quantity, expected, rules, docs, eligibility,
                             hold):
    d = one(demo, line(code, system, quantity))
    assert (d.covered, d.pa_needed, d.info_needed) == expected
    assert list(d.rules) == rules
    assert list(d.doc_needed) == docs
    assert d.eligibility_check is eligibility
    assert d.hold_for_documentation is hold
    assert [r.code for r in d.reasons] == ["policy"]
    assert len(d.policy_links) == 1 and d.policy_links[0].startswith("https://")
    assert d.satisfied_pa_id is None and d.expiry_date is None


def test_lumbar_mri_matches_the_api_example(demo):
    d = one(demo, line("72148"))
    assert d.to_dict() == {
        "covered": "conditional", "pa_needed": "auth-needed", "doc_needed": ["clinical"],
        "info_needed": ["OTH"], "eligibility_check": True,
        "reasons": [{"code": "policy", "text": "Lumbar spine MRI requires prior authorization"}],
        "rules": ["demo/imaging/mri-lumbar"],
        "policy_links": ["https://payer.example/demo/policies/imaging/mri-lumbar"],
        "satisfied_pa_id": None, "expiry_date": None,
    }


@pytest.mark.parametrize("code", ["99201", "99216", "12345", "0001T"])
def test_demo_unnamed_code_is_conditional_no_policy(demo, code):
    d = one(demo, line(code))
    assert (d.covered, d.pa_needed, d.info_needed) == ("conditional", "conditional", ("OTH",))
    assert [r.code for r in d.reasons] == ["no-policy"]
    assert d.rules == () and d.eligibility_check is False


def test_code_system_is_part_of_the_code(demo):
    d = one(demo, line("E0424", system="CPT"))
    assert d.pa_needed == "conditional" and d.reasons[0].code == "no-policy"


@pytest.mark.parametrize("quantity", [1, 12])
def test_demo_therapy_at_or_below_twelve_units_is_conditions_not_met(demo, quantity):
    d = one(demo, line("97112", quantity=quantity))
    assert (d.covered, d.pa_needed, d.info_needed) == NO_AUTH
    assert [r.code for r in d.reasons] == ["conditions-not-met"]
    assert "demo/therapy/physical-therapy-over-12" in d.reasons[0].text
    assert d.rules == ()


def test_demo_versions(demo):
    assert demo.payer_ids() == {"demo", "medicare"}  # rules/ ships the Medicare lists too
    assert demo.version("demo") == "demo@2026-11-20.1"
    info = demo.versions()["demo"]
    assert info["version"] == "demo@2026-11-20.1"
    assert info["policy_version"] == "2026-11-20.1"
    assert list(info["files"]) == ["demo.yaml"]
    assert len(info["digest"]) == 64


def test_demo_file_validates_against_the_shipped_schema():
    jsonschema.Draft202012Validator.check_schema(policy_schema())
    data = yaml.load((RULES_DIR / "demo.yaml").read_text(), Loader=yaml.BaseLoader)
    assert data["payer_id"] == "demo"


def test_multi_line_order_keeps_line_order(demo):
    ds = demo.determine(order(line("99213"), line("72148"), line("E0424", "HCPCS"),
                              line("12345")))
    assert [d.pa_needed for d in ds] == ["no-auth", "auth-needed", "auth-needed", "conditional"]


def test_unknown_payer(demo):
    with pytest.raises(UnknownPayer):
        demo.determine(order(line("72148"), payer="nobody"))


# ------------------------------------------------------------------ gold cards (scenario 14)

@pytest.mark.parametrize("start", [dt.date(2026, 1, 1), dt.date(2026, 6, 30),
                                   dt.date(2026, 12, 31)])
def test_gold_card_inside_window_satisfies(demo, start):
    d = one(demo, line("72148", start=start), requester_npi=GOLD_NPI)
    assert d.pa_needed == "satisfied"
    assert d.satisfied_pa_id == "gc-1234567893-2026-01-01"
    assert d.expiry_date == "2026-12-31"
    assert [r.code for r in d.reasons] == ["policy", "gold-card"]
    assert d.rules == ("demo/imaging/mri-lumbar",)
    assert d.needs_no_auth and not d.sent_to_payer and not d.hold_for_documentation


@pytest.mark.parametrize("start", [dt.date(2025, 12, 31), dt.date(2027, 1, 1)])
def test_gold_card_outside_window_gives_the_policy_answer(demo, start):
    d = one(demo, line("72148", start=start), requester_npi=GOLD_NPI)
    assert d.pa_needed == "auth-needed" and d.satisfied_pa_id is None


def test_gold_card_is_for_its_npi_and_codes_only(demo):
    assert one(demo, line("72148"), requester_npi=OTHER_NPI).pa_needed == "auth-needed"
    assert one(demo, line("72148"), requester_npi=None).pa_needed == "auth-needed"
    assert one(demo, line("72149"), requester_npi=GOLD_NPI).pa_needed == "auth-needed"


GOLD_FILE = """
payer_id: g
version: "1"
policies:
  - {id: visit, title: Visits, codes: {CPT: ["99213"]}, pa_required: false}
  - {id: cond, title: Maybe, codes: {CPT: ["72148"]}, pa_required: conditional}
gold_cards:
  - {npi: "1234567893", codes: {CPT: ["99213", "72148", "12345"]}, from: "2026-01-01",
     to: "2026-06-30"}
  - {id: longer, npi: "1234567893", codes: {CPT: ["72140-72160"]}, from: "2026-01-01",
     to: "2026-12-31"}
"""


def test_gold_card_rules(tmp_path):
    engine = engine_from(tmp_path, GOLD_FILE)
    kw = dict(payer="g", requester_npi=GOLD_NPI)
    # never touches no-auth
    assert one(engine, line("99213", start=dt.date(2026, 3, 1)), **kw).pa_needed == "no-auth"
    # conditional → satisfied; the card with the latest expiry wins; ranges work
    d = one(engine, line("72148", start=dt.date(2026, 3, 1)), **kw)
    assert (d.pa_needed, d.satisfied_pa_id, d.expiry_date) == ("satisfied", "longer",
                                                               "2026-12-31")
    assert d.covered == "conditional" and d.info_needed == ("OTH",)
    # a code no policy names: conditional/no-policy → satisfied; default id gc-<npi>-<from>
    d = one(engine, line("12345", start=dt.date(2026, 3, 1)), **kw)
    assert (d.pa_needed, d.satisfied_pa_id) == ("satisfied", "gc-1234567893-2026-01-01")
    assert [r.code for r in d.reasons] == ["no-policy", "gold-card"]


# ------------------------------------------------------------------ combining policies

COMBINED = """
payer_id: c
version: "7"
policies:
  - id: c/visits
    title: Visits
    codes: {CPT: ["99202-99215"]}
    pa_required: false
    eligibility_check: true
    doc_required: [admin]
    link: https://payer.example/visits
  - id: c/complex-visit
    title: Complex visits for children
    codes: {CPT: ["99215"]}
    pa_required: conditional
    doc_required: [patient, clinical]
    when: {age: {max: 17}}
    link: https://payer.example/children
  - id: c/complex-visit-cancer
    title: Complex visits with cancer
    codes: {CPT: ["99214-99215"]}
    pa_required: true
    doc_required: [clinical]
    hold_for_documentation: true
    when: {diagnoses_any_of: ["C*"]}
    link: https://payer.example/visits
"""


def test_most_restrictive_wins_docs_union_all_rules_listed(tmp_path):
    engine = engine_from(tmp_path, COMBINED)
    d = one(engine, line("99215"), payer="c", patient_birth_date=dt.date(2015, 1, 1),
            diagnoses=("C50.911",))
    assert d.pa_needed == "auth-needed" and d.covered == "conditional"
    assert d.rules == ("c/visits", "c/complex-visit", "c/complex-visit-cancer")
    assert d.doc_needed == ("clinical", "admin", "patient")
    assert d.policy_links == ("https://payer.example/visits", "https://payer.example/children")
    assert d.eligibility_check is True and d.hold_for_documentation is True
    assert [r.text for r in d.reasons] == ["Visits", "Complex visits for children",
                                           "Complex visits with cancer"]
    d = one(engine, line("99215"), payer="c", patient_birth_date=dt.date(2015, 1, 1))
    assert (d.pa_needed, d.rules) == ("conditional", ("c/visits", "c/complex-visit"))
    assert d.hold_for_documentation is False
    d = one(engine, line("99215"), payer="c")
    assert (d.pa_needed, d.rules, d.doc_needed) == ("no-auth", ("c/visits",), ("admin",))


def test_conditions_not_met_unless_another_policy_applies(tmp_path):
    engine = engine_from(tmp_path, COMBINED)
    d = one(engine, line("99214"), payer="c")  # the cancer policy fails, visits applies
    assert (d.pa_needed, d.rules) == ("no-auth", ("c/visits",))
    assert [r.code for r in d.reasons] == ["policy"]


# ------------------------------------------------------------------ every `when` test

WHEN_FILE = """
payer_id: w
version: "1"
default: no-auth
policies:
  - {id: pos, title: POS, codes: {CPT: ["10001"]}, pa_required: true,
     when: {place_of_service: ["11", "22"]}}
  - {id: age, title: Age, codes: {CPT: ["10002"]}, pa_required: true,
     when: {age: {min: 18, max: 64}}}
  - {id: sex, title: Sex, codes: {CPT: ["10003"]}, pa_required: true, when: {sex: [female]}}
  - {id: qty, title: Quantity, codes: {CPT: ["10004"]}, pa_required: true,
     when: {quantity_over: 2}}
  - {id: dx-none, title: Dx none, codes: {CPT: ["10005"]}, pa_required: true,
     when: {diagnoses_none_of: ["C*", "Z51.11"]}}
  - {id: dx-any, title: Dx any, codes: {CPT: ["10006"]}, pa_required: true,
     when: {diagnoses_any_of: ["M54.5*", "E119"]}}
  - {id: window, title: Window, codes: {CPT: ["10007"]}, pa_required: true,
     when: {service_date: {from: "2026-03-01", to: "2026-03-31"}}}
  - {id: pair, title: Botox with its drug, codes: {CPT: ["64615"]}, pa_required: true,
     when: {with_any_of: {HCPCS: ["J0585-J0588"]}}}
"""


@pytest.mark.parametrize(
    ("code", "kw", "applies"),
    [
        ("10001", {"place_of_service": "11"}, True),
        ("10001", {"place_of_service": "23"}, False),
        ("10001", {"place_of_service": None}, True),  # unknown never drops a policy
        ("10002", {"patient_birth_date": dt.date(2008, 12, 1)}, True),  # 18 on DOS
        ("10002", {"patient_birth_date": dt.date(2008, 12, 2)}, False),  # 17 on DOS
        ("10002", {"patient_birth_date": dt.date(1961, 12, 2)}, True),  # 64
        ("10002", {"patient_birth_date": dt.date(1961, 12, 1)}, False),  # 65
        ("10002", {"patient_birth_date": dt.date(2008, 12, 2), "as_of": dt.date(2027, 1, 1)},
         True),
        ("10002", {"patient_birth_date": None}, True),
        ("10003", {"patient_sex": "female"}, True),
        ("10003", {"patient_sex": "male"}, False),
        ("10003", {"patient_sex": "unknown"}, False),
        ("10003", {"patient_sex": None}, True),
        ("10005", {"diagnoses": ("M54.50",)}, True),
        ("10005", {"diagnoses": ()}, True),
        ("10005", {"diagnoses": ("M54.50", "C50.911")}, False),
        ("10005", {"diagnoses": ("Z51.11",)}, False),
        ("10006", {"diagnoses": ("M54.50",)}, True),
        ("10006", {"diagnoses": ("E11.9",)}, True),
        ("10006", {"diagnoses": ("E11.65",)}, False),
        ("10006", {"diagnoses": ()}, False),
    ],
)
def test_when_tests(tmp_path, code, kw, applies):
    engine = engine_from(tmp_path, WHEN_FILE)
    d = one(engine, line(code), payer="w", **kw)
    if applies:
        assert d.pa_needed == "auth-needed" and len(d.rules) == 1
    else:
        assert d.pa_needed == "no-auth" and d.reasons[0].code == "conditions-not-met"


@pytest.mark.parametrize(("quantity", "applies"), [(1, False), (2, False), (3, True)])
def test_quantity_over(tmp_path, quantity, applies):
    engine = engine_from(tmp_path, WHEN_FILE)
    assert (one(engine, line("10004", quantity=quantity), payer="w").pa_needed
            == ("auth-needed" if applies else "no-auth"))


@pytest.mark.parametrize(
    ("start", "applies"),
    [(dt.date(2026, 2, 28), False), (dt.date(2026, 3, 1), True), (dt.date(2026, 3, 31), True),
     (dt.date(2026, 4, 1), False)],
)
def test_service_date_window(tmp_path, start, applies):
    engine = engine_from(tmp_path, WHEN_FILE)
    assert (one(engine, line("10007", start=start), payer="w").pa_needed
            == ("auth-needed" if applies else "no-auth"))


def test_default_no_auth_for_unnamed_codes(tmp_path):
    engine = engine_from(tmp_path, WHEN_FILE)
    d = one(engine, line("99999"), payer="w")
    assert (d.covered, d.pa_needed) == ("covered", "no-auth")
    assert d.reasons[0].code == "no-policy" and "default is no-auth" in d.reasons[0].text


def test_with_any_of_needs_another_line_with_a_listed_code(tmp_path):
    engine = engine_from(tmp_path, WHEN_FILE)
    alone = engine.determine(order(line("64615"), payer="w"))
    assert alone[0].reasons[0].code == "conditions-not-met"
    paired = engine.determine(order(line("64615"), line("J0586", "HCPCS"), payer="w"))
    assert paired[0].pa_needed == "auth-needed" and paired[0].rules == ("pair",)
    assert paired[1].pa_needed == "no-auth"  # J0586 itself is named by no policy
    other = engine.determine(order(line("J0589", "HCPCS"), line("64615"), payer="w"))
    assert other[1].reasons[0].code == "conditions-not-met"
    two = engine.determine(order(line("64615"), line("64615"), line("J0585", "HCPCS"),
                                 payer="w"))
    assert [d.pa_needed for d in two] == ["auth-needed", "auth-needed", "no-auth"]


def test_with_any_of_does_not_pair_a_line_with_itself(tmp_path):
    engine = engine_from(tmp_path, """
payer_id: s
version: "1"
policies:
  - {id: self, title: Self, codes: {CPT: ["20610"]}, pa_required: true,
     when: {with_any_of: {CPT: ["20610"]}}}
""")
    assert one(engine, line("20610"), payer="s").reasons[0].code == "conditions-not-met"
    both = engine.determine(order(line("20610"), line("20610"), payer="s"))
    assert [d.pa_needed for d in both] == ["auth-needed", "auth-needed"]


# ------------------------------------------------------------------ payers, files, versions

def test_multiple_payers_and_files(tmp_path):
    write(tmp_path, "a-imaging.yaml", """
payer_id: acme
version: "2026.2"
policies:
  - {id: acme/mri, title: MRI, codes: {CPT: ["70010-76499"]}, pa_required: true}
""")
    write(tmp_path, "a-visits.yaml", """
payer_id: acme
version: "2026.2"
default: conditional
policies:
  - {id: acme/visits, title: Visits, codes: {CPT: ["99202-99215"]}, pa_required: false}
""")
    write(tmp_path, "zeta.yaml", """
payer_id: zeta
version: "1"
default: no-auth
policies:
  - {id: zeta/mri, title: MRI, codes: {CPT: ["72148"]}, pa_required: conditional}
""")
    engine = RulesEngine.from_directory(tmp_path)
    assert engine.payer_ids() == {"acme", "zeta"}
    assert engine.version("acme") == "acme@2026.2" and engine.version("zeta") == "zeta@1"
    assert sorted(engine.versions()["acme"]["files"]) == ["a-imaging.yaml", "a-visits.yaml"]
    assert one(engine, line("72148"), payer="acme").rules == ("acme/mri",)
    assert one(engine, line("99213"), payer="acme").rules == ("acme/visits",)
    assert one(engine, line("12345"), payer="acme").pa_needed == "conditional"
    assert one(engine, line("72148"), payer="zeta").pa_needed == "conditional"
    assert one(engine, line("12345"), payer="zeta").pa_needed == "no-auth"


def test_subfolders_and_other_extensions_are_ignored(tmp_path):
    write(tmp_path, "demo.yaml", (RULES_DIR / "demo.yaml").read_text())
    write(tmp_path, "tests/golden.yaml", "this: is: not a policy file\n")
    write(tmp_path, "sub/other.yaml", "payer_id: other\nversion: '1'\n")
    write(tmp_path, "notes.yml", "payer_id: yml\nversion: '1'\n")
    engine = RulesEngine.from_directory(tmp_path)
    assert engine.payer_ids() == {"demo"}


def test_digest_changes_with_content_not_with_version_alone(tmp_path):
    write(tmp_path, "p.yaml", GOLD_FILE)
    first = RulesEngine.from_directory(tmp_path).versions()["g"]["digest"]
    write(tmp_path, "p.yaml", GOLD_FILE + "# a comment\n")
    second = RulesEngine.from_directory(tmp_path).versions()["g"]["digest"]
    assert first != second


def _errors(tmp_path: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(PolicyError) as info:
        RulesEngine.from_directory(tmp_path)
    return info.value.errors


GOOD_POLICY = "  - {id: ok, title: Ok, codes: {CPT: ['72148']}, pa_required: true}\n"


@pytest.mark.parametrize(
    ("text", "line_no", "fragment"),
    [
        ("payer_id: x\nversion: '1'\nextra: 1\n", 3, "unknown field 'extra'"),
        ("payer_id: x\nversion: '1'\npolicies:\n" + GOOD_POLICY
         + "  - id: b\n    title: B\n    codes: {CPT: ['7214']}\n    pa_required: true\n",
         7, "policies[1].codes.CPT[0]"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: ['72158-72148']}\n    pa_required: true\n", 6, "starts after it ends"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: ['0001T-99999']}\n    pa_required: true\n", 6, "mixes code formats"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {HCPCS: ['A0100-B0200']}\n    pa_required: true\n", 6, "mixes code formats"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: [72148]}\n    pa_required: true\n", 6, "quote it"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: ['72148']}\n    pa_required: maybe\n", 7, "pa_required"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: ['72148']}\n    pa_required: true\n    doc_required: [xray]\n",
         8, "doc_required[0]"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: ['72148']}\n    pa_required: true\n    when:\n      age: {min: 70, "
         "max: 20}\n", 9, "age min is above max"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: ['72148']}\n    pa_required: true\n    when:\n      service_date:\n"
         "        from: '2026-02-30'\n", 10, "not a valid date"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         "    codes: {CPT: ['72148']}\n    pa_required: true\n    when: {colour: [red]}\n",
         8, "unknown field 'colour'"),
        ("payer_id: x\nversion: '1'\npolicies:\n" + GOOD_POLICY + GOOD_POLICY, 5,
         "duplicate policy id 'ok'"),
        ("payer_id: x\nversion: '1'\ngold_cards:\n  - npi: '1234567890'\n"
         "    codes: {CPT: ['72148']}\n    from: '2026-01-01'\n    to: '2026-12-31'\n", 4,
         "check digit"),
        ("payer_id: x\nversion: '1'\ngold_cards:\n  - npi: '1234567893'\n"
         "    codes: {CPT: ['72148']}\n    from: '2026-12-01'\n    to: '2026-01-31'\n", 6,
         "after it ends"),
        ("payer_id: x\nversion: '1'\ngold_cards:\n  - npi: '1234567893'\n"
         "    codes: {CPT: ['72148']}\n    from: 2026-01-01\n", 4, "'to' is a required"),
        ("payer_id: x\nversion: '1'\npolicies:\n  - id: b\n    title: B\n"
         '    codes: {CPT: ["72148\\n"]}\n    pa_required: true\n', 6, "is not a CPT code"),
        ("payer_id: x\nversion: 1\n", 2, "quote it"),
        ("payer_id: x\nversion: '1'\nversion: '2'\n", 3, "duplicate key 'version'"),
        ("payer_id: x\nversion: '1'\npolicies: [\n", 4, "invalid YAML"),
        ("- just\n- a list\n", 1, "is not of type 'object'"),
    ],
)
def test_invalid_file_reports_file_and_line(tmp_path, text, line_no, fragment):
    errors = _errors(tmp_path, {"bad.yaml": text})
    assert any(e.startswith(f"{tmp_path / 'bad.yaml'}:{line_no}:") and fragment in e
               for e in errors), errors


def test_files_of_one_payer_must_agree(tmp_path):
    errors = _errors(tmp_path, {
        "a.yaml": "payer_id: x\nversion: '1'\ndefault: no-auth\npolicies:\n" + GOOD_POLICY,
        "b.yaml": "payer_id: x\nversion: '2'\npolicies:\n" + GOOD_POLICY,
    })
    text = "\n".join(errors)
    assert f"{tmp_path / 'b.yaml'}:2: version: '2' disagrees with '1'" in text
    assert f"{tmp_path / 'b.yaml'}:1: default: 'conditional' disagrees with 'no-auth'" in text
    assert "duplicate policy id 'ok'" in text


def test_every_error_is_reported_at_once(tmp_path):
    errors = _errors(tmp_path, {
        "a.yaml": "payer_id: x\nversion: '1'\nextra: 1\n",
        "b.yaml": "payer_id: y\nversion: '1'\npolicies:\n  - {id: b, title: B, "
                  "codes: {CPT: ['72158-72148']}, pa_required: true}\n",
        "c.yaml": "payer_id: z\nversion: '1'\n",
    })
    assert len(errors) == 2
    assert errors[0].startswith(str(tmp_path / "a.yaml"))
    assert errors[1].startswith(str(tmp_path / "b.yaml"))


def test_bad_directories(tmp_path):
    with pytest.raises(PolicyError):
        RulesEngine.from_directory(tmp_path)  # no policy files
    with pytest.raises(PolicyError):
        RulesEngine.from_directory(tmp_path / "missing")


# ------------------------------------------------------------------ engine hygiene

def test_memo_is_bounded_and_agrees_with_cold_evaluation(tmp_path):
    cold = engine_from(tmp_path, COMBINED, memo_size=0)
    warm = RulesEngine.from_directory(tmp_path, memo_size=4)
    for code in ["99202", "99214", "99215", "12345", "72148", "99213"] * 3:
        for dx in [(), ("C50.911",)]:
            o = order(line(code), payer="c", diagnoses=dx)
            assert warm.determine(o) == cold.determine(o)
    assert warm.memo_entries() <= 4 and cold.memo_entries() == 0


def test_sessions_are_deleted_after_each_evaluation(demo):
    engine = RulesEngine.from_directory(RULES_DIR, memo_size=0)
    engine.determine(order(line("72148"), line("64615")))
    last_sid = f"{engine._tag}-{next(engine._sessions) - 1}"
    with pytest.raises(Exception, match="309"):  # the C core: no such session
        engine._host.get_facts("demo@2026-11-20.1", last_sid)


def test_a_decision_ruleset_has_a_dozen_rules(demo):
    assert demo.ruleset_size("demo") == len(DECISION_RULES) + 2 <= 12


def test_engines_are_independent_and_collected(tmp_path):
    demo_v1 = RulesEngine.from_directory(RULES_DIR)
    for _ in range(60):  # reloads: old engines are collected, their C rulesets freed
        engine_from(tmp_path, GOLD_FILE).determine(order(line("72148"), payer="g"))
    gc.collect()
    assert one(engine_from(tmp_path, GOLD_FILE), line("99213"), payer="g").pa_needed == "no-auth"
    assert one(demo_v1, line("72148")).pa_needed == "auth-needed"
    assert not rules_engine_module._RETIRED or len(rules_engine_module._RETIRED) < 200


def test_thread_safety_smoke(tmp_path):
    engine = engine_from(tmp_path, COMBINED + """gold_cards:
  - {npi: "1234567893", codes: {CPT: ["99214"]}, from: "2026-01-01", to: "2026-12-31"}
""", memo_size=0)
    orders = [
        order(line(code), line("J0585", "HCPCS"), payer="c", diagnoses=dx, requester_npi=npi)
        for code in ["99202", "99214", "99215", "12345"]
        for dx in [(), ("C50.911",)]
        for npi in [GOLD_NPI, OTHER_NPI]
    ]
    expected = [engine.determine(o) for o in orders]
    failures: list[str] = []

    def worker(offset: int) -> None:
        try:
            for k in range(150):
                i = (k + offset) % len(orders)
                if engine.determine(orders[i]) != expected[i]:
                    failures.append(f"mismatch on order {i}")
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures and not any(t.is_alive() for t in threads)


# ------------------------------------------------------------------ 10,000 policies

def _generated(n: int) -> str:
    policies = []
    for i in range(n):
        code = f"{10000 + i:05d}"
        policy = {"id": f"gen/{i}", "title": f"Generated {i}", "codes": {"CPT": [code]},
                  "pa_required": [True, False, "conditional"][i % 3]}
        if i % 10 == 0:
            policy["when"] = {"quantity_over": 1}
        if i % 50 == 0:
            policy["codes"]["HCPCS"] = [f"J{i % 9000:04d}-J{i % 9000 + 5:04d}"]
        policies.append(policy)
    policies.append({"id": "gen/range", "title": "Range", "codes": {"CPT": ["10000-10999"]},
                     "pa_required": False})
    card = {"npi": GOLD_NPI, "codes": {"CPT": ["10003"]}, "from": "2026-01-01",
            "to": "2026-12-31"}
    # JSON flow mappings are YAML too, one policy a line, and far faster to write than dump
    return (
        'payer_id: big\nversion: "1"\npolicies:\n'
        + "".join(f"  - {json.dumps(p)}\n" for p in policies)
        + f"gold_cards:\n  - {json.dumps(card)}\n"
    )


def test_ten_thousand_policies(tmp_path):
    text = _generated(10_000)
    started = time.perf_counter()
    engine = engine_from(tmp_path, text, memo_size=0)
    load_seconds = time.perf_counter() - started
    assert engine.ruleset_size("big") == len(DECISION_RULES) + 2
    raw = [yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))]
    orders = [
        order(line("10001"), payer="big"),  # false + the range → no-auth
        order(line("10002"), payer="big"),  # conditional
        order(line("10003"), payer="big", requester_npi=GOLD_NPI),  # true + gold card
        order(line("10010"), payer="big"),  # quantity_over fails, range applies
        order(line("10010", quantity=2), payer="big"),
        order(line("19999"), payer="big"),
        order(line("J0052", "HCPCS"), payer="big"),  # ranges J0050-J0055, J0100-…
        order(line("99999"), payer="big"),
    ]
    for o in orders:
        assert [comparable(d) for d in engine.determine(o)] == [
            comparable(d) for d in evaluate(raw, o)]
    d = one(engine, line("10003"), payer="big", requester_npi=GOLD_NPI)
    assert (d.pa_needed, d.rules) == ("satisfied", ("gen/3", "gen/range"))
    d = one(engine, line("10010"), payer="big")
    assert (d.pa_needed, d.rules) == ("no-auth", ("gen/range",))
    started = time.perf_counter()
    for _ in range(200):
        engine.determine(orders[1])
    per_call = (time.perf_counter() - started) / 200
    assert per_call < 0.01, per_call  # the index, not the policy count, does the work
    assert load_seconds < 30


def test_code_index_ranges_overlap_and_exact_codes():
    index = CodeIndex()
    index.add("CPT", "70010-76499", 0)
    index.add("CPT", "72000-72999", 1)
    index.add("CPT", "72148", 2)
    index.add("CPT", "0001T-0100T", 3)
    index.add("CPT", "0001M-0010M", 5)
    index.add("HCPCS", "J0585-J0588", 4)
    index.freeze()
    assert index.lookup("CPT", "72148") == (0, 1, 2)
    assert index.lookup("CPT", "72999") == (0, 1)
    assert index.lookup("CPT", "73000") == (0,)
    assert index.lookup("CPT", "70009") == ()
    assert index.lookup("CPT", "0050T") == (3,)
    assert index.lookup("CPT", "00500") == ()
    assert index.lookup("CPT", "0005M") == (5,)
    assert index.lookup("HCPCS", "J0588") == (4,)
    assert index.lookup("HCPCS", "K0586") == ()
    assert index.lookup("CPT", "garbage") == ()


def test_load_documents_matches_files(tmp_path):
    ruleset = load_documents({name: (RULES_DIR / name).read_text()
                              for name in ("demo.yaml", "medicare.yaml")})
    assert json.dumps(ruleset.versions(), sort_keys=True) == json.dumps(
        RulesEngine.from_directory(RULES_DIR).versions(), sort_keys=True)


def test_direct_driver_fires_what_durable_rules_own_host_fires():
    """The adapter runs fired rules through durable-rules' C protocol itself; the library's
    own Host, running the same definition's actions, must record the same decisions and
    cross-line pairs (guards the shortcut against a durable-rules upgrade)."""
    from durable import engine as durable_engine

    facts = [
        {"id": "l0", "t": "line", "i": 0, "applies": True, "named": True, "pa": "auth-needed",
         "gold": False, "dflt": "conditional"},
        {"id": "l1", "t": "line", "i": 1, "applies": False, "named": True, "pa": "",
         "gold": False, "dflt": "conditional"},
        {"id": "l2", "t": "line", "i": 2, "applies": False, "named": False, "pa": "",
         "gold": True, "dflt": "conditional"},
        {"id": "l3", "t": "line", "i": 3, "applies": True, "named": True, "pa": "conditional",
         "gold": True, "dflt": "no-auth"},
        {"id": "n0", "t": "need", "i": 0, "pol": 7, "set": 1},
        {"id": "n1", "t": "need", "i": 2, "pol": 8, "set": 2},
        {"id": "h0", "t": "has", "i": 1, "set": 1},
        {"id": "h1", "t": "has", "i": 2, "set": 2},  # same line as its need: no pair
    ]

    class Host(durable_engine.Host):
        def _run(self) -> None:
            return None

    def run(direct: bool) -> tuple[list, set]:
        sink = rules_engine_module._Sink()
        host = Host()
        name = f"cmp-{'direct' if direct else 'host'}"
        host.register_rulesets({name: rules_engine_module._ruleset_definition(sink)})
        batch = [{**f, "sid": "s1"} for f in facts]
        if direct:
            handle = host.get_ruleset(name)._handle
            rules_engine_module._assert_facts(handle, batch, sink)
        else:
            host.assert_facts(name, batch)
        return sorted(sink.decisions), set(sink.pairs)

    direct, hosted = run(True), run(False)
    assert direct == hosted
    assert direct == ([(0, "policy-auth-needed"), (1, "conditions-not-met"),
                       (2, "no-policy-gold-card"), (3, "policy-gold-card")], {(0, 7)})
