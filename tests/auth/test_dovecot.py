"""Dovecot as a real checkpassword caller
(docs/behaviour/checkpassword.md#mailfilter-checkpassword): a throwaway Dovecot 2.3
with ``passdb checkpassword`` = ``mailfilter checkpassword``, driven by poplib.

Skipped when dovecot is not installed (Debian: dovecot-core dovecot-pop3d) or
when it cannot start here (it needs root to run its services).
"""
import os
import poplib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from auth_helpers import USERS, make_userdb
from tests.support.server_harness import free_port

DOVECOT = shutil.which("dovecot") or (os.path.exists("/usr/sbin/dovecot") and "/usr/sbin/dovecot")
REPLY = "/usr/lib/dovecot/checkpassword-reply"

pytestmark = pytest.mark.skipif(
    not DOVECOT or not os.path.exists(REPLY) or os.geteuid() != 0,
    reason="needs dovecot-core + dovecot-pop3d and root")

CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 65534
mail_location = maildir:{d}/mail/%u
passdb {{
  driver = checkpassword
  args = {wrapper}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={d}/mail/%u
}}
service auth {{
  user = root
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
}}
"""


@pytest.fixture
def dovecot():
    d = tempfile.mkdtemp(prefix="mf-dovecot-")
    os.chmod(d, 0o755)
    for sub in ("run", "state", "mail"):
        os.makedirs(os.path.join(d, sub))
    os.chmod(os.path.join(d, "mail"), 0o777)
    db = make_userdb(os.path.join(d, "users.db"))
    log = os.path.join(d, "syslog.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(log)
    wrapper = os.path.join(d, "checkpw.sh")
    with open(wrapper, "w") as fh:
        # Dovecot passes only its own variables: the wrapper names the DB and syslog socket.
        # Its auth worker runs the script as root and the next program is Dovecot's own
        # reply helper, for virtual users (no uid): --allow-root says that is intended.
        fh.write(f"#!/bin/sh\nMAILFILTER_USERDB={db} MAILFILTER_SYSLOG_SOCKET={log} "
                 f"exec {sys.executable} -m mailfilter checkpassword --allow-root \"$@\"\n")
    os.chmod(wrapper, 0o755)
    port = free_port()
    conf = os.path.join(d, "dovecot.conf")
    with open(conf, "w") as fh:
        fh.write(CONF.format(d=d, wrapper=wrapper, port=port))
    errfile = os.path.join(d, "start.err")
    with open(errfile, "w") as err:     # dovecot daemonizes: no pipes it could keep open
        p = subprocess.run([DOVECOT, "-c", conf], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=err, timeout=30)
    if p.returncode != 0:
        msg = open(errfile).read().strip()[:300]
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"dovecot did not start: {msg}")
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield {"port": port, "dir": d, "sock": sock}
    finally:
        subprocess.run([DOVECOT, "-c", conf, "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        sock.close()
        for _ in range(50):
            if not os.path.exists(os.path.join(d, "run", "master.pid")):
                break
            time.sleep(0.1)
        shutil.rmtree(d, ignore_errors=True)


def test_pop3_login_through_mailfilter_checkpassword(dovecot):
    pop = poplib.POP3("127.0.0.1", dovecot["port"], timeout=20)
    pop.user("tim")
    assert pop.pass_(USERS["tim"]).startswith(b"+OK")
    assert pop.stat() == (0, 0)
    pop.quit()
    pop = poplib.POP3("127.0.0.1", dovecot["port"], timeout=20)
    pop.user("tim")
    with pytest.raises(poplib.error_proto):
        pop.pass_("wrong")
    pop.quit()
    dovecot["sock"].settimeout(5)
    lines = [dovecot["sock"].recv(4096).decode() for _ in range(2)]
    assert "auth success mech=PLAIN/LOGIN user=tim ip=127.0.0.1" in lines[0]
    assert "auth fail" in lines[1] and "bad password" in lines[1]
    assert not any("wrong" in l or USERS["tim"] in l for l in lines)
