"""attachments: an index on (org_id, sha256) for "is this stored file referenced?"

The attachment cleanup and the hourly sweep decide whether a content-addressed file may be
deleted by looking for an attachment row of its organization with its SHA-256 (never by the
path string, which differs through a symlink or another mount). Without this index each
check scanned the organization's attachments.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_attachments_org_sha256", "attachments", ["org_id", "sha256"])


def downgrade() -> None:
    op.drop_index("ix_attachments_org_sha256", table_name="attachments")
