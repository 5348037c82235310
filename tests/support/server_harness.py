"""Harness for the server-level tests: real sockets on 127.0.0.1, both loops.

`ServerThread` runs mailfilter.smtp.protocol on its own event loop (asyncio or uvloop:
one suite, two loops, like uvloop's _testbase UVTestCase / AIOTestCase) in a
background thread, listening on an ephemeral port. Tests talk to it with
blocking clients (smtplib, `RawClient`) from the test thread, so a bug that
blocks the server loop shows up as a client timeout, never as a hang of the
test. Every wait is on a real event (a reply, a closed connection, a
threading.Event set by the server) with a bounded timeout; nothing sleeps.

`RecordingProtocol` is SMTPProtocol plus two observation points: every
transport.write() is recorded per connection (to check "pipelined commands are
answered in one write", docs/behaviour/smtp.md#command-lines) and connection_lost sets an event.

`spawn_serve()` starts a real `python -m mailfilter serve` process and waits
until its port accepts (for SIGHUP, --workers and kill -9 tests).

Reverse DNS (the client host name) is off in both unless a test asks for it
(make_state(remote_host=...), spawn_serve("--remote-host", ...)): clients are
`unknown`, and no connection waits on a resolver.
"""
from __future__ import annotations

import asyncio
import errno
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from mailfilter.rules import bundle as bundle_mod
from mailfilter.rules import compiler
from mailfilter.delivery import Delivery
from mailfilter.policy.engine import PolicyEngine, PolicyOptions
from mailfilter.tls import NO_TLS, TLSSettings
from mailfilter.smtp.protocol import Limits, ServerState, SMTPProtocol

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TIMEOUT = 10.0          # every blocking client operation
LOOPS = ("asyncio", "uvloop")

# Client addresses (all of 127/8 is loopback on Linux; the client binds one of
# them so tcp.smtp can give each test its own client profile).
PLAIN = "127.0.0.1"         # default rule: nothing special
RELAY = "127.0.0.2"         # RELAYCLIENT=""
DENIED = "127.0.0.3"        # deny
MAXRCPT = "127.0.0.4"       # MAXRECIPIENTS=2
TARPIT = "127.0.0.5"        # TARPITCOUNT=1 TARPITDELAY=2
MFDNS = "127.0.0.6"         # MFDNSCHECK
HELO_A = "127.0.0.7"        # HELOCHECK=A
HELO_M = "127.0.0.8"        # HELOCHECK=M
CONTENT = "127.0.0.9"       # BADMIMETYPE="" BADLOADERTYPE=M
SMALL = "127.0.0.10"        # DATABYTES=2000
SUFFIX = "127.0.0.11"       # RELAYCLIENT="@fixme"

BASE_RULES = {
    "me": "mx.test\n",
    "rcpthosts": "example.com\n.example.com\nexample.net\n",
    "badmailfrom": "# test rules\nspammer@example.org\n@spam.example.org\n*@*.invalid\n",
    "badrcptto": "# relay probes\n*%*\nnoreply@example.net\n",
    "recipients": "postmaster@example.com\nuser@example.com\nu2@example.com\nu3@example.com\n@example.net\n",
    "databytes": "0\n",
    "timeoutsmtpd": "1200\n",
    "badmimetypes": "TVqQAAMAA\nTVpQAAIAA\n",
    "badloadertypes": "Mi5kb\n",
    "tcp.smtp": (
        f'{RELAY}:allow,RELAYCLIENT=""\n'
        f'{DENIED}:deny\n'
        f'{MAXRCPT}:allow,MAXRECIPIENTS="2"\n'
        f'{TARPIT}:allow,TARPITCOUNT="1",TARPITDELAY="2"\n'
        f'{MFDNS}:allow,MFDNSCHECK=""\n'
        f'{HELO_A}:allow,HELOCHECK="A"\n'
        f'{HELO_M}:allow,HELOCHECK="M"\n'
        f'{CONTENT}:allow,BADMIMETYPE="",BADLOADERTYPE="M"\n'
        f'{SMALL}:allow,DATABYTES="2000"\n'
        f'{SUFFIX}:allow,RELAYCLIENT="@fixme"\n'
        ':allow\n'
    ),
}


