"""The decision log of a real `mailfilter serve` process (docs/operations.md#logs):
no line lost across a clean stop (to a file, and to syslog with --workers),
a syslog socket that dies and comes back (no crash, no flood, the gap
counted), a missing socket at start. Real processes, real sockets; every
wait is bounded and on what the server wrote, never a timing assertion."""
from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support.server_harness import TIMEOUT, child_env, free_port, run_cli, write_rules

RFC3164 = re.compile(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d mailfilter\[(\d+)\]: (.*)", re.S)


@pytest.fixture
def rules(tmp_path):
    return write_rules(tmp_path / "rules")


def start(tmp_path, rules, *args, stderr_path=None):
    port = free_port()
    err = open(stderr_path or tmp_path / "stderr.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailfilter", "serve", "--listen", f"127.0.0.1:{port}",
         "--rules", rules, "--deliver", "discard", "--remote-host", "off", *args],
        stdout=subprocess.DEVNULL, stderr=err, env=child_env())
    err.close()
    return proc, port


def wait_until(what, timeout=30.0):
    """Poll `what()` (a file the server writes, a port) until it is true; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def accepting(port) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            return s.recv(4).startswith(b"220")
    except OSError:
        return False


def transactions(port, n, tag):
    """n sessions: MAIL, one accepted and one refused RCPT, DATA."""
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
            s.ehlo(f"{tag}{i}.test")
            s.mail(f"{tag}{i}@sender.test")
            assert s.rcpt("user@example.com")[0] == 250
            assert s.rcpt("user@elsewhere.test")[0] == 553
            assert s.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(TIMEOUT * 3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_line_is_lost_across_a_clean_stop(tmp_path, rules):
    """Lines are written once per loop turn; SIGTERM right after the last
    reply still finds every decision line, and the shutdown lines, in the file."""
    log_path = tmp_path / "mail.log"
    proc, port = start(tmp_path, rules, stderr_path=log_path)
    try:
        wait_until(lambda: "listening on" in log_path.read_text())
        n = 40
        transactions(port, n, "clean")
    finally:
        code = stop(proc)
    assert code == 0
    lines = log_path.read_text().splitlines()
    assert all(re.match(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} \[{proc.pid}\] [A-Z]+ ", line)
               for line in lines), lines[:3]
    for i in range(n):
        assert sum(f"helo=<clean{i}.test> from=<clean{i}@sender.test> to=<user@example.com>" in line
                   and "action=accept stage=RCPT" in line for line in lines) == 1, i
        assert sum(f"from=<clean{i}@sender.test> to=<user@elsewhere.test>" in line
                   and "action=reject stage=RCPT" in line for line in lines) == 1, i
        assert sum(f"from=<clean{i}@sender.test> to=<user@example.com>" in line
                   and "action=accept stage=DATA" in line for line in lines) == 1, i
    assert lines[-1].endswith("INFO shutdown: done")


class Receiver:
    """A unix datagram socket bound at `path`, read in a thread."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self.cond:
                self.lines.append(data.decode())
                self.cond.notify_all()

    def wait_for(self, pattern, count=1, timeout=30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [line for line in self.lines if re.search(pattern, line)]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                assert left > 0, f"no {count}x {pattern!r} in syslog:\n" + "\n".join(self.lines[-20:])
                self.cond.wait(left)

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(TIMEOUT)
        os.unlink(self.path)


def test_syslog_workers_name_their_own_pid_and_lose_nothing_at_stop(tmp_path, rules):
    path = str(tmp_path / "log.sock")
    rx = Receiver(path)
    proc, port = start(tmp_path, rules, "--syslog", "--syslog-socket", path, "--workers", "2")
    try:
        rx.wait_for(r"listening on 127\.0\.0\.1", count=2)
        wait_until(lambda: accepting(port))
        n = 30
        transactions(port, n, "wk")
    finally:
        code = stop(proc)
    assert code == 0
    try:
        lines = list(rx.lines)
        frames = [RFC3164.fullmatch(line) for line in lines]
        assert all(frames), [line for line, m in zip(lines, frames) if not m][:3]
        listening = {int(m[2]) for m in frames if "listening on" in m[3]}
        assert len(listening) == 2 and proc.pid not in listening
        # every line of a worker carries that worker's pid
        for m in frames:
            found = re.search(r"\(pid (\d+)", m[3])
            if found:
                assert int(found[1]) == int(m[2])
        decisions = [m for m in frames if "stage=DATA" in m[3] and "action=accept" in m[3]]
        assert len(decisions) == n and {int(m[2]) for m in decisions} <= listening
        assert sum("shutdown: done" in m[3] for m in frames) == 2     # both workers, flushed
    finally:
        rx.close()


def test_a_dead_syslog_socket_neither_crashes_nor_floods(tmp_path, rules):
    """The syslog daemon goes away mid-run (its socket closed and removed):
    serve keeps answering; stderr hears of it in a bounded number of lines;
    with a small --log-buffer lines are dropped and counted; once a daemon
    binds the path again the log resumes with `action=log_gap dropped=N`."""
    path = str(tmp_path / "log.sock")
    rx = Receiver(path)
    err_path = tmp_path / "stderr.log"
    proc, port = start(tmp_path, rules, "--syslog", "--syslog-socket", path, "--log-buffer", "4096",
                       stderr_path=err_path)
    try:
        rx.wait_for(r"listening on 127\.0\.0\.1")
        wait_until(lambda: accepting(port))
        transactions(port, 2, "before")
        rx.wait_for(r"action=accept stage=DATA .*from=<before1@sender\.test>")
        rx.close()                                  # the daemon is gone
        transactions(port, 40, "gone")              # serve keeps answering
        assert proc.poll() is None
        rx = Receiver(path)                         # ... and back
        for i in range(200):                        # lines make the server try again
            transactions(port, 1, f"back{i}-")
            with rx.cond:
                if any("log_gap" in line for line in rx.lines):
                    break
        # the first gap (with a 4 KB buffer a slow reader may cause another later)
        gap = rx.wait_for(r"action=log_gap dropped=\d+")[0]
        assert int(gap.rsplit("dropped=", 1)[1]) > 0
        assert RFC3164.fullmatch(gap)[1] == "20"     # mail.warning
        transactions(port, 1, "after")
        rx.wait_for(r"action=accept stage=DATA .*from=<after0@sender\.test>")
    finally:
        code = stop(proc)
        rx.close()
    assert code == 0
    err = err_path.read_text().splitlines()
    assert 1 <= len(err) <= 3, err                  # one notice per outage, no traceback
    assert all(line.startswith(f"mailfilter: syslog {path}: ") for line in err), err


def test_a_missing_syslog_socket_is_a_start_up_error(tmp_path, rules):
    missing = str(tmp_path / "no-syslog-here")
    done = run_cli("serve", "--rules", rules, "--deliver", "discard", "--listen", "127.0.0.1:0",
                   "--syslog", "--syslog-socket", missing)
    assert done.returncode == 2
    assert done.stderr == (f"mailfilter serve: --syslog-socket {missing}: No such file or directory "
                           "(is a syslog daemon listening there?)\n")


def test_syslog_over_udp_rfc5424(tmp_path, rules):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(TIMEOUT)
    proc, port = start(tmp_path, rules, "--syslog", "--syslog-socket",
                       f"127.0.0.1:{rx.getsockname()[1]}", "--syslog-format", "rfc5424")
    try:
        while True:
            line = rx.recv(65536).decode()
            if "listening on" in line:
                break
        m = re.fullmatch(r"<22>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d) (\S+) "
                         r"mailfilter (\d+) - - listening on 127\.0\.0\.1:\d+ .*", line)
        assert m and m[2] == socket.gethostname() and int(m[3]) == proc.pid, line
    finally:
        assert stop(proc) == 0
        rx.close()
