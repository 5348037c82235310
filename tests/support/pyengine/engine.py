"""The pure-Python SMTP engine: the test oracle of mailfilter._core's
(_core/smtp_engine.pxi), driven side by side with it by
tests/smtp/test_engine_diff.py. Its behaviour, states and transition table are
documented once, in mailfilter/smtp/engine.py's docstring; this module follows it
line for line and is never imported by the package.
"""
from __future__ import annotations

import functools
from collections import deque

import mailfilter
from .args import (
    ParseError, decode_address, mail_params, parse_path, rcpt_params,
)
from .data import DataReader
from .events import (
    ANOMALY_BARE_NEWLINE, ANOMALY_EIGHTBIT, ANOMALY_LINE_LIMIT, ANOMALY_SEQUENCE,
    ANOMALY_SYNTAX, ANOMALY_UNKNOWN, AUTH, BDAT, CHUNK, CLOSED, DATA, IDLE, MAIL, NEED_DATA,
    PAUSED, RCPT, Anomaly, AuthResponse, AuthStart, BdatStart, Closed, DataChunk, DataEnd,
    DataStart, Event, Help, Helo, Mail, Noop, Quit, Rcpt, Rset, StartTLS, Vrfy,
)
from mailfilter.smtp.engine import EngineConfig
from mailfilter.smtp.replies import REPLIES, Reply, multiline, reply



class EngineError(RuntimeError):
    """The application broke the protocol with the engine (e.g. a reply nobody asked for)."""


# --- the transition table (see the module docstring) -----------------------------
EFFECTS = ("helo", "open", "count", "data", "drop", "done", "auth", "tls", "chunk", "skip",
           "fail")

_TRANSITION_ROWS = (
    # state  event         reply classes  -> state  effect
    (IDLE, Helo,         (2,),           IDLE, "helo"),
    (IDLE, Helo,         (3, 4, 5),      IDLE, None),
    (IDLE, Mail,         (2,),           MAIL, "open"),
    (IDLE, Mail,         (3, 4, 5),      IDLE, None),
    (MAIL, Rcpt,         (2,),           RCPT, "count"),
    (MAIL, Rcpt,         (3, 4, 5),      MAIL, None),
    (RCPT, Rcpt,         (2,),           RCPT, "count"),
    (RCPT, Rcpt,         (3, 4, 5),      RCPT, None),
    (RCPT, DataStart,    (3,),           DATA, "data"),
    (RCPT, DataStart,    (2, 4, 5),      IDLE, "drop"),
    (DATA, DataEnd,      (2, 3, 4, 5),   IDLE, "done"),
    (IDLE, AuthStart,    (2,),           IDLE, "auth"),
    (IDLE, AuthStart,    (3,),           AUTH, None),
    (IDLE, AuthStart,    (4, 5),         IDLE, None),
    (AUTH, AuthResponse, (2,),           IDLE, "auth"),
    (AUTH, AuthResponse, (3,),           AUTH, None),
    (AUTH, AuthResponse, (4, 5),         IDLE, None),
    (IDLE, StartTLS,     (2,),           IDLE, "tls"),
    (IDLE, StartTLS,     (3, 4, 5),      IDLE, None),
    (RCPT, BdatStart,    (3,),           CHUNK, "chunk"),
    (RCPT, BdatStart,    (2, 4, 5),      IDLE, "skip"),
    (CHUNK, DataEnd,     (2, 3),         IDLE, "done"),
    (CHUNK, DataEnd,     (4, 5),         IDLE, "fail"),
)

TRANSITIONS: dict = {(state, event, cls): (new, effect)
                     for state, event, classes, new, effect in _TRANSITION_ROWS
                     for cls in classes}
"""(state, event type, reply class) -> (new state, effect name or None): the
rows above, one key per reply class, as ``send()`` looks them up."""

_TRANSACTION = (MAIL, RCPT, BDAT)   # the states of an open mail transaction, between commands
_RECEIVING = (DATA, CHUNK, BDAT)    # a message is coming in
_MAX_BDAT_DIGITS = 18               # a chunk size below 10**18 octets


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


# --- configuration: the package's own (the oracle and the core read the same)


