# logline.pxi: the key=value decision line, with its bare values checked in C.
"""kv_line for mailfilter/log/quoting.py (docs/operations.md#values).

Job: join `key=value` pairs of a dict in order, skipping None values; a
value made only of ASCII letters, digits and `.-_@:[]<>+/=%!` and at most
`max_value` characters stands as it is; any other is handed to `quote` (the
Python function of log/quoting.py, which quotes, escapes and cuts). Every
line of the decision log goes through here, two or more per message.

Invariants: the same output as log/quoting.py's Python kv_line for every
input (tests/smtp/test_log.py checks both on random values); a bare value is
checked by one table lookup per character of a 1-byte-kind str, no regex
and no temporary; anything else (non-ASCII, long, unsafe) goes to `quote`.
"""
from cpython.unicode cimport PyUnicode_GET_LENGTH, PyUnicode_KIND, PyUnicode_1BYTE_KIND, PyUnicode_DATA

cdef unsigned char _LOG_BARE[256]


cdef void _log_bare_init():
    cdef bytes ok = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                     b".-_@:[]<>+/=%!")
    cdef Py_ssize_t i
    memset(_LOG_BARE, 0, 256)
    for i in range(len(ok)):
        _LOG_BARE[<unsigned char>ok[i]] = 1


_log_bare_init()


cdef inline bint _log_is_bare(str v, Py_ssize_t max_value):
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(v), i
    cdef const unsigned char* p
    if n == 0 or n > max_value or PyUnicode_KIND(v) != PyUnicode_1BYTE_KIND:
        return False
    p = <const unsigned char*>PyUnicode_DATA(v)
    for i in range(n):
        if not _LOG_BARE[p[i]]:
            return False
    return True


def log_kv_line(dict fields, Py_ssize_t max_value, quote):
    """' '.join(f"{k}={quote(v)}") over the fields whose value is not None."""
    cdef list parts = []
    cdef str text
    for k, v in fields.items():
        if v is None:
            continue
        text = v if type(v) is str else str(v)
        if _log_is_bare(text, max_value):
            parts.append(k + "=" + text)
        else:
            parts.append(k + "=" + quote(text))
    return " ".join(parts)
