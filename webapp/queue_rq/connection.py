"""The job queue's Redis connection (REDIS_URL), and what its failures mean to a client.

Web hosts and GPU workers share nothing but this Redis. A web request that cannot reach it (down,
restarting, still loading its append-only file) answers 503 `queue_unavailable`, retryable,
within a few seconds: the client's own retry is the right remedy, and nothing the request did is
half-visible (each write that acknowledges a job is one MULTI/EXEC transaction).

Values stay bytes (`decode_responses=False`): RQ needs that, and the audio travels as bytes.
"""
from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# BusyLoadingError (Redis restarting, replaying its AOF) is a ConnectionError in redis-py.
UNAVAILABLE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


def connect(url: str, socket_timeout_s: float | None = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A client with short timeouts and a brief retry of refused connections (a restart's seconds)."""
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3), retry_on_error=[redis.exceptions.BusyLoadingError])


def persistence(conn: redis.Redis) -> dict:
    """How this Redis keeps acknowledged writes across a restart (for /health); managed services
    that refuse CONFIG answer "unknown"."""
    try:
        info = conn.config_get("appendonly")
        fsync = conn.config_get("appendfsync")
    except redis.exceptions.ResponseError:
        return {"appendonly": "unknown"}
    return {"appendonly": _text(info.get(b"appendonly") or info.get("appendonly")),
            "appendfsync": _text(fsync.get(b"appendfsync") or fsync.get("appendfsync"))}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def uptime_s(conn: redis.Redis) -> float:
    """Seconds since this Redis started. Just after a restart every heartbeat it restored is old:
    nobody may declare a GPU worker lost before the workers have had time to beat again."""
    return float(conn.info("server").get("uptime_in_seconds", 0))


def heartbeats_trustworthy(conn: redis.Redis, lost_after_s: float) -> bool:
    return uptime_s(conn) >= 2 * lost_after_s
