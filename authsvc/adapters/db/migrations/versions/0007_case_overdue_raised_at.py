"""cases.overdue_raised_at: a decision deadline's overdue alert is raised once

The scheduler raised needs_attention `overdue` on every open case past its deadline whose
attention reason was not already `overdue`: a coordinator who resolved it saw it back two
seconds later (with another provider email and webhook), and a more specific reason
(`info_requested`, `rejected`, ...) was overwritten. The time of the last alert is kept per
case; the alert is due again only when the deadline moves past it (a new payer received
time). Backfilled from the timeline's `decision_overdue` events.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

import authsvc.adapters.db.tables

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("overdue_raised_at",
                                   authsvc.adapters.db.tables.UTCDateTime(timezone=True),
                                   nullable=True))
    # one pass over the timeline's overdue events (no per-case subquery: no case_id index)
    op.execute(
        "UPDATE cases SET overdue_raised_at = d.at FROM (SELECT case_id, max(at) AS at "
        "FROM timeline_events WHERE event = 'decision_overdue' GROUP BY case_id) AS d "
        "WHERE d.case_id = cases.id")


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("overdue_raised_at")
