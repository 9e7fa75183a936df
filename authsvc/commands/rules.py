"""`authsvc rules …`: check payer policy files before they go live, and put them live.

* ``validate [DIR]``: JSON Schema + semantic checks, and (when the database is reachable)
  the version/digest record: each error as ``file:line: message``, exit 1 on any.
* ``test [DIR]``: the golden cases of ``DIR/tests/*.yaml`` against the policies of ``DIR``.
* ``reload``: validate and record the files of ``AUTHSVC_RULES_DIR`` as the active versions;
  every process follows within 2 s. ``SIGHUP`` to ``authsvc serve``, ``worker`` or
  ``scheduler`` does the same (:func:`install_sighup`, :func:`run_gunicorn`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from authsvc.config import Settings

log = logging.getLogger(__name__)


def _directory(args: argparse.Namespace) -> Path:
    return Path(args.dir) if getattr(args, "dir", None) else Settings.from_env().rules_dir


# ------------------------------------------------------------------ validate


def _database_errors(directory: Path, ruleset: Any) -> list[str] | None:
    """Digest conflicts with the database record; None when no database is reachable."""
    import sqlalchemy as sa

    from authsvc.adapters import ruleset_store
    from authsvc.adapters.db.engine import make_engine

    url = Settings.from_env().database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None  # a fresh clone: no database yet, nothing was ever loaded
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            found = ruleset_store.conflicts(conn, ruleset)
    except sa.exc.SQLAlchemyError:
        return None
    finally:
        engine.dispose()
    out = []
    for c in found:
        idx = ruleset.payers[c.payer_id]
        first = min(idx.files)
        out.append(f"{directory / first}:1: {c.message()}")
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    """Every problem of every file at once, so an author fixes them in one pass."""
    from authsvc.adapters.policies import PolicyError, load_ruleset

    directory = _directory(args)
    try:
        ruleset = load_ruleset(directory)
    except PolicyError as exc:
        for message in exc.errors:
            print(message)
        print(f"{len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    db_errors = None if args.no_db else _database_errors(directory, ruleset)
    for message in db_errors or ():
        print(message)
    if db_errors:
        return 1
    summary = ", ".join(
        f"{v['version']} ({v['policies']} policies, {v['gold_cards']} gold cards)"
        for v in ruleset.versions().values())
    note = "" if db_errors is not None else " (versions not checked against the database)"
    print(f"{directory}: ok: {summary}{note}")
    return 0


# ------------------------------------------------------------------ golden tests

LINE_DEFAULTS = {"quantity": 1, "service_start": "2026-12-01"}
ORDER_DEFAULTS: dict[str, Any] = {
    "requester_npi": "1003000126", "place_of_service": "22", "diagnoses": [],
    "patient": {"birth_date": "1984-03-02", "sex": "female"},
}


class GoldenError(ValueError):
    """A golden-case file is malformed."""


def _order_facts(case: dict[str, Any], payer_default: str | None) -> Any:
    from authsvc.domain.orders import LineFacts, OrderFacts

    fragment = {**ORDER_DEFAULTS, **case.get("order", {})}
    patient = {**ORDER_DEFAULTS["patient"], **fragment.get("patient", {})}
    lines = []
    for i, raw in enumerate(fragment.get("lines") or [], start=1):
        line = {**LINE_DEFAULTS, **raw}
        code = str(line["code"])
        system = line.get("code_system") or ("HCPCS" if code[:1].isalpha() else "CPT")
        lines.append(LineFacts(
            sequence=line.get("sequence", i), code_system=system, code=code,
            quantity=int(line["quantity"]),
            service_start=dt.date.fromisoformat(str(line["service_start"]))))
    if not lines:
        raise GoldenError("order.lines is empty")
    payer = fragment.get("payer_id") or payer_default
    if not payer:
        raise GoldenError("no payer_id (in the case's order or at the top of the file)")
    birth = patient.get("birth_date")
    return OrderFacts(
        payer_id=payer, lines=tuple(lines),
        diagnoses=tuple(fragment.get("diagnoses") or ()),
        place_of_service=fragment.get("place_of_service"),
        requester_npi=fragment.get("requester_npi"),
        patient_birth_date=dt.date.fromisoformat(str(birth)) if birth else None,
        patient_sex=patient.get("sex"),
    )


def _compare(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Only the keys a case states are compared; ``reasons`` by their codes."""
    diffs = []
    for key, want in expected.items():
        have = got.get(key, "<missing key>")
        if key == "reasons":
            have = [r["code"] for r in got["reasons"]]
        if have != want:
            diffs.append(f"{key}: expected {want!r}, got {have!r}")
    return diffs


