"""`authsvc`: the one entry point (serve, worker, scheduler, payer-sim, db, tokens, rules)."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from authsvc.config import Settings


def _settings() -> Settings:
    return Settings.from_env()


def _background_settings() -> Settings:
    """Settings for the worker and the scheduler: in production they refuse to start with a
    development secret, as the API does (an opt-out hashed under another key than the API's
    would be silently ignored at send time)."""
    settings = _settings()
    problems = settings.secret_problems() if settings.production else []
    if problems:
        raise SystemExit("refusing to start in production: " + "; ".join(problems))
    return settings


def _logging() -> None:
    from authsvc.logs import configure

    configure()


# ------------------------------------------------------------------ processes


def cmd_serve(args: argparse.Namespace) -> int:
    """The API under gunicorn with sync workers (each worker builds its own app)."""
    from gunicorn.app.base import BaseApplication

    settings = _settings()
    port = args.port or settings.port
    workers = args.workers or settings.web_workers
    prom_dir = settings.var_dir / f"prometheus-{port}"
    prom_dir.mkdir(parents=True, exist_ok=True)
    for stale in prom_dir.glob("*.db"):
        stale.unlink()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(prom_dir))

    class App(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "sync")
            self.cfg.set("timeout", 60)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("keepalive", 5)
            self.cfg.set("accesslog", None)
            # request lines up to 8 KiB (gunicorn's 4 KiB default answered a long but valid
            # signed unsubscribe link with its own HTML 414 page)
            self.cfg.set("limit_request_line", 8190)

        def load(self):  # type: ignore[no-untyped-def]
            from authsvc.api import create_app

            _logging()
            return create_app(settings)

    from authsvc.commands.rules import run_gunicorn

    run_gunicorn(App())  # gunicorn, except that SIGHUP reloads the payer rules
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Dramatiq worker threads in this process, consuming the default queue."""
    from dramatiq import Worker

    import workers

    _logging()
    settings = _background_settings()
    threads = args.threads or settings.worker_threads
    broker = workers.setup(settings.replace(worker_threads=threads))
    worker = Worker(broker, worker_threads=threads, worker_timeout=1000)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.start()
    from authsvc.commands.rules import install_sighup

    install_sighup(workers.services())  # SIGHUP reloads the payer rules
    logging.getLogger("authsvc.worker").info("worker started with %d threads", threads)
    stop.wait()
    worker.stop(timeout=10_000)
    broker.close()
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from authsvc.adapters.broker import make_broker
    from authsvc.bootstrap import bootstrap
    from workers.scheduler import Scheduler

    _logging()
    settings = _background_settings()
    scheduler = Scheduler(bootstrap(settings), make_broker(settings))
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    signal.signal(signal.SIGINT, lambda *_: scheduler.stop())
    from authsvc.commands.rules import install_sighup

    install_sighup(scheduler.services)  # SIGHUP reloads the payer rules
    scheduler.run()
    return 0


def cmd_payer_sim(args: argparse.Namespace) -> int:
    from authsvc.payer_sim.app import run_sim

    _logging()
    port = args.port or int(os.environ.get("AUTHSVC_SIM_PORT", "8090"))
    run_sim(args.host, port)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from authsvc.adapters.db.engine import upgrade

    upgrade(_settings().database_url)
    print("database is at the newest schema")
    return 0


# ------------------------------------------------------------------ tokens


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from authsvc.adapters.db.engine import make_engine
    from authsvc.api.auth import ROLES, create_token

    if args.role not in ROLES:
        print(f"--role must be one of: {', '.join(ROLES)}", file=sys.stderr)
        return 2
    expires = dt.date.fromisoformat(args.expires) if args.expires else None
    engine = make_engine(_settings().database_url)
    with engine.begin() as conn:
        token_id, token = create_token(conn, args.org, args.role, args.name, expires)
    engine.dispose()
    print(f"token {token_id} for {args.org} ({args.role}); it is shown once:")
    print(token)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from authsvc.adapters.db import tables as t
    from authsvc.adapters.db.engine import make_engine

    engine = make_engine(_settings().database_url)
    q = sa.select(t.api_tokens).order_by(t.api_tokens.c.created_at)
    if args.org:
        q = q.where(t.api_tokens.c.org_id == args.org)
    with engine.connect() as conn:
        for row in conn.execute(q).mappings():
            state = "revoked" if row["revoked_at"] else "active"
            print(f"{row['id']}\t{row['org_id']}\t{row['role']}\t{row['name'] or ''}\t"
                  f"{row['prefix']}…\t{state}\texpires={row['expires_on'] or '-'}\t"
                  f"last_used={row['last_used_at'] or '-'}")
    engine.dispose()
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from authsvc.adapters.db import tables as t
    from authsvc.adapters.db.engine import make_engine
    from authsvc.domain import clock

    engine = make_engine(_settings().database_url)
    with engine.begin() as conn:
        res = conn.execute(t.api_tokens.update().where(t.api_tokens.c.id == args.token_id)
                           .values(revoked_at=clock.now()))
    engine.dispose()
    if res.rowcount != 1:
        print("no such token", file=sys.stderr)
        return 1
    print(f"revoked {args.token_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="authsvc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the API (gunicorn, sync workers)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("worker", help="run Dramatiq actors")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("scheduler", help="outbox relay, sweeper, polls, deadlines")
    s.set_defaults(func=cmd_scheduler)

    s = sub.add_parser("payer-sim", help="the demo payer (Da Vinci PAS simulator)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_payer_sim)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    tokens = sub.add_parser("tokens", help="API tokens").add_subparsers(dest="tok_cmd",
                                                                         required=True)
    s = tokens.add_parser("create", help="create a token (printed once)")
    s.add_argument("--org", required=True)
    s.add_argument("--role", required=True)
    s.add_argument("--name")
    s.add_argument("--expires", help="YYYY-MM-DD: the token stops working after this day")
    s.set_defaults(func=cmd_tokens_create)
    s = tokens.add_parser("list", help="list tokens (never the token itself)")
    s.add_argument("--org")
    s.set_defaults(func=cmd_tokens_list)
    s = tokens.add_parser("revoke", help="revoke a token by id")
    s.add_argument("token_id")
    s.set_defaults(func=cmd_tokens_revoke)

    from authsvc.commands import register_all

    register_all(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
