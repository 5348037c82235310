"""Credential verifiers for SMTP AUTH: the user database, or an external
checkpassword-compatible program (qmail style).

Job: ``await verifier.verify(creds, client_env) -> Verdict`` with result
OK / FAIL (535) / TEMP (454), never blocking the event loop.

- DBVerifier: CRAM-MD5 in Cython from the stored HMAC-MD5 states
  (core.cram_verify, constant-time) on the loop -- it costs ~1 us; PLAIN/LOGIN
  run the scrypt check in a worker thread (an unknown user costs the same:
  an scrypt with the parameters the records use, UserDB.dummy_user(), and a
  CRAM-MD5 verification against random states, so the reply time does not
  tell which names exist). Successful PLAIN/LOGIN checks are
  remembered for ``cache_ttl`` seconds as HMAC(process key, password) bound to
  the record's hash string (like Dovecot's auth_cache), so a client that logs in
  every few minutes does not cost a scrypt each time; changing the password
  changes the hash string and so misses the cache.
  The database is opened read-only (SQLite ``mode=ro``): the server never
  creates it (``mailfilter passwd`` does); missing, unreadable or not a user
  database -> TEMP (454), never a 535 that would count towards lockouts.
  Opening happens only in a worker thread (SQLite may wait up to ``timeout``
  seconds on another process's lock). Before each lookup the path is stat'ed:
  another inode (``mv new.db users.db``) or no file means the connection is
  dropped and the file at the path reopened (missing -> TEMP), so a removed
  user or a replaced database takes effect on the next attempt. The lookup
  itself runs on the loop with a zero busy timeout when the connection is
  current; when SQLite reports a lock, or the file must be (re)opened, it is
  done in a worker thread instead.
- CheckpasswordVerifier (docs/behaviour/checkpassword.md#field-orders, #server-side):
  per attempt, spawn ``argv = [checkprogram, subprogram, ...]`` with fd 3 = the read end of a
  pipe holding the three NUL-terminated fields, stdin/stdout on /dev/null,
  the client's TCP* variables and PROTO=TCP in the environment; wait for it
  without blocking the loop (pidfd readable, else a thread) with a timeout,
  after which the child is killed (SIGKILL) and reaped.

fd 3 layouts (``fd3_payload``):
    PLAIN/LOGIN, both orders     user NUL password NUL NUL
    CRAM-MD5, order "djb"        user NUL hexdigest NUL challenge NUL   (default)
    CRAM-MD5, order "dabrowski"  user NUL challenge NUL hexdigest NUL
The payload is refused (FAIL, nothing spawned) above 512 bytes
(docs/behaviour/checkpassword.md#server-side) and when any field holds a NUL byte (it would shift
the fields: a LOGIN password ``digest NUL challenge`` read as a CRAM-MD5 answer).

Exit status mapping (docs/behaviour/checkpassword.md#exit-codes): 0 -> OK; 1, 3, 12, 13,
15, 20-23 -> FAIL; 2, 111, any other status, a signal, the timeout, a spawn error -> TEMP.

Invariants: secrets go to the child's pipe only, never to argv, environment,
logs or exception text; every child is reaped.
"""
from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import os
import shlex
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from mailfilter.auth.sasl import Credentials
from mailfilter.auth.userdb import DEFAULT_PATH, User, UserDB, UserDBBusy, UserDBUnavailable, dummy_hash

__all__ = [
    "Result", "Verdict", "ClientEnv", "DBVerifier", "CheckpasswordVerifier",
    "fd3_payload", "exit_result", "FD3_LIMIT", "FAIL_CODES",
]

FD3_LIMIT = 512                                    # DJB interface,
                                                   # docs/behaviour/checkpassword.md#the-fd-3-interface
FAIL_CODES = frozenset({1, 3, 12, 13, 15, 20, 21, 22, 23})   # vchkpw + DJB,
                                                             # docs/behaviour/checkpassword.md#exit-codes


class Result(enum.Enum):
    OK = "ok"
    FAIL = "fail"
    TEMP = "temp"


