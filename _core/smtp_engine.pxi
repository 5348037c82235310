# smtp_engine.pxi: the sans-IO SMTP server engine (framing, commands, transitions).
#
# Job: bytes in, events out, replies back, as mailfilter/smtp/engine.py's
# docstring describes (its reference text, with the transition table the
# tests hold equal to TRANSITIONS): command lines framed on the input
# buffer's bytes (memchr, RFC 5321 §4.5.3.1 limits, a bare LF reported),
# the verb looked up in COMMANDS (qmail-smtpd's smtpcommands[],
# docs/behaviour/smtp.md#commands) and handed to the one method of that verb,
# the reply to the pending event moving the state through a C table compiled
# from _TRANSITION_ROWS at module init, and the DATA bytes and BDAT chunks
# (RFC 3030, exactly their counts) handed to DataReader.
# Tables as data: COMMANDS and TRANSITIONS are Python values the C arrays are
# built from, so the documented order is the executed order.
# Invariants: reply text comes only from mailfilter/smtp/replies.py (handed
# in once by smtp_install(); fixed lines are kept as their wire bytes); while
# a reply is owed nothing is parsed, so replies leave in command order
# (RFC 2920); after the 220 to STARTTLS the buffered clear text is dropped
# (RFC 3207 §6) and nothing is read until tls_started(); no client byte goes
# into an Anomaly (docs/architecture.md#design-rules).

from cpython.bytes cimport PyBytes_FromStringAndSize

cdef enum:
    MAX_BDAT_DIGITS = 18    # a chunk size below 10**18 octets fits a Py_ssize_t

# --- the transition table (mailfilter/smtp/engine.py's docstring) ------------
EFFECTS = ("helo", "open", "count", "data", "drop", "done", "auth", "tls", "chunk", "skip",
           "fail")
cdef enum:
    E_HELO = 0
    E_OPEN = 1
    E_COUNT = 2
    E_DATA = 3
    E_DROP = 4
    E_DONE = 5
    E_AUTH = 6
    E_TLS = 7
    E_CHUNK = 8
    E_SKIP = 9
    E_FAIL = 10
    E_NONE = 15
    N_KINDS = 9             # event types that owe a reply

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

TRANSITIONS = {(state, event, cls): (new, effect)
               for state, event, classes, new, effect in _TRANSITION_ROWS
               for cls in classes}

# the event types that owe a reply, in the order of their C kind index (K_*)
_KINDS = (Helo, Mail, Rcpt, DataStart, DataEnd, AuthStart, AuthResponse, StartTLS, BdatStart)
cdef enum:
    K_HELO = 0
    K_MAIL = 1
    K_RCPT = 2
    K_DATASTART = 3
    K_DATAEND = 4
    K_AUTHSTART = 5
    K_AUTHRESPONSE = 6
    K_STARTTLS = 7
    K_BDATSTART = 8
cdef dict _KIND_OF = {t: i for i, t in enumerate(_KINDS)}
# _STEP[state][kind][reply class]: new state | effect << 4, or -1 (no transition)
cdef int _STEP[N_STATES][N_KINDS][6]


cdef void _compile_transitions() except *:
    cdef int s, k, c
    assert EFFECTS.index("fail") == E_FAIL and _KINDS.index(BdatStart) == K_BDATSTART
    for s in range(N_STATES):
        for k in range(N_KINDS):
            for c in range(6):
                _STEP[s][k][c] = -1
    for (state, event, cls), (new, effect) in TRANSITIONS.items():
        _STEP[STATES.index(state)][_KIND_OF[event]][cls] = (
            STATES.index(new) | ((E_NONE if effect is None else EFFECTS.index(effect)) << 4))


_compile_transitions()

# Verbs the log may name: ours, other SMTP/ESMTP verbs, and what other
# protocols send by mistake (HTTP through a proxy, POP3).
_NAMED_VERBS = frozenset((
    b"HELO", b"EHLO", b"LHLO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"VRFY",
    b"EXPN", b"HELP", b"QUIT", b"AUTH", b"STARTTLS", b"TURN", b"ETRN", b"ATRN", b"SEND", b"SOML",
    b"SAML", b"VERB", b"ONEX", b"XCLIENT", b"XFORWARD", b"CONNECT", b"GET", b"POST", b"HEAD",
    b"PUT", b"OPTIONS", b"USER", b"PASS", b"CAPA", b"STLS",
))


