"""limits/redis.py against a real redis-server on loopback: the counts two
stores (two nodes) share, the keys and their TTLs, the lease of a lost
node's connection, and Redis away -- at start and killed mid-run -- then
back: local answers, one line each way, the counters."""
import asyncio
import signal

import pytest

from mailfilter.limits.redis import BACKOFF_MAX, RedisStore, redacted
from mailfilter.limits.store import check_spec, open_store
from mailfilter.limits.local import LocalStore
from tests.support.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support.server_harness import free_port


class Clock:
    """The store's clock (its backoff and local windows), moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(coro):
    return asyncio.run(coro)


def store(url, **kw):
    kw.setdefault("timeout", 0.5)
    return RedisStore(url, prefix="t:", **kw)


def test_a_rate_is_counted_across_stores_with_the_window_as_ttl(redis_server):
    async def go():
        a, b = store(redis_server.url, window=60), store(redis_server.url, window=60)
        counts = [await s.hit("msg", "192.0.2.1") for s in (a, b, a, b)]
        await a.aclose()
        await b.aclose()
        return counts
    assert run(go()) == [1, 2, 3, 4]
    r = redis_server.client()
    assert int(r.get("t:rate:msg:192.0.2.1")) == 4
    assert 0 < r.pttl("t:rate:msg:192.0.2.1") <= 60_000


def test_connections_at_once_across_stores_and_given_back(redis_server):
    async def go():
        a, b = store(redis_server.url), store(redis_server.url)
        m1, m2, m3 = a.member(), b.member(), a.member()
        assert await a.connect("k", 2, 0, m1, 60) == (True, 1, 0)
        assert await b.connect("k", 2, 0, m2, 60) == (True, 2, 0)
        assert await a.connect("k", 2, 0, m3, 60) == (False, 2, 0)
        a.disconnect("k", m1)
        await asyncio.wait(list(a._closing), timeout=5)
        assert await b.connect("k", 2, 0, m3, 60) == (True, 2, 0)
        assert (a.local.conns, b.local.conns) == ({}, {"k": 2})
        await a.aclose()
        await b.aclose()
        return {m2, m3}
    members = run(go())
    r = redis_server.client()
    assert {m.decode() for m in r.zrange("t:conn:k", 0, -1)} == members
    assert 0 < r.pttl("t:conn:k") <= 60_000


def test_the_connection_rate_counts_only_connections_under_the_count(redis_server):
    async def go():
        s = store(redis_server.url, window=60)
        got = [await s.connect("k", 0, 2, s.member(), 60) for _ in range(3)]
        await s.aclose()
        return got
    assert run(go()) == [(True, 1, 1), (True, 2, 2), (False, 2, 3)]


def test_a_lost_nodes_connection_lapses_at_its_lease(redis_server):
    """A node that died never gives its slot back: the slot counts until its
    lease ends, then no longer (bounded wait on a real event)."""
    async def go():
        s = store(redis_server.url)
        assert (await s.connect("k", 1, 0, "dead-node:1", 0.2))[0]
        for _ in range(100):            # at most 5 s
            taken, _, _ = await s.connect("k", 1, 0, "live:1", 60)
            if taken:
                break
            await asyncio.sleep(0.05)
        await s.aclose()
        return taken
    assert run(go())


def test_redis_down_at_start_answers_locally_logs_once_and_counts(decisions):
    clock = Clock()

    async def go():
        s = store(f"redis://127.0.0.1:{free_port()}/0", clock=clock, timeout=0.2)
        counts = [await s.hit("msg", "k") for _ in range(3)]     # in one backoff: asked once
        taken = [(await s.connect("c", 1, 0, s.member(), 60))[0] for _ in range(2)]
        await s.aclose()
        return s, counts, taken
    s, counts, taken = run(go())
    assert counts == [1, 2, 3] and taken == [True, False]     # the local limits are in force
    assert s.down and s.outages == 1 and s.fallbacks == 5
    lines = [line for line in decisions() if "action=state_" in line]
    assert len(lines) == 1 and lines[0].startswith("action=state_fallback store=redis://127.0.0.1:")


def test_killed_mid_run_then_back(redis_server, decisions):
    """Redis killed while serving: the next check is answered locally (one
    state_fallback line); once it is back (after the backoff) the checks go
    to Redis again (one state_restored line)."""
    clock = Clock()

    async def go():
        s = store(redis_server.url, clock=clock, timeout=0.3)
        assert await s.hit("msg", "k") == 1 and not s.down
        redis_server.kill()
        assert await s.hit("msg", "k") == 2          # the local count: Redis said 1, local 2
        assert s.down and s.outages == 1
        redis_server.start()                         # the same port, nothing remembered
        assert await s.hit("msg", "k") == 3          # still in the backoff: not asked
        clock.now += BACKOFF_MAX
        assert await s.hit("msg", "k") == 1          # Redis again (it lost its counts)
        assert not s.down and s.fallbacks == 2
        await s.aclose()
    run(go())
    lines = [line for line in decisions() if "action=state_" in line]
    assert [line.split()[0] for line in lines] == ["action=state_fallback", "action=state_restored"]
    assert "fallbacks=2" in lines[1]


def test_a_hung_redis_is_answered_locally_within_the_timeout(redis_server, decisions):
    """SIGSTOP: Redis takes the connection and never answers. The check is
    answered locally once --state-timeout has passed; SIGCONT: back."""
    clock = Clock()

    async def go():
        s = store(redis_server.url, clock=clock, timeout=0.3)
        assert await s.hit("rcpt", "k") == 1
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            assert await s.hit("rcpt", "k") == 2 and s.down
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        clock.now += BACKOFF_MAX
        n = await s.hit("rcpt", "k")
        await s.aclose()
        return n, s
    n, s = run(go())
    # Redis counted 1, then the check it took while stopped (sent, answered
    # too late: counted there, answered here), then this one
    assert n == 3 and not s.down and s.outages == 1
    assert [line.split()[0] for line in decisions() if "action=state_" in line] == \
        ["action=state_fallback", "action=state_restored"]


def test_auth_failures_lock_across_stores_and_a_success_clears_the_user(redis_server):
    async def go():
        a, b = store(redis_server.url), store(redis_server.url)
        limits = ((3, 900.0), (2, 900.0), (10, 600.0))     # ip, user, budget
        out = [await s.auth_failure("ip1", "u\0net", "u", 600, limits) for s in (a, b)]
        view = await a.auth_view("ip1", "u\0net", "u", 600)
        await b.auth_success("u\0net", 3600)
        after = await b.auth_view("ip1", "u\0net", "u", 600)
        await a.aclose()
        await b.aclose()
        return out, view, after
    out, view, after = run(go())
    assert out == [(False, False, False), (False, True, False)]    # the 2nd locks the user
    (ip_lock, ip_n), (user_lock, user_n), (budget_lock, budget_n), known = view
    assert ip_lock <= 0 and ip_n == 2 and 0 < user_lock <= 900_000 and user_n == 0
    assert budget_n == 2 and not known
    assert after[3] and after[1][1] == 0
    r = redis_server.client()
    assert 0 < r.pttl(b"t:auth:known:u\0net") <= 3_600_000


def test_store_specs():
    check_spec("local")
    for good in ("redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock?db=2"):
        check_spec(good)
    for bad in ("redis", "http://h/0", "redis://:6379/0", "unix://", "redis://h:99999/0"):
        with pytest.raises(ValueError):
            check_spec(bad)
    assert isinstance(open_store("local", prefix="p", timeout=0.1, window=60), LocalStore)
    assert redacted("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
