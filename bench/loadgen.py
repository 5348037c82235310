"""SMTP load generator: raw SMTP over asyncio (uvloop) sockets, in its own process.

usage:
  python bench/loadgen.py --port P [--concurrency C] [--messages N] [--seconds T]
         [--size BYTES] [--reuse] [--pipelining] [--from A] [--to B] [--json]
  python bench/loadgen.py --port P --idle N --server-pid PID [--serial 300] [--json]

Throughput mode: C client tasks run transactions until N messages were
started or T seconds passed, whichever comes first (in-flight transactions
then finish). A transaction is MAIL, RCPT, DATA, the message, the final reply.
- new connection per message (default): connect, 220, EHLO, transaction,
  QUIT/221, close; latency is measured from connect() to the 250 after DATA.
- `--reuse`: one connection per client, EHLO once, then for every message
  RSET (skipped with --no-rset) + MAIL...; latency from the first command of
  the transaction to the 250 after DATA.
- `--pipelining`: when the server's EHLO lists PIPELINING, [RSET] MAIL RCPT
  DATA leave in one write and their replies are read together (RFC 2920).
Every reply that is not the expected 2xx/3xx is counted as an error under
"STAGE CODE" (connection failures and timeouts under their exception name),
and reported; a failed transaction ends its connection (a new one is opened).
With `--server-pid PID` the server's CPU time (utime+stime from /proc, PID and
descendants) over the run is reported per message: a figure much less
sensitive to other load on a shared machine than msgs/s.

Idle mode (`--idle N`): serial warm-up, server memory (VmRSS from
/proc/PID/status, Pss from /proc/PID/smaps_rollup, summed over PID and its
descendants), then N connections that read the 220 and stay silent, memory
again -> KB per idle connection, then `--serial` fresh transactions (new
connection each) while the N are held: p50/p99 latency; idle connections that
were closed by the server meanwhile are reported.

RLIMIT_NOFILE is raised to the hard limit at start. Output: a human summary,
or one JSON object with --json. Numbers are for side-by-side comparison in
one run, never assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import sys
import time

CRLF = b"\r\n"


def raise_nofile(need: int | None = None) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, or to at least `need` (the
    hard limit too if we may); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if need is None else max(soft, need)
    if want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            want = hard
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_loop(kind: str):
    """A fresh event loop of `kind` (uvloop or asyncio)."""
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def report(res: dict, as_json: bool) -> None:
    """The result on stdout: one JSON object, or one aligned line per key."""
    if as_json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {v}")


def make_message(size: int, sender: str, rcpt: str) -> bytes:
    """A message of ~`size` octets (headers included) with CRLF lines, dot-terminated."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: loadgen\r\n"
            f"Message-ID: <loadgen.{os.getpid()}@bench.test>\r\n\r\n").encode()
    line = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789abcdefghijklm" + CRLF  # 76
    body_len = max(0, size - len(head))
    n, rest = divmod(body_len, len(line))
    body = line * n + (b"x" * max(0, rest - 2) + CRLF if rest >= 2 else b"")
    return head + body + b".\r\n"


class SMTPError(Exception):
    def __init__(self, stage: str, code: int, text: str = ""):
        super().__init__(f"{stage} {code} {text}")
        self.stage = stage
        self.code = code
        self.key = f"{stage} {code}"


class ClientProtocol(asyncio.Protocol):
    """Collects complete SMTP replies (multi-line aware); expect(n) waits for n."""

    __slots__ = ("transport", "buf", "replies", "waiter", "want", "closed", "exc")

    def __init__(self):
        self.transport = None
        self.buf = b""
        self.replies: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.want = 0
        self.closed = False
        self.exc: BaseException | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        buf = self.buf + data if self.buf else data
        start = 0
        text_start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            # a reply ends at a line whose 4th octet is not '-'
            if nl - start < 4 or buf[start + 3] != 45:  # '-'
                code = int(buf[text_start:text_start + 3]) if buf[text_start:text_start + 3].isdigit() else 0
                self.replies.append((code, buf[text_start:nl + 1]))
                text_start = nl + 1
            start = nl + 1
        self.buf = buf[text_start:]
        if self.waiter is not None and len(self.replies) >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc):
        self.closed = True
        self.exc = exc
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("connection closed by server"))

    def eof_received(self):
        return False

    async def expect(self, n: int, timeout: float) -> list:
        if len(self.replies) < n:
            if self.closed:
                raise ConnectionResetError("connection closed by server")
            self.want = n
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, timeout)
            finally:
                self.waiter = None
        return [self.replies.popleft() for _ in range(n)]

    def write(self, data: bytes):
        self.transport.write(data)


