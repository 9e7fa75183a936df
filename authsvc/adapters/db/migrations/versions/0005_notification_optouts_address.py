"""notifications: opt-outs (SMS STOP, email unsubscribe) and the address fixed at planning

`notification_optouts` holds one row per (organization, channel, keyed hash of the address)
that asked to hear nothing more: the address itself is never stored there. An SMS STOP
reaches the one sending number every organization shares, so it is stored for organization
"*" (all). `notifications.address` is the address a notification goes to, copied from the
patient's contact (or the organization's provider contact) when the notification is planned,
so a later edit of the contacts does not redirect a message already planned. Rows planned
before this revision keep NULL and are still resolved from the contact at send time.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

import authsvc.adapters.db.tables

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification_optouts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=20), nullable=False),
        sa.Column("address_hash", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("notification_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", authsvc.adapters.db.tables.UTCDateTime(timezone=True),
                  nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_optouts")),
        sa.UniqueConstraint("org_id", "channel", "address_hash",
                            name=op.f("uq_notification_optouts_org_id_channel_address_hash")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("address", sa.String(length=2000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_column("address")
    op.drop_table("notification_optouts")
