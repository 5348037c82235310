"""`mailfilter serve` as a real process: SIGHUP reload, --workers, kill -9,
start-up refusals, --config. The server is spawned with the venv's python
(`python -m mailfilter serve`), tests wait until its port accepts and then on
what it logs (stderr) or answers; every wait is bounded, nothing sleeps.
"""
from __future__ import annotations

import os
import re
import select
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support.server_harness import (
    LOOPS, PLAIN, RELAY, TIMEOUT, LogReader, RawClient, Spawned, child_env, first, free_port,
    maildir_files, read_new, run_cli, spawn_serve, write_rules,
)


def session(port, source=PLAIN, helo="client.test") -> RawClient:
    c = RawClient(port, source)
    assert c.reply()[0] == 220
    assert c.cmd(f"EHLO {helo}")[0] == 250
    return c


def rcpt_verdict(port, sender, rcpt="user@example.com", source=PLAIN) -> str:
    with session(port, source) as c:
        assert first(c.cmd(f"MAIL FROM:<{sender}>")) == "250 2.1.0 ok"
        return first(c.cmd(f"RCPT TO:<{rcpt}>"))


BANNED = "553 5.7.1 sorry, your envelope sender is in my badmailfrom list"


@pytest.fixture
def rules(tmp_path):
    return write_rules(tmp_path / "rules")


@pytest.fixture
def served(tmp_path, rules):
    procs = []

    def _spawn(*args, **kw):
        sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{tmp_path}/spool", *args, **kw)
        procs.append(sp)
        return sp

    yield _spawn
    for sp in procs:
        sp.stop()


def test_sighup_reload_new_rules_for_new_sessions_only(served, rules, tmp_path):
    """serve.py / docs/operations.md#reloading: SIGHUP recompiles; new sessions see the new
    rules; a session opened before the reload keeps the rules it started with."""
    sp = served()
    assert rcpt_verdict(sp.port, "new-spammer@evil.test") == "250 2.1.5 ok"
    old = session(sp.port)            # opened before the reload
    with open(os.path.join(rules, "badmailfrom"), "a") as fh:
        fh.write("new-spammer@evil.test\n")
    sp.signal(signal.SIGHUP)
    sp.log.wait_for(r"reload ok: \d+ rules from ")
    assert rcpt_verdict(sp.port, "new-spammer@evil.test") == BANNED
    # the old session still answers with the old rules
    assert first(old.cmd("MAIL FROM:<new-spammer@evil.test>")) == "250 2.1.0 ok"
    assert first(old.cmd("RCPT TO:<user@example.com>")) == "250 2.1.5 ok"
    old.close()
    # the server writes its log asynchronously to the test's reader: wait for the line
    sp.log.wait_for(r"action=reject stage=RCPT reason=badmailfrom rule=badmailfrom:5 ")


def test_sighup_broken_rules_keep_old_rules(served, rules):
    """serve.py reload: a rules dir that fails to load (rcpthosts removed ->
    start-up error, docs/behaviour/control-files.md#rcpthosts) keeps the old rules and logs why."""
    sp = served()
    os.unlink(os.path.join(rules, "rcpthosts"))
    with open(os.path.join(rules, "badmailfrom"), "a") as fh:
        fh.write("new-spammer@evil.test\n")
    sp.signal(signal.SIGHUP)
    [m] = sp.log.wait_for(r"reload refused, keeping the current rules: (.*)")
    assert "no rcpthosts" in m.group(1)
    # old rules still in force: example.com accepted, others refused, the new line unknown
    assert rcpt_verdict(sp.port, "a@sender.test") == "250 2.1.5 ok"
    assert rcpt_verdict(sp.port, "a@sender.test", "x@elsewhere.test").startswith("553 5.7.1 sorry, that domain")
    assert rcpt_verdict(sp.port, "new-spammer@evil.test") == "250 2.1.5 ok"
    assert sp.proc.poll() is None
    # and a later good reload still works
    write_rules(rules, {"badmailfrom": BANNED_RULES})
    sp.signal(signal.SIGHUP)
    sp.log.wait_for(r"reload ok: ")
    assert rcpt_verdict(sp.port, "new-spammer@evil.test") == BANNED


BANNED_RULES = "new-spammer@evil.test\n"


def test_sighup_rules_with_a_skipped_line_apply_the_rest_as_at_start(served, rules, tmp_path):
    """Start and reload agree on what is fatal (docs/operations.md#reloading):
    a line that does not compile is a warning naming FILE:LINE, and the rest
    of the rules take effect, at start as at SIGHUP (the compile runs as
    `mailfilter compile` in a child process, off the event loop and its GIL)."""
    tmp = tmp_path / "tmp"                   # the server's own TMPDIR: its temporary bundles
    tmp.mkdir()
    with open(os.path.join(rules, "badmailfrom"), "a") as fh:
        fh.write("/unclosed(regex/\n")
    sp = served(env={"TMPDIR": str(tmp)})
    [start] = sp.log.wait_for(r"WARNING (\S+badmailfrom:\d+: .*: rule skipped)")
    assert rcpt_verdict(sp.port, "spammer@example.org") == BANNED       # the rest is served
    with open(os.path.join(rules, "badmailfrom"), "a") as fh:
        fh.write("new-spammer@evil.test\n")
    sp.signal(signal.SIGHUP)
    again = sp.log.wait_for(r"WARNING (\S+badmailfrom:\d+: .*: rule skipped)", count=2)[1]
    assert again.group(1) == start.group(1)                            # the same warning
    [m] = sp.log.wait_for(r"reload ok: \d+ rules from (\S+) \(1 line\(s\) skipped")
    assert m.group(1) == rules                                          # the directory itself
    assert rcpt_verdict(sp.port, "new-spammer@evil.test") == BANNED     # the new line took effect
    assert "reload refused" not in sp.log.text()
    assert os.listdir(tmp) == []              # the temporary bundles are gone


