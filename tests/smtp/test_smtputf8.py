"""SMTPUTF8 (RFC 6531) in the server: smtplib as the client, on real sockets.

In-process servers on both event loops (the `start` fixture) for the
session: EHLO offers SMTPUTF8 and 8BITMIME, a UTF-8 envelope is taken under
`MAIL ... SMTPUTF8`, matched by the rules (both spellings of an IDN domain),
stored with its UTF-8 Return-Path / X-Envelope-To and a UTF8SMTP Received
header, and logged on one line with its code points escaped. Spawned
`mailfilter serve` processes for the options: `--no-smtputf8`, and an
aiosmtpd next hop with and without SMTPUTF8
(docs/behaviour/delivery.md#smtputf8).
"""
from __future__ import annotations

import smtplib

import pytest

from tests.support import aiosmtpd_hop
from tests.support.server_harness import (
    PLAIN, TIMEOUT, RawClient, first, read_new, spawn_serve, write_rules,
)

UTF8_RULES = {
    "rcpthosts": "example.com\nb\u00fccher.example\n",
    "recipients": "j\u00f6rg@b\u00fccher.example\n@example.com\n",
    "badrcptto": "\u7528\u6237@example.com\n",
}
SENDER = "s\u00e9bastien@exp\u00e9diteur.example"
MESSAGE = ("From: S\u00e9bastien <s\u00e9bastien@exp\u00e9diteur.example>\r\n"
           "To: j\u00f6rg@b\u00fccher.example\r\nSubject: gr\u00fc\u00dfe\r\n\r\n"
           "hallo\r\n").encode()


def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT, source_address=(PLAIN, 0))


@pytest.fixture
def utf8_server(start, tmp_path):
    return start(rules=write_rules(tmp_path / "utf8rules", UTF8_RULES))


def test_ehlo_offers_smtputf8_and_8bitmime(utf8_server):
    with smtp(utf8_server.port) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8") and s.has_extn("8bitmime")


def test_utf8_envelope_stored_matched_and_logged(utf8_server, decisions):
    """The A-label spelling of the recipient's domain meets the U-label
    rcpthosts and recipients lines; badrcptto refuses a CJK local part by
    its bytes; maildir keeps the UTF-8 envelope; the log stays one ASCII line."""
    with smtp(utf8_server.port) as s:
        s.ehlo("client.test")
        refused = s.sendmail(SENDER, ["j\u00f6rg@xn--bcher-kva.example", "\u7528\u6237@example.com"],
                             MESSAGE, mail_options=["SMTPUTF8"])
    assert refused == {"\u7528\u6237@example.com":
                       (553, b"5.7.1 sorry, your envelope recipient is in my badrcptto list")}
    (raw,) = read_new(utf8_server.maildir)
    head = raw.split(b"\nFrom: ")[0]
    assert head.startswith(("Return-Path: <s\u00e9bastien@exp\u00e9diteur.example>\n"
                            "X-Envelope-To: <j\u00f6rg@xn--bcher-kva.example>\n"
                            "Received: from unknown (HELO client.test) (127.0.0.1)\n").encode())
    assert b"  by mx.test with UTF8SMTP; " in head
    assert raw.endswith(MESSAGE.replace(b"\r\n", b"\n"))
    lines = [line for line in decisions() if "stage=RCPT" in line]
    assert any("rule=recipients:1" in line and 'to="<j\\xf6rg@xn--bcher-kva.example>"' in line
               for line in lines), lines
    assert any("rule=badrcptto:1" in line and 'to="<\\u7528\\u6237@example.com>"' in line
               for line in lines), lines
    assert all(line.isascii() and "\n" not in line for line in decisions())


