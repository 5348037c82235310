"""What every next hop is made of: Delivery, Sink, DeliveryResult, and the
replies and helpers the hops share.

Job: the contract between the SMTP side and a next hop (see the package
docstring for each hop's semantics). A Delivery is configured once from a
spec (`Delivery.from_spec`) and opens one Sink per message; the Sink's
commit gives the one DeliveryResult whose reply the client gets.

Invariants:
- "250 means stored" (docs/behaviour/delivery.md#250-means-stored): a result with ok=True
  (`queued`) is only made once the next hop holds the message durably; every failure of ours is
  `store_failed` (451) or a hop-specific 4xx/5xx.
- Each hop class registers the spec kind it parses as a class keyword
  (`class MaildirDelivery(Delivery, kind="maildir", form="maildir:DIR")`), so
  from_spec needs no list of the hop modules and no import of them: the
  package imports every hop, which registers it.
"""
from __future__ import annotations

import errno
import itertools
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

from mailfilter.delivery.envelope import Envelope
from mailfilter.smtp.replies import Reply, reply

__all__ = [
    "CHUNK", "HANDOVER_TIMEOUT", "TLS_OPTIONS", "Delivery", "DeliveryResult", "FixedResultSink", "Sink",
    "close_quietly", "local_id", "os_error_text", "queued", "store_failed",
]

CHUNK = 1 << 16            # read/write unit when streaming a message

# The longest a hand-over to qmail-queue or an smtp:/lmtp: next hop may take:
# under the 10 minutes a client waits for the reply to its final dot (RFC
# 5321 §4.5.3.2.6). Past that it has given up and will send the message
# again, so finishing later only makes a duplicate; at the deadline the
# hand-over is abandoned (qmail-queue killed before it commits) with 451.
HANDOVER_TIMEOUT = 540.0

# from_spec options only the hops that speak TLS take (see Delivery.from_spec)
TLS_OPTIONS = ("tls_verify", "tls_ca")


@dataclass
class DeliveryResult:
    ok: bool
    reply: Reply                # the final reply to the DATA transaction
    per_recipient: list[Reply] | None = None  # LMTP: downstream replies
    detail: str = ""            # for the log line; never holds a secret


def queued(qid: object, detail: str) -> DeliveryResult:
    """The 250 `ok <stamp> qp <qid>` result: only once the message is stored."""
    return DeliveryResult(True, reply("queued", stamp=int(time.time()), qid=qid),
                          None, detail)


def store_failed(detail: str) -> DeliveryResult:
    """The 451 result for a message we could not store (the client retries)."""
    return DeliveryResult(False, reply("store_failed"), None, detail)


_counter = itertools.count(1)
_pid = [os.getpid()]     # getpid() is a system call; refreshed in a forked child
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def local_id() -> str:
    """A process-unique id, `P<pid>Q<n>`: the qid of hops that have none of
    their own, and the tail of a maildir file's unique part."""
    return f"P{_pid[0]}Q{next(_counter)}"


def os_error_text(exc: BaseException) -> str:
    """`ENOSPC No space left on device` for the log line (else the type name)."""
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror}"
    return type(exc).__name__


def close_quietly(f) -> None:
    """Close a file being discarded; a failed final flush changes nothing."""
    try:
        f.close()
    except OSError:
        pass


class Sink(ABC):
    """One message in flight. write() is synchronous and cheap; the message
    is committed once, by commit_now() or else by awaiting commit();
    abort() drops the message and is idempotent."""

    __slots__ = ()

    @abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    async def commit(self) -> DeliveryResult: ...

    def commit_now(self) -> DeliveryResult | None:
        """Commit without waiting, when the sink can: the result, or None
        (nothing happened; await commit() instead). Only a sink whose commit
        needs no I/O answers here, so "250 means stored" holds either way;
        the server then skips a Task per message."""
        return None

    @abstractmethod
    def abort(self) -> None: ...


