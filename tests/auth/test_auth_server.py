"""SMTP AUTH end to end: the real server on 127.0.0.1 (asyncio and uvloop), real
clients (smtplib, swaks), the user DB and external checkpassword programs
(docs/behaviour/auth.md#after-success,
docs/behaviour/checkpassword.md#field-orders, #server-side)."""
import asyncio
import base64
import glob
import hmac
import logging
import os
import select
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import time

import pytest

from mailfilter.auth.lockout import user_net_key
from mailfilter.auth.sasl import Credentials
from mailfilter.auth.verify import (
    CheckpasswordVerifier, ClientEnv, Result, exit_result, fd3_payload,
)

from auth_helpers import PY, USERS, ServerThread, SyslogSink, make_userdb, serve_opts

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture
def userdb(tmp_path):
    return make_userdb(tmp_path / "users.db")


@pytest.fixture
def start(tmp_path, userdb):
    servers = []

    def _start(loop="asyncio", **kw):
        kw.setdefault("userdb", userdb)
        srv = ServerThread(serve_opts(tmp_path, loop=loop, **kw))
        servers.append(srv)
        return srv
    yield _start
    for s in servers:
        s.stop()


def client(srv, source="127.0.0.1"):
    s = smtplib.SMTP("127.0.0.1", srv.port, timeout=10, source_address=(source, 0))
    s.ehlo("client.test")
    return s


def relay_ok(s) -> int:
    """RCPT to a domain not in rcpthosts: 250 only for relay clients."""
    s.rset()
    s.mail("a@client.test")
    return s.rcpt("x@other.org")[0]


# --- advertisement and modes -----------------------------------------------------------
@pytest.mark.parametrize("mode,offer", [
    (None, None), ("-", None), ("", "LOGIN PLAIN"), ("+cram", "LOGIN PLAIN CRAM-MD5"),
    ("cram", "CRAM-MD5"), ("!", "LOGIN PLAIN"), ("!+CRAM", "LOGIN PLAIN CRAM-MD5"),
])
def test_ehlo_offer_per_mode(start, mode, offer):
    srv = start(auth=mode)
    s = client(srv)
    assert (s.esmtp_features.get("auth") or "").strip() == (offer or "")
    if offer is None:
        code, msg = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0tim\0x").decode())
        assert (code, msg[:5]) == (503, b"5.3.3")
        # not offered comes before any syntax check (RFC 4954 §4): no 501 for a bare AUTH
        for args in ("", "a b c"):
            code, msg = s.docmd("AUTH", args)
            assert (code, msg[:5]) == (503, b"5.3.3"), args
    else:
        assert s.docmd("AUTH")[0] == 501
    s.quit()


def test_per_client_tcp_smtp_setting_overrides_global(start):
    srv = start(auth="")
    s = client(srv, "127.0.0.3")                 # SMTPAUTH="-"
    assert "auth" not in s.esmtp_features
    s.quit()
    s = client(srv, "127.0.0.2")                 # SMTPAUTH="!+cram": required before MAIL
    assert s.esmtp_features["auth"].strip() == "LOGIN PLAIN CRAM-MD5"
    code, msg = s.mail("a@client.test")
    assert code == 530 and msg.startswith(b"5.7.0")
    s.login("tim", USERS["tim"])
    assert s.mail("a@client.test")[0] == 250
    s.quit()


