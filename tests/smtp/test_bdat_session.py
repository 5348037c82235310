"""CHUNKING / BDAT through the sans-IO Session (docs/behaviour/smtp.md#chunking):
the same policy, Received header, content scan, end-of-data policy and
delivery as DATA, with real maildir commits awaited in a fresh event loop."""
from __future__ import annotations

import asyncio
import logging
import random

import pytest

from mailfilter.delivery import Delivery
from mailfilter.policy.engine import Client
from mailfilter.smtp.replies import REPLIES
from mailfilter.smtp.session import Commit, Session, SessionConfig
from tests.support.server_harness import CONTENT, PLAIN, policy_for, read_new, write_rules

ENV = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\n"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return policy_for(write_rules(tmp_path_factory.mktemp("rules")))


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.INFO, logger="mailfilter")
    logging.getLogger("mailfilter").propagate = True
    return lambda: [r.getMessage() for r in caplog.records if "stage=DATA" in r.getMessage()]


def new_session(policy, delivery, ip=PLAIN, **kw) -> Session:
    s = Session(SessionConfig(policy, delivery=delivery, **kw), Client(ip=ip, port=4000))
    s.start()
    s.data_to_send()
    return s


def chunked(msg: bytes, rng: random.Random) -> bytes:
    """`msg` as BDAT chunks of random sizes (0 to 3000 octets), the last LAST."""
    out, i = b"", 0
    while i < len(msg):
        n = rng.choice([0, 1, 2, 7, 100, 3000])
        part = msg[i:i + n]
        i += n
        out += b"BDAT %d%s\r\n" % (len(part), b" LAST" if i >= len(msg) else b"") + part
    return out


def deliver(policy, tmp_path, wire: bytes, **kw) -> tuple[list[str], list[bytes]]:
    """Feed `wire`, commit what asks to be committed; (reply lines, stored messages)."""
    delivery = Delivery.from_spec(f"maildir:{tmp_path}/md")
    s = new_session(policy, delivery, **kw)
    s.receive_data(wire)
    req = s.drain()
    out = s.data_to_send().decode().splitlines()
    while type(req) is Commit:
        async def commit(sink=req.sink):
            return await sink.commit()
        assert s.resume(asyncio.run(commit())) is None
        req = s.drain()
        out += s.data_to_send().decode().splitlines()
    asyncio.run(delivery.close())
    return out, read_new(f"{tmp_path}/md")


def test_bdat_stores_what_data_stores(policy, tmp_path):
    """The same message by DATA and by BDAT in chunks cut anywhere: the same
    stored bytes after the Received header (which names the same session)."""
    rng = random.Random(5)
    lines = [b"Subject: t", b"Received: from x", b""] + [
        rng.choice([b"body", b".dot", b"..", b"", b"x" * 900, b"a\rb"]) for _ in range(200)]
    msg = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    out_d, [by_data] = deliver(policy, tmp_path / "d", ENV + b"DATA\r\n" + stuffed + b".\r\n")
    out_b, [by_bdat] = deliver(policy, tmp_path / "b", ENV + chunked(msg, rng))
    assert out_d[-1].startswith("250 2.0.0 ok") and out_b[-1].startswith("250 2.0.0 ok")
    assert not any(line.startswith("354") for line in out_b)
    cut_d, cut_b = by_data.index(b"Subject: t\n"), by_bdat.index(b"Subject: t\n")
    assert by_data[cut_d:] == by_bdat[cut_b:] == msg.replace(b"\r\n", b"\n")
    head_d, head_b = by_data[:cut_d].split(b"; "), by_bdat[:cut_b].split(b"; ")
    assert head_d[0] == head_b[0]               # the envelope and Received header, to the date
    assert b"\nReceived: from unknown (HELO c.test)" in head_b[0]


def test_content_scan_sees_chunks_cut_anywhere(policy, tmp_path, log_lines):
    """badmimetypes: an MZ attachment cut across chunks is found, 554, nothing
    stored; the DATA-stage line says body=bdat."""
    from tests.smtp.test_server import EXE_B64, mime_message
    msg = mime_message(EXE_B64).removesuffix(b".\r\n")
    out, stored = deliver(policy, tmp_path, ENV + chunked(msg, random.Random(1)), ip=CONTENT)
    assert out[-1] == str(REPLIES["bad_content"]) and stored == []
    [line] = log_lines()
    assert line.startswith("action=reject stage=DATA rule=badmimetypes:1 ") and " body=bdat " in line


def test_decision_lines_say_body_bdat(policy, tmp_path, log_lines):
    """One DATA-stage line per message, body=bdat; a bare LF fails the
    message at its chunk (451), the BDAT after it is 503, nothing stored."""
    wire = (ENV + b"BDAT 3\r\nab\n" + b"BDAT 5 LAST\r\nc\r\nd\r")
    out, stored = deliver(policy, tmp_path / "a", wire)
    assert out[-2:] == [str(REPLIES["bare_lf"]), str(REPLIES["bdat_failed"])] and stored == []
    out, stored = deliver(policy, tmp_path / "b", ENV + b"BDAT 9 LAST\r\nhi\r\nthere")
    assert out[-1].startswith("250 2.0.0 ok") and len(stored) == 1
    first, second = log_lines()
    assert first.startswith("action=tempfail stage=DATA reason=bare_lf ")
    assert "body=bdat" in first
    assert second.startswith("action=accept stage=DATA") and " body=bdat " in second
    assert " size=8 " in second


def test_rset_drops_a_bdat_message_in_progress(policy, tmp_path):
    delivery = Delivery.from_spec(f"maildir:{tmp_path}/md")
    s = new_session(policy, delivery)
    s.receive_data(ENV + b"BDAT 4\r\nab\r\n")
    assert s.drain() is None and s.sink is not None
    s.receive_data(b"RSET\r\n")
    assert s.drain() is None and s.sink is None
    assert s.data_to_send().decode().splitlines()[-2:] == ["250 2.0.0 4 octets received",
                                                          str(REPLIES["rset"])]
    asyncio.run(delivery.close())
    assert read_new(f"{tmp_path}/md") == []
    assert list((tmp_path / "md" / "tmp").iterdir()) == []
