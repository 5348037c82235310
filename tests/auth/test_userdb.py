"""The SQLite user database (mailfilter/auth/userdb.py) and `mailfilter passwd`
(mailfilter/auth/cli.py)."""
import hmac
import json
import os
import random
import sqlite3
import subprocess
import threading

import pytest

from mailfilter.auth import userdb
from mailfilter.core import core
from mailfilter.auth.userdb import (
    SCHEMA_VERSION, PoppasswdError, UserDB, UserDBError, UserDBUnavailable, parse_poppasswd,
    parse_records,
)

from auth_helpers import TOOL

N = 1 << 10      # cheap scrypt for tests


@pytest.fixture
def db(tmp_path):
    d = UserDB(str(tmp_path / "var" / "users.db"), scrypt_n=N)
    yield d
    d.close()


def test_created_on_first_use_versioned_wal_0600(tmp_path):
    path = tmp_path / "var" / "users.db"
    assert not path.exists()
    UserDB(str(path)).close()
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in raw.execute("PRAGMA table_info(users)")]
    assert cols == ["name", "cram", "hash", "home", "uid", "gid", "maildir", "shell", "changed"]


def test_readonly_never_creates(tmp_path):
    with pytest.raises(UserDBUnavailable):
        UserDB(str(tmp_path / "nope.db"), readonly=True)
    assert not (tmp_path / "nope.db").exists()


def test_unknown_schema_version_refused(tmp_path):
    path = tmp_path / "u.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(UserDBUnavailable, match="schema version 99"):
        UserDB(str(path))


def test_not_a_database_is_unavailable(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserDBUnavailable):
        UserDB(str(path), readonly=True)


def test_record_never_holds_the_clear_password(db, tmp_path):
    pw = b"CorrectHorseBatteryStaple"
    db.add(db.make_user("tim", pw, home="/home/tim", uid=1000, gid=100, maildir="/m/tim"))
    db.close()
    for f in os.listdir(tmp_path / "var"):
        assert pw not in (tmp_path / "var" / f).read_bytes()
    with UserDB(str(tmp_path / "var" / "users.db"), readonly=True) as ro:
        u = ro.get("tim")
    assert (u.home, u.uid, u.gid, u.maildir) == ("/home/tim", 1000, 100, "/m/tim")
    assert u.cram == core.cram_states(pw) and u.hash.startswith(f"scrypt${N}$8$1$")
    assert u.check_password(pw) and not u.check_password(b"wrong")
    assert "Correct" not in repr(u)


def test_cram_rfc2195_from_the_database(db):
    db.add(db.make_user("tim", b"tanstaaftanstaaf"))
    u = db.get("tim")
    ch = b"<1896.697170952@postoffice.reston.mci.net>"
    assert u.check_cram(ch, b"b913a602c7eda7a495b4e6e7334d3890")
    assert not u.check_cram(ch, b"b913a602c7eda7a495b4e6e7334d3891")


def test_cram_userdb_vs_stdlib_hmac_random(db):
    rng = random.Random(4954)
    users = []
    for i in range(40):
        pw = rng.randbytes(rng.choice([1, 8, 63, 64, 65, 100])).replace(b"\0", b"x")
        users.append(db.make_user(f"u{i}", pw))
    db.put_many(users)
    for i, u in enumerate(users):
        rec = db.get(f"u{i}")
        pw = None
        for _ in range(5):
            ch = f"<{rng.getrandbits(64)}.{rng.getrandbits(32)}@h{i}>".encode()
            # recover the password we made: states must equal cram_states(pw) -> compare digests
            expect = core.cram_digest(u.cram, ch).hex().encode()
            assert rec.check_cram(ch, expect)
            assert rec.check_cram(ch, expect.upper())
            bad = bytearray(expect)
            bad[rng.randrange(32)] ^= 1
            assert not rec.check_cram(ch, bytes(bad))
    # and against the stdlib on known keys
    for _ in range(200):
        key = rng.randbytes(rng.randrange(1, 130))
        ch = rng.randbytes(rng.randrange(0, 300))
        st = core.cram_states(key)
        assert core.cram_verify(st, ch, hmac.new(key, ch, "md5").hexdigest().encode())


def test_no_cram_user_refuses_cram_but_not_plain(db):
    db.add(db.make_user("p", b"pw", cram=False))
    u = db.get("p")
    assert u.cram is None and not u.check_cram(b"<x>", b"0" * 32) and u.check_password(b"pw")


def test_inconsistent_record_refuses_plain(db):
    db.add(db.make_user("tim", b"one"))
    db.update("tim", cram=core.cram_states(b"two"))
    assert not db.get("tim").check_password(b"one")


def test_dummy_user_has_the_records_scrypt_parameters(tmp_path):
    with UserDB(str(tmp_path / "u.db"), scrypt_n=1 << 11) as d:
        assert d.typical_hash_params() == (1 << 11, 8, 1)        # no records: the DB's default
        d.put_many([d.make_user(f"u{i}", b"pw") for i in range(3)])
    with UserDB(str(tmp_path / "u.db"), scrypt_n=1 << 10) as d:
        d.add(d.make_user("newer", b"pw"))                     # one record at another cost
        assert d.typical_hash_params() == (1 << 11, 8, 1)      # the most common one
        dummy = d.dummy_user()
        assert userdb.hash_params(dummy.hash) == (1 << 11, 8, 1) and len(dummy.cram) == 32
        assert not dummy.check_password(b"pw") and not dummy.check_password(b"")
        assert dummy.hash != d.dummy_user().hash                 # random salt and key each time
    assert userdb.hash_params("scrypt$16384$8$1$c2FsdA==$a2V5") == (16384, 8, 1)
    assert userdb.hash_params("md5$x") is None and userdb.hash_params("scrypt$a$8$1$s$k") is None


def test_add_duplicate_set_delete(db):
    db.add(db.make_user("tim", b"a"))
    with pytest.raises(UserDBError):
        db.add(db.make_user("tim", b"b"))
    db.set_password("tim", b"b")
    assert db.get("tim").check_password(b"b")
    db.delete("tim")
    assert db.get("tim") is None
    with pytest.raises(UserDBError):
        db.delete("tim")
    for bad in ["", "a:b", " lead", "new\nline"]:
        with pytest.raises(UserDBError):
            db.make_user(bad, b"x")


def test_parse_poppasswd_ok_and_errors():
    text = "# cmd5checkpw sample\n\ntim:tanstaaftanstaaf\r\nalice:pa:ss:word\n  # indented comment\n"
    assert parse_poppasswd(text, "f") == [("tim", "tanstaaftanstaaf"), ("alice", "pa:ss:word")]
    bad = "tim:x\nnocolon\n:nologin\nbob:\ntim:again\n"
    with pytest.raises(PoppasswdError) as e:
        parse_poppasswd(bad, "pp")
    assert e.value.problems == [
        "pp:2: no ':' between login and password",
        "pp:3: invalid login",
        "pp:4: empty password for 'bob'",
        "pp:5: duplicate login 'tim' (first on line 1)",
    ]


def test_import_is_one_transaction(db):
    users = [db.make_user("a", b"1"), db.make_user("b", b"2")]
    db.add(db.make_user("b", b"old"))
    with pytest.raises(UserDBError):
        db.put_many(users, replace=False)        # 'b' exists: nothing written
    assert db.get("a") is None


EXPORT_KEYS = {"name", "cram", "hash", "home", "uid", "gid", "maildir", "shell", "changed"}


def test_records_round_trip(db):
    secrets = ["t1m-S3cret!pw", "n0cram-S3cret!pw"]
    db.put_many([db.make_user("tim", secrets[0].encode(), home="/h", uid=5, gid=6),
                 db.make_user("nocram", secrets[1].encode(), cram=False)])
    text = db.export_records()
    lines = text.splitlines()
    assert lines[0] == userdb.EXPORT_HEADER and len(lines) == 3
    records = [json.loads(line) for line in lines[1:]]
    # the documented fields and nothing else: no plaintext (or any other) extra field
    assert [set(r) for r in records] == [EXPORT_KEYS, EXPORT_KEYS]
    for secret in secrets:
        assert secret not in text
        assert secret.encode().hex() not in text
    assert [r["name"] for r in records] == ["nocram", "tim"]
    assert all(r["hash"].startswith("scrypt$") for r in records)
    users = parse_records(text, "x")
    assert [u.name for u in users] == ["nocram", "tim"]
    assert users[1].cram == db.get("tim").cram and users[0].cram is None
    with pytest.raises(PoppasswdError, match="x:4: bad record"):
        parse_records(text + '{"name": "bad"}\n', "x")


def test_concurrent_reader_while_writer(tmp_path):
    """WAL: a reader keeps reading (consistent snapshots) while a writer commits."""
    path = str(tmp_path / "u.db")
    w = UserDB(path, scrypt_n=N)
    w.add(w.make_user("seed", b"s"))
    made = [w.make_user(f"user{i}", b"pw") for i in range(300)]
    errors, seen = [], []
    stop = threading.Event()

    def reader():
        try:
            with UserDB(path, readonly=True, timeout=0.5) as r:
                while not stop.is_set():
                    assert r.get("seed") is not None
                    seen.append(len(r))
        except Exception as exc:          # pragma: no cover - the failure we test for
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    # a writer holding its transaction open must not block the reader
    w.db.execute("BEGIN IMMEDIATE")
    w.db.executemany("INSERT INTO users (name, cram, hash, changed) VALUES (?, ?, ?, 0)",
                     [(u.name, u.cram, u.hash) for u in made[:150]])
    n_before = len(seen)
    deadline = 200
    while len(seen) < n_before + 20 and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    w.db.execute("COMMIT")
    for u in made[150:]:
        w.add(u)
    stop.set()
    t.join(10)
    w.close()
    assert not errors
    assert len(seen) >= n_before + 20                     # reads went on during the write
    assert set(seen) <= {1} | {151} | set(range(152, 302))
    assert seen == sorted(seen)


# --- mailfilter passwd, as a real process ------------------------------------------------
def passwd(tmp_path, *args, input=None):
    return subprocess.run([*TOOL, "passwd", "--db", str(tmp_path / "u.db"), "--cost", "10", *args],
                          input=input, capture_output=True, text=True, timeout=60)


def test_passwd_cli_add_set_list_del(tmp_path):
    r = passwd(tmp_path, "add", "tim", "--stdin", "--home", "/home/tim", "--uid", "7", input="s3cret\n")
    assert r.returncode == 0, r.stderr
    again = passwd(tmp_path, "add", "tim", "--stdin", input="x\n")
    # one line naming the user, before any password is read; not SQLite's words
    assert again.returncode == 1
    assert again.stderr == "mailfilter passwd: user 'tim' exists (`passwd set` changes it)\n"
    assert passwd(tmp_path, "add", "empty", "--stdin", input="\n").returncode == 1
    out = passwd(tmp_path, "list").stdout
    assert out.startswith("tim\tcram=yes\tuid=7") and "s3cret" not in out
    assert passwd(tmp_path, "set", "tim", "--stdin", input="new\n").returncode == 0
    with UserDB(str(tmp_path / "u.db"), readonly=True) as db:
        u = db.get("tim")
        assert u.check_password(b"new") and u.home == "/home/tim" and u.uid == 7
    assert passwd(tmp_path, "set", "tim", "--keep-password", "--home", "/h2").returncode == 0
    assert passwd(tmp_path, "set", "nobody", "--keep-password").returncode == 1
    assert passwd(tmp_path, "del", "tim").returncode == 0
    assert passwd(tmp_path, "list").stdout == ""


def test_passwd_cli_import_export_round_trip(tmp_path):
    pp = tmp_path / "poppasswd"
    pp.write_text("# users\ntim:tanstaaftanstaaf\n\nalice:wonder:land\n")
    r = passwd(tmp_path, "import", str(pp))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"imported {pp}: 2 user(s) added, 0 replaced\n"
    exp = tmp_path / "export.txt"
    assert passwd(tmp_path, "export", "-o", str(exp)).returncode == 0
    assert (exp.stat().st_mode & 0o777) == 0o600
    text = exp.read_text()
    assert "tanstaaf" not in text and "wonder" not in text
    assert text.startswith(userdb.EXPORT_HEADER)
    other = tmp_path / "other"
    other.mkdir()
    r = passwd(other, "import", "--records", str(exp))
    assert r.returncode == 0, r.stderr
    with UserDB(str(other / "u.db"), readonly=True) as db:
        assert db.get("alice").check_password(b"wonder:land")
        assert db.get("tim").check_cram(b"<1896.697170952@postoffice.reston.mci.net>",
                                        b"b913a602c7eda7a495b4e6e7334d3890")
    # a re-import of a poppasswd file changes passwords but keeps attributes
    assert passwd(tmp_path, "set", "tim", "--keep-password", "--home", "/home/tim").returncode == 0
    pp.write_text("tim:changed\n")
    assert passwd(tmp_path, "import", str(pp)).returncode == 0
    with UserDB(str(tmp_path / "u.db"), readonly=True) as db:
        assert db.get("tim").check_password(b"changed") and db.get("tim").home == "/home/tim"


