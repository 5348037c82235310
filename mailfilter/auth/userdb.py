"""The user database for SMTP AUTH and the checkpassword tools (SQLite).

Job: store, per user, what PLAIN/LOGIN and CRAM-MD5 need to verify a login and
what a checkpassword program needs to start the next program (home, uid, gid,
maildir, shell) -- and never the clear password (docs/behaviour/auth.md#user-database; issue 4).

Schema (PRAGMA user_version = 1)::

    CREATE TABLE users (
        name    TEXT PRIMARY KEY,            -- login, as given (case-sensitive)
        cram    BLOB CHECK (cram IS NULL OR length(cram) = 32),
                                             -- HMAC-MD5 inner+outer states,
                                             -- core.cram_states(password);
                                             -- NULL = CRAM-MD5 disabled for user
        hash    TEXT NOT NULL,               -- "scrypt$N$r$p$salt_b64$key_b64"
        home    TEXT NOT NULL DEFAULT '',
        uid     INTEGER,                     -- NULL: do not change ids
        gid     INTEGER,
        maildir TEXT NOT NULL DEFAULT '',
        shell   TEXT NOT NULL DEFAULT '',
        changed INTEGER NOT NULL             -- unix time of the last change
    )

Verification (the documented choice for "PLAIN/LOGIN verified against the
same record"):
- CRAM-MD5: ``core.cram_verify(cram, challenge, hexdigest)`` -- Cython,
  constant-time. The states are plaintext-equivalent FOR CRAM-MD5 ONLY, as in
  Dovecot's CRAM-MD5 scheme: whoever has them can answer CRAM challenges, but
  cannot log in with PLAIN/LOGIN, because those are checked against:
- PLAIN/LOGIN: the salted scrypt hash (RFC 7914; N=2^14, r=8, p=1 by default,
  the parameters travel in the hash string), compared with hmac.compare_digest.
  When the record also has CRAM states, ``cram_states(password)`` must equal
  them too (constant-time): both secrets come from one password written in one
  transaction, and a record whose two halves disagree refuses PLAIN/LOGIN
  rather than silently trusting one half. The scrypt check is the slow part
  (~tens of ms); the server runs it in a worker thread
  (mailfilter/auth/verify.py).
- An unknown user costs the same: the server and both checkpassword tools
  check the password against ``dummy_user()`` -- random secrets, the scrypt
  parameters most common among the records -- and only then fail, so the
  time of a failure does not tell which login names exist (whatever --cost
  the records were made with). CRAM-MD5 likewise verifies against random
  states.

Invariants:
- the clear password never reaches the file, a log or an exception message;
- WAL journal mode: readers (the server, the tools) are never blocked by
  ``mailfilter passwd`` writing; every write is one transaction (bulk
  imports included: all or nothing);
- the file is created on first use (mode 0600, parent dir 0700 if created);
  read-only opens (``readonly=True``) never create it and raise
  UserDBUnavailable instead;
- an unknown schema version is an error, never guessed at.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass

from mailfilter.core import core

__all__ = [
    "DEFAULT_PATH", "SCHEMA_VERSION", "User", "UserDB", "UserDBError", "UserDBUnavailable", "UserDBBusy",
    "hash_password", "check_hash", "hash_params", "dummy_hash", "parse_poppasswd", "PoppasswdError",
    "EXPORT_HEADER",
]

DEFAULT_PATH = os.path.join("var", "users.db")
SCHEMA_VERSION = 1
EXPORT_HEADER = "# mailfilter-userdb-export v1"

# RFC 7914 §2 suggests N=2^14, r=8, p=1 for interactive logins (16 MiB, ~50 ms).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
_SCRYPT_MAXMEM = 256 * 1024 * 1024

_SCHEMA = """
CREATE TABLE users (
    name    TEXT PRIMARY KEY,
    cram    BLOB CHECK (cram IS NULL OR length(cram) = 32),
    hash    TEXT NOT NULL,
    home    TEXT NOT NULL DEFAULT '',
    uid     INTEGER,
    gid     INTEGER,
    maildir TEXT NOT NULL DEFAULT '',
    shell   TEXT NOT NULL DEFAULT '',
    changed INTEGER NOT NULL
);
"""


class UserDBError(Exception):
    """A usage error (bad name, unknown user, bad import line...)."""


class UserDBUnavailable(UserDBError):
    """The database cannot be opened or read: a temporary failure (exit 111 / 454)."""


class UserDBBusy(UserDBUnavailable):
    """SQLite said busy/locked: another process holds a lock (retry after waiting)."""


def _unavailable(path: str, exc: sqlite3.Error) -> UserDBUnavailable:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    cls = UserDBBusy if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) else UserDBUnavailable
    return cls(f"{path}: {exc}")


@dataclass(frozen=True, slots=True)
class User:
    name: str
    cram: bytes | None          # 32 bytes or None
    hash: str
    home: str = ""
    uid: int | None = None
    gid: int | None = None
    maildir: str = ""
    shell: str = ""
    changed: int = 0

    def __repr__(self) -> str:   # secrets stay out of reprs and tracebacks
        return f"User(name={self.name!r}, home={self.home!r}, uid={self.uid}, gid={self.gid})"

    def check_cram(self, challenge: bytes, hexdigest: bytes) -> bool:
        """CRAM-MD5 (RFC 2195) from the stored states, constant-time (Cython)."""
        return self.cram is not None and core.cram_verify(self.cram, challenge, hexdigest)

    def check_password(self, password: bytes) -> bool:
        """PLAIN/LOGIN: scrypt hash AND (when present) the CRAM states agree. Slow."""
        ok = check_hash(self.hash, password)
        if self.cram is not None:
            ok = hmac.compare_digest(core.cram_states(password), self.cram) and ok
        return ok


# --- password hashing ------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def hash_password(password: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                  salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$key`` (base64 salt and 32-byte key)."""
    salt = os.urandom(16) if salt is None else salt
    key = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def hash_params(stored: str) -> tuple[int, int, int] | None:
    """(N, r, p) of a hash_password() string, None when it is not one."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    return (n, r, p) if n > 1 and r > 0 and p > 0 else None


def dummy_hash(n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A hash string that no password matches (random salt and key), made
    without running scrypt; checking a password against it costs one scrypt
    with these parameters, as checking a real record with them does."""
    return f"scrypt${n}${r}${p}${_b64(os.urandom(16))}${_b64(os.urandom(32))}"