cdef str _verb_label(bytes line):
    """What the log may say about a command line: its verb when it is a known
    one, else only the line's length (a refused AUTH's pipelined password
    arrives as an "unknown verb"; docs/architecture.md#design-rules)."""
    verb = line.split(b" ", 1)[0].upper()
    if verb in _NAMED_VERBS:
        return verb.decode("ascii")
    return f"<{len(line)} bytes>"


# --- the reply table, handed in by mailfilter/smtp (smtp_install) ------------
cdef object _multiline = None       # replies.multiline
cdef object _reply = None           # replies.reply
cdef object _EngineConfig = None    # engine.EngineConfig (the default configuration)
cdef dict _LINES = {}               # Reply -> wire bytes, every reply without placeholders
cdef bytes _NOOP_LINE = b"", _RSET_LINE = b"", _VRFY_LINE = b""
cdef dict _NAMED = {}               # (name, greeting) -> wire bytes (220, 221)
cdef dict _EHLO = {}                # (greeting, keywords) -> MultiReply


def smtp_install(replies, multiline, reply, engine_config=None):
    """Hand the engine the ONE reply table (mailfilter/smtp/replies.py) and,
    from mailfilter/smtp/engine.py, the configuration class; idempotent."""
    global _multiline, _reply, _EngineConfig, _NOOP_LINE, _RSET_LINE, _VRFY_LINE
    _REPLIES.clear()
    _REPLIES.update(replies)
    _multiline = multiline
    _reply = reply
    if engine_config is not None:
        _EngineConfig = engine_config
    _LINES.clear()
    for r in replies.values():
        if "{" not in r.text:
            _LINES[r] = r.line()
    _NOOP_LINE = replies["noop"].line()
    _RSET_LINE = replies["rset"].line()
    _VRFY_LINE = replies["vrfy"].line()
    _NAMED.clear()
    _EHLO.clear()


cdef bytes _named_line(str name, str greeting):
    """Wire form of a reply whose only field is the greeting (220, 221)."""
    key = (name, greeting)
    line = _NAMED.get(key)
    if line is None:
        if len(_NAMED) >= 256:
            _NAMED.clear()
        line = _NAMED[key] = _reply(name, greeting=greeting).line()
    return line


cdef class MultiReply:
    """A multi-line reply (RFC 5321 §4.2.1) that ``send()`` accepts like a Reply."""

    def __init__(self, int code, lines, str enhanced=""):
        self.code = code
        self.enhanced = enhanced
        self.lines = tuple(lines)       # read-only: the wire form is memoized
        self._wire = None

    def line(self):
        if self._wire is None:
            self._wire = _multiline(self.code, self.lines, self.enhanced)
        return self._wire

    def __repr__(self):
        return f"MultiReply({self.code}, {self.lines!r}, {self.enhanced!r})"


def host_of(str greeting):
    """The server's name in replies: the greeting's first word (qmail: the
    first word of smtpgreeting), "localhost" for an empty greeting."""
    words = greeting.split()
    return words[0] if words else "localhost"


class EngineError(RuntimeError):
    """The application broke the protocol with the engine (e.g. a reply nobody asked for)."""


cdef inline bint _blank(const unsigned char* p, Py_ssize_t n) nogil:
    # nothing but SP (bytes.strip(b" ") is empty)
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] != 0x20:
            return False
    return True


cdef inline bint _verb_is(const unsigned char* p, const char* verb, Py_ssize_t n) nogil:
    # ASCII case-insensitive: p[:n] is the upper-case `verb`
    cdef Py_ssize_t i
    for i in range(n):
        if _upper(p[i]) != <unsigned char>verb[i]:
            return False
    return True


