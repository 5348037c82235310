# smtp_data.pxi: the DATA byte machine, from the wire to the stored form.
#
# Job: consume the engine's input buffer while the session is in DATA and
# queue DataChunk events (stored form: LF line ends, dot-unstuffed) and, at
# the end of data, one DataEnd (docs/behaviour/smtp.md#data). The theory of
# operation is mailfilter/smtp/data.py's docstring; here it runs on the
# buffer's `const unsigned char*`:
#   - end of data: memmem for CRLF.CRLF; a region never ends inside a
#     possible end marker (at most 4 bytes are held back), never at a line
#     start, never after a CR;
#   - one pass per region (memchr per line) writes the stored form into a
#     scratch buffer: CRLF -> LF, the dot after a line start dropped
#     (RFC 5321 §4.5.2), a CR not before LF kept, and stops at the first bare
#     LF (the smuggling forms are bare LFs; the session then ends);
#   - hops: Received/Delivered lines (ASCII case-insensitive) of the header
#     block (up to the first empty line), counted at their terminating LF
#     from a 2-bit prefix match over each line's first 9 octets;
#   - size: stored octets; past databytes the chunks stop at exactly
#     databytes octets, the count goes on;
#   - header size: the Postfix header-end rule (RFC 5322 §3.6.8 field names,
#     continuation lines; a name of at most 997 octets) decides where the
#     header block ends; header octets past header_limit are dropped, a cut
#     line gets its LF back, a line still undecided at a region's end is held.
#   - BDAT chunks (RFC 3030): step_chunk() takes at most chunk_left octets,
#     CRLF -> LF without unstuffing, a CR last held here (the buffer then
#     holds the next command), the same size, hops, header cap and bare LF
#     rules through _store.
# Invariants: one bytes object per region (the chunk), none per line; the
# engine's buffer holds at most 4 octets of the message between passes; the
# bytes after the end of data (or of the chunk) stay in the buffer, untouched.

HEADER_SIZE_LIMIT = 102_400     # Postfix's header_size_limit, the usual --header-size-limit

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.mem cimport PyMem_Realloc, PyMem_Free

cdef enum:
    MAX_NAME = 997          # RFC 5322 §2.1.1: 998-octet lines, so a name has <= 997 and its ':'

cdef const char* _RECEIVED = b"received"
cdef const char* _DELIVERED = b"delivered"
cdef bytes _B_LF = b"\n"