class FixedResultSink(Sink):
    """A sink that stores nothing and answers one fixed result at commit
    (`result` is called then): discard's 250, or the 451 of a store that
    could not even open a file."""
    __slots__ = ("_result", "_done")

    def __init__(self, result: Callable[[], DeliveryResult]) -> None:
        self._result = result
        self._done = False

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("write after commit/abort")

    async def commit(self) -> DeliveryResult:
        return self.commit_now()

    def commit_now(self) -> DeliveryResult:
        if self._done:
            raise RuntimeError("commit after commit/abort")
        self._done = True
        return self._result()

    def abort(self) -> None:
        self._done = True


class Delivery(ABC):
    """A configured next hop. open(env) -> Sink per message.

    A hop class registers its spec kind in its class line
    (`class MaildirDelivery(Delivery, kind="maildir", form="maildir:DIR")`)
    and then must have a classmethod `parse(arg, **options)`: the hop for the
    text after `kind:` ("" for a kind without one), ValueError when that text
    is malformed. Registration checks it, so from_spec never meets a kind
    it cannot parse."""

    spec: str = ""
    kind: ClassVar[str] = ""     # the spec's kind: `maildir`, `smtp+tls-required`, ...
    form: ClassVar[str] = ""     # the spec's shape, for errors: `maildir:DIR`
    speaks_tls: ClassVar[bool] = False   # takes TLS_OPTIONS (smtp:, lmtp: next hops)
    _kinds: ClassVar[dict[str, type[Delivery]]] = {}

    def __init_subclass__(cls, *, kind: str | None = None, form: str = "", **kw) -> None:
        super().__init_subclass__(**kw)
        if kind is not None:
            if kind in Delivery._kinds:
                raise TypeError(f"delivery kind {kind!r} registered twice")
            if not callable(getattr(cls, "parse", None)):
                raise TypeError(f"delivery kind {kind!r}: {cls.__name__} has no parse()")
            cls.form = form
            cls.kind = kind
            Delivery._kinds[kind] = cls

    @staticmethod
    def from_spec(spec: str, **options) -> Delivery:
        """Parse `maildir:DIR`, `qmail-queue:PROG [ARGS]`, `smtp:HOST:PORT`,
        `lmtp:HOST:PORT` (also `smtp+tls-required:`, `lmtp+tls-required:`)
        or `discard`. Options go to the class (timeouts...).
        A malformed spec raises ValueError naming the accepted forms.

        TLS_OPTIONS (`tls_verify`, `tls_ca`) are for hops that speak TLS;
        set on any other hop they are a ValueError naming the option (the
        operator asked for something that hop cannot do). Left at None or
        False they are dropped, so a configuration layer may pass its
        settings whatever the spec."""
        if not isinstance(spec, str):
            raise ValueError(f"delivery spec must be a string, not {type(spec).__name__}")
        kind, colon, arg = spec.strip().partition(":")
        cls = Delivery._kinds.get(kind)
        # a kind whose form has an argument needs the colon; `discard` has none
        if cls is not None and bool(colon) == (":" in cls.form):
            if not cls.speaks_tls:
                for name in TLS_OPTIONS:
                    if options.get(name) not in (None, False):
                        raise ValueError(f"option {name} is for smtp: and lmtp: next hops; "
                                         f"{cls.form} does not use TLS")
                    options.pop(name, None)
            return cls.parse(arg, **options)
        forms = [c.form for c in Delivery._kinds.values()]
        raise ValueError(f"bad delivery spec {spec!r}: expected "
                         + ", ".join(forms[:-1]) + " or " + forms[-1])

    @abstractmethod
    def open(self, env: Envelope) -> Sink: ...

    def check(self) -> None:
        """At start-up: raise OSError when this hop cannot work at all (an
        unusable spool, a missing qmail-queue program), so the operator sees
        it before any mail is deferred.
        Hops whose trouble is only known per message check nothing here."""
        return None

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"
