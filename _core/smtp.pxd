# smtp.pxd: the typed fields of the SMTP engine's cdef classes (smtp_*.pxi).
#
# Job: one place that says what each engine object holds, one comment per
# field (asyncpg's coreproto.pxd is the model); the methods are in the .pxi
# files, the behaviour in mailfilter/smtp/engine.py's docstring.
# Invariants: events are immutable values (readonly fields only); the engine
# and its DataReader share one input buffer and one event list.


cdef class Event:
    cdef tuple _values(self)


cdef class Helo(Event):
    cdef readonly str verb          # "HELO" or "EHLO"
    cdef readonly str name          # the argument, latin-1 decoded
    cdef tuple _values(self)


cdef class Mail(Event):
    cdef readonly str address       # the reverse-path, "" for <>
    cdef readonly dict params       # the ESMTP parameters (mail_params)
    cdef tuple _values(self)


cdef class Rcpt(Event):
    cdef readonly str address       # the forward-path
    cdef readonly dict params       # always empty: no RCPT parameter is known
    cdef readonly bint routed       # the path had a source route (@a,@b:), dropped from address
    cdef tuple _values(self)


cdef class DataStart(Event):
    pass


cdef class BdatStart(Event):
    cdef readonly Py_ssize_t size   # the first chunk's octets
    cdef readonly bint last         # it is the LAST chunk
    cdef tuple _values(self)


cdef class DataChunk(Event):
    cdef readonly bytes data        # stored form: LF line ends, dot-unstuffed
    cdef tuple _values(self)


cdef class DataEnd(Event):
    cdef readonly Py_ssize_t size   # stored octets, all of them (also past databytes)
    cdef readonly bint oversized    # size passed databytes: the chunks stopped there
    cdef readonly Py_ssize_t hops   # Received/Delivered lines of the header block
    cdef readonly bint bare_lf      # a bare LF ended the message (the session ends)
    cdef readonly bint header_cut   # the header block passed the header size limit: cut
    cdef readonly bint bad_bdat     # a malformed BDAT inside the message: its chunk discarded
    cdef tuple _values(self)


cdef class AuthStart(Event):
    cdef readonly str mechanism     # upper-cased
    cdef readonly object initial    # initial response: None, "" (for "="), or base64 text
    cdef tuple _values(self)


cdef class AuthResponse(Event):
    cdef readonly bytes line        # one SASL line, without its line end
    cdef tuple _values(self)


cdef class Rset(Event):
    pass


cdef class StartTLS(Event):
    pass


cdef class Quit(Event):
    pass


cdef class Noop(Event):
    pass


cdef class Vrfy(Event):
    cdef readonly str arg           # latin-1 decoded
    cdef tuple _values(self)


cdef class Help(Event):
    pass


cdef class Anomaly(Event):
    cdef readonly str tag           # one of the ANOMALY_* words
    cdef readonly object detail     # a verb, "<n bytes>" or a fixed word; never client bytes
    cdef tuple _values(self)


cdef class Closed(Event):
    cdef readonly str reason        # "eof", "quit", "421", "too many errors", "bare lf", ...
    cdef tuple _values(self)


cdef class MultiReply:
    cdef readonly int code          # the reply code, all lines
    cdef readonly str enhanced      # RFC 3463 code on every line, "" for none
    cdef readonly tuple lines       # the texts, first to last
    cdef object _wire               # the wire form, built at the first line()


cdef class DataReader:
    cdef bytearray _buf             # the engine's input buffer, consumed from the front
    cdef object _events             # where chunks and the DataEnd are queued
    cdef bint _list                 # _events is a list (appended from C)
    cdef Py_ssize_t _databytes      # 0 = unlimited
    cdef Py_ssize_t _header_limit   # header block octets kept; 0 = all
    cdef Py_ssize_t _size           # stored octets so far
    cdef bint _oversized            # _size passed _databytes: no more chunks
    cdef Py_ssize_t _hops           # Received/Delivered lines counted
    cdef bint _in_headers           # the hop count has not seen the empty line yet
    cdef Py_ssize_t _hlen           # octets of the current header line seen (9 = enough)
    cdef int _hmatch                # that line is a prefix of: bit 0 "received", bit 1 "delivered"
    cdef bint _first                # no region stored yet (the virtual line start is due)
    cdef Py_ssize_t _hpos           # stored octets seen by the header cap; -1: the block ended
    cdef Py_ssize_t _hname          # name octets of the undecided line start; -1: mid-line
    cdef bytearray _hheld           # that line's octets past the limit, held back
    cdef bint _hkept_lf             # what was kept below the limit ends at a line start
    cdef readonly bint header_cut   # this message's header block was cut
    cdef unsigned char* _scratch    # the stored form of the region being cut (grows)
    cdef Py_ssize_t _scap           # _scratch's capacity
    # BDAT (RFC 3030): the message comes in counted chunks, read by step_chunk()
    cdef readonly Py_ssize_t chunk_size  # octets of the current chunk
    cdef readonly Py_ssize_t chunk_left  # of them not yet read
    cdef bint _last                 # the current chunk is the LAST one
    cdef bint _cr                   # a CR ended the chunk before: stored once the next octet is known
    cdef bint _discard              # a bare LF or a malformed BDAT: the rest is read, not stored
    cdef bint _bad                  # a malformed BDAT's chunk was discarded
    cpdef reset(self)
    cpdef step(self)
    cpdef chunk(self, Py_ssize_t size, bint last, bint bad=*)
    cpdef step_chunk(self)
    cdef inline void _queue(self, ev) except *
    cdef unsigned char* _room(self, Py_ssize_t n) except NULL
    cdef DataEnd _end(self, bint bare_lf)
    cdef void _store(self, const unsigned char* out, Py_ssize_t n) except *
    cdef void _count_hops(self, const unsigned char* q, Py_ssize_t m)
    cdef bytes _cap_header(self, const unsigned char* out, Py_ssize_t n)
    cdef Py_ssize_t _body_start(self, const unsigned char* out, Py_ssize_t n, Py_ssize_t pos)