@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    reason: str = ""          # for the log, never a secret


@dataclass(frozen=True, slots=True)
class ClientEnv:
    """tcpserver-style facts about the connection (tcp-environ(5))."""
    remote_ip: str = ""
    remote_port: int = 0
    local_ip: str = ""
    local_port: int = 0
    remote_host: str = ""

    def environ(self) -> dict[str, str]:
        env = {"PROTO": "TCP", "TCPREMOTEIP": self.remote_ip, "TCPLOCALIP": self.local_ip,
               "TCPLOCALPORT": str(self.local_port), "TCPREMOTEPORT": str(self.remote_port)}
        if self.remote_host:
            env["TCPREMOTEHOST"] = self.remote_host
        return env


# --- the built-in database ---------------------------------------------------------
_WAIT = object()          # "this lookup needs a worker thread"


def _file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DBVerifier:
    """Verifies against the user database at ``path``: opened read-only (never
    created; missing or unreadable -> TEMP), opened only in a worker thread,
    and followed on disk (see the module docstring)."""

    timeout = 5.0       # seconds an open or lookup may wait on another process's lock

    def __init__(self, path: str = DEFAULT_PATH, *, cache_ttl: float = 300.0,
                 cache_size: int = 10_000, timeout: float | None = None):
        self.path = path
        if timeout is not None:
            self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._key = os.urandom(32)
        self._cache: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self._db: UserDB | None = None
        self._file: tuple[int, int] | None = None      # the file self._db has open
        self._lock = threading.Lock()                   # one user of self._db at a time
        self._dummy: tuple[User, float] | None = None   # (record, refresh after)
        self._cram_dummy = User("", os.urandom(32), "")

    def close(self) -> None:
        if self._lock.acquire(timeout=self.timeout):
            try:
                self._drop()
            finally:
                self._lock.release()

    # --- the connection (callers hold self._lock)
    def _drop(self) -> None:
        if self._db is not None:
            db, self._db, self._file = self._db, None, None
            db.close()

    def _current(self) -> bool:
        """Is the open connection the file now at self.path? (one stat)"""
        return self._db is not None and _file_id(self.path) == self._file

    def _open(self) -> UserDB:
        """The connection to the file now at self.path: reopened when the file
        was replaced (another inode) or removed. Blocking: worker thread only."""
        if self._current():
            return self._db
        self._drop()                    # replaced or removed: never keep using the old file
        for _ in range(3):
            before = _file_id(self.path)
            if before is None:
                raise UserDBUnavailable(f"{self.path}: no such user database")
            db = UserDB(self.path, readonly=True, timeout=self.timeout)
            if _file_id(self.path) == before:       # not replaced while we opened it
                db.set_busy_timeout(0)              # the loop's lookups never wait
                self._db, self._file = db, before
                self._dummy = None                  # its records' parameters are read anew
                return db
            db.close()
        raise UserDBUnavailable(f"{self.path}: replaced while being opened")

    def _lookup_now(self, name: str):
        """On the loop: the record when it can be had without waiting (connection
        open, file unchanged, no lock held by another process), else _WAIT."""
        if not self._lock.acquire(blocking=False):
            return _WAIT
        try:
            if not self._current():
                return _WAIT
            try:
                return self._db.get(name)
            except UserDBUnavailable:       # busy, or broken: the thread retries / reopens
                return _WAIT
        finally:
            self._lock.release()

    def _lookup_wait(self, name: str) -> User | None:
        """In a worker thread: (re)open as needed, wait up to `timeout` on locks."""
        if not self._lock.acquire(timeout=self.timeout):
            raise UserDBUnavailable(f"{self.path}: busy")
        try:
            db = self._open()
            db.set_busy_timeout(self.timeout)
            try:
                return db.get(name)
            finally:
                db.set_busy_timeout(0)
        except UserDBBusy:
            raise
        except UserDBUnavailable:
            self._drop()                    # reopened by the next attempt
            raise
        finally:
            self._lock.release()

    async def lookup(self, name: str) -> User | None:
        """The user's record in the file now at self.path (UserDBUnavailable)."""
        user = self._lookup_now(name)
        if user is _WAIT:
            user = await asyncio.to_thread(self._lookup_wait, name)
        return user

    # --- unknown users cost what known ones do (no timing oracle for names)
    DUMMY_REFRESH = 300.0      # seconds before the records' scrypt parameters are re-read

    def _dummy_record(self) -> User:
        """Worker thread: a record shaped like the real ones (UserDB.dummy_user:
        the scrypt parameters most records use), re-read on reopen and every
        DUMMY_REFRESH seconds; the last one (or the defaults) when the database
        cannot say."""
        now = time.monotonic()
        d = self._dummy
        if d is not None and d[1] > now:
            return d[0]
        rec = None
        if self._lock.acquire(timeout=self.timeout):
            try:
                if self._current():
                    rec = self._db.dummy_user()
            except UserDBUnavailable:
                pass
            finally:
                self._lock.release()
        if rec is None:
            rec = d[0] if d is not None else User("", os.urandom(32), dummy_hash())
        self._dummy = (rec, now + self.DUMMY_REFRESH)
        return rec

    def _dummy_check(self, secret: bytes) -> None:
        """Spend on an unknown user's PLAIN/LOGIN password what a known one costs."""
        self._dummy_record().check_password(secret)

    async def verify(self, creds: Credentials, env: ClientEnv | None = None) -> Verdict:
        try:
            user = await self.lookup(creds.user)
        except UserDBUnavailable as exc:
            return Verdict(Result.TEMP, f"user database unavailable: {exc}")
        if creds.cram:              # ~1 us either way; an unknown user runs it too
            if user is None or user.cram is None:
                self._cram_dummy.check_cram(creds.challenge, creds.secret)
                return Verdict(Result.FAIL, "unknown user" if user is None else "no CRAM-MD5 secret")
            ok = user.check_cram(creds.challenge, creds.secret)
            return Verdict(Result.OK) if ok else Verdict(Result.FAIL, "bad digest")
        # the cache key binds the record's hash string as just read from the
        # current file: a changed password, a removed user or a replaced file
        # (another record, another salt) misses it
        tag = hmac.new(self._key, creds.secret, hashlib.sha256).digest()
        if user is None:            # the same scrypt as a known user's record
            await asyncio.to_thread(self._dummy_check, creds.secret)
            return Verdict(Result.FAIL, "unknown user")
        key = (user.name, user.hash)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now and hmac.compare_digest(hit[0], tag):
            self._cache.move_to_end(key)
            return Verdict(Result.OK, "cached")
        ok = await asyncio.to_thread(user.check_password, creds.secret)
        if not ok:
            return Verdict(Result.FAIL, "bad password")
        if self.cache_ttl > 0:
            self._cache[key] = (tag, now + self.cache_ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return Verdict(Result.OK)


# --- an external checkpassword program -----------------------------------------------
def fd3_payload(creds: Credentials, order: str = "djb") -> bytes:
    """The bytes written to the checkprogram's fd 3 (docs/behaviour/checkpassword.md#field-orders).

    ValueError when a field holds a NUL byte: it would end that field early and
    let the client choose the next ones (a LOGIN password ``digest NUL
    challenge`` is a CRAM-MD5 answer to cmd5checkpw). mailfilter/auth/sasl.py
    already refuses such input as malformed; this is the second line of
    defence."""
    user = creds.user.encode("utf-8", "surrogateescape")
    if b"\0" in user or b"\0" in creds.secret or (creds.cram and b"\0" in creds.challenge):
        raise ValueError("NUL byte in a credentials field")
    if not creds.cram:
        return user + b"\0" + creds.secret + b"\0\0"
    if order == "dabrowski":
        return user + b"\0" + creds.challenge + b"\0" + creds.secret + b"\0"
    return user + b"\0" + creds.secret + b"\0" + creds.challenge + b"\0"


def exit_result(status: int) -> Verdict:
    """Map a waitpid() status to a Verdict (docs/behaviour/checkpassword.md#exit-codes)."""
    if os.WIFSIGNALED(status):
        return Verdict(Result.TEMP, f"killed by signal {os.WTERMSIG(status)}")
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return Verdict(Result.OK)
    if code in FAIL_CODES:
        return Verdict(Result.FAIL, f"checkpassword exit {code}")
    return Verdict(Result.TEMP, f"checkpassword exit {code}")


class CheckpasswordVerifier:
    """Spawns ``argv`` per attempt, fd 3 per docs/behaviour/checkpassword.md#field-orders,
    asynchronously."""

    def __init__(self, argv: list[str] | str, *, order: str = "djb", timeout: float = 10.0,
                 base_env: dict[str, str] | None = None):
        self.argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if not self.argv:
            raise ValueError("--checkpassword needs a program")
        if order not in ("djb", "dabrowski"):
            raise ValueError("--checkpassword-order must be djb or dabrowski")
        self.order = order
        self.timeout = timeout
        self.base_env = dict(os.environ if base_env is None else base_env)

    def close(self) -> None:
        pass

    async def verify(self, creds: Credentials, env: ClientEnv | None = None) -> Verdict:
        try:
            payload = fd3_payload(creds, self.order)
        except ValueError:                               # nothing spawned
            return Verdict(Result.FAIL, "NUL byte in credentials")
        if len(payload) > FD3_LIMIT:                     # docs/behaviour/checkpassword.md#server-side: before spawning
            return Verdict(Result.FAIL, "credentials over 512 bytes")
        child_env = dict(self.base_env)
        if env is not None:
            child_env.update(env.environ())
        try:
            pid = _spawn(self.argv, payload, child_env)
        except OSError as exc:
            return Verdict(Result.TEMP, f"cannot start checkpassword: {exc.strerror or exc}")
        try:
            status = await asyncio.wait_for(_wait(pid), self.timeout)
        except asyncio.TimeoutError:
            _kill(pid)
            await _wait(pid)
            return Verdict(Result.TEMP, "checkpassword timed out")
        except asyncio.CancelledError:
            _kill(pid)
            asyncio.get_running_loop().create_task(_wait(pid))   # still reaped
            raise
        return exit_result(status)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_DEVNULL: int | None = None


def _spawn(argv: list[str], payload: bytes, env: dict[str, str]) -> int:
    """posix_spawn with fd 3 = a pipe already holding `payload` (<= 512 bytes,
    far below the pipe buffer, so the write never blocks) and stdin/stdout on
    /dev/null; stderr is shared for the program's diagnostics."""
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    r, w = os.pipe()                                      # both O_CLOEXEC
    try:
        os.write(w, payload)
        os.close(w)
        w = -1
        actions = [(os.POSIX_SPAWN_DUP2, _DEVNULL, 0), (os.POSIX_SPAWN_DUP2, _DEVNULL, 1)]
        if r == 3:
            os.set_inheritable(r, True)    # dup2(3, 3) would keep FD_CLOEXEC on old libcs
        else:
            actions.append((os.POSIX_SPAWN_DUP2, r, 3))
        return os.posix_spawnp(argv[0], argv, env, file_actions=actions)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


async def _wait(pid: int) -> int:
    """The child's wait status, without blocking the loop."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    if fd < 0:                                            # no pidfd: a thread waits
        return (await asyncio.to_thread(os.waitpid, pid, 0))[1]
    try:
        while True:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:                     # reaped elsewhere: treat as crash
                return 255 << 8
            if got == pid:
                return status
            fut = loop.create_future()
            loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(fd)
    finally:
        os.close(fd)


def make_verifier(*, checkpassword: str | None, order: str = "djb", userdb: str | None = None,
                  timeout: float = 10.0):
    """The server's verifier from its options: external program if given, else the DB."""
    if checkpassword:
        return CheckpasswordVerifier(checkpassword, order=order, timeout=timeout)
    return DBVerifier(userdb or DEFAULT_PATH)
