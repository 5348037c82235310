"""TLS SMTP load generator: STARTTLS or implicit TLS clients in their own processes.

usage:
  python bench/tlsload.py --port P [--tls starttls|implicit|none] [-c 100] [--procs N]
         [-n 20000] [-t 10] [--size 1024] [--handshake-only] [--server-pid PID]
         [--expect-key ecdsa-p256|rsa-2048] [--json]
  python bench/tlsload.py --port P --idle 5000 --server-pid PID [--tls ...] [--json]
  python bench/tlsload.py --port P --probe [--tls ...] [--json]

Throughput mode: a new connection per message, the way a sending MTA
delivers (RFC 3207 §4-§4.2: EHLO again after the handshake, the server
forgets what it knew):
  starttls:  connect, 220, EHLO, STARTTLS, 220, handshake, EHLO, MAIL, RCPT,
             DATA, message, 250, QUIT, 221, close
  implicit:  connect, handshake, 220, EHLO, ... (RFC 8314 §3, port 465 style)
  none:      connect, 220, EHLO, ...  (the same client without TLS, for scale)
Latency is from connect() to the 250 after the message. `--handshake-only`
stops after the handshake (starttls) or the 220 (implicit) with QUIT/221:
handshakes per second, and per second of server CPU (= per core).

`-c` clients are spread over `--procs` worker processes (forked before any
event loop exists; default one per CPU) so the client side is not one
Python thread; they start together on a signal from the parent, which
reads the server's CPU time (utime+stime of the server's process tree,
reaped children included: Postfix's smtpd processes come and go) around the
run. Every run is bounded twice: `--messages` (default 20000) in total and
`--seconds` (default 10); each reply and each handshake by `--timeout`.

TLS on the client side is an ssl.SSLObject over two MemoryBIOs driven by
the protocol (the way mailfilter's server side does it), not
loop.start_tls: asyncio's and uvloop's SSLProtocol allocate a 256 KiB
buffer per connection, which would make the idle test's client heavier
than the servers it measures. The client never verifies the certificate
(opportunistic MX-to-MX TLS, RFC 7435 §4) but records which key type the
server presented (`--expect-key` counts any other as an error), the TLS
version and the cipher.

Idle mode (`--idle N`, bounded by --max-idle): serial warm-up transactions,
server memory (VmRSS, Pss; the process tree, and per process name: Postfix
forks one smtpd per connection), then N connections that complete the
handshake and a post-TLS EHLO (so the server has finished its side of the
handshake) and stay silent, memory again -> KB per connection, then
`--serial` fresh TLS transactions while the N are held. RLIMIT_NOFILE is
raised (the hard limit too when running as root) to what the run needs.

Probe mode (`--probe`): one connection; reports whether the server offers
STARTTLS, and the version, cipher and key type of a handshake. The bench
harness skips a server whose TLS is not there yet, with a note.

Output: a human summary, or one JSON object with --json. Numbers are for
side-by-side comparison in one run, never assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import ssl
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadgen as lg  # noqa: E402
import tlscerts  # noqa: E402

MODES = ("starttls", "implicit", "none")
CRLF = b"\r\n"
MAX_MESSAGES = 1_000_000
MAX_SECONDS = 3600.0
MAX_IDLE = 50_000
_FAILURES = (OSError, asyncio.TimeoutError, lg.SMTPError, ValueError)


def client_context(version: str = "auto") -> ssl.SSLContext:
    """A client context that does not verify (RFC 7435 opportunistic TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version == "1.2":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class TLSClientProtocol(lg.ClientProtocol):
    """loadgen's reply collector with an optional TLS layer (SSLObject + MemoryBIO)."""

    __slots__ = ("sslobj", "inbio", "outbio", "hs_waiter")

    def __init__(self):
        super().__init__()
        self.sslobj: ssl.SSLObject | None = None
        self.inbio = self.outbio = None
        self.hs_waiter: asyncio.Future | None = None

    def start_tls(self, ctx: ssl.SSLContext) -> asyncio.Future:
        """Begin the client handshake; the future is done when it completed."""
        self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        # no SNI: an MTA's client sends none unless configured (Postfix
        # smtp_tls_servername is empty by default)
        self.sslobj = ctx.wrap_bio(self.inbio, self.outbio, server_side=False, server_hostname=None)
        self.hs_waiter = asyncio.get_running_loop().create_future()
        if self.closed:
            self.hs_waiter.set_exception(ConnectionResetError("connection closed by server"))
        else:
            self._handshake()
        return self.hs_waiter

    def _handshake(self) -> bool:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            waiter, self.hs_waiter = self.hs_waiter, None
            if not waiter.done():
                waiter.set_exception(exc)
            return False
        self._flush()
        waiter, self.hs_waiter = self.hs_waiter, None
        if not waiter.done():
            waiter.set_result(None)
        return True

    def _flush(self) -> None:
        out = self.outbio.read()
        if out and self.transport is not None and not self.closed:
            self.transport.write(out)

    def data_received(self, data: bytes):
        if self.sslobj is None:
            return super().data_received(data)
        self.inbio.write(data)
        if self.hs_waiter is not None and not self._handshake():
            return
        plain = []
        while True:
            try:
                chunk = self.sslobj.read(65536)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLError, OSError) as exc:
                self.exc = exc
                self.transport.close()
                break
            if not chunk:        # close_notify
                break
            plain.append(chunk)
        self._flush()            # TLS 1.3 post-handshake messages may need an answer
        if plain:
            super().data_received(b"".join(plain))

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if self.hs_waiter is not None and not self.hs_waiter.done():
            self.hs_waiter.set_exception(ConnectionResetError("connection closed during the handshake"))
            self.hs_waiter = None

    def write(self, data: bytes):
        if self.sslobj is None:
            self.transport.write(data)
        else:
            self.sslobj.write(data)
            self._flush()


