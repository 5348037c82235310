"""SMTPUTF8 to the next hop (docs/behaviour/delivery.md#smtputf8, RFC 6531 §3.4).

The next hop is aiosmtpd, a server we did not write, on 127.0.0.1, with
SMTPUTF8 offered (`enable_SMTPUTF8=True`) or not. A transaction that carried
SMTPUTF8 goes on with the parameter when it is offered; when it is not, a
message with a UTF-8 address or header is refused 554 5.6.7 and never sent,
and one whose addresses and header are ASCII goes without the parameter.
Each message is also written to the sink one byte at a time: the header
block's end is found across writes. Both event loops.
"""
from __future__ import annotations

import asyncio

import pytest

from mailfilter.delivery import Delivery, Envelope
from mailfilter.delivery.forward import needs_smtputf8
from mailfilter.delivery.spool import SpoolFacts

from tests.support import aiosmtpd_hop
from tests.support.server_harness import LOOPS, new_loop

SENDER = "j\u00f6rg@b\u00fccher.example"
RCPT = "\u7528\u6237@example.org"
ASCII_HEAD = b"Subject: hi\nFrom: a@example.com\n\n"
UTF8_HEAD = "Subject: gr\u00fc\u00dfe\nFrom: j\u00f6rg@b\u00fccher.example\n\n".encode()
BODY_8BIT = "caf\u00e9 body\n".encode()


@pytest.fixture(params=[True, False], ids=["smtputf8", "no-smtputf8"])
def next_hop(request):
    """(what it took, port, offers SMTPUTF8) of an aiosmtpd next hop."""
    with aiosmtpd_hop.next_hop(enable_SMTPUTF8=request.param) as (port, got):
        yield got, port, request.param


@pytest.fixture(params=LOOPS)
def run(request):
    def run(coro, timeout: float = 30):
        async def bounded():
            return await asyncio.wait_for(coro, timeout)
        with asyncio.Runner(loop_factory=lambda: new_loop(request.param)) as runner:
            return runner.run(bounded())
    return run


def envelope(sender: str, rcpts: list[str], smtputf8: bool = True) -> Envelope:
    return Envelope(sender, rcpts, helo="client.test", client_ip="192.0.2.1",
                    client_host="client.test", auth_user=None, tls=False, local_host="mx.test",
                    smtputf8=smtputf8)


async def hand_over(port: int, env: Envelope, data: bytes, bytewise: bool):
    d = Delivery.from_spec(f"smtp:127.0.0.1:{port}")
    sink = d.open(env)
    for part in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
        sink.write(part)
    return await sink.commit()


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_utf8_envelope_and_header(run, next_hop, bytewise):
    got, port, offered = next_hop
    data = UTF8_HEAD + BODY_8BIT
    res = run(hand_over(port, envelope(SENDER, [RCPT]), data, bytewise))
    if offered:
        assert res.ok, (str(res.reply), res.detail)
        ((sender, rcpts, options, content),) = got
        assert (sender, rcpts) == (SENDER, [RCPT])
        assert "SMTPUTF8" in options and "BODY=8BITMIME" in options
        assert content.replace(b"\r\n", b"\n") == data
    else:
        assert str(res.reply) == ("554 5.6.7 next hop does not offer SMTPUTF8, "
                                  "which this message needs")
        assert f"SMTPUTF8 not offered, <{SENDER}> is not ASCII" in res.detail
        assert got == []


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_ascii_envelope_utf8_header(run, next_hop, bytewise):
    """An ASCII envelope with a UTF-8 header field still needs SMTPUTF8
    (RFC 6532 header fields are what makes the message internationalized)."""
    got, port, offered = next_hop
    res = run(hand_over(port, envelope("a@example.com", ["b@example.org"]), UTF8_HEAD + b"x\n",
                        bytewise))
    if offered:
        assert res.ok and "SMTPUTF8" in got[0][2]
    else:
        assert res.reply.code == 554 and res.reply.enhanced == "5.6.7"
        assert "SMTPUTF8 not offered, the header is not ASCII" in res.detail
        assert got == []


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_ascii_envelope_and_header_goes_without_smtputf8(run, next_hop, bytewise):
    """Announced SMTPUTF8, but nothing needs it: an 8-bit byte in the body
    only (after the empty line). Sent with the parameter where it is
    offered, without it where not (RFC 6531 §3.4; Postfix does the same)."""
    got, port, offered = next_hop
    data = ASCII_HEAD + BODY_8BIT
    res = run(hand_over(port, envelope("a@example.com", ["b@example.org"]), data, bytewise))
    assert res.ok, (str(res.reply), res.detail)
    ((sender, rcpts, options, content),) = got
    assert ("SMTPUTF8" in options) is offered
    assert content.replace(b"\r\n", b"\n") == data


def test_no_smtputf8_transaction_gets_no_parameter(run, next_hop):
    """A transaction without SMTPUTF8 never gets the parameter downstream."""
    got, port, offered = next_hop
    res = run(hand_over(port, envelope("a@example.com", ["b@example.org"], smtputf8=False),
                        ASCII_HEAD + b"x\n", False))
    assert res.ok and "SMTPUTF8" not in got[0][2]


def test_needs_smtputf8_names_the_reason():
    ascii_env = envelope("a@example.com", ["b@example.org", "c@example.org"])
    assert needs_smtputf8(ascii_env, SpoolFacts(eight_bit=True)) is None
    assert needs_smtputf8(ascii_env, SpoolFacts(eight_bit=True, header_eight_bit=True)) \
        == "the header is not ASCII"
    env = envelope("", ["b@example.org", RCPT])
    assert needs_smtputf8(env, SpoolFacts()) == f"<{RCPT}> is not ASCII"
