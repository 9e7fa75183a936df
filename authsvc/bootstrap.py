"""Build every engine, client and adapter from settings: nothing is created at import time."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from authsvc.adapters import ruleset_store
from authsvc.adapters.db.engine import make_engine
from authsvc.adapters.payers.registry import PayerConfig, build_adapter, load_payers
from authsvc.adapters.policies import PolicyError, RuleSet, load_ruleset
from authsvc.adapters.rules_engine import RulesEngine
from authsvc.config import Settings
from authsvc.domain.breaker import CircuitBreaker
from authsvc.domain.payer import ExchangeRecord, PayerAdapter

log = logging.getLogger(__name__)


class RulesHolder:
    """The rules engine in force in this process; swapped whole, atomically, on a new version.

    The database says which version of each payer's policies is active (a reload writes it);
    a follower thread (:meth:`follow`) reads that record every ``check_seconds``, traffic or
    not, so :meth:`current` stays a plain attribute read; when the record moved it
    builds a new engine from the rules directory, but only from files whose digest matches
    the active version. Anything else (files invalid, or holding another version) keeps the
    last good engine and says why in :attr:`last_error` (shown by ``/readyz``). In-flight
    evaluations finish on the engine they started with: engines are immutable.
    """

    def __init__(self, engine: RulesEngine, error: str | None = None, *,
                 directory: str | os.PathLike[str] | None = None,
                 database: sa.Engine | None = None, check_seconds: float = 2.0):
        self._engine = engine
        self._lock = threading.Lock()
        self.last_error = error
        self._directory = Path(directory) if directory is not None else None
        self._db = database
        self._every = check_seconds
        self._next_check = 0.0
        self._files: tuple[tuple, RuleSet | PolicyError] | None = None
        self._logged: str | None = None
        self._stop: threading.Event | None = None
        self._last_active: dict[str, tuple[str, str]] = {}

    def current(self) -> RulesEngine:
        """The engine to use now; cheap: a clock read, and a DB query at most every 2 s.

        The follower thread normally does the checking; this covers a process without it.
        """
        if self._db is not None and self._stop is None and time.monotonic() >= self._next_check:
            self.check()
        return self._engine

    def follow(self) -> None:
        """Check the record every ``check_seconds`` in a daemon thread, traffic or not."""
        if self._db is None or self._stop is not None:
            return
        self._stop = threading.Event()
        stop = self._stop

        def run() -> None:
            while not stop.wait(self._every):
                try:
                    self.check()
                except Exception:  # never let the follower die silently
                    log.exception("rules: checking the active versions failed")

        threading.Thread(target=run, name="rules-follower", daemon=True).start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    @property
    def directory(self) -> Path | None:
        return self._directory

    def swap(self, engine: RulesEngine) -> None:
        """Use ``engine`` from now on (a reload in this process); clears any refusal."""
        with self._lock:
            self._engine = engine
            self._next_check = time.monotonic() + self._every
            self._set_problem(None)

    def refused(self, reason: str) -> None:
        """A reload was refused: keep the engine, say why until the next good version."""
        with self._lock:
            self._set_problem(reason)

    # ------------------------------------------------------------------ following the record

    def check(self, *, wait: bool = False) -> None:
        """Follow the database's active versions now (one thread at a time; others go on)."""
        if self._db is None or not self._lock.acquire(blocking=wait):
            return
        try:
            self._next_check = time.monotonic() + self._every
            try:
                with self._db.connect() as conn:
                    active = ruleset_store.active_versions(conn)
            except sa.exc.SQLAlchemyError as exc:
                if self._logged != "db":
                    log.warning("rules: cannot read the active ruleset versions (%s); keeping "
                                "the loaded ones", type(exc).__name__)
                    self._logged = "db"
                return
            self._follow(active)
        finally:
            self._lock.release()

    def _follow(self, active: dict[str, tuple[str, str]]) -> None:
        loaded = {p: (i.version, i.digest) for p, i in self._engine.ruleset.payers.items()}
        if not active or active == loaded:
            self._set_problem(self._files_problem(active))
            return
        files = self.read_files(fresh=active != self._last_active)  # once per new record
        self._last_active = dict(active)
        if isinstance(files, PolicyError):
            self._set_problem(f"keeping {_names(loaded)}: the rule files are invalid: "
                              + "; ".join(files.errors[:3]))
            return
        have = {p: (i.version, i.digest) for p, i in files.payers.items()}
        missing = [f"{p}@{v}" for p, (v, d) in sorted(active.items()) if have.get(p) != (v, d)]
        if missing:
            self._set_problem(
                f"keeping {_names(loaded)}: the database marks {', '.join(missing)} active but "
                f"{self._directory} holds {_names(have)} (other files or digests)")
            return
        ruleset = dataclasses.replace(
            files, payers={p: i for p, i in files.payers.items() if p in active})
        self._engine = RulesEngine(ruleset)
        self._set_problem(None)
        log.info("rules: now using %s", _names(active))

    def read_files(self, *, fresh: bool = False) -> RuleSet | PolicyError:
        """The rules directory compiled, re-read only when a file's size or mtime changed."""
        assert self._directory is not None
        signature = _stat_signature(self._directory)
        if fresh or self._files is None or self._files[0] != signature:
            try:
                result: RuleSet | PolicyError = load_ruleset(self._directory)
            except PolicyError as exc:
                result = exc
            self._files = (signature, result)
        return self._files[1]

    def _files_problem(self, active: dict[str, tuple[str, str]]) -> str | None:
        """Why files on disk would be refused by a reload (shown while the record is in sync)."""
        if self._directory is None or not active:
            return None
        files = self.read_files()
        if isinstance(files, PolicyError):
            return ("keeping the active version: the rule files would be refused: "
                    + "; ".join(files.errors[:3]))
        for p, idx in files.payers.items():
            version, digest = active.get(p, (None, None))
            if version == idx.version and digest != idx.digest:
                return (f"keeping {p}@{version}: {', '.join(sorted(idx.files))} changed but "
                        "`version:` did not; a reload refuses it")
        return None

    def _set_problem(self, problem: str | None) -> None:
        self.last_error = problem
        ruleset_store.REFUSED.set(1 if problem else 0)
        if problem != self._logged:
            if problem:
                log.warning("rules: %s", problem)
            self._logged = problem


