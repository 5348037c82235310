"""What the per-client limits cost per message: local store vs Redis, one run.

usage: PYTHONPATH=. .venv/bin/python bench/limits_bench.py [--messages N] [--repeat 5]
          [--loop uvloop|asyncio]

SMTPProtocol on proto_bench's fake transport (no sockets to the client), as
`mailfilter serve` builds it (build_state), the decision log on (to a
temporary file), `discard` delivery, the bench's non-relay rules. Cells:

  local, defaults      --state local, the shipped limits (connections at
                       once 100, rates off): the baseline every server pays
  local, rates on      --state local, --max-conn-rate/--max-msg-rate/
                       --max-rcpt-rate set high enough never to refuse
  redis, defaults      --state redis://: the connection count in Redis
                       (one script before the greeting), rates off
  redis, rates on      --state redis://, the three rates on: per message one
                       script at MAIL and one at RCPT (and at connect)

Each cell runs `reuse` (one session, RSET/MAIL/RCPT/DATA per message: the
MAIL and RCPT checks) and `new-conn` (a connection per message: the
connection check too). Two figures per cell: process CPU µs per message
(best of --repeat) and wall µs per message (includes the Redis round
trips, which the CPU figure does not). The redis-server is started on a
loopback port by the bench (tests/support/redis_server.py) and stopped
after. Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from proto_bench import FakeTransport   # noqa: E402

MAIL = b"MAIL FROM:<bench@sender.example>\r\n"
RCPT = b"RCPT TO:<bench@example.net>\r\n"
EHLO = b"EHLO bench.client.example\r\n"


async def _settle(p) -> None:
    """Until the protocol waits for nothing (a Redis check, a commit)."""
    while p.task is not None and not p.task.done():
        await asyncio.wait((p.task,))
    while p.waiting:
        await asyncio.sleep(0)


async def drive(state, n: int, message: bytes, new_conn: bool) -> tuple[float, float]:
    """(CPU µs, wall µs) per message over `n` messages."""
    from mailfilter.smtp.protocol import SMTPProtocol

    async def open_():
        t = FakeTransport()
        p = SMTPProtocol(state)
        p.connection_made(t)
        await _settle(p)            # the connection check before the greeting (Redis)
        p.data_received(EHLO)
        return p, t

    conn = None if new_conn else await open_()
    t0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        if new_conn:
            conn = await open_()
        p, t = conn
        if i and not new_conn:
            p.data_received(b"RSET\r\n")
        for line in (MAIL, RCPT, b"DATA\r\n", message):
            p.data_received(line)
            await _settle(p)
        last = t.out[-1]
        if not last.startswith(b"250"):
            raise SystemExit(f"unexpected reply {last!r}")
        if new_conn:
            p.data_received(b"QUIT\r\n")
            p.connection_lost(None)
        t.out.clear()
    return ((time.process_time() - t0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    a = ap.parse_args(argv)
    import loadgen
    import servers
    from mailfilter import log
    from mailfilter.serve.config import ServeOptions
    from mailfilter.serve.lifecycle import build_state
    from tests.support.redis_server import RedisServer

    log.setup("info", stream=tempfile.TemporaryFile(mode="w"))
    rules = servers.norelay_rules(tempfile.mkdtemp())
    msg = loadgen.make_message(a.size, "bench@sender.example", "bench@example.net")
    rates = dict(max_conn_rate=10**9, max_msg_rate=10**9, max_rcpt_rate=10**9)
    redis = RedisServer().start()
    try:
        cells = (("local, defaults", "local", {}), ("local, rates on", "local", rates),
                 ("redis, defaults", redis.url, {}), ("redis, rates on", redis.url, rates))
        loop = __import__("uvloop").new_event_loop() if a.loop == "uvloop" else asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        print(f"{a.repeat} x {a.messages} messages of {a.size} B, {a.loop}, redis-server on "
              f"127.0.0.1:{redis.port}; CPU µs/msg (best) | wall µs/msg (best)")
        for name, state_spec, extra in cells:
            opts = ServeOptions(rules=rules, deliver="discard", max_connections=10**9,
                                max_per_ip=10**9, remote_host="off", no_tls=True,
                                state=state_spec, state_timeout=1.0, **extra)
            state = build_state(opts)
            loop.run_until_complete(drive(state, 200, msg, False))      # warm-up (and connect)
            row = []
            for mode, new in (("reuse", False), ("new-conn", True)):
                runs = [loop.run_until_complete(drive(state, a.messages, msg, new))
                        for _ in range(a.repeat)]
                row.append(f"{mode} {min(c for c, _ in runs):6.1f} | {min(w for _, w in runs):6.1f}")
            store = state.anvil.store
            falls = f"  (fallbacks {store.fallbacks})" if store.shared else ""
            print(f"{name:16}  " + "   ".join(row) + falls)
            loop.run_until_complete(state.anvil.aclose())
            loop.run_until_complete(state.delivery.close())
        loop.close()
    finally:
        redis.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
