"""mailfilter.smtp.args: MAIL/RCPT argument syntax as pure functions.

The engine tests check the replies on the wire; these check the values and
the refusals (reply, log tag, counted or not) of each function.
"""
from __future__ import annotations

import pytest

from mailfilter.smtp.args import (
    MAX_ADDRESS, ParseError, decode_address, decode_xtext, mail_params, parse_path,
    rcpt_params, unknown_param,
)
from mailfilter.smtp.replies import REPLIES


@pytest.mark.parametrize("arg,addr,rest", [
    (b"FROM:<a@b.c>", b"a@b.c", b""),
    (b"from:  <a@b.c> SIZE=1", b"a@b.c", b" SIZE=1"),
    (b"FROM:<>", b"", b""),
    (b"FROM:<@r1,@r2:u@d>", b"u@d", b""),
    (b'FROM:<"x y"@d> BODY=7BIT', b"x y@d", b" BODY=7BIT"),
    (b"FROM:<a\\>b@d>", b"a>b@d", b""),
])
def test_parse_path(arg, addr, rest):
    assert parse_path(arg, b"FROM:") == (addr, rest)


@pytest.mark.parametrize("arg,detail", [
    (b"TO:<a@b>", "keyword"),
    (b"FROM:a@b", "brackets"),
    (b"FROM:<a@b", "brackets"),
    (b'FROM:<"a@b>', "brackets"),
    (b"FROM:<a@b>x", "after path"),
    (b"FROM:<@r>", "source route"),
])
def test_parse_path_refusals(arg, detail):
    with pytest.raises(ParseError) as e:
        parse_path(arg, b"FROM:")
    assert e.value.reply == REPLIES["syntax"] and e.value.detail == detail and e.value.bad


def test_parse_path_length_limit():
    ok = b"a" * (MAX_ADDRESS - 1)
    assert parse_path(b"TO:<" + ok + b">", b"TO:") == (ok, b"")
    with pytest.raises(ParseError) as e:
        parse_path(b"TO:<" + ok + b"a>", b"TO:")
    assert e.value.reply == REPLIES["address_too_long"]


def test_mail_params_values():
    assert mail_params(b" SIZE=10 body=8bitmime AUTH=u+2Bx", False) == {
        "SIZE": 10, "BODY": "8BITMIME", "AUTH": "u+x"}
    assert mail_params(b" SMTPUTF8", True) == {"SMTPUTF8": True}
    assert mail_params(b" \t ", False) == {}


@pytest.mark.parametrize("rest,smtputf8,reply,detail", [
    (b"SMTPUTF8", False, "param_unknown", "SMTPUTF8"),          # not offered
    (b"SMTPUTF8=yes", True, "syntax_args", "SMTPUTF8"),
    (b"SIZE=1 SIZE=1", False, "syntax_args", "SIZE"),
    (b"SIZE=" + b"9" * 21, False, "syntax_args", "SIZE"),
    (b"BODY=BINARYMIME", False, "syntax_args", "BODY"),
    (b"AUTH=", False, "syntax_args", "AUTH"),
    (b"X\x01=1", False, "syntax_args", "parameter name"),
])
def test_mail_params_refusals(rest, smtputf8, reply, detail):
    with pytest.raises(ParseError) as e:
        mail_params(rest, smtputf8)
    assert e.value.reply.code == REPLIES[reply].code and e.value.detail == detail


def test_rcpt_params_takes_none():
    assert rcpt_params(b"  ") == {}
    with pytest.raises(ParseError) as e:
        rcpt_params(b" NOTIFY=NEVER ORCPT=x")
    assert str(e.value.reply) == "555 5.5.4 unsupported parameter NOTIFY"


def test_decode_address():
    assert decode_address(b"a@b.c", False) == "a@b.c"
    assert decode_address("jö@b".encode(), True) == "jö@b"
    for addr, utf8, reply, tag in ((b"a\r@b", True, "bad_address", "SYNTAX"),
                                   ("jö@b".encode(), False, "non_ascii_envelope", "EIGHTBIT"),
                                   (b"\xff@b", True, "bad_address", "EIGHTBIT")):
        with pytest.raises(ParseError) as e:
            decode_address(addr, utf8)
        assert e.value.reply == REPLIES[reply] and e.value.tag == tag


@pytest.mark.parametrize("value,text", [(b"plain", "plain"), (b"a+2Bb+3D", "a+b="),
                                        (b"+C3+A9", "é"), (b"+FF", "\udcff")])
def test_decode_xtext(value, text):
    assert decode_xtext(value) == text


@pytest.mark.parametrize("value", [b"a+", b"a+2", b"a+zz", b"\xe9"])
def test_decode_xtext_refusals(value):
    with pytest.raises(ParseError):
        decode_xtext(value)


def test_unknown_param_echoes_only_keywords():
    assert str(unknown_param(b"FOO-1=bar").reply) == "555 5.5.4 unsupported parameter FOO-1"
    assert unknown_param(b"-FOO").reply == REPLIES["syntax_args"]
    assert unknown_param(b"A" * 65).reply == REPLIES["syntax_args"]