def write_rules(path, overrides: dict | None = None, remove=()) -> str:
    """A rules directory with BASE_RULES (+ overrides, - remove) at `path`."""
    os.makedirs(path, exist_ok=True)
    files = dict(BASE_RULES, **(overrides or {}))
    for name in remove:
        files.pop(name, None)
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as fh:
            fh.write(text)
    for name in remove:
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    return str(path)


def policy_for(rules_dir: str, open_relay: bool = False) -> PolicyEngine:
    compiled = compiler.compile_dir(rules_dir)
    assert not compiled.diagnostics, compiled.diagnostics
    return PolicyEngine(bundle_mod.from_compiled(compiled), PolicyOptions(open_relay=open_relay))


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class RecordingProtocol(SMTPProtocol):
    """SMTPProtocol that records its writes and reports connection_lost."""

    __slots__ = ("server", "writes", "conn_id")

    def __init__(self, state, server: "ServerThread", implicit_tls: bool = False):
        super().__init__(state, implicit_tls)
        self.server = server
        self.writes: list[bytes] = []

    def connection_made(self, transport) -> None:
        real_write = transport.write
        writes = self.writes

        class _T:
            # a thin proxy: records every write, forwards everything else
            def __getattr__(_, name):
                return getattr(transport, name)

            def write(_, data):
                writes.append(bytes(data))
                real_write(data)
        super().connection_made(_T())
        self.server.connections.append(self)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.server.lost.put(self)


