"""SASL mechanisms (mailfilter.auth.sasl): RFC 4616 / RFC 2195 vectors and the dialogue rules
of docs/behaviour/auth.md#dialogue, #mechanisms."""
import base64
import hmac
import re

import pytest

from mailfilter.auth import sasl
from mailfilter.auth.sasl import Challenge, Credentials, Failure, new_exchange


def b64(b: bytes) -> bytes:
    return base64.b64encode(b)


# RFC 4616 §4 examples: "\0tim\0tanstaaftanstaaf" and "Ursel\0Kurt\0xipj3plmq"
@pytest.mark.parametrize("msg,user,authzid,pw", [
    (b"\0tim\0tanstaaftanstaaf", "tim", "", b"tanstaaftanstaaf"),
    (b"Ursel\0Kurt\0xipj3plmq", "Kurt", "Ursel", b"xipj3plmq"),
])
def test_plain_rfc4616_examples(msg, user, authzid, pw):
    for initial in (True, False):
        ex = new_exchange("plain", "mx")
        if initial:
            out = ex.start(b64(msg).decode())
        else:
            assert ex.start(None) == Challenge(b"")          # "334 "
                                                             # (docs/behaviour/auth.md#dialogue)
            out = ex.step(b64(msg))
        assert isinstance(out, Credentials)
        assert (out.mechanism, out.user, out.authzid, out.secret, out.challenge) == \
            ("PLAIN", user, authzid, pw, None)


def test_plain_rfc4616_utf8_user():
    out = new_exchange("PLAIN").start(b64("\0Über\0pässword".encode()).decode())
    assert out.user == "Über" and out.secret == "pässword".encode()


@pytest.mark.parametrize("msg", [b"", b"tim", b"\0tim", b"\0\0pw", b"\0tim\0", b"a\0b\0c\0d",
                                 b"\0\xff\xfe\0pw"])
def test_plain_malformed(msg):
    out = new_exchange("PLAIN").start(b64(msg).decode() if msg else "")   # "" == "AUTH PLAIN ="
    assert out == Failure("auth_malformed", out.reason)


def test_plain_equals_is_empty_initial_response_and_malformed():
    assert new_exchange("PLAIN").start("").reply == "auth_malformed"


@pytest.mark.parametrize("line", [b"", b"   ", b"not base64!", b"dGlt=", b"dGlt\x00", b"====",
                                  "dGlt".encode("utf-16")])
def test_bad_base64_is_malformed(line):
    ex = new_exchange("PLAIN")
    ex.start(None)
    assert ex.step(line).reply == "auth_malformed"


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_star_cancels(mech):
    ex = new_exchange(mech, "mx")
    assert isinstance(ex.start(None), Challenge)
    out = ex.step(b"*")
    assert out.reply == "auth_cancelled"
    with pytest.raises(RuntimeError):
        ex.step(b"*")


def test_star_as_initial_response_cancels():
    assert new_exchange("LOGIN").start("*").reply == "auth_cancelled"


def test_login_dialogue_and_initial_user():
    ex = new_exchange("LOGIN")
    assert ex.start(None) == Challenge(b"Username:")
    assert ex.step(b64(b"tim")) == Challenge(b"Password:")
    out = ex.step(b64(b"tanstaaftanstaaf"))
    assert (out.mechanism, out.user, out.secret) == ("LOGIN", "tim", b"tanstaaftanstaaf")
    ex = new_exchange("login")
    assert ex.start(b64(b"tim").decode()) == Challenge(b"Password:")
    assert ex.step(b64(b"x")).user == "tim"
    # the prompts are the base64 strings of docs/behaviour/auth.md#dialogue
    assert b64(b"Username:") == b"VXNlcm5hbWU6" and b64(b"Password:") == b"UGFzc3dvcmQ6"


def test_login_empty_fields_malformed():
    ex = new_exchange("LOGIN")
    ex.start(None)
    assert ex.step(b"").reply == "auth_malformed"           # empty line
    ex = new_exchange("LOGIN")
    ex.start(None)
    ex.step(b64(b"tim"))
    assert ex.step(b"=").reply == "auth_malformed"          # empty password


@pytest.mark.parametrize("mech,lines", [
    ("LOGIN", [b"tim", b"b913a602c7eda7a495b4e6e7334d3890\0<1.2@mx>"]),   # password with NUL
    ("LOGIN", [b"tim", b"pw\0"]),
    ("LOGIN", [b"ti\0m"]),                                                # user with NUL
    ("PLAIN", [b"\0tim\0digest\0<1.2@mx>"]),                              # a fourth field
    ("PLAIN", [b"\0tim\0pw\0"]),
])
def test_nul_in_a_login_or_plain_field_is_malformed(mech, lines):
    """A NUL would end the field on a checkprogram's fd 3 and let the client pick
    the next ones (LOGIN password = digest NUL challenge: a replayed CRAM-MD5)."""
    ex = new_exchange(mech, "mx")
    out = ex.start(None)
    for line in lines:
        assert isinstance(out, Challenge)
        out = ex.step(b64(line))
    assert isinstance(out, Failure) and out.reply == "auth_malformed"


RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"


def test_cram_rfc2195_response_shape():
    # RFC 2195 §2 example: "tim b913a602c7eda7a495b4e6e7334d3890"
    ex = new_exchange("CRAM-MD5", "postoffice.reston.mci.net")
    ch = ex.start(None)
    assert isinstance(ch, Challenge)
    out = ex.step(b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")
    assert out.user == "tim" and out.secret == b"b913a602c7eda7a495b4e6e7334d3890"
    assert out.challenge == ch.data and out.cram


def test_cram_user_with_space_split_at_last_space():
    ex = new_exchange("CRAM-MD5", "mx")
    ex.start(None)
    out = ex.step(b64(b"john doe 0123456789abcdef0123456789abcdef"))
    assert out.user == "john doe"


@pytest.mark.parametrize("answer", [b"nodigest", b" 0123", b"tim ", b"ti\0m 00"])
def test_cram_malformed(answer):
    ex = new_exchange("CRAM-MD5", "mx")
    ex.start(None)
    assert ex.step(b64(answer)).reply == "auth_malformed"


def test_cram_no_initial_response():
    assert new_exchange("CRAM-MD5").start("dGlt").reply == "auth_malformed"


def test_cram_challenge_form_and_uniqueness():
    seen = set()
    for _ in range(2000):
        c = sasl.new_challenge("mx.example.com", now=1700000000)
        assert re.fullmatch(rb"<[0-9a-f]{16}\.\d+\.\d+\.1700000000@mx\.example\.com>", c)
        seen.add(c)
    assert len(seen) == 2000          # same second, never the same challenge


def test_cram_challenge_sanitises_hostname():
    c = sasl.new_challenge("evil>\r\nhost", now=1)
    assert c.endswith(b"@evilhost>") and b"\r" not in c


def test_cram_end_to_end_with_stdlib_hmac():
    ex = new_exchange("CRAM-MD5", "mx")
    ch = ex.start(None).data
    digest = hmac.new(b"secret", ch, "md5").hexdigest().encode()
    out = ex.step(b64(b"tim " + digest))
    assert out.secret == digest and out.challenge == ch


def test_unknown_mechanism():
    assert new_exchange("SCRAM-SHA-1") is None


def test_credentials_repr_hides_secret():
    c = Credentials("PLAIN", "tim", b"hunter2")
    assert "hunter2" not in repr(c)