def test_passwd_cli_export_over_an_existing_file_is_0600(tmp_path):
    """The export can answer CRAM-MD5 challenges: an existing 0644 file must not
    keep its mode."""
    assert passwd(tmp_path, "add", "tim", "--stdin", input="s3cret\n").returncode == 0
    exp = tmp_path / "export.txt"
    exp.write_text("old\n")
    exp.chmod(0o644)
    r = passwd(tmp_path, "export", "-o", str(exp))
    assert r.returncode == 0, r.stderr
    assert (exp.stat().st_mode & 0o777) == 0o600
    assert exp.read_text().startswith(userdb.EXPORT_HEADER)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []


def test_passwd_cli_bad_import_reports_file_line_imports_nothing(tmp_path):
    pp = tmp_path / "pp"
    pp.write_text("good:pw\nbroken line\nalso:ok\n:x\n")
    r = passwd(tmp_path, "import", str(pp))
    assert r.returncode == 1
    assert f"{pp}:2: no ':' between login and password" in r.stderr
    assert f"{pp}:4: invalid login" in r.stderr
    assert "nothing imported" in r.stderr
    assert passwd(tmp_path, "list").stdout == ""


def test_passwd_cli_import_from_stdin(tmp_path):
    r = passwd(tmp_path, "import", "-", input="a:1\nb:2\n")
    assert r.returncode == 0 and r.stdout == "imported <stdin>: 2 user(s) added, 0 replaced\n"


def test_passwd_cli_import_counts_added_and_replaced_and_no_replace_keeps(tmp_path):
    assert passwd(tmp_path, "import", "-", input="a:1\nb:2\n").returncode == 0
    r = passwd(tmp_path, "import", "-", input="b:new\nc:3\n")
    assert r.returncode == 0 and r.stdout == "imported <stdin>: 1 user(s) added, 1 replaced\n"
    r = passwd(tmp_path, "import", "--no-replace", "-", input="a:other\nc:other\nd:4\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("imported <stdin>: 1 user(s) added, 0 replaced, "
                        "2 existing left as they were\n")
    with UserDB(str(tmp_path / "u.db"), readonly=True) as db:
        assert db.get("a").check_password(b"1") and db.get("c").check_password(b"3")
        assert db.get("b").check_password(b"new") and db.get("d").check_password(b"4")


def test_passwd_add_without_a_terminal_reads_stdin_without_a_warning(tmp_path):
    """No controlling terminal at all (a new session, stdin a pipe): the
    password is the first line of stdin, and no GetPassWarning is printed."""
    r = subprocess.run([*TOOL, "passwd", "--db", str(tmp_path / "u.db"), "--cost", "10",
                        "add", "tim"], input="s3cret\n", capture_output=True, text=True,
                       timeout=60, start_new_session=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == "added tim\n"
    with UserDB(str(tmp_path / "u.db"), readonly=True) as db:
        assert db.get("tim").check_password(b"s3cret")


def test_put_many_names_an_existing_user(tmp_path):
    with UserDB(str(tmp_path / "u.db"), scrypt_n=1 << 10) as db:
        db.add(db.make_user("tim", b"pw"))
        with pytest.raises(userdb.UserDBError, match="user 'tim' exists$"):
            db.add(db.make_user("tim", b"other"))
        assert db.get("tim").check_password(b"pw")
        assert db.put_many([db.make_user("tim", b"x"), db.make_user("ann", b"y")],
                           keep_existing=True, replace=False) == (1, 0)
        assert db.get("tim").check_password(b"pw")


def test_passwd_cli_reads_password_from_a_terminal_without_echo(tmp_path):
    """A real pseudo-terminal: prompts appear, the typed password is not echoed."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:                                           # child: the CLI on the pty
        os.execv(TOOL[0], [*TOOL, "passwd", "--db", str(tmp_path / "u.db"), "--cost", "10",
                           "add", "tim"])
    out = b""

    def read_until(token, limit=30.0):
        nonlocal out
        import time
        end = time.monotonic() + limit
        while token not in out and time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        return token in out

    assert read_until(b"Password: ")
    os.write(fd, b"TopSecret9\n")
    assert read_until(b"Again: ")
    os.write(fd, b"TopSecret9\n")
    read_until(b"added tim")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"added tim" in out and b"TopSecret9" not in out          # never echoed
    with UserDB(str(tmp_path / "u.db"), readonly=True) as db:
        assert db.get("tim").check_password(b"TopSecret9")
