"""The Redis state store (docs/behaviour/limits.md#redis): counts shared by
every worker and node that names the same Redis with ``--state``.

Job: answer the anvil checks (connections open per client, the rate
windows) and AUTH's failure counts, lockouts and known networks from Redis,
one round trip per check at most: each check is one Lua script (EVALSHA,
loaded again after a Redis restart) that reads, counts and sets the TTLs
atomically, on Redis's own clock (TIME), so the nodes' clocks do not have
to agree; the checks asked in one event-loop turn share one pipeline
(limits/batch.py).

Key names (``prefix`` is ``--state-prefix``, "mailfilter:" by default;
KEY is the client key -- IPv4 address, IPv6 /64 -- or a tracker key)::

    {prefix}conn:KEY          sorted set: one member per connection open, scored
                              by when it lapses (now + lease); TTL lease
    {prefix}rate:KIND:KEY     counter of the fixed window (KIND conn|msg|rcpt); TTL window
    {prefix}auth:fail:T:KEY   sorted set of failure times (T ip|user|budget); TTL window
    {prefix}auth:lock:T:KEY   present while KEY is locked; TTL lockout
    {prefix}auth:known:KEY    present while the user's network is known; TTL known_ttl

Invariants:
  - never raises into a session: a Redis error or a check slower than
    ``timeout`` seconds answers that check from the local store (``local``,
    which every check also counts into), logs ONE ``action=state_fallback``
    line when Redis goes away and ONE ``action=state_restored`` when it
    answers again, and counts it (``fallbacks``: checks answered locally,
    ``outages``: times Redis went away; plain attributes other code reads);
  - while Redis is away it is asked again only after a backoff (0.5 s,
    doubling to 5 s), so a dead Redis costs the sessions nothing but the
    one failed check per backoff;
  - a connection's member lapses at the lease even if its node dies
    without removing it, so a crashed node's connections stop counting.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mailfilter import log
from mailfilter.limits.batch import Batch
from mailfilter.limits.local import LocalStore
from mailfilter.limits.store import DEFAULT_PREFIX, check_spec

__all__ = ["RedisStore", "redacted"]

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 5.0

# A Lua number holds an integer exactly up to 2^53: milliseconds are fine.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# one event in a fixed window: INCR, the TTL set by the window's first event
# (windows.FixedWindows is the same algorithm in process)
RATE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""

# a connection: lapsed members dropped; unless `limit` (0 = none) are open,
# the connection-rate window counts it (when `rate` > 0); unless that is
# over `rate`, the member is added -> {taken 0|1, open (with it if taken), rate count}
# KEYS: the connection set, the connection-rate counter;
# ARGV: member, limit, lease ms, rate, window ms
CONNECT = _NOW + """
local limit, lease, rate = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if limit > 0 and n >= limit then return {0, n, 0} end
local r = 0
if rate > 0 then
  r = redis.call('INCR', KEYS[2])
  if r == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
  if r > rate then return {0, n, r} end
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return {1, n + 1, r}
"""

DISCONNECT = "return redis.call('ZREM', KEYS[1], ARGV[1])"

# AUTH before verifying: per tracker (ip, user, budget) the lock's remaining
# milliseconds (<= 0: not locked) and the failures in the window; then
# whether the user's network is known.
# KEYS: lock/fail of ip, user, budget, then known; ARGV: window ms
AUTH_VIEW = _NOW + """
local edge = now - tonumber(ARGV[1])
local out = {}
for i = 1, 5, 2 do
  out[#out + 1] = redis.call('PTTL', KEYS[i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', edge)
  out[#out + 1] = redis.call('ZCARD', KEYS[i + 1])
end
out[#out + 1] = redis.call('EXISTS', KEYS[7])
return out
"""

# AUTH failure: counted per tracker whose limit is above 0; at the limit the
# count goes and the lock is set -> {locked ip, locked user, locked budget}
# KEYS: fail/lock of ip, user, budget; ARGV: member, window ms, then limit
# and lockout ms per tracker
AUTH_FAIL = _NOW + """
local window = tonumber(ARGV[2])
local out = {}
for i = 0, 2 do
  local fk, lk = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local limit, lockms = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local locked = 0
  if limit > 0 then
    redis.call('ZADD', fk, now, ARGV[1])
    redis.call('ZREMRANGEBYSCORE', fk, '-inf', now - window)
    redis.call('PEXPIRE', fk, window)
    if redis.call('ZCARD', fk) >= limit then
      redis.call('DEL', fk)
      redis.call('SET', lk, '1', 'PX', lockms)
      locked = 1
    end
  end
  out[#out + 1] = locked
end
return out
"""

# AUTH success: the user-from-network count goes, the network is known
# KEYS: fail user, known; ARGV: known ms
AUTH_OK = """
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
"""

SCRIPTS = {"rate": RATE, "connect": CONNECT, "disconnect": DISCONNECT,
           "auth_view": AUTH_VIEW, "auth_fail": AUTH_FAIL, "auth_ok": AUTH_OK}


def redacted(url: str) -> str:
    """`url` without a password (it is logged)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """The shared store: Redis, with a LocalStore under it. See the module docstring."""

    shared = True

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = 0.1,
                 window: float = 60.0, size: int = 100_000, clock=time.monotonic):
        check_spec(url)
        self.url = redacted(url)
        self.prefix = prefix
        self.timeout = timeout
        self.window = window
        self.clock = clock
        self.local = LocalStore(window, size, clock)
        # no retries, and one deadline per check (asyncio.timeout in _run; a
        # socket timeout per read on top cost ~10 % more CPU per check): a
        # check that Redis cannot answer in time is answered locally (the
        # module docstring), never waited for
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.batch = Batch(self.client, SCRIPTS)
        self.fallbacks = 0          # checks answered by the local store
        self.outages = 0            # times Redis went away
        # called with the check's script name (a fixed word) for each check
        # answered locally: the metrics' state-store fallbacks (--metrics)
        self.on_fallback = None
        self.down = False
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST
        self._ids = itertools.count()
        self._node = None
        self._closing: set[asyncio.Task] = set()    # connection releases in flight
        self.closed = False

    # ------------------------------------------------------------ the calls
    async def _run(self, name: str, keys: list, args: list):
        """The script's answer, or None when Redis cannot give it (then the
        caller answers locally)."""
        if self.down and self.clock() < self._retry_at:
            return self._fell_back(name)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self.batch.call(name, keys, args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_away(exc)
            return self._fell_back(name)
        if self.down:
            self._came_back()
        return answer

    def _fell_back(self, name: str) -> None:
        """Count a check answered locally; None, the caller's cue to do so."""
        self.fallbacks += 1
        if self.on_fallback is not None:
            self.on_fallback(name)
        return None

    def _went_away(self, exc: BaseException) -> None:
        now = self.clock()
        if self.down:
            if now < self._retry_at:    # another check of the same failed batch
                return
            # a retry after the backoff failed: wait longer
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        else:
            self.down = True
            self.outages += 1
            self._backoff = BACKOFF_FIRST
            why = str(exc)
            log.event(action="state_fallback", store=self.url,
                      reason=f"{type(exc).__name__}: {why}" if why else type(exc).__name__,
                      detail="local limits in force")
        self._retry_at = now + self._backoff

    def _came_back(self) -> None:
        self.down = False
        self._backoff = BACKOFF_FIRST
        log.event(action="state_restored", store=self.url, fallbacks=self.fallbacks)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def member(self) -> str:
        """A name for one connection or failure, unique across the fleet."""
        if self._node is None:      # made in the process that serves (after --workers forks)
            self._node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        return f"{self._node}:{next(self._ids)}"

    # ------------------------------------------------------------ anvil
    async def hit(self, kind: str, key: str) -> int:
        """Count one `kind` event of `key`: the events in the fleet's window
        (the process's own when Redis cannot say)."""
        n = self.local.hit(kind, key)
        answer = await self._run("rate", [self.key("rate", kind, key)], [_ms(self.window)])
        return n if answer is None else int(answer)

    async def connect(self, key: str, limit: int, rate: int, member: str,
                      lease: float) -> tuple[bool, int, int]:
        """A connection of `key` across the fleet, as LocalStore.connect
        (the same contract); the lease bounds how long its slot outlives a
        node that died without giving it back."""
        answer = await self._run("connect", [self.key("conn", key), self.key("rate", "conn", key)],
                                 [member, limit, _ms(lease), rate, _ms(self.window)])
        if answer is None:
            return self.local.connect(key, limit, rate)
        taken, n, r = (int(x) for x in answer)
        if taken:
            self.local.connect(key, 0, 0)
        return bool(taken), n, r

    def disconnect(self, key: str, member: str) -> None:
        """Give the slot back: locally now, in Redis in the background
        (nothing waits for it; a lost release lapses with the lease)."""
        self.local.disconnect(key)
        if self.closed:             # shutting down: the member lapses with its lease
            return
        task = asyncio.get_running_loop().create_task(
            self._run("disconnect", [self.key("conn", key)], [member]))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------ AUTH
    def _auth_keys(self, ip: str, unet: str, user: str) -> list[str]:
        return [self.key("auth", "lock", "ip", ip), self.key("auth", "fail", "ip", ip),
                self.key("auth", "lock", "user", unet), self.key("auth", "fail", "user", unet),
                self.key("auth", "lock", "budget", user), self.key("auth", "fail", "budget", user)]

    async def auth_view(self, ip: str, unet: str, user: str, window: float):
        """Before verifying: ((lock ms, failures) of ip, user, budget, known)
        across the fleet, or None when Redis cannot say."""
        keys = self._auth_keys(ip, unet, user) + [self.key("auth", "known", unet)]
        answer = await self._run("auth_view", keys, [_ms(window)])
        if answer is None:
            return None
        a = [int(x) for x in answer]
        return (a[0], a[1]), (a[2], a[3]), (a[4], a[5]), bool(a[6])

    async def auth_failure(self, ip: str, unet: str, user: str, window: float,
                           limits: tuple[tuple[int, float], ...]):
        """Count a failure for the trackers whose limit (of (limit, lockout)
        per ip, user, budget) is above 0: which of them it locked, or None."""
        k = self._auth_keys(ip, unet, user)
        keys = [k[1], k[0], k[3], k[2], k[5], k[4]]
        args = [self.member(), _ms(window)]
        for limit, lockout in limits:
            args += [limit, _ms(lockout)]
        answer = await self._run("auth_fail", keys, args)
        return None if answer is None else tuple(bool(int(x)) for x in answer)

    async def auth_success(self, unet: str, known_ttl: float) -> None:
        """The user's network authenticated: its count goes, it is known."""
        await self._run("auth_ok", [self.key("auth", "fail", "user", unet),
                                    self.key("auth", "known", unet)], [_ms(known_ttl)])

    # ------------------------------------------------------------ end
    async def aclose(self) -> None:
        """At shutdown: the releases in flight, then the pool."""
        self.closed = True
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=self.timeout * 2)
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass
