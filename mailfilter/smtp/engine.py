"""Sans-IO SMTP server engine: bytes in, events out, replies back.

No sockets, no asyncio, no policy. The I/O shell (server.py) feeds received bytes
with ``receive_data()``, drains ``next_event()`` until ``NEED_DATA``, answers the
events that owe a reply with ``send()``, and writes ``data_to_send()`` once per
batch, so pipelined commands are answered in one write (RFC 2920, SPEC B §7.3).
The pattern is h11's ``_connection.py`` / ``_state.py``; the command table and the
DATA byte machine follow qmail-smtpd (SPEC B §1.4-§1.6, §1.11).

Theory of operation
-------------------

Input is framed in one of three modes:

* command mode: lines up to LF, one CR before it removed (SPEC B §1.4); at most
  ``max_line`` octets including the terminator (RFC 5321 §4.5.3.1). A longer line
  is answered ``500 5.5.2`` once and discarded up to its LF. A line ending in a bare
  LF is accepted and reported as ``Anomaly("BARE NEWLINE")``.
* auth mode: every line (up to ``max_auth_line`` octets) is an ``AuthResponse``.
* data mode: the byte machine below.

Session states (``conn.state``) and the transitions. An engine-answered command
never changes the state except where noted; "reply" is the class of the code the
application passes to ``send()`` for the pending event::

    state  input / reply                  -> state   effect
    -----  -----------------------------     -------  ----------------------------
    any    HELO/EHLO (event Helo)           -> IDLE    transaction dropped at once
             reply 2xx                        IDLE     helo := name
    any    RSET (engine: 250)               -> IDLE    transaction dropped; Rset
    any    QUIT (engine: 221)               -> CLOSED  Quit, then Closed("quit")
    IDLE   MAIL (event Mail) reply 2xx      -> MAIL    sender := address
    MAIL+  MAIL (engine: 503 nested)           same
    IDLE   RCPT / DATA (engine: 503 MAIL first)
    MAIL   DATA (engine: 503 RCPT first)
    MAIL+  RCPT (event Rcpt) reply 2xx      -> RCPT    recipient appended
    RCPT   DATA (event DataStart) reply 354 -> DATA    byte machine on
             other reply                    -> IDLE    transaction dropped (qmail)
    DATA   end of data / bare LF (DataEnd)     DATA    (reply owed)
             any reply                      -> IDLE    transaction done
             any reply after bare_lf=True   -> CLOSED  qmail drops the session
    IDLE   AUTH (event AuthStart)
             reply 334                      -> AUTH    next line is an AuthResponse
             reply 2xx (235)                -> IDLE    authenticated := True
             other                          -> IDLE
    AUTH   line (event AuthResponse)           as AuthStart
    MAIL+  AUTH (engine: 503 no auth during mail transaction)
    any    AUTH when authenticated (engine: 503 already authenticated)
    any    reply 421 (engine or app)         -> CLOSED  Closed(reason)
    any    max_bad_commands reached          -> CLOSED  421 4.7.0 after the error
    any    EOF                               -> CLOSED  Closed("eof")

``MAIL+`` = MAIL or RCPT. While a reply is owed ``next_event()`` returns ``PAUSED``
and nothing further is parsed, so replies always leave in command order. A 221 sent
by the application closes like QUIT.

Who answers what. The engine answers, from the reply table, everything that needs
no policy: unknown verbs (500 unimplemented), over-long lines (500), syntax errors (555/501),
bad sequence (503), ``SIZE=`` above databytes (552), unknown parameters (555),
8-bit addresses without SMTPUTF8 (553 5.6.7), the recipient hard cap (452), NOOP,
VRFY (252), HELP (214), RSET (250), QUIT (221), too many bad commands (421).
Informational events (Rset, Noop, Vrfy, Help, Quit, Anomaly, DataChunk) owe
nothing. The application answers Helo (``helo_reply()`` / ``ehlo_reply()``), Mail,
Rcpt, DataStart (354 to go on), DataEnd (``data_end_check()`` gives the bare LF /
hop / size verdict in qmail order), AuthStart and AuthResponse (334 to go on).

DATA byte machine (SPEC B §1.11, §7.1). The first region gets a virtual CRLF in
front (dropped again from the stored form), which turns the "first line is '.'" case into the
general ``CRLF . CRLF`` search and makes the first line's dot-stuffing regular.
Each pass takes everything buffered except a suffix that may begin an end marker
(``\\r``, ``\\r\\n``, ``\\r\\n.``, ``\\r\\n.\\r``: at most 4 bytes carried over), so a
region never ends inside a CRLF pair and never ends at a line start. Per region,
all bulk operations:

* end: ``find(b"\\r\\n.\\r\\n")``;
* bare LF: ``count(b"\\n") != count(b"\\r\\n")`` (the smuggling forms ``\\n.\\r\\n``
  and ``\\r\\n.\\n`` are bare LFs); on a hit the data before the first bare LF is
  delivered and ``DataEnd(bare_lf=True)`` is emitted at once;
* storage form: ``replace(b"\\r\\n", b"\\n").replace(b"\\n.", b"\\n")`` (CRLF -> LF,
  dot-unstuffing; a CR not followed by LF stays);
* size: length as stored; over ``databytes`` the chunks stop (the stored prefix up
  to exactly ``databytes`` octets is delivered), the input is consumed up to the end
  of data and ``DataEnd(oversized=True)`` reports the full stored size;
* hops: in the header block (up to the first empty line) lines starting with
  ``received`` or ``delivered`` (ASCII case-insensitive) are counted over the stored
  form; only complete lines are counted, an incomplete line's first 10 bytes are
  carried to the next region.

Commands pipelined after the end of data stay buffered until the application has
replied to ``DataEnd``.
"""
from __future__ import annotations

