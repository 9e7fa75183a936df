"""Render notification templates: Jinja2, autoescaped, one file per event × channel × language.

Patients and caregivers share the family templates (`{lang}/{event}.{channel}.j2`, worded by
the `audience` variable); providers get `provider/{event}.email.j2` (English, with the
payer's codes). Email templates extend `_email.j2`: the subject, a marker, then the HTML
body; SMS templates are one short text. Plain-text forms are derived from the escaped HTML,
so a value can never inject markup, and the SMS text is unescaped only after rendering.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import re
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
LANGUAGES = ("en", "es")
FAMILY_EVENTS = ("received", "no_auth_needed", "documentation_needed", "coverage_problem",
                 "approved", "partially_approved", "modified", "denied", "cancelled")
PROVIDER_EVENTS = ("documentation_needed", "no_auth_needed", "coverage_problem", "approved",
                   "partially_approved", "modified", "denied", "cancelled", "overdue")

#: X12 886 decision reasons in plain words (domain.md §2); patients never see the code.
PLAIN_REASONS: dict[str, dict[str, str]] = {
    "0F": {"en": "Your health plan does not think this care is needed for your health now.",
           "es": "Su plan de salud cree que esta atención no es necesaria para su salud ahora."},
    "0G": {"en": "Your health plan thinks a different kind or place of care would fit better.",
           "es": "Su plan de salud cree que otro tipo o lugar de atención es mejor para usted."},
    "0H": {"en": "Your health plan says this care does not need its OK first.",
           "es": "Su plan de salud dice que esta atención no necesita su permiso antes."},
    "0M": {"en": "Your health plan does not pay for this kind of care.",
           "es": "Su plan de salud no paga por este tipo de atención."},
    "0P": {"en": "Your health plan did not get the papers it asked for.",
           "es": "Su plan de salud no recibió los papeles que pidió."},
    "0Q": {"en": "Your health plan already has this same request.",
           "es": "Su plan de salud ya tiene esta misma solicitud."},
    "0U": {"en": "Your health plan needs more facts about your health.",
           "es": "Su plan de salud necesita más datos sobre su salud."},
    "0V": {"en": "A doctor at your health plan needs to look at this request.",
           "es": "Un médico de su plan de salud debe revisar esta solicitud."},
    "0W": {"en": "Your health plan is still looking at this request.",
           "es": "Su plan de salud todavía está revisando esta solicitud."},
    "13": {"en": "Your health plan gave the OK to a different doctor or place.",
           "es": "Su plan de salud dio el permiso a otro médico o lugar."},
    "9": {"en": "This doctor or place does not work with your health plan.",
          "es": "Este médico o lugar no trabaja con su plan de salud."},
}
UNKNOWN_REASON = {"en": "Your health plan did not say why. Your doctor's office can ask them.",
                  "es": "Su plan de salud no dijo por qué. La oficina de su médico puede "
                        "preguntar."}
SUBJECT_END = "<!-- end of subject -->"
MONTHS_ES = ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto",
             "septiembre", "octubre", "noviembre", "diciembre")


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A message ready for a channel: `subject` is empty for SMS, `html` only for email."""

    template: str
    subject: str
    text: str
    html: str | None = None


def plain_reason(code: str | None, language: str) -> str:
    """The payer's decision reason in plain words (never the code) for patients."""
    lang = language if language in LANGUAGES else "en"
    return PLAIN_REASONS.get(code or "", UNKNOWN_REASON)[lang]


def format_date(value: dt.date | str | None, language: str) -> str:
    """`December 1, 2026` or `1 de diciembre de 2026`; empty when unknown."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value[:10])
        except ValueError:
            return ""
    if language == "es":
        return f"{value.day} de {MONTHS_ES[value.month - 1]} de {value.year}"
    return f"{value:%B} {value.day}, {value.year}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=False)
    env.filters["date"] = format_date
    env.globals["plain_reason"] = plain_reason
    return env


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


def template_name(event: str, audience: str, channel: str, language: str) -> str:
    """The id stored on the notification row, e.g. `denied/patient/sms/es`."""
    return f"{event}/{audience}/{channel}/{language}"


def template_file(event: str, audience: str, channel: str, language: str) -> str:
    if audience == "provider":
        return f"provider/{event}.email.j2"  # webhooks carry the email's text
    return f"{language}/{event}.{'sms' if channel == 'sms' else 'email'}.j2"


def has_template(event: str, audience: str, channel: str, language: str) -> bool:
    return (TEMPLATE_DIR / template_file(event, audience, channel, language)).is_file()


def html_to_text(markup: str) -> str:
    """The plain-text alternative of an escaped HTML body (lists and paragraphs kept)."""
    text = re.sub(r"(?i)<br\s*/?>", "\n", markup)
    text = re.sub(r"(?i)<li[^>]*>", "- ", text)
    text = re.sub(r"(?i)</(p|li|h[1-6]|ol|ul|div)>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


def render(event: str, audience: str, channel: str, language: str, context: dict) -> Rendered:
    """Render one message; `context` holds only what the template shows (see the templates)."""
    lang = language if language in LANGUAGES else "en"
    if audience == "provider":
        lang = "en"
    env = environment()
    tmpl = env.get_template(template_file(event, audience, channel, lang))
    ctx = {**context, "audience": audience, "language": lang, "channel": channel}
    name = template_name(event, audience, channel, lang)
    if channel == "sms":
        raw = tmpl.render(ctx)
        text = " ".join(html.unescape(raw).split())
        return Rendered(template=name, subject="", text=text)
    head, _, body = tmpl.render(ctx).partition(SUBJECT_END)
    subject = " ".join(html.unescape(head).split())
    return Rendered(template=name, subject=subject, text=html_to_text(body), html=body.strip())


def page(name: str, **context: object) -> str:
    """An HTML page of the public notification routes (`pages/…`), autoescaped."""
    return environment().get_template(f"pages/{name}").render(**context)
