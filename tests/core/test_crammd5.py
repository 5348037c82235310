"""CRAM-MD5 from stored HMAC-MD5 states (crammd5.pxi; RFC 2104, RFC 2195)."""
import hashlib
import hmac
import random

import pytest

from mailfilter.core import core
from oracles import md5 as md5_oracle

cram_states = core.cram_states
cram_digest = core.cram_digest
cram_verify = core.cram_verify

RFC2195_KEY = b"tanstaaftanstaaf"
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"


def test_rfc2195_example():
    st = cram_states(RFC2195_KEY)
    assert cram_digest(st, RFC2195_CHALLENGE).hex() == RFC2195_DIGEST
    assert cram_verify(st, RFC2195_CHALLENGE, RFC2195_DIGEST.encode()) is True


# RFC 2104 Appendix (1-3) and RFC 2202 §2 (4-7) HMAC-MD5 test cases.
RFC_VECTORS = [
    (b"\x0b" * 16, b"Hi There", "9294727a3638bb1c13f48ef8158bfc9d"),
    (b"Jefe", b"what do ya want for nothing?", "750c783e6ab0b503eaa86e310a5db738"),
    (b"\xaa" * 16, b"\xdd" * 50, "56be34521d144c88dbb8c733f0e8b3f6"),
    (bytes(range(1, 26)), b"\xcd" * 50, "697eaf0aca3a3aea3a75164746ffaa79"),
    (b"\x0c" * 16, b"Test With Truncation", "56461ef2342edc00f9bab995690efd4c"),
    (b"\xaa" * 80, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd"),
    (b"\xaa" * 80,
     b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
     "6f630fad67cda0ee1fb1f562db3aa53e"),
]


@pytest.mark.parametrize("key,msg,digest", RFC_VECTORS)
def test_rfc2104_rfc2202_vectors(key, msg, digest):
    assert hmac.new(key, msg, "md5").hexdigest() == digest   # the vector itself
    st = cram_states(key)
    assert cram_digest(st, msg).hex() == digest
    assert cram_verify(st, msg, digest.encode())
    assert cram_verify(st, msg, digest.upper().encode())


def test_md5_oracle_matches_hashlib():
    rng = random.Random(5)
    for n in [0, 1, 55, 56, 63, 64, 65, 119, 120, 200]:
        data = rng.randbytes(n)
        assert md5_oracle.md5(data) == hashlib.md5(data).digest()


@pytest.mark.parametrize("secret", [b"", b"pass", RFC2195_KEY, b"k" * 63, b"k" * 64,
                                    b"k" * 65, bytes(range(256))])
def test_states_are_md5_chaining_states_le(secret):
    st = cram_states(secret)
    assert len(st) == 32
    assert st == md5_oracle.cram_states(secret)


def test_states_for_long_secret_use_md5_of_secret():
    long = b"x" * 100
    assert cram_states(long) == cram_states(hashlib.md5(long).digest())
    assert cram_states(b"y" * 64) != cram_states(hashlib.md5(b"y" * 64).digest())


def test_differential_against_stdlib_hmac():
    rng = random.Random(2195)
    for i in range(3000):
        key = rng.randbytes(rng.randrange(0, 201))
        msg = rng.randbytes(rng.randrange(0, 301))
        want = hmac.new(key, msg, "md5").digest()
        st = cram_states(key)
        assert cram_digest(st, msg) == want
        assert cram_verify(st, msg, want.hex().encode())
        if i % 7 == 0:
            assert cram_verify(st, msg, want.hex().upper().encode())


@pytest.mark.parametrize("n", [0, 1, 54, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129])
def test_padding_boundaries(n):
    # inner message length n + 64 crosses every padding case of RFC 1321 §3.1
    key = b"boundary-key"
    msg = bytes((i * 7 + 3) & 0xFF for i in range(n))
    assert cram_digest(cram_states(key), msg) == hmac.new(key, msg, "md5").digest()


def test_verify_rejects_wrong_digests():
    st = cram_states(RFC2195_KEY)
    good = bytearray(RFC2195_DIGEST.encode())
    for pos in range(32):
        bad = bytearray(good)
        bad[pos] = ord("0") if bad[pos] != ord("0") else ord("1")
        assert cram_verify(st, RFC2195_CHALLENGE, bytes(bad)) is False
    assert cram_verify(st, RFC2195_CHALLENGE + b" ", bytes(good)) is False
    assert cram_verify(cram_states(b"tanstaaftanstaaF"), RFC2195_CHALLENGE, bytes(good)) is False


@pytest.mark.parametrize("response", [
    b"",
    RFC2195_DIGEST[:31].encode(),
    (RFC2195_DIGEST + "0").encode(),
    RFC2195_DIGEST.encode() + b"\n",
    b" " + RFC2195_DIGEST[1:].encode(),
])
def test_verify_rejects_wrong_length(response):
    st = cram_states(RFC2195_KEY)
    assert cram_verify(st, RFC2195_CHALLENGE, response) is False


@pytest.mark.parametrize("pos,byte", [(0, b"g"), (5, b"G"), (31, b"z"), (10, b" "),
                                      (3, b"\x00"), (7, b"\x10"), (8, b"\xb9"),
                                      (12, b"/"), (13, b":"), (14, b"@"), (15, b"`")])
def test_verify_rejects_non_hex(pos, byte):
    st = cram_states(RFC2195_KEY)
    resp = bytearray(RFC2195_DIGEST.encode())
    resp[pos:pos + 1] = byte
    assert cram_verify(st, RFC2195_CHALLENGE, bytes(resp)) is False


def test_verify_accepts_upper_and_mixed_case():
    st = cram_states(RFC2195_KEY)
    assert cram_verify(st, RFC2195_CHALLENGE, RFC2195_DIGEST.upper().encode()) is True
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(RFC2195_DIGEST))
    assert cram_verify(st, RFC2195_CHALLENGE, mixed.encode()) is True


def test_bad_states_length_is_an_error():
    for bad in (b"", b"\x00" * 31, b"\x00" * 33):
        with pytest.raises(ValueError):
            cram_digest(bad, b"x")
        with pytest.raises(ValueError):
            cram_verify(bad, b"x", b"0" * 32)


def test_types():
    with pytest.raises(TypeError):
        cram_states("secret")
    with pytest.raises(TypeError):
        cram_verify(cram_states(b"k"), b"c", RFC2195_DIGEST)   # str response
