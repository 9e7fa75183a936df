"""`authsvc rules validate` and `authsvc rules test`: file:line errors, golden cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from authsvc.cli import main

RULES = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture()
def rules_copy(tmp_path: Path) -> Path:
    shutil.copytree(RULES, tmp_path / "rules")
    return tmp_path / "rules"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_shipped_rules_validate_and_pass_their_golden_cases(capsys):
    code, out = run(capsys, "rules", "validate", "--no-db", str(RULES))
    assert code == 0 and "demo@2026-11-20.1" in out and "medicare@" in out
    code, out = run(capsys, "rules", "test", str(RULES))
    assert code == 0, out
    count = int(out.split(" cases")[0].split()[-1])
    assert count >= 40 and "0 failed" in out


BAD = """payer_id: bad
version: "1"
policies:
  - id: a
    title: A
    codes: {ICD10: ["M54.50"]}
    pa_required: true
  - id: b
    title: B
    codes: {CPT: ["72150-72140"]}
    pa_required: true
  - id: c
    title: C
    codes: {CPT: ["72148"]}
    pa_required: true
    when: {diagnoses_none_of: ["C**"]}
  - id: d
    title: D
    codes: {CPT: ["72148"]}
    pa_required: true
    when: {diagnoses_any_of: ["Q99.999", "E11", "U9*"]}
  - id: e
    title: E
    codes: {CPT: ["72148"]}
    pa_required: false
  - id: e
    title: E again
    codes: {CPT: ["72149"]}
    pa_required: true
  - id: f
    title: F
    codes: {CPT: ["72148", "72100-72200"]}
    pa_required: true
  - id: g
    title: G
    codes: {CPT: ["72190-72250"]}
    pa_required: conditional
  - id: h
    title: H
    codes: {CPT: ["72120-72130"]}
    pa_required: false
gold_cards:
  - {npi: "1234567890", codes: {CPT: ["72148"]}, from: "2026-01-01", to: "2026-12-31"}
"""


def test_validate_reports_every_semantic_error_as_file_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(BAD)  # schema errors: the file stops there
    semantic = BAD.replace('{ICD10: ["M54.50"]}', '{CPT: ["72140"]}').replace('"C**"', '"C*"')
    (tmp_path / "worse.yaml").write_text(semantic.replace("payer_id: bad", "payer_id: worse"))
    code, out = run(capsys, "rules", "validate", "--no-db", str(tmp_path))
    assert code == 1
    lines = out.strip().splitlines()
    by_text = "\n".join(lines)
    expected = [
        ("bad.yaml", 6, "unknown code system 'ICD10'"),
        ("bad.yaml", 16, "'C**' is not valid here"),
        ("worse.yaml", 10, "starts after it ends"),
        ("worse.yaml", 21, "'Q99.999' is not an ICD-10-CM code"),
        ("worse.yaml", 21, "'E11' is a category"),
        ("worse.yaml", 21, "no ICD-10-CM code starts with 'U9'"),
        ("worse.yaml", 43, "fails the NPI check digit"),
    ]
    for name, line_no, fragment in expected:
        prefix = f"{tmp_path / name}:{line_no}:"
        assert any(line.startswith(prefix) and fragment in line for line in lines), (
            name, line_no, fragment, by_text)


def test_duplicate_ids_and_contradictions(tmp_path, capsys):
    text = BAD.split("  - id: b\n")[0].replace('{ICD10: ["M54.50"]}', '{CPT: ["72148"]}')
    text += BAD[BAD.index("  - id: e\n"):BAD.index("gold_cards:")]
    (tmp_path / "p.yaml").write_text(text)
    code, out = run(capsys, "rules", "validate", "--no-db", str(tmp_path))
    assert code == 1
    assert "duplicate policy id 'e'" in out
    # a and e name 72148 under the same (no) `when` and disagree: an error
    assert "policy 'e' (72148, no-auth) contradicts 'a'" in out or (
        "policy 'a' (72148, auth-needed) contradicts 'e'" in out)
    # f's 72148 is inside its own range (same policy): not reported; g partly overlaps f's
    # range and disagrees: reported; h nests inside f's range: a refinement, allowed
    assert "'g'" in out and "'h'" not in out


def test_golden_failures_exit_1_with_the_difference(rules_copy, capsys):
    path = rules_copy / "tests" / "demo.yaml"
    path.write_text(path.read_text().replace(
        "expect: [{pa_needed: auth-needed, rules: [demo/imaging/mri-knee]}]",
        "expect: [{pa_needed: no-auth, rules: [demo/imaging/mri-knee]}]", 1))
    code, out = run(capsys, "rules", "test", "-q", str(rules_copy))
    assert code == 1
    assert "FAIL" in out and "knee MRI needs authorization: line 1: pa_needed: expected " \
        "'no-auth', got 'auth-needed'" in out
    assert "1 failed" in out


def test_golden_bad_case_and_empty_directory(rules_copy, tmp_path, capsys):
    (rules_copy / "tests" / "broken.yaml").write_text(
        "payer_id: demo\ncases:\n  - name: no lines\n    order: {lines: []}\n    expect: []\n"
        "  - name: unknown payer\n    order: {payer_id: nobody, lines: [{code: '72148'}]}\n"
        "    expect: [{}]\n")
    code, out = run(capsys, "rules", "test", "-q", str(rules_copy))
    assert code == 1 and "no lines: bad case" in out and "unknown payer: bad case" in out
    empty = tmp_path / "empty"
    shutil.copy(RULES / "demo.yaml", empty.mkdir() or empty / "demo.yaml")
    code, out = run(capsys, "rules", "test", "-q", str(empty))
    assert code == 1 and "no golden cases" in out