import functools
import re
from collections import deque
from dataclasses import dataclass, field

import mailfilter
from mailfilter.smtp.replies import REPLIES, Reply, multiline, reply

__all__ = [
    "EngineConfig", "SMTPConnection", "EngineError", "MultiReply",
    "NEED_DATA", "PAUSED",
    "IDLE", "MAIL", "RCPT", "DATA", "AUTH", "CLOSED",
    "Event", "Helo", "Mail", "Rcpt", "DataStart", "DataChunk", "DataEnd",
    "AuthStart", "AuthResponse", "Rset", "Quit", "Noop", "Vrfy", "Help",
    "Anomaly", "Closed",
]

# --- states -------------------------------------------------------------------
IDLE = "IDLE"        # no mail transaction
MAIL = "MAIL"        # MAIL accepted, no recipient yet
RCPT = "RCPT"        # at least one recipient accepted
DATA = "DATA"        # reading the message
AUTH = "AUTH"        # inside an AUTH exchange
CLOSED = "CLOSED"    # 221/421 sent or EOF: input ignored


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


class EngineError(RuntimeError):
    """The application broke the protocol with the engine (e.g. a reply nobody asked for)."""


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
    __slots__ = ("address", "params")
    owes_reply = True

    def __init__(self, address: str, params: dict) -> None:
        self.address = address
        self.params = params


class DataStart(Event):
    __slots__ = ()
    owes_reply = True