def _names(versions: dict[str, tuple[str, str]]) -> str:
    return ", ".join(f"{p}@{v}" for p, (v, _) in sorted(versions.items())) or "nothing"


def _stat_signature(directory: Path) -> tuple:
    try:
        return tuple(sorted((p.name, s.st_mtime_ns, s.st_size)
                            for p in directory.glob("*.yaml") if (s := p.stat())))
    except OSError:
        return ()


@dataclasses.dataclass
class Services:
    settings: Settings
    engine: sa.Engine
    rules: RulesHolder
    payers: dict[str, PayerConfig]
    adapter_factory: Callable[[PayerConfig, Callable[[ExchangeRecord], None]], PayerAdapter] = (
        build_adapter
    )
    breakers: dict[str, CircuitBreaker] = dataclasses.field(default_factory=dict)

    def breaker(self, payer_id: str) -> CircuitBreaker:
        """This process's circuit breaker for a payer (created on first use)."""
        if payer_id not in self.breakers:
            self.breakers.setdefault(payer_id, CircuitBreaker())
        return self.breakers[payer_id]

    def adapter(self, payer_id: str, recorder: Callable[[ExchangeRecord], None]) -> PayerAdapter:
        return self.adapter_factory(self.payers[payer_id], recorder)

    def close(self) -> None:
        self.rules.stop()
        self.engine.dispose()


def bootstrap(settings: Settings, *, pool_size: int = 5) -> Services:
    """Create the database engine, load payers and rules. Migrations run elsewhere."""
    engine = make_engine(settings.database_url, pool_size=pool_size)
    ruleset = load_ruleset(settings.rules_dir)
    register_unmanaged(engine, ruleset)
    rules = RulesHolder(RulesEngine(ruleset), directory=settings.rules_dir, database=engine)
    rules.check(wait=True)
    rules.follow()
    return Services(
        settings=settings,
        engine=engine,
        rules=rules,
        payers=load_payers(settings.payers_file),
    )


def register_unmanaged(engine: sa.Engine, ruleset: RuleSet) -> None:
    """First start of a payer: record its files' version as active when none is yet.

    Payers that already have an active version are left alone: only a reload changes it, so
    a process restarted on other files never flips the version the others use.
    """
    from authsvc.domain import clock

    try:
        with engine.begin() as conn:
            ruleset_store.lock(conn)
            refused = {c.payer_id for c in ruleset_store.conflicts(conn, ruleset)}
            fresh = dataclasses.replace(
                ruleset, payers={p: i for p, i in ruleset.payers.items() if p not in refused})
            changed = ruleset_store.record(conn, fresh, clock.now(), only_unmanaged=True)
    except sa.exc.SQLAlchemyError as exc:
        log.warning("rules: could not record the ruleset versions (%s)", type(exc).__name__)
        return
    if changed:
        log.info("rules: recorded %s as active (first load)", ", ".join(changed))