def test_tcp_smtp_with_other_programs_variables_keeps_its_rules(served, rules):
    """A real tcp.smtp carries variables for other programs (rblsmtpd,
    qmail-queue wrappers, simscan, chkuser): each is ignored with one warning
    naming FILE:LINE, the rule itself (here a relay client's) stays, at start
    and at reload alike."""
    with open(os.path.join(rules, "tcp.smtp")) as fh:
        base = fh.read()
    extra = ('127.0.0.12:allow,RELAYCLIENT="",RBLSMTPD="",QMAILQUEUE="/var/qmail/bin/simscan",'
             'SIMSCAN_DEBUG="0",CHKUSER_WRONGRCPTLIMIT="3"\n')
    with open(os.path.join(rules, "tcp.smtp"), "w") as fh:
        fh.write(extra + base)
    sp = served()
    warned = sp.log.wait_for(r"WARNING \S+tcp\.smtp:1: setting (\w+) is not one of mailfilter's: "
                             r"ignored, rule kept", count=3)
    assert [m.group(1) for m in warned] == ["RBLSMTPD", "SIMSCAN_DEBUG", "CHKUSER_WRONGRCPTLIMIT"]
    # QMAILQUEUE is mailfilter's (tcp-smtp.md#settings), but only for a qmail-queue: next hop
    sp.log.wait_for(r"WARNING deliver: tcp\.smtp QMAILQUEUE \(/var/qmail/bin/simscan\) is used only "
                    r"with a qmail-queue: next hop")
    with session(sp.port, "127.0.0.12") as c:          # still a relay client
        assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
        assert first(c.cmd("RCPT TO:<x@elsewhere.test>")).startswith("250 ")
    sp.signal(signal.SIGHUP)
    sp.log.wait_for(r"reload ok: \d+ rules from \S+$")            # no line skipped
    sp.log.wait_for(r"WARNING \S+tcp\.smtp:1: setting RBLSMTPD is not one of", count=2)
    with session(sp.port, "127.0.0.12") as c:
        assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
        assert first(c.cmd("RCPT TO:<x@elsewhere.test>")).startswith("250 ")


def test_sighup_reload_picks_up_timeoutsmtpd(served, rules):
    """Issue: swap_policy kept the old Limits. A reload that changes
    timeoutsmtpd gives NEW sessions the new idle timeout (421 after 1 s);
    a session opened before keeps its 1200 s."""
    sp = served()
    old = session(sp.port)
    write_rules(rules, {"timeoutsmtpd": "1\n"})
    sp.signal(signal.SIGHUP)
    sp.log.wait_for(r"reload ok: ")
    new = session(sp.port)
    assert first(new.reply()) == "421 4.4.2 mx.test timeout, closing connection"
    assert new.at_eof()
    new.close()
    assert first(old.cmd("NOOP")) == "250 2.0.0 ok"     # still on the old limits
    old.close()


@pytest.mark.parametrize("files,argv,idle,deadline", [
    ({}, [], 1200.0, 3600.0),                                      # BASE_RULES: timeoutsmtpd 1200
    ({"timeoutsession": "90\n"}, [], 1200.0, 90.0),
    ({"timeoutsession": "0\n"}, [], 1200.0, 3600.0),               # 0 = the default
    ({"timeoutsession": "90\n"}, ["--session-deadline", "30", "--timeout", "7"], 7.0, 30.0),
    ({"timeoutsmtpd": "0\n"}, [], 1.0, 3600.0),
])
def test_limits_from_rules_and_options(tmp_path, files, argv, idle, deadline):
    """serve.limits_for via build_state: options first, then the rules'
    timeoutsmtpd / timeoutsession (controlfiles INT_FILES; timeoutsession was
    read but unused), then 300 / 3600. The server's deadline itself:
    test_server.py test_session_deadline_421."""
    from mailfilter.cli import build_parser
    from mailfilter.serve.config import options_from
    from mailfilter.serve.lifecycle import build_state
    rules = write_rules(tmp_path / "r", files)
    opts = options_from(build_parser().parse_args(["serve", "--rules", rules, "--remote-host", "off",
                                                   "--deliver", "discard", *argv]))
    limits = build_state(opts).limits
    assert (limits.idle_timeout, limits.session_deadline) == (idle, deadline)


def test_workers_share_the_port(served, tmp_path):
    """serve.py --workers N: N processes accept on the same port (SO_REUSEPORT).
    Both log their listening line, and both take connections: the qp ids of
    delivered messages (M..P<pid>Q..) name two different pids."""
    sp = served("--workers", "2", listening=2)
    listening = sp.log.wait_for(r"\[(\d+)\] INFO listening on 127\.0\.0\.1:\d+ \(pid (\d+)", count=2)
    pids = {int(m.group(2)) for m in listening}
    assert len(pids) == 2 and sp.proc.pid not in pids
    # every log line names the process that wrote it (forked after log.setup)
    assert {int(m.group(1)) for m in listening} == pids
    seen = set()
    for _ in range(200):                  # the kernel spreads by 4-tuple hash
        with smtplib.SMTP("127.0.0.1", sp.port, timeout=TIMEOUT) as s:
            s.ehlo("w.test")
            s.mail("a@sender.test")
            s.rcpt("user@example.com")
            code, text = s.data(b"Subject: w\r\n\r\nx\r\n")
            assert code == 250
            qid = text.decode().split(" qp ")[1]
            seen.add(int(qid.split("P")[1].split("Q")[0]))
        if len(seen) == 2:
            break
    assert seen == pids
    # SIGHUP to the parent reaches every worker
    sp.signal(signal.SIGHUP)
    reloads = sp.log.wait_for(r"reload ok: ", count=2)
    assert len(reloads) == 2
    # SIGTERM to the parent is forwarded; everybody exits 0
    assert sp.stop() == 0