# --- successful dialogues --------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mech", ["CRAM-MD5", "PLAIN", "LOGIN"])
def test_smtplib_auth_grants_relay_and_esmtpa(start, tmp_path, caplog, loop, mech):
    caplog.set_level(logging.INFO, logger="mailfilter")
    srv = start(loop=loop, auth="+cram")
    s = client(srv)
    assert relay_ok(s) == 553                              # not a relay client yet
    s.rset()
    user, pw = "alice", USERS["alice"]
    s.user, s.password = user, pw
    code, msg = s.auth(mech, getattr(s, "auth_" + mech.lower().replace("-", "_")),
                       initial_response_ok=True)
    assert (code, msg) == (235, b"2.7.0 ok, go ahead")
    assert relay_ok(s) == 250                              # relaying as RELAYCLIENT=""
    s.rset()                                               # survives RSET
    assert relay_ok(s) == 250
    s.rset()
    assert s.docmd("AUTH", "PLAIN")[0] == 503              # second AUTH
    s.sendmail("a@client.test", ["x@other.org"], b"Subject: hi\r\n\r\nbody\r\n")
    s.quit()
    (msg_file,) = glob.glob(str(tmp_path / "spool" / "new" / "*"))
    head = open(msg_file, "rb").read().split(b"\n\n")[0]
    assert b"(alice@127.0.0.1)" in head and b"with ESMTPA;" in head
    text = caplog.text
    assert f"action=auth result=ok mech={mech} user=alice" in text
    assert "auth=alice" in text                            # decision lines carry the user
    assert pw not in text and "wonder" not in text


def test_smtplib_login_picks_cram(start):
    srv = start(auth="+cram")
    s = client(srv)
    assert s.login("tim", USERS["tim"]) == (235, b"2.7.0 ok, go ahead")
    s.quit()


def test_plain_initial_response_and_continuation(start):
    srv = start(auth="")
    s = client(srv)
    code, msg = s.docmd("AUTH", "PLAIN")
    assert (code, msg) == (334, b"")                       # "334 " empty challenge
    assert s.docmd(base64.b64encode(b"\0bob\0b0b").decode())[0] == 235
    s.quit()


def test_mail_auth_param_grants_nothing(start):
    srv = start(auth="")
    s = client(srv)
    assert s.docmd("MAIL", "FROM:<a@client.test> AUTH=tim@mx.test")[0] == 250
    assert s.rcpt("x@other.org")[0] == 553
    s.quit()


# --- errors ----------------------------------------------------------------------------------
def test_login_tries_every_mechanism_then_421(start):
    srv = start(auth="+cram")
    s = client(srv)
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        s.login("tim", "wrong")                            # CRAM-MD5, PLAIN, LOGIN: 3 failures
    assert e.value.smtp_code == 421


def test_auth_error_replies(start):
    srv = start(auth="")
    s = client(srv)
    assert s.docmd("AUTH", "CRAM-MD5")[0:1] == (504,)          # not offered in this mode
    assert s.docmd("AUTH", "KERBEROS_V4")[0] == 504
    assert s.docmd("AUTH", "LOGIN")[0] == 334
    assert s.docmd("*") == (501, b"5.0.0 auth exchange cancelled")
    assert s.docmd("AUTH", "LOGIN")[0] == 334
    assert s.docmd("!!notbase64!!") == (501, b"5.5.2 malformed auth input")
    assert s.docmd("AUTH", "PLAIN =")[0] == 501                # empty initial response
    s.mail("a@client.test")
    assert s.docmd("AUTH", "PLAIN")[0] == 503                  # inside a transaction
    s.quit()


@pytest.mark.parametrize("loop", LOOPS)
def test_failures_535_then_421_in_session(start, caplog, loop):
    caplog.set_level(logging.INFO, logger="mailfilter")
    srv = start(loop=loop, auth="+cram")
    s = client(srv)
    for _ in range(2):
        code, msg = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0tim\0wrong").decode())
        assert (code, msg) == (535, b"5.7.8 authentication failed")
    code, msg = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0tim\0wrong").decode())
    assert code == 421 and b"too many authentication failures" in msg
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    assert caplog.text.count("action=auth result=fail mech=PLAIN user=tim") == 3
    assert "wrong" not in caplog.text


