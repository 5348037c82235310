# smtp_args.pxi: the arguments of MAIL and RCPT (path, ESMTP parameters, xtext).
#
# Job: from the bytes after the verb to Python values, on the bytes' buffer
# (no per-character temporaries): parse_path (docs/behaviour/smtp.md#addresses),
# mail_params / rcpt_params (RFC 1870, 6152, 4954 §5, 6531), decode_address,
# decode_xtext (RFC 3461 §4), unknown_param (RFC 5321 §4.1.1.11, §4.1.2).
# mailfilter/smtp/args.py re-exports them and is their reference text.
# Invariants: every refusal is a ParseError carrying the reply that answers it,
# taken from the ONE reply table (mailfilter/smtp/replies.py, handed in by
# smtp_install()); an address that passes is free of control characters and
# is ASCII unless the transaction announced SMTPUTF8 (RFC 6531 §3.4); no
# client byte is echoed in a reply unless it is an esmtp-keyword.

cdef extern from "string.h" nogil:
    # memmem is a GNU extension: Python.h defines _GNU_SOURCE before string.h
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)
    void* memchr(const void* s, int c, size_t n)

MAX_ADDRESS = 900          # qmail addrparse limit (docs/behaviour/smtp.md#addresses step 6)

# the reply table, as mailfilter/smtp/replies.py defines it (smtp_install)
cdef dict _REPLIES = {}


class ParseError(Exception):
    """An argument error with the reply that answers it. ``bad``: it counts
    towards max_bad_commands (a client error, not a limit such as SIZE)."""

    def __init__(self, reply, tag=ANOMALY_SYNTAX, detail=None, bad=True):
        self.reply = reply
        self.tag = tag
        self.detail = detail
        self.bad = bad


cdef inline bint _is_name_char(unsigned char c) nogil:
    # RFC 5322 §3.6.8 ftext: printable ASCII except ':'
    return 0x21 <= c <= 0x7e and c != 0x3a


cdef inline unsigned char _upper(unsigned char c) nogil:
    return c - 32 if 0x61 <= c <= 0x7a else c


cdef inline bint _is_ascii(const unsigned char* p, Py_ssize_t n) nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] >= 0x80:
            return False
    return True


cdef inline bint _is_space(unsigned char c) nogil:
    # bytes.split()'s whitespace: SP, HT, LF, VT, FF, CR
    return c == 0x20 or 0x09 <= c <= 0x0d


def parse_path(bytes arg, bytes keyword):
    """Split ``FROM:<path> params`` into (address bytes, params bytes): see
    mailfilter/smtp/args.py."""
    cdef const unsigned char* p = arg
    cdef const unsigned char* kw = keyword
    cdef Py_ssize_t n = len(arg), k = len(keyword), i, gt
    if n < k:
        raise ParseError(_REPLIES["syntax"], detail="keyword")
    for i in range(k):
        if _upper(p[i]) != kw[i]:
            raise ParseError(_REPLIES["syntax"], detail="keyword")
    i = k
    while i < n and p[i] == 0x20:
        i += 1
    if i >= n or p[i] != 0x3c:   # <
        raise ParseError(_REPLIES["syntax"], detail="brackets")
    if memchr(p + i, 0x22, n - i) != NULL or memchr(p + i, 0x5c, n - i) != NULL:
        addr, after = _quoted_path(arg[i:])
    else:
        gt = -1
        for gt in range(i + 1, n):
            if p[gt] == 0x3e:
                break
        else:
            gt = -1
        if gt < 0:
            raise ParseError(_REPLIES["syntax"], detail="brackets")
        addr = arg[i + 1:gt]
        after = arg[gt + 1:]
    if after and after[0] != 0x20:
        raise ParseError(_REPLIES["syntax"], detail="after path")
    if addr[:1] == b"@":
        colon = addr.find(b":")
        if colon < 0:
            raise ParseError(_REPLIES["syntax"], detail="source route")
        addr = addr[colon + 1:]
    if len(addr) >= MAX_ADDRESS:
        raise ParseError(_REPLIES["address_too_long"])
    return addr, after


cdef tuple _quoted_path(bytes rest):
    """Slow path of parse_path: a path with quotes or backslashes (rare, <= max_line)."""
    cdef const unsigned char* p = rest
    cdef Py_ssize_t i = 1, n = len(rest)
    cdef bint quoted = False
    cdef unsigned char c
    out = bytearray()
    while i < n:
        c = p[i]
        if c == 0x5C:           # backslash: next byte literally
            i += 1
            if i < n:
                out.append(p[i])
        elif c == 0x22:         # "
            quoted = not quoted
        elif c == 0x3E and not quoted:      # >
            return bytes(out), rest[i + 1:]
        else:
            out.append(c)
        i += 1
    raise ParseError(_REPLIES["syntax"], detail="brackets")