class DataChunk(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class DataEnd(Event):
    __slots__ = ("size", "oversized", "hops", "bare_lf")
    owes_reply = True

    def __init__(self, size: int, oversized: bool, hops: int, bare_lf: bool) -> None:
        self.size = size
        self.oversized = oversized
        self.hops = hops
        self.bare_lf = bare_lf


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


ANOMALY_BARE_NEWLINE = "BARE NEWLINE"
ANOMALY_LINE_LIMIT = "COMMAND LENGTH LIMIT"
ANOMALY_UNKNOWN = "UNKNOWN COMMAND"
ANOMALY_SEQUENCE = "BAD SEQUENCE"
ANOMALY_SYNTAX = "SYNTAX"
ANOMALY_EIGHTBIT = "EIGHTBIT"


class MultiReply:
    """A multi-line reply (RFC 5321 §4.2.1) that ``send()`` accepts like a Reply."""

    __slots__ = ("code", "enhanced", "lines", "_wire")

    def __init__(self, code: int, lines: list[str], enhanced: str = "") -> None:
        self.code = code
        self.enhanced = enhanced
        self.lines = tuple(lines)     # read-only: the wire form is memoized
        self._wire: bytes | None = None

    def line(self) -> bytes:
        wire = self._wire
        if wire is None:
            wire = self._wire = multiline(self.code, self.lines, self.enhanced)
        return wire

    def __repr__(self) -> str:
        return f"MultiReply({self.code}, {self.lines!r}, {self.enhanced!r})"


def host_of(greeting: str) -> str:
    """The server's name in replies: the greeting's first word (qmail: the
    first word of smtpgreeting), "localhost" for an empty greeting."""
    words = greeting.split()
    return words[0] if words else "localhost"


@functools.lru_cache(maxsize=256)
def _ehlo_reply(greeting: str, keywords: tuple[str, ...]) -> MultiReply:
    """The EHLO answer, built once per (greeting, keywords): per connection
    only a handful of variants exist (the AUTH offer differs by client)."""
    first = REPLIES["helo"].format(greeting=greeting)
    return MultiReply(first.code, [first.text, *keywords])


@functools.lru_cache(maxsize=256)
def _named_line(name: str, greeting: str) -> bytes:
    """Wire form of a reply whose only field is the greeting (220, 221):
    the same bytes for every connection of a configuration."""
    return reply(name, greeting=greeting).line()


# --- configuration ------------------------------------------------------------
@dataclass
class EngineConfig:
    greeting: str = "localhost"          # first word = host name
    max_line: int = 512                  # octets incl. CRLF, RFC 5321 §4.5.3.1
    max_auth_line: int = 12288           # SASL continuation lines, RFC 4954 §4
    databytes: int = 0                   # 0 = unlimited; advertised as SIZE n
    max_bad_commands: int = 10
    max_recipients: int = 1000           # hard cap; policy may add a lower one
    max_hops: int = 100                  # used by SMTPConnection.data_end_check
    product: str = mailfilter.PRODUCT
    version: str = mailfilter.__version__
    features: list[str] = field(default_factory=list)   # HELP, e.g. "spamcontrol-compat"
    help_url: str = ""
    extra_ehlo: list[str] = field(default_factory=list)  # e.g. ["AUTH PLAIN LOGIN"]
    smtputf8: bool = False


# --- constants for the hot path -----------------------------------------------
_END = b"\r\n.\r\n"
_CRLF = b"\r\n"
_LF = b"\n"
_LFDOT = b"\n."
_HDR_END = b"\n\n"
_RECEIVED = b"\nreceived"
_DELIVERED = b"\ndelivered"
_MAX_ADDRESS = 900          # qmail addrparse limit (SPEC B §1.6 step 6)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_XDIGITS = frozenset(b"0123456789ABCDEFabcdef")

# Wire form of every fixed reply (no placeholders), so the hot path never formats.
_LINES: dict = {r: r.line() for r in REPLIES.values() if "{" not in r.text}
_NOOP_LINE = REPLIES["noop"].line()
_RSET_LINE = REPLIES["rset"].line()
_VRFY_LINE = REPLIES["vrfy"].line()


class _ParseError(Exception):
    """Internal: an argument error with the reply that answers it."""

    def __init__(self, reply: Reply, tag: str = ANOMALY_SYNTAX, detail: object = None,
                 bad: bool = True) -> None:
        self.reply = reply
        self.tag = tag
        self.detail = detail
        self.bad = bad


# Verbs the log may name: ours, other SMTP/ESMTP verbs, and what other
# protocols send by mistake (HTTP through a proxy, POP3).
_NAMED_VERBS = frozenset((
    b"HELO", b"EHLO", b"LHLO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"VRFY",
    b"EXPN", b"HELP", b"QUIT", b"AUTH", b"STARTTLS", b"TURN", b"ETRN", b"ATRN", b"SEND", b"SOML",
    b"SAML", b"VERB", b"ONEX", b"XCLIENT", b"XFORWARD", b"CONNECT", b"GET", b"POST", b"HEAD",
    b"PUT", b"OPTIONS", b"USER", b"PASS", b"CAPA", b"STLS",
))


def _verb_label(line: bytes) -> str:
    """What the log may say about a command line: its verb when it is a known
    one, else only the line's length. Anything else may be a secret: a
    password a client pipelined after an AUTH that was refused arrives here as
    an "unknown verb", and base64 can look like a word (DESIGN: no secret is
    logged)."""
    verb = line.split(b" ", 1)[0].upper()
    if verb in _NAMED_VERBS:
        return verb.decode("ascii")
    return f"<{len(line)} bytes>"


def _path(arg: bytes, keyword: bytes) -> tuple[bytes, bytes]:
    """Split ``FROM:<path> params`` into (address bytes, params bytes).

    RFC 5321 keyword (case-insensitive), brackets required (spamcontrol, SPEC B
    §2.8 step 2), spaces tolerated between the colon and ``<``, quotes and
    backslashes removed (SPEC B §1.6 step 4), a source route dropped (step 3).
    """
    k = len(keyword)
    if arg[:k].upper() != keyword:
        raise _ParseError(REPLIES["syntax"], detail="keyword")
    rest = arg[k:].lstrip(b" ")
    if rest[:1] != b"<":
        raise _ParseError(REPLIES["syntax"], detail="brackets")
    if b'"' in rest or b"\\" in rest:
        addr, after = _quoted_path(rest)
    else:
        gt = rest.find(b">")
        if gt < 0:
            raise _ParseError(REPLIES["syntax"], detail="brackets")
        addr = rest[1:gt]
        after = rest[gt + 1:]
    if after and after[:1] != b" ":
        raise _ParseError(REPLIES["syntax"], detail="after path")
    if addr[:1] == b"@":
        colon = addr.find(b":")
        if colon < 0:
            raise _ParseError(REPLIES["syntax"], detail="source route")
        addr = addr[colon + 1:]
    if len(addr) >= _MAX_ADDRESS:
        raise _ParseError(REPLIES["address_too_long"])
    return addr, after


def _quoted_path(rest: bytes) -> tuple[bytes, bytes]:
    """Slow path of _path: a path with quotes or backslashes (rare, <= max_line)."""
    out = bytearray()
    quoted = False
    i, n = 1, len(rest)
    while i < n:
        c = rest[i]
        if c == 0x5C:  # backslash: next byte literally
            i += 1
            if i < n:
                out.append(rest[i])
        elif c == 0x22:  # "
            quoted = not quoted
        elif c == 0x3E and not quoted:  # >
            return bytes(out), rest[i + 1:]
        else:
            out.append(c)
        i += 1
    raise _ParseError(REPLIES["syntax"], detail="brackets")


def _xtext(value: bytes) -> str:
    """RFC 3461 §4 xtext decoding (``+XX``), as used by AUTH= (RFC 4954 §5);
    xtext is printable ASCII, so an 8-bit byte is a syntax error."""
    if not value.isascii():
        raise _ParseError(REPLIES["syntax_args"], detail="xtext")
    if b"+" not in value:
        return value.decode("ascii")
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == 0x2B:
            h = value[i + 1:i + 3]
            if len(h) != 2 or h[0] not in _XDIGITS or h[1] not in _XDIGITS:
                raise _ParseError(REPLIES["syntax_args"], detail="xtext")
            out.append(int(h, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return out.decode("utf-8", "surrogateescape")


_ESMTP_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")


def _unknown_param(param: bytes) -> _ParseError:
    """555 naming an unknown parameter (RFC 5321 §4.1.1.11) when its name is
    an esmtp-keyword (ALPHA/DIGIT/"-", §4.1.2) of sane length; anything else
    is 501 and is not echoed: client bytes in a reply could break its
    textstring (§4.2: HT, SP and printable ASCII) or its 512 octets."""
    key = param.partition(b"=")[0]
    if _ESMTP_KEYWORD.match(key) is None:
        return _ParseError(REPLIES["syntax_args"], detail="parameter name")
    name = key.decode("ascii")
    return _ParseError(REPLIES["param_unknown"].format(param=name), detail=name)


def _first_bare_lf(region: bytes) -> int:
    """Index of the first LF not preceded by CR (caller knows there is one)."""
    i = region.find(_LF)
    while i > 0 and region[i - 1] == 13:
        i = region.find(_LF, i + 1)
    return i


class SMTPConnection:
    """One SMTP server session, sans-IO. See the module docstring."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = cfg = config if config is not None else EngineConfig()
        self._host = host_of(cfg.greeting)
        self._extra_ehlo = list(cfg.extra_ehlo)
        # the application's word on whether AUTH is offered to this client:
        # None = it decides every AUTH itself; False = not offered, so AUTH
        # goes to it whatever its arguments (503 comes before any 501)
        self.auth_offered: bool | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: deque = deque()
        self._pending: Event | None = None
        self._state = IDLE
        self._eof = False
        self._closed: Closed | None = None
        self._close_reason: str | None = None
        self.close_reply: Reply | None = None   # the last reply, when it closed the session
        self._skipping = False          # discarding the rest of an over-long line
        self._max_line = cfg.max_line
        self._max_auth_line = cfg.max_auth_line
        self.helo: str | None = None
        self.esmtp = False
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.mail_params: dict = {}
        self.authenticated = False
        self.bad_commands = 0
        self._data_reset()

    # --- public API ---------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def host(self) -> str:
        """This server's name in replies: the greeting's first word."""
        return self._host

    @property
    def closing(self) -> bool:
        return self._state is CLOSED

    @property
    def pending(self) -> Event | None:
        """The event a reply is owed for, if any."""
        return self._pending

    def set_extra_ehlo(self, lines: list[str]) -> None:
        """Per-session extra EHLO keywords (the AUTH offer depends on the client)."""
        self._extra_ehlo = list(lines)

    def ehlo_keywords(self) -> list[str]:
        cfg = self.config
        kw = ["PIPELINING", f"SIZE {cfg.databytes}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if cfg.smtputf8:
            kw.append("SMTPUTF8")
        kw.extend(self._extra_ehlo)
        return kw

    def ehlo_reply(self, name: str | None = None) -> MultiReply:
        """The multi-line 250 answer to EHLO; ``name`` defaults to the greeting."""
        return _ehlo_reply(name if name is not None else self.config.greeting,
                           tuple(self.ehlo_keywords()))

    def helo_reply(self, name: str | None = None) -> Reply:
        return reply("helo", greeting=name if name is not None else self.config.greeting)

    def greet(self) -> None:
        """Queue the 220 greeting."""
        self._out.append(_named_line("greeting", self.config.greeting))

    def data_end_refusal(self, ev: DataEnd) -> str | None:
        """Why the engine refuses a DataEnd, as the name of its reply (qmail
        order, SPEC B §1.11): "bare_lf", "too_many_hops", "size_exceeded"; None
        when it does not."""
        if ev.bare_lf:
            return "bare_lf"
        if ev.hops >= self.config.max_hops:
            return "too_many_hops"
        if ev.oversized:
            return "size_exceeded"
        return None

    def data_end_check(self, ev: DataEnd) -> Reply | None:
        """The engine-level verdict for a DataEnd (data_end_refusal's reply), or None."""
        name = self.data_end_refusal(ev)
        return None if name is None else REPLIES[name]

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; ``b""`` means EOF."""
        if self._state is CLOSED:
            return
        if data:
            if self._eof:
                raise EngineError("receive_data after EOF")
            self._buf += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """All queued output, for one write."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def abort(self, r: Reply) -> None:
        """Send an unsolicited final reply (421 timeout/shutdown/internal error) and close."""
        self._out.append(r.line())
        self._pending = None
        self._events.clear()
        self._close(f"{r.code}", r)

    def send(self, r: Reply | MultiReply, close: bool = False) -> None:
        """The application's reply to the pending event; applies the transition.
        `close`: hang up after this reply (spamcontrol's notorious-session 503,
        SPEC B §2.8); nothing buffered or pipelined after it is processed."""
        ev = self._pending
        if ev is None:
            raise EngineError("send() without a pending event")
        self._pending = None
        line = _LINES.get(r)
        self._out.append(line if line is not None else r.line())
        code = r.code
        if code == 421 or code == 221 or close:
            self._close("quit" if code == 221 else str(code), r)
            return
        cls = code // 100
        t = type(ev)
        if t is Mail:
            if cls == 2:
                self.sender = ev.address
                self.mail_params = ev.params
                self.recipients = []
                self._state = MAIL
        elif t is Rcpt:
            if cls == 2:
                self.recipients.append(ev.address)
                self._state = RCPT
        elif t is DataStart:
            if code == 354:
                self._state = DATA
                self._data_reset()
            else:
                self._reset_transaction()
        elif t is DataEnd:
            self._reset_transaction()
            if ev.bare_lf:
                self._close("bare lf", r)
        elif t is Helo:
            if cls == 2:
                self.helo = ev.name
                self.esmtp = ev.verb == "EHLO"
        elif t is AuthStart or t is AuthResponse:
            if code == 334:
                self._state = AUTH
            else:
                self._state = IDLE
                if cls == 2:
                    self.authenticated = True
        else:  # pragma: no cover - only reply-owing events become pending
            raise EngineError(f"unexpected pending event {ev!r}")

    def next_event(self):
        """The next Event, or NEED_DATA, or PAUSED (a reply is still owed)."""
        events = self._events
        if events:
            return events.popleft()
        if self._pending is not None:
            return PAUSED
        if self._state is CLOSED:
            return self._closed_event()
        if not self._buf and not self._eof:
            return NEED_DATA            # fast path: the common second call per read
        if self._state is DATA:
            self._data_step()
        else:
            self._command_step()
        if events:
            return events.popleft()
        if self._state is CLOSED:
            return self._closed_event()
        if self._eof:
            self._close("eof")
            return self._closed_event()
        return NEED_DATA

    # --- internals: state helpers -------------------------------------------
    def _closed_event(self) -> Closed:
        if self._closed is None:
            self._closed = Closed(self._close_reason or "eof")
        return self._closed

    def _close(self, reason: str, r: Reply | None = None) -> None:
        if self._state is not CLOSED:
            self._state = CLOSED
            self._close_reason = reason
            self.close_reply = r
            self._buf.clear()

    def _reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        self.mail_params = {}
        if self._state is not CLOSED:
            self._state = IDLE

    def _emit(self, ev: Event) -> None:
        self._events.append(ev)
        if ev.owes_reply:
            self._pending = ev

    def _answer(self, r: Reply | MultiReply) -> None:
        line = _LINES.get(r)
        self._out.append(line if line is not None else r.line())

    def _bad(self, r: Reply, tag: str, detail: object = None) -> None:
        """Answer a client error, report it, count it; 421 at the limit."""
        self._answer(r)
        self._events.append(Anomaly(tag, detail))
        self.bad_commands += 1
        if self.bad_commands >= self.config.max_bad_commands:
            r = reply("too_many_errors", host=self._host)
            self._out.append(r.line())
            self._close("too many errors", r)

    # --- internals: line framing --------------------------------------------
    def _command_step(self) -> None:
        """Process lines until an event is queued, input runs out or the session closes."""
        buf = self._buf
        events = self._events
        commands = _COMMANDS
        # every path that closes the session also queues an event, ending the loop
        while not events:
            if self._skipping:
                i = buf.find(_LF)
                if i < 0:
                    buf.clear()
                    return
                del buf[:i + 1]
                self._skipping = False
                continue
            limit = self._max_auth_line if self._state is AUTH else self._max_line
            i = buf.find(_LF, 0, limit)
            if i < 0:
                if len(buf) >= limit:
                    self._skipping = True
                    if self._state is AUTH:
                        self._state = IDLE
                        self._bad(REPLIES["auth_line_too_long"], ANOMALY_LINE_LIMIT, "AUTH")
                    else:
                        self._bad(REPLIES["line_too_long"], ANOMALY_LINE_LIMIT, None)
                    continue
                return
            if i and buf[i - 1] == 13:
                line = bytes(buf[:i - 1])
            else:
                line = bytes(buf[:i])
                # the verb only, never the rest: an AUTH line carries a secret
                events.append(Anomaly(ANOMALY_BARE_NEWLINE,
                                      "AUTH response" if self._state is AUTH else _verb_label(line)))
            del buf[:i + 1]
            if self._state is AUTH:
                self._emit(AuthResponse(line))
                return
            sp = line.find(b" ")
            if sp < 0:
                verb, arg = line, b""
            else:
                verb, arg = line[:sp], line[sp + 1:].lstrip(b" ")
            handler = commands.get(verb.upper())
            if handler is None:
                self._bad(REPLIES["unrecognized"], ANOMALY_UNKNOWN, _verb_label(verb))
            else:
                handler(self, arg)

    # --- internals: commands ------------------------------------------------
    def _cmd_helo(self, arg: bytes, verb: str = "HELO") -> None:
        name = arg.strip(b" ")
        if not name:
            self._bad(REPLIES["helo_syntax"], ANOMALY_SYNTAX, verb)
            return
        if not name.isascii():
            self._events.append(Anomaly(ANOMALY_EIGHTBIT, verb))
        self._reset_transaction()
        self._emit(Helo(verb, name.decode("latin-1")))

    def _cmd_ehlo(self, arg: bytes) -> None:
        self._cmd_helo(arg, "EHLO")

    def _cmd_mail(self, arg: bytes) -> None:
        if self.sender is not None:
            self._bad(REPLIES["nested_mail"], ANOMALY_SEQUENCE, "MAIL")
            return
        try:
            addr, rest = _path(arg, b"FROM:")
            params = self._mail_params(rest) if rest else {}
            address = self._address(addr, params)
            size = params.get("SIZE")
            db = self.config.databytes
            if db and size is not None and size > db:
                raise _ParseError(REPLIES["size_exceeded"], bad=False)
        except _ParseError as e:
            self._reject(e, "MAIL")
            return
        self._emit(Mail(address, params))

    def _cmd_rcpt(self, arg: bytes) -> None:
        if self.sender is None:
            self._bad(REPLIES["mail_first"], ANOMALY_SEQUENCE, "RCPT")
            return
        try:
            addr, rest = _path(arg, b"TO:")
            if not addr:
                raise _ParseError(REPLIES["syntax"], detail="empty recipient")
            params = rest.split()      # whitespace-only is no parameter, as at MAIL
            if params:
                raise _unknown_param(params[0])
            address = self._address(addr, self.mail_params)
        except _ParseError as e:
            self._reject(e, "RCPT")
            return
        if len(self.recipients) >= self.config.max_recipients:
            self._answer(REPLIES["too_many_rcpts"])
            return
        self._emit(Rcpt(address, {}))

    def _cmd_data(self, arg: bytes) -> None:
        if self.sender is None:
            self._bad(REPLIES["mail_first"], ANOMALY_SEQUENCE, "DATA")
        elif not self.recipients:
            self._bad(REPLIES["rcpt_first"], ANOMALY_SEQUENCE, "DATA")
        elif arg.strip(b" "):
            self._bad(REPLIES["syntax_args"], ANOMALY_SYNTAX, "DATA")
        else:
            self._emit(DataStart())

    def _cmd_rset(self, arg: bytes) -> None:
        self._reset_transaction()
        self._out.append(_RSET_LINE)
        self._events.append(Rset())

    def _cmd_noop(self, arg: bytes) -> None:
        self._out.append(_NOOP_LINE)
        self._events.append(Noop())

    def _cmd_vrfy(self, arg: bytes) -> None:
        self._out.append(_VRFY_LINE)
        self._events.append(Vrfy(arg.decode("latin-1")))

    def _cmd_help(self, arg: bytes) -> None:
        cfg = self.config
        feats = [k.split()[0] for k in self.ehlo_keywords()] + list(cfg.features)
        lines = [REPLIES["help"].format(product=cfg.product, version=cfg.version).text,
                 REPLIES["help_features"].format(features=" ".join(feats)).text]
        if cfg.help_url:
            lines.append(REPLIES["help_url"].format(url=cfg.help_url).text)
        self._answer(MultiReply(REPLIES["help"].code, lines, REPLIES["help"].enhanced))
        self._events.append(Help())

    def _cmd_quit(self, arg: bytes) -> None:
        self._out.append(_named_line("quit", self.config.greeting))
        self._events.append(Quit())
        self._close("quit")

    def _cmd_auth(self, arg: bytes) -> None:
        if self.authenticated:
            self._bad(REPLIES["auth_already"], ANOMALY_SEQUENCE, "AUTH")
            return
        if self.sender is not None:
            self._bad(REPLIES["auth_in_mail"], ANOMALY_SEQUENCE, "AUTH")
            return
        parts = arg.split()
        if self.auth_offered is False:     # RFC 4954 §4: not advertised -> 503, however malformed
            self._emit(AuthStart(parts[0].upper().decode("ascii", "replace") if parts else "", None))
            return
        if not parts or len(parts) > 2 or not arg.isascii():
            self._bad(REPLIES["syntax_args"], ANOMALY_SYNTAX, "AUTH")
            return
        mech = parts[0].upper().decode("ascii")
        initial = None
        if len(parts) == 2:
            initial = "" if parts[1] == b"=" else parts[1].decode("ascii")
        self._emit(AuthStart(mech, initial))

    # --- internals: argument helpers ----------------------------------------
    def _reject(self, e: _ParseError, verb: str) -> None:
        if e.bad:
            self._bad(e.reply, e.tag, e.detail if e.detail is not None else verb)
        else:
            self._answer(e.reply)

    def _mail_params(self, rest: bytes) -> dict:
        params: dict = {}
        for p in rest.split():
            key, eq, val = p.partition(b"=")
            k = key.upper()
            if k == b"SIZE":
                if not eq or not val.isdigit() or len(val) > 20:
                    raise _ParseError(REPLIES["syntax_args"], detail="SIZE")
                v: object = int(val)
            elif k == b"BODY":
                v = val.upper().decode("latin-1")
                if v not in ("7BIT", "8BITMIME"):
                    raise _ParseError(REPLIES["syntax_args"], detail="BODY")
            elif k == b"AUTH":
                if not eq or not val:
                    raise _ParseError(REPLIES["syntax_args"], detail="AUTH")
                v = _xtext(val)
            elif k == b"SMTPUTF8" and self.config.smtputf8:
                if eq:
                    raise _ParseError(REPLIES["syntax_args"], detail="SMTPUTF8")
                v = True
            else:
                raise _unknown_param(p)
            ks = k.decode("ascii")
            if ks in params:
                raise _ParseError(REPLIES["syntax_args"], detail=ks)
            params[ks] = v
        return params

    def _address(self, addr: bytes, params: dict) -> str:
        if _CONTROL.search(addr) is not None:
            # CR, NUL... inside <...>: no mailbox has them, and every next hop
            # (envelope headers, qmail-queue's NUL-separated envelope) would
            # refuse or mangle them; refuse at the command, not at DATA
            raise _ParseError(REPLIES["bad_address"], ANOMALY_SYNTAX, "control character")
        if addr.isascii():
            return addr.decode("ascii")
        if not params.get("SMTPUTF8"):
            raise _ParseError(REPLIES["non_ascii_envelope"], ANOMALY_EIGHTBIT, "address")
        try:
            return addr.decode("utf-8")
        except UnicodeDecodeError:
            raise _ParseError(REPLIES["bad_address"], ANOMALY_EIGHTBIT, "utf-8") from None

    # --- internals: DATA byte machine ---------------------------------------
    def _data_reset(self) -> None:
        self._size = 0
        self._oversized = False
        self._hops = 0
        self._in_headers = True
        self._hcarry = b""
        self._hskip = False
        self._first = True

    def _data_step(self) -> None:
        buf = self._buf
        first = self._first
        if first:
            # the virtual CRLF before the first line: "." alone is an empty message
            head = bytes(buf[:3])
            if head == b".\r\n":
                del buf[:3]
                self._store(_LF)
                self._emit(DataEnd(self._size, self._oversized, self._hops, False))
                return
            if head in (b"", b".", b".\r"):
                return
        end = buf.find(_END)
        if end >= 0:
            cut, consume, final = end + 2, end + 5, True
        else:
            if buf.endswith(b"\r"):
                hold = 4 if buf.endswith(b"\r\n.\r") else 1
            elif buf.endswith(b"\r\n"):
                hold = 2
            elif buf.endswith(b"\r\n."):
                hold = 3
            else:
                hold = 0
            cut = consume = len(buf) - hold
            if cut <= 0:
                return
            final = False
        with memoryview(buf) as mv:
            region = mv[:cut].tobytes()
        del buf[:consume]
        if first:
            region = _CRLF + region
        out = region.replace(_CRLF, _LF)
        # every LF came from a CRLF iff the LF count equals the CRLFs replaced
        bare = region.count(_LF) != len(region) - len(out)
        if bare:
            region = region[:_first_bare_lf(region)]
            out = region.replace(_CRLF, _LF)
        self._store(out.replace(_LFDOT, _LF))
        if bare:
            buf.clear()
            self._emit(DataEnd(self._size, self._oversized, self._hops, True))
        elif final:
            self._emit(DataEnd(self._size, self._oversized, self._hops, False))

    def _store(self, out: bytes) -> None:
        """Count a region in stored form and queue it as a DataChunk."""
        if self._in_headers:
            self._count_hops(out)
        if self._first:
            self._first = False
            out = out[1:]              # the virtual line start
        before = self._size
        self._size = before + len(out)
        if self._oversized:
            return
        db = self.config.databytes
        if db and self._size > db:
            self._oversized = True
            out = out[:db - before]
        if out:
            self._events.append(DataChunk(out))

    def _count_hops(self, out: bytes) -> None:
        """Count Received/Delivered lines of the header block (SPEC B §1.11)."""
        if self._hskip:
            i = out.find(_LF)
            if i < 0:
                return
            out = out[i:]
            self._hskip = False
        s = self._hcarry + out
        end = s.find(_HDR_END)
        if end >= 0:
            block = s[:end + 1]
            self._in_headers = False
            self._hcarry = b""
        else:
            last = s.rfind(_LF)      # s always starts with a line start LF
            block = s[:last]
            self._hcarry = s[last:last + 10]
            self._hskip = len(s) - last > 10
        if block:
            low = block.lower()
            self._hops += low.count(_RECEIVED) + low.count(_DELIVERED)


_COMMANDS = {
    b"HELO": SMTPConnection._cmd_helo,
    b"EHLO": SMTPConnection._cmd_ehlo,
    b"MAIL": SMTPConnection._cmd_mail,
    b"RCPT": SMTPConnection._cmd_rcpt,
    b"DATA": SMTPConnection._cmd_data,
    b"RSET": SMTPConnection._cmd_rset,
    b"NOOP": SMTPConnection._cmd_noop,
    b"VRFY": SMTPConnection._cmd_vrfy,
    b"HELP": SMTPConnection._cmd_help,
    b"QUIT": SMTPConnection._cmd_quit,
    b"AUTH": SMTPConnection._cmd_auth,
}
"""The command table (qmail-smtpd ``smtpcommands[]``); anything else is
500 unimplemented (SPEC A §5, B §2.8)."""
