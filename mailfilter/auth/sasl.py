"""Sans-IO SASL mechanisms for SMTP AUTH: PLAIN, LOGIN, CRAM-MD5.

Job: turn the client's AUTH argument and continuation lines into either the
next server challenge, the credentials to verify, or an error reply name from
the reply table. No I/O, no clocks except the CRAM-MD5 challenge's timestamp,
no verification (that is mailfilter.auth.verify's job).

    ex = new_exchange("PLAIN", hostname="mx.example.com")
    out = ex.start(initial)          # initial: str | None (None = no argument)
    while isinstance(out, Challenge):
        send 334 base64(out.data); out = ex.step(next_line)
    out is Credentials -> verify it;  out is Failure -> reply REPLIES[out.reply]

Rules (docs/behaviour/auth.md#dialogue, #mechanisms; RFC 4954, RFC 4616, RFC 2195,
draft-murchison-sasl-login):
- a continuation line equal to ``*`` cancels (501 ``auth_cancelled``);
- an empty continuation line, a line that is not strict base64, or decoded
  data that is not the mechanism's shape is ``auth_malformed`` (501 5.5.2);
- PLAIN: ``[authzid] NUL authcid NUL passwd`` (UTF-8); the initial response
  may be given on the AUTH line (``=`` = empty, which is malformed for
  PLAIN); without one the server sends ``334 `` (empty challenge). A
  non-empty authzid different from authcid is carried in Credentials and
  refused by the caller (we authorise nobody as someone else);
- LOGIN: optional initial response = user name; prompts ``Username:`` /
  ``Password:``; empty user or password is malformed;
- a NUL byte in any user name or password (LOGIN, PLAIN, CRAM-MD5 user) is
  malformed: the fields travel NUL-terminated on a checkprogram's fd 3, where
  a password ``digest NUL challenge`` would turn a LOGIN into a replayed
  CRAM-MD5 answer (PLAIN gets this from its split: a fourth field is
  malformed);
- CRAM-MD5: no initial response allowed (malformed); the challenge has the
  msg-id form ``<random.counter.timestamp@hostname>`` and is never reused
  within a process (a per-process counter) nor across processes (8 random
  bytes from os.urandom and the pid); the answer is ``user SP hexdigest``,
  split at the LAST space (Hoffmann; a user name may contain spaces).

Invariants: an exchange is single-use; after it returned Credentials or a
Failure, further calls raise RuntimeError. Secrets (passwords, digests) only
ever live in Credentials, whose repr hides them.
"""
from __future__ import annotations

import binascii
import itertools
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

__all__ = [
    "MECHANISMS", "Challenge", "Credentials", "Failure", "Exchange",
    "new_exchange", "new_challenge", "b64decode_line",
]

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


@dataclass(frozen=True, slots=True)
class Challenge:
    """The server must send ``334 base64(data)`` and feed the next line to step()."""
    data: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client proved it knows. ``secret`` is the password (PLAIN/LOGIN)
    or the hex HMAC-MD5 response (CRAM-MD5); ``challenge`` is the CRAM-MD5
    challenge (bytes, including the angle brackets) or None."""
    mechanism: str
    user: str
    secret: bytes = field(repr=False)
    challenge: bytes | None = None
    authzid: str = ""

    @property
    def cram(self) -> bool:
        return self.challenge is not None


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange ended without credentials; ``reply`` names a REPLIES entry."""
    reply: str              # "auth_cancelled" | "auth_malformed"
    reason: str             # for the log, never a secret


Outcome = Challenge | Credentials | Failure

_CANCELLED = Failure("auth_cancelled", "cancelled")


def b64decode_line(line: bytes | str) -> bytes | None:
    """Strict RFC 4648 base64 of one continuation line; None when malformed.

    Empty input is malformed here (docs/behaviour/auth.md#dialogue: "an empty continuation line
    ... is malformed"); callers that accept ``=`` translate it first.
    """
    if isinstance(line, str):
        try:
            line = line.encode("ascii")
        except UnicodeEncodeError:
            return None
    line = line.strip(b" \t")
    if not line:
        return None
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- CRAM-MD5 challenges -------------------------------------------------------
_counter = itertools.count(1)
_process_tag = os.urandom(8).hex()
_tag_pid = os.getpid()


def new_challenge(hostname: str, now: float | None = None) -> bytes:
    """A fresh RFC 2195 challenge ``<rand.pid.counter.time@hostname>`` (ASCII).

    Never reused: the counter is per process, the random tag is re-drawn in a
    forked child (pid changes), and both are in every challenge.
    """
    global _process_tag, _tag_pid
    pid = os.getpid()
    if pid != _tag_pid:            # forked worker: its own random tag
        _process_tag, _tag_pid = os.urandom(8).hex(), pid
    host = "".join(c for c in (hostname or "unknown") if c.isascii() and (c.isalnum() or c in ".-_[]:"))
    t = int(time.time() if now is None else now)
    return f"<{_process_tag}.{pid}.{next(_counter)}.{t}@{host or 'unknown'}>".encode("ascii")