def test_user_and_ip_lockout(start):
    srv = start(auth="")
    srv.state.auth.by_user.limit = 2
    srv.state.auth.by_ip.limit = 4
    bad = "PLAIN " + base64.b64encode(b"\0tim\0wrong").decode()
    good = "PLAIN " + base64.b64encode(b"\0tim\0" + USERS["tim"].encode()).decode()
    s = client(srv)
    assert s.docmd("AUTH", bad)[0] == 535
    assert s.docmd("AUTH", bad)[0] == 535                  # this one locks 'tim'
    s.quit()
    s = client(srv)
    assert s.docmd("AUTH", good) == (454, b"4.7.0 too many authentication failures, try again later")
    # other users still work from this IP until the IP itself is locked
    assert s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0bob\0nope").decode())[0] == 535
    assert s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0bob\0nope").decode())[0] == 535
    s.quit()                                               # 4 failures from this IP: locked
    s = client(srv)
    assert s.docmd("AUTH", "PLAIN")[0] == 454              # IP locked: refused at once
    s.quit()


# a checkprogram that marks that it runs, then waits (bounded) for the test's "go";
# exit 0 only for the password "right"
GATED_CHECKPW = r"""
import os, sys, time
d = sys.argv[1]
data = b""
while True:
    b = os.read(3, 513)
    if not b:
        break
    data += b
open(os.path.join(d, "started.%d" % os.getpid()), "w").close()
end = time.monotonic() + 30
while not os.path.exists(os.path.join(d, "go")) and time.monotonic() < end:
    time.sleep(0.02)
sys.exit(0 if data.split(b"\0")[1] == b"right" else 1)
"""


