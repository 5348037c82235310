"""limits/batch.py against a real redis-server: the checks of one loop turn
share one pipeline and each gets its own script's answer; a lone check is
one plain call; a Redis that forgot its scripts (SCRIPT FLUSH, a restart)
gets them again; a member that gave up does not disturb the others, a
leader that gave up fails its members (they answer locally); a lost
connection is every check's error, and the store (limits/redis.py) then
falls back once."""
import asyncio

import pytest
import redis.asyncio as aioredis

from mailfilter.limits.batch import Batch
from mailfilter.limits.redis import BACKOFF_FIRST, SCRIPTS, RedisStore
from tests.support.redis_server import redis_server  # noqa: F401 (fixture)


def test_one_turns_checks_share_one_pipeline_in_order(redis_server):
    async def go():
        r = aioredis.Redis.from_url(redis_server.url)
        b = Batch(r, SCRIPTS)
        lone = await b.call("rate", ["b:rate:0"], [60_000])      # a batch of one: no pipeline
        keys = [f"b:rate:{i % 3}" for i in range(30)]
        answers = await asyncio.gather(*(b.call("rate", [k], [60_000]) for k in keys))
        await r.aclose()
        return lone, answers, b.pipelines
    lone, answers, pipelines = asyncio.run(go())
    assert lone == 1 and pipelines == 1
    # each key counted in the order asked: b:rate:0 from 2, the others from 1
    assert answers == [i // 3 + 1 + (i % 3 == 0) for i in range(30)]


def test_scripts_are_loaded_again_when_redis_forgot_them(redis_server):
    async def go():
        r = aioredis.Redis.from_url(redis_server.url)
        b = Batch(r, SCRIPTS)
        assert await b.call("rate", ["b:flush"], [60_000]) == 1
        await r.script_flush()
        answers = await asyncio.gather(b.call("rate", ["b:flush"], [60_000]),
                                       b.call("disconnect", ["b:none"], ["m"]))
        await r.aclose()
        return answers, b.pipelines
    answers, pipelines = asyncio.run(go())
    assert answers == [2, 0] and pipelines == 2     # the batch, then again after NOSCRIPT


def _three(b):
    return [asyncio.ensure_future(b.call("rate", [f"b:{n}"], [60_000]))
            for n in ("lead", "member", "other")]


def test_a_member_that_gave_up_leaves_the_others_their_answers(redis_server):
    async def go():
        r = aioredis.Redis.from_url(redis_server.url)
        b = Batch(r, SCRIPTS)
        await b.call("rate", ["b:warm"], [60_000])      # a lone check: the script loaded
        lead, member, other = _three(b)
        await asyncio.sleep(0)          # all three asked; the leader has not sent yet
        member.cancel()                 # its deadline passed, say
        got = await asyncio.gather(lead, other)
        await r.aclose()
        return got, member.cancelled(), b.pipelines
    assert asyncio.run(go()) == ([1, 1], True, 1)


def test_a_leader_that_gave_up_fails_its_members(redis_server):
    async def go():
        r = aioredis.Redis.from_url(redis_server.url)
        b = Batch(r, SCRIPTS)
        lead, member, other = _three(b)
        await asyncio.sleep(0)
        lead.cancel()
        got = await asyncio.gather(member, other, return_exceptions=True)
        after = await b.call("rate", ["b:after"], [60_000])     # the next turn leads anew
        await r.aclose()
        return got, after
    got, after = asyncio.run(go())
    assert [type(e) for e in got] == [ConnectionError, ConnectionError] and after == 1


def test_a_lost_connection_fails_the_batch_and_the_store_falls_back_once(redis_server, decisions):
    async def go():
        s = RedisStore(redis_server.url, prefix="t:", timeout=0.5)
        assert await s.hit("msg", "k") == 1
        redis_server.kill()
        counts = await asyncio.gather(*(s.hit("msg", "k") for _ in range(5)))
        await s.aclose()
        return s, counts
    s, counts = asyncio.run(go())
    assert sorted(counts) == [2, 3, 4, 5, 6]        # the local counts answered
    assert s.down and s.outages == 1 and s.fallbacks == 5
    assert s._backoff == BACKOFF_FIRST              # one outage: not five backoffs in a row
    assert [line.split()[0] for line in decisions() if "action=state_" in line] == \
        ["action=state_fallback"]


@pytest.mark.parametrize("n", [1, 7])
def test_the_store_gives_each_check_its_fleet_count(redis_server, n):
    """Through RedisStore: n sessions' MAIL checks in one turn, batched or
    not, each get the fleet's count (1..n), as one call per check would."""
    async def go():
        s = RedisStore(redis_server.url, prefix=f"t{n}:", timeout=0.5)
        await s.hit("msg", "warm")      # a lone check: its script loaded (no pipeline)
        counts = await asyncio.gather(*(s.hit("msg", "k") for _ in range(n)))
        await s.aclose()
        return counts, s.batch.pipelines
    counts, pipelines = asyncio.run(go())
    assert counts == list(range(1, n + 1)) and pipelines == (n > 1)
