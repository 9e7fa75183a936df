"""Worklist indexes: the default page and the assignee filter stop after one page.

Measured on 1,000,000 cases (bench/worklist.py): the default page read ~18,000 rows of an
organization through ix_cases_worklist and sorted them (p95 192 ms); with (org_id,
decision_due_at, id) it is an index scan that stops at the page size (p95 31 ms).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_cases_org_due", "cases", ["org_id", "decision_due_at", "id"])
    op.create_index("ix_cases_org_assignee_due", "cases",
                    ["org_id", "assignee", "decision_due_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_cases_org_assignee_due", table_name="cases")
    op.drop_index("ix_cases_org_due", table_name="cases")
