"""Notification templates: plain language (a readability score per patient template), no
codes or internal names for patients, minimum PHI in texts, escaping, provider detail."""

from __future__ import annotations

import re

import pytest

from authsvc.adapters.notify import render

textstat = pytest.importorskip("textstat")

CONTEXT = {
    "org_name": "Valley Clinic", "order_id": "ord_01test", "external_id": "EHR-ORD-1001",
    "case_id": "case_01test", "link": "http://127.0.0.1:8000/v1/orders/ord_01test",
    "pa_needed": True, "documents": ["clinical"], "coverage": "inactive",
    "lines": [{"sequence": 1, "code_system": "CPT", "code": "97530", "requested": 5,
               "outcome": "modified", "review_action": "A6", "approved": 2,
               "approved_code": "97530", "auth_number": "AUTH0001",
               "valid_from": "2026-12-01", "valid_to": "2026-12-31",
               "denial_code": "0F", "denial_text": "Not Medically Necessary"}],
    "changes": [{"sequence": 1, "code_system": "CPT", "code": "97530", "requested": 5,
                 "approved": 2, "approved_code": "97530"}],
    "reason_codes": ["0F"], "valid_from": "2026-12-01", "valid_to": "2026-12-31",
    "decision_due_at": "2026-12-08T10:00:00Z", "sent_to_payer": True,
}
FAMILY = [(event, audience, channel, lang)
          for event in render.FAMILY_EVENTS for audience in ("patient", "caregiver")
          for channel in ("email", "sms") for lang in ("en", "es")]
#: what a patient or caregiver must never read: payer codes, internal state names, jargon
FORBIDDEN = re.compile(
    r"\b(0F|A[1-6]|AAA|X12|CPT|HCPCS|ICD|97530|72148|M54\.50|needs_input|info_requested|"
    r"partially_approved|coverage_problem|no_auth_required|prior authorization|"
    r"medically necessary|adjudicat\w*|utilization|pended|UM0\d)\b", re.IGNORECASE)


def _text(msg: render.Rendered) -> str:
    return f"{msg.subject}. {msg.text}" if msg.subject else msg.text


@pytest.mark.parametrize(("event", "audience", "channel", "lang"), FAMILY)
def test_every_patient_template_is_plain_language(event, audience, channel, lang):
    for coverage in ("inactive", "member_not_found"):
        for pa_needed in (True, False):
            msg = render.render(event, audience, channel, lang,
                                {**CONTEXT, "coverage": coverage, "pa_needed": pa_needed})
            text = _text(msg)
            assert not FORBIDDEN.search(text), (msg.template, FORBIDDEN.search(text))
            if lang == "en":
                textstat.set_lang("en")
                grade = textstat.flesch_kincaid_grade(text)
                assert grade <= 8, (msg.template, grade)
            else:
                textstat.set_lang("es")
                try:
                    # Fernández-Huerta ≥ 60 and Szigriszt-Pazos ≥ 55 are "normal" or easier:
                    # the level of 12-15 year olds, the Spanish match of grade 8.
                    assert textstat.fernandez_huerta(text) >= 60, msg.template
                    assert textstat.szigriszt_pazos(text) >= 55, msg.template
                finally:
                    textstat.set_lang("en")


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize("event", render.FAMILY_EVENTS)
def test_a_text_never_names_the_diagnosis_or_procedure_and_stays_short(event, lang):
    msg = render.render(event, "patient", "sms", lang, CONTEXT)
    assert "97530" not in msg.text and "M54" not in msg.text
    assert "Not Medically Necessary" not in msg.text
    assert "STOP" in msg.text  # how to opt out
    assert len(msg.text) <= 480  # at most three SMS segments
    assert "\n" not in msg.text and "<" not in msg.text


def test_denial_says_why_in_plain_words_and_how_to_appeal():
    en = render.render("denied", "caregiver", "email", "en", CONTEXT)
    assert "does not think this care is needed" in en.text
    assert "appeal" in en.text and "Call the office" in en.text
    es = render.render("denied", "patient", "sms", "es", CONTEXT)
    assert "no es necesaria" in es.text and "apelación" in es.text


def test_modification_tells_what_changed():
    for lang, words in (("en", "The doctor asked for 5. The plan said yes to 2."),
                        ("es", "El médico pidió 5. El plan dijo que sí a 2.")):
        assert words in render.render("modified", "patient", "email", lang, CONTEXT).text
    sms = render.render("modified", "patient", "sms", "en", CONTEXT)
    assert "2 of the 5" in sms.text


@pytest.mark.parametrize("event", render.PROVIDER_EVENTS)
def test_provider_messages_carry_codes_and_payer_text(event):
    msg = render.render(event, "provider", "email", "en", CONTEXT)
    assert "ord_01test" in msg.text and "CPT 97530" in msg.text
    if event == "denied":
        assert '0F "Not Medically Necessary"' in msg.text
    if event == "modified":
        assert "requested 5, authorized 2" in msg.text


def test_values_are_escaped_in_html_and_plain_in_text():
    msg = render.render("approved", "caregiver", "email", "en",
                        {**CONTEXT, "org_name": "<b>A&B</b> {{7*7}}"})
    assert "&lt;b&gt;A&amp;B&lt;/b&gt;" in (msg.html or "")
    assert "<b>A&B</b> {{7*7}}" in msg.text and "49" not in msg.text
    sms = render.render("approved", "patient", "sms", "en", {**CONTEXT, "org_name": "A&B"})
    assert sms.text.startswith("A&B:")


def test_unknown_reason_codes_still_read_plainly():
    assert "did not say why" in render.plain_reason(None, "en")
    assert "no dijo por qué" in render.plain_reason("ZZ", "es")
    assert render.format_date("2026-12-01", "es") == "1 de diciembre de 2026"
    assert render.format_date("2026-12-01", "en") == "December 1, 2026"


def test_every_planned_template_exists():
    from authsvc.service_layer import notifications

    for event in notifications.FAMILY_EVENTS:
        for channel in ("email", "sms"):
            for lang in ("en", "es"):
                assert render.has_template(event, "patient", channel, lang)
    for event in notifications.PROVIDER_EVENTS:
        assert render.has_template(event, "provider", "email", "en")
    assert set(notifications.FAMILY_EVENTS) == set(render.FAMILY_EVENTS)
    assert set(notifications.PROVIDER_EVENTS) == set(render.PROVIDER_EVENTS)
