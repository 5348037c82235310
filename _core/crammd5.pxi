# crammd5.pxi: HMAC-MD5 for CRAM-MD5 from stored inner/outer MD5 states.
"""CRAM-MD5 verification (docs/behaviour/checkpassword.md#mailfilter-cmd5checkpw,
docs/behaviour/auth.md#mechanisms; RFC 2104, RFC 2195).

Job: the server never keeps the clear CRAM-MD5 password. It keeps the two MD5
chaining states HMAC-MD5 reaches after its first block on each side, as
Dovecot's CRAM-MD5 password scheme does:

    inner = MD5 state after compress(IV, K ^ ipad)      (RFC 2104: ipad = 0x36 * 64)
    outer = MD5 state after compress(IV, K ^ opad)      (RFC 2104: opad = 0x5c * 64)

where K is the secret zero-padded to 64 bytes, or MD5(secret) zero-padded
when the secret is longer than 64 bytes (RFC 2104 §2). HMAC-MD5(K, text) is

    MD5-continue(outer, MD5-continue(inner, text))

and each continuation is finished with a bit length that counts the 64 bytes
already absorbed (RFC 1321 §3.2).

API
  cram_states(secret) -> bytes[32]   inner state then outer state, each as
                                      four little-endian uint32 (A, B, C, D)
  cram_digest(states, challenge) -> bytes[16]   the HMAC-MD5 of challenge
  cram_verify(states, challenge, hexdigest) -> bool
      True iff hexdigest is the 32-digit hex form (lower or upper case,
      RFC 2195 prescribes lower case) of cram_digest(states, challenge).

Invariants
  - MD5 itself is our own RFC 1321 code in md5.h; nothing else is used.
  - cram_verify allocates no Python object (it returns the bool singletons)
    and compares in constant time with respect to the expected digest: the
    response is decoded first (its validity depends on the client's bytes
    only), then all 16 bytes are XOR-accumulated, no early exit.
  - A `states` argument that is not 32 bytes is a programming error
    (ValueError); a malformed response is just a failed verification (False).
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_FromStringAndSize)

cdef extern from "md5.h" nogil:
    void mf_md5_init(uint32_t st[4])
    void mf_md5_compress(uint32_t st[4], const unsigned char *block)
    void mf_md5_finish_outer16(uint32_t st[4], const uint32_t inner[4])
    void mf_md5_finish(uint32_t st[4], const unsigned char *p, size_t n,
                       uint64_t prefix_len, unsigned char out[16])
    uint32_t mf_md5_le32(const unsigned char *p)
    void mf_md5_put_le32(unsigned char *p, uint32_t v)


# Hex digit values for the response; 0xFF marks a non-hex byte.
cdef uint8_t _cram_hexval[256]


cdef void _cram_init_hexval() noexcept:
    cdef int c
    memset(_cram_hexval, 0xFF, 256)
    for c in range(10):
        _cram_hexval[ord('0') + c] = <uint8_t>c
    for c in range(6):
        _cram_hexval[ord('a') + c] = <uint8_t>(10 + c)
        _cram_hexval[ord('A') + c] = <uint8_t>(10 + c)


_cram_init_hexval()


cdef inline const unsigned char* _cram_check_states(bytes states) except NULL:
    if PyBytes_GET_SIZE(states) != 32:
        raise ValueError("CRAM-MD5 states must be 32 bytes, got %d"
                         % PyBytes_GET_SIZE(states))
    return <const unsigned char*>PyBytes_AS_STRING(states)


cdef inline void _cram_hmac(const unsigned char* states,
                            const unsigned char* msg, Py_ssize_t n,
                            unsigned char out[16]) noexcept nogil:
    # RFC 2104: H(K ^ opad, H(K ^ ipad, text)), resumed after the first block
    # of each side; both continuations have 64 bytes of prefix already.
    cdef uint32_t st[4]
    cdef uint32_t ist[4]
    cdef unsigned char inner[16]
    cdef int i
    for i in range(4):
        ist[i] = mf_md5_le32(states + 4 * i)
    mf_md5_finish(ist, msg, <size_t>n, 64, inner)
    for i in range(4):
        st[i] = mf_md5_le32(states + 16 + 4 * i)
    # inner digest bytes == ist words little-endian, fed as words directly
    mf_md5_finish_outer16(st, ist)
    for i in range(4):
        mf_md5_put_le32(out + 4 * i, st[i])


def cram_states(bytes secret not None):
    """Return the 32-byte HMAC-MD5 inner+outer chaining states for `secret`.

    RFC 2104 §2: a key longer than the 64-byte block is replaced by its MD5;
    the key is then zero-padded to 64 bytes and XORed with ipad (0x36) and
    opad (0x5c). Each padded block is compressed once from the RFC 1321 IV.
    """
    cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(secret)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(secret)
    cdef unsigned char key[64]
    cdef unsigned char block[64]
    cdef uint32_t st[4]
    cdef unsigned char out[32]
    cdef Py_ssize_t i
    memset(key, 0, 64)
    if n > 64:
        mf_md5_init(st)
        mf_md5_finish(st, k, <size_t>n, 0, key)   # key = MD5(secret), rest 0
    else:
        for i in range(n):
            key[i] = k[i]
    for i in range(64):
        block[i] = key[i] ^ 0x36
    mf_md5_init(st)
    mf_md5_compress(st, block)
    for i in range(4):
        mf_md5_put_le32(out + 4 * i, st[i])
    for i in range(64):
        block[i] = key[i] ^ 0x5c
    mf_md5_init(st)
    mf_md5_compress(st, block)
    for i in range(4):
        mf_md5_put_le32(out + 16 + 4 * i, st[i])
    # Do not leave key material on the stack longer than needed.
    memset(key, 0, 64)
    memset(block, 0, 64)
    return PyBytes_FromStringAndSize(<char*>out, 32)


def cram_digest(bytes states not None, bytes challenge not None):
    """Return the 16-byte HMAC-MD5 of `challenge` under the stored `states`."""
    cdef const unsigned char* s = _cram_check_states(states)
    cdef unsigned char out[16]
    _cram_hmac(s, <const unsigned char*>PyBytes_AS_STRING(challenge),
               PyBytes_GET_SIZE(challenge), out)
    return PyBytes_FromStringAndSize(<char*>out, 16)


def cram_verify(bytes states not None, bytes challenge not None,
                bytes hexdigest not None):
    """True iff `hexdigest` (32 hex digits, any case) is HMAC-MD5(challenge).

    Wrong length or a non-hex byte -> False. The comparison against the
    expected digest is constant-time (no early exit on the first difference).
    """
    cdef const unsigned char* s = _cram_check_states(states)
    cdef const unsigned char* h
    cdef unsigned char expect[16]
    cdef unsigned char got[16]
    cdef uint8_t hi, lo, bad, diff
    cdef int i
    if PyBytes_GET_SIZE(hexdigest) != 32:
        return False
    h = <const unsigned char*>PyBytes_AS_STRING(hexdigest)
    # Decode the client's response; only its own bytes decide validity.
    bad = 0
    for i in range(16):
        hi = _cram_hexval[h[2 * i]]
        lo = _cram_hexval[h[2 * i + 1]]
        bad |= (hi | lo) & 0xF0
        got[i] = <unsigned char>((hi << 4) | (lo & 0x0F))
    if bad:
        return False
    _cram_hmac(s, <const unsigned char*>PyBytes_AS_STRING(challenge),
               PyBytes_GET_SIZE(challenge), expect)
    # Constant-time compare: accumulate every difference, decide once.
    diff = 0
    for i in range(16):
        diff |= expect[i] ^ got[i]
    return diff == 0