class Session:
    """One client connection."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.proto: ClientProtocol | None = None
        self.pipelining = False
        self.first = True

    async def open(self, helo: bool = True):
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        _, self.proto = await asyncio.wait_for(
            loop.create_connection(ClientProtocol, cfg.host, cfg.port), cfg.timeout)
        (code, text), = await self.proto.expect(1, cfg.timeout)
        if code != 220:
            raise SMTPError("CONNECT", code, text.decode("latin-1").strip())
        if helo:
            self.proto.write(b"EHLO " + cfg.helo.encode() + CRLF)
            (code, text), = await self.proto.expect(1, cfg.timeout)
            if code != 250:
                raise SMTPError("EHLO", code, text.decode("latin-1").strip())
            self.pipelining = cfg.pipelining and b"PIPELINING" in text.upper()
        self.first = True

    async def transaction(self, message: bytes):
        cfg = self.cfg
        p = self.proto
        cmds = []
        stages = []
        if not self.first and cfg.rset:
            cmds.append(b"RSET\r\n")
            stages.append(("RSET", 250))
        self.first = False
        cmds.append(cfg.mail_cmd)
        stages.append(("MAIL", 250))
        cmds.append(cfg.rcpt_cmd)
        stages.append(("RCPT", 250))
        cmds.append(b"DATA\r\n")
        stages.append(("DATA", 354))
        if self.pipelining:
            p.write(b"".join(cmds))
            replies = await p.expect(len(cmds), cfg.timeout)
            for (stage, want), (code, text) in zip(stages, replies):
                if code != want:
                    raise SMTPError(stage, code, text.decode("latin-1").strip())
        else:
            for cmd, (stage, want) in zip(cmds, stages):
                p.write(cmd)
                (code, text), = await p.expect(1, cfg.timeout)
                if code != want:
                    raise SMTPError(stage, code, text.decode("latin-1").strip())
        p.write(message)
        (code, text), = await p.expect(1, cfg.timeout)
        if code // 100 != 2:
            raise SMTPError("EOM", code, text.decode("latin-1").strip())

    async def quit(self):
        p = self.proto
        if p is None:
            return
        try:
            if not p.closed:
                p.write(b"QUIT\r\n")
                (code, text), = await p.expect(1, self.cfg.timeout)
                if code != 221:
                    raise SMTPError("QUIT", code, text.decode("latin-1").strip())
        finally:
            self.close()

    def close(self):
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


class Stats:
    def __init__(self):
        self.ok = 0
        self.lat: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self.error_samples: dict[str, str] = {}

    def error(self, exc: BaseException):
        if isinstance(exc, SMTPError):
            key = exc.key
        else:
            key = type(exc).__name__
        self.errors[key] += 1
        self.error_samples.setdefault(key, str(exc)[:200])


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))
    return v[k]


async def run_load(cfg) -> dict:
    message = make_message(cfg.size, cfg.sender, cfg.rcpt)
    stats = Stats()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    deadline = t0 + cfg.seconds if cfg.seconds else None
    budget = [cfg.messages if cfg.messages else None]
    clock = time.perf_counter

    def take() -> bool:
        if deadline is not None and loop.time() >= deadline:
            return False
        if budget[0] is not None:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
        return True

    async def worker_new():
        while take():
            await fresh_transaction(cfg, message, stats)

    async def worker_reuse():
        s = None
        while take():
            try:
                if s is None:
                    s = Session(cfg)
                    await s.open()
                t = clock()
                await s.transaction(message)
                stats.lat.append(clock() - t)
                stats.ok += 1
            except (OSError, asyncio.TimeoutError, SMTPError, ValueError) as exc:
                stats.error(exc)
                if s is not None:
                    s.close()
                s = None
        if s is not None:
            try:
                await s.quit()
            except (OSError, asyncio.TimeoutError, SMTPError, ValueError) as exc:
                stats.error(exc)

    worker = worker_reuse if cfg.reuse else worker_new
    cpu0 = server_cpu(cfg.server_pid) if cfg.server_pid else None
    own0 = time.process_time()
    start = clock()
    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    elapsed = clock() - start
    own = time.process_time() - own0
    cpu = server_cpu(cfg.server_pid) - cpu0 if cfg.server_pid else None
    return {
        "mode": "load",
        "concurrency": cfg.concurrency, "size": cfg.size, "reuse": cfg.reuse,
        "pipelining": cfg.pipelining,
        "messages": stats.ok, "elapsed_s": round(elapsed, 4),
        "msgs_per_s": round(stats.ok / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": _ms(pct(stats.lat, 50)), "p99_ms": _ms(pct(stats.lat, 99)),
        "errors": sum(stats.errors.values()), "error_kinds": dict(stats.errors),
        "error_samples": stats.error_samples,
        # CPU seconds per second of wall time; per message in microseconds
        "loadgen_cpu": round(own / elapsed, 2) if elapsed > 0 else None,
        "server_cpu": round(cpu / elapsed, 2) if cpu is not None and elapsed > 0 else None,
        "server_us_per_msg": round(cpu / stats.ok * 1e6, 1) if cpu is not None and stats.ok else None,
    }


def _ms(v):
    return None if v is None else round(v * 1000, 3)


# ---------------------------------------------------------------- server memory
def _children(pid: int) -> list[int]:
    kids = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(x) for x in fh.read().split()]
    except OSError:
        pass
    out = []
    for k in kids:
        out.append(k)
        out.extend(_children(k))
    return out


def _field_kb(path: str, name: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def server_cpu(pid: int) -> float:
    """CPU seconds of pid and its descendants: utime + stime of the live ones
    plus cutime + cstime (children they reaped). A forking server (Postfix's
    master reaps an smtpd after max_use connections) keeps its dead
    children's time that way; differencing two readings stays exact because
    a child's time moves from its own utime to its parent's cutime."""
    total = 0
    for p in (pid, *_children(pid)):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def server_memory(pid: int, by_name: bool = False) -> dict:
    """VmRSS and Pss in KB, summed over pid and its descendants; with
    by_name, also per process name (n, rss_kb, pss_kb): Postfix forks one
    smtpd per connection, so one smtpd is what a connection costs there."""
    pids = [pid, *_children(pid)]
    rows = [(p, _field_kb(f"/proc/{p}/status", "VmRSS:"), _field_kb(f"/proc/{p}/smaps_rollup", "Pss:"))
            for p in pids]
    out = {"rss_kb": sum(r[1] for r in rows), "pss_kb": sum(r[2] for r in rows), "procs": len(pids)}
    if by_name:
        names: dict = {}
        for p, rss, pss in rows:
            d = names.setdefault(_comm(p), {"n": 0, "rss_kb": 0, "pss_kb": 0})
            d["n"] += 1
            d["rss_kb"] += rss
            d["pss_kb"] += pss
        out["by_name"] = names
    return out


async def fresh_transaction(cfg, message: bytes, stats: Stats) -> None:
    """Connect, one transaction, QUIT; latency = connect to the 250 after DATA."""
    s = Session(cfg)
    t = time.perf_counter()
    try:
        await s.open()
        await s.transaction(message)
        stats.lat.append(time.perf_counter() - t)
        stats.ok += 1
        await s.quit()
    except (OSError, asyncio.TimeoutError, SMTPError, ValueError) as exc:
        stats.error(exc)
        s.close()


async def serial_fresh(cfg, n: int, message: bytes, stats: Stats):
    for _ in range(n):
        await fresh_transaction(cfg, message, stats)


async def run_idle(cfg) -> dict:
    message = make_message(cfg.size, cfg.sender, cfg.rcpt)
    warm = Stats()
    await serial_fresh(cfg, cfg.serial, message, warm)     # warm-up + baseline latency
    await asyncio.sleep(0.5)
    before = server_memory(cfg.server_pid) if cfg.server_pid else None

    idle: list[Session] = []
    idle_err = Stats()
    sem = asyncio.Semaphore(cfg.open_concurrency)

    async def open_one():
        async with sem:
            s = Session(cfg)
            try:
                await s.open(helo=False)
                idle.append(s)
            except (OSError, asyncio.TimeoutError, SMTPError, ValueError) as exc:
                idle_err.error(exc)
                s.close()

    t = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(cfg.idle)))
    open_s = time.perf_counter() - t
    await asyncio.sleep(cfg.settle)
    after = server_memory(cfg.server_pid) if cfg.server_pid else None

    held = Stats()
    await serial_fresh(cfg, cfg.serial, message, held)
    still_open = sum(1 for s in idle if s.proto is not None and not s.proto.closed)
    after2 = server_memory(cfg.server_pid) if cfg.server_pid else None
    for s in idle:
        s.close()
    n = len(idle)
    res = {
        "mode": "idle", "idle_requested": cfg.idle, "idle_opened": n,
        "idle_still_open": still_open, "open_s": round(open_s, 2),
        "idle_errors": sum(idle_err.errors.values()), "idle_error_kinds": dict(idle_err.errors),
        "baseline_p50_ms": _ms(pct(warm.lat, 50)), "baseline_p99_ms": _ms(pct(warm.lat, 99)),
        "held_p50_ms": _ms(pct(held.lat, 50)), "held_p99_ms": _ms(pct(held.lat, 99)),
        "held_ok": held.ok,
        "errors": sum(warm.errors.values()) + sum(held.errors.values()),
        "error_kinds": dict(warm.errors + held.errors),
        "error_samples": {**warm.error_samples, **held.error_samples},
        "mem_before": before, "mem_after": after, "mem_after_serial": after2,
    }
    if before and after and n:
        res["rss_kb_per_conn"] = round((after["rss_kb"] - before["rss_kb"]) / n, 2)
        res["pss_kb_per_conn"] = round((after["pss_kb"] - before["pss_kb"]) / n, 2)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", "-c", type=int, default=1)
    p.add_argument("--messages", "-n", type=int, default=0, help="stop after N messages (0: no bound)")
    p.add_argument("--seconds", "-t", type=float, default=0.0, help="stop after T seconds (0: no bound)")
    p.add_argument("--size", type=int, default=1024, help="message size in octets (headers included)")
    p.add_argument("--reuse", action="store_true", help="many messages per connection")
    p.add_argument("--no-rset", dest="rset", action="store_false",
                   help="with --reuse: no RSET between transactions")
    p.add_argument("--pipelining", action="store_true",
                   help="send [RSET] MAIL RCPT DATA in one write if the server offers PIPELINING")
    p.add_argument("--from", dest="sender", default="bench@sender.example")
    p.add_argument("--to", dest="rcpt", default="bench@example.net")
    p.add_argument("--helo", default="bench.client.example")
    p.add_argument("--timeout", type=float, default=30.0, help="per reply")
    p.add_argument("--idle", type=int, default=0, help="idle mode: hold N silent connections")
    p.add_argument("--server-pid", type=int, default=0,
                   help="server process: CPU per message (load mode), memory (idle mode)")
    p.add_argument("--serial", type=int, default=300, help="idle mode: fresh transactions before/while holding")
    p.add_argument("--open-concurrency", type=int, default=200, help="idle mode: parallel connects")
    p.add_argument("--settle", type=float, default=1.0, help="idle mode: seconds before measuring memory")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", action="store_true")
    cfg = p.parse_args(argv)
    if not cfg.idle and not cfg.messages and not cfg.seconds:
        p.error("give --messages and/or --seconds")
    cfg.mail_cmd = f"MAIL FROM:<{cfg.sender}>\r\n".encode()
    cfg.rcpt_cmd = f"RCPT TO:<{cfg.rcpt}>\r\n".encode()
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    cfg.nofile = raise_nofile()
    loop = new_loop(cfg.loop)
    try:
        res = loop.run_until_complete(run_idle(cfg) if cfg.idle else run_load(cfg))
    finally:
        loop.close()
    res["nofile"] = cfg.nofile
    report(res, cfg.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