cdef class SMTPConnection:
    cdef public object config       # the EngineConfig
    cdef public object auth_offered # None: the app decides every AUTH; False: not offered (503)
    cdef public object close_reply  # the last reply, when it closed the session
    cdef public object helo         # HELO/EHLO name once answered 2xx, else None
    cdef public bint esmtp          # that verb was EHLO
    cdef public bint authenticated  # an AUTH exchange ended 2xx
    cdef public int bad_commands    # client errors so far (421 at max_bad_commands)
    cdef public int rcpt_count      # recipients accepted in this transaction
    cdef public bint mail_smtputf8  # this transaction's MAIL carried SMTPUTF8
    cdef public bint tls            # the session runs inside TLS (tls_started)
    cdef readonly bytearray _buf    # received, not yet consumed input
    cdef str _greeting              # config.greeting
    cdef str _host                  # the greeting's first word
    cdef tuple _extra_ehlo          # per-session extra EHLO keywords
    cdef list _out                  # reply bytes queued for one write
    cdef list _events               # queued events, consumed from _ev_head
    cdef Py_ssize_t _ev_head        # index of the next event to hand out
    cdef object _pending            # the event a reply is owed for, or None
    cdef int _kind                  # its index in _KINDS (the transition table's column)
    cdef int _state                 # index into STATES
    cdef bint _eof                  # receive_data(b"") seen
    cdef object _closed             # the Closed event, once made
    cdef object _close_reason       # why the session closed
    cdef bint _skipping             # discarding the rest of an over-long line
    cdef Py_ssize_t _max_line       # octets incl. CRLF (RFC 5321 §4.5.3.1)
    cdef Py_ssize_t _max_auth_line  # SASL line octets (RFC 4954 §4)
    cdef int _max_bad               # config.max_bad_commands
    cdef int _max_rcpts             # config.max_recipients
    cdef Py_ssize_t _max_hops       # config.max_hops
    cdef Py_ssize_t _databytes      # config.databytes, 0 = unlimited
    cdef bint _smtputf8             # SMTPUTF8 offered
    cdef DataReader _data           # the DATA byte machine on _buf
    cdef bint _tls_wait             # 220 to STARTTLS sent: no input until tls_started
    cdef public bint bdat_failed    # a BDAT of this transaction was refused: further BDATs 503
    cdef Py_ssize_t _skip           # octets of a refused BDAT chunk still to discard
    cdef object _pop(self)
    cdef Closed _closed_event(self)
    cdef void _close(self, str reason, r) except *
    cdef inline void _forget_transaction(self)
    cdef void _chunk_step(self) except *
    cdef void _emit(self, Event ev, int kind) except *
    cdef void _answer(self, r) except *
    cdef void _bad(self, r, str tag, detail) except *
    cdef void _command_step(self) except *
    cdef void _cmd_helo(self, bytes arg, str verb) except *
    cdef void _cmd_mail(self, bytes arg) except *
    cdef void _cmd_rcpt(self, bytes arg) except *
    cdef void _cmd_data(self, bint blank) except *
    cdef void _cmd_rset(self) except *
    cdef void _cmd_noop(self) except *
    cdef void _cmd_vrfy(self, bytes arg) except *
    cdef void _cmd_help(self) except *
    cdef void _cmd_quit(self) except *
    cdef void _cmd_auth(self, bytes arg) except *
    cdef void _cmd_starttls(self, bint blank) except *
    cdef void _cmd_bdat(self, bytes arg) except *
    cdef void _reject(self, e, str verb) except *