def _big_rules(tmp_path, rules, n=150_000):
    """The test rules plus n badmailfrom lines: the start-up compile takes a
    while (~1 s), a window for signals that arrive before the loop runs."""
    big = write_rules(tmp_path / "big")
    with open(os.path.join(big, "badmailfrom"), "a") as fh:
        fh.writelines(f"filler{i}@bulk{i % 997}.example\n" for i in range(n))
    return big


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_during_startup_compile_is_kept_not_fatal(tmp_path, rules, workers):
    """A SIGHUP while the rules still compile (a restart followed by a
    logrotate or config push) used to kill the server (default action): it
    is now kept and answered by a reload once the server listens."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailfilter", "serve", "--rules", _big_rules(tmp_path, rules),
         "--listen", f"127.0.0.1:{port}", "--remote-host", "off", "--workers", str(workers),
         "--deliver", f"maildir:{tmp_path}/spool"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    sp = Spawned(proc, port, LogReader(proc.stderr))
    try:
        sp.log.wait_for(r"starting \(pid \d+\): compiling rules", count=workers, timeout=30)
        assert "listening on" not in sp.log.text()        # still compiling
        sp.signal(signal.SIGHUP)
        sp.log.wait_for(r"listening on 127\.0\.0\.1", count=workers, timeout=60)
        sp.log.wait_for(r"reload ok: \d+ rules", count=workers, timeout=60)
        assert proc.poll() is None
        assert rcpt_verdict(port, "filler7@bulk7.example") == BANNED
    finally:
        assert sp.stop() == 0


def test_a_dead_worker_is_logged_and_replaced(served):
    sp = served("--workers", "2", listening=2)
    pids = {int(m.group(1)) for m in sp.log.wait_for(r"listening on 127\.0\.0\.1:\d+ \(pid (\d+)", count=2)}
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    sp.log.wait_for(rf"worker {victim} was killed by signal 9; starting a new one")
    third = {int(m.group(1)) for m in sp.log.wait_for(r"listening on 127\.0\.0\.1:\d+ \(pid (\d+)", count=3)}
    assert len(third) == 3 and victim in third
    for _ in range(20):                  # both live workers answer
        assert rcpt_verdict(sp.port, "a@sender.test") == "250 2.1.5 ok"
    assert _state(victim) in (None, "Z") and sp.proc.poll() is None
    assert sp.stop() == 0


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_workers_exit_with_their_parent(served):
    """PR_SET_PDEATHSIG: a SIGKILLed parent leaves no orphan worker serving
    the port with old rules."""
    sp = served("--workers", "2", listening=2)
    pids = [int(m.group(1)) for m in sp.log.wait_for(r"listening on 127\.0\.0\.1:\d+ \(pid (\d+)", count=2)]
    sp.proc.kill()
    sp.proc.wait(TIMEOUT)
    for _ in range(200):                 # bounded: 10 s
        if all(_state(p) in (None, "Z") for p in pids):
            break
        threading.Event().wait(0.05)
    assert all(_state(p) in (None, "Z") for p in pids)
    with pytest.raises(OSError):         # nobody listens any more
        socket.create_connection(("127.0.0.1", sp.port), timeout=TIMEOUT).close()


def test_a_second_instance_cannot_share_the_port(served, rules, tmp_path):
    """SO_REUSEPORT would let a second --workers instance (other rules, other
    spool) silently take half the connections: it is refused at start."""
    sp = served("--workers", "2", listening=2)
    r = run_cli("serve", "--rules", rules, "--workers", "2", "--listen", f"127.0.0.1:{sp.port}",
                "--deliver", f"maildir:{tmp_path}/other")
    assert r.returncode == 2, r
    assert f"--listen 127.0.0.1:{sp.port}: Address already in use" in r.stderr


def test_dual_stack_listen(rules, tmp_path):
    """IPV6_V6ONLY on AF_INET6 listeners (as asyncio's create_server):
    0.0.0.0:P and [::]:P both bind; each family connects to its own."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailfilter", "serve", "--rules", rules, "--remote-host", "off",
         "--listen", f"0.0.0.0:{port}", "--listen", f"[::]:{port}",
         "--deliver", f"maildir:{tmp_path}/spool"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    sp = Spawned(proc, port, LogReader(proc.stderr))
    try:
        sp.log.wait_for(rf"listening on (0\.0\.0\.0|::):{port} ", count=2, timeout=30)
        for host in ("127.0.0.1", "::1"):
            with smtplib.SMTP(host, port, timeout=TIMEOUT) as s:
                assert s.ehlo("d.test")[0] == 250
    finally:
        assert sp.stop() == 0


def test_sigterm_lets_a_delivery_in_flight_finish(tmp_path, rules):
    """SIGTERM: an idle session gets 421 at once; a message being stored is
    not thrown away: its delivery finishes (within the shutdown grace), the
    client gets its 250, then 421 (qmail: running qmail-smtpd children
    finish after tcpserver stops)."""
    out, go = tmp_path / "qq", tmp_path / "go"
    fakeqq = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "fake_qmail_queue.py")
    sp = spawn_serve("--rules", rules, "--deliver", f"qmail-queue:{sys.executable} {fakeqq}",
                     env={"FAKEQQ_OUT": str(out), "FAKEQQ_EXIT": f"wait:{go}"})
    try:
        c = session(sp.port, RELAY)
        c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        assert [r[0] for r in c.replies(3)] == [250, 250, 354]
        c.send(b"Subject: in flight\r\n\r\nbody\r\n.\r\n")
        for _ in range(400):                        # bounded: 20 s for qmail-queue to have it
            if os.path.exists(f"{out}.env"):
                break
            threading.Event().wait(0.05)
        idle = session(sp.port)
        sp.signal(signal.SIGTERM)
        assert first(idle.reply()).startswith("421 4.3.2 ")
        sp.log.wait_for(r"shutdown: waiting up to 30 s for 1 session\(s\) with a reply in flight")
        go.write_text("")                          # qmail-queue may finish now
        assert first(c.reply()).startswith("250 2.0.0 ok")
        assert first(c.reply()).startswith("421 4.3.2 ")
        assert sp.proc.wait(TIMEOUT) == 0
        assert open(f"{out}.msg", "rb").read().endswith(b"Subject: in flight\n\nbody\n")
    finally:
        sp.stop()


