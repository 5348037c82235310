"""Slow clients (docs/behaviour/smtp.md#limits, docs/operations.md#limits-and-timeouts):
a command line must be complete idle_timeout after its first byte, DATA must
keep a minimum rate and end within the data deadline. Real sockets, both
event loops; the client paces itself by waiting for the server's answer
(select with a short timeout), so no assertion depends on timing: a
dribbling client is closed long before its input would have ended.
"""
from __future__ import annotations

import select

import pytest

from mailfilter.smtp.protocol import Limits
from tests.support.server_harness import (
    TARPIT, RawClient, first, maildir_files,
)


def dribble(c: RawClient, pieces, pause: float = 0.1):
    """Send `pieces` one at a time, `pause` apart, until the server speaks.
    Returns (pieces sent, the server's reply, or None if it said nothing)."""
    sent = 0
    for piece in pieces:
        try:
            c.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            return sent, c.reply()
        sent += 1
        readable, _, _ = select.select([c.sock], [], [], pause)
        if readable:
            return sent, c.reply()
    return sent, None


def in_data(srv) -> RawClient:
    c = RawClient(srv.port)
    assert c.reply()[0] == 220
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(4)] == [250, 250, 250, 354]
    return c


def test_a_dribbled_command_line_is_closed_at_its_deadline(start, decisions):
    """One byte per 0.1 s never leaves the connection idle for 0.5 s, yet the
    line must be complete 0.5 s after its first byte: closed long before the
    200-byte line (20 s at that pace) ends, with 421 4.4.2 and a decision line."""
    srv = start(limits=Limits(idle_timeout=0.5, session_deadline=60))
    c = RawClient(srv.port)
    assert c.reply()[0] == 220
    line = b"NOOP " + b"x" * 195
    sent, r = dribble(c, [line[i:i + 1] for i in range(len(line))])
    assert sent < len(line)
    assert first(r) == "421 4.4.2 mx.test command line too slow, closing connection"
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert any("action=close reason=command_timeout" in l for l in decisions())


def test_complete_commands_at_a_slow_pace_are_served(start, decisions):
    """Whole lines slower than nothing but faster than the idle timeout: each
    line starts its own clock, the session goes on."""
    srv = start(limits=Limits(idle_timeout=2.0, session_deadline=60))
    c = RawClient(srv.port)
    assert c.reply()[0] == 220
    for _ in range(5):
        assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    assert c.cmd("QUIT")[0] == 221
    c.close()
    assert not any("reason=command_timeout" in l for l in decisions())


def test_steady_slow_data_passes(start, decisions):
    """40 KB/s in 2 KB pieces against a 1,000 bytes/s minimum over 1 s windows:
    stored, however many windows it spans."""
    srv = start(limits=Limits(idle_timeout=5, session_deadline=60, data_min_rate=1000,
                              data_rate_window=1.0))
    c = in_data(srv)
    pieces = [b"Subject: steady\r\n\r\n"] + [b"y" * 1998 + b"\r\n"] * 40
    assert dribble(c, pieces, pause=0.05) == (len(pieces), None)
    c.send(b".\r\n")
    assert c.reply()[0] == 250
    c.close()
    assert len(maildir_files(srv.maildir)) == 1
    assert not any("reason=data_too_slow" in l for l in decisions())


@pytest.mark.parametrize("limits,piece,reply,reason", [
    # 100 bytes/s against a 1,000 bytes/s minimum: closed at the end of the
    # first window (the 20 s the message would take never pass)
    (dict(data_min_rate=1000, data_rate_window=1.0), b"x" * 8 + b"\r\n",
     "421 4.4.2 mx.test message data too slow, closing connection", "data_too_slow"),
    # fast enough but endless: ends at the data deadline
    (dict(data_min_rate=0, data_deadline=1.0), b"x" * 98 + b"\r\n",
     "421 4.4.2 mx.test message data took too long, closing connection", "data_deadline"),
], ids=["below-minimum-rate", "past-data-deadline"])
def test_slow_data_is_closed_and_nothing_stored(start, decisions, limits, piece, reply, reason):
    srv = start(limits=Limits(idle_timeout=5, session_deadline=60, **limits))
    c = in_data(srv)
    pieces = [piece] * 200
    sent, r = dribble(c, pieces)
    assert sent < len(pieces)
    assert first(r) == reply
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert maildir_files(srv.maildir) == [] and maildir_files(srv.maildir, "tmp") == []
    assert any(f"action=close reason={reason}" in line for line in decisions())


def test_a_line_begun_while_the_server_is_slow_gets_its_time_again(start, decisions):
    """A 2 s tarpit with a 1 s command timeout: the client pipelines half a
    NOOP behind the tarpitted RCPT. The server was the slow one, so the
    line's clock starts again when the tarpit ends: finishing it then is
    answered, not closed (it was begun 2 s before)."""
    srv = start(limits=Limits(idle_timeout=1.0, session_deadline=60))
    c = RawClient(srv.port, TARPIT)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<user@example.com>")) == "250 2.1.5 ok"   # count 1: no delay
    c.send(b"RCPT TO:<u2@example.com>\r\nNOO")
    assert first(c.reply()) == "250 2.1.5 ok"                          # after the 2 s tarpit
    assert first(c.cmd("P")) == "250 2.0.0 ok"
    assert c.cmd("QUIT")[0] == 221
    c.close()
    assert not any("reason=command_timeout" in l for l in decisions())
