"""The pure-Python events and states: the test oracle of _core/smtp_events.pxi
(tests/smtp/test_events.py, test_engine_diff.py). Their contract is
mailfilter/smtp/events.py's docstring; never imported by the package.
"""
from __future__ import annotations


# --- states: the package's own strings (compared by identity on both sides)
from mailfilter.smtp.events import (  # noqa: E402
    AUTH, BDAT, CHUNK, CLOSED, DATA, IDLE, MAIL, RCPT, STATES,
)


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


# --- events -------------------------------------------------------------------
class Event:
    """Base of all events. ``owes_reply``: the application must ``send()`` a reply."""

    __slots__ = ()
    owes_reply = False

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __hash__(self) -> int:
        return hash((type(self).__name__,) + tuple(getattr(self, s) for s in self.__slots__))

    def __repr__(self) -> str:
        args = ", ".join(f"{s}={getattr(self, s)!r}" for s in self.__slots__)
        return f"{type(self).__name__}({args})"


class Helo(Event):
    __slots__ = ("verb", "name")
    owes_reply = True

    def __init__(self, verb: str, name: str) -> None:
        self.verb = verb
        self.name = name


class Mail(Event):
    __slots__ = ("address", "params")
    owes_reply = True

    def __init__(self, address: str, params: dict) -> None:
        self.address = address
        self.params = params


class Rcpt(Event):
    __slots__ = ("address", "params", "routed")
    owes_reply = True

    def __init__(self, address: str, params: dict, routed: bool = False) -> None:
        self.address = address
        self.params = params
        self.routed = routed        # a source route was dropped from the path


class DataStart(Event):
    __slots__ = ()
    owes_reply = True


class BdatStart(Event):
    """The first BDAT of a transaction (RFC 3030 §2): answered as DataStart
    (354 to go on, not sent), then the chunk's octets arrive as DataChunks."""
    __slots__ = ("size", "last")
    owes_reply = True

    def __init__(self, size: int, last: bool) -> None:
        self.size = size
        self.last = last


class DataChunk(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class DataEnd(Event):
    __slots__ = ("size", "oversized", "hops", "bare_lf", "header_cut", "bad_bdat")
    owes_reply = True

    def __init__(self, size: int, oversized: bool, hops: int, bare_lf: bool,
                 header_cut: bool = False, bad_bdat: bool = False) -> None:
        self.size = size
        self.oversized = oversized
        self.hops = hops
        self.bare_lf = bare_lf
        self.header_cut = header_cut    # the header block passed the header size limit: cut
        self.bad_bdat = bad_bdat        # a malformed BDAT inside the message: its chunk discarded


class AuthStart(Event):
    __slots__ = ("mechanism", "initial")
    owes_reply = True

    def __init__(self, mechanism: str, initial: str | None) -> None:
        self.mechanism = mechanism
        self.initial = initial


class AuthResponse(Event):
    __slots__ = ("line",)
    owes_reply = True

    def __init__(self, line: bytes) -> None:
        self.line = line


class Rset(Event):
    __slots__ = ()


class StartTLS(Event):
    """STARTTLS without arguments, outside a transaction, not yet in TLS
    (RFC 3207 §4); the application answers 220 (then the TLS handshake) or
    454 (TLS not available)."""
    __slots__ = ()
    owes_reply = True


class Quit(Event):
    __slots__ = ()


class Noop(Event):
    __slots__ = ()


class Vrfy(Event):
    __slots__ = ("arg",)

    def __init__(self, arg: str) -> None:
        self.arg = arg


class Help(Event):
    __slots__ = ()


class Anomaly(Event):
    """Informational (logging): no reply owed. ``tag`` is one of the ANOMALY_* names."""

    __slots__ = ("tag", "detail")

    def __init__(self, tag: str, detail: object = None) -> None:
        self.tag = tag
        self.detail = detail


class Closed(Event):
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


# --- anomaly tags (the words the log uses) -----------------------------------------
ANOMALY_BARE_NEWLINE = "BARE NEWLINE"
ANOMALY_LINE_LIMIT = "COMMAND LENGTH LIMIT"
ANOMALY_UNKNOWN = "UNKNOWN COMMAND"
ANOMALY_SEQUENCE = "BAD SEQUENCE"
ANOMALY_SYNTAX = "SYNTAX"
ANOMALY_EIGHTBIT = "EIGHTBIT"
