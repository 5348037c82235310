"""Start/stop the SMTP servers under test, each in its own process on 127.0.0.1.

Servers (name -> what runs):
- mf-uvloop:   mailfilter serve --loop uvloop --deliver discard, full rule checks
               on the NON-relay path (rules from `norelay_rules()`, below)
               (every mf-* server runs with --remote-host off: no reverse DNS
               per connection, as aiosmtpd and smtp-sink do none)
- mf-maildir:  same rules, uvloop, --deliver maildir:<tempdir> (durable: fsync,
               group commit)
- mf-asyncio:  same as mf-uvloop with --loop asyncio
- mf-relay:    mailfilter, uvloop, discard, the default rules/ (127.0.0.1 is a
               RELAYCLIENT there, so most per-recipient checks are skipped)
- aiosmtpd:    aiosmtpd.smtp.SMTP + uvloop, handle_DATA returns "250 OK"
               (discard sink; `python bench/servers.py aiosmtpd-sink PORT`)
- smtp-sink:   Postfix /usr/sbin/smtp-sink (C, discards), when installed
- uvloop-floor: canned replies in protocol order over uvloop (no parsing,
               policy or storage): what the loop, the kernel and one Python
               callback per read cost; the floor for any Python+uvloop server

A port is picked by binding 127.0.0.1:0 and releasing it just before the
server starts (the tiny race is acceptable for a bench). Every server gets
RLIMIT_NOFILE raised to its hard limit (preexec) and a connection cap above
the idle test's 9000 connections.

`norelay_rules()` copies rules/ and replaces tcp.smtp so that 127.0.0.1 is an
ordinary (non-relay) client with HELOCHECK=".", MAXRECIPIENTS, TARPITCOUNT
(never reached: 1 recipient), BADMIMETYPE="" and BADLOADERTYPE="M": every
message then goes through badhelo, badmailfrom, badrcptto, rcpthosts,
recipients (example.net is a catch-all there) and the base64 content scanner.
The load uses HELO bench.client.example, MAIL FROM bench@sender.example,
RCPT TO bench@example.net, which all pass.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"

NORELAY_TCP_SMTP = """\
# bench: 127.0.0.1 is NOT a relay client; full spamcontrol checks on every message
127.0.0.1:allow,HELOCHECK=".",TARPITCOUNT="10",TARPITDELAY="2",MAXRECIPIENTS="100",BADMIMETYPE="",BADLOADERTYPE="M"
::1:allow,HELOCHECK=".",TARPITCOUNT="10",TARPITDELAY="2",MAXRECIPIENTS="100",BADMIMETYPE="",BADLOADERTYPE="M"
192.0.2.0/24:deny
2001:db8:bad::/48:deny
:allow,HELOCHECK=".",TARPITCOUNT="10",TARPITDELAY="2",MAXRECIPIENTS="100",BADMIMETYPE="",BADLOADERTYPE="M"
"""

AIOSMTPD_SINK = r'''
import asyncio, resource, sys
import uvloop
from aiosmtpd.smtp import SMTP

class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

async def main(port):
    loop = asyncio.get_running_loop()
    handler = Sink()
    srv = await loop.create_server(lambda: SMTP(handler, hostname="sink.test"),
                                   "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main(int(sys.argv[-1])))
'''


# The floor of any SMTP server written on Python + uvloop: canned replies in
# protocol order, one bytes.split per read; no command parsing, no policy, no
# message handling, nothing stored. Not a server (it trusts the client to
# follow the script): a measuring stick for what the event loop, the kernel
# and one Python callback per read cost per message.
UVLOOP_FLOOR = r"""
import asyncio, sys
import uvloop

EHLO = b"250-floor.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"

