"""Server CPU per message without sockets: SMTPProtocol driven by a fake transport.

usage: .venv/bin/python bench/proto_bench.py [--rules DIR] [--messages N] [--size BYTES]
          [--repeat 5] [--loop uvloop|asyncio] [--profile FILE]
          [--deliver discard|maildir] [--sessions C]

The same session the load generator makes (EHLO once, then RSET/MAIL/RCPT/
DATA/message per transaction; `new-conn` also does connection_made, EHLO,
QUIT, connection_lost per message) is fed to mailfilter.smtp.protocol.SMTPProtocol in
one process, with `discard` delivery (default). No kernel, no other process: the
figure (CPU µs per message, best of --repeat) is the Python-level cost of
engine + policy + content scan + delivery + logging + task machinery, stable
enough to compare small server.py changes (run before and after on an idle
moment; PYTHONPATH=<old tree> to A/B). By default the rules are the bench's
non-relay rules (bench/servers.py norelay_rules). Numbers, not assertions.

`--deliver maildir` stores every message durably in a temporary maildir
(BENCH_DIR, default /var/tmp: a real disk; /dev/shm shows the CPU without
fsync waits). The figure is process CPU, so it counts the committer and fsync
threads too. `--sessions C` runs C sessions side by side (each a transaction,
then all awaited), so group commit sees batches of about C as under a load of
c=C; with the default 1 and discard, the run is the one it always was.
`loop thread` is the best CPU of the event loop's thread alone (the rest of
a maildir's CPU is on the committer's threads, i.e. on another core).
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


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.out = []
        self.closing = False

    def write(self, data):
        self.out.append(data)

    def close(self):
        self.closing = True

    def is_closing(self):
        return self.closing

    def get_write_buffer_size(self):
        return 0  # every write "sent" at once: no back-pressure

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 2525)}.get(name, default)


async def drive(state, n: int, message: bytes, new_conn: bool, sessions: int = 1) -> float:
    from mailfilter.smtp.protocol import SMTPProtocol
    mail = b"MAIL FROM:<bench@sender.example>\r\n"
    rcpt = b"RCPT TO:<bench@example.net>\r\n"
    ehlo = b"EHLO bench.client.example\r\n"

    async def settle(p):
        while p.waiting:
            if p.task is not None:      # a commit in flight: wait for it, do not spin
                await asyncio.wait((p.task,))
            else:
                await asyncio.sleep(0)

    def open_():
        t = FakeTransport()
        p = SMTPProtocol(state)
        p.connection_made(t)
        p.data_received(ehlo)
        return p, t

    conns = [] if new_conn else [open_() for _ in range(sessions)]
    t0, l0 = time.process_time(), time.thread_time()
    for i in range(0, n, sessions):
        if new_conn:
            conns = [open_() for _ in range(sessions)]
        for p, t in conns:
            if i and not new_conn:
                p.data_received(b"RSET\r\n")
            p.data_received(mail)
            p.data_received(rcpt)
            p.data_received(b"DATA\r\n")
            p.data_received(message)
        for p, t in conns:
            await settle(p)
        for p, t in conns:
            if new_conn:
                p.data_received(b"QUIT\r\n")
                p.connection_lost(None)
            last = t.out[-2 if new_conn else -1]
            if not last.startswith(b"250"):
                raise SystemExit(f"unexpected reply {last!r}")
            t.out.clear()
    return (time.process_time() - t0) / n * 1e6, (time.thread_time() - l0) / n * 1e6


def _empty_new(root: str) -> None:
    """Between modes: a new/ of thousands of entries would slow later renames."""
    new = os.path.join(root, "Maildir", "new")
    for name in os.listdir(new):
        os.unlink(os.path.join(new, name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules")
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--profile", help="write a cProfile of one reuse run here")
    ap.add_argument("--deliver", choices=("discard", "maildir"), default="discard",
                    help="discard (default) or a durable maildir in a temporary "
                         "directory under BENCH_DIR (default /var/tmp)")
    ap.add_argument("--sessions", type=int, default=1,
                    help="sessions side by side (default 1); --messages is rounded up "
                         "to a multiple")
    ap.add_argument("--log-level", default="info", choices=("info", "warning"),
                    help="info (default) = the decision log on, as shipped, written to a "
                         "temporary file; warning = off (how the restructure table in "
                         "bench/README.md was taken, for both trees)")
    ap.add_argument("--metrics", action="store_true",
                    help="count for --metrics (mailfilter/metrics/counts.py) as serve --metrics "
                         "does; the counts are kept, no endpoint is started")
    a = ap.parse_args(argv)
    import loadgen
    import servers
    from mailfilter import log
    from mailfilter.serve.config import ServeOptions
    from mailfilter.serve.lifecycle import build_state
    sink = tempfile.TemporaryFile(mode="w")          # a real file, as a log file would be
    log.setup(a.log_level, stream=sink)              # as serve sets it up, to that file
    rules = a.rules or servers.norelay_rules(tempfile.mkdtemp())
    deliver = "discard"
    if a.deliver == "maildir":
        spool = tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp"))
        deliver = f"maildir:{spool.name}/Maildir"
    opts = ServeOptions(rules=rules, deliver=deliver, max_per_ip=10**9, max_connections=10**9,
                        remote_host="off",      # no reverse DNS, as in bench/servers.py
                        metrics="127.0.0.1:0" if a.metrics else None)
    state = build_state(opts)
    msg = loadgen.make_message(a.size, "bench@sender.example", "bench@example.net")
    if a.loop == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    c = a.sessions
    n = -(-a.messages // c) * c
    loop.run_until_complete(drive(state, max(200, c), msg, False, c))       # warm-up
    for mode, new in (("reuse", False), ("new-conn", True)):
        both = [loop.run_until_complete(drive(state, n, msg, new, c)) for _ in range(a.repeat)]
        runs = [p for p, _ in both]
        on_loop = min(t for _, t in both)
        print(f"{mode:9} {a.size} B: best {min(runs):7.1f} µs/msg  median {sorted(runs)[len(runs) // 2]:7.1f}"
              f"  loop thread {on_loop:6.1f}  ({a.repeat} x {n} messages, {a.loop}, {a.deliver}, "
              f"sessions={c}{', metrics' if a.metrics else ''})")
        if a.deliver == "maildir":
            _empty_new(spool.name)
    if a.profile:
        import cProfile
        pr = cProfile.Profile()
        pr.enable()
        loop.run_until_complete(drive(state, n, msg, False, c))
        pr.disable()
        pr.dump_stats(a.profile)
    loop.run_until_complete(state.delivery.close())
    loop.close()
    if a.deliver == "maildir":
        spool.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