class TLSSession:
    """One client connection in one of MODES."""

    def __init__(self, cfg, ctx: ssl.SSLContext):
        self.cfg = cfg
        self.ctx = ctx
        self.proto: TLSClientProtocol | None = None

    async def _reply(self, stage: str, want: int) -> bytes:
        (code, text), = await self.proto.expect(1, self.cfg.timeout)
        if code != want:
            raise lg.SMTPError(stage, code, text.decode("latin-1").strip())
        return text

    async def _handshake(self):
        try:
            await asyncio.wait_for(self.proto.start_tls(self.ctx), self.cfg.timeout)
        except ssl.SSLError as exc:
            raise lg.SMTPError("HANDSHAKE", 0, str(exc)) from exc
        except asyncio.TimeoutError:
            raise lg.SMTPError("HANDSHAKE", 0, "timeout") from None

    def _send(self, line: bytes):
        self.proto.write(line)

    async def open(self, ehlo_after: bool = True) -> None:
        """Connect and get to the point where MAIL may be sent (or, with
        ehlo_after=False, to just after the handshake / the TLS 220)."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        _, self.proto = await asyncio.wait_for(
            loop.create_connection(TLSClientProtocol, cfg.host, cfg.port), cfg.timeout)
        if cfg.tls == "implicit":
            await self._handshake()
        await self._reply("CONNECT", 220)
        if cfg.tls == "starttls":
            self._send(cfg.ehlo_cmd)
            text = await self._reply("EHLO", 250)
            if b"STARTTLS" not in text.upper():
                raise lg.SMTPError("EHLO", 0, "STARTTLS not offered")
            self._send(b"STARTTLS\r\n")
            await self._reply("STARTTLS", 220)
            await self._handshake()
        if ehlo_after:
            self._send(cfg.ehlo_cmd)
            await self._reply("EHLO", 250)

    async def transaction(self, message: bytes) -> None:
        for cmd, stage, want in ((self.cfg.mail_cmd, "MAIL", 250), (self.cfg.rcpt_cmd, "RCPT", 250),
                                 (b"DATA\r\n", "DATA", 354)):
            self._send(cmd)
            await self._reply(stage, want)
        self._send(message)
        (code, text), = await self.proto.expect(1, self.cfg.timeout)
        if code // 100 != 2:
            raise lg.SMTPError("EOM", code, text.decode("latin-1").strip())

    async def quit(self) -> None:
        try:
            if self.proto is not None and not self.proto.closed:
                self._send(b"QUIT\r\n")
                await self._reply("QUIT", 221)
        finally:
            self.close()

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None

    def tls_info(self) -> dict:
        s = self.proto.sslobj if self.proto is not None else None
        if s is None:
            return {"version": "-", "cipher": "-", "peer_key": "none"}
        return {"version": s.version(), "cipher": s.cipher()[0],
                "peer_key": tlscerts.peer_key_kind(s.getpeercert(binary_form=True))}


class Stats(lg.Stats):
    def error(self, exc: BaseException):
        if isinstance(exc, ssl.SSLError):
            key = f"TLS {exc.reason or type(exc).__name__}"
            self.errors[key] += 1
            self.error_samples.setdefault(key, str(exc)[:200])
        else:
            super().error(exc)


# ----------------------------------------------------------------- one worker
async def _worker_async(cfg, concurrency: int, budget_n: int) -> dict:
    ctx = client_context(cfg.tls_version)
    message = lg.make_message(cfg.size, cfg.sender, cfg.rcpt)
    stats = Stats()
    sample: dict = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.seconds
    budget = [budget_n]
    clock = time.perf_counter

    async def one():
        s = TLSSession(cfg, ctx)
        t = clock()
        try:
            await s.open(ehlo_after=not cfg.handshake_only)
            if not sample:      # one per worker: parsing the certificate costs
                sample.update(s.tls_info())
            if cfg.handshake_only:
                await s.quit()
                stats.lat.append(clock() - t)
            else:
                await s.transaction(message)
                stats.lat.append(clock() - t)
                await s.quit()
            stats.ok += 1
        except _FAILURES as exc:
            stats.error(exc)
            s.close()

    async def client():
        while loop.time() < deadline and budget[0] > 0:
            budget[0] -= 1
            await one()

    cpu0 = time.process_time()
    t0 = clock()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = clock() - t0
    return {"ok": stats.ok, "lat": stats.lat, "errors": dict(stats.errors),
            "error_samples": stats.error_samples, "elapsed": elapsed,
            "cpu": time.process_time() - cpu0, "sample": sample}


def _worker_main(cfg, concurrency, budget_n, go, conn) -> None:
    try:
        loop = lg.new_loop(cfg.loop)
        conn.send(("ready", os.getpid()))
        if not go.wait(cfg.seconds + 120):
            conn.send(("error", "no go signal"))
            return
        res = loop.run_until_complete(_worker_async(cfg, concurrency, budget_n))
        loop.close()
        conn.send(("result", res))
    except BaseException as exc:   # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _split(total: int, parts: int) -> list[int]:
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def run_load(cfg) -> dict:
    procs = max(1, min(cfg.procs, cfg.concurrency))
    mp = multiprocessing.get_context("fork")
    go = mp.Event()
    workers = []
    for c_i, n_i in zip(_split(cfg.concurrency, procs), _split(cfg.messages, procs)):
        rd, wr = mp.Pipe(duplex=False)
        p = mp.Process(target=_worker_main, args=(cfg, c_i, n_i, go, wr), daemon=True)
        p.start()
        wr.close()
        workers.append((p, rd))
    failures = []
    for p, rd in workers:
        if not rd.poll(60):
            failures.append("worker not ready")
            continue
        kind, val = rd.recv()
        if kind != "ready":
            failures.append(val)
    cpu0 = lg.server_cpu(cfg.server_pid) if cfg.server_pid else None
    t0 = time.perf_counter()
    go.set()
    results = []
    limit = t0 + cfg.seconds + 2 * cfg.timeout + 30
    for p, rd in workers:
        try:
            if rd.poll(max(0.0, limit - time.perf_counter())):
                kind, val = rd.recv()
                (results if kind == "result" else failures).append(val)
            else:
                failures.append("worker timed out")
        except EOFError:
            failures.append("worker died")
    elapsed = time.perf_counter() - t0
    cpu = lg.server_cpu(cfg.server_pid) - cpu0 if cfg.server_pid else None
    for p, rd in workers:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
        rd.close()
    return aggregate(cfg, results, failures, elapsed, cpu, procs)


def aggregate(cfg, results, failures, elapsed, cpu, procs) -> dict:
    ok = sum(r["ok"] for r in results)
    lat = [x for r in results for x in r["lat"]]
    errors: collections.Counter = collections.Counter()
    samples: dict = {}
    for r in results:
        errors.update(r["errors"])
        for k, v in r["error_samples"].items():
            samples.setdefault(k, v)
    for f in failures:
        errors[f"worker: {f}"[:80]] += 1
    tls_seen = collections.Counter()
    for r in results:
        s = r["sample"]
        if s:
            tls_seen[f"{s['version']}/{s['cipher']}/{s['peer_key']}"] += 1
            if cfg.expect_key and cfg.tls != "none" and s["peer_key"] != cfg.expect_key:
                errors[f"TLS wrong key {s['peer_key']}"] += 1
    client_cpu = sum(r["cpu"] for r in results)
    unit = "handshake" if cfg.handshake_only else "message"
    res = {
        "mode": "handshake" if cfg.handshake_only else "load", "tls": cfg.tls,
        "concurrency": cfg.concurrency, "procs": procs, "size": cfg.size,
        "messages": ok, "unit": unit, "elapsed_s": round(elapsed, 4),
        "msgs_per_s": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": lg._ms(lg.pct(lat, 50)), "p99_ms": lg._ms(lg.pct(lat, 99)),
        "errors": sum(errors.values()), "error_kinds": dict(errors), "error_samples": samples,
        "tls_seen": dict(tls_seen),
        # CPU seconds per second of wall time (1.0 = one core busy)
        "loadgen_cpu": round(client_cpu / elapsed, 2) if elapsed > 0 else None,
        "server_cpu": round(cpu / elapsed, 2) if cpu is not None and elapsed > 0 else None,
        "server_us_per_msg": round(cpu / ok * 1e6, 1) if cpu is not None and ok else None,
    }
    if cfg.handshake_only and cpu:
        # handshakes per second of server CPU: per core, whatever the host's
        # other load did to the wall clock
        res["per_core_s"] = round(ok / cpu, 1)
    return res


# ----------------------------------------------------------------- idle mode
async def _fresh(cfg, ctx, message, stats) -> None:
    s = TLSSession(cfg, ctx)
    t = time.perf_counter()
    try:
        await s.open()
        await s.transaction(message)
        stats.lat.append(time.perf_counter() - t)
        stats.ok += 1
        await s.quit()
    except _FAILURES as exc:
        stats.error(exc)
        s.close()


async def run_idle(cfg) -> dict:
    ctx = client_context(cfg.tls_version)
    message = lg.make_message(cfg.size, cfg.sender, cfg.rcpt)
    warm = Stats()
    for _ in range(cfg.serial):
        await _fresh(cfg, ctx, message, warm)
    await asyncio.sleep(0.5)
    before = lg.server_memory(cfg.server_pid, by_name=True) if cfg.server_pid else None

    idle: list[TLSSession] = []
    idle_err = Stats()
    sem = asyncio.Semaphore(cfg.open_concurrency)
    sample: dict = {}

    async def open_one():
        async with sem:
            s = TLSSession(cfg, ctx)
            try:
                await s.open()          # handshake done on both sides: the server answered EHLO in TLS
                idle.append(s)
                if not sample:
                    sample.update(s.tls_info())
            except _FAILURES as exc:
                idle_err.error(exc)
                s.close()

    t = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(cfg.idle)))
    open_s = time.perf_counter() - t
    await asyncio.sleep(cfg.settle)
    after = lg.server_memory(cfg.server_pid, by_name=True) if cfg.server_pid else None
    held = Stats()
    for _ in range(cfg.serial):
        await _fresh(cfg, ctx, message, held)
    still_open = sum(1 for s in idle if s.proto is not None and not s.proto.closed)
    for s in idle:
        s.close()
    await asyncio.sleep(0.1)
    n = len(idle)
    errors = warm.errors + held.errors
    if cfg.expect_key and sample and sample.get("peer_key") != cfg.expect_key:
        errors[f"TLS wrong key {sample.get('peer_key')}"] += 1
    res = {
        "mode": "idle", "tls": cfg.tls, "idle_requested": cfg.idle, "idle_opened": n,
        "idle_still_open": still_open, "open_s": round(open_s, 2),
        "idle_errors": sum(idle_err.errors.values()), "idle_error_kinds": dict(idle_err.errors),
        "idle_error_samples": idle_err.error_samples,
        "baseline_p50_ms": lg._ms(lg.pct(warm.lat, 50)), "baseline_p99_ms": lg._ms(lg.pct(warm.lat, 99)),
        "held_p50_ms": lg._ms(lg.pct(held.lat, 50)), "held_p99_ms": lg._ms(lg.pct(held.lat, 99)),
        "held_ok": held.ok, "errors": sum(errors.values()), "error_kinds": dict(errors),
        "error_samples": {**warm.error_samples, **held.error_samples},
        "tls_seen": {f"{sample['version']}/{sample['cipher']}/{sample['peer_key']}": 1} if sample else {},
        "mem_before": before, "mem_after": after,
    }
    if before and after and n:
        res["rss_kb_per_conn"] = round((after["rss_kb"] - before["rss_kb"]) / n, 2)
        res["pss_kb_per_conn"] = round((after["pss_kb"] - before["pss_kb"]) / n, 2)
        if cfg.per_process:
            # a forking server (Postfix: one smtpd per connection): the
            # memory of one such process is the cost of a connection
            p = (after.get("by_name") or {}).get(cfg.per_process)
            if p and p["n"]:
                res["per_process"] = {"name": cfg.per_process, "n": p["n"],
                                      "rss_kb": round(p["rss_kb"] / p["n"], 1),
                                      "pss_kb": round(p["pss_kb"] / p["n"], 1)}
    return res


# ----------------------------------------------------------------- probe mode
async def probe(cfg) -> dict:
    """Does the server do TLS in `cfg.tls` mode? One connection, no message."""
    ctx = client_context(cfg.tls_version)
    s = TLSSession(cfg, ctx)
    try:
        await s.open()
        info = s.tls_info()
        await s.quit()
        return {"mode": "probe", "tls": cfg.tls, "ok": True, **info, "note": ""}
    except _FAILURES as exc:
        s.close()
        note = str(exc)[:200] or type(exc).__name__
        return {"mode": "probe", "tls": cfg.tls, "ok": False, "note": note,
                "starttls_offered": "STARTTLS not offered" not in note}


# ----------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", choices=MODES, default="starttls")
    p.add_argument("--tls-version", choices=("auto", "1.2", "1.3"), default="auto")
    p.add_argument("--concurrency", "-c", type=int, default=100)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                   help="client worker processes the clients are spread over")
    p.add_argument("--messages", "-n", type=int, default=20000, help="at most N messages in all")
    p.add_argument("--seconds", "-t", type=float, default=10.0, help="at most T seconds")
    p.add_argument("--size", type=int, default=1024, help="message size in octets (headers included)")
    p.add_argument("--handshake-only", action="store_true",
                   help="connect, handshake, QUIT: handshakes per second")
    p.add_argument("--from", dest="sender", default="bench@sender.example")
    p.add_argument("--to", dest="rcpt", default="bench@example.net")
    p.add_argument("--helo", default="bench.client.example")
    p.add_argument("--timeout", type=float, default=30.0, help="per reply and per handshake")
    p.add_argument("--expect-key", default="", help="e.g. ecdsa-p256: any other server key is an error")
    p.add_argument("--server-pid", type=int, default=0,
                   help="server process: CPU per message (load), memory (idle)")
    p.add_argument("--idle", type=int, default=0, help="idle mode: hold N TLS connections")
    p.add_argument("--max-idle", type=int, default=MAX_IDLE)
    p.add_argument("--per-process", default="",
                   help="idle mode: also report the mean memory of the server's processes of this name")
    p.add_argument("--serial", type=int, default=100, help="idle mode: fresh transactions before/while holding")
    p.add_argument("--open-concurrency", type=int, default=100, help="idle mode: handshakes in parallel")
    p.add_argument("--settle", type=float, default=1.0, help="idle mode: seconds before measuring memory")
    p.add_argument("--probe", action="store_true")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", action="store_true")
    cfg = p.parse_args(argv)
    if not 0 < cfg.messages <= MAX_MESSAGES:
        p.error(f"--messages must be 1..{MAX_MESSAGES}")
    if not 0 < cfg.seconds <= MAX_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if cfg.concurrency < 1 or cfg.procs < 1:
        p.error("--concurrency and --procs must be >= 1")
    if not 0 <= cfg.idle <= cfg.max_idle:
        p.error(f"--idle must be 0..{cfg.max_idle} (--max-idle)")
    cfg.ehlo_cmd = f"EHLO {cfg.helo}\r\n".encode()
    cfg.mail_cmd = f"MAIL FROM:<{cfg.sender}>\r\n".encode()
    cfg.rcpt_cmd = f"RCPT TO:<{cfg.rcpt}>\r\n".encode()
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    cfg.nofile = lg.raise_nofile(max(cfg.idle, cfg.concurrency) + 256)
    if cfg.probe or cfg.idle:
        loop = lg.new_loop(cfg.loop)
        try:
            res = loop.run_until_complete(probe(cfg) if cfg.probe else run_idle(cfg))
        finally:
            loop.close()
    else:
        res = run_load(cfg)
    res["nofile"] = cfg.nofile
    lg.report(res, cfg.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