# The command table (qmail-smtpd smtpcommands[], docs/behaviour/smtp.md#commands):
# a verb's index + 1 is its V_* code, which _command_step hands to the one
# method of that verb; anything else is 500 unimplemented. Most frequent first.
COMMANDS = (b"MAIL", b"RCPT", b"DATA", b"RSET", b"EHLO", b"HELO", b"QUIT", b"NOOP",
            b"AUTH", b"STARTTLS", b"VRFY", b"HELP", b"BDAT")
cdef enum:
    V_NONE = 0
    V_MAIL = 1
    V_RCPT = 2
    V_DATA = 3
    V_RSET = 4
    V_EHLO = 5
    V_HELO = 6
    V_QUIT = 7
    V_NOOP = 8
    V_AUTH = 9
    V_STARTTLS = 10
    V_VRFY = 11
    V_HELP = 12
    V_BDAT = 13
    N_VERBS = 13
cdef const char* _VERB_TEXT[N_VERBS]        # COMMANDS' bytes (the tuple keeps them alive)
cdef Py_ssize_t _VERB_LEN[N_VERBS]


cdef void _compile_commands() except *:
    cdef int i
    assert len(COMMANDS) == N_VERBS and COMMANDS.index(b"BDAT") + 1 == V_BDAT
    for i in range(N_VERBS):
        _VERB_TEXT[i] = COMMANDS[i]
        _VERB_LEN[i] = len(COMMANDS[i])


_compile_commands()


cdef int _verb(const unsigned char* p, Py_ssize_t n) nogil:
    """The V_* code of the verb p[:n] (ASCII case-insensitive), V_NONE if unknown."""
    cdef int i
    for i in range(N_VERBS):
        if _VERB_LEN[i] == n and _verb_is(p, _VERB_TEXT[i], n):
            return i + 1
    return V_NONE


