"""`mailfilter checkpassword` / `mailfilter cmd5checkpw` as real spawned processes:
fd 3 in, exit 0 via exec / 1 / 2 / 111 out, syslog lines on a real datagram socket
(docs/behaviour/checkpassword.md#syslog, #mailfilter-cmd5checkpw, #the-fd-3-interface)."""
import hmac
import os
import shutil
import subprocess
import sys

import pytest

from mailfilter.auth.userdb import UserDB

from auth_helpers import PY, TOOL, SyslogSink, make_userdb

# tim has no uid (a virtual user): run as root, checkpassword refuses to run
# the next program as root unless told it may (test_root_... below)
ALLOW_ROOT = ("--allow-root",) if os.geteuid() == 0 else ()

RFC_CH = b"<1896.697170952@postoffice.reston.mci.net>"
RFC_DIGEST = b"b913a602c7eda7a495b4e6e7334d3890"

# the "next program": prints what checkpassword set up, exits 0
SHOW = [PY, "-c", "import os; print(os.environ.get('USER'), os.environ.get('HOME'), "
                  "os.environ.get('SHELL'), os.environ.get('MAILDIR'), os.getcwd())"]


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home" / "tim"
    home.mkdir(parents=True)
    db = make_userdb(tmp_path / "users.db", {"tim": "tanstaaftanstaaf"}, home=str(home),
                     maildir=str(home / "Maildir"), shell="/bin/sh")
    with UserDB(db, scrypt_n=1 << 10) as d:
        d.add(d.make_user("nocram", b"pw", cram=False))
    sink = SyslogSink(tmp_path)
    e = dict(os.environ, MAILFILTER_USERDB=db, MAILFILTER_SYSLOG_SOCKET=sink.path,
             TCPREMOTEIP="192.0.2.7", TCPLOCALPORT="587")
    e.pop("MAILFILTER_SYSLOG_FACILITY", None)
    yield {"env": e, "db": db, "home": str(home), "sink": sink, "tmp": tmp_path}
    sink.close()


def run_tool(tool, payload: bytes | None, argv, env, extra=()):
    """Spawn the tool with `payload` on fd 3 (a pipe), as a checkprogram caller does."""
    if payload is None:
        return subprocess.run([*TOOL, tool, *extra, *argv], env=env, capture_output=True,
                              text=True, timeout=60)
    r, w = os.pipe()
    try:
        os.write(w, payload)
        os.close(w)
        w = -1
        return subprocess.run([*TOOL, tool, *extra, *argv], env=env, capture_output=True, text=True,
                              timeout=60, close_fds=False, preexec_fn=lambda: _to_fd3(r))
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


def _to_fd3(fd):
    """In the child: the pipe becomes fd 3 (dup2 clears close-on-exec); the
    original descriptor is close-on-exec. close_fds=False keeps fd 3 open."""
    os.dup2(fd, 3)


# --- checkpassword -----------------------------------------------------------------------
def test_checkpassword_success_execs_next_program(env):
    r = run_tool("checkpassword", b"tim\0tanstaaftanstaaf\0<ts>\0", SHOW, env["env"], ALLOW_ROOT)
    assert r.returncode == 0, r.stderr
    home = env["home"]
    assert r.stdout.split() == ["tim", home, "/bin/sh", f"{home}/Maildir", home]
    lines = env["sink"].lines()
    assert len(lines) == 1
    assert lines[0].startswith("<86>")                      # authpriv.info = 10*8+6
    assert "checkpassword[" in lines[0]
    assert "auth success mech=PLAIN/LOGIN user=tim ip=192.0.2.7 port=587" in lines[0]
    assert "tanstaaf" not in lines[0]


@pytest.mark.parametrize("payload,reason", [
    (b"tim\0wrong\0\0", "bad password"),
    (b"ghost\0tanstaaftanstaaf\0\0", "unknown user"),
    (b"tim\0\0\0", "empty login or password"),
])
def test_checkpassword_failures_exit_1(env, payload, reason):
    r = run_tool("checkpassword", payload, SHOW, env["env"])
    assert r.returncode == 1 and r.stdout == ""
    (line,) = env["sink"].lines()
    assert line.startswith("<85>") and "auth fail" in line and reason in line
    assert "wrong" not in line and "tanstaaf" not in line