def check_hash(stored: str, password: bytes) -> bool:
    """Constant-time check of `password` against a hash_password() string."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        salt_b, key_b = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
        got = hashlib.scrypt(password, salt=salt_b, n=int(n), r=int(r), p=int(p),
                             maxmem=_SCRYPT_MAXMEM, dklen=len(key_b))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, key_b)


def valid_name(name: str) -> bool:
    """A login is 1..255 printable characters without ':' (poppasswd separator)
    and without NUL/CR/LF/space-at-edges (it travels in fd 3 and log lines)."""
    return (0 < len(name.encode("utf-8", "surrogateescape")) <= 255 and ":" not in name
            and name == name.strip() and all(c.isprintable() for c in name))


# --- poppasswd files (docs/behaviour/auth.md#user-database) --------------------------------------
class PoppasswdError(UserDBError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_poppasswd(text: str, path: str = "-") -> list[tuple[str, str]]:
    """``login:password`` lines (cmd5checkpw / poppasswd, docs/behaviour/auth.md#user-database).

    The login ends at the FIRST ':'; the password is the rest of the line (it
    may contain ':'). Blank lines and lines starting with '#' are skipped; a
    trailing CR is dropped. Every bad line (no ':', empty or invalid login,
    empty password, duplicate login) is reported as ``path:line: problem``;
    when there is any, PoppasswdError lists them all and nothing is returned.
    """
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for no, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        login, sep, password = line.partition(":")
        if not sep:
            problems.append(f"{path}:{no}: no ':' between login and password")
        elif not valid_name(login):
            problems.append(f"{path}:{no}: invalid login")
        elif not password:
            problems.append(f"{path}:{no}: empty password for {login!r}")
        elif "\0" in password:
            problems.append(f"{path}:{no}: NUL byte in password for {login!r}")
        elif login in seen:
            problems.append(f"{path}:{no}: duplicate login {login!r} (first on line {seen[login]})")
        else:
            seen[login] = no
            out.append((login, password))
    if problems:
        raise PoppasswdError(problems)
    return out


def lookup_poppasswd(path: str, login: str) -> str | None:
    """The clear password of `login` in a poppasswd file (first match), or None.
    The whole file is read either way (a known login costs what an unknown
    one does). OSError propagates (the caller maps it to a temporary failure)."""
    found = None
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for raw in fh:
            line = raw.rstrip("\n").rstrip("\r")
            if not line or line.startswith("#"):
                continue
            name, sep, password = line.partition(":")
            if sep and name == login and found is None:
                found = password
    return found


# --- the database ----------------------------------------------------------------
class UserDB:
    """One SQLite connection to the user database. Not shared between threads."""

    def __init__(self, path: str = DEFAULT_PATH, *, readonly: bool = False,
                 scrypt_n: int = SCRYPT_N, timeout: float = 5.0):
        self.path = path
        self.readonly = readonly
        self.scrypt_n = scrypt_n
        try:
            if readonly:
                if not os.path.isfile(path):
                    raise UserDBUnavailable(f"{path}: no such user database")
                self.db = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True,
                                          timeout=timeout, isolation_level=None,
                                          check_same_thread=False)
            else:
                parent = os.path.dirname(path)
                if parent and not os.path.isdir(parent):
                    os.makedirs(parent, mode=0o700, exist_ok=True)
                fresh = not os.path.exists(path)
                if fresh:   # create with 0600 before SQLite opens it
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                self.db = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                                          check_same_thread=False)
            self._check_schema()
        except sqlite3.Error as exc:
            if getattr(self, "db", None) is not None:
                self.db.close()
            raise _unavailable(path, exc) from None
        except OSError as exc:
            raise UserDBUnavailable(f"{path}: {exc.strerror or exc}") from None

    def _check_schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise UserDBUnavailable(f"{self.path}: schema version {version}, "
                                    f"this mailfilter knows {SCHEMA_VERSION}")
        if self.readonly:
            raise UserDBUnavailable(f"{self.path}: not a mailfilter user database")
        # version 0: a new file. WAL is persistent once set (readers never wait on writers).
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("PRAGMA user_version").fetchone()[0] == 0:
                self.db.execute(_SCHEMA)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a statement waits on another process's lock (0: fail at once
        with UserDBBusy, for callers that must not block)."""
        self.db.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    def __enter__(self) -> "UserDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reads
    def get(self, name: str) -> User | None:
        try:
            row = self.db.execute(
                "SELECT name, cram, hash, home, uid, gid, maildir, shell, changed "
                "FROM users WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error as exc:
            raise _unavailable(self.path, exc) from None
        return None if row is None else User(*row)

    def typical_hash_params(self, sample: int = 256) -> tuple[int, int, int]:
        """The scrypt (N, r, p) most common among the `sample` most recently
        added records; this database's defaults when it has none."""
        try:
            rows = self.db.execute("SELECT hash FROM users ORDER BY rowid DESC LIMIT ?",
                                   (sample,)).fetchall()
        except sqlite3.Error as exc:
            raise _unavailable(self.path, exc) from None
        counts = Counter(filter(None, (hash_params(h) for (h,) in rows)))
        if not counts:
            return self.scrypt_n, SCRYPT_R, SCRYPT_P
        return counts.most_common(1)[0][0]

    def dummy_user(self) -> User:
        """A record no login matches, shaped like the real ones: checking an
        unknown user's password against it costs what a known user's costs
        (an scrypt with the parameters the records use, plus the CRAM states
        compare), so the time of a failure does not tell which names exist."""
        return User(name="", cram=os.urandom(32), hash=dummy_hash(*self.typical_hash_params()))

    def users(self) -> list[User]:
        try:
            rows = self.db.execute(
                "SELECT name, cram, hash, home, uid, gid, maildir, shell, changed "
                "FROM users ORDER BY name").fetchall()
        except sqlite3.Error as exc:
            raise UserDBUnavailable(f"{self.path}: {exc}") from None
        return [User(*r) for r in rows]

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM users").fetchone()[0]

    # --- writes (each one transaction)
    def make_user(self, name: str, password: bytes, *, cram: bool = True, **attrs) -> User:
        """A record for `name`/`password` (hashing happens here, not in SQL)."""
        if not valid_name(name):
            raise UserDBError(f"invalid login {name!r}")
        if not password or b"\0" in password:
            raise UserDBError("empty password or NUL byte in password")
        return User(name=name, cram=core.cram_states(password) if cram else None,
                    hash=hash_password(password, n=self.scrypt_n), changed=int(time.time()),
                    **attrs)

    def add(self, user: User, *, replace: bool = False) -> None:
        self.put_many([user], replace=replace)

    def put_many(self, users: list[User], *, replace: bool = True,
                 passwords_only: bool = False, keep_existing: bool = False) -> tuple[int, int]:
        """Insert all records in ONE transaction (all or nothing); returns
        (added, replaced). An existing name is an error (UserDBError naming
        it), unless `replace` (the whole record is replaced), `passwords_only`
        (only its secrets change; home/uid/... are kept) or `keep_existing`
        (it is left as it is and not counted)."""
        verb = "INSERT OR REPLACE" if replace and not passwords_only else "INSERT"
        tail = (" ON CONFLICT(name) DO UPDATE SET cram = excluded.cram, hash = excluded.hash, "
                "changed = excluded.changed") if passwords_only else ""
        try:
            with self._tx():
                existing = self._existing([u.name for u in users])
                if keep_existing:
                    users = [u for u in users if u.name not in existing]
                elif existing and not (replace or passwords_only):
                    first = sorted(existing)[0]
                    more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
                    raise UserDBError(f"user {first!r} exists{more}")
                self.db.executemany(
                    f"{verb} INTO users (name, cram, hash, home, uid, gid, maildir, shell, changed) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)" + tail,
                    [(u.name, u.cram, u.hash, u.home, u.uid, u.gid, u.maildir, u.shell,
                      u.changed or int(time.time())) for u in users])
        except sqlite3.IntegrityError as exc:
            raise UserDBError(f"bad record: {exc}") from None
        names = {u.name for u in users}
        replaced = len(names & existing)
        return len(names) - replaced, replaced

    def _existing(self, names: list[str]) -> set[str]:
        """Which of `names` have a record (in chunks: SQLite binds at most
        999 parameters per statement in older builds)."""
        found: set[str] = set()
        unique = list(dict.fromkeys(names))
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(
                f"SELECT name FROM users WHERE name IN ({marks})", chunk))
        return found

    def update(self, name: str, **fields) -> None:
        allowed = {"cram", "hash", "home", "uid", "gid", "maildir", "shell"}
        bad = set(fields) - allowed
        if bad:
            raise UserDBError(f"cannot update {sorted(bad)}")
        fields["changed"] = int(time.time())
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx():
            cur = self.db.execute(f"UPDATE users SET {cols} WHERE name = ?", (*fields.values(), name))
            if cur.rowcount == 0:
                raise UserDBError(f"no such user {name!r}")

    def set_password(self, name: str, password: bytes, *, cram: bool = True) -> None:
        u = self.make_user(name, password, cram=cram)
        self.update(name, cram=u.cram, hash=u.hash)

    def delete(self, name: str) -> None:
        with self._tx():
            if self.db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise UserDBError(f"no such user {name!r}")

    def _tx(self):
        db = self.db

        class _Tx:
            def __enter__(self_):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_, et, ev, tb):
                db.execute("COMMIT" if et is None else "ROLLBACK")
                return False
        return _Tx()

    # --- export / import of records (secrets stay hashed)
    def export_records(self) -> str:
        """Header line, then one JSON object per user (``cram`` hex or null).

        The CRAM states are plaintext-equivalent for CRAM-MD5: treat the
        export like the database itself (the CLI writes it mode 0600)."""
        lines = [EXPORT_HEADER]
        for u in self.users():
            d = asdict(u)
            d["cram"] = None if u.cram is None else u.cram.hex()
            lines.append(json.dumps(d, sort_keys=True, ensure_ascii=False))
        return "\n".join(lines) + "\n"


