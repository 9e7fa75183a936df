"""audit trail: chain old rows, app role without UPDATE/DELETE on audit_events

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 21:50:00

PostgreSQL: creates the NOLOGIN role `authsvc_app` (production logs in as a member of it,
see docs/operations.md) with read/write on every table except audit_events, where it may
only INSERT and SELECT; default privileges give it the same on tables later migrations
create. SQLite has no roles: triggers refuse UPDATE and DELETE on audit_events instead.
"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

APP_ROLE = "authsvc_app"  # spelled out in each statement below (no SQL built from strings)


def upgrade() -> None:
    from authsvc.adapters.db import audit

    conn = op.get_bind()
    audit.backfill(conn)
    if conn.dialect.name == "postgresql":
        op.execute("""
            DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authsvc_app') THEN
                CREATE ROLE authsvc_app NOLOGIN;
              END IF;
            END $$""")
        op.execute("GRANT USAGE ON SCHEMA public TO authsvc_app")
        op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO authsvc_app")
        op.execute("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO authsvc_app")
        op.execute("REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM authsvc_app")
        op.execute("REVOKE UPDATE, DELETE, TRUNCATE, INSERT ON alembic_version FROM authsvc_app")
        op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO authsvc_app")
        op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO authsvc_app")
    else:
        op.execute("""CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
                      BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END""")
        op.execute("""CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
                      BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END""")


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM authsvc_app")
        op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM authsvc_app")
        op.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM authsvc_app")
        op.execute("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM authsvc_app")
        op.execute("REVOKE USAGE ON SCHEMA public FROM authsvc_app")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