@pytest.mark.parametrize("payload", [b"tim\0nopasswordterminator", b"x" * 513, b""])
def test_checkpassword_misuse_exit_2(env, payload):
    assert run_tool("checkpassword", payload, SHOW, env["env"]).returncode == 2


def test_checkpassword_without_prog_or_fd3_is_misuse(env):
    assert run_tool("checkpassword", b"tim\0x\0\0", [], env["env"]).returncode == 2
    assert run_tool("checkpassword", None, SHOW, env["env"]).returncode == 2    # no fd 3


def test_checkpassword_db_unreadable_exit_111(env):
    for bad in [str(env["tmp"] / "missing.db"), str(env["tmp"])]:
        e = dict(env["env"], MAILFILTER_USERDB=bad)
        r = run_tool("checkpassword", b"tim\0tanstaaftanstaaf\0\0", SHOW, e)
        assert r.returncode == 111
    junk = env["tmp"] / "junk.db"
    junk.write_bytes(b"garbage" * 200)
    r = run_tool("checkpassword", b"tim\0tanstaaftanstaaf\0\0", SHOW, env["env"],
                 extra=("--db", str(junk)))
    assert r.returncode == 111
    lines = env["sink"].lines()
    assert lines and all("<83>" in l and "auth error" in l for l in lines)   # authpriv.err


def test_checkpassword_exec_failure_is_111(env):
    r = run_tool("checkpassword", b"tim\0tanstaaftanstaaf\0\0", ["/nonexistent/prog"], env["env"],
                 ALLOW_ROOT)
    assert r.returncode == 111
    assert "cannot run /nonexistent/prog" in env["sink"].lines()[-1]


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is about running as root")
def test_root_without_a_uid_is_refused_unless_allowed(env):
    """A user without a uid keeps the caller's ids; for root that would run
    PROG as root on a password alone: exit 111 and a syslog line instead."""
    marker = env["tmp"] / "ran"
    prog = ["/bin/sh", "-c", f"id -u > {marker}"]
    r = run_tool("checkpassword", b"tim\0tanstaaftanstaaf\0\0", prog, env["env"])
    assert r.returncode == 111 and not marker.exists()
    (line,) = env["sink"].lines()
    assert "auth error" in line and "user=tim" in line
    assert "refusing to run the next program as root: the user has no uid" in line
    r = run_tool("checkpassword", b"tim\0tanstaaftanstaaf\0\0", prog, env["env"], ("--allow-root",))
    assert r.returncode == 0 and marker.read_text().strip() == "0"


def test_help_names_defaults_exit_codes_and_fd3(env):
    for tool, fd3 in (("checkpassword", "login NUL password NUL [timestamp NUL]"),
                      ("cmd5checkpw", "login NUL digest NUL challenge NUL")):
        out = subprocess.run([*TOOL, tool, "--help"], capture_output=True, text=True,
                             timeout=60).stdout
        flat = " ".join(out.split())
        assert fd3 in flat and "exit codes: 0" in flat and "111 temporary" in flat, out
        assert "default $MAILFILTER_USERDB, else var/users.db" in flat


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to the user's uid needs root")
def test_checkpassword_drops_privileges_as_root(env):
    make_userdb(env["tmp"] / "ids.db", {"nobody4": "pw"}, uid=65534, gid=65534, home="/")
    e = dict(env["env"], MAILFILTER_USERDB=str(env["tmp"] / "ids.db"))
    r = run_tool("checkpassword", b"nobody4\0pw\0\0",
                 ["/bin/sh", "-c", "id -u; id -g; id -G; pwd"], e)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["65534", "65534", "65534", "/"]
    assert "auth success" in env["sink"].lines()[0]        # socket opened before setuid