def run_golden(directory: Path, engine: Any,
               progress: Any = None) -> tuple[int, list[str]]:
    """Run every case of ``directory/tests/*.yaml``; returns (cases run, failure messages)."""
    import yaml

    from authsvc.adapters.rules_engine import UnknownPayer

    files = sorted((directory / "tests").glob("*.yaml"))
    cases: list[tuple[str, str | None, dict[str, Any]]] = []
    failures: list[str] = []
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text("utf-8")) or {}
        except yaml.YAMLError as exc:
            failures.append(f"{path}: invalid YAML: {exc}")
            continue
        for case in doc.get("cases") or []:
            cases.append((str(path), doc.get("payer_id"), case))
    for n, (path, payer, case) in enumerate(cases, start=1):
        name = case.get("name", f"case {n}")
        try:
            facts = _order_facts(case, payer)
            got = [d.to_dict() for d in engine.determine(facts)]
            expected = case.get("expect") or []
            if len(expected) != len(got):
                raise GoldenError(f"{len(expected)} expected lines for {len(got)} order lines")
            for i, (want, have) in enumerate(zip(expected, got, strict=True), start=1):
                for diff in _compare(want, have):
                    failures.append(f"{path}: {name}: line {i}: {diff}")
        except (GoldenError, KeyError, TypeError, ValueError, UnknownPayer) as exc:
            failures.append(f"{path}: {name}: bad case: {type(exc).__name__}: {exc}")
        if progress is not None:
            progress(n, len(cases))
    return len(cases), failures


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done == total else ""
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
    sys.stderr.flush()


def cmd_test(args: argparse.Namespace) -> int:
    """Golden cases: an order fragment and the expected determination of each line."""
    from authsvc.adapters.policies import PolicyError
    from authsvc.adapters.rules_engine import RulesEngine

    directory = _directory(args)
    try:
        engine = RulesEngine.from_directory(directory)
    except PolicyError as exc:
        for message in exc.errors:
            print(message)
        return 1
    started = time.perf_counter()
    bar = None if args.quiet or not sys.stderr.isatty() else _progress_bar
    count, failures = run_golden(directory, engine, bar)
    for failure in failures:
        print(f"FAIL {failure}")
    failed_cases = len({f.rsplit(": line ", 1)[0] for f in failures})
    print(f"{count} cases, {count - failed_cases} passed, {failed_cases} failed "
          f"in {time.perf_counter() - started:.2f}s")
    if count == 0:
        print(f"no golden cases in {directory / 'tests'}/*.yaml")
        return 1
    return 1 if failures else 0


# ------------------------------------------------------------------ reload and SIGHUP


def _reload(settings: Settings, holder: Any = None, source: str = "cli") -> int:
    from authsvc.adapters.db.engine import make_engine
    from authsvc.service_layer import rules_admin

    engine = make_engine(settings.database_url)
    try:
        result = rules_admin.reload(engine, settings.rules_dir, holder, source=source)
    except rules_admin.ReloadRefused as exc:
        for message in exc.errors:
            print(message)
        print("refused: the last good version stays active", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"{result.to_dict()['status']}: active "
          + ", ".join(result.active.values()))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Record the files as the active versions; running processes follow within 2 s."""
    return _reload(Settings.from_env())


def install_sighup(services: Any) -> None:
    """SIGHUP → reload in a thread (not in the handler: it takes locks and the database)."""
    from authsvc.service_layer import rules_admin

    def work() -> None:
        try:
            rules_admin.reload(services.engine, services.settings.rules_dir, services.rules,
                               source="sighup")
        except rules_admin.ReloadRefused:
            pass  # logged, counted and kept in services.rules.last_error
        except Exception:
            log.exception("rules reload on SIGHUP failed")

    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=work, daemon=True).start())


def run_gunicorn(app: Any) -> None:
    """Run a gunicorn app whose master answers SIGHUP with a rules reload.

    Gunicorn's own SIGHUP restarts every worker; a worker started on refused files could
    not keep the last good version, so the master records the new version instead and the
    running workers follow the database record.
    """
    from gunicorn.arbiter import Arbiter

    settings = Settings.from_env()

    class RulesArbiter(Arbiter):
        def handle_hup(self) -> None:
            self.log.info("SIGHUP: reloading payer rules (workers keep running)")
            try:
                _reload(settings, source="sighup")
            except Exception:
                self.log.exception("rules reload on SIGHUP failed")

    try:
        RulesArbiter(app).run()
    except RuntimeError as exc:
        print(f"\nError: {exc}\n", file=sys.stderr)
        sys.exit(1)


def register(sub: argparse._SubParsersAction) -> None:
    rules = sub.add_parser("rules", help="payer policy files").add_subparsers(
        dest="rules_cmd", required=True)
    s = rules.add_parser("validate", help="check policy files; file:line: message per error")
    s.add_argument("dir", nargs="?")
    s.add_argument("--no-db", action="store_true",
                   help="skip the check against the versions recorded in the database")
    s.set_defaults(func=cmd_validate)
    s = rules.add_parser("test", help="run the golden cases of DIR/tests/*.yaml")
    s.add_argument("dir", nargs="?")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_test)
    s = rules.add_parser("reload", help="validate AUTHSVC_RULES_DIR and make it active "
                         "(every process follows within 2 s)")
    s.set_defaults(func=cmd_reload)
