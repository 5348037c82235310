"""Pure-Python MD5 compression (RFC 1321 §3.4), for checking cram_states.

hashlib does not expose MD5's intermediate chaining state, which is exactly
what cram_states stores (Dovecot's CRAM-MD5 scheme), so the tests need this
slow twin. `md5()` (full hash) exists to validate the twin against hashlib.
"""
import math
import struct

_T = [int(abs(math.sin(i + 1)) * 2 ** 32) & 0xFFFFFFFF for i in range(64)]
_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
M32 = 0xFFFFFFFF


def compress(state, block):
    assert len(block) == 64
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        r = i // 16
        if r == 0:
            f, k = (b & c) | (~b & d), i
        elif r == 1:
            f, k = (b & d) | (c & ~d), (5 * i + 1) % 16
        elif r == 2:
            f, k = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, k = c ^ (b | (~d & M32)), (7 * i) % 16
        t = (a + (f & M32) + x[k] + _T[i]) & M32
        t = ((t << _S[i]) | (t >> (32 - _S[i]))) & M32
        a, b, c, d = d, (b + t) & M32, b, c
    return tuple((s + v) & M32 for s, v in zip(state, (a, b, c, d)))


def md5(data: bytes) -> bytes:
    msg = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", 8 * len(data))
    st = IV
    for i in range(0, len(msg), 64):
        st = compress(st, msg[i:i + 64])
    return struct.pack("<4I", *st)


def cram_states(secret: bytes) -> bytes:
    key = md5(secret) if len(secret) > 64 else secret
    key = key.ljust(64, b"\x00")
    inner = compress(IV, bytes(k ^ 0x36 for k in key))
    outer = compress(IV, bytes(k ^ 0x5C for k in key))
    return struct.pack("<8I", *inner, *outer)