def test_console_entry_point(env):
    exe = shutil.which("mailfilter-checkpassword", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("console scripts not installed (pip install -e . again)")
    r, w = os.pipe()
    os.write(w, b"tim\0tanstaaftanstaaf\0\0")
    os.close(w)
    p = subprocess.run([exe, *ALLOW_ROOT, "true"], env=env["env"], close_fds=False,
                       preexec_fn=lambda: _to_fd3(r), timeout=60)
    os.close(r)
    assert p.returncode == 0


# --- cmd5checkpw -------------------------------------------------------------------------
def cram(pw: bytes, ch: bytes) -> bytes:
    return hmac.new(pw, ch, "md5").hexdigest().encode()


@pytest.mark.parametrize("source", ["db", "passwd"])
def test_cmd5checkpw_rfc2195_both_orders(env, source):
    extra = ()
    if source == "passwd":
        pp = env["tmp"] / "poppasswd"
        pp.write_text("# comment\ntim:tanstaaftanstaaf\n")
        extra = ("--passwd", str(pp))
    djb = b"tim\0" + RFC_DIGEST + b"\0" + RFC_CH + b"\0"
    dab = b"tim\0" + RFC_CH + b"\0" + RFC_DIGEST + b"\0"
    assert run_tool("cmd5checkpw", djb, ["true"], env["env"], extra).returncode == 0
    assert run_tool("cmd5checkpw", dab, ["true"], env["env"], extra).returncode == 1   # wrong order
    assert run_tool("cmd5checkpw", dab, ["true"], env["env"],
                    (*extra, "--order", "dabrowski")).returncode == 0
    e = dict(env["env"], CMD5CHECKPW_ORDER="dabrowski")
    assert run_tool("cmd5checkpw", dab, ["true"], e, extra).returncode == 0
    lines = env["sink"].lines()
    assert [("auth success" in l) for l in lines] == [True, False, True, True]
    assert all("mech=CRAM-MD5 user=tim ip=192.0.2.7" in l for l in lines)
    assert not any(RFC_DIGEST.decode() in l or "1896" in l for l in lines)   # no digest/challenge


def test_cmd5checkpw_plain_when_no_challenge(env):
    assert run_tool("cmd5checkpw", b"tim\0tanstaaftanstaaf\0\0", ["true"], env["env"]).returncode == 0
    assert run_tool("cmd5checkpw", b"tim\0tanstaaftanstaaf\0", ["true"], env["env"]).returncode == 0
    assert run_tool("cmd5checkpw", b"tim\0nope\0\0", ["true"], env["env"]).returncode == 1
    lines = env["sink"].lines()
    assert all("mech=PLAIN/LOGIN" in l for l in lines)
    assert "reason=\"bad password\"" in lines[-1]


def test_cmd5checkpw_random_challenges(env):
    for i in range(3):
        ch = f"<{os.urandom(6).hex()}.{i}@mx.test>".encode()
        good = b"tim\0" + cram(b"tanstaaftanstaaf", ch) + b"\0" + ch + b"\0"
        bad = b"tim\0" + cram(b"tanstaaftanstaafX", ch) + b"\0" + ch + b"\0"
        assert run_tool("cmd5checkpw", good, ["true"], env["env"]).returncode == 0
        assert run_tool("cmd5checkpw", bad, ["true"], env["env"]).returncode == 1


def test_cmd5checkpw_unreadable_passwd_111_and_mail_facility(env):
    e = dict(env["env"], MAILFILTER_SYSLOG_FACILITY="mail")
    r = run_tool("cmd5checkpw", b"tim\0x\0\0", ["true"], e, ("--passwd", str(env["tmp"] / "none")))
    assert r.returncode == 111
    (line,) = env["sink"].lines()
    assert line.startswith("<19>") and "cmd5checkpw[" in line     # mail.err = 2*8+3


def test_cmd5checkpw_user_without_cram_secret(env):
    ch = b"<1.2@x>"
    r = run_tool("cmd5checkpw", b"nocram\0" + cram(b"pw", ch) + b"\0" + ch + b"\0", ["true"], env["env"])
    assert r.returncode == 1
    assert "no CRAM-MD5 secret" in env["sink"].lines()[0]


def test_hostile_login_cannot_forge_log_lines(env):
    run_tool("cmd5checkpw", b"evil\nauth success user=root\0pw\0\0", ["true"], env["env"])
    (line,) = env["sink"].lines()
    assert "\n" not in line and "\\x0a" in line


# --- unknown users cost what known users cost --------------------------------------------
SCRYPT_MIB = 128        # cost 2^17, r=8: scrypt fills 128 * r * N bytes = 128 MiB


# Spawns the tool from a small fresh process and reports its exit code and
# ru_maxrss: a child's ru_maxrss starts from its parent's address space (the
# whole test runner's, over a vfork), so the parent must be small.
RSS_HELPER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], pass_fds=(3,), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
p.returncode = 0
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def tool_peak_rss_mib(tool, payload, argv, env, extra=()) -> tuple[int, float]:
    """Run the tool with `payload` on fd 3; its exit code and peak RSS in MiB
    -- a memory footprint, not a time."""
    r, w = os.pipe()
    try:
        os.write(w, payload)
        os.close(w)
        w = -1
        out = subprocess.run([PY, "-c", RSS_HELPER, *TOOL, tool, *extra, *argv], env=env,
                             capture_output=True, text=True, timeout=120, close_fds=False,
                             preexec_fn=lambda: _to_fd3(r))
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    assert out.returncode == 0, out.stderr
    code, kib = out.stdout.split()
    return int(code), int(kib) / 1024