def _read_fifo(fd: int, until_eof: bool) -> bytes | None:
    """From a non-blocking fifo: the first line (once a writer wrote one),
    or with until_eof everything up to EOF (the writer closed: the fake
    qmail-queue is dead); None when TIMEOUT passes first."""
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            if until_eof:
                return data
            continue                    # no writer yet (Linux: no POLLHUP before one)
        data += chunk
        if not until_eof and b"\n" in data:
            return data
    return None


@pytest.mark.parametrize("loop", LOOPS)
def test_shutdown_kills_a_qmail_queue_cut_short(tmp_path, rules, loop):
    """SIGTERM, and a hand-over still running when --shutdown-grace ends: it
    is cancelled and cleans up before the process exits, so the qmail-queue
    child is killed before it commits. On the asyncio loop it outlived the
    server, free to queue a message whose client had been told 421."""
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    fakeqq = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "fake_qmail_queue.py")
    sp = spawn_serve("--rules", rules, "--loop", loop, "--shutdown-grace", "0.5",
                     "--deliver", f"qmail-queue:{sys.executable} {fakeqq}",
                     env={"FAKEQQ_EXIT": "hang", "FAKEQQ_READY": str(fifo)})
    try:
        c = session(sp.port, RELAY)
        c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        assert [r[0] for r in c.replies(3)] == [250, 250, 354]
        c.send(b"Subject: cut short\r\n\r\nbody\r\n.\r\n")
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            pid = int(_read_fifo(fd, until_eof=False))   # the child has the message
            sp.signal(signal.SIGTERM)
            assert first(c.reply()).startswith("421 4.3.2 ")
            assert sp.proc.wait(TIMEOUT) == 0
            # the child held the fifo open: EOF means it is dead
            assert _read_fifo(fd, until_eof=True) is not None, f"qmail-queue {pid} outlived the server"
        finally:
            os.close(fd)
    finally:
        sp.stop()


def test_kill_9_during_delivery_leaves_nothing_partial(served, tmp_path):
    """docs/behaviour/delivery.md#250-means-stored / docs/behaviour/delivery.md#maildir: kill -9
    mid-message leaves nothing in new/ (at most one file in tmp/); kill -9 after the
    message was stored, before the client read its 250, leaves exactly the complete message."""
    spool = tmp_path / "spool"
    sp = served()
    c = session(sp.port, RELAY)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    chunk = (b"y" * 998 + b"\r\n") * 1000        # ~1 MB
    c.send(b"Subject: big\r\n\r\n")
    for _ in range(8):
        c.send(chunk)
    sp.proc.kill()
    assert sp.proc.wait(TIMEOUT) == -signal.SIGKILL
    c.close()
    assert maildir_files(spool) == [] and maildir_files(spool, "cur") == []
    assert len(maildir_files(spool, "tmp")) <= 1

    # again, killed once the message is stored but before the client read
    # its 250: the server's accept line (logged after new/ is fsync'ed) is
    # the event, so the check below runs on a stored message, never on none
    sp2 = served()
    c = session(sp2.port, RELAY)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: big2\r\n\r\n")
    for _ in range(8):
        c.send(chunk)
    c.send(b"END\r\n.\r\n")
    (m,) = sp2.log.wait_for(r'action=accept stage=DATA .* detail="maildir new/(\S+) ')
    sp2.proc.kill()
    assert sp2.proc.wait(TIMEOUT) == -signal.SIGKILL
    c.close()
    assert maildir_files(spool) == [m.group(1)]
    (raw,) = read_new(spool)
    assert b"Subject: big2\n" in raw and raw.endswith(b"y" * 998 + b"\nEND\n"), raw[-200:]
    assert maildir_files(spool, "cur") == []


# ------------------------------------------------------------------ CLI
def test_serve_refuses_without_rcpthosts(tmp_path):
    """docs/behaviour/control-files.md#rcpthosts: no rcpthosts -> refuse to start, exit 2, a
    clear message."""
    rules = write_rules(tmp_path / "rules", remove=("rcpthosts",))
    for cmd in ("serve", "run"):
        r = run_cli(cmd, "--rules", rules, "--listen", f"127.0.0.1:{free_port()}",
                    "--deliver", f"maildir:{tmp_path}/spool")
        assert r.returncode == 2, r
        assert "mailfilter serve: no rcpthosts in the rules" in r.stderr
        assert "--open-relay" in r.stderr
    assert not (tmp_path / "spool").exists()


def test_serve_open_relay_explicit(served, tmp_path):
    """docs/behaviour/control-files.md#rcpthosts: with --open-relay and no rcpthosts, any
    domain is accepted."""
    rules = write_rules(tmp_path / "open", remove=("rcpthosts", "recipients"))
    sp = served("--rules", rules, "--open-relay")
    assert rcpt_verdict(sp.port, "a@sender.test", "x@anywhere.test") == "250 2.1.5 ok"