def test_utf8_rcpt_needs_smtputf8_at_mail(utf8_server):
    """Without SMTPUTF8 on its MAIL, a transaction's UTF-8 RCPT is 553 5.6.7
    (docs/behaviour/smtp.md#addresses); the next MAIL may announce it."""
    with RawClient(utf8_server.port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert first(c.cmd("MAIL FROM:<a@example.com>")) == "250 2.1.0 ok"
        assert first(c.cmd("RCPT TO:<j\u00f6rg@b\u00fccher.example>")) == \
            "553 5.6.7 non-ASCII address needs SMTPUTF8"
        assert first(c.cmd("RSET"))[:3] == "250"
        assert first(c.cmd("MAIL FROM:<a@example.com> SMTPUTF8")) == "250 2.1.0 ok"
        assert first(c.cmd("RCPT TO:<j\u00f6rg@b\u00fccher.example>")) == "250 2.1.5 ok"
        c.send(b"RCPT TO:<j\xc3rg@b\xc3\xbccher.example>\r\n")     # not UTF-8
        assert first(c.reply()) == "553 5.1.3 syntax error in mailbox address"


# --------------------------------------------------------- spawned servers
def test_no_smtputf8_option(tmp_path):
    """`serve --no-smtputf8`: EHLO does not offer it, the parameter is an
    unknown one, an 8-bit address is 553 5.6.7 as before SMTPUTF8."""
    rules = write_rules(tmp_path / "rules", UTF8_RULES)
    sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{tmp_path}/spool", "--no-tls",
                     "--no-smtputf8")
    try:
        with smtp(sp.port) as s:
            s.ehlo("client.test")
            assert not s.has_extn("smtputf8") and s.has_extn("8bitmime")
            assert s.docmd("MAIL FROM:<a@example.com> SMTPUTF8") == \
                (555, b"5.5.4 unsupported parameter SMTPUTF8")
            s.command_encoding = "utf-8"
            assert s.docmd(f"MAIL FROM:<{SENDER}>") == (553, b"5.6.7 non-ASCII address needs SMTPUTF8")
    finally:
        assert sp.stop() == 0


@pytest.fixture(params=[True, False], ids=["next-hop-smtputf8", "next-hop-ascii"])
def forwarding(request, tmp_path):
    """A spawned server forwarding to an aiosmtpd next hop that offers
    SMTPUTF8 or not: (server, what the next hop took, offered)."""
    rules = write_rules(tmp_path / "rules", UTF8_RULES)
    with aiosmtpd_hop.next_hop(enable_SMTPUTF8=request.param) as (port, got):
        sp = spawn_serve("--rules", rules, "--deliver", f"smtp:127.0.0.1:{port}", "--no-tls")
        try:
            yield sp, got, request.param
        finally:
            sp.stop()


def test_forward_utf8_message(forwarding):
    """The reply to the end of data is the next hop's: delivered with
    SMTPUTF8 where offered; 554 5.6.7 where not, the decision line saying
    why, and the next hop never sees the message."""
    sp, got, offered = forwarding
    rcpt = "j\u00f6rg@b\u00fccher.example"
    with smtp(sp.port) as s:
        s.ehlo("client.test")
        if offered:
            assert s.sendmail(SENDER, [rcpt], MESSAGE, mail_options=["SMTPUTF8"]) == {}
        else:
            with pytest.raises(smtplib.SMTPDataError) as exc:
                s.sendmail(SENDER, [rcpt], MESSAGE, mail_options=["SMTPUTF8"])
            assert (exc.value.smtp_code, exc.value.smtp_error) == (
                554, b"5.6.7 next hop does not offer SMTPUTF8, which this message needs")
    if offered:
        ((sender, rcpts, options, _),) = got
        assert (sender, rcpts) == (SENDER, [rcpt]) and "SMTPUTF8" in options
        sp.log.wait_for(r"action=accept stage=DATA .*reply=\"250 ")
    else:
        assert got == []
        (m,) = sp.log.wait_for(r"action=reject stage=DATA .*detail=\"([^\"]*)\"")
        assert "SMTPUTF8 not offered, <s\\xe9bastien@exp\\xe9diteur.example> is not ASCII" \
            in m.group(1)


def test_forward_ascii_message_announced_smtputf8(forwarding):
    """SMTPUTF8 announced, nothing needs it: taken by either next hop, with
    the parameter only where it is offered (RFC 6531 §3.4)."""
    sp, got, offered = forwarding
    with smtp(sp.port) as s:
        s.ehlo("client.test")
        assert s.sendmail("a@example.com", ["u@example.com"],
                          b"Subject: plain\r\n\r\nbody caf\xc3\xa9\r\n", mail_options=["SMTPUTF8"]) == {}
    ((sender, rcpts, options, _),) = got
    assert (sender, rcpts) == ("a@example.com", ["u@example.com"])
    assert ("SMTPUTF8" in options) is offered