@pytest.fixture
def costly_db(tmp_path):
    """Records made with scrypt cost 2^17 (the server default is 2^14), by the
    CLI in its own process (this process stays small)."""
    path = str(tmp_path / "costly.db")
    subprocess.run([*TOOL, "passwd", "--db", path, "--cost", "17", "add", "tim", "--stdin"],
                   input=b"tanstaaftanstaaf\n", check=True, capture_output=True, timeout=120)
    return path


@pytest.mark.parametrize("tool", ["checkpassword", "cmd5checkpw"])
def test_unknown_user_runs_the_scrypt_of_the_records(env, costly_db, tool):
    """An unknown login must cost the scrypt a known one costs, with the
    records' parameters (the tools skipped it: exit 1 came faster). Seen as
    the tool's peak memory: scrypt 2^17 needs 128 MiB, the tool alone a
    fraction of that."""
    e = dict(env["env"], MAILFILTER_USERDB=costly_db)
    code, known = tool_peak_rss_mib(tool, b"tim\0wrong\0\0", ["true"], e)
    assert code == 1 and known >= SCRYPT_MIB
    code, unknown = tool_peak_rss_mib(tool, b"ghost\0wrong\0\0", ["true"], e)
    assert code == 1 and unknown >= SCRYPT_MIB
    lines = env["sink"].lines()
    assert "bad password" in lines[0] and "unknown user" in lines[1]


def test_cmd5checkpw_unknown_user_cram_and_passwd_file_still_fail(env, tmp_path):
    ch = b"<1.2@x>"
    ghost = b"ghost\0" + cram(b"tanstaaftanstaaf", ch) + b"\0" + ch + b"\0"
    assert run_tool("cmd5checkpw", ghost, ["true"], env["env"]).returncode == 1
    pp = tmp_path / "poppasswd"
    pp.write_text("tim:tanstaaftanstaaf\ntim:second\n")
    for payload, code in ((ghost, 1), (b"ghost\0tanstaaftanstaaf\0\0", 1),
                          (b"tim\0tanstaaftanstaaf\0\0", 0), (b"tim\0second\0\0", 1)):
        assert run_tool("cmd5checkpw", payload, ["true"], env["env"],
                        ("--passwd", str(pp))).returncode == code
    assert sum("unknown user" in l for l in env["sink"].lines()) == 3