cdef class DataReader:
    """One DATA byte machine, bound to the engine's input buffer and event
    queue; ``reset()`` before each message, ``step()`` whenever bytes arrived."""

    def __init__(self, bytearray buf not None, events, Py_ssize_t databytes,
                 Py_ssize_t header_limit=0):
        self._buf = buf
        self._events = events
        self._list = type(events) is list
        self._databytes = databytes
        self._header_limit = header_limit
        self.reset()

    def __dealloc__(self):
        PyMem_Free(self._scratch)

    cpdef reset(self):
        """Start a new message (the 354 was sent)."""
        self._size = 0
        self._oversized = False
        self._hops = 0
        self._in_headers = True
        self._hlen = 0
        self._hmatch = 3
        self._first = True
        self._hpos = 0 if self._header_limit else -1
        self._hname = 0
        self._hheld = bytearray()
        self._hkept_lf = True
        self.header_cut = False
        self.chunk_size = 0
        self.chunk_left = 0
        self._last = False
        self._cr = False
        self._discard = False
        self._bad = False

    cpdef chunk(self, Py_ssize_t size, bint last, bint bad=False):
        """The next BDAT chunk: `size` octets follow in the buffer (RFC 3030
        §2). The first chunk of a message comes after reset(); `bad`: the
        BDAT was malformed, its octets are read and discarded and the message
        ends with it (DataEnd.bad_bdat)."""
        self._first = False             # no virtual line start: nothing is unstuffed
        self.chunk_size = self.chunk_left = size
        self._last = last or bad
        if bad:
            self._bad = self._discard = True

    cpdef step_chunk(self):
        """Consume what is buffered of the current chunk, never past it; queue
        its chunks in stored form (CRLF -> LF, nothing unstuffed; a CR at a
        chunk's end waits for the next chunk's first octet). Returns the
        DataEnd when the message ended (the LAST chunk read, or a chunk that
        failed: a bare LF, the size limit, a malformed BDAT), else None;
        chunk_left says whether the chunk was read whole."""
        cdef bytearray buf = self._buf
        cdef Py_ssize_t n = min(self.chunk_left, PyByteArray_GET_SIZE(buf))
        cdef const unsigned char* p = <const unsigned char*>PyByteArray_AS_STRING(buf)
        cdef const unsigned char* e
        cdef Py_ssize_t i = 0, j, o = 0
        cdef bint end = n == self.chunk_left, final
        cdef unsigned char* out
        if not end and n == 0:
            return None
        final = end and self._last
        if not self._discard:
            out = self._room(n + 1)
            if self._cr:
                self._cr = False
                out[0] = 0x0a if n and p[0] == 0x0a else 0x0d
                o = 1
                i = 1 if out[0] == 0x0a else 0
            while i < n:
                e = <const unsigned char*>memchr(p + i, 0x0a, n - i)
                if e == NULL:
                    memcpy(out + o, p + i, n - i)
                    o += n - i
                    break
                j = e - p
                if j == 0 or p[j - 1] != 0x0d:
                    memcpy(out + o, p + i, j - i)     # a bare LF: what is before it is kept
                    o += j - i
                    self._discard = True
                    break
                memcpy(out + o, p + i, j - 1 - i)
                o += j - 1 - i
                out[o] = 0x0a
                o += 1
                i = j + 1
            if not self._discard and not final and o and out[o - 1] == 0x0d:
                o -= 1                  # a CR last: the next chunk may begin with its LF
                self._cr = True
            if o:
                self._store(out, o)
        del buf[:n]
        self.chunk_left -= n
        if not end:
            return None
        if final or self._discard or self._oversized:
            return self._end(self._discard and not self._bad)
        return None

    cdef inline void _queue(self, ev) except *:
        if self._list:
            (<list>self._events).append(ev)
        else:
            self._events.append(ev)

    cdef unsigned char* _room(self, Py_ssize_t n) except NULL:
        cdef void* p
        if n > self._scap or self._scratch == NULL:
            p = PyMem_Realloc(self._scratch, n + 64)
            if p == NULL:
                raise MemoryError()
            self._scratch = <unsigned char*>p
            self._scap = n + 64
        return self._scratch

    cpdef step(self):
        """Consume what is buffered; queue its chunks. Returns the DataEnd
        (also queued, after the chunks) when the message ended, else None."""
        cdef bytearray buf = self._buf
        cdef Py_ssize_t n = PyByteArray_GET_SIZE(buf)
        cdef const unsigned char* p = <const unsigned char*>PyByteArray_AS_STRING(buf)
        cdef const unsigned char* e
        cdef Py_ssize_t cut, consume, hold, i, j, o
        cdef bint final, bare = False
        cdef unsigned char* out
        if self._first:
            # the virtual CRLF before the first line: "." alone is an empty message
            if n >= 3 and p[0] == 0x2e and p[1] == 0x0d and p[2] == 0x0a:
                del buf[:3]
                self._first = False
                return self._end(False)
            if n == 0 or (p[0] == 0x2e and (n == 1 or (n == 2 and p[1] == 0x0d))):
                return None
        e = <const unsigned char*>memmem(p, n, b"\r\n.\r\n", 5)
        if e != NULL:
            cut = (e - p) + 2
            consume = cut + 3
            final = True
        else:
            hold = 0
            if n >= 1 and p[n - 1] == 0x0d:
                hold = 4 if (n >= 4 and p[n - 4] == 0x0d and p[n - 3] == 0x0a
                             and p[n - 2] == 0x2e) else 1
            elif n >= 2 and p[n - 2] == 0x0d and p[n - 1] == 0x0a:
                hold = 2
            elif n >= 3 and p[n - 3] == 0x0d and p[n - 2] == 0x0a and p[n - 1] == 0x2e:
                hold = 3
            cut = consume = n - hold
            if cut <= 0:
                return None
            final = False
        # the stored form of p[:cut], behind a virtual LF at out[0] on the first region
        out = self._room(cut + 1)
        o = 0
        i = 0
        if self._first:
            out[0] = 0x0a
            o = 1
            if p[0] == 0x2e:
                i = 1
        while i < cut:
            e = <const unsigned char*>memchr(p + i, 0x0a, cut - i)
            if e == NULL:
                memcpy(out + o, p + i, cut - i)
                o += cut - i
                break
            j = e - p
            if j == 0 or p[j - 1] != 0x0d:
                # a bare LF (j == 0: after the virtual LF or a region that never ends in CR)
                memcpy(out + o, p + i, j - i)
                o += j - i
                bare = True
                break
            memcpy(out + o, p + i, j - 1 - i)
            o += j - 1 - i
            out[o] = 0x0a
            o += 1
            i = j + 1
            if i < cut and p[i] == 0x2e:
                i += 1                  # dot-unstuffing (RFC 5321 §4.5.2)
        if bare:
            del buf[:]
        else:
            del buf[:consume]
        self._store(out, o)
        if bare:
            return self._end(True)
        if final:
            return self._end(False)
        return None

    cdef DataEnd _end(self, bint bare_lf):
        if self.header_cut and self._hpos >= 0 and not self._hkept_lf and not self._oversized:
            self._queue(DataChunk(_B_LF))     # a cut header with no body: its last LF
        ev = DataEnd(self._size, self._oversized, self._hops, bare_lf, self.header_cut, self._bad)
        self._queue(ev)
        return ev

    cdef void _store(self, const unsigned char* out, Py_ssize_t n) except *:
        """Count a region in stored form and queue it as a DataChunk."""
        cdef Py_ssize_t before, db
        if self._first:
            self._first = False
            out += 1                   # the virtual line start
            n -= 1
        if self._in_headers:
            self._count_hops(out, n)
        before = self._size
        self._size = before + n
        if self._oversized:
            return
        db = self._databytes
        if db and self._size > db:
            self._oversized = True
            n = db - before
        if n <= 0:
            return
        if self._hpos >= 0:
            chunk = self._cap_header(out, n)
            if chunk:
                self._queue(DataChunk(chunk))
        else:
            self._queue(DataChunk(PyBytes_FromStringAndSize(<const char*>out, n)))

    cdef void _count_hops(self, const unsigned char* q, Py_ssize_t m):
        """Count Received/Delivered lines of the header block (docs/behaviour/smtp.md#data)."""
        cdef Py_ssize_t i = 0, k
        cdef unsigned char c
        cdef const unsigned char* e
        while i < m:
            k = self._hlen
            if k >= 9:
                # the prefix is decided: only this line's end matters
                e = <const unsigned char*>memchr(q + i, 0x0a, m - i)
                if e == NULL:
                    return
                i = e - q
                c = 0x0a
            else:
                c = q[i]
            if c == 0x0a:
                if k == 0:
                    self._in_headers = False    # the empty line ends the header block
                    return
                if (self._hmatch & 1 and k >= 8) or (self._hmatch & 2 and k >= 9):
                    self._hops += 1
                self._hlen = 0
                self._hmatch = 3
            else:
                c = _lower(c)
                if k < 8 and c != <unsigned char>_RECEIVED[k]:
                    self._hmatch &= ~1
                if c != <unsigned char>_DELIVERED[k]:
                    self._hmatch &= ~2
                self._hlen = k + 1
            i += 1

    cdef bytes _cap_header(self, const unsigned char* out, Py_ssize_t n):
        """What is kept of `out` (stored form) under the header cap: header
        octets beyond header_limit are dropped up to the first body line; a cut
        line gets its LF back (docs/behaviour/smtp.md#data)."""
        cdef Py_ssize_t pos = self._hpos, limit = self._header_limit
        cdef Py_ssize_t end = pos + n, body, start, first, kept
        cdef bytearray held = self._hheld
        self._hpos = end
        if end <= limit and not self._in_headers:
            # the hop count has just seen the empty line below the limit: no search
            self._hpos = -1
            return PyBytes_FromStringAndSize(<const char*>out, n)
        body = self._body_start(out, n, pos)
        if pos < limit:
            self._hkept_lf = out[min(limit, end) - pos - 1] == 0x0a
        if end <= limit:
            if body >= 0:
                self._hpos = -1
            return PyBytes_FromStringAndSize(<const char*>out, n)
        kept = max(0, limit - pos)
        keep = PyBytes_FromStringAndSize(<const char*>out, kept)
        if body >= 0:
            self._hpos = -1                 # the block ended: the body passes whole
            if body <= limit:               # below the limit: nothing was cut
                return bytes(held) + PyBytes_FromStringAndSize(<const char*>out, n)
            self.header_cut = True
            first = pos - len(held)         # the stream position of held[0]
            if body < pos:
                rest = bytes(held[body - first:]) + PyBytes_FromStringAndSize(<const char*>out, n)
            else:
                rest = PyBytes_FromStringAndSize(<const char*>(out + body - pos), end - body)
            return keep + (b"" if self._hkept_lf else _B_LF) + rest
        if self._hname < 0:
            del held[:]
        else:
            start = end - self._hname       # the undecided line's first octet
            if start > pos:
                del held[:]                 # it began in this region
            start = max(limit, start, pos) - pos
            held += PyBytes_FromStringAndSize(<const char*>(out + start), n - start)
        if end - limit > len(held):
            self.header_cut = True          # header octets past the limit were dropped
        return keep

    cdef Py_ssize_t _body_start(self, const unsigned char* out, Py_ssize_t n, Py_ssize_t pos):
        """The stream position where the first body line starts, if `out`
        (at stream position `pos`) decides it; else -1, with the undecided
        line start at its end noted in _hname (RFC 5322 §3.6.8; Postfix ends
        the header block at such a line)."""
        cdef Py_ssize_t name = self._hname, k, run, j, last = -1, total
        cdef unsigned char c
        cdef const unsigned char* e
        if name >= 0:
            # the line start carried from the region before: decide it first
            k = 0
            while k < n and k < MAX_NAME + 1 - name and _is_name_char(out[k]):
                k += 1
            total = name + k
            if total > MAX_NAME:
                return pos - name           # too long for a field name
            if k == n:
                self._hname = total
                return -1
            c = out[k]
            if not ((c == 0x3a and total) or ((c == 0x20 or c == 0x09) and not total)):
                return pos - name
        j = 0
        while True:
            e = <const unsigned char*>memchr(out + j, 0x0a, n - j)
            if e == NULL:
                break
            last = e - out
            k = last + 1
            run = 0
            while k < n and run <= MAX_NAME and _is_name_char(out[k]):
                k += 1
                run += 1
            if run > MAX_NAME:
                return pos + last + 1       # too long for a field name
            if k == n:
                break                       # undecided at the region's end
            c = out[k]
            if run == 0:
                if c != 0x20 and c != 0x09:
                    return pos + last + 1   # neither a field nor a continuation
            elif c != 0x3a:
                return pos + last + 1       # a name not followed by ':'
            j = last + 1
        if last < 0:
            self._hname = -1                # inside a header line
        else:
            k = n - last - 1
            self._hname = k if (k <= MAX_NAME and _name_run(out + last + 1, k) == k) else -1
        return -1


cdef inline unsigned char _lower(unsigned char c) nogil:
    return c + 32 if 0x41 <= c <= 0x5a else c


cdef inline Py_ssize_t _name_run(const unsigned char* p, Py_ssize_t n) nogil:
    cdef Py_ssize_t k = 0
    while k < n and _is_name_char(p[k]):
        k += 1
    return k
