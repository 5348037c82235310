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
- mf-syslog:   mf-uvloop with the decision log to syslog instead of a file:
               `--syslog --syslog-socket PATH`, PATH a unix datagram socket
               read by a companion process (`servers.py syslog-sink PATH`,
               counts the datagrams: what /dev/log's reader would do cheaply)
- mf-confirmed: mf-uvloop with `--remote-host confirmed` (the default: PTR,
               then A/AAAA of the name must give the address back) against a
               companion DNS responder on 127.0.0.1 (`servers.py dns PORT`,
               tests/support/dns_responder.py: 127.0.0.1 -> bench.client.example
               -> 127.0.0.1), `--resolver 127.0.0.1:PORT`
- postfix:     a throwaway Postfix (as postfix-tls below, without TLS): smtpd
               -> cleanup -> a queue ON DISK (BENCH_QUEUE_DIR, default /var/tmp:
               durable, as mf-maildir is) -> qmgr -> the discard transport;
               no reverse DNS. The durable peer of mf-maildir.
- aiosmtpd:    aiosmtpd.smtp.SMTP + uvloop, handle_DATA returns "250 OK"
               (discard sink; `python bench/servers.py aiosmtpd-sink PORT`)
- smtp-sink:   Postfix /usr/sbin/smtp-sink (C, discards), when installed
- uvloop-floor: canned replies in protocol order over uvloop (no parsing,
               policy or storage): what the loop, the kernel and one Python
               callback per read cost; the floor for any Python+uvloop server

TLS servers (`make_tls(name, workdir, pair)`, pair from tlscerts.make_pair;
every one gets the same certificate and key and two ports: `port` offers
STARTTLS (RFC 3207), `tls_port` is implicit TLS (RFC 8314, 465 style)):
- mf-tls:      mailfilter as an operator starts it: uvloop, one worker,
               discard, the non-relay rules, `--tls-cert/--tls-key`,
               `--listen-tls`. Until mailfilter has these options (issue 12)
               it does not start; the TLS harness then skips it with a note.
- aiosmtpd-tls: aiosmtpd + uvloop, `tls_context=` (STARTTLS, which aiosmtpd
               runs over asyncio's pure-Python SSLProtocol even on uvloop),
               `require_starttls=False`; implicit TLS through uvloop's
               create_server(ssl=); handle_DATA -> "250 OK"
- postfix-tls: a throwaway Postfix instance (its own config, queue and data
               directories, `master -d` in its own session; root only):
               smtpd with `smtpd_tls_chain_files`, `smtpd_tls_security_level
               = may`, a second smtpd with `smtpd_tls_wrappermode = yes`;
               accepted mail goes through cleanup and qmgr to the discard
               transport; the queue is on tmpfs when BENCH_DIR is (default
               /dev/shm), no reverse DNS (`smtpd_peername_lookup = no`), no
               inflow throttle, no per-client connection limit

A port is picked by binding 127.0.0.1:0 and releasing it just before the
server starts (the tiny race is acceptable for a bench). Every server gets
RLIMIT_NOFILE raised to its hard limit (preexec; as root to NOFILE_ROOT,
the hard limit included) and a connection cap above the idle tests' 10000
connections.

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
sys.path.insert(0, HERE)
import tlscerts  # noqa: E402

ROOT = os.path.dirname(HERE)
PY = sys.executable
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
TLS_SERVERS = ("mf-tls", "postfix-tls", "aiosmtpd-tls")
MF_SERVERS = ("mf-uvloop", "mf-asyncio", "mf-maildir", "mf-relay", "mf-syslog", "mf-confirmed")

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


# aiosmtpd with TLS: STARTTLS on one port, implicit TLS on the other, the
# same context (the bench's certificate) for both.
AIOSMTPD_TLS_SINK = r'''
import asyncio, ssl, sys
import uvloop
from aiosmtpd.smtp import SMTP

class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

async def main(port, tls_port, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    handler = Sink()
    await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test", tls_context=ctx, require_starttls=False),
        "127.0.0.1", port, backlog=4096)
    await loop.create_server(lambda: SMTP(handler, hostname="sink.test"),
                             "127.0.0.1", tls_port, backlog=4096, ssl=ctx)
    await asyncio.Event().wait()

port, tls_port, cert, key = sys.argv[-4:]
uvloop.run(main(int(port), int(tls_port), cert, key))
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


NOFILE_ROOT = 65536     # as root the hard limit may go up too: room for the idle tests' connections


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard < NOFILE_ROOT:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_ROOT, NOFILE_ROOT))
            return
        except (ValueError, OSError):
            pass
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


def wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections on the port (a TLS port
    says nothing before the handshake)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


class Server:
    def __init__(self, name: str, argv: list[str], port: int, tmp: str | None = None,
                 note: str = "", tls_port: int | None = None, kind: str = "",
                 prepare=None, new_session: bool = False, per_process: str = "",
                 log_file: str | None = None, companions: list[list[str]] | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.tmp = tmp
        self.note = note
        self.tls_port = tls_port        # implicit TLS listener, if any
        self.kind = kind                # certificate kind (tlscerts.KINDS), TLS servers only
        self.prepare = prepare          # called before the process starts (Postfix: `postfix check`)
        self.new_session = new_session  # own session: Postfix's master signals its process group
        self.per_process = per_process  # the process name that holds one connection (Postfix: smtpd)
        self.log_file = log_file        # where the server logs besides stdout/stderr
        self.companions = companions or []  # argv of helper processes started first (DNS, syslog)
        self.helpers: list[subprocess.Popen] = []
        self.proc: subprocess.Popen | None = None
        self.log = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "Server":
        self.log = tempfile.TemporaryFile()
        try:
            if self.prepare is not None:
                self.prepare()
            for argv in self.companions:
                helper = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log,
                                          stdin=subprocess.DEVNULL)
                self.helpers.append(helper)
                # each companion prints one line once it is ready
                if not helper.stdout.readline():
                    raise RuntimeError(f"companion {argv} did not start")
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=self.log, stderr=self.log,
                                         stdin=subprocess.DEVNULL, preexec_fn=_raise_nofile,
                                         start_new_session=self.new_session)
            wait_port(self.port, self.proc)
            if self.tls_port:
                wait_tcp(self.tls_port, self.proc)
        except Exception as exc:
            out = self.output()
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}: {out[-2000:]}")
        return self

    def output(self) -> str:
        text = ""
        if self.log is not None:
            self.log.seek(0)
            text = self.log.read().decode("utf-8", "replace")
        if self.log_file and os.path.exists(self.log_file):
            with open(self.log_file, "rb") as fh:
                text += fh.read()[-20000:].decode("utf-8", "replace")
        return text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.new_session:
            # the server's own process group (its id is the pid we started):
            # children a dead master left behind
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for helper in self.helpers:
            if helper.poll() is None:
                helper.terminate()
                try:
                    helper.wait(10)
                except subprocess.TimeoutExpired:
                    helper.kill()
                    helper.wait()
        self.helpers = []
        if self.tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _mailfilter(name: str, rules: str, deliver: str, loop: str, tmp=None, note="",
                remote_host: str = "off", extra: tuple = (), companions=None) -> Server:
    port = free_port()
    argv = [PY, "-m", "mailfilter", "serve", "--rules", rules,
            "--listen", f"127.0.0.1:{port}", "--deliver", deliver,
            "--loop", loop,     # decision log on (the default): the shipped configuration
            # --max-connections: serve's default, fitted to the open-file limit
            # (a given value that does not fit is a start-up error)
            "--max-per-ip", "20000",
            # off unless stated: no reverse DNS, as aiosmtpd and smtp-sink do none
            "--remote-host", remote_host, *extra]
    return Server(name, argv, port, tmp=tmp, note=note, companions=companions)


# the companion DNS responder's zone: the bench client's address and name
# confirm each other (docs/behaviour/tcp-smtp.md: TCPREMOTEHOST)
BENCH_DNS = {("1.0.0.127.in-addr.arpa", "PTR"): ["bench.client.example."],
             ("bench.client.example", "A"): ["127.0.0.1"],
             ("bench.client.example", "AAAA"): [],
             ("bench.client.example", "MX"): ["10 bench.client.example."],
             ("sender.example", "MX"): ["10 mx.sender.example."],
             ("sender.example", "A"): ["192.0.2.25"],
             ("mx.sender.example", "A"): ["192.0.2.25"]}


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
    if name == "mf-syslog":
        tmp = tempfile.mkdtemp(prefix="mf-syslog-")
        sock = os.path.join(tmp, "log.sock")
        return _mailfilter(name, norelay_rules(workdir), "discard", "uvloop", tmp=tmp,
                           extra=("--syslog", "--syslog-socket", sock),
                           companions=[[PY, os.path.abspath(__file__), "syslog-sink", sock]],
                           note="as mf-uvloop, the decision log to syslog (a unix datagram socket "
                                "read by a counting process) instead of a file")
    if name == "mf-confirmed":
        dns_port = free_port()
        return _mailfilter(name, norelay_rules(workdir), "discard", "uvloop",
                           remote_host="confirmed",
                           extra=("--resolver", f"127.0.0.1:{dns_port}"),
                           companions=[[PY, os.path.abspath(__file__), "dns", str(dns_port)]],
                           note="as mf-uvloop with --remote-host confirmed (PTR + A per client, "
                                "cached by TTL) against a local DNS responder")
    if name == "postfix":
        return _postfix(name, None, 15000)
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


def postfix_usable() -> bool:
    """A throwaway Postfix instance needs the package and root (master runs
    as root and drops to the postfix user per service)."""
    if not (os.access(POSTFIX_MASTER, os.X_OK) and os.access(POSTFIX, os.X_OK)) or os.geteuid() != 0:
        return False
    try:
        import pwd
        pwd.getpwnam("postfix")
    except KeyError:
        return False
    return True


def available(names: list[str]) -> list[str]:
    out = []
    for n in names:
        if n == "smtp-sink" and not os.access(SMTP_SINK, os.X_OK):
            continue
        if n in ("postfix", "postfix-tls") and not postfix_usable():
            continue
        if n in ("aiosmtpd", "aiosmtpd-tls"):
            try:
                import aiosmtpd  # noqa: F401
            except ImportError:
                continue
        out.append(n)
    return out


def mailfilter_has_tls() -> bool:
    """Does this mailfilter have the serve options of issue 12 (--tls-cert,
    --listen-tls)? Before it does, the TLS harness skips mailfilter."""
    out = subprocess.run([PY, "-m", "mailfilter", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    return "--tls-cert" in out.stdout and "--listen-tls" in out.stdout


# ----------------------------------------------------------------- TLS servers
def bench_dir() -> str:
    """Where throwaway server state goes: BENCH_DIR, else tmpfs (/dev/shm)
    so that Postfix's queue files cost no disk I/O (mailfilter discards)."""
    d = os.environ.get("BENCH_DIR")
    if d:
        return d
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/var/tmp"


POSTFIX_MAIN_CF = """\
# throwaway bench instance (bench/servers.py); nothing here is a recommendation
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.net
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard:bench
relay_transport = discard:bench
# as mailfilter --remote-host off: no reverse DNS per connection
smtpd_peername_lookup = no
# the bench client is one address with 100 connections; Postfix's default
# is 50 per client (127.0.0.1 is in mynetworks and exempt, said explicitly)
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
# no pause before accepting a message when the queue is busy
in_flow_delay = 0
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 0
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
"""

# smtpd's process limit (7th column) bounds the connections Postfix serves at
# once: one smtpd process per connection.
POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - {maxproc} smtpd
127.0.0.1:{tls_port} inet n - n - {maxproc} smtpd -o smtpd_tls_wrappermode=yes
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def _postfix(name: str, pair: "tlscerts.CertPair | None", maxproc: int) -> Server:
    """postfix-tls with `pair`; without one, `postfix`: no TLS, the queue on
    disk (BENCH_QUEUE_DIR, default /var/tmp), as durable as mf-maildir."""
    port = free_port()
    tls_port = free_port() if pair is not None else None
    where = bench_dir() if pair is not None else os.environ.get("BENCH_QUEUE_DIR", "/var/tmp")
    d = tempfile.mkdtemp(prefix="bench-postfix-", dir=where)
    os.chmod(d, 0o755)       # the postfix user reaches queue/ and data/ through it
    etc = os.path.join(d, "etc")

    def prepare():
        os.makedirs(etc)
        os.makedirs(os.path.join(d, "queue"))
        os.makedirs(os.path.join(d, "data"))
        import pwd
        os.chown(os.path.join(d, "data"), pwd.getpwnam("postfix").pw_uid, -1)
        main_cf = POSTFIX_MAIN_CF.format(d=d, key=pair.key if pair else "", cert=pair.cert if pair else "")
        master_cf = POSTFIX_MASTER_CF.format(port=port, tls_port=tls_port, maxproc=maxproc)
        if pair is None:        # no TLS: neither the certificate lines nor the wrapper-mode listener
            main_cf = "\n".join(l for l in main_cf.splitlines() if not l.startswith("smtpd_tls_")) + "\n"
            master_cf = "\n".join(l for l in master_cf.splitlines()
                                   if "smtpd_tls_wrappermode" not in l and not l.startswith("tlsmgr")) + "\n"
        with open(os.path.join(etc, "main.cf"), "w") as fh:
            fh.write(main_cf)
        with open(os.path.join(etc, "master.cf"), "w") as fh:
            fh.write(master_cf)
        # creates the queue's subdirectories with their owners and modes
        out = subprocess.run([POSTFIX, "-c", etc, "check"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"postfix check: {out.stdout}{out.stderr}")

    # -d: stay in the foreground (our child); -s: keep stdout/stderr
    argv = [POSTFIX_MASTER, "-c", etc, "-d", "-s"]
    return Server(name, argv, port, tmp=d, tls_port=tls_port, kind=pair.kind if pair else "",
                  prepare=prepare, new_session=True, per_process="smtpd",
                  log_file=os.path.join(d, "maillog"), note=TLS_NOTES[name])


TLS_NOTES = {
    "mf-tls": "mailfilter, uvloop, 1 worker, discard, full rule checks (non-relay), decision log on "
              "(to a file), no reverse DNS, "
              "--tls-cert/--tls-key/--listen-tls",
    "aiosmtpd-tls": "aiosmtpd + uvloop with TLS (STARTTLS over asyncio's SSLProtocol, implicit TLS over "
                    "uvloop's), handle_DATA -> 250 OK",
    "postfix-tls": "Postfix smtpd with TLS (throwaway instance; queue on tmpfs, discard transport, "
                   "no reverse DNS)",
    "postfix": "Postfix smtpd -> cleanup -> queue on disk (fsync) -> discard transport (throwaway "
               "instance, no reverse DNS): durable, the peer of mf-maildir",
}


def make_tls(name: str, workdir: str, pair: "tlscerts.CertPair", max_conns: int = 100) -> Server:
    """Build (not start) the TLS server `name` (one of TLS_SERVERS) with `pair`.

    max_conns: connections the server must hold at once (Postfix sizes its
    smtpd process limit from it; the others take 20000 anyway)."""
    if name == "mf-tls":
        rules = norelay_rules(workdir)
        s = _mailfilter(name, rules, "discard", "uvloop", note=TLS_NOTES[name])
        s.tls_port = free_port()
        s.kind = pair.kind
        s.argv += ["--workers", "1", "--tls-cert", pair.cert, "--tls-key", pair.key,
                   "--listen-tls", f"127.0.0.1:{s.tls_port}"]
        return s
    if name == "aiosmtpd-tls":
        port, tls_port = free_port(), free_port()
        return Server(name, [PY, os.path.abspath(__file__), "aiosmtpd-tls-sink", str(port), str(tls_port),
                             pair.cert, pair.key], port, tls_port=tls_port, kind=pair.kind,
                      note=TLS_NOTES[name])
    if name == "postfix-tls":
        return _postfix(name, pair, max(100, max_conns))
    raise ValueError(f"unknown TLS server {name!r} (one of {TLS_SERVERS})")


SYSLOG_SINK = r"""
import os, signal, socket, sys
path = sys.argv[-1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
n = 0
def bye(*_):
    sys.stderr.write(f"syslog-sink: {n} datagrams\n")
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
print("ready", flush=True)
while True:
    s.recv(65536)
    n += 1
"""

DNS_SERVER = r"""
import signal, sys, threading
sys.path.insert(0, sys.argv[-2])
from tests.support.dns_responder import DnsResponder
import servers
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with DnsResponder(servers.BENCH_DNS, port=int(sys.argv[-1])) as dns:
    print("ready", flush=True)
    threading.Event().wait()
"""


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "syslog-sink":
        exec(compile(SYSLOG_SINK, "syslog_sink", "exec"), {"__name__": "syslog_sink"})
    elif len(sys.argv) == 3 and sys.argv[1] == "dns":
        sys.argv.insert(-1, ROOT)
        exec(compile(DNS_SERVER, "dns_server", "exec"), {"__name__": "dns_server"})
    elif len(sys.argv) == 6 and sys.argv[1] == "aiosmtpd-tls-sink":
        _raise_nofile()
        exec(compile(AIOSMTPD_TLS_SINK, "aiosmtpd_tls_sink", "exec"), {"__name__": "aiosmtpd_tls_sink"})
    elif len(sys.argv) == 3 and sys.argv[1] == "aiosmtpd-sink":
        _raise_nofile()
        exec(compile(AIOSMTPD_SINK, "aiosmtpd_sink", "exec"), {"__name__": "aiosmtpd_sink"})
    elif len(sys.argv) == 3 and sys.argv[1] == "uvloop-floor":
        _raise_nofile()
        exec(compile(UVLOOP_FLOOR, "uvloop_floor", "exec"), {"__name__": "uvloop_floor"})
    elif len(sys.argv) == 2:
        # manual: python bench/servers.py NAME -> start it and wait for ^C
        work = tempfile.mkdtemp(prefix="bench-")
        if sys.argv[1] in TLS_SERVERS:     # with a fresh ECDSA certificate
            s = make_tls(sys.argv[1], work, tlscerts.make_pair("ecdsa", os.path.join(work, "tls"))).start()
        else:
            s = make(sys.argv[1], work).start()
        print(f"{s.name} pid {s.pid} on 127.0.0.1:{s.port}"
              + (f", implicit TLS on 127.0.0.1:{s.tls_port}" if s.tls_port else ""), flush=True)
        try:
            s.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            s.stop()
            shutil.rmtree(work, ignore_errors=True)
    else:
        print("usage: servers.py NAME | aiosmtpd-sink PORT | aiosmtpd-tls-sink PORT TLS_PORT CERT KEY",
              file=sys.stderr)
        sys.exit(2)
