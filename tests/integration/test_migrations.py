"""Migrations build exactly the schema the code declares, with the uniqueness that makes
every effect happen once (reliability.md I1–I7)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from authsvc.adapters.db.tables import metadata

pytestmark = pytest.mark.integration


def test_migrated_schema_matches_the_tables_module(services):
    with services.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


@pytest.mark.parametrize(("table", "columns"), [
    ("idempotency_keys", {"org_id", "route", "key"}),
    ("outcomes", {"order_id", "sequence", "version"}),
    ("notifications", {"order_id", "event", "version", "recipient", "channel"}),
    ("callback_events", {"payer_id", "webhook_id"}),
    ("webhook_deliveries", {"subscription_id", "event_id"}),
    ("case_lines", {"case_id", "sequence"}),
])
def test_effects_are_unique_in_the_database(services, table, columns):
    uniques = sa.inspect(services.engine).get_unique_constraints(table)
    assert any(set(u["column_names"]) == columns for u in uniques)


def test_the_stored_file_reference_check_has_an_index(services):
    """The attachment sweep asks "does a row of this organization hold this SHA-256?" once
    per stored file: an index answers it, not a scan of the organization's attachments."""
    indexes = sa.inspect(services.engine).get_indexes("attachments")
    assert any(i["column_names"] == ["org_id", "sha256"] for i in indexes)
