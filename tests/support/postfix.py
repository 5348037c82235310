"""A throwaway Postfix instance for peer tests: Postfix's own smtp client
relaying to a mailfilter server under test.

    pf = PostfixInstance.start(relayhost="[127.0.0.1]:2525",
                               smtp_tls_security_level="encrypt")
    qid = pf.submit("a@sender.test", ["user@example.com"], b"Subject: x\\r\\n\\r\\nhi\\r\\n")
    pf.wait_log(rf"{qid}: to=<user@example.com>, .* status=sent ")
    pf.stop()

Invariants:
- Everything lives under one temporary directory: config_directory DIR/etc,
  queue_directory DIR/queue, data_directory DIR/data, the log DIR/maillog
  (maillog_file through the postlog service, Postfix >= 3.4: no syslog
  needed). The directory is outside /root and mode 0755 because Postfix's
  daemons run as the `postfix` user and must traverse it.
- The only listener is the instance's smtpd on 127.0.0.1:PORT (a free port
  below the ephemeral range); nothing listens on port 25 and the system's
  own Postfix configuration (/etc/postfix/main.cf) is neither read nor
  touched. Nothing is chrooted, so no files need copying into the queue.
- Mail leaves only through the smtp transport to `relayhost`: no local
  delivery (mydestination empty), no DNS (a bracketed relayhost address,
  smtpd_peername_lookup = no).
- stop() always leaves nothing behind: `postfix stop`, then a bounded wait
  until no process has its working directory in the queue (every Postfix
  daemon chdirs there), SIGKILL by process id for any left after it, then
  the directory is removed. Safe to call after a failed start.

Root is required (master runs as root and drops to `postfix`); unavailable()
gives the reason to skip otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time

from tests.support.server_harness import TIMEOUT, free_port

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"

# main.cf of every instance; start(**main) adds or overrides parameters.
BASE_MAIN = {
    "compatibility_level": "3.6",
    # not mailfilter's `me` (mx.test): Postfix's smtp client treats a peer
    # that greets with its own name as a mail loop
    "myhostname": "postfix.test",
    "mydomain": "test",
    "mydestination": "",
    "alias_maps": "",
    "alias_database": "",
    "local_recipient_maps": "",
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",       # the test's smtplib client may relay
    "smtpd_peername_lookup": "no",
}

# master.cf: the services a submit -> queue -> smtp relay -> log path uses,
# plus showq (postqueue -j) and pickup/flush (postqueue -f). No chroot.
MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
flush unix n - n 1000? 0 flush
showq unix n - n - - showq
smtp unix - - n - - smtp
relay unix - - n - - smtp
error unix - - n - - error
retry unix - - n - - error
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def unavailable() -> str | None:
    """Why a Postfix peer test cannot run here, or None."""
    if not os.access(POSTFIX, os.X_OK):
        return f"{POSTFIX} not installed (apt-get install postfix; see .ci/run)"
    if os.geteuid() != 0:
        return "a throwaway Postfix instance needs root (its master runs as root)"
    return None


def version() -> str:
    out = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True,
                         text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return out.stdout.strip()


class PostfixError(AssertionError):
    pass


class PostfixInstance:
    def __init__(self, root: str, port: int, main: dict):
        self.root = root
        self.port = port
        self.etc = os.path.join(root, "etc")
        self.queue_dir = os.path.join(root, "queue")
        self.maillog = os.path.join(root, "maillog")
        self.main = dict(BASE_MAIN, queue_directory=self.queue_dir,
                         data_directory=os.path.join(root, "data"),
                         maillog_file=self.maillog,
                         # maillog_file must lie under one of these (postconf(5))
                         maillog_file_prefixes=root, **main)

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, attempts: int = 3, **main) -> "PostfixInstance":
        """A running instance with `main` added to main.cf. Retries on a new
        port when the one free_port() chose was taken before master bound it."""
        for attempt in range(attempts):
            root = tempfile.mkdtemp(prefix="mf-postfix-")
            os.chmod(root, 0o755)
            inst = cls(root, free_port(), main)
            try:
                inst._write_config()
                inst._postfix("start")
                return inst
            except PostfixError as exc:
                inst.stop()
                if "Address already in use" not in str(exc) or attempt == attempts - 1:
                    raise

    def _write_config(self) -> None:
        os.makedirs(self.etc)
        # `postfix start` creates the queue's subdirectories and the data
        # directory (post-install create-missing), not the queue itself
        os.makedirs(self.queue_dir)
        with open(os.path.join(self.etc, "main.cf"), "w") as fh:
            fh.write("# throwaway test instance (tests/support/postfix.py)\n")
            fh.writelines(f"{k} = {v}\n" for k, v in self.main.items())
        with open(os.path.join(self.etc, "master.cf"), "w") as fh:
            fh.write(MASTER.format(port=self.port))

    def _postfix(self, command: str) -> None:
        # master daemonizes: its output goes to a file, not to pipes it could
        # keep open after `postfix start` returned
        errfile = os.path.join(self.root, f"postfix-{command}.out")
        with open(errfile, "w") as err:
            rc = subprocess.run([POSTFIX, "-c", self.etc, command], stdin=subprocess.DEVNULL,
                                stdout=err, stderr=subprocess.STDOUT, timeout=60).returncode
        if rc != 0:
            with open(errfile) as fh:
                out = fh.read()
            raise PostfixError(f"postfix {command} failed ({rc}):\n{out}\n{self.log()[-3000:]}")

    def stop(self) -> None:
        try:
            if os.path.exists(os.path.join(self.queue_dir, "pid", "master.pid")):
                try:
                    self._postfix("stop")
                except (PostfixError, subprocess.TimeoutExpired):
                    pass        # not running, or stuck: the pids below are dealt with
            left = self._wait_gone(TIMEOUT)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._wait_gone(TIMEOUT)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _pids(self) -> list[int]:
        """Processes whose working directory is this instance's queue."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    cwd = os.readlink(f"/proc/{name}/cwd")
                except OSError:
                    continue
                if cwd == self.queue_dir or cwd.startswith(self.queue_dir + "/"):
                    out.append(int(name))
        return out

    def _wait_gone(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while (pids := self._pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids

    # ------------------------------------------------------------ mail
    def submit(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Hand a message to the instance's smtpd; returns its queue id."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as s:
            s.ehlo("client.test")
            code, text = s.mail(sender)
            assert code == 250, (code, text)
            for rcpt in recipients:
                code, text = s.rcpt(rcpt)
                assert code == 250, (code, text)
            code, text = s.data(message)
            assert code == 250, (code, text)
        m = re.search(rb"queued as ([0-9A-Za-z]+)", text)
        assert m, text
        return m.group(1).decode()

    def queue(self) -> list[dict]:
        """The queue as `postqueue -j` lists it (one JSON object a message)."""
        p = subprocess.run([POSTQUEUE, "-c", self.etc, "-j"], capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]

    def wait_queued(self, qid: str, queue_name: str, timeout: float = 20.0) -> dict:
        """The `postqueue -j` entry of `qid` once it is in `queue_name`: qmgr
        moves a message from active to deferred after the delivery agent
        logged the deferral, with no log line of its own."""
        deadline = time.monotonic() + timeout
        while True:
            entries = [e for e in self.queue() if e["queue_id"] == qid]
            if entries and entries[0]["queue_name"] == queue_name:
                return entries[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{qid} not in the {queue_name} queue: {entries}")
            time.sleep(0.05)

    def flush(self) -> None:
        """`postqueue -f`: deliver the deferred queue now (and forget dead
        destinations) instead of waiting for the next queue run."""
        p = subprocess.run([POSTQUEUE, "-c", self.etc, "-f"], capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr

    # ------------------------------------------------------------ log
    def log(self) -> str:
        try:
            with open(self.maillog, errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match:
        """The first maillog match of `pattern`, polled until `timeout`
        (postlogd writes asynchronously)."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in Postfix's log:\n{self.log()[-3000:]}")
            time.sleep(0.05)