# --- constants for the hot path -----------------------------------------------
_LF = b"\n"

# Wire form of every fixed reply (no placeholders), so the hot path never formats.
_LINES: dict = {r: r.line() for r in REPLIES.values() if "{" not in r.text}
_NOOP_LINE = REPLIES["noop"].line()
_RSET_LINE = REPLIES["rset"].line()
_VRFY_LINE = REPLIES["vrfy"].line()

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
    an "unknown verb", and base64 can look like a word
    (docs/architecture.md#design-rules: no secret is logged)."""
    verb = line.split(b" ", 1)[0].upper()
    if verb in _NAMED_VERBS:
        return verb.decode("ascii")
    return f"<{len(line)} bytes>"


class SMTPConnection:
    """One SMTP server session, sans-IO. See the module docstring."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = cfg = config if config is not None else EngineConfig()
        self._host = host_of(cfg.greeting)
        self._extra_ehlo = tuple(cfg.extra_ehlo)
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
        self._data = DataReader(self._buf, self._events, cfg.databytes, cfg.header_limit)
        self.helo: str | None = None
        self.esmtp = False
        self.authenticated = False
        self.bad_commands = 0
        self.rcpt_count = 0             # recipients accepted in this transaction
        self.mail_smtputf8 = False      # this transaction's MAIL carried SMTPUTF8
        self.tls = False                # the session runs inside TLS (tls_started)
        self._tls_wait = False          # 220 to STARTTLS sent: no input until tls_started
        self.bdat_failed = False        # a BDAT of this transaction was refused: further BDATs 503
        self._skip = 0                  # octets of a refused BDAT chunk still to discard

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
    def receiving(self) -> bool:
        """A message is coming in: DATA, or a BDAT message from its first chunk to its LAST."""
        return self._state in _RECEIVING

    @property
    def pending(self) -> Event | None:
        """The event a reply is owed for, if any."""
        return self._pending

    def set_extra_ehlo(self, lines) -> None:
        """Per-session extra EHLO keywords (the AUTH offer depends on the client)."""
        self._extra_ehlo = tuple(lines)

    def ehlo_keywords(self) -> list[str]:
        cfg = self.config
        kw = ["PIPELINING", "CHUNKING", f"SIZE {cfg.databytes}", "8BITMIME", "ENHANCEDSTATUSCODES"]
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
        order, docs/behaviour/smtp.md#end-of-data): "bare_lf", "too_many_hops",
        "size_exceeded" ("bdat_syntax" first); None when it does not."""
        if ev.bad_bdat:
            return "bdat_syntax"
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

    def tls_started(self) -> None:
        """The TLS handshake after our 220 succeeded (or an implicit-TLS
        connection begins): forget what the client said in clear (RFC 3207
        §4.2) and read commands again."""
        self._tls_wait = False
        self.tls = True
        self._buf.clear()
        self._skipping = False
        self._skip = 0
        if self._state is not CLOSED:
            self._state = IDLE
        self._forget_transaction()
        self.helo = None
        self.esmtp = False
        self.authenticated = False

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; ``b""`` means EOF. Between the 220 to STARTTLS
        and tls_started() no plaintext may arrive: the shell feeds the
        handshake to TLS, and a byte given here then is discarded."""
        if self._state is CLOSED or (self._tls_wait and data):
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
        docs/behaviour/smtp.md#data); nothing buffered or pipelined after it is processed."""
        ev = self._pending
        if ev is None:
            raise EngineError("send() without a pending event")
        self._pending = None
        code = r.code
        if code // 100 != 3 or type(ev) is not BdatStart:
            # BDAT has no intermediate reply (RFC 3030 section 2): no 354
            line = _LINES.get(r)
            self._out.append(line if line is not None else r.line())
        if code == 421 or code == 221 or close:
            self._close("quit" if code == 221 else str(code), r)
            return
        step = TRANSITIONS.get((self._state, type(ev), code // 100))
        if step is None:
            raise EngineError(f"no transition for {ev!r} answered {code} in {self._state}")
        self._state, effect = step
        if effect is None:
            return
        # the effects of the table, inline: a call per reply would cost more than the rest
        if effect == "count":
            self.rcpt_count += 1
        elif effect == "open":
            self.rcpt_count = 0
            self.mail_smtputf8 = "SMTPUTF8" in ev.params
            self.bdat_failed = False
        elif effect == "data":
            self._data.reset()
        elif effect == "chunk":
            self._data.reset()
            self._data.chunk(ev.size, ev.last)
        elif effect == "skip":
            self._skip = ev.size
            self._forget_transaction()
            self.bdat_failed = True
        elif effect == "fail":
            self._forget_transaction()
            self.bdat_failed = True
        elif effect == "done":
            self._forget_transaction()
            if ev.bare_lf:
                self._close("bare lf", r)
        elif effect == "drop":
            self._forget_transaction()
        elif effect == "helo":
            self.helo = ev.name
            self.esmtp = ev.verb == "EHLO"
        elif effect == "auth":
            self.authenticated = True
        elif effect == "tls":
            self._buf.clear()           # pipelined after STARTTLS in clear: dropped (RFC 3207 §6)
            self._tls_wait = True
        else:  # pragma: no cover - TRANSITIONS names only the effects above
            raise EngineError(f"unknown effect {effect!r}")

    def next_event(self):
        """The next Event, or NEED_DATA, or PAUSED (a reply is still owed)."""
        events = self._events
        if events:
            return events.popleft()
        if self._pending is not None:
            return PAUSED
        if self._state is CLOSED:
            return self._closed_event()
        if not self._buf and not self._eof and self._state is not CHUNK:
            return NEED_DATA            # fast path: the common second call per read
        if self._state is DATA:
            end = self._data.step()
            if end is not None:
                self._pending = end
        else:
            self._chunk_step()
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

    def _forget_transaction(self) -> None:
        self.rcpt_count = 0
        self.mail_smtputf8 = False
        self.bdat_failed = False

    def _chunk_step(self) -> None:
        """Commands and BDAT chunks in turn until an event is queued or the
        input runs out; a chunk read whole that ends nothing gets its 250."""
        data = self._data
        while True:
            if self._state is CHUNK:
                end = data.step_chunk()
                if end is not None:
                    self._pending = end
                    return
                if data.chunk_left:
                    return
                self._out.append(reply("bdat_ok", octets=data.chunk_size).line())
                self._state = BDAT
                if self._events:
                    return
            self._command_step()
            if self._state is not CHUNK or self._events:
                return

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
        while not events and self._state is not CHUNK:
            if self._skip:
                # the octets of a refused BDAT chunk, never parsed
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return
                continue
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
    # Commands are parsed in IDLE, MAIL and RCPT only (AUTH lines are
    # AuthResponses, DATA bytes go to the byte machine, CLOSED reads nothing).
    def _cmd_helo(self, arg: bytes, verb: str = "HELO") -> None:
        name = arg.strip(b" ")
        if not name:
            self._bad(REPLIES["helo_syntax"], ANOMALY_SYNTAX, verb)
            return
        if not name.isascii():
            self._events.append(Anomaly(ANOMALY_EIGHTBIT, verb))
        # the transaction ends at the command, whatever the reply (RFC 5321 §4.1.4)
        self._state = IDLE
        self._forget_transaction()
        self._emit(Helo(verb, name.decode("latin-1")))

    def _cmd_ehlo(self, arg: bytes) -> None:
        self._cmd_helo(arg, "EHLO")

    def _cmd_mail(self, arg: bytes) -> None:
        if self._state in _TRANSACTION:
            self._bad(REPLIES["nested_mail"], ANOMALY_SEQUENCE, "MAIL")
            return
        try:
            addr, rest = parse_path(arg, b"FROM:")
            params = mail_params(rest, self.config.smtputf8) if rest else {}
            address = decode_address(addr, "SMTPUTF8" in params)
            size = params.get("SIZE")
            db = self.config.databytes
            if db and size is not None and size > db:
                raise ParseError(REPLIES["size_exceeded"], bad=False)
        except ParseError as e:
            self._reject(e, "MAIL")
            return
        self._emit(Mail(address, params))

    def _cmd_rcpt(self, arg: bytes) -> None:
        if self._state is BDAT:
            self._bad(REPLIES["rcpt_after_bdat"], ANOMALY_SEQUENCE, "RCPT")
            return
        if self._state not in _TRANSACTION:
            self._bad(REPLIES["mail_first"], ANOMALY_SEQUENCE, "RCPT")
            return
        try:
            addr, rest = parse_path(arg, b"TO:")
            if not addr:
                raise ParseError(REPLIES["syntax"], detail="empty recipient")
            params = rcpt_params(rest) if rest else {}
            address = decode_address(addr, self.mail_smtputf8)
        except ParseError as e:
            self._reject(e, "RCPT")
            return
        if self.rcpt_count >= self.config.max_recipients:
            self._answer(REPLIES["too_many_rcpts"])
            return
        lt = arg.find(b"<")
        self._emit(Rcpt(address, params, lt >= 0 and arg[lt + 1:lt + 2] == b"@"))

    def _cmd_data(self, arg: bytes) -> None:
        state = self._state
        if state is IDLE:
            self._bad(REPLIES["mail_first"], ANOMALY_SEQUENCE, "DATA")
        elif state is MAIL:
            self._bad(REPLIES["rcpt_first"], ANOMALY_SEQUENCE, "DATA")
        elif state is BDAT:
            self._bad(REPLIES["data_after_bdat"], ANOMALY_SEQUENCE, "DATA")
        elif arg.strip(b" "):
            self._bad(REPLIES["syntax_args"], ANOMALY_SYNTAX, "DATA")
        else:
            self._emit(DataStart())

    def _cmd_rset(self, arg: bytes) -> None:
        self._state = IDLE
        self._forget_transaction()
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
        if self._state in _TRANSACTION:
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

    def _cmd_starttls(self, arg: bytes) -> None:
        if self.tls:
            self._bad(REPLIES["tls_active"], ANOMALY_SEQUENCE, "STARTTLS")
        elif self._state in _TRANSACTION:
            self._bad(REPLIES["tls_in_mail"], ANOMALY_SEQUENCE, "STARTTLS")
        elif arg.strip(b" "):
            self._bad(REPLIES["syntax_args"], ANOMALY_SYNTAX, "STARTTLS")
        else:
            self._emit(StartTLS())

    def _cmd_bdat(self, arg: bytes) -> None:
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts[0]) > _MAX_BDAT_DIGITS:
            # no chunk size: its octets cannot be told from commands
            self._bad(REPLIES["bdat_syntax"], ANOMALY_SYNTAX, "BDAT")
            if self._state is not CLOSED:
                r = reply("bdat_lost", host=self._host)
                self._out.append(r.line())
                self._close("bdat count", r)
            return
        size = int(parts[0])
        last = len(parts) == 2
        if len(parts) > 2 or (last and parts[1].upper() != b"LAST"):
            if self._state is BDAT:
                self._events.append(Anomaly(ANOMALY_SYNTAX, "BDAT"))
                self._data.chunk(size, True, True)
                self._state = CHUNK
                return
            self._bad(REPLIES["bdat_syntax"], ANOMALY_SYNTAX, "BDAT")
            self._skip = size
            if self._state in (MAIL, RCPT):
                self._state = IDLE
                self._forget_transaction()
                self.bdat_failed = True
            return
        if self.bdat_failed:
            self._skip = size
            self._answer(REPLIES["bdat_failed"])
        elif self._state is BDAT:
            self._data.chunk(size, last)
            self._state = CHUNK
        elif self._state is RCPT:
            self._emit(BdatStart(size, last))
        else:
            self._skip = size
            self._bad(REPLIES["mail_first" if self._state is IDLE else "rcpt_first"],
                      ANOMALY_SEQUENCE, "BDAT")

    def _reject(self, e: ParseError, verb: str) -> None:
        if e.bad:
            self._bad(e.reply, e.tag, e.detail if e.detail is not None else verb)
        else:
            self._answer(e.reply)


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
    b"STARTTLS": SMTPConnection._cmd_starttls,
    b"BDAT": SMTPConnection._cmd_bdat,
}
"""The command table (qmail-smtpd ``smtpcommands[]``); anything else is
500 unimplemented (docs/behaviour/smtp.md#replies, #commands)."""