# --- mechanisms -----------------------------------------------------------------
class Exchange(ABC):
    """One SASL exchange. Subclasses implement _start/_step."""

    mechanism = ""

    def __init__(self, hostname: str = "localhost") -> None:
        self.hostname = hostname
        self.done = False
        self.user: str | None = None      # known as soon as the client said it (for logs)

    def start(self, initial: str | None) -> Outcome:
        self._check()
        return self._finish(self._start(initial))

    def step(self, line: bytes) -> Outcome:
        self._check()
        if line.strip(b" \t") == b"*":
            return self._finish(_CANCELLED)
        data = b64decode_line(line)
        if data is None:
            return self._finish(Failure("auth_malformed", "bad base64"))
        return self._finish(self._step(data))

    def _check(self) -> None:
        if self.done:
            raise RuntimeError(f"{self.mechanism} exchange already finished")

    def _finish(self, out: Outcome) -> Outcome:
        if not isinstance(out, Challenge):
            self.done = True
        return out

    def _initial(self, initial: str) -> bytes | Failure:
        if initial == "*":
            return _CANCELLED
        if initial == "":           # "AUTH mech =": empty initial response (RFC 4954 §4)
            return b""
        data = b64decode_line(initial)
        return Failure("auth_malformed", "bad base64") if data is None else data

    @abstractmethod
    def _start(self, initial: str | None) -> Outcome: ...

    @abstractmethod
    def _step(self, data: bytes) -> Outcome: ...


class Plain(Exchange):
    """RFC 4616: one message ``[authzid] NUL authcid NUL passwd``."""

    mechanism = "PLAIN"

    def _start(self, initial: str | None) -> Outcome:
        if initial is None:
            return Challenge(b"")            # "334 " (docs/behaviour/auth.md#dialogue)
        data = self._initial(initial)
        return data if isinstance(data, Failure) else self._step(data)

    def _step(self, data: bytes) -> Outcome:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return Failure("auth_malformed", "PLAIN needs authzid NUL authcid NUL passwd")
        authzid, authcid, passwd = parts
        user, zid = _utf8(authcid), _utf8(authzid)
        if not user or zid is None or not passwd:
            return Failure("auth_malformed", "empty or non-UTF-8 PLAIN field")
        self.user = user
        return Credentials("PLAIN", user, passwd, None, zid)


class Login(Exchange):
    """draft-murchison-sasl-login: ``Username:`` then ``Password:``."""

    mechanism = "LOGIN"

    def __init__(self, hostname: str = "localhost") -> None:
        super().__init__(hostname)
        self._want = "user"

    def _start(self, initial: str | None) -> Outcome:
        if initial is None:
            return Challenge(b"Username:")
        data = self._initial(initial)
        return data if isinstance(data, Failure) else self._step(data)

    def _step(self, data: bytes) -> Outcome:
        if self._want == "user":
            user = _utf8(data)
            if not user or "\0" in user:
                return Failure("auth_malformed", "empty or non-UTF-8 user name")
            self.user = user
            self._want = "password"
            return Challenge(b"Password:")
        if not data:
            return Failure("auth_malformed", "empty password")
        if b"\0" in data:           # would add fields on a checkprogram's fd 3
            return Failure("auth_malformed", "NUL in password")
        return Credentials("LOGIN", self.user or "", data)


class CramMD5(Exchange):
    """RFC 2195: challenge, then ``user SP hexdigest``."""

    mechanism = "CRAM-MD5"

    def __init__(self, hostname: str = "localhost") -> None:
        super().__init__(hostname)
        self.challenge = b""

    def _start(self, initial: str | None) -> Outcome:
        if initial is not None:
            return Failure("auth_malformed", "CRAM-MD5 takes no initial response")
        self.challenge = new_challenge(self.hostname)
        return Challenge(self.challenge)

    def _step(self, data: bytes) -> Outcome:
        user_b, sp, digest = data.rpartition(b" ")   # Hoffmann: the LAST space
        user = _utf8(user_b)
        if not sp or not user or not digest or b"\0" in data:
            return Failure("auth_malformed", "CRAM-MD5 answer is not 'user digest'")
        self.user = user
        return Credentials("CRAM-MD5", user, digest, self.challenge)


_CLASSES: dict[str, type[Exchange]] = {"PLAIN": Plain, "LOGIN": Login, "CRAM-MD5": CramMD5}


def new_exchange(mechanism: str, hostname: str = "localhost") -> Exchange | None:
    """An exchange for `mechanism` (case-insensitive), None if we do not implement it."""
    cls = _CLASSES.get(mechanism.upper())
    return None if cls is None else cls(hostname)
