"""The database schema (SQLAlchemy Core). Same tables on PostgreSQL and SQLite.

PHI lives in `patients` and `orders` (names, birth date, member id), in payer exchange
bodies and in `notifications.address` (the email address, phone number or webhook URL a
notification goes to, fixed when it is planned); every other table holds ids and codes only
(`notification_optouts` holds keyed hashes of addresses, never the addresses).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC datetimes on both backends (SQLite drops the offset)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        if value is not None and dialect.name == "sqlite":
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Id = sa.String(40)

organizations = sa.Table(
    "organizations", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("provider_email", sa.String(320)),
    sa.Column("provider_webhook_url", sa.String(2000)),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

api_tokens = sa.Table(
    "api_tokens", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("name", sa.String(200)),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_on", sa.Date),
    sa.Column("revoked_at", UTCDateTime),
    sa.Column("last_used_at", UTCDateTime),
)

patients = sa.Table(
    "patients", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("mrn", sa.String(64), nullable=False),
    sa.Column("given_name", sa.String(200), nullable=False),
    sa.Column("family_name", sa.String(200), nullable=False),
    sa.Column("birth_date", sa.Date, nullable=False),
    sa.Column("sex", sa.String(10), nullable=False),
    sa.Column("contacts", JSONType, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("org_id", "mrn"),
)

orders = sa.Table(
    "orders", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("external_id", sa.String(128)),
    sa.Column("patient_id", Id, sa.ForeignKey("patients.id"), nullable=False),
    sa.Column("payer_id", sa.String(64), nullable=False),
    sa.Column("member_id", sa.String(80), nullable=False),
    sa.Column("group_number", sa.String(80)),
    sa.Column("requester_npi", sa.String(10), nullable=False),
    sa.Column("requester_name", sa.String(200)),
    sa.Column("performer_npi", sa.String(10)),
    sa.Column("performer_name", sa.String(200)),
    sa.Column("place_of_service", sa.String(2)),
    sa.Column("diagnoses", JSONType, nullable=False),
    sa.Column("urgency", sa.String(10), nullable=False),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("eligibility_status", sa.String(20), nullable=False),
    sa.Column("attention_reason", sa.String(30)),
    sa.Column("attention_since", UTCDateTime),
    sa.Column("ruleset_version", sa.String(100), nullable=False),
    sa.Column("notes", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_orders_org_created", "org_id", "created_at", "id"),
    sa.Index("ix_orders_org_status", "org_id", "status"),
)

order_lines = sa.Table(
    "order_lines", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", Id, sa.ForeignKey("orders.id"), nullable=False),
    sa.Column("sequence", sa.Integer, nullable=False),
    sa.Column("code_system", sa.String(5), nullable=False),
    sa.Column("code", sa.String(5), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("modifiers", JSONType),
    sa.Column("service_start", sa.Date, nullable=False),
    sa.Column("service_end", sa.Date),
    sa.Column("coverage_assertion_id", sa.String(100)),
    sa.Column("determination", JSONType, nullable=False),
    sa.UniqueConstraint("order_id", "sequence"),
)

eligibility_checks = sa.Table(
    "eligibility_checks", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("order_id", Id, sa.ForeignKey("orders.id"), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("date_of_service", sa.Date, nullable=False),
    sa.Column("requested_at", UTCDateTime, nullable=False),
    sa.Column("answered_at", UTCDateTime),
    sa.Column("plan_name", sa.String(200)),
    sa.Column("auth_required", sa.Boolean),
    sa.Column("errors", JSONType),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("claimed_until", UTCDateTime),
    sa.Column("next_attempt_at", UTCDateTime),
    sa.Index("ix_elig_order", "order_id"),
)

cases = sa.Table(
    "cases", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("order_id", Id, sa.ForeignKey("orders.id"), nullable=False),
    sa.Column("payer_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("related_case_id", Id),
    sa.Column("certification_type", sa.String(2), nullable=False),
    sa.Column("urgency", sa.String(10), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("version", sa.Integer, nullable=False, default=1),
    sa.Column("attention_reason", sa.String(30)),
    sa.Column("attention_since", UTCDateTime),
    sa.Column("assignee", sa.String(200)),
    sa.Column("submission_unknown", sa.Boolean, nullable=False, default=False),
    sa.Column("claimed_until", UTCDateTime),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", UTCDateTime),
    sa.Column("submitted_at", UTCDateTime),
    sa.Column("payer_received_at", UTCDateTime),
    sa.Column("decision_due_at", UTCDateTime),
    # when the scheduler last raised the overdue alert (once per deadline: migration 0007)
    sa.Column("overdue_raised_at", UTCDateTime),
    sa.Column("decided_at", UTCDateTime),
    sa.Column("next_poll_at", UTCDateTime),
    sa.Column("poll_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_event_number", sa.Integer),
    sa.Column("last_error", JSONType),
    sa.Column("payer_ref", sa.String(100)),
    sa.Column("level_of_care", sa.String(100)),
    sa.Column("reason", sa.String(2000)),  # appeal reason
    sa.Column("update_pending", sa.Boolean, nullable=False, default=False,
              server_default=sa.false()),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_cases_worklist", "org_id", "state", "decision_due_at"),
    sa.Index("ix_cases_org_due", "org_id", "decision_due_at", "id"),
    sa.Index("ix_cases_org_assignee_due", "org_id", "assignee", "decision_due_at", "id"),
    sa.Index("ix_cases_order", "order_id"),
    sa.Index("ix_cases_next_poll", "next_poll_at"),
)

case_lines = sa.Table(
    "case_lines", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("case_id", Id, sa.ForeignKey("cases.id"), nullable=False),
    sa.Column("sequence", sa.Integer, nullable=False),
    sa.Column("code_system", sa.String(5), nullable=False),
    sa.Column("code", sa.String(5), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("service_start", sa.Date, nullable=False),
    sa.Column("service_end", sa.Date),
    sa.Column("review_action", sa.String(3)),
    sa.Column("auth_number", sa.String(80)),
    sa.Column("authorized_quantity", sa.Integer),
    sa.Column("valid_from", sa.Date),
    sa.Column("valid_to", sa.Date),
    sa.Column("denial_code", sa.String(10)),
    sa.Column("denial_text", sa.String(500)),
    sa.Column("administration_ref", sa.String(80)),
    sa.Column("decided_at", UTCDateTime),
    sa.UniqueConstraint("case_id", "sequence"),
)

payer_exchanges = sa.Table(
    "payer_exchanges", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.String(64)),
    sa.Column("order_id", Id),
    sa.Column("case_id", Id),
    sa.Column("payer_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("direction", sa.String(3), nullable=False),
    sa.Column("url", sa.String(2000)),
    sa.Column("http_status", sa.Integer),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("request_body", sa.Text),
    sa.Column("response_body", sa.Text),
    sa.Column("error", sa.String(500)),
    sa.Index("ix_exchanges_case", "case_id"),
)

outbox = sa.Table(
    "outbox", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("actor", sa.String(60), nullable=False),
    sa.Column("entity_id", Id, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("available_at", UTCDateTime, nullable=False),
    sa.Column("published_at", UTCDateTime),
    sa.Column("publish_count", sa.Integer, nullable=False, default=0),
    sa.Index("ix_outbox_pending", "published_at", "available_at"),
)

idempotency_keys = sa.Table(
    "idempotency_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("route", sa.String(200), nullable=False),
    sa.Column("key", sa.String(255), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("response_body", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("locked_until", UTCDateTime),
    sa.UniqueConstraint("org_id", "route", "key"),
)

outcomes = sa.Table(
    "outcomes", metadata,
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", Id, nullable=False, unique=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("order_id", Id, nullable=False),
    sa.Column("case_id", Id),
    sa.Column("sequence", sa.Integer, nullable=False),
    sa.Column("code", sa.String(5), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("auth_number", sa.String(80)),
    sa.Column("authorized_quantity", sa.Integer),
    sa.Column("valid_from", sa.Date),
    sa.Column("valid_to", sa.Date),
    sa.Column("denial_code", sa.String(10)),
    sa.Column("denial_text", sa.String(500)),
    sa.Column("payer_id", sa.String(64), nullable=False),
    sa.Column("decided_at", UTCDateTime, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.UniqueConstraint("order_id", "sequence", "version"),
    sa.Index("ix_outcomes_org_position", "org_id", "position"),
)

timeline_events = sa.Table(
    "timeline_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("order_id", Id, nullable=False),
    sa.Column("case_id", Id),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("event", sa.String(60), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("detail", JSONType),
    sa.Index("ix_timeline_order", "order_id", "id"),
)

audit_events = sa.Table(
    "audit_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("org_id", sa.String(64)),
    sa.Column("token_id", Id),
    sa.Column("role", sa.String(20)),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("entity_type", sa.String(30), nullable=False),
    sa.Column("entity_id", sa.String(64)),
    sa.Column("patient_id", Id),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("request_id", sa.String(64)),
    sa.Column("source_ip", sa.String(64)),
    sa.Column("reason", sa.String(100)),
    sa.Column("prev_hash", sa.String(64)),
    sa.Column("hash", sa.String(64)),
)

callback_events = sa.Table(
    "callback_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payer_id", sa.String(64), nullable=False),
    sa.Column("webhook_id", sa.String(200), nullable=False),
    sa.Column("case_id", Id),
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("duplicate_count", sa.Integer, nullable=False, default=0),
    sa.Column("result", sa.String(40)),
    sa.UniqueConstraint("payer_id", "webhook_id"),
)

payer_subscriptions = sa.Table(
    "payer_subscriptions", metadata,
    sa.Column("payer_id", sa.String(64), primary_key=True),
    sa.Column("subscription_id", sa.String(200), nullable=False),
    sa.Column("callback_url", sa.String(2000), nullable=False),
    sa.Column("registered_at", UTCDateTime, nullable=False),
)

ruleset_versions = sa.Table(
    "ruleset_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payer_id", sa.String(64), nullable=False),
    sa.Column("version", sa.String(100), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, default=False),
    sa.Column("loaded_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("payer_id", "version"),
)

# ------------------------------------------------------------------ schema 0002: case work,
# webhooks, notifications, CDS Hooks, audit chain (issues 5–10 build on these tables)

case_notes = sa.Table(
    "case_notes", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("case_id", Id, sa.ForeignKey("cases.id"), nullable=False),
    sa.Column("author", sa.String(200), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_case_notes_case", "case_id", "created_at"),
)

attachments = sa.Table(
    "attachments", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("case_id", Id, sa.ForeignKey("cases.id"), nullable=False),
    sa.Column("info_request_id", Id),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("content_type", sa.String(100), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("loinc", sa.String(20)),
    sa.Column("data", sa.LargeBinary),  # null when stored in a folder (storage_path)
    sa.Column("storage_path", sa.String(500)),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime),
    sa.Index("ix_attachments_case", "case_id"),
    sa.Index("ix_attachments_org_sha256", "org_id", "sha256"),  # is a stored file referenced?
)

info_requests = sa.Table(
    "info_requests", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("case_id", Id, sa.ForeignKey("cases.id"), nullable=False),
    sa.Column("codes", JSONType, nullable=False),
    sa.Column("text", sa.String(1000)),
    sa.Column("requested_at", UTCDateTime, nullable=False),
    sa.Column("answered_at", UTCDateTime),
    sa.Index("ix_info_requests_case", "case_id"),
)

webhook_subscriptions = sa.Table(
    "webhook_subscriptions", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("url", sa.String(2000), nullable=False),
    sa.Column("events", JSONType, nullable=False),
    sa.Column("secret", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("deleted_at", UTCDateTime),
    sa.Column("disabled_at", UTCDateTime),
    sa.Column("disabled_reason", sa.String(300)),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, default=0),
    sa.Index("ix_webhook_subscriptions_org", "org_id"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("subscription_id", Id, sa.ForeignKey("webhook_subscriptions.id"), nullable=False),
    sa.Column("event_type", sa.String(60), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),  # the webhook-id, stable across retries
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # pending|delivered|failed
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", UTCDateTime),
    sa.Column("claimed_until", UTCDateTime),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.String(300)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("delivered_at", UTCDateTime),
    sa.UniqueConstraint("subscription_id", "event_id"),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)

notifications = sa.Table(
    "notifications", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("order_id", Id, nullable=False),
    sa.Column("case_id", Id),
    sa.Column("event", sa.String(60), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("recipient", sa.String(100), nullable=False),  # a role key, e.g. contact:0, provider
    sa.Column("audience", sa.String(20), nullable=False),
    sa.Column("channel", sa.String(20), nullable=False),
    sa.Column("language", sa.String(5), nullable=False),
    sa.Column("template", sa.String(100), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # queued|sent|failed|suppressed
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", UTCDateTime),
    sa.Column("claimed_until", UTCDateTime),
    sa.Column("provider_message_id", sa.String(200)),
    sa.Column("last_error", sa.String(300)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime),
    # where it goes, copied from the contact when planned (0005; NULL on older rows)
    sa.Column("address", sa.String(2000)),
    sa.UniqueConstraint("order_id", "event", "version", "recipient", "channel"),
    sa.Index("ix_notifications_due", "status", "next_attempt_at"),
)

notification_optouts = sa.Table(  # STOP replies and unsubscribe links (0005)
    "notification_optouts", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),  # "*": every organization (SMS STOP)
    sa.Column("channel", sa.String(20), nullable=False),  # sms | email
    sa.Column("address_hash", sa.String(64), nullable=False),  # keyed HMAC, never the address
    sa.Column("reason", sa.String(40), nullable=False),  # e.g. sms_stop, email_unsubscribe
    sa.Column("notification_id", Id),  # the message whose link was used, when known
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("org_id", "channel", "address_hash"),
)

cds_clients = sa.Table(
    "cds_clients", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("iss", sa.String(500), nullable=False, unique=True),
    sa.Column("jwks", JSONType),
    sa.Column("jwks_url", sa.String(2000)),
    sa.Column("fhir_servers", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

cds_jtis = sa.Table(
    "cds_jtis", metadata,
    sa.Column("iss", sa.String(500), primary_key=True),
    sa.Column("jti", sa.String(200), primary_key=True),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)

coverage_assertions = sa.Table(
    "coverage_assertions", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("payer_id", sa.String(64), nullable=False),
    sa.Column("code_system", sa.String(5), nullable=False),
    sa.Column("code", sa.String(5), nullable=False),
    sa.Column("ruleset_version", sa.String(100), nullable=False),
    sa.Column("determination", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

rate_limit_events = sa.Table(  # denied-by-rate-limit bookkeeping for alerts (issue 8)
    "rate_limit_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.String(64)),
    sa.Column("token_id", Id),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("route", sa.String(200), nullable=False),
)
