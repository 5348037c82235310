# smtp_events.pxi: the SMTP engine's vocabulary (states, sentinels, events).
#
# Job: the values SMTPConnection.next_event() hands out, as small cdef
# classes with readonly fields, so the engine fills them from C and the
# session reads them without a dict; mailfilter/smtp/events.py re-exports
# them and keeps the reference docstring.
# Invariants: an event is a plain value: equality and hash over (type,
# fields), so tests and logs compare them by content; `owes_reply` is a class
# attribute (the application must send() a reply); states are the interned
# strings below, compared by identity by the shell; an Anomaly never carries
# client bytes (its detail is a verb, a length or a fixed word: a line may
# hold a secret; docs/architecture.md#design-rules).

IDLE = "IDLE"        # no mail transaction
MAIL = "MAIL"        # MAIL accepted, no recipient yet
RCPT = "RCPT"        # at least one recipient accepted
DATA = "DATA"        # reading the message
AUTH = "AUTH"        # inside an AUTH exchange
CLOSED = "CLOSED"    # 221/421 sent or EOF: input ignored
BDAT = "BDAT"        # a BDAT message: chunks taken, the LAST one not yet (RFC 3030)
CHUNK = "CHUNK"      # reading the octets of a BDAT chunk
STATES = (IDLE, MAIL, RCPT, DATA, AUTH, CLOSED, BDAT, CHUNK)

# the engine's state as a C int: the index into STATES
cdef enum:
    S_IDLE = 0
    S_MAIL = 1
    S_RCPT = 2
    S_DATA = 3
    S_AUTH = 4
    S_CLOSED = 5
    S_BDAT = 6
    S_CHUNK = 7
    N_STATES = 8

ANOMALY_BARE_NEWLINE = "BARE NEWLINE"
ANOMALY_LINE_LIMIT = "COMMAND LENGTH LIMIT"
ANOMALY_UNKNOWN = "UNKNOWN COMMAND"
ANOMALY_SEQUENCE = "BAD SEQUENCE"
ANOMALY_SYNTAX = "SYNTAX"
ANOMALY_EIGHTBIT = "EIGHTBIT"


cdef class _Sentinel:
    cdef str _name       # the repr

    def __init__(self, str name):
        self._name = name

    def __repr__(self):
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


cdef class Event:
    """Base of all events. ``owes_reply``: the application must ``send()`` a reply."""

    owes_reply = False
    _fields = ()         # field names, in constructor order (repr)

    cdef tuple _values(self):
        return ()

    def __eq__(self, other):
        return type(self) is type(other) and self._values() == (<Event>other)._values()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((type(self).__name__,) + self._values())

    def __repr__(self):
        args = ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self._values()))
        return f"{type(self).__name__}({args})"


cdef class Helo(Event):
    owes_reply = True
    _fields = ("verb", "name")

    def __init__(self, str verb, str name):
        self.verb = verb
        self.name = name

    cdef tuple _values(self):
        return (self.verb, self.name)


cdef class Mail(Event):
    owes_reply = True
    _fields = ("address", "params")

    def __init__(self, str address, dict params):
        self.address = address
        self.params = params

    cdef tuple _values(self):
        return (self.address, self.params)


cdef class Rcpt(Event):
    owes_reply = True
    _fields = ("address", "params", "routed")

    def __init__(self, str address, dict params, bint routed=False):
        self.address = address
        self.params = params
        self.routed = routed

    cdef tuple _values(self):
        return (self.address, self.params, self.routed)


cdef class DataStart(Event):
    owes_reply = True


cdef class BdatStart(Event):
    """The first BDAT of a transaction (RFC 3030 §2): the application answers
    as to DATA (354 to go on, which is not sent: BDAT has no intermediate
    reply), then the chunk's octets arrive as DataChunks."""
    owes_reply = True
    _fields = ("size", "last")

    def __init__(self, Py_ssize_t size, bint last):
        self.size = size
        self.last = last

    cdef tuple _values(self):
        return (self.size, self.last)


cdef class DataChunk(Event):
    _fields = ("data",)

    def __init__(self, bytes data):
        self.data = data

    cdef tuple _values(self):
        return (self.data,)


cdef class DataEnd(Event):
    owes_reply = True
    _fields = ("size", "oversized", "hops", "bare_lf", "header_cut", "bad_bdat")

    def __init__(self, Py_ssize_t size, bint oversized, Py_ssize_t hops, bint bare_lf,
                 bint header_cut=False, bint bad_bdat=False):
        self.size = size
        self.oversized = oversized
        self.hops = hops
        self.bare_lf = bare_lf
        self.header_cut = header_cut
        self.bad_bdat = bad_bdat

    cdef tuple _values(self):
        return (self.size, self.oversized, self.hops, self.bare_lf, self.header_cut,
                self.bad_bdat)


cdef class AuthStart(Event):
    owes_reply = True
    _fields = ("mechanism", "initial")

    def __init__(self, str mechanism, initial):
        self.mechanism = mechanism
        self.initial = initial

    cdef tuple _values(self):
        return (self.mechanism, self.initial)


cdef class AuthResponse(Event):
    owes_reply = True
    _fields = ("line",)

    def __init__(self, bytes line):
        self.line = line

    cdef tuple _values(self):
        return (self.line,)


cdef class Rset(Event):
    pass


cdef class StartTLS(Event):
    """STARTTLS without arguments, outside a transaction, not yet in TLS
    (RFC 3207 §4); the application answers 220 (then the TLS handshake) or
    454 (TLS not available)."""
    owes_reply = True


cdef class Quit(Event):
    pass


cdef class Noop(Event):
    pass


cdef class Vrfy(Event):
    _fields = ("arg",)

    def __init__(self, str arg):
        self.arg = arg

    cdef tuple _values(self):
        return (self.arg,)


cdef class Help(Event):
    pass


cdef class Anomaly(Event):
    """Informational (logging): no reply owed. ``tag`` is one of the ANOMALY_* names."""
    _fields = ("tag", "detail")

    def __init__(self, str tag, detail=None):
        self.tag = tag
        self.detail = detail

    cdef tuple _values(self):
        return (self.tag, self.detail)


cdef class Closed(Event):
    _fields = ("reason",)

    def __init__(self, str reason):
        self.reason = reason

    cdef tuple _values(self):
        return (self.reason,)
