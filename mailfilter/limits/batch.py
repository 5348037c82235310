"""Checks asked in one event-loop turn go to Redis together (docs/behaviour/limits.md#redis).

Job: under load many sessions ask the shared store in the same turn of the
event loop (their commands arrived in one batch of reads). Each check is
still one Lua script with its own answer, but all the checks of a turn
leave in ONE pipeline: one write, the replies read in order, one pooled
connection for the lot, instead of a write, a read and a connection per
check (bench/README.md has the figures).

How: the first check of a turn leads. It yields once (``sleep(0)``: the
sessions whose checks are already due in this turn join the batch), then
sends the batch and hands each member its answer. A batch of one is sent
as the one script call it is (no pipeline: the quiet server pays nothing
for the busy one's batching); no Task is made for a batch.

Invariants:
  - a check's answer is its own script's (EVALSHA), in the order asked;
    nothing is shared between checks but the round trip, so each stays
    atomic in Redis and the semantics are those of one call per check;
  - a script Redis does not have (NOSCRIPT: Redis restarted, or a new
    one) is loaded and that check sent again, once;
  - a member whose waiter gave up (its deadline passed, its session
    ended) is dropped from its answer; a leader that gives up (cancelled:
    its deadline, which its members share, as they asked in the same
    turn) fails the members still waiting, as does an error of the batch
    as a whole (the connection lost): every caller then answers locally.
"""
from __future__ import annotations

import asyncio

from redis.exceptions import NoScriptError

__all__ = ["Batch"]


class Batch:
    """The checks of one loop turn, sent together; see the module docstring."""

    def __init__(self, client, scripts: dict[str, str]):
        self.client = client
        self.scripts = {name: client.register_script(src) for name, src in scripts.items()}
        self._open: list | None = None    # the members of the batch being gathered
        self.pipelines = 0          # pipelines sent (a NOSCRIPT retry is one more)

    async def call(self, name: str, keys: list, args: list):
        """The answer of script `name` on `keys`/`args`."""
        if self._open is not None:                   # a batch of this turn: join it
            waiter = asyncio.get_running_loop().create_future()
            self._open.append((name, keys, args, waiter))
            return await waiter
        members = self._open = []
        try:
            await asyncio.sleep(0)                   # the checks due in this turn join
            self._open = None
            if not members:
                return await self.scripts[name](keys=keys, args=args)
            results = await self._send([(name, keys, args)] + [m[:3] for m in members])
        except BaseException as exc:
            if self._open is members:
                self._open = None
            failure = exc if isinstance(exc, Exception) else ConnectionError("batch abandoned")
            for *_, waiter in members:
                if not waiter.done():
                    waiter.set_exception(failure)
            raise
        for (*_, waiter), r in zip(members, results[1:]):
            if waiter.done():
                continue
            if isinstance(r, Exception):
                waiter.set_exception(r)
            else:
                waiter.set_result(r)
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]

    async def _send(self, checks: list) -> list:
        """Each check's answer (or its error), in order: one pipeline, and
        one more for the checks Redis had no script for."""
        results = await self._pipeline(checks)
        again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if again:
            for name in {checks[i][0] for i in again}:
                await self.client.script_load(self.scripts[name].script)
            for i, r in zip(again, await self._pipeline([checks[i] for i in again])):
                results[i] = r
        return results

    async def _pipeline(self, checks: list) -> list:
        self.pipelines += 1
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in checks:
            pipe.evalsha(self.scripts[name].sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)
