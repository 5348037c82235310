"""The sans-IO Session (mailfilter/smtp/session.py) without a socket.

The Session answers commands synchronously and asks for I/O as requests;
these tests play the shell: feed bytes, drain, fulfil each request by hand
(a DNS answer, a finished tarpit, a real maildir commit awaited in a fresh
event loop) and check the replies, the transaction and the order of
replies. The asyncio shell (smtp/protocol.py) is covered on real sockets by
test_server.py; `mailfilter check`, the other driver of the same class, by
test_check_vs_server.py.
"""
from __future__ import annotations

import asyncio
import os
import re

import pytest

from mailfilter.delivery import Delivery
from mailfilter.policy.engine import DNS_FAIL, DNS_OK, Client
from mailfilter.smtp import session as session_mod
from mailfilter.smtp.replies import REPLIES
from mailfilter.smtp.session import AWAIT_LOOKUPS, Commit, Delay, Lookup, Session, SessionConfig
from tests.support.server_harness import (
    HELO_A, MFDNS, PLAIN, RELAY, TARPIT, policy_for, read_new, write_rules,
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return policy_for(write_rules(tmp_path_factory.mktemp("rules")))


def new_session(policy, ip=PLAIN, delivery=None, dns=True) -> Session:
    s = Session(SessionConfig(policy, delivery=delivery or Delivery.from_spec("discard"), dns=dns),
                Client(ip=ip, port=4000))
    s.start()
    assert s.data_to_send().startswith(b"220 mx.test")
    return s


def feed(s: Session, data: bytes):
    """Bytes in, drain; (replies as text lines, the request or None)."""
    s.receive_data(data)
    request = s.drain()
    return s.data_to_send().decode().splitlines(), request


def test_a_whole_transaction_keeps_the_envelope_in_one_place(policy):
    s = new_session(policy)
    out, req = feed(s, b"EHLO c.test\r\nMAIL FROM:<a@sender.test> SIZE=100\r\n"
                       b"RCPT TO:<user@example.com>\r\nRCPT TO:<u2@example.com>\r\n")
    assert req is None
    assert out[-3:] == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok"]
    assert s.tx.sender == "a@sender.test" and s.tx.params == {"SIZE": 100}
    assert s.tx.recipients == ["user@example.com", "u2@example.com"]
    out, req = feed(s, b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert req is None and out[0].startswith("354") and out[1].startswith("250")
    assert s.tx.sender is None and s.tx.recipients == []
    out, _ = feed(s, b"MAIL FROM:<b@sender.test>\r\nRSET\r\n")
    assert out == ["250 2.1.0 ok", str(REPLIES["rset"])] and s.tx.sender is None


def test_refused_recipient_is_not_in_the_transaction(policy):
    s = new_session(policy)
    out, _ = feed(s, b"HELO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    assert out[-1].startswith("553")
    assert s.tx.sender == "a@sender.test" and s.tx.recipients == []
    assert s.last_verdict.reason == "rcpthosts"


def test_relay_suffix_is_the_recipient_as_delivered(policy):
    from tests.support.server_harness import SUFFIX
    s = new_session(policy, ip=SUFFIX)
    out, _ = feed(s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\n")
    assert out[-1] == "250 2.1.5 ok"
    assert s.tx.recipients == ["x@far.test@fixme"]


def test_helocheck_lookup_is_asked_at_helo_and_awaited_at_rcpt(policy):
    s = new_session(policy, ip=HELO_A)
    out, req = feed(s, b"HELO nx.test\r\n")
    assert out == ["250 mx.test"]
    assert type(req) is Lookup and (req.kind, req.rdtype, req.name) == ("helo", "A", "nx.test")
    assert s.drain() is None                     # a Lookup needs no wait: draining goes on
    out, req = feed(s, b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nNOOP\r\n")
    assert out == ["250 2.1.0 ok"] and req is AWAIT_LOOKUPS
    assert s.drain() is None and s.data_to_send() == b""    # NOOP waits behind the RCPT
    s.dns_answers({"helo": DNS_FAIL})
    assert s.resume() is None
    assert s.drain() is None
    out = s.data_to_send().decode().splitlines()
    assert out[0].startswith("550") and out[1] == str(REPLIES["noop"])     # replies in command order
    assert s.last_verdict.reason == "helo_dns"


def test_a_newer_helo_replaces_the_pending_lookup(policy):
    s = new_session(policy, ip=HELO_A)
    _, req = feed(s, b"HELO one.test\r\n")
    assert req.name == "one.test" and s.lookups == {"helo"}
    s.drain()
    _, req = feed(s, b"HELO [192.0.2.1]\r\n")     # an address literal: still asked, dns.py judges it
    assert req.name == "[192.0.2.1]" and s.lookups == {"helo"}


def test_mfdnscheck_answer_ok_lets_the_recipient_in(policy):
    s = new_session(policy, ip=MFDNS)
    _, req = feed(s, b"HELO c\r\nMAIL FROM:<a@ok.test>\r\n")
    assert type(req) is Lookup and (req.kind, req.name) == ("mx", "ok.test")
    s.drain()
    _, req = feed(s, b"RCPT TO:<user@example.com>\r\n")
    assert req is AWAIT_LOOKUPS
    s.dns_answers({"mx": DNS_OK})
    assert s.resume() is None and s.drain() is None
    assert s.data_to_send() == b"250 2.1.5 ok\r\n"


def test_without_a_resolver_no_lookup_is_asked(policy):
    s = new_session(policy, ip=HELO_A, dns=False)
    out, req = feed(s, b"HELO nx.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\n")
    assert req is None and out[-1] == "250 2.1.5 ok"


def test_tarpit_delay_then_the_reply(policy):
    s = new_session(policy, ip=TARPIT)
    out, req = feed(s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\n"
                       b"RCPT TO:<u2@example.com>\r\n")
    assert out[-1] == "250 2.1.5 ok"          # the first RCPT: no delay
    # the wait asked for is the client's TARPITDELAY
    assert type(req) is Delay and req.seconds == s.policy.profile.tarpit_delay > 0
    assert s.data_to_send() == b""            # the reply waits for the delay
    assert s.resume() is None and s.drain() is None
    assert s.data_to_send() == b"250 2.1.5 ok\r\n"
    assert s.tx.recipients == ["user@example.com", "u2@example.com"]


def test_abort_during_a_delay_owes_nothing(policy):
    s = new_session(policy, ip=TARPIT)
    feed(s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\n")
    _, req = feed(s, b"RCPT TO:<u2@example.com>\r\n")
    assert type(req) is Delay
    s.abort(REPLIES["shutdown"].format(host="mx.test"))
    assert s.resume() is None                 # the continuation sends nothing after the 421
    assert s.closing and s.data_to_send().startswith(b"421")


def test_commit_request_then_250_means_stored(policy, tmp_path):
    delivery = Delivery.from_spec(f"maildir:{tmp_path}/md")
    s = new_session(policy, delivery=delivery)
    out, req = feed(s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\n"
                       b"DATA\r\nSubject: s\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert out[-1] == "354 go ahead" or out[-1].startswith("354")
    assert type(req) is Commit
    assert read_new(f"{tmp_path}/md") == []           # nothing stored before the commit ran

    async def commit():
        try:
            return await req.sink.commit()
        finally:
            await delivery.close()
    result = asyncio.run(commit())
    assert s.resume(result) is None and s.drain() is None
    out = s.data_to_send().decode().splitlines()
    assert out[0].startswith("250") and out[1].startswith("221")   # QUIT answered after the 250
    [raw] = read_new(f"{tmp_path}/md")
    assert raw.endswith(b"Subject: s\n\nhello\n")


def test_a_commit_that_raised_is_451(policy, tmp_path):
    delivery = Delivery.from_spec(f"maildir:{tmp_path}/md")
    s = new_session(policy, delivery=delivery)
    _, req = feed(s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\n"
                     b"DATA\r\nx\r\n.\r\n")
    assert type(req) is Commit
    req.sink.abort()
    assert s.resume(error=OSError(5, "EIO")) is None and s.drain() is None
    assert s.data_to_send().decode() == str(REPLIES["store_failed"]) + "\r\n"
    assert s.tx.sender is None and read_new(f"{tmp_path}/md") == []
    asyncio.run(delivery.close())


def test_relay_client_and_authenticated_session(policy):
    s = new_session(policy, ip=RELAY)
    out, _ = feed(s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\n")
    assert out[-1] == "250 2.1.5 ok"
    t = new_session(policy)
    t.authenticated_as("alice")
    out, _ = feed(t, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\n")
    assert out[-1] == "250 2.1.5 ok" and t.last_verdict.reason == "relay_auth"


def test_the_request_table_in_the_docstring_names_every_request():
    """The theory-of-operation table lists exactly the request classes the
    module exports, so the shell's contract is written down where it is kept."""
    doc = session_mod.__doc__
    table = re.findall(r"^``(\w+)``", doc, re.M)
    exported = [n for n in session_mod.__all__
                if n in ("Lookup", "AwaitLookups", "Delay", "Commit", "AuthStep", "LimitCheck",
                         "Handshake")]
    assert table == exported


@pytest.mark.parametrize("size", [1, 7])
def test_fed_in_pieces_gives_the_same_replies(policy, size):
    data = (b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n"
            b"RCPT TO:<nobody@example.com>\r\nDATA\r\nSubject: x\r\n\r\n.body\r\n..\r\n.\r\nQUIT\r\n")
    whole = new_session(policy)
    whole_out, req = feed(whole, data)
    assert req is None
    s = new_session(policy)
    out = []
    for i in range(0, len(data), size):
        part, req = feed(s, data[i:i + size])
        assert req is None
        out += part
    queued = re.compile(r" qp \S+$")      # the queue id differs per message
    assert [queued.sub("", x) for x in out] == [queued.sub("", x) for x in whole_out]
    assert out[-1].startswith("221")
    assert any(line.startswith("550") or line.startswith("553") for line in out)   # nobody@: unknown


def test_accept_line_says_when_the_header_was_cut(policy, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="mailfilter")
    logging.getLogger("mailfilter").propagate = True
    s = Session(SessionConfig(policy, delivery=Delivery.from_spec("discard"), header_limit=102_400),
                Client(ip=PLAIN, port=4000))
    s.start()
    feed(s, b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    out, req = feed(s, b"X-Big: " + b"y" * 110_000 + b"\r\n\r\nbody\r\n.\r\n")
    assert req is None and out[-1].startswith("250")
    [line] = [r.getMessage() for r in caplog.records if "stage=DATA" in r.getMessage()]
    assert " header_cut=yes " in line
    feed(s, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    feed(s, b"Subject: small\r\n\r\nbody\r\n.\r\n")
    lines = [r.getMessage() for r in caplog.records if "stage=DATA" in r.getMessage()]
    assert len(lines) == 2 and "header_cut" not in lines[1]