def test_serve_bad_options_exit_2(tmp_path, rules):
    """Start-up errors are one line on stderr and exit 2, never a traceback."""
    r = run_cli("serve", "--rules", rules, "--listen", "nonsense")
    assert r.returncode == 2 and "--listen wants HOST:PORT" in r.stderr
    r = run_cli("serve", "--rules", rules, "--deliver", "mbox:/x", "--listen", "127.0.0.1:1")
    assert r.returncode == 2 and "--deliver: bad delivery spec" in r.stderr
    with socket.socket() as busy:                   # port already taken
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli("serve", "--rules", rules, "--listen", f"127.0.0.1:{port}",
                    "--deliver", f"maildir:{tmp_path}/spool")
    assert r.returncode == 2 and f"mailfilter serve: --listen 127.0.0.1:{port}: Address already in use" in r.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text('listne = ["127.0.0.1:1"]\n')
    r = run_cli("serve", "--config", str(cfg))
    assert r.returncode == 2 and "unknown setting 'listne'" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--listen", "127.0.0.1:70000"], "--listen wants HOST:PORT with PORT 0-65535, got '127.0.0.1:70000'"),
    (["--workers", "0"], "--workers must be at least 1, not 0"),
    (["--max-per-ip", "0"], "--max-per-ip must be at least 1, not 0"),
    (["--timeout", "-1"], "--timeout must be above 0, not -1.0"),
    (["--session-deadline", "nan"], "--session-deadline must be above 0, not nan"),
    (["--workers", "2", "--listen", "127.0.0.1:0"], "--workers needs a fixed port"),
])
def test_serve_option_ranges_exit_2(rules, args, message):
    r = run_cli("serve", "--rules", rules, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("line,message", [
    # a string "false" is true in Python: it must not switch on an open relay
    ('open_relay = "false"', "open_relay must be true or false, not 'false'"),
    ('syslog = "no"', "syslog must be true or false"),
    ('max_per_ip = "10"', "max_per_ip must be an integer, not '10'"),
    ("workers = 2.5", "workers must be an integer, not 2.5"),
    ('timeout = "30"', "timeout must be a number of seconds, not '30'"),
    ("listen = 2525", 'listen must be "HOST:PORT" or a list of them, not 2525'),
    ("deliver = 1", "deliver must be a string, not 1"),
])
def test_serve_config_types_exit_2(tmp_path, rules, line, message):
    """serve.py --config: every TOML value is checked against its option's type."""
    cfg = tmp_path / "typed.toml"
    listen = "" if line.startswith("listen") else f'listen = "127.0.0.1:{free_port()}"\n'
    cfg.write_text(f'rules = "{rules}"\n{listen}{line}\n')
    r = run_cli("serve", "--config", str(cfg))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_serve_refuses_an_unusable_spool(tmp_path, rules):
    """An unusable maildir is found at start-up, not as a 451 per message."""
    (tmp_path / "afile").write_text("")
    r = run_cli("serve", "--rules", rules, "--listen", f"127.0.0.1:{free_port()}",
                "--deliver", f"maildir:{tmp_path}/afile/spool")
    assert r.returncode == 2, r
    assert f"--deliver maildir:{tmp_path}/afile/spool: Not a directory" in r.stderr
    spool = tmp_path / "ok"
    sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{spool}")
    try:      # the check made the layout and left nothing behind
        assert sorted(os.listdir(spool)) == ["cur", "new", "tmp"]
        assert os.listdir(spool / "tmp") == []
    finally:
        sp.stop()


def test_serve_refuses_a_qmail_queue_it_cannot_run(tmp_path, rules):
    """A missing or non-executable qmail-queue program is found at start-up
    (exit 2, one line naming it), not as a 451 after every message."""
    (tmp_path / "qq").write_text("#!/bin/sh\nexit 0\n")     # not executable
    for spec, line in [
        ("/nonexistent", "mailfilter serve: --deliver qmail-queue:/nonexistent: "
                         "qmail-queue program not found: /nonexistent"),
        (f"{tmp_path}/qq -x", f"mailfilter serve: --deliver qmail-queue:{tmp_path}/qq -x: "
                              f"qmail-queue program is not an executable file: {tmp_path}/qq"),
    ]:
        r = run_cli("serve", "--rules", rules, "--listen", f"127.0.0.1:{free_port()}",
                    "--deliver", f"qmail-queue:{spec}")
        assert r.returncode == 2, r
        assert r.stderr.splitlines()[-1] == line, r.stderr
        assert "Traceback" not in r.stderr


def test_serve_config_toml(tmp_path, rules):
    """serve.py --config: TOML keys are the long option names."""
    port = free_port()
    cfg = tmp_path / "mf.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1:{port}"]\nrules = "{rules}"\n'
        f'deliver = "maildir:{tmp_path}/cfgspool"\nhostname = "cfg.test"\n'
        f'loop = "asyncio"\nmax-per-ip = 5\n')
    sp = spawn_serve("--config", str(cfg), port=port, listen=False)
    try:
        assert "asyncio loop" in sp.log.text()
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
            assert s.ehlo("c.test")[1].startswith(b"cfg.test")
            assert s.sendmail("a@sender.test", ["user@example.com"], "Subject: c\r\n\r\nx\r\n") == {}
        assert len(maildir_files(tmp_path / "cfgspool")) == 1
    finally:
        assert sp.stop() == 0


@pytest.mark.parametrize("config", [None, 'loop = "uvloop"\n'])
def test_loop_flag_selects_asyncio(served, tmp_path, config):
    """`--loop asyncio` runs the server on asyncio's loop (default uvloop),
    also over a config file that says uvloop; the server logs which."""
    args = ["--loop", "asyncio"]
    if config is not None:
        cfg = tmp_path / "loop.toml"
        cfg.write_text(config)
        args += ["--config", str(cfg)]
    sp = served(*args)
    sp.log.wait_for(r"listening on 127\.0\.0\.1:\d+ \(pid \d+, asyncio loop, STARTTLS\)")
    assert "uvloop loop" not in sp.log.text()
    assert rcpt_verdict(sp.port, "a@sender.test") == "250 2.1.5 ok"