class LineConn:
    """A raw client socket with a line buffer and bounded waits."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def line(self, wait: float = 10.0) -> bytes | None:
        """The next reply line, or None when none arrived within `wait` seconds."""
        end = time.monotonic() + wait
        while b"\n" not in self.buf:
            left = max(0.0, end - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                return None
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("per", ["user", "ip"])
def test_parallel_attempts_cannot_overrun_the_failure_limits(start, tmp_path, loop, per):
    """Failures + attempts in flight respect the limits: with limit 3, eight
    simultaneous guesses start three verifications; the rest get 454 at once,
    including the right password sent last."""
    gate = tmp_path / "gate"
    gate.mkdir()
    prog = tmp_path / "gated.py"
    prog.write_text(GATED_CHECKPW)
    srv = start(loop=loop, auth="", checkpassword=f"{PY} {prog} {gate} true")
    srv.state.auth.by_user.limit = 3 if per == "user" else 100
    srv.state.auth.by_ip.limit = 3 if per == "ip" else 100

    def started():
        return len(list(gate.glob("started.*")))

    n = 8
    conns, replies = [], {}
    try:
        for i in range(n):
            c = LineConn(srv.port)
            conns.append(c)
            assert c.line().startswith(b"220")
            c.sock.sendall(b"EHLO c\r\n")
            while not c.line().startswith(b"250 "):
                pass
        for i, c in enumerate(conns):
            user = b"tim" if per == "user" else b"user%d" % i
            pw = b"right" if i == n - 1 else b"guess%d" % i
            before = started()
            c.sock.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + pw) + b"\r\n")
            # decided once its checkprogram runs or it was answered (bounded wait)
            end = time.monotonic() + 30
            while started() == before:
                got = c.line(wait=0.05)
                if got is not None:
                    replies[i] = got
                    break
                assert time.monotonic() < end, f"attempt {i} neither started nor answered"
        assert started() == 3
        (gate / "go").touch()
        for i, c in enumerate(conns):
            if i not in replies:
                replies[i] = c.line(wait=30)
    finally:
        (gate / "go").touch()
        for c in conns:
            c.close()
    codes = [int(replies[i][:3]) for i in range(n)]
    assert codes == [535] * 3 + [454] * (n - 3), codes
    assert replies[n - 1].startswith(b"454 4.7.0")                 # right password: never tried
    tracker = srv.state.auth.by_user if per == "user" else srv.state.auth.by_ip
    # the user is locked for the attackers' network only (user_net_key)
    assert tracker.locked(user_net_key("tim", "127.0.0.1") if per == "user" else "127.0.0.1")


@pytest.mark.parametrize("loop", LOOPS)
def test_fail_delay_does_not_block_the_loop(start, loop):
    srv = start(loop=loop, auth="", auth_fail_delay=1.0)
    srv.state.auth.config.fail_delay = 1.0
    a = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    a.recv(1024)
    a.sendall(b"EHLO a\r\nAUTH PLAIN " + base64.b64encode(b"\0tim\0wrong") + b"\r\n")
    got = b""
    while b"AUTH LOGIN PLAIN" not in got:
        got += a.recv(4096)
    # while A waits out its delay, B gets a whole conversation done
    b = client(srv)
    assert b.noop()[0] == 250
    b.quit()
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(1024)                                       # A's 535 is still pending
    a.settimeout(10)
    assert a.recv(1024).startswith(b"535 5.7.8")
    a.close()


# --- the user database on disk ---------------------------------------------------------------
def plain(srv, user, pw) -> tuple[int, bytes]:
    s = client(srv)
    try:
        return s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{user}\0{pw}".encode()).decode())
    finally:
        s.close()


@pytest.mark.parametrize("what", ["missing", "missing-dir", "not-a-db", "empty-file"])
def test_missing_or_bad_userdb_is_454_and_never_created(start, tmp_path, what):
    """A typo in --userdb must not create an empty database whose 535s count
    towards lockouts: the server opens it read-only, trouble is 454."""
    path = tmp_path / ("typo" if what == "missing-dir" else ".") / "users-typo.db"
    if what == "not-a-db":
        path.write_bytes(b"garbage" * 1000)
    elif what == "empty-file":
        path.write_bytes(b"")
    srv = start(auth="", userdb=str(path))
    for _ in range(2):
        assert plain(srv, "tim", USERS["tim"]) == (454, b"4.7.0 temporary authentication failure")
    assert path.exists() == (what in ("not-a-db", "empty-file"))
    if what == "not-a-db":
        assert path.read_bytes() == b"garbage" * 1000
    assert not (tmp_path / "typo").exists()
    auth = srv.state.auth
    assert auth.by_user.count(user_net_key("tim", "127.0.0.1")) == 0
    assert auth.user_budget.count("tim") == 0 and auth.by_ip.count("127.0.0.1") == 0


def _replace_db(userdb, users):
    new = userdb + ".new"
    make_userdb(new, users)                # closed: the WAL is checkpointed and gone
    os.replace(new, userdb)


@pytest.mark.parametrize("loop", LOOPS)
def test_userdb_replaced_or_removed_on_disk(start, userdb, loop):
    """`mv new.db users.db` takes effect on the next attempt (a removed user, a
    changed password -- also one the success cache remembers); a removed file is
    454, never an accept."""
    srv = start(loop=loop, auth="+cram")
    assert plain(srv, "tim", USERS["tim"])[0] == 235       # cached success from here on
    assert plain(srv, "tim", USERS["tim"])[0] == 235
    assert plain(srv, "bob", USERS["bob"])[0] == 235
    _replace_db(userdb, {"tim": "new-pass", "alice": USERS["alice"]})
    assert plain(srv, "tim", USERS["tim"])[0] == 535       # old password, though cached
    assert plain(srv, "bob", USERS["bob"])[0] == 535       # removed user
    assert plain(srv, "tim", "new-pass")[0] == 235
    s = client(srv)
    assert s.login("alice", USERS["alice"])[0] == 235      # CRAM-MD5 from the new file
    s.quit()
    for f in glob.glob(userdb + "*"):
        os.unlink(f)
    assert plain(srv, "tim", "new-pass")[0] == 454
    assert plain(srv, "alice", USERS["alice"])[0] == 454
    s = client(srv)
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        s.auth("CRAM-MD5", lambda ch=None: "alice " + hmac.new(
            USERS["alice"].encode(), ch, "md5").hexdigest() if ch else None,
            initial_response_ok=False)
    assert e.value.smtp_code == 454
    s.close()
    make_userdb(userdb, {"tim": "again"})                  # back: used again
    assert plain(srv, "tim", "again")[0] == 235


def test_dbverifier_follows_the_file_and_keeps_the_cache_honest(tmp_path):
    from mailfilter.auth.verify import DBVerifier
    path = make_userdb(tmp_path / "users.db")
    v = DBVerifier(path)
    loop = asyncio.new_event_loop()
    try:
        def check(user, pw):
            return loop.run_until_complete(v.verify(Credentials("PLAIN", user, pw.encode())))
        assert check("tim", USERS["tim"]).result is Result.OK
        assert check("tim", USERS["tim"]).reason == "cached"
        _replace_db(path, {"tim": USERS["tim"]})           # same password, new record
        out = check("tim", USERS["tim"])
        assert out.result is Result.OK and out.reason != "cached"   # the new record was checked
        _replace_db(path, {"alice": USERS["alice"]})
        assert check("tim", USERS["tim"]).result is Result.FAIL
        os.unlink(path)
        out = check("alice", USERS["alice"])
        assert out.result is Result.TEMP and "no such user database" in out.reason
    finally:
        v.close()
        loop.close()


LOCK_HOLDER = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA locking_mode=EXCLUSIVE")
c.execute("BEGIN EXCLUSIVE")
c.execute("UPDATE users SET changed = changed")
print("locked", flush=True)
sys.stdin.readline()                       # until the test says so (or closes the pipe)
c.execute("COMMIT")
c.close()
"""


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("opened", [False, True])
def test_locked_userdb_does_not_freeze_the_loop(start, userdb, monkeypatch, loop, opened):
    """Another process holds an exclusive lock: the verifier waits for it in a
    worker thread (first open or lookup alike), other sessions go on."""
    if opened:
        # a WAL reader that is already connected cannot be locked out; a
        # rollback-journal database (restored, or made by another tool) can
        raw = sqlite3.connect(userdb)
        assert raw.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
        raw.close()
    from mailfilter.auth.verify import DBVerifier
    monkeypatch.setattr(DBVerifier, "timeout", 60.0, raising=False)   # outlasts the test's steps
    srv = start(loop=loop, auth="")
    if opened:
        assert plain(srv, "bob", USERS["bob"])[0] == 235   # the connection is open already
    holder = subprocess.Popen([PY, "-c", LOCK_HOLDER, userdb], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    a = None
    try:
        assert holder.stdout.readline() == b"locked\n"
        a = LineConn(srv.port)
        assert a.line().startswith(b"220")
        a.sock.sendall(b"EHLO a\r\nAUTH PLAIN " + base64.b64encode(b"\0tim\0" + USERS["tim"].encode())
                       + b"\r\n")
        while not a.line().startswith(b"250 "):
            pass
        # while A's lookup waits on the lock, B gets a whole conversation done
        b = client(srv)
        assert b.noop()[0] == 250
        b.quit()
        assert a.line(wait=0) is None                      # A is still waiting on the lock
        assert holder.poll() is None
        holder.stdin.write(b"go\n")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        assert a.line(wait=30).startswith(b"235 ")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
        if a is not None:
            a.close()


# --- external checkpassword programs ---------------------------------------------------------
@pytest.fixture
def sink(tmp_path, monkeypatch):
    s = SyslogSink(tmp_path)
    monkeypatch.setenv("MAILFILTER_SYSLOG_SOCKET", s.path)
    yield s
    s.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_server_drives_cmd5checkpw(start, userdb, sink, loop):
    srv = start(loop=loop, auth="+cram",
                checkpassword=f"{PY} -m mailfilter cmd5checkpw --db {userdb} /bin/true")
    s = client(srv)
    assert s.login("tim", USERS["tim"])[0] == 235          # CRAM-MD5, DJB order
    s.quit()
    s = client(srv)
    s.user, s.password = "bob", USERS["bob"]
    assert s.auth("PLAIN", s.auth_plain)[0] == 235
    s.quit()
    s = client(srv)
    s.user, s.password = "tim", "wrong"
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        s.auth("CRAM-MD5", s.auth_cram_md5, initial_response_ok=False)
    assert e.value.smtp_code == 535
    lines = sink.lines()
    assert [l.split(": ", 1)[1].split(" mech")[0] for l in lines] == \
        ["auth success", "auth success", "auth fail"]
    assert all("cmd5checkpw[" in l and "ip=127.0.0.1" in l and f"port={srv.port}" in l for l in lines)
    assert "mech=CRAM-MD5 user=tim" in lines[0] and "mech=PLAIN/LOGIN user=bob" in lines[1]


def test_server_drives_cmd5checkpw_dabrowski_order(start, userdb, sink):
    srv = start(auth="cram", checkpassword_order="dabrowski",
                checkpassword=f"{PY} -m mailfilter cmd5checkpw --order dabrowski --db {userdb} true")
    s = client(srv)
    assert s.login("tim", USERS["tim"])[0] == 235
    s.quit()


def test_server_drives_checkpassword_tool(start, userdb, sink):
    # the server runs as root here and the users have no uid: the operator says
    # the next program (`true`) may run as root
    allow = " --allow-root" if os.geteuid() == 0 else ""
    srv = start(auth="", checkpassword=f"{PY} -m mailfilter checkpassword{allow} --db {userdb} true")
    s = client(srv)
    assert s.login("alice", USERS["alice"])[0] == 235      # PLAIN
    assert relay_ok(s) == 250
    s.quit()
    assert "checkpassword[" in sink.lines()[0]


@pytest.mark.parametrize("order", ["djb", "dabrowski"])
def test_login_password_with_nul_cannot_replay_a_cram_answer(start, userdb, sink, order):
    """A sniffed CRAM-MD5 (challenge, digest) sent as a LOGIN password
    ``digest NUL challenge`` must not become cmd5checkpw's CRAM-MD5 fields."""
    srv = start(auth="+cram", checkpassword_order=order,
                checkpassword=f"{PY} -m mailfilter cmd5checkpw --order {order} --db {userdb} true")
    s = client(srv)                                        # the victim's exchange, on the wire
    code, ch64 = s.docmd("AUTH", "CRAM-MD5")
    assert code == 334
    challenge = base64.b64decode(ch64)
    digest = hmac.new(USERS["tim"].encode(), challenge, "md5").hexdigest().encode()
    assert s.docmd(base64.b64encode(b"tim " + digest).decode())[0] == 235
    s.quit()
    a = client(srv)                                        # the attacker replays it via LOGIN
    assert a.docmd("AUTH", "LOGIN " + base64.b64encode(b"tim").decode())[0] == 334
    pw = digest + b"\0" + challenge if order == "djb" else challenge + b"\0" + digest
    assert a.docmd(base64.b64encode(pw).decode()) == (501, b"5.5.2 malformed auth input")
    assert relay_ok(a) == 553
    a.quit()
    assert [l.split(": ", 1)[1].split(" mech")[0] for l in sink.lines()] == ["auth success"]


@pytest.mark.parametrize("script,code", [("exit 111", 454), ("exit 2", 454), ("kill -9 $$", 454),
                                         ("exit 3", 535), ("exit 1", 535), ("exec true", 235)])
def test_checkpassword_exit_codes_over_smtp(start, script, code):
    srv = start(auth="", checkpassword=f"/bin/sh -c '{script}' checkpw")
    s = client(srv)
    s.user, s.password = "tim", "x"
    assert s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0tim\0x").decode())[0] == code
    s.quit()


def test_mailfilter_serve_process_with_auth_options(tmp_path, userdb):
    """The real `mailfilter serve` command line: --auth, --userdb, --auth-fail-delay."""
    from auth_helpers import make_rules
    from tests.support.server_harness import spawn_serve
    sp = spawn_serve("--rules", make_rules(tmp_path), "--deliver", "discard", "--auth", "!cram",
                     "--userdb", userdb, "--auth-fail-delay", "0")
    try:
        with smtplib.SMTP("127.0.0.1", sp.port, timeout=10) as s:
            s.ehlo("c")
            assert s.esmtp_features["auth"].strip() == "CRAM-MD5"
            assert s.mail("a@client.test")[0] == 530               # "!": required before MAIL
            assert s.login("tim", USERS["tim"])[0] == 235
            assert relay_ok(s) == 250
        sp.log.wait_for(r"action=auth result=ok mech=CRAM-MD5 user=tim")
    finally:
        sp.stop()


def test_unknown_user_plain_costs_a_scrypt_too(userdb):
    from mailfilter.auth.userdb import hash_params
    from mailfilter.auth.verify import DBVerifier
    v = DBVerifier(userdb)
    out = run(v.verify(Credentials("PLAIN", "ghost", b"pw")))
    assert out.result is Result.FAIL and out.reason == "unknown user"
    # the dummy record has the records' scrypt parameters (2^10 here), not a fixed 2^14
    assert hash_params(v._dummy[0].hash) == (1 << 10, 8, 1)
    out = run(v.verify(Credentials("CRAM-MD5", "ghost", b"0" * 32, b"<1.2@h>")))
    assert out.result is Result.FAIL and out.reason == "unknown user"
    v.close()


def test_server_unknown_user_runs_the_scrypt_of_the_records(tmp_path):
    """`mailfilter serve` with records of cost 2^17: a PLAIN attempt for an
    unknown user runs an scrypt with those parameters (128 MiB), not the
    default 2^14 (16 MiB) -- seen as the server's peak memory, not a time."""
    from auth_helpers import make_rules
    path = str(tmp_path / "costly.db")
    subprocess.run([PY, "-m", "mailfilter", "passwd", "--db", path, "--cost", "17", "add", "tim",
                    "--stdin"], input=b"tanstaaftanstaaf\n", check=True, capture_output=True,
                   timeout=120)
    from tests.support.server_harness import spawn_serve
    sp = spawn_serve("--rules", make_rules(tmp_path), "--deliver", "discard", "--auth", "",
                     "--userdb", path, "--auth-fail-delay", "0", "--no-tls")
    try:
        with smtplib.SMTP("127.0.0.1", sp.port, timeout=30) as s:
            s.ehlo("c")
            code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0ghost\0wrong").decode())
            assert code == 535
        # the peak RSS of the server's own address space since its exec (VmHWM;
        # a wait4() ru_maxrss could carry the test runner's peak over a vfork)
        with open(f"/proc/{sp.proc.pid}/status") as fh:
            hwm_kib = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
    finally:
        sp.stop()
    assert hwm_kib / 1024 >= 128


# --- mailfilter/auth/verify.py units -----------------------------------------------------
def test_fd3_layouts():
    plain = Credentials("PLAIN", "tim", b"pw")
    cram = Credentials("CRAM-MD5", "tim", b"d" * 32, b"<1.2@h>")
    assert fd3_payload(plain) == fd3_payload(plain, "dabrowski") == b"tim\0pw\0\0"
    assert fd3_payload(cram) == b"tim\0" + b"d" * 32 + b"\0<1.2@h>\0"
    assert fd3_payload(cram, "dabrowski") == b"tim\0<1.2@h>\0" + b"d" * 32 + b"\0"


def test_fd3_payload_refuses_nul_in_any_field():
    for creds in (Credentials("LOGIN", "tim", b"d" * 32 + b"\0<1.2@h>"),
                  Credentials("PLAIN", "ti\0m", b"pw"),
                  Credentials("CRAM-MD5", "tim", b"d\0" * 16, b"<1.2@h>"),
                  Credentials("CRAM-MD5", "tim", b"d" * 32, b"<1.2\0@h>")):
        for order in ("djb", "dabrowski"):
            with pytest.raises(ValueError):
                fd3_payload(creds, order)


def test_checkpassword_verifier_never_spawns_for_nul_credentials(tmp_path):
    marker = tmp_path / "ran"
    v = CheckpasswordVerifier(["/bin/sh", "-c", f"touch {marker}"])   # would say OK
    out = run(v.verify(Credentials("LOGIN", "tim", b"d" * 32 + b"\0<1.2@h>")))
    assert out.result is Result.FAIL and "NUL" in out.reason and not marker.exists()


def test_exit_status_mapping():
    def st(code):
        return code << 8
    assert exit_result(st(0)).result is Result.OK
    for c in (1, 3, 12, 13, 15, 20, 21, 22, 23):
        assert exit_result(st(c)).result is Result.FAIL
    for c in (2, 4, 11, 111, 255):
        assert exit_result(st(c)).result is Result.TEMP
    assert exit_result(9).result is Result.TEMP           # killed by SIGKILL


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_512_byte_limit_checked_before_spawning(tmp_path):
    marker = tmp_path / "ran"
    v = CheckpasswordVerifier(["/bin/sh", "-c", f"touch {marker}"])
    big = Credentials("PLAIN", "tim", b"x" * 505)           # 3 + 1 + 505 + 2 = 511 bytes: ok
    assert len(fd3_payload(big)) == 511
    assert run(v.verify(big)).result is Result.OK and marker.exists()
    marker.unlink()
    over = Credentials("PLAIN", "tim", b"x" * 507)          # 513 bytes
    assert len(fd3_payload(over)) == 513
    out = run(v.verify(over))
    assert out.result is Result.FAIL and "512" in out.reason and not marker.exists()


def test_child_sees_fd3_and_tcp_env(tmp_path):
    out = tmp_path / "out"
    prog = ["/bin/sh", "-c", f'cat <&3 > {out}; env | grep -E "^(TCP|PROTO)" | sort >> {out}; exit 0']
    v = CheckpasswordVerifier(prog)
    env = ClientEnv("192.0.2.7", 4711, "192.0.2.1", 587, "client.example")
    assert run(v.verify(Credentials("LOGIN", "tim", b"pw"), env)).result is Result.OK
    data = out.read_bytes()
    assert data.startswith(b"tim\0pw\0\0")
    for kv in (b"PROTO=TCP", b"TCPREMOTEIP=192.0.2.7", b"TCPLOCALIP=192.0.2.1",
               b"TCPLOCALPORT=587", b"TCPREMOTEHOST=client.example", b"TCPREMOTEPORT=4711"):
        assert kv in data


def test_timeout_and_spawn_error_are_temporary():
    v = CheckpasswordVerifier(["/bin/sleep", "30"], timeout=0.2)
    out = run(v.verify(Credentials("PLAIN", "tim", b"pw")))
    assert out.result is Result.TEMP and "timed out" in out.reason
    v = CheckpasswordVerifier(["/nonexistent/checkpassword", "true"])
    assert run(v.verify(Credentials("PLAIN", "tim", b"pw"))).result is Result.TEMP


# --- swaks -----------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
@pytest.mark.parametrize("mech", ["CRAM-MD5", "PLAIN", "LOGIN"])
def test_swaks(start, mech):
    srv = start(loop="uvloop", auth="+cram")
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--auth", mech,
                        "--auth-user", "tim", "--auth-password", USERS["tim"],
                        "--from", "a@client.test", "--to", "x@other.org", "--silent", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--auth", mech,
                        "--auth-user", "tim", "--auth-password", "wrong",
                        "--from", "a@client.test", "--to", "x@other.org"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "535 5.7.8" in r.stdout
