"""Build every engine, client and adapter from settings: nothing is created at import time."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import sqlalchemy as sa

from authsvc.adapters.db.engine import make_engine
from authsvc.adapters.payers.registry import PayerConfig, build_adapter, load_payers
from authsvc.adapters.rules_engine import RulesEngine
from authsvc.config import Settings
from authsvc.domain.breaker import CircuitBreaker
from authsvc.domain.payer import ExchangeRecord, PayerAdapter


class RulesHolder:
    """The rules engine in force; a reload swaps the whole immutable engine atomically."""

    def __init__(self, engine: RulesEngine, error: str | None = None):
        self._engine = engine
        self._lock = threading.Lock()
        self.last_error = error

    def current(self) -> RulesEngine:
        return self._engine

    def swap(self, engine: RulesEngine) -> None:
        with self._lock:
            self._engine = engine
            self.last_error = None


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
        self.engine.dispose()


def bootstrap(settings: Settings, *, pool_size: int = 5) -> Services:
    """Create the database engine, load payers and rules. Migrations run elsewhere."""
    return Services(
        settings=settings,
        engine=make_engine(settings.database_url, pool_size=pool_size),
        rules=RulesHolder(RulesEngine.from_directory(settings.rules_dir)),
        payers=load_payers(settings.payers_file),
    )