def parse_records(text: str, path: str = "-") -> list[User]:
    """Read back export_records(); bad lines -> PoppasswdError(path:line: ...)."""
    users: list[User] = []
    problems: list[str] = []
    seen: set[str] = set()
    lines = text.split("\n")
    if not lines or lines[0].strip() != EXPORT_HEADER:
        raise PoppasswdError([f"{path}:1: not a mailfilter user export ({EXPORT_HEADER!r} expected)"])
    for no, line in enumerate(lines[1:], 2):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            d = json.loads(line)
            cram = None if d.get("cram") is None else bytes.fromhex(d["cram"])
            u = User(name=d["name"], cram=cram, hash=d["hash"], home=d.get("home", ""),
                     uid=d.get("uid"), gid=d.get("gid"), maildir=d.get("maildir", ""),
                     shell=d.get("shell", ""), changed=int(d.get("changed", 0)))
            if not valid_name(u.name) or (cram is not None and len(cram) != 32) \
                    or not u.hash.startswith("scrypt$"):
                raise ValueError("invalid field")
            if u.name in seen:
                raise ValueError(f"duplicate login {u.name!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{path}:{no}: bad record: {exc}")
            continue
        seen.add(u.name)
        users.append(u)
    if problems:
        raise PoppasswdError(problems)
    return users


def _uri_path(path: str) -> str:
    from urllib.parse import quote
    return quote(os.path.abspath(path))