def test_serve_timeout_option(served):
    """`--timeout 1`: an idle client gets 421 4.4.2 and is disconnected
    (docs/operations.md#limits-and-timeouts; qmail's timeoutsmtpd as a command-line option)."""
    sp = served("--timeout", "1")
    c = session(sp.port)
    assert first(c.reply()) == "421 4.4.2 mx.test timeout, closing connection"
    assert c.at_eof()
    c.close()
    sp.log.wait_for(r"action=close reason=timeout client=unknown\[127\.0\.0\.1\]:\d+")


def test_syslog_facility_mail(tmp_path, rules):
    """Issue 3, Logging: `--syslog` sends the log to syslog, facility mail, one
    key=value decision line per verdict naming the deciding rule; read from a
    real unix datagram socket bound in the test."""
    import sys

    from tests.support.server_harness import child_env

    sock_path = str(tmp_path / "log.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(sock_path)
    sink.settimeout(TIMEOUT)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailfilter", "serve", "--listen", f"127.0.0.1:{port}",
         "--rules", rules, "--deliver", f"maildir:{tmp_path}/spool",
         "--syslog", "--syslog-socket", sock_path, "--remote-host", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    try:
        lines = []

        def until(pattern):
            while not any(pattern in line for line in lines):
                lines.append(sink.recv(4096).decode())
            return next(line for line in lines if pattern in line)

        listening = until("listening on 127.0.0.1")
        # facility mail (2), info (6); RFC 3164 time stamp; ident with the pid,
        # as glibc's syslog() after openlog(LOG_PID)
        head = re.compile(rf"<22>[A-Z][a-z]{{2}} [ \d]\d \d\d:\d\d:\d\d mailfilter\[{proc.pid}\]: ")
        assert head.match(listening), listening
        with session(port) as c:
            assert first(c.cmd("MAIL FROM:<spammer@example.org>"))[:3] == "250"
            assert first(c.cmd("RCPT TO:<user@example.com>")).startswith("553 5.7.1")
        line = until("stage=RCPT")
        assert head.match(line) and line[head.match(line).end():].startswith(
            "action=reject stage=RCPT reason=badmailfrom rule=badmailfrom:"), line
        assert "from=<spammer@example.org>" in line and "to=<user@example.com>" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
        sink.close()


def serve_a_bundle(tmp_path, rules):
    """`rules` compiled to tmp_path/rules.mfb and a server on it (--bundle,
    maildir under tmp_path): (the bundle's path, the server)."""
    bundle = str(tmp_path / "rules.mfb")
    assert run_cli("compile", rules, "-o", bundle).returncode == 0
    return bundle, spawn_serve("--bundle", bundle, "--deliver", f"maildir:{tmp_path}/spool")


def test_sighup_reloads_a_bundle_and_refuses_a_broken_one(tmp_path, rules):
    """Issue 2/3: `serve --bundle FILE` + `mailfilter compile` + SIGHUP swaps
    in the new bundle; a truncated bundle is refused (BundleError) and the
    rules in force stay (docs/operations.md#reloading: a reload that fails keeps
    the old bundle)."""
    bundle, sp = serve_a_bundle(tmp_path, rules)
    try:
        assert rcpt_verdict(sp.port, "new-spammer@evil.test") == "250 2.1.5 ok"
        with open(os.path.join(rules, "badmailfrom"), "a") as fh:
            fh.write("new-spammer@evil.test\n")
        assert run_cli("compile", rules, "-o", bundle).returncode == 0
        sp.signal(signal.SIGHUP)
        sp.log.wait_for(rf"reload ok: \d+ rules from {bundle}")
        assert rcpt_verdict(sp.port, "new-spammer@evil.test") == BANNED
        data = open(bundle, "rb").read()
        with open(bundle, "wb") as fh:
            fh.write(data[: len(data) // 2])
        sp.signal(signal.SIGHUP)
        [m] = sp.log.wait_for(r"reload refused, keeping the current rules: (.*)")
        assert "truncated" in m.group(1)
        assert rcpt_verdict(sp.port, "new-spammer@evil.test") == BANNED
    finally:
        sp.stop()


# A serving process with the compiler refused: importing it is an ImportError.
# The bundle loader imported it too (Compiled): it is dropped from sys.modules
# and from the package first, so only a new import can bring it back.
_NO_COMPILER = """
import asyncio, importlib.abc, sys
import mailfilter.rules, mailfilter.rules.bundle

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mailfilter.rules.compiler":
            raise ImportError("the serving process imported the rules compiler")

sys.modules.pop("mailfilter.rules.compiler", None)
vars(mailfilter.rules).pop("compiler", None)
sys.meta_path.insert(0, Refuse())
from mailfilter.cli import build_parser
from mailfilter.serve import lifecycle, supervise
from mailfilter.serve.config import options_from
opts = options_from(build_parser().parse_args(["serve", "--deliver", "discard", *sys.argv[1:]]))
state = lifecycle.build_state(opts)
assert asyncio.run(lifecycle.reload(state, opts))
print("served without the compiler")
"""


def test_a_bundle_server_never_imports_the_compiler(tmp_path, rules):
    """`serve --bundle`: start-up and reload load the bundle and nothing of
    the compiler; `serve --rules` compiles at start (so the guard is live)."""
    bundle = str(tmp_path / "rules.mfb")
    assert run_cli("compile", rules, "-o", bundle).returncode == 0
    served = subprocess.run([sys.executable, "-c", _NO_COMPILER, "--bundle", bundle],
                            capture_output=True, text=True, env=child_env(), timeout=60)
    assert served.returncode == 0 and served.stdout == "served without the compiler\n", served.stderr
    compiled = subprocess.run([sys.executable, "-c", _NO_COMPILER, "--rules", rules],
                              capture_output=True, text=True, env=child_env(), timeout=60)
    assert compiled.returncode == 1
    assert "ImportError: the serving process imported the rules compiler" in compiled.stderr


# ------------------------------------------------------------------ options: file and command line
def opts_of(*argv):
    from mailfilter.cli import build_parser
    from mailfilter.serve.config import options_from
    return options_from(build_parser().parse_args(["serve", *map(str, argv)]))


def test_rule_source_command_line_replaces_the_config_file(tmp_path):
    """serve.options_from: `--rules` on the command line drops a config
    `bundle` (it used to win, load_policy prefers a bundle), `--bundle`
    drops a config `rules`; a file alone decides; a file with both is an error."""
    from mailfilter.serve.config import StartupError
    with_bundle = tmp_path / "b.toml"
    with_bundle.write_text('bundle = "/srv/rules.mfb"\n')
    with_rules = tmp_path / "r.toml"
    with_rules.write_text('rules = "/srv/rules"\n')

    def got(o):
        return o.rules, o.bundle
    assert got(opts_of("--config", with_bundle, "--rules", "cli-rules")) == ("cli-rules", None)
    assert got(opts_of("--config", with_bundle)) == (None, "/srv/rules.mfb")
    assert got(opts_of("--config", with_rules, "--bundle", "cli.mfb")) == (None, "cli.mfb")
    assert got(opts_of("--config", with_rules)) == ("/srv/rules", None)
    assert got(opts_of()) == ("rules", None)
    both = tmp_path / "both.toml"
    both.write_text('rules = "r"\nbundle = "b.mfb"\n')
    with pytest.raises(StartupError, match="give rules or bundle, not both"):
        opts_of("--config", both)


def test_command_line_beats_the_config_file(tmp_path):
    cfg = tmp_path / "mf.toml"
    cfg.write_text('timeout = 5.0\nsession-deadline = 50.0\nremote_host = "ptr"\nloop = "uvloop"\n'
                   'resolver = "127.0.0.1:5353"\nhostname = "cfg.test"\nlisten = "127.0.0.1:1"\n')
    o = opts_of("--config", cfg)
    assert (o.timeout, o.session_deadline, o.remote_host, o.loop, o.resolver, o.hostname, o.listen) == \
        (5.0, 50.0, "ptr", "uvloop", "127.0.0.1:5353", "cfg.test", ["127.0.0.1:1"])
    o = opts_of("--config", cfg, "--timeout", "7", "--session-deadline", "70", "--remote-host", "off",
                "--loop", "asyncio", "--resolver", "::1", "--hostname", "cli.test", "--listen", "127.0.0.1:2")
    assert (o.timeout, o.session_deadline, o.remote_host, o.loop, o.resolver, o.hostname, o.listen) == \
        (7.0, 70.0, "off", "asyncio", "::1", "cli.test", ["127.0.0.1:2"])


def test_remote_host_option_parsing(tmp_path, rules):
    """--remote-host off|ptr|confirmed (default confirmed), also `remote_host`
    / `remote-host` in the config file; anything else is refused at start."""
    from mailfilter.serve.config import StartupError
    from mailfilter.serve.lifecycle import build_state
    assert opts_of().remote_host == "confirmed"
    for mode in ("off", "ptr", "confirmed"):
        assert opts_of("--remote-host", mode).remote_host == mode
        assert build_state(opts_of("--rules", rules, "--deliver", "discard",
                                   "--remote-host", mode)).remote_host == mode
    cfg = tmp_path / "rh.toml"
    cfg.write_text('remote-host = "ptr"\n')
    assert opts_of("--config", cfg).remote_host == "ptr"
    with pytest.raises(SystemExit):
        opts_of("--remote-host", "paranoid")                # argparse choices: exit 2
    cfg.write_text('remote_host = "paranoid"\n')
    with pytest.raises(StartupError, match="--remote-host must be one of off, ptr, confirmed, not 'paranoid'"):
        build_state(opts_of("--config", cfg, "--rules", rules))


def test_config_bundle_yields_to_command_line_rules(tmp_path, rules):
    """End to end: a config naming a bundle that does not exist, started with
    --rules: the server compiles the rules and runs (it used to load the bundle)."""
    cfg = tmp_path / "mf.toml"
    cfg.write_text(f'bundle = "{tmp_path}/missing.mfb"\ndeliver = "maildir:{tmp_path}/spool"\n')
    sp = spawn_serve("--config", str(cfg), "--rules", rules)
    try:
        assert rcpt_verdict(sp.port, "spammer@example.org") == \
            "553 5.7.1 sorry, your envelope sender is in my badmailfrom list"
    finally:
        assert sp.stop() == 0


@pytest.mark.parametrize("spec", ["::1]", "[::1", "dns.example", "127.0.0.1:dns", "[::1]:0"])
def test_bad_resolver_is_a_startup_error(rules, spec):
    """--resolver accepts IP, IP:PORT, [V6], [V6]:PORT or a bare IPv6
    address; anything else stops the start (forms: test_dnscheck.py)."""
    from mailfilter.serve.config import StartupError
    from mailfilter.serve.lifecycle import build_state
    with pytest.raises(StartupError) as err:
        build_state(opts_of("--rules", rules, "--deliver", "discard", "--resolver", spec))
    assert str(err.value).startswith(f"--resolver {spec!r}: ")


def test_bad_resolver_one_line_exit_2(rules):
    r = run_cli("serve", "--rules", rules, "--resolver", "::1]", "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2, r
    assert r.stderr == ("mailfilter serve: --resolver '::1]': '::1]' is not an IP address "
                        "(expected HOST, HOST:PORT, [IPV6], [IPV6]:PORT or a bare IPv6 address)\n")


@pytest.mark.parametrize("spec,host,port", [
    ("::1", "::1", 53), ("[::1]:5353", "::1", 5353), ("127.0.0.1", "127.0.0.1", 53),
    ("127.0.0.1:5353", "127.0.0.1", 5353),
])
def test_good_resolver_forms(rules, spec, host, port):
    """`--resolver ::1` used to become host `::` port 1."""
    from mailfilter.serve.lifecycle import build_state
    res = build_state(opts_of("--rules", rules, "--deliver", "discard", "--resolver", spec)).resolver._res
    assert [(ns.address, ns.port) for ns in res.nameservers] == [(host, port)]


def test_reload_frees_the_replaced_rules(tmp_path, rules):
    """The old rule set holds reference cycles (a regex not used yet and its
    matcher point at each other), which only a full collection frees: 20
    reloads of a 100k-rule set kept 8 old copies until the collector came
    by. reload() collects once the new set is in place (automatic collection
    is off here, so only that can free them)."""
    import asyncio
    import gc

    from mailfilter.rules import bundle as bundle_mod
    from mailfilter.rules import compiler
    from mailfilter.serve import lifecycle as serve_mod
    from mailfilter.serve.config import ServeOptions

    write_rules(rules, {"badmailfrom": "/^[0-9]{6,}@/\n/spam[0-9]+/\n@spam.example.org\n"})
    mfb = str(tmp_path / "rules.mfb")
    bundle_mod.write(compiler.compile_dir(rules), mfb)
    opts = ServeOptions(rules=None, bundle=mfb, deliver="discard", remote_host="off")

    def stubs() -> int:     # regexes waiting for their first use, in every live rule set
        return sum(1 for o in gc.get_objects() if type(o) is bundle_mod._LazyRegex)

    gc.collect()
    before = stubs()
    state = serve_mod.build_state(opts)
    one_set = stubs() - before
    assert one_set >= 2
    gc.disable()
    try:
        for _ in range(3):
            assert asyncio.run(serve_mod.reload(state, opts)) is True
        assert stubs() - before == one_set, "replaced rule sets are still alive after the reload"
    finally:
        gc.enable()


def test_qmailqueue_per_client_with_a_qmail_queue_next_hop(tmp_path):
    """docs/behaviour/tcp-smtp.md#settings QMAILQUEUE: as qmail-smtpd does, a
    client's QMAILQUEUE replaces the qmail-queue program (next hop
    qmail-queue: only); the others use the hop's own."""
    fakeqq = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support",
                          "fake_qmail_queue.py")
    special = tmp_path / "special-qq"
    special.write_text(f"#!/bin/sh\nFAKEQQ_OUT={tmp_path}/special exec {sys.executable} {fakeqq}\n")
    special.chmod(0o755)
    rules = write_rules(tmp_path / "rules", {"tcp.smtp": (
        f'127.0.0.2:allow,RELAYCLIENT="",QMAILQUEUE="{special}"\n'
        '127.0.0.3:allow,RELAYCLIENT=""\n:allow\n')})
    sp = spawn_serve("--rules", rules, "--deliver", f"qmail-queue:{sys.executable} {fakeqq}",
                     env={"FAKEQQ_OUT": str(tmp_path / "default")})
    try:
        sp.log.wait_for(rf"INFO deliver: tcp\.smtp QMAILQUEUE {special} for its clients")
        for source, subject in (("127.0.0.2", "special"), ("127.0.0.3", "default")):
            c = session(sp.port, source)
            c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
            assert [r[0] for r in c.replies(3)] == [250, 250, 354]
            c.send(f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
            assert first(c.reply()).startswith("250 2.0.0 ok")
            c.close()
        assert open(tmp_path / "special.msg", "rb").read().endswith(b"Subject: special\n\nbody\n")
        assert open(tmp_path / "default.msg", "rb").read().endswith(b"Subject: default\n\nbody\n")
        sp.log.wait_for(rf"action=accept stage=DATA .* detail=\"qmail-queue pid=\d+ exit=0 prog={special}\"")
    finally:
        sp.stop()


def test_qmailqueue_must_be_an_absolute_path(tmp_path):
    rules = write_rules(tmp_path / "rules", {"tcp.smtp": '127.0.0.2:allow,QMAILQUEUE="qq"\n:allow\n'})
    r = run_cli("compile", rules, "-o", str(tmp_path / "b.mfb"))
    assert r.returncode == 1
    assert "tcp.smtp:1: QMAILQUEUE='qq' is not an absolute path to a program: rule skipped" in r.stderr


def test_a_bundle_renamed_over_is_reloaded_without_a_signal(tmp_path, rules):
    """docs/operations.md#shipping-rules: compile once, ship, rename over
    --bundle FILE: the node notices and reloads as SIGHUP does; a truncated
    file written in place is refused and the rules in force stay."""
    bundle, sp = serve_a_bundle(tmp_path, rules)
    try:
        assert rcpt_verdict(sp.port, "shipped@spam.test") == "250 2.1.5 ok"
        with open(os.path.join(rules, "badmailfrom"), "a") as fh:
            fh.write("shipped@spam.test\n")
        new = str(tmp_path / "rules.mfb.new")
        assert run_cli("compile", rules, "-o", new).returncode == 0
        os.rename(new, bundle)                          # the way a bundle is shipped
        sp.log.wait_for(rf"bundle {re.escape(bundle)} replaced: reloading")
        sp.log.wait_for(rf"reload ok: \d+ rules from {re.escape(bundle)}")
        assert rcpt_verdict(sp.port, "shipped@spam.test") == BANNED
        data = open(bundle, "rb").read()
        with open(bundle, "r+b") as fh:                 # a broken copy in place
            fh.truncate(len(data) // 2)
        sp.log.wait_for(r"reload refused, keeping the current rules: .*truncated")
        assert rcpt_verdict(sp.port, "shipped@spam.test") == BANNED
        assert sp.proc.poll() is None
    finally:
        sp.stop()