class Floor(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        self.data = False
        t.write(b"220 floor.test ESMTP\r\n")

    def data_received(self, b):
        if self.data:
            if b.endswith(b"\r\n.\r\n"):
                self.data = False
                self.t.write(b"250 ok\r\n")
            return
        out = []
        for line in b.split(b"\r\n")[:-1]:
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(EHLO)
            elif verb == b"DATA":
                out.append(b"354 go ahead\r\n")
                self.data = True
            elif verb == b"QUIT":
                out.append(b"221 bye\r\n")
                self.t.write(b"".join(out))
                self.t.close()
                return
            else:
                out.append(b"250 ok\r\n")
        self.t.write(b"".join(out))

async def main(port):
    loop = asyncio.get_running_loop()
    await loop.create_server(Floor, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()

uvloop.run(main(int(sys.argv[-1])))
"""


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until the server answers with a 220 greeting."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not ready after {timeout}s")


def norelay_rules(dest: str) -> str:
    """rules/ with a tcp.smtp in which 127.0.0.1 is not a relay client."""
    rules = os.path.join(dest, "rules-norelay")
    if os.path.exists(rules):
        shutil.rmtree(rules)
    shutil.copytree(os.path.join(ROOT, "rules"), rules)
    with open(os.path.join(rules, "tcp.smtp"), "w") as fh:
        fh.write(NORELAY_TCP_SMTP)
    return rules


class Server:
    def __init__(self, name: str, argv: list[str], port: int, tmp: str | None = None,
                 note: str = ""):
        self.name = name
        self.argv = argv
        self.port = port
        self.tmp = tmp
        self.note = note
        self.proc: subprocess.Popen | None = None
        self.log = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "Server":
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, preexec_fn=_raise_nofile)
        try:
            wait_port(self.port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.output()[-2000:]}")
        return self

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _mailfilter(name: str, rules: str, deliver: str, loop: str, tmp=None, note="") -> Server:
    port = free_port()
    argv = [PY, "-m", "mailfilter", "serve", "--rules", rules,
            "--listen", f"127.0.0.1:{port}", "--deliver", deliver,
            "--log-level", "warning", "--loop", loop,
            "--max-connections", "20000", "--max-per-ip", "20000",
            "--remote-host", "off"]      # no reverse DNS: aiosmtpd and smtp-sink do none either
    return Server(name, argv, port, tmp=tmp, note=note)


def make(name: str, workdir: str) -> Server:
    """Build (not start) the server called `name`."""
    if name in ("mf-uvloop", "mf-asyncio", "mf-maildir"):
        rules = norelay_rules(workdir)
        if name == "mf-maildir":
            tmp = tempfile.mkdtemp(prefix="mf-maildir-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
            return _mailfilter(name, rules, f"maildir:{tmp}/Maildir", "uvloop", tmp=tmp,
                               note="uvloop, maildir with fsync (group commit), full rule checks, "
                                    "no reverse DNS (--remote-host off)")
        loop = "asyncio" if name == "mf-asyncio" else "uvloop"
        return _mailfilter(name, rules, "discard", loop,
                           note=f"{loop}, discard, full rule checks (non-relay), "
                                "no reverse DNS (--remote-host off)")
    if name == "mf-relay":
        return _mailfilter(name, os.path.join(ROOT, "rules"), "discard", "uvloop",
                           note="uvloop, discard, default rules/ (127.0.0.1 = RELAYCLIENT), "
                                "no reverse DNS (--remote-host off)")
    if name == "aiosmtpd":
        port = free_port()
        return Server(name, [PY, os.path.abspath(__file__), "aiosmtpd-sink", str(port)], port,
                      note="aiosmtpd + uvloop, handle_DATA -> 250 OK")
    if name == "uvloop-floor":
        port = free_port()
        return Server(name, [PY, os.path.abspath(__file__), "uvloop-floor", str(port)], port,
                      note="Python + uvloop floor: canned replies, no parsing/policy/storage")
    if name == "smtp-sink":
        port = free_port()
        # -u: run as (we are root); -m: max simultaneous connections (default 256,
        # excess ones wait in the kernel queue); -t: per-command timeout; backlog 4096
        argv = [SMTP_SINK, "-u", "nobody", "-m", "15000", "-t", "600", f"127.0.0.1:{port}", "4096"]
        return Server(name, argv, port, note="Postfix smtp-sink (C), discards")
    raise ValueError(f"unknown server {name!r}")


def available(names: list[str]) -> list[str]:
    out = []
    for n in names:
        if n == "smtp-sink" and not os.access(SMTP_SINK, os.X_OK):
            continue
        if n == "aiosmtpd":
            try:
                import aiosmtpd  # noqa: F401
            except ImportError:
                continue
        out.append(n)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "aiosmtpd-sink":
        _raise_nofile()
        exec(compile(AIOSMTPD_SINK, "aiosmtpd_sink", "exec"), {"__name__": "aiosmtpd_sink"})
    elif len(sys.argv) == 3 and sys.argv[1] == "uvloop-floor":
        _raise_nofile()
        exec(compile(UVLOOP_FLOOR, "uvloop_floor", "exec"), {"__name__": "uvloop_floor"})
    elif len(sys.argv) == 2:
        # manual: python bench/servers.py NAME -> start it and wait for ^C
        work = tempfile.mkdtemp(prefix="bench-")
        s = make(sys.argv[1], work).start()
        print(f"{s.name} pid {s.pid} on 127.0.0.1:{s.port}", flush=True)
        try:
            s.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            s.stop()
            shutil.rmtree(work, ignore_errors=True)
    else:
        print("usage: servers.py NAME | aiosmtpd-sink PORT", file=sys.stderr)
        sys.exit(2)