class ServerThread:
    """mailfilter.smtp.protocol on `kind` loop in a thread, port 0 on 127.0.0.1."""

    def __init__(self, kind: str, state: ServerState, implicit_tls: bool = False):
        self.kind = kind
        self.state = state
        self.loop = new_loop(kind)
        self.connections: list[RecordingProtocol] = []
        self.lost: "queue.Queue[RecordingProtocol]" = queue.Queue()
        self.port = 0
        self.tls_port = 0           # an implicit-TLS listener too (RFC 8314), when asked for
        self._implicit_tls = implicit_tls
        self._server = None
        self._tls_server = None
        self._thread = threading.Thread(target=self._run, name=f"server-{kind}", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(self.loop.create_server(
                lambda: RecordingProtocol(self.state, self), "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            if self._implicit_tls:
                self._tls_server = self.loop.run_until_complete(self.loop.create_server(
                    lambda: RecordingProtocol(self.state, self, implicit_tls=True), "127.0.0.1", 0))
                self.tls_port = self._tls_server.sockets[0].getsockname()[1]
        except BaseException as exc:  # pragma: no cover - reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> "ServerThread":
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "server did not start"
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro, timeout: float = TIMEOUT):
        """Run a coroutine on the server loop, wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_lost(self, n: int = 1, timeout: float = TIMEOUT) -> list:
        """Wait until n more connections were closed on the server side."""
        return [self.lost.get(timeout=timeout) for _ in range(n)]

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            if self._tls_server is not None:
                self._tls_server.close()
            for proto in list(self.state.sessions):
                if proto.transport is not None:
                    proto.transport.close()
            await self._server.wait_closed()
            await self.state.delivery.close()
        try:
            self.call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(TIMEOUT)
            if not self.loop.is_running():
                self.loop.close()
            # break protocol <-> harness cycles: the bundle is then freed by
            # reference counting, not by the cyclic GC (see _core note in the
            # server-tests report: CidrTrie's memoryview in a GC cycle)
            self.connections.clear()
            while not self.lost.empty():
                self.lost.get_nowait()


def make_state(rules_dir: str, deliver: str, *, limits: Limits | None = None,
               resolver=None, open_relay: bool = False, remote_host: str = "off",
               tls: TLSSettings = NO_TLS, auth=None, deny: str = "close",
               pregreet: str = "log", smtputf8: bool = True, anvil=None) -> ServerState:
    """remote_host is "off" unless a test is about host names: the client
    stays `unknown` whatever /etc/resolv.conf or a test resolver would say,
    and no PTR query reaches a test's DNS responder or delays a connection."""
    return ServerState(policy_for(rules_dir, open_relay), Delivery.from_spec(deliver),
                       limits=limits, resolver=resolver, remote_host=remote_host, tls=tls, auth=auth,
                       deny=deny, pregreet=pregreet, smtputf8=smtputf8, anvil=anvil)


def start_server(kind: str, rules_dir: str, maildir: str, *, deliver: str | None = None,
                 implicit_tls: bool = False, **state_kw) -> ServerThread:
    """A started ServerThread on loop `kind` delivering to maildir:`maildir`
    (or `deliver`); `srv.maildir` names the spool for the test's checks;
    `implicit_tls` adds a --listen-tls style listener on `srv.tls_port`."""
    srv = ServerThread(kind, make_state(rules_dir, deliver or f"maildir:{maildir}", **state_kw),
                       implicit_tls=implicit_tls).start()
    srv.maildir = maildir
    return srv


# ----------------------------------------------------------------- clients
class RawClient:
    """A line-level SMTP client on a blocking socket with a timeout."""

    def __init__(self, port: int, source: str = PLAIN, timeout: float = TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, list[str]] | None:
        """One (possibly multi-line) reply as (code, [texts]); None on EOF."""
        texts = []
        while True:
            line = self.line()
            if line is None:
                return None
            text = line.decode()
            texts.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), texts

    def replies(self, n: int) -> list[tuple[int, list[str]]]:
        return [self.reply() for _ in range(n)]

    def cmd(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def at_eof(self) -> bool:
        """True when the server closed the connection (after any pending data)."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def first(r) -> str:
    """`code text` of the last line of a reply."""
    code, texts = r
    return f"{code} {texts[-1]}"


# ----------------------------------------------------------------- maildir
def maildir_files(path, sub: str = "new") -> list[str]:
    d = os.path.join(path, sub)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def read_new(path) -> list[bytes]:
    out = []
    for name in maildir_files(path):
        with open(os.path.join(path, "new", name), "rb") as fh:
            out.append(fh.read())
    return out


# ----------------------------------------------------------------- processes
def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 1024


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno != errno.EADDRINUSE:
                continue  # no IPv6 here: only the IPv4 check counts
            return False
    return True


def free_port() -> int:
    """A port for a server the test starts later (a spawned process cannot be
    handed a bound socket). Taken below the kernel's ephemeral range when
    there is room: a port bind(0) chose is in that range, and between this
    call and the server's bind an outgoing connection (another test, a
    neighbour's load) could be given it as its source port, which makes the
    server's bind to 0.0.0.0 fail with EADDRINUSE."""
    low = _ephemeral_low()
    if low > 2048:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(1024, low)
            if _bindable(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")


class LogReader:
    """Reads a child's stderr in a thread; wait_for(regex) blocks until a line
    matches (bounded), so tests wait on what the server says it did."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[re.Match]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [m for m in (rx.search(line) for line in self.lines) if m]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(
                        f"no {count}x {pattern!r} in server log:\n" + "\n".join(self.lines[-40:]))
                self._cond.wait(left)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class Spawned:
    def __init__(self, proc: subprocess.Popen, port: int, log: LogReader):
        self.proc = proc
        self.port = port
        self.log = log

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        return self.proc.returncode


def run_cli(*args, timeout: float = 30.0, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailfilter", *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env(), cwd=cwd)


def spawn_serve(*args, port: int | None = None, listening: int = 1, cwd=None,
                listen: bool = True, env: dict | None = None) -> Spawned:
    """`python -m mailfilter serve ARGS --listen 127.0.0.1:PORT`; returns once
    `listening` processes logged their listening line (so the port accepts).
    With listen=False the port must come from ARGS (e.g. a --config file);
    `env` adds to the child's environment."""
    port = port or free_port()
    extra = ["--listen", f"127.0.0.1:{port}"] if listen else []
    if not any(a.startswith("--remote-host") for a in args):
        # no reverse DNS through /etc/resolv.conf (it may be unreachable in CI:
        # every connection would wait for its timeout); tests about host
        # names pass --remote-host and --resolver themselves
        extra += ["--remote-host", "off"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailfilter", "serve", *extra, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(child_env(), **(env or {})), cwd=cwd)
    log = LogReader(proc.stderr)
    sp = Spawned(proc, port, log)
    try:
        log.wait_for(rf"listening on 127\.0\.0\.1:{port} \(pid \d+", count=listening, timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.settimeout(TIMEOUT)
            assert s.recv(512).startswith(b"220 ")
    except BaseException:
        sp.stop()
        raise
    return sp
