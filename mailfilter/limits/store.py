"""From ``--state`` to a state store (docs/behaviour/limits.md#state).

Job: check a ``--state`` value and open the store it names: "local" (the
default: each process counts for itself, local.py) or a Redis URL that
redis-py's ``from_url`` takes -- redis://HOST:PORT/DB, rediss:// (TLS),
unix:///PATH?db=N -- shared by every process and node that names it
(redis.py). redis-py is imported only when a Redis store is opened.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from mailfilter.limits.local import LocalStore

__all__ = ["LOCAL", "SCHEMES", "DEFAULT_PREFIX", "check_spec", "open_store"]

LOCAL = "local"
DEFAULT_PREFIX = "mailfilter:"      # every Redis key starts with it (--state-prefix)
SCHEMES = ("redis", "rediss", "unix")


def check_spec(spec: str) -> None:
    """ValueError naming what is wrong with a --state value."""
    if spec == LOCAL:
        return
    parts = urlsplit(spec)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{spec!r}: give local or a redis://HOST:PORT/DB, rediss:// or "
                         "unix:///PATH URL")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"{spec!r}: no host")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"{spec!r}: no socket path")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"{spec!r}: {exc}") from None


def open_store(spec: str, *, prefix: str, timeout: float, window: float):
    """The store `spec` names (check_spec first). A Redis store connects on
    its first check, so a Redis that is down at start is a fallback, not a
    start-up error."""
    check_spec(spec)
    if spec == LOCAL:
        return LocalStore(window)
    from mailfilter.limits.redis import RedisStore
    return RedisStore(spec, prefix=prefix, timeout=timeout, window=window)
