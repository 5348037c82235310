"""SMTP smuggling forms (docs/reliability.md#smuggling-forms).

Each form hides a second transaction behind a non-standard end of data
(`\\n.\\r\\n`, `\\r.\\r`, ...) inside one DATA over a real socket. The server
may end the message only at CRLF.CRLF (the smuggled text stays inside the
one message) or refuse it (451 bare LF, docs/behaviour/smtp.md); it may never
store the smuggled message as a message of its own.
"""
from __future__ import annotations

import pytest

from tests.support.server_harness import LOOPS, PLAIN, RawClient, read_new, start_server, write_rules

pytestmark = pytest.mark.slow

ENDS = [b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r",
        b"\r\n.\r\r\n", b"\r\n.\x00\r\n", b"\r\n. \r\n", b"\r\r\n.\r\r\n", b"\n\r.\r\n",
        b"\r\n..\r\n", b"\r\n\x00.\r\n"]


def payload(i: int, end: bytes) -> bytes:
    """The outer message, the fake end, the smuggled transaction, CRLF.CRLF."""
    return (f"Subject: outer-{i}\r\n\r\nA\r\n".encode() + end +
            f"MAIL FROM:<smuggle{i}@evil.test>\r\nRCPT TO:<u2@example.com>\r\nDATA\r\n"
            f"Subject: smuggled-{i}\r\n\r\nB\r\n.\r\n".encode())


def send(port: int, i: int, end: bytes) -> list[int]:
    """One transaction with the form; every reply code until the server hangs up."""
    with RawClient(port, PLAIN) as c:
        assert c.reply()[0] == 220
        c.send(b"HELO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        assert [r[0] for r in c.replies(4)] == [250, 250, 250, 354]
        c.send(payload(i, end) + b"QUIT\r\n")
        return codes_until_quit(c)


def codes_until_quit(c) -> list[int]:
    """Every reply code until the server answers QUIT or hangs up."""
    codes = []
    while (r := c.reply()) is not None:
        codes.append(r[0])
        if r[0] == 221:
            break
    return codes


def run_forms(tmp_path, loop, send_form, one_message: list, refused: list, figures) -> None:
    """Every form through `send_form` on a real server; per form the reply
    codes must be `one_message` (then the one stored message holds the
    smuggled text) or one of `refused` (then nothing is stored), and no
    smuggled message may be stored, ever."""
    srv = start_server(loop, write_rules(tmp_path / "rules"), str(tmp_path / "md"))
    try:
        outcome = {end: send_form(srv.port, i, end) for i, end in enumerate(ENDS)}
        stored = read_new(srv.maildir)
    finally:
        srv.stop()
    one = 0
    for i, end in enumerate(ENDS):
        codes = outcome[end]
        mine = [m for m in stored if f"Subject: outer-{i}\n".encode() in m]
        smuggled = [m for m in stored if f"smuggle{i}@evil.test".encode() in m.split(b"\n\n")[0]]
        assert smuggled == [], f"{end!r}: a smuggled message was stored"
        if codes == one_message:
            assert len(mine) == 1 and f"Subject: smuggled-{i}".encode() in mine[0], end
            one += 1
        else:
            assert codes in refused and mine == [], (end, codes)
    figures.update(forms=len(ENDS), one_message=one, refused_451=len(ENDS) - one, smuggled=0)


@pytest.mark.parametrize("loop", LOOPS)
def test_no_message_is_smuggled_inside_another(tmp_path, loop, figures):
    # one message ended at CRLF.CRLF, or bare LF: 451 and the server hangs up
    # (docs/behaviour/smtp.md#data)
    run_forms(tmp_path, loop, send, [250, 221], [[451]], figures)


def send_bdat(port: int, i: int, end: bytes) -> list[int]:
    """The same payload as the message of BDAT chunks (RFC 3030): cut in
    two at the fake end, so a chunk boundary falls right on it."""
    body = payload(i, end)
    cut = body.index(end) + len(end) // 2
    with RawClient(port, PLAIN) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n")
        c.replies(3)
        c.send(b"BDAT %d\r\n" % cut + body[:cut] +
               b"BDAT %d LAST\r\n" % (len(body) - cut) + body[cut:] + b"QUIT\r\n")
        return codes_until_quit(c)


@pytest.mark.parametrize("loop", LOOPS)
def test_no_message_is_smuggled_inside_a_bdat_message(tmp_path, loop, figures):
    """BDAT counts frame the message: whatever end-of-data look-alike the
    chunks hold stays inside the one message, or the message is refused
    (451 bare LF); nothing in it is ever read as a command."""
    # a bare LF refuses the chunk that holds it (451; a LAST after a refused
    # chunk is 503) and the session goes on to QUIT (docs/behaviour/smtp.md#chunking)
    run_forms(tmp_path, loop, send_bdat, [250, 250, 221], [[250, 451, 221], [451, 503, 221]],
              figures)