def mail_params(bytes rest, bint smtputf8):
    """The MAIL parameters we advertise: SIZE, BODY, AUTH (xtext) and SMTPUTF8
    when offered; each at most once; anything else is unknown."""
    cdef dict params = {}
    for p in rest.split():
        key, eq, val = p.partition(b"=")
        k = key.upper()
        if k == b"SIZE":
            if not eq or not val.isdigit() or len(val) > 20:
                raise ParseError(_REPLIES["syntax_args"], detail="SIZE")
            v = int(val)
        elif k == b"BODY":
            v = val.upper().decode("latin-1")
            if v != "7BIT" and v != "8BITMIME":
                raise ParseError(_REPLIES["syntax_args"], detail="BODY")
        elif k == b"AUTH":
            if not eq or not val:
                raise ParseError(_REPLIES["syntax_args"], detail="AUTH")
            v = decode_xtext(val)
        elif k == b"SMTPUTF8" and smtputf8:
            if eq:
                raise ParseError(_REPLIES["syntax_args"], detail="SMTPUTF8")
            v = True
        else:
            raise unknown_param(p)
        ks = k.decode("ascii")
        if ks in params:
            raise ParseError(_REPLIES["syntax_args"], detail=ks)
        params[ks] = v
    return params


def rcpt_params(bytes rest):
    """RCPT takes no parameter we know (no DSN, RFC 3461); whitespace alone is
    no parameter, as at MAIL."""
    cdef const unsigned char* p = rest
    cdef Py_ssize_t i, n = len(rest)
    for i in range(n):
        if not _is_space(p[i]):
            raise unknown_param(rest.split()[0])
    return {}


def decode_address(bytes addr, bint smtputf8):
    """The address as text: ASCII, or UTF-8 when the transaction announced
    SMTPUTF8 (RFC 6531 §3.4); 553 5.6.7 for 8 bits without it."""
    cdef const unsigned char* p = addr
    cdef Py_ssize_t i, n = len(addr)
    cdef bint ascii = True
    for i in range(n):
        if p[i] < 0x20 or p[i] == 0x7f:
            # no mailbox has control characters; refuse at the command, not at DATA
            raise ParseError(_REPLIES["bad_address"], ANOMALY_SYNTAX, "control character")
        if p[i] >= 0x80:
            ascii = False
    if ascii:
        return addr.decode("ascii")
    if not smtputf8:
        raise ParseError(_REPLIES["non_ascii_envelope"], ANOMALY_EIGHTBIT, "address")
    # RFC 3629 UTF-8 only (Python's strict decoder refuses overlong forms,
    # surrogates and code points above U+10FFFF)
    try:
        text = addr.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(_REPLIES["bad_address"], ANOMALY_EIGHTBIT, "utf-8") from None
    # nor C1 controls (U+0080-U+009F, UTF-8 C2 80..C2 9F): RFC 5198 §2 says
    # they MUST NOT appear (docs/behaviour/smtp.md#addresses step 8)
    for i in range(n - 1):
        if p[i] == 0xc2 and p[i + 1] < 0xa0:
            raise ParseError(_REPLIES["bad_address"], ANOMALY_EIGHTBIT, "control character")
    return text


cdef inline int _hexval(unsigned char c) nogil:
    if 0x30 <= c <= 0x39:
        return c - 0x30
    c |= 0x20
    if 0x61 <= c <= 0x66:
        return c - 0x61 + 10
    return -1


def decode_xtext(bytes value):
    """RFC 3461 §4 xtext decoding (``+XX``); an 8-bit byte is a syntax error."""
    cdef const unsigned char* p = value
    cdef Py_ssize_t i = 0, n = len(value)
    cdef int hi, lo
    if not _is_ascii(p, n):
        raise ParseError(_REPLIES["syntax_args"], detail="xtext")
    if memchr(p, 0x2b, n) == NULL:
        return value.decode("ascii")
    out = bytearray()
    while i < n:
        if p[i] == 0x2B:
            hi = _hexval(p[i + 1]) if i + 1 < n else -1
            lo = _hexval(p[i + 2]) if i + 2 < n else -1
            if hi < 0 or lo < 0:
                raise ParseError(_REPLIES["syntax_args"], detail="xtext")
            out.append(hi * 16 + lo)
            i += 3
        else:
            out.append(p[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


cdef bint _esmtp_keyword(const unsigned char* p, Py_ssize_t n):
    # RFC 5321 §4.1.2 esmtp-keyword: ALPHA/DIGIT, then ALPHA/DIGIT/"-"; at most 64 octets
    cdef Py_ssize_t i
    cdef unsigned char c
    if n < 1 or n > 64:
        return False
    for i in range(n):
        c = p[i]
        if not (0x30 <= c <= 0x39 or 0x41 <= c <= 0x5a or 0x61 <= c <= 0x7a
                or (c == 0x2d and i > 0)):
            return False
    return True


def unknown_param(bytes param):
    """555 naming an unknown parameter when its name is an esmtp-keyword of
    sane length; anything else is 501 and is not echoed (RFC 5321 §4.2)."""
    key = param.partition(b"=")[0]
    if not _esmtp_keyword(key, len(key)):
        return ParseError(_REPLIES["syntax_args"], detail="parameter name")
    name = key.decode("ascii")
    return ParseError(_REPLIES["param_unknown"].format(param=name), detail=name)
