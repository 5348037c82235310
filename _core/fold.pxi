# fold.pxi: ASCII case folding, the 64-bit hash shared by all tables, and the
# read-only blob holder used by every runtime class.
#
# Job and invariants
# - Case folding is ASCII only: A-Z -> a-z; every other byte (including bytes
#   >= 0x80) is left as is (docs/behaviour/control-files.md#case, _core/README.md "General rules").
# - hash_bytes() is stable across hosts and runs: it reads words as
#   little-endian and has no per-process seed, because hash values are stored
#   in blobs that are built once and loaded elsewhere.
# - _MfBlob wraps a caller's buffer: a read-only, 8-byte aligned buffer is used
#   in place (bytes, memoryview slice of an ACCESS_READ mmap); a writable or
#   misaligned one is copied once into owned aligned memory, so validation done
#   at construction cannot be invalidated by later writes and all in-blob
#   arrays are naturally aligned. The holder keeps a reference to the buffer.
# - Blobs store native integers; the layout is little-endian, so runtime
#   classes refuse to load on a big-endian host.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t, int64_t, uintptr_t, INT32_MAX
from libc.string cimport memcpy, memcmp, memset
from libc.stdlib cimport malloc, calloc, realloc, free, qsort
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize

import sys as _sys

cdef bint _MF_LITTLE_ENDIAN = _sys.byteorder == "little"


cdef inline unsigned char fold(unsigned char c) noexcept nogil:
    """ASCII-only lower-casing of one byte (docs/behaviour/control-files.md#case)."""
    if <unsigned char>(c - 65) < 26:
        return c + 32
    return c


cdef inline void fold_into(unsigned char* dst, const unsigned char* src,
                           Py_ssize_t n) noexcept nogil:
    """Write the folded copy of src[0:n] to dst (dst may equal src)."""
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = fold(src[i])


cdef inline uint64_t _mf_le64(const unsigned char* p) noexcept nogil:
    # Explicit little-endian load; compilers turn this into one mov on x86.
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32)
            | (<uint64_t>p[5] << 40) | (<uint64_t>p[6] << 48)
            | (<uint64_t>p[7] << 56))


cdef inline uint64_t _mf_rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef uint64_t hash_bytes(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """64-bit hash of p[0:n] (MurmurHash3-style word mixing + fmix64 finaliser).

    Written here; unseeded and endian-independent because the values are
    persisted inside blobs.
    """
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ (<uint64_t>n * 0xC2B2AE3D27D4EB4FULL)
    cdef uint64_t k
    cdef Py_ssize_t i = 0
    cdef int j
    while n - i >= 8:
        k = _mf_le64(p + i) * 0x87C37B91114253D5ULL
        k = _mf_rotl(k, 31) * 0x4CF5AD432745937FULL
        h ^= k
        h = _mf_rotl(h, 27) * 5 + 0x52DCE729
        i += 8
    if i < n:
        k = 0
        j = 0
        while i < n:
            k |= (<uint64_t>p[i]) << (8 * j)
            i += 1
            j += 1
        k *= 0x87C37B91114253D5ULL
        k = _mf_rotl(k, 31) * 0x4CF5AD432745937FULL
        h ^= k
    # fmix64
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h


def fold_bytes(b):
    """Return `b` (bytes-like) with ASCII A-Z folded to a-z; other bytes kept."""
    cdef const unsigned char[::1] mv = b
    cdef Py_ssize_t n = mv.shape[0]
    out = PyBytes_FromStringAndSize(NULL, n)
    if n:
        fold_into(<unsigned char*>PyBytes_AS_STRING(out), &mv[0], n)
    return out


def hash64(b):
    """The 64-bit hash used by the tables, of the bytes as given (no folding).

    Exposed for tests and tools; stable across runs and hosts.
    """
    cdef const unsigned char[::1] mv = b
    cdef Py_ssize_t n = mv.shape[0]
    if n == 0:
        return hash_bytes(<const unsigned char*>"", 0)
    return hash_bytes(&mv[0], n)


# ---------------------------------------------------------------------------
# Blob plumbing shared by hashtab / aho / listmatch.

cdef inline uint64_t _mf_align8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef inline uint32_t _mf_rd32(const unsigned char* p) noexcept nogil:
    return (<const uint32_t*>p)[0]


cdef inline uint64_t _mf_rd64(const unsigned char* p) noexcept nogil:
    return (<const uint64_t*>p)[0]


cdef inline void _mf_wr32(unsigned char* p, uint32_t v) noexcept nogil:
    (<uint32_t*>p)[0] = v


cdef inline void _mf_wr64(unsigned char* p, uint64_t v) noexcept nogil:
    (<uint64_t*>p)[0] = v


cdef int _mf_check_header(const unsigned char* p, Py_ssize_t n, bytes tag,
                          uint32_t version, Py_ssize_t header_size,
                          str what) except -1:
    """Validate length >= header_size, the 4-byte tag and the version."""
    if not _MF_LITTLE_ENDIAN:
        raise ValueError(f"{what}: blobs are little-endian; big-endian hosts are not supported")
    if n < header_size:
        raise ValueError(f"{what}: blob truncated: {n} bytes, header needs {header_size}")
    if memcmp(p, PyBytes_AS_STRING(tag), 4) != 0:
        raise ValueError(f"{what}: bad blob tag {bytes(p[:4])!r}, expected {tag!r}")
    cdef uint32_t v = _mf_rd32(p + 4)
    if v != version:
        raise ValueError(f"{what}: unsupported blob version {v}, expected {version}")
    return 0


cdef bytes _mf_new_blob(Py_ssize_t total):
    """A zero-filled fresh bytes object of `total` bytes, written by builders."""
    out = PyBytes_FromStringAndSize(NULL, total)
    memset(PyBytes_AS_STRING(out), 0, total)
    return out


cdef class _MfBlob:
    """Keeps a caller's buffer alive and exposes an aligned read-only pointer.

    Read-only 8-byte aligned buffers are used in place; others are copied once.
    """
    cdef object obj
    cdef const unsigned char[::1] mv
    cdef unsigned char* own
    cdef const unsigned char* p
    cdef Py_ssize_t n

    def __cinit__(self, buf):
        cdef memoryview m
        try:
            m = memoryview(buf)
        except TypeError:
            raise TypeError(f"expected a bytes-like buffer, got {type(buf).__name__}") from None
        if m.ndim != 1 or m.itemsize != 1 or not m.c_contiguous:
            raise ValueError("blob buffer must be a contiguous 1-D byte buffer")
        if m.format not in ("B", "b", "c"):
            m = m.cast("B")
        self.obj = buf
        self.mv = m
        self.own = NULL
        self.n = self.mv.shape[0]
        if self.n == 0:
            self.p = <const unsigned char*>""
            return
        self.p = &self.mv[0]
        if not m.readonly or (<uintptr_t>self.p) & 7:
            self.own = <unsigned char*>malloc(self.n)
            if self.own == NULL:
                raise MemoryError()
            memcpy(self.own, self.p, self.n)
            self.p = self.own

    def __dealloc__(self):
        if self.own != NULL:
            free(self.own)
            self.own = NULL