cdef class SMTPConnection:
    """One SMTP server session, sans-IO. See mailfilter/smtp/engine.py."""

    def __init__(self, config=None):
        cfg = config if config is not None else _EngineConfig()
        self.config = cfg
        self._greeting = cfg.greeting
        self._host = host_of(self._greeting)
        self._extra_ehlo = tuple(cfg.extra_ehlo)
        self.auth_offered = None
        self._buf = bytearray()
        self._out = []
        self._events = []
        self._ev_head = 0
        self._pending = None
        self._kind = -1
        self._state = S_IDLE
        self._eof = False
        self._closed = None
        self._close_reason = None
        self.close_reply = None
        self._skipping = False
        self._max_line = cfg.max_line
        self._max_auth_line = cfg.max_auth_line
        self._max_bad = cfg.max_bad_commands
        self._max_rcpts = cfg.max_recipients
        self._max_hops = cfg.max_hops
        self._databytes = cfg.databytes
        self._smtputf8 = cfg.smtputf8
        self._data = DataReader(self._buf, self._events, cfg.databytes, cfg.header_limit)
        self.helo = None
        self.esmtp = False
        self.authenticated = False
        self.bad_commands = 0
        self.rcpt_count = 0
        self.mail_smtputf8 = False
        self.tls = False
        self._tls_wait = False
        self.bdat_failed = False
        self._skip = 0

    # --- public API ---------------------------------------------------------
    @property
    def state(self):
        return STATES[self._state]

    @property
    def host(self):
        """This server's name in replies: the greeting's first word."""
        return self._host

    @property
    def closing(self):
        return self._state == S_CLOSED

    @property
    def receiving(self):
        """A message is coming in: DATA, or a BDAT message from its first
        chunk to its LAST (the shell's data-rate limits apply)."""
        return self._state == S_DATA or self._state == S_CHUNK or self._state == S_BDAT

    @property
    def pending(self):
        """The event a reply is owed for, if any."""
        return self._pending

    def set_extra_ehlo(self, lines):
        """Per-session extra EHLO keywords (the AUTH offer depends on the client)."""
        self._extra_ehlo = tuple(lines)

    def ehlo_keywords(self):
        cfg = self.config
        kw = ["PIPELINING", "CHUNKING", f"SIZE {cfg.databytes}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if cfg.smtputf8:
            kw.append("SMTPUTF8")
        kw.extend(self._extra_ehlo)
        return kw

    def ehlo_reply(self, name=None):
        """The multi-line 250 answer to EHLO; ``name`` defaults to the greeting,
        built once per (greeting, keywords)."""
        greeting = name if name is not None else self._greeting
        key = (greeting, self._extra_ehlo, self.config.databytes, self.config.smtputf8)
        r = _EHLO.get(key)
        if r is None:
            first = _REPLIES["helo"].format(greeting=greeting)
            r = MultiReply(first.code, [first.text, *self.ehlo_keywords()])
            if len(_EHLO) >= 256:
                _EHLO.clear()
            _EHLO[key] = r
        return r

    def helo_reply(self, name=None):
        return _reply("helo", greeting=name if name is not None else self._greeting)

    def greet(self):
        """Queue the 220 greeting."""
        self._out.append(_named_line("greeting", self._greeting))

    def data_end_refusal(self, DataEnd ev not None):
        """Why the engine refuses a DataEnd, as the name of its reply (qmail
        order, docs/behaviour/smtp.md#end-of-data); None when it does not."""
        if ev.bad_bdat:
            return "bdat_syntax"
        if ev.bare_lf:
            return "bare_lf"
        if ev.hops >= self._max_hops:
            return "too_many_hops"
        if ev.oversized:
            return "size_exceeded"
        return None

    def data_end_check(self, DataEnd ev not None):
        """The engine-level verdict for a DataEnd (data_end_refusal's reply), or None."""
        name = self.data_end_refusal(ev)
        return None if name is None else _REPLIES[name]

    def tls_started(self):
        """The TLS handshake succeeded: forget what the client said in clear
        (RFC 3207 §4.2) and read commands again."""
        self._tls_wait = False
        self.tls = True
        del self._buf[:]
        self._skipping = False
        self._skip = 0
        if self._state != S_CLOSED:
            self._state = S_IDLE
        self._forget_transaction()
        self.helo = None
        self.esmtp = False
        self.authenticated = False

    def receive_data(self, data):
        """Feed received bytes; ``b""`` means EOF (see engine.py)."""
        if self._state == S_CLOSED or (self._tls_wait and data):
            return
        if data:
            if self._eof:
                raise EngineError("receive_data after EOF")
            self._buf += data
        else:
            self._eof = True

    def data_to_send(self):
        """All queued output, for one write."""
        cdef list out = self._out
        if not out:
            return b""
        if len(out) == 1:
            data = out[0]
        else:
            data = b"".join(out)
        del out[:]
        return data

    def abort(self, r):
        """Send an unsolicited final reply (421 timeout/shutdown/internal error) and close."""
        self._out.append(r.line())
        self._pending = None
        del self._events[:]
        self._ev_head = 0
        self._close(f"{r.code}", r)

    def send(self, r, bint close=False):
        """The application's reply to the pending event; applies the transition."""
        cdef int code, step, effect
        ev = self._pending
        if ev is None:
            raise EngineError("send() without a pending event")
        self._pending = None
        code = r.code
        if code // 100 != 3 or self._kind != K_BDATSTART:
            # BDAT has no intermediate reply (RFC 3030 §2): the 354 that lets
            # a BDAT message begin is not sent
            line = _LINES.get(r)
            self._out.append(line if line is not None else r.line())
        if code == 421 or code == 221 or close:
            self._close("quit" if code == 221 else str(code), r)
            return
        step = _STEP[self._state][self._kind][code // 100] if 0 <= code // 100 < 6 else -1
        if step < 0:
            raise EngineError(f"no transition for {ev!r} answered {code} in {self.state}")
        self._state = step & 15
        effect = step >> 4
        if effect == E_NONE:
            return
        elif effect == E_COUNT:
            self.rcpt_count += 1
        elif effect == E_OPEN:
            self.rcpt_count = 0
            self.mail_smtputf8 = "SMTPUTF8" in (<Mail>ev).params
            self.bdat_failed = False
        elif effect == E_DATA:
            self._data.reset()
        elif effect == E_CHUNK:
            self._data.reset()
            self._data.chunk((<BdatStart>ev).size, (<BdatStart>ev).last)
        elif effect == E_SKIP:
            self._skip = (<BdatStart>ev).size
            self._forget_transaction()
            self.bdat_failed = True
        elif effect == E_FAIL:
            self._forget_transaction()
            self.bdat_failed = True
        elif effect == E_DONE:
            self._forget_transaction()
            if (<DataEnd>ev).bare_lf:
                self._close("bare lf", r)
        elif effect == E_DROP:
            self._forget_transaction()
        elif effect == E_HELO:
            self.helo = (<Helo>ev).name
            self.esmtp = (<Helo>ev).verb == "EHLO"
        elif effect == E_AUTH:
            self.authenticated = True
        elif effect == E_TLS:
            del self._buf[:]            # pipelined after STARTTLS in clear: dropped (RFC 3207 §6)
            self._tls_wait = True

    def next_event(self):
        """The next Event, or NEED_DATA, or PAUSED (a reply is still owed)."""
        cdef list events = self._events
        if events:
            return self._pop()
        if self._pending is not None:
            return PAUSED
        if self._state == S_CLOSED:
            return self._closed_event()
        if not self._buf and not self._eof and self._state != S_CHUNK:
            return NEED_DATA            # fast path: the common second call per read
        if self._state == S_DATA:
            end = self._data.step()
            if end is not None:
                self._pending = end
                self._kind = K_DATAEND
        else:
            self._chunk_step()
        if events:
            return self._pop()
        if self._state == S_CLOSED:
            return self._closed_event()
        if self._eof:
            self._close("eof", None)
            return self._closed_event()
        return NEED_DATA

    # --- internals: state helpers -------------------------------------------
    cdef object _pop(self):
        cdef list events = self._events
        ev = events[self._ev_head]
        self._ev_head += 1
        if self._ev_head >= len(events):
            del events[:]
            self._ev_head = 0
        return ev

    cdef Closed _closed_event(self):
        if self._closed is None:
            self._closed = Closed(self._close_reason or "eof")
        return self._closed

    cdef void _close(self, str reason, r) except *:
        if self._state != S_CLOSED:
            self._state = S_CLOSED
            self._close_reason = reason
            self.close_reply = r
            del self._buf[:]

    cdef inline void _forget_transaction(self):
        self.rcpt_count = 0
        self.mail_smtputf8 = False
        self.bdat_failed = False

    cdef void _chunk_step(self) except *:
        """Commands and BDAT chunks, in turn, until an event is queued or the
        input runs out: a chunk read whole that ends nothing is answered
        here (250, RFC 3030 §2) and the commands after it are read."""
        cdef DataReader data = self._data
        while True:
            if self._state == S_CHUNK:
                end = data.step_chunk()
                if end is not None:
                    self._pending = end
                    self._kind = K_DATAEND
                    return
                if data.chunk_left:
                    return
                self._out.append(_reply("bdat_ok", octets=data.chunk_size).line())
                self._state = S_BDAT
                if self._events:
                    return
            self._command_step()
            if self._state != S_CHUNK or self._events:
                return

    cdef void _emit(self, Event ev, int kind) except *:
        # an event that owes a reply (kind: its index in _KINDS)
        self._events.append(ev)
        self._pending = ev
        self._kind = kind

    cdef void _answer(self, r) except *:
        line = _LINES.get(r)
        self._out.append(line if line is not None else r.line())

    cdef void _bad(self, r, str tag, detail) except *:
        """Answer a client error, report it, count it; 421 at the limit."""
        self._answer(r)
        self._events.append(Anomaly(tag, detail))
        self.bad_commands += 1
        if self.bad_commands >= self._max_bad:
            r = _reply("too_many_errors", host=self._host)
            self._out.append(r.line())
            self._close("too many errors", r)

    # --- internals: line framing --------------------------------------------
    cdef void _command_step(self) except *:
        """Process lines until an event is queued, input runs out or the session closes."""
        cdef bytearray buf = self._buf
        cdef list events = self._events
        cdef const unsigned char* p
        cdef const unsigned char* e
        cdef Py_ssize_t n, limit, i, end, sp, a
        cdef int verb
        # every path that closes the session also queues an event, ending the loop
        while not events and self._state != S_CHUNK:
            p = <const unsigned char*>PyByteArray_AS_STRING(buf)
            n = PyByteArray_GET_SIZE(buf)
            if self._skip:
                # the octets of a refused BDAT chunk (RFC 3030 §2), never parsed
                i = min(self._skip, n)
                del buf[:i]
                self._skip -= i
                if self._skip:
                    return
                continue
            if self._skipping:
                e = <const unsigned char*>memchr(p, 0x0a, n)
                if e == NULL:
                    del buf[:]
                    return
                del buf[:(e - p) + 1]
                self._skipping = False
                continue
            limit = self._max_auth_line if self._state == S_AUTH else self._max_line
            e = <const unsigned char*>memchr(p, 0x0a, min(n, limit))
            if e == NULL:
                if n >= limit:
                    self._skipping = True
                    if self._state == S_AUTH:
                        self._state = S_IDLE
                        self._bad(_REPLIES["auth_line_too_long"], ANOMALY_LINE_LIMIT, "AUTH")
                    else:
                        self._bad(_REPLIES["line_too_long"], ANOMALY_LINE_LIMIT, None)
                    continue
                return
            i = e - p
            if i and p[i - 1] == 0x0d:
                end = i - 1
            else:
                end = i
                # the verb only, never the rest: an AUTH line carries a secret
                events.append(Anomaly(ANOMALY_BARE_NEWLINE,
                                      "AUTH response" if self._state == S_AUTH
                                      else _verb_label(PyBytes_FromStringAndSize(<const char*>p, end))))
            if self._state == S_AUTH:
                line = PyBytes_FromStringAndSize(<const char*>p, end)
                del buf[:i + 1]
                self._emit(AuthResponse(line), K_AUTHRESPONSE)
                return
            e = <const unsigned char*>memchr(p, 0x20, end)
            if e == NULL:
                sp = end
                a = end
            else:
                sp = e - p
                a = sp + 1
                while a < end and p[a] == 0x20:
                    a += 1
            verb = _verb(p, sp)
            if verb == V_NONE:
                label = _verb_label(PyBytes_FromStringAndSize(<const char*>p, sp))
                del buf[:i + 1]
                self._bad(_REPLIES["unrecognized"], ANOMALY_UNKNOWN, label)
                continue
            if verb == V_DATA:
                blank = _blank(p + a, end - a)
                del buf[:i + 1]
                self._cmd_data(blank)
            elif verb == V_STARTTLS:
                blank = _blank(p + a, end - a)
                del buf[:i + 1]
                self._cmd_starttls(blank)
            elif verb == V_RSET:
                del buf[:i + 1]
                self._cmd_rset()
            elif verb == V_NOOP:
                del buf[:i + 1]
                self._cmd_noop()
            elif verb == V_QUIT:
                del buf[:i + 1]
                self._cmd_quit()
            elif verb == V_HELP:
                del buf[:i + 1]
                self._cmd_help()
            else:
                arg = PyBytes_FromStringAndSize(<const char*>(p + a), end - a)
                del buf[:i + 1]
                if verb == V_MAIL:
                    self._cmd_mail(arg)
                elif verb == V_RCPT:
                    self._cmd_rcpt(arg)
                elif verb == V_EHLO:
                    self._cmd_helo(arg, "EHLO")
                elif verb == V_HELO:
                    self._cmd_helo(arg, "HELO")
                elif verb == V_AUTH:
                    self._cmd_auth(arg)
                elif verb == V_VRFY:
                    self._cmd_vrfy(arg)
                elif verb == V_BDAT:
                    self._cmd_bdat(arg)

    # --- internals: commands ------------------------------------------------
    # Parsed in IDLE, MAIL, RCPT and BDAT only (AUTH lines are AuthResponses,
    # DATA bytes and BDAT chunks go to the byte machine, CLOSED reads nothing).
    cdef void _cmd_helo(self, bytes arg, str verb) except *:
        name = arg.strip(b" ")
        if not name:
            self._bad(_REPLIES["helo_syntax"], ANOMALY_SYNTAX, verb)
            return
        if not _is_ascii(name, len(name)):
            self._events.append(Anomaly(ANOMALY_EIGHTBIT, verb))
        # the transaction ends at the command, whatever the reply (RFC 5321 §4.1.4)
        self._state = S_IDLE
        self._forget_transaction()
        self._emit(Helo(verb, name.decode("latin-1")), K_HELO)

    cdef void _cmd_mail(self, bytes arg) except *:
        cdef Py_ssize_t db
        if self._state == S_MAIL or self._state == S_RCPT or self._state == S_BDAT:
            self._bad(_REPLIES["nested_mail"], ANOMALY_SEQUENCE, "MAIL")
            return
        try:
            addr, rest = parse_path(arg, b"FROM:")
            params = mail_params(rest, self._smtputf8) if rest else {}
            address = decode_address(addr, "SMTPUTF8" in params)
            size = params.get("SIZE")
            db = self._databytes
            if db and size is not None and size > db:
                raise ParseError(_REPLIES["size_exceeded"], bad=False)
        except ParseError as e:
            self._reject(e, "MAIL")
            return
        self._emit(Mail(address, params), K_MAIL)

    cdef void _cmd_rcpt(self, bytes arg) except *:
        if self._state == S_BDAT:
            self._bad(_REPLIES["rcpt_after_bdat"], ANOMALY_SEQUENCE, "RCPT")
            return
        if self._state != S_MAIL and self._state != S_RCPT:
            self._bad(_REPLIES["mail_first"], ANOMALY_SEQUENCE, "RCPT")
            return
        try:
            addr, rest = parse_path(arg, b"TO:")
            if not addr:
                raise ParseError(_REPLIES["syntax"], detail="empty recipient")
            params = rcpt_params(rest) if rest else {}
            address = decode_address(addr, self.mail_smtputf8)
        except ParseError as e:
            self._reject(e, "RCPT")
            return
        if self.rcpt_count >= self._max_rcpts:
            self._answer(_REPLIES["too_many_rcpts"])
            return
        # a source route (RFC 5321 §3.6.1, dropped from the address): the
        # policy refuses it for a client that may not relay
        # (docs/behaviour/smtp.md#addresses step 3)
        lt = arg.find(b"<")
        self._emit(Rcpt(address, params, lt >= 0 and arg[lt + 1:lt + 2] == b"@"), K_RCPT)

    cdef void _cmd_data(self, bint blank) except *:
        if self._state == S_IDLE:
            self._bad(_REPLIES["mail_first"], ANOMALY_SEQUENCE, "DATA")
        elif self._state == S_MAIL:
            self._bad(_REPLIES["rcpt_first"], ANOMALY_SEQUENCE, "DATA")
        elif self._state == S_BDAT:
            self._bad(_REPLIES["data_after_bdat"], ANOMALY_SEQUENCE, "DATA")
        elif not blank:
            self._bad(_REPLIES["syntax_args"], ANOMALY_SYNTAX, "DATA")
        else:
            self._emit(DataStart(), K_DATASTART)

    cdef void _cmd_rset(self) except *:
        self._state = S_IDLE
        self._forget_transaction()
        self._out.append(_RSET_LINE)
        self._events.append(Rset())

    cdef void _cmd_noop(self) except *:
        self._out.append(_NOOP_LINE)
        self._events.append(Noop())

    cdef void _cmd_vrfy(self, bytes arg) except *:
        self._out.append(_VRFY_LINE)
        self._events.append(Vrfy(arg.decode("latin-1")))

    cdef void _cmd_help(self) except *:
        cfg = self.config
        feats = [k.split()[0] for k in self.ehlo_keywords()] + list(cfg.features)
        help_ = _REPLIES["help"]
        lines = [help_.format(product=cfg.product, version=cfg.version).text,
                 _REPLIES["help_features"].format(features=" ".join(feats)).text]
        if cfg.help_url:
            lines.append(_REPLIES["help_url"].format(url=cfg.help_url).text)
        self._answer(MultiReply(help_.code, lines, help_.enhanced))
        self._events.append(Help())

    cdef void _cmd_quit(self) except *:
        self._out.append(_named_line("quit", self._greeting))
        self._events.append(Quit())
        self._close("quit", None)

    cdef void _cmd_auth(self, bytes arg) except *:
        if self.authenticated:
            self._bad(_REPLIES["auth_already"], ANOMALY_SEQUENCE, "AUTH")
            return
        if self._state == S_MAIL or self._state == S_RCPT or self._state == S_BDAT:
            self._bad(_REPLIES["auth_in_mail"], ANOMALY_SEQUENCE, "AUTH")
            return
        parts = arg.split()
        if self.auth_offered is False:     # RFC 4954 §4: not advertised -> 503, however malformed
            self._emit(AuthStart(parts[0].upper().decode("ascii", "replace") if parts else "",
                                 None), K_AUTHSTART)
            return
        if not parts or len(parts) > 2 or not _is_ascii(arg, len(arg)):
            self._bad(_REPLIES["syntax_args"], ANOMALY_SYNTAX, "AUTH")
            return
        mech = parts[0].upper().decode("ascii")
        initial = None
        if len(parts) == 2:
            initial = "" if parts[1] == b"=" else parts[1].decode("ascii")
        self._emit(AuthStart(mech, initial), K_AUTHSTART)

    cdef void _cmd_starttls(self, bint blank) except *:
        if self.tls:
            self._bad(_REPLIES["tls_active"], ANOMALY_SEQUENCE, "STARTTLS")
        elif self._state == S_MAIL or self._state == S_RCPT or self._state == S_BDAT:
            self._bad(_REPLIES["tls_in_mail"], ANOMALY_SEQUENCE, "STARTTLS")
        elif not blank:
            self._bad(_REPLIES["syntax_args"], ANOMALY_SYNTAX, "STARTTLS")
        else:
            self._emit(StartTLS(), K_STARTTLS)

    cdef void _cmd_bdat(self, bytes arg) except *:
        """BDAT count [LAST] (RFC 3030 §2, docs/behaviour/smtp.md#chunking)."""
        cdef Py_ssize_t size
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts[0]) > MAX_BDAT_DIGITS:
            # where the chunk ends is unknown: its octets would be read as commands
            self._bad(_REPLIES["bdat_syntax"], ANOMALY_SYNTAX, "BDAT")
            if self._state != S_CLOSED:
                r = _reply("bdat_lost", host=self._host)
                self._out.append(r.line())
                self._close("bdat count", r)
            return
        size = int(parts[0])
        if len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != b"LAST"):
            if self._state == S_BDAT:
                # inside a message: its chunk is discarded and the message ends
                # with it, refused (DataEnd.bad_bdat)
                self._events.append(Anomaly(ANOMALY_SYNTAX, "BDAT"))
                self._data.chunk(size, True, True)
                self._state = S_CHUNK
                return
            self._bad(_REPLIES["bdat_syntax"], ANOMALY_SYNTAX, "BDAT")
            self._skip = size
            if self._state == S_MAIL or self._state == S_RCPT:
                self._state = S_IDLE        # the transaction failed (RFC 3030 §2)
                self._forget_transaction()
                self.bdat_failed = True
            return
        if self.bdat_failed:
            self._skip = size
            self._answer(_REPLIES["bdat_failed"])
        elif self._state == S_BDAT:
            self._data.chunk(size, len(parts) == 2)
            self._state = S_CHUNK
        elif self._state == S_RCPT:
            self._emit(BdatStart(size, len(parts) == 2), K_BDATSTART)
        else:
            self._skip = size
            self._bad(_REPLIES["mail_first" if self._state == S_IDLE else "rcpt_first"],
                      ANOMALY_SEQUENCE, "BDAT")

    cdef void _reject(self, e, str verb) except *:
        if e.bad:
            self._bad(e.reply, e.tag, e.detail if e.detail is not None else verb)
        else:
            self._answer(e.reply)
