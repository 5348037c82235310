"""Delivery tests: real directories, real processes, real sockets on 127.0.0.1.

docs/behaviour/delivery.md#250-means-stored: every test checks both the reply and where the
bytes ended up (or that they ended up nowhere). No sleeps: every wait is on a
real event (a result, a pipe line, a process exit) with a bounded timeout.
"""
from __future__ import annotations

import asyncio
import calendar
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from mailfilter.delivery import (
    HANDOVER_TIMEOUT, QQ_EXITS, Delivery, DiscardDelivery, Envelope, LmtpDelivery, MaildirDelivery,
    QmailQueueDelivery, SmtpDelivery, smtp_encode,
)
from mailfilter.smtp.received import received_header
from mailfilter.smtp.replies import reply
from tests.support.smtp_peer import Peer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TIMEOUT = 30


try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a runtime dependency
    uvloop = None

LOOPS = {"asyncio": asyncio.new_event_loop}
if uvloop is not None:
    LOOPS["uvloop"] = uvloop.new_event_loop
_loop_factory = asyncio.new_event_loop


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def event_loop_kind(request):
    """docs/architecture.md#tests-and-benches: one suite, two event loops (asyncio and uvloop)."""
    global _loop_factory
    _loop_factory = LOOPS[request.param]
    yield request.param
    _loop_factory = asyncio.new_event_loop


def run(coro, timeout: float = TIMEOUT):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    with asyncio.Runner(loop_factory=_loop_factory) as runner:
        return runner.run(bounded())


def env(sender="a@example.com", rcpts=("b@example.org",), **kw) -> Envelope:
    base = dict(helo="client.test", client_ip="192.0.2.1", client_host="client.test",
                auth_user=None, tls=False, local_host="mx.test")
    base.update(kw)
    return Envelope(sender, list(rcpts), **base)


MSG = b"Subject: hi\n\nline one\n.leading dot\n..two dots\nlast\n"


async def deliver(d: Delivery, e: Envelope, data: bytes, bytewise: bool = False):
    sink = d.open(e)
    if bytewise:
        for i in range(len(data)):
            sink.write(data[i:i + 1])
    else:
        sink.write(data)
    return await sink.commit()


def child_env() -> dict:
    e = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    return e


# ---------------------------------------------------------------------------
# from_spec
# ---------------------------------------------------------------------------

def test_from_spec_kinds(tmp_path):
    assert isinstance(Delivery.from_spec(f"maildir:{tmp_path}/m"), MaildirDelivery)
    q = Delivery.from_spec("qmail-queue:/var/qmail/bin/qmail-queue -x  y")
    assert isinstance(q, QmailQueueDelivery) and q.argv == ["/var/qmail/bin/qmail-queue", "-x", "y"]
    s = Delivery.from_spec("smtp:127.0.0.1:2525")
    assert type(s) is SmtpDelivery and (s.host, s.port) == ("127.0.0.1", 2525)
    l6 = Delivery.from_spec("lmtp:[::1]:24")
    assert type(l6) is LmtpDelivery and (l6.host, l6.port) == ("::1", 24)
    assert isinstance(Delivery.from_spec("discard"), DiscardDelivery)
    # from_spec does no I/O: the maildir is created on first open
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("spec", [
    "", "maildir", "maildir:", "mbox:/x", "qmail-queue:", "qmail-queue:   ",
    "smtp:host", "smtp:host:", "smtp::25", "smtp:host:0", "smtp:host:65536",
    "lmtp:host:port", "discard:x",
])
def test_from_spec_rejects(spec):
    with pytest.raises(ValueError) as ei:
        Delivery.from_spec(spec)
    assert "expected" in str(ei.value) or "needs" in str(ei.value)


def test_runs_on_the_parametrised_loop(event_loop_kind):
    async def loop_module():
        return type(asyncio.get_running_loop()).__module__
    assert run(loop_module()).startswith("uvloop" if event_loop_kind == "uvloop" else "asyncio")


def test_empty_recipient_list_is_a_caller_bug(tmp_path):
    for spec in (f"maildir:{tmp_path}/m", "qmail-queue:/bin/true", "smtp:127.0.0.1:25", "discard"):
        with pytest.raises(ValueError, match="no recipients"):
            Delivery.from_spec(spec).open(env(rcpts=[]))


@pytest.mark.parametrize("bad", ["a\r\nRSET@x", "a\0Tevil@x", "x\n"])
def test_control_chars_in_addresses_are_a_caller_bug(tmp_path, bad):
    for spec in (f"maildir:{tmp_path}/m", "qmail-queue:/bin/true", "lmtp:127.0.0.1:24"):
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            Delivery.from_spec(spec).open(env(rcpts=["ok@x", bad]))
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            Delivery.from_spec(spec).open(env(sender=bad))


def test_discard_always_queued():
    async def go():
        d = Delivery.from_spec("discard")
        res = await deliver(d, env(), MSG)
        await d.close()
        return res
    res = run(go())
    assert res.ok and res.reply.code == 250 and res.reply.enhanced == "2.0.0"
    assert res.reply.text.startswith("ok ") and " qp P" in res.reply.text


# ---------------------------------------------------------------------------
# Received header (docs/behaviour/smtp.md#received-header, RFC 3848)
# ---------------------------------------------------------------------------

WHEN = calendar.timegm((1995, 9, 26, 4, 46, 54))


def test_received_spec_example_esmtpa():
    # docs/behaviour/smtp.md#received-header example, with the auth user in the TCPREMOTEINFO slot.
    e = env(helo="uunet.uu.net", client_ip="192.48.96.5", client_host="relay1.uu.net",
            auth_user="7", local_host="silverton.berkeley.edu")
    assert received_header(e, WHEN) == (
        b"Received: from relay1.uu.net (HELO uunet.uu.net) (7@192.48.96.5)\n"
        b"  by silverton.berkeley.edu with ESMTPA; 26 Sep 1995 04:46:54 -0000\n")


def test_received_first_line_stays_within_998_characters():
    # RFC 5322 §2.1.1: a 500-byte HELO, a long AUTH user and a long host name
    # are each cut at 255 bytes (the length of a domain name)
    e = env(helo="h" * 505, auth_user="u" * 600, client_host="p" * 400 + ".example")
    head = received_header(e, WHEN)
    first_line = head.split(b"\n")[0]
    assert len(first_line) <= 998
    assert b"(HELO " + b"h" * 255 + b")" in first_line and b"u" * 255 + b"@" in first_line


@pytest.mark.parametrize("esmtp,tls,auth,proto", [
    (True, False, None, b"ESMTP"), (True, False, "u", b"ESMTPA"),
    (True, True, None, b"ESMTPS"), (True, True, "u", b"ESMTPSA"),
    (False, False, None, b"SMTP"),          # HELO: plain SMTP
                                            # (docs/behaviour/smtp.md#received-header, RFC 3848)
])
def test_received_protocols(esmtp, tls, auth, proto):
    h = received_header(env(tls=tls, auth_user=auth, esmtp=esmtp), WHEN)
    assert h.split(b"\n")[1] == b"  by mx.test with " + proto + b"; 26 Sep 1995 04:46:54 -0000"


@pytest.mark.parametrize("tls,auth,proto", [
    (False, None, b"UTF8SMTP"), (False, "u", b"UTF8SMTPA"),
    (True, None, b"UTF8SMTPS"), (True, "u", b"UTF8SMTPSA"),
])
def test_received_protocols_smtputf8(tls, auth, proto):
    # RFC 6531 §3.7.3: a transaction whose MAIL carried SMTPUTF8
    # (docs/behaviour/smtp.md#received-header)
    h = received_header(env(tls=tls, auth_user=auth, smtputf8=True), WHEN)
    assert h.split(b"\n")[1] == b"  by mx.test with " + proto + b"; 26 Sep 1995 04:46:54 -0000"


def test_received_helo_omitted_when_equal_or_absent():
    # docs/behaviour/smtp.md#received-header: (HELO x) only when it differs case-insensitively.
    same = env(helo="CLIENT.Test", client_host="client.test")
    assert received_header(same, WHEN).startswith(b"Received: from client.test (192.0.2.1)\n")
    none = env(helo="", client_host="unknown")
    assert received_header(none, WHEN).startswith(b"Received: from unknown (192.0.2.1)\n")
    diff = env(helo="[192.0.2.1]", client_host="unknown")
    assert received_header(diff, WHEN).startswith(
        b"Received: from unknown (HELO ?192.0.2.1?) (192.0.2.1)\n")


def test_received_sanitises_every_unsafe_byte():
    e = env(helo="evil\r\nX-Injected: yes (x)", client_host="h\u00e9st_1",
            auth_user="joe user@example.com", client_ip="2001:db8::1",
            local_host="mx%1+a/b=c")
    h = received_header(e, calendar.timegm((2024, 2, 5, 7, 8, 9)))
    # é is two UTF-8 bytes -> two '?'; CR, LF, space, '(', ')' and '_' -> '?'
    assert h == (b"Received: from h??st?1 (HELO evil??X-Injected:?yes??x?) "
                 b"(joe?user@example.com@2001:db8::1)\n"
                 b"  by mx%1+a/b=c with ESMTPA; 5 Feb 2024 07:08:09 -0000\n")
    assert h.count(b"\n") == 2 and b"\r" not in h



def test_received_8bit_helo_is_one_question_mark_per_wire_byte():
    # The engine decodes HELO as Latin-1 (one char per byte); qmail's safeput
    # works per byte: c3 a9 74 e9 -> ??t?, not the UTF-8 re-encoding's 6 '?'.
    e = env(helo=b"\xc3\xa9t\xe9".decode("latin-1"), client_host="unknown")
    assert received_header(e, WHEN).startswith(
        b"Received: from unknown (HELO ??t?) (192.0.2.1)\n")
    # case_diffs folds ASCII only: a Latin-1 case difference still differs
    e = env(helo="h\u00c9.test", client_host="h\u00e9.test")
    assert b"(HELO h?.test)" in received_header(e, WHEN)

# ---------------------------------------------------------------------------
# maildir (docs/behaviour/delivery.md#maildir; docs/behaviour/delivery.md#250-means-stored)
# ---------------------------------------------------------------------------

def listing(md):
    return {sub: sorted(os.listdir(os.path.join(md, sub))) for sub in ("tmp", "new", "cur")}


def test_maildir_utf8_envelope_headers(tmp_path):
    # RFC 6531/6532: Return-Path and X-Envelope-To carry the UTF-8 address
    # bytes as received; the Received header says UTF8SMTP (RFC 6531 §3.7.3)
    md = str(tmp_path / "Maildir")
    e = env(sender="j\u00f6rg@b\u00fccher.example", rcpts=["\u00fc@example.org", "a b\u00e9@x.example"],
            smtputf8=True)
    res = run(deliver(Delivery.from_spec("maildir:" + md), e, received_header(e, WHEN) + MSG))
    assert res.ok
    (name,) = os.listdir(os.path.join(md, "new"))
    with open(os.path.join(md, "new", name), "rb") as f:
        stored = f.read()
    assert stored == ("Return-Path: <j\u00f6rg@b\u00fccher.example>\n"
                      "X-Envelope-To: <\u00fc@example.org>\n"
                      "X-Envelope-To: <\"a b\u00e9\"@x.example>\n").encode() \
        + received_header(e, WHEN) + MSG
    assert b" with UTF8SMTP; " in stored


def test_maildir_layout_and_envelope_headers(tmp_path):
    md = str(tmp_path / "Maildir")
    e = env(sender="s@example.com", rcpts=["r1@example.org", "r2@example.net"])

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        sink = d.open(e)
        hdr = received_header(e, WHEN)
        sink.write(hdr)
        sink.write(MSG)
        # docs/behaviour/delivery.md#250-means-stored: before commit the message is only in tmp/
        before = listing(md)
        res = await sink.commit()
        await d.close()
        return hdr, before, res
    hdr, before, res = run(go())
    assert before == {"tmp": [], "new": [], "cur": []}
    after = listing(md)
    assert after["tmp"] == [] and after["cur"] == [] and len(after["new"]) == 1
    name = after["new"][0]
    sec, uniq, host = name.split(".", 2)
    assert sec.isdigit() and uniq.startswith("M") and "P%d" % os.getpid() in uniq
    assert res.ok and res.reply.code == 250
    assert res.reply.text == f"ok {res.reply.text.split()[1]} qp {uniq}"
    with open(os.path.join(md, "new", name), "rb") as f:
        stored = f.read()
    assert stored == (b"Return-Path: <s@example.com>\n"
                      b"X-Envelope-To: <r1@example.org>\n"
                      b"X-Envelope-To: <r2@example.net>\n" + hdr + MSG)
    assert os.stat(os.path.join(md, "new", name)).st_mode & 0o777 == 0o600


class _SyncSpy:
    """Records os.fsync / os.rename in order (what each fsync'ed fd was), and
    can make the fsync of a chosen kind of target fail with EIO."""

    def __init__(self, monkeypatch, fail: str | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail = fail
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            kind = "dir" if os.path.isdir(path) else "file"
            self.calls.append(("fsync-" + kind, path))
            if kind == self.fail:
                raise OSError(5, "Input/output error (injected)")
            return real_fsync(fd)

        def rename(src, dst):
            self.calls.append(("rename", str(dst)))
            return real_rename(src, dst)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)


async def _deliver_once(md: str):
    """One MSG into a fresh maildir:md delivery, closed afterwards."""
    d = Delivery.from_spec("maildir:" + md)
    try:
        return await deliver(d, env(), MSG)
    finally:
        await d.close()


def test_maildir_fsyncs_file_then_renames_then_fsyncs_new(tmp_path, monkeypatch):
    """docs/behaviour/delivery.md#250-means-stored / issue 3: write to tmp/, fsync, rename into
    new/, fsync new/, and only then 250."""
    md = str(tmp_path / "Maildir")
    spy = _SyncSpy(monkeypatch)
    res = run(_deliver_once(md))
    assert res.ok and res.reply.code == 250
    [name] = listing(md)["new"]
    setup, msg = spy.calls[:-3], spy.calls[-3:]
    assert all(kind == "fsync-dir" for kind, _ in setup), spy.calls   # creating the Maildir
    assert [c[0] for c in msg] == ["fsync-file", "rename", "fsync-dir"], spy.calls
    assert msg[0][1] == os.path.join(md, "tmp", name)
    assert msg[1][1] == os.path.join(md, "new", name)
    assert msg[2][1] == os.path.join(md, "new")


@pytest.mark.parametrize("fail", ["file", "dir"])
def test_maildir_failed_fsync_is_451_and_nothing_stays(tmp_path, monkeypatch, fail):
    """A failed fsync (file or new/) is not durable: 451, and neither tmp/ nor
    new/ keeps the message (the sender retries)."""
    md = str(tmp_path / "Maildir")
    spy = _SyncSpy(monkeypatch, fail=fail)
    res = run(_deliver_once(md))
    assert not res.ok and res.reply.code == 451
    assert listing(md)["new"] == [] and listing(md)["tmp"] == []
    assert ("fsync-" + fail) in [c[0] for c in spy.calls]


def test_maildir_envelope_headers_are_rfc5321_quoted(tmp_path):
    # The parser hands over unquoted addresses; written back unquoted,
    # `<john smith@example.org>` is no valid angle-addr and `<a>b c@...>`
    # ends at the first `>`. Same quoting as the smtp/lmtp MAIL/RCPT paths.
    md = str(tmp_path / "m")
    e = env(sender="john smith@example.org",
            rcpts=["a>b c@example.com", 'q"b\\s@example.com', "plain.dots@example.com"])
    assert run(_one(md, e, MSG)).ok
    (name,) = listing(md)["new"]
    with open(os.path.join(md, "new", name), "rb") as f:
        assert f.read() == (b'Return-Path: <"john smith"@example.org>\n'
                            b'X-Envelope-To: <"a>b c"@example.com>\n'
                            b'X-Envelope-To: <"q\\"b\\\\s"@example.com>\n'
                            b"X-Envelope-To: <plain.dots@example.com>\n" + MSG)


def test_maildir_null_sender_and_bytewise_writes(tmp_path):
    md = str(tmp_path / "m")
    res = run(_one(md, env(sender=""), MSG, bytewise=True))
    assert res.ok
    (name,) = listing(md)["new"]
    with open(os.path.join(md, "new", name), "rb") as f:
        assert f.read() == b"Return-Path: <>\nX-Envelope-To: <b@example.org>\n" + MSG


async def _one(md, e, data, bytewise=False):
    d = Delivery.from_spec("maildir:" + md)
    try:
        return await deliver(d, e, data, bytewise)
    finally:
        await d.close()


def test_maildir_concurrent_commits_all_land(tmp_path, monkeypatch):
    """60 concurrent commits all land, each exactly once, and share new/
    fsyncs: while a batch's new/ fsync is in flight the next commits queue
    up and go as ONE batch. The first new/ fsync is held until all 60 were
    submitted (a slow disk, made deterministic), so with group commit there
    are at most 2 batches / 2 new/ fsyncs; without it, up to 60."""
    md = str(tmp_path / "m")
    newdir = os.path.join(md, "new")
    n = 60
    all_submitted = threading.Event()
    new_fsyncs = []
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == newdir:
            new_fsyncs.append(threading.current_thread().name)
            all_submitted.wait(TIMEOUT)
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        committer = d._committer_for()
        submit, submitted = committer.submit, []

        def counting_submit(job):
            submit(job)
            submitted.append(job)
            if len(submitted) == n:
                all_submitted.set()
        committer.submit = counting_submit
        bodies = [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(n)]
        res = await asyncio.gather(*(deliver(d, env(rcpts=[f"r{i}@x"]), b)
                                     for i, b in enumerate(bodies)))
        stats = (committer.batches, committer.largest_batch)
        await d.close()
        return bodies, res, stats
    bodies, res, (batches, largest) = run(go())
    assert all(r.ok for r in res)
    qids = {r.reply.text.split()[-1] for r in res}
    assert len(qids) == n
    lst = listing(md)
    assert lst["tmp"] == [] and len(lst["new"]) == n
    stored = set()
    for name in lst["new"]:
        with open(os.path.join(md, "new", name), "rb") as f:
            stored.add(f.read().split(b"\n", 2)[2])
    assert stored == set(bodies)
    # group commit: one new/ fsync per batch, and the commits that arrived
    # during the first batch's fsync all went in one second batch
    assert len(new_fsyncs) == batches <= 2, (new_fsyncs, batches)
    assert largest >= n // 2
    assert set(new_fsyncs) == {"maildir-commit"}


async def paused_batch(md: str, n: int):
    """A maildir Delivery whose committer is paused, `n` deliveries started
    on it, and whether all `n` got ready (their files durable, not yet
    renamed) within 20 s: (delivery, committer, tasks, ready)."""
    d = Delivery.from_spec("maildir:" + md)
    committer = d._committer_for()
    committer.pause()
    tasks = [asyncio.ensure_future(deliver(d, env(), b"n=%d\n" % i)) for i in range(n)]
    ready = await asyncio.get_running_loop().run_in_executor(None, committer.wait_ready, n, 20)
    return d, committer, tasks, ready


def test_maildir_group_commit_one_batch(tmp_path):
    """Group commit: 40 commits whose files are durable are renamed and made
    durable with ONE fsync of new/; none resolves before that batch ran."""
    md = str(tmp_path / "m")

    async def go():
        d, committer, tasks, ready = await paused_batch(md, 40)
        early = [t.done() for t in tasks]
        in_new = listing(md)["new"]
        committer.resume()
        res = await asyncio.gather(*tasks)
        stats = (committer.batches, committer.largest_batch)
        await d.close()
        return ready, early, in_new, res, stats
    ready, early, in_new, res, (batches, largest) = run(go())
    assert ready and not any(early) and in_new == []
    assert all(r.ok for r in res)
    assert (batches, largest) == (1, 40)
    assert len(listing(md)["new"]) == 40 and listing(md)["tmp"] == []


def test_maildir_batch_wakes_the_loop_once(tmp_path, monkeypatch):
    """A batch of 40 commits is handed back to the event loop with ONE
    call_soon_threadsafe (one wake-up), not one per message; a commit whose
    caller was cancelled meanwhile is skipped there and still stored."""
    from mailfilter.delivery import maildir
    md = str(tmp_path / "m")
    wakes = []
    real = maildir._resolve_all

    def counting(jobs):
        wakes.append(len(jobs))
        real(jobs)
    monkeypatch.setattr(maildir, "_resolve_all", counting)

    async def go():
        d, committer, tasks, ready = await paused_batch(md, 40)
        assert ready
        tasks[7].cancel()
        committer.resume()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        await d.close()
        return res
    res = run(go())
    assert isinstance(res[7], asyncio.CancelledError)
    assert all(r.ok for i, r in enumerate(res) if i != 7)
    assert wakes == [40]
    assert len(listing(md)["new"]) == 40 and listing(md)["tmp"] == []


def test_maildir_cancelled_commit_still_completes(tmp_path):
    # The client vanished while its commit was in the batch: the commit is
    # finished (a retry may duplicate, never lose) and close() drains it.
    md = str(tmp_path / "m")

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        committer = d._committer_for()
        committer.pause()
        sink = d.open(env())
        sink.write(MSG)
        task = asyncio.ensure_future(sink.commit())
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, committer.wait_ready, 1, 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sink.abort()            # no-op: committing mail is not ours to remove
        committer.resume()
        await d.close()
    run(go())
    lst = listing(md)
    assert lst["tmp"] == [] and len(lst["new"]) == 1


def test_maildir_parent_is_regular_file(tmp_path):
    # Real kernel failure: ENOTDIR creating DIR/tmp under a regular file.
    (tmp_path / "file").write_bytes(b"not a dir")
    md = str(tmp_path / "file" / "Maildir")
    res = run(_one(md, env(), MSG))
    assert not res.ok
    assert res.reply == reply("store_failed")
    assert str(res.reply) == "451 4.3.0 temporary failure storing message"
    assert "ENOTDIR" in res.detail


# A part of the layout removed while a message is in flight (between open
# and commit): (what goes, the first commit's reply code, what is left in the
# maildir right after it, messages in new/ once one more was delivered).
IN_FLIGHT_REMOVALS = {
    # new/ is made again, its entry fsync'ed into the maildir, the rename
    # retried (a 451 here used to repeat for every message until an operator
    # recreated new/); the order is checked in the next test
    "new": (("new",), 250, ["cur", "new", "tmp"], 2),
    # the message is lost to the store (its rename fails: 451, the client
    # retries); the failure makes the next message re-check the layout and
    # remake tmp/ (it used to get a 451 as well, as the layout was only
    # re-checked after a failed open)
    "tmp": (("tmp",), 451, ["cur", "new"], 1),
    # nothing to retry into: 451, nothing recreated behind the message's
    # back, and the next message makes the layout again
    "all": (("tmp", "new", "cur"), 451, [], 1),
}


@pytest.mark.parametrize("removed", sorted(IN_FLIGHT_REMOVALS))
def test_maildir_layout_removed_in_flight(tmp_path, removed):
    subdirs, code, left, in_new = IN_FLIGHT_REMOVALS[removed]
    md = str(tmp_path / "m")

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        sink = d.open(env())
        sink.write(MSG)
        for sub in subdirs:
            shutil.rmtree(os.path.join(md, sub))
        res = await sink.commit()
        after = sorted(os.listdir(md))
        again = await deliver(d, env(), MSG)
        await d.close()
        return res, after, again
    res, after, again = run(go())
    assert res.reply.code == code, res.detail
    if code == 250:
        name = res.detail.split()[1].removeprefix("new/")
        with open(os.path.join(md, "new", name), "rb") as f:
            assert f.read().endswith(MSG)
    else:
        assert res.reply == reply("store_failed") and "ENOENT" in res.detail
    assert after == left
    assert again.ok and again.reply.code == 250, again.detail
    lst = listing(md)
    assert lst["tmp"] == [] and len(lst["new"]) == in_new


def test_maildir_new_remade_in_flight_is_durable_before_250(tmp_path, monkeypatch):
    # rename() fails with ENOENT; new/ is made, its entry fsync'ed into the
    # maildir, the rename retried, and new/ fsync'ed: all before the 250.
    md = str(tmp_path / "m")

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        sink = d.open(env())
        sink.write(MSG)
        os.rmdir(os.path.join(md, "new"))
        spy = _SyncSpy(monkeypatch)
        res = await sink.commit()
        await d.close()
        return res, spy.calls
    res, calls = run(go())
    assert res.ok and res.reply.code == 250, res.detail
    name = res.detail.split()[1].removeprefix("new/")
    assert calls == [("fsync-file", os.path.join(md, "tmp", name)),
                     ("rename", os.path.join(md, "new", name)),      # ENOENT
                     ("fsync-dir", md),                              # new/ is in md
                     ("rename", os.path.join(md, "new", name)),
                     ("fsync-dir", os.path.join(md, "new"))]


def test_maildir_efbig_in_child_is_451(tmp_path):
    # Real kernel failure: RLIMIT_FSIZE 64 KiB, SIGXFSZ ignored -> EFBIG.
    md = str(tmp_path / "m")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "support", "maildir_child.py"),
                        "efbig", md, str(64 * 1024), str(1024 * 1024)],
                       capture_output=True, env=child_env(), timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout)
    assert out["ok"] is False
    assert out["reply"] == "451 4.3.0 temporary failure storing message"
    assert "EFBIG" in out["detail"]
    assert out["tmp"] == [] and out["new"] == []


def test_maildir_sigkill_mid_message_leaves_nothing_in_new(tmp_path):
    md = str(tmp_path / "m")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "support", "maildir_child.py"),
                          "stall", md, str(4 * 1024 * 1024)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
    try:
        line = p.stdout.readline()      # the child is mid-message now
        assert line == b"WRITING 1\n"
        p.kill()                        # SIGKILL
        assert p.wait(timeout=TIMEOUT) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
        p.stdin.close()
        p.stdout.close()
    lst = listing(md)
    assert lst["new"] == [] and lst["cur"] == []
    (partial,) = lst["tmp"]             # only the half-written tmp file remains
    assert os.path.getsize(os.path.join(md, "tmp", partial)) > 0
    # the maildir still works after the crash
    assert run(_one(md, env(), MSG)).ok and len(listing(md)["new"]) == 1


# a body that makes the sink create its tmp/ file before commit (CHUNK pending)
LARGE = b"Subject: big\n\n" + b"z" * 1023 + b"\n" + (b"y" * 1023 + b"\n") * 64


@pytest.mark.parametrize("body,in_tmp", [(MSG, 0), (LARGE, 1)], ids=["small", "large"])
def test_maildir_abort_removes_tmp_and_is_idempotent(tmp_path, body, in_tmp):
    md = str(tmp_path / "m")

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        sink = d.open(env())
        sink.write(body)
        mid = listing(md)
        claimed = d._live.snapshot()
        sink.abort()
        sink.abort()
        with pytest.raises(RuntimeError):
            sink.write(b"more")
        with pytest.raises(RuntimeError):
            await sink.commit()
        await d.close()
        return mid, claimed, d._live.snapshot()
    mid, claimed, after = run(go())
    assert len(mid["tmp"]) == in_tmp and mid["new"] == []
    assert len(claimed) == 1 and after == set()     # the name is claimed until the abort
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_maildir_small_message_touches_no_file_from_the_loop(tmp_path, monkeypatch):
    """A message under CHUNK is created, written, fsync'ed and renamed on the
    committer's threads at commit: the event loop makes no file system call
    for it (on ext4 a create on the loop would wait for the journal commit of
    the batch before). The file is still fsync'ed before its rename and new/
    after it (docs/behaviour/delivery.md#250-means-stored)."""
    md = str(tmp_path / "m")
    calls = []
    for fn in ("open", "writev", "write", "fsync", "rename"):
        real = getattr(os, fn)

        def spy(*a, _real=real, _fn=fn, **kw):
            calls.append((_fn, threading.current_thread() is threading.main_thread()))
            return _real(*a, **kw)
        monkeypatch.setattr(os, fn, spy)

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        d._committer_for()
        sink = d.open(env())            # the maildir's directories are made here
        calls.clear()
        sink.write(MSG)
        res = await sink.commit()
        await d.close()
        return res
    res = run(go())
    assert res.ok
    assert [c for c, on_loop in calls if on_loop] == [], calls
    assert [c for c, _ in calls] == ["open", "writev", "fsync", "rename", "open", "fsync"], calls
    [name] = listing(md)["new"]
    with open(os.path.join(md, "new", name), "rb") as f:
        assert f.read() == b"Return-Path: <a@example.com>\nX-Envelope-To: <b@example.org>\n" + MSG


def test_maildir_large_message_streams_into_tmp_before_commit(tmp_path):
    """Bodies are never held whole in memory: once CHUNK bytes are pending the
    tmp/ file is made and written, and every further CHUNK follows."""
    md = str(tmp_path / "m")
    chunk = b"w" * 1023 + b"\n"

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        sink = d.open(env())
        sizes = []
        for i in range(3 * 64):
            sink.write(chunk)
            if i % 64 == 63:
                [name] = listing(md)["tmp"]
                sizes.append(os.path.getsize(os.path.join(md, "tmp", name)))
        res = await sink.commit()
        await d.close()
        return sizes, res
    sizes, res = run(go())
    assert res.ok
    head = len(b"Return-Path: <a@example.com>\nX-Envelope-To: <b@example.org>\n")
    # at most CHUNK (64 KiB) of it is ever held: the rest is in the file
    assert [s >= head + (i + 1) * 64 * 1024 - 65536 for i, s in enumerate(sizes)] == [True] * 3
    assert sizes[0] > 0 and sizes == sorted(sizes) and sizes[-1] > sizes[0]
    [name] = listing(md)["new"]
    assert os.path.getsize(os.path.join(md, "new", name)) == head + 3 * 64 * 1024


def test_maildir_many_small_parts_are_written_in_bounded_writevs(tmp_path, monkeypatch):
    """A sink holds at most 64 parts (writev takes at most IOV_MAX iovecs):
    5000 one-byte writes land intact, in writevs of at most 64 parts."""
    md = str(tmp_path / "m")
    widths = []
    real = os.writev

    def writev(fd, parts):
        widths.append(len(parts))
        return real(fd, parts)
    monkeypatch.setattr(os, "writev", writev)
    data = bytes(range(256)) * 20
    res = run(_one(md, env(), data, bytewise=True))
    assert res.ok and max(widths) <= 64 and sum(widths) == len(data) + 1   # + the envelope headers
    [name] = listing(md)["new"]
    with open(os.path.join(md, "new", name), "rb") as f:
        assert f.read().endswith(data)


def test_maildir_short_writev_is_finished(tmp_path, monkeypatch):
    """writev(2) may write less than asked (a signal, the file size limit):
    the rest is written, nothing lost or doubled."""
    md = str(tmp_path / "m")
    real = os.writev

    def short(fd, parts):
        return real(fd, [b"".join(parts)[:7]])
    monkeypatch.setattr(os, "writev", short)
    res = run(_one(md, env(), MSG))
    assert res.ok
    [name] = listing(md)["new"]
    with open(os.path.join(md, "new", name), "rb") as f:
        assert f.read() == b"Return-Path: <a@example.com>\nX-Envelope-To: <b@example.org>\n" + MSG


def test_maildir_abort_after_commit_keeps_message(tmp_path):
    md = str(tmp_path / "m")

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        sink = d.open(env())
        sink.write(MSG)
        res = await sink.commit()
        sink.abort()
        with pytest.raises(RuntimeError):
            await sink.commit()
        await d.close()
        return res
    assert run(go()).ok
    assert len(listing(md)["new"]) == 1


def test_maildir_large_message_streams(tmp_path):
    md = str(tmp_path / "m")
    chunk = bytes(range(256)) * 256  # 64 KiB, every byte value
    e = env()

    async def go():
        d = Delivery.from_spec("maildir:" + md)
        sink = d.open(e)
        for _ in range(48):
            sink.write(chunk)
        res = await sink.commit()
        await d.close()
        return res
    assert run(go()).ok
    (name,) = listing(md)["new"]
    head = b"Return-Path: <a@example.com>\nX-Envelope-To: <b@example.org>\n"
    assert os.path.getsize(os.path.join(md, "new", name)) == len(head) + 48 * len(chunk)


# ---------------------------------------------------------------------------
# qmail-queue (docs/behaviour/delivery.md#qmail-queue)
# ---------------------------------------------------------------------------

FAKEQQ = os.path.join(ROOT, "tests", "support", "fake_qmail_queue.py")


def qq(monkeypatch, tmp_path, how: str) -> tuple[Delivery, str]:
    out = str(tmp_path / "qq")
    monkeypatch.setenv("FAKEQQ_OUT", out)
    monkeypatch.setenv("FAKEQQ_EXIT", how)
    return Delivery.from_spec(f"qmail-queue:{sys.executable} {FAKEQQ}"), out


def test_qq_exit0_message_and_envelope_exact(monkeypatch, tmp_path):
    d, out = qq(monkeypatch, tmp_path, "0")
    e = env(sender="s@example.com", rcpts=["r1@example.org", "r2@example.net"])
    res = run(deliver(d, e, received_header(e, WHEN) + MSG))
    assert res.ok and res.reply.code == 250
    pid = res.reply.text.split()[-1]
    assert pid.isdigit() and f"pid={pid} exit=0" in res.detail
    with open(out + ".msg", "rb") as f:
        assert f.read() == received_header(e, WHEN) + MSG
    with open(out + ".env", "rb") as f:
        assert f.read() == b"Fs@example.com\0Tr1@example.org\0Tr2@example.net\0\0"


def test_qq_utf8_envelope_is_raw_utf8(monkeypatch, tmp_path):
    # an SMTPUTF8 envelope (RFC 6531): qmail-queue takes the address bytes as
    # they are, UTF-8, NUL-terminated (docs/behaviour/delivery.md#smtputf8)
    d, out = qq(monkeypatch, tmp_path, "0")
    e = env(sender="j\u00f6rg@b\u00fccher.example", rcpts=["\u7528\u6237@example.org"], smtputf8=True)
    res = run(deliver(d, e, MSG))
    assert res.ok and res.reply.code == 250
    with open(out + ".env", "rb") as f:
        assert f.read() == ("Fj\u00f6rg@b\u00fccher.example\0T\u7528\u6237@example.org\0\0").encode()


def test_qq_large_message_and_envelope_no_deadlock(monkeypatch, tmp_path):
    # 3 MB body (> spool memory, > pipe buffer) and an envelope > 64 KiB pipe buffer.
    d, out = qq(monkeypatch, tmp_path, "0")
    rcpts = [f"{'r' * 240}{i}@example.org" for i in range(300)]
    body = (b"z" * 99 + b"\n") * 30000
    res = run(deliver(d, env(sender="", rcpts=rcpts), body))
    assert res.ok
    with open(out + ".msg", "rb") as f:
        assert f.read() == body
    with open(out + ".env", "rb") as f:
        assert f.read() == b"F\0" + b"".join(b"T" + r.encode() + b"\0" for r in rcpts) + b"\0"


@pytest.mark.parametrize("how,line", [
    ("53", "451 4.3.0 qq write error or disk full"),
    ("31", "554 5.3.0 mail server permanently rejected message"),
    ("11", "554 5.1.3 envelope address too long for qq"),
    ("25", "554 5.3.0 qq permanent problem"),
    ("73", "451 4.4.1 connection to mail server rejected"),
    ("74", "451 4.4.2 communication with mail server failed"),
    ("99", "451 4.3.0 qq temporary problem"),
    ("kill", "451 4.3.0 qq crashed"),
])
def test_qq_exit_codes(monkeypatch, tmp_path, how, line):
    d, out = qq(monkeypatch, tmp_path, how)
    res = run(deliver(d, env(), MSG))
    assert not res.ok and str(res.reply) == line
    with open(out + ".msg", "rb") as f:   # the child really got the message
        assert f.read() == MSG


def test_qq_exit_table_matches_spec():
    # docs/behaviour/delivery.md#qmail-queue-exit-codes, spot checks over the whole range
    assert QQ_EXITS[115] == QQ_EXITS[11]
    assert QQ_EXITS[54][1] == "qq read error" and QQ_EXITS[120][1] == "unable to exec qq"
    assert all(QQ_EXITS[c][1] == "qq trouble creating files in queue" for c in range(62, 67))
    assert all(QQ_EXITS[c][0].startswith("queue_perm") for c in range(11, 41))
    assert not any(QQ_EXITS[c][0].startswith("queue_perm") for c in QQ_EXITS if c > 40 and c != 115)


def test_qq_exit0_without_reading_is_read_error(monkeypatch, tmp_path):
    # qmail.c: exit 0 but we could not write the message -> "qq read error".
    d, _ = qq(monkeypatch, tmp_path, "noread:0")
    res = run(deliver(d, env(), b"x" * (2 * 1024 * 1024)))
    assert not res.ok and str(res.reply) == "451 4.3.0 qq read error"


def test_spool_failure_is_451_and_qq_never_runs(monkeypatch, tmp_path):
    # Real kernel failure: the spool rolls over to disk (> spool_max_memory)
    # inside a "directory" that is a regular file -> ENOTDIR -> 451, and
    # qmail-queue is never started with a truncated message.
    out = str(tmp_path / "qq")
    monkeypatch.setenv("FAKEQQ_OUT", out)
    monkeypatch.setenv("FAKEQQ_EXIT", "0")
    (tmp_path / "file").write_bytes(b"")
    d = Delivery.from_spec(f"qmail-queue:{sys.executable} {FAKEQQ}",
                           spool_max_memory=4096, spool_dir=str(tmp_path / "file"))
    res = run(deliver(d, env(), b"q" * 10000))
    assert not res.ok and res.reply == reply("store_failed")
    assert "ENOTDIR" in res.detail
    assert not os.path.exists(out + ".msg")


def test_qq_spawn_failure(tmp_path):
    d = Delivery.from_spec(f"qmail-queue:{tmp_path}/no-such-qmail-queue")
    res = run(deliver(d, env(), MSG))
    assert not res.ok and str(res.reply) == "451 4.3.0 unable to exec qq"


def test_qq_check_refuses_a_missing_or_non_executable_program(monkeypatch, tmp_path):
    # Delivery.check() at start-up: a qmail-queue that cannot be executed
    # would otherwise only show as a 451 after each whole message. PROG is
    # resolved as the spawn resolves it: a path as is, a bare name on PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "my-qmail-queue"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKEQQ}\n")
    wrapper.chmod(0o755)
    plain = tmp_path / "not-executable"
    plain.write_text(wrapper.read_text())
    plain.chmod(0o644)
    monkeypatch.setenv("PATH", f"{tmp_path / 'missing-dir'}:{bindir}")
    monkeypatch.setenv("FAKEQQ_OUT", str(tmp_path / "qq"))
    monkeypatch.setenv("FAKEQQ_EXIT", "0")

    for ok in (f"{wrapper} --some-arg", "my-qmail-queue"):
        d = Delivery.from_spec("qmail-queue:" + ok)
        d.check()
        assert run(deliver(d, env(), MSG)).ok      # the spawn finds it too

    for spec, exc, strerror, name in [
        (f"{tmp_path}/no-such-qq", FileNotFoundError,
         "qmail-queue program not found", f"{tmp_path}/no-such-qq"),
        ("no-such-qq-on-path", FileNotFoundError,
         "qmail-queue program not found on PATH", "no-such-qq-on-path"),
        (str(plain), PermissionError,
         "qmail-queue program is not an executable file", str(plain)),
        (str(bindir), PermissionError,
         "qmail-queue program is not an executable file", str(bindir)),
    ]:
        d = Delivery.from_spec("qmail-queue:" + spec)
        with pytest.raises(exc) as info:
            d.check()
        assert (info.value.strerror, info.value.filename) == (strerror, name)
        # what the check predicts is what a message would get
        assert str(run(deliver(d, env(), MSG)).reply) == "451 4.3.0 unable to exec qq"


# ---------------------------------------------------------------------------
# smtp / lmtp forwarding (docs/behaviour/delivery.md#smtp-and-lmtp: 250 only after downstream 250)
# ---------------------------------------------------------------------------

def test_smtp_encode_dot_stuffing_any_split():
    # RFC 5321 §4.5.2: a line starting with "." gets one more; LF -> CRLF
    data = b".first\nmid\n..two\n.\nend"
    want = b"..first\r\nmid\r\n...two\r\n..\r\nend"
    assert smtp_encode(data, True) == (want, False)
    for i in range(len(data) + 1):
        a, bol = smtp_encode(data[:i], True)
        b, bol = smtp_encode(data[i:], bol)
        assert a + b == want, i


def test_smtp_encode_bare_cr_is_a_line_end():
    """RFC 5321 §2.3.8: no bare CR on the wire. A stored bare CR (kept as is
    for maildir, docs/behaviour/delivery.md#storage-format) goes to a next hop as a line end and is
    dot-stuffed, so `<CR>.<CR>` cannot end a next hop's DATA early (SMTP
    smuggling, docs/behaviour/smtp.md#data)."""
    data = b"hello\r.\rMAIL FROM:<ceo@x>\r\n.\n"
    want = b"hello\r\n..\r\nMAIL FROM:<ceo@x>\r\n\r\n..\r\n"
    assert smtp_encode(data, True) == (want, True)
    for i in range(len(data) + 1):       # any split, a CR last in a chunk included
        a, bol = smtp_encode(data[:i], True)
        b, bol = smtp_encode(data[i:], bol)
        assert a + b == want, i


async def forward(peer_script, e, data, lmtp=False, **opts):
    async with Peer(peer_script, lmtp=lmtp) as peer:
        d = Delivery.from_spec(f"{'lmtp' if lmtp else 'smtp'}:127.0.0.1:{peer.port}", **opts)
        res = await deliver(d, e, data)
        await d.close()
        return res, peer.sessions


def test_smtp_forward_250_and_dot_round_trip():
    e = env(rcpts=["r1@example.org", "r2@example.org"])
    data = received_header(e, WHEN) + MSG + b".\n..\nno final newline"
    res, (s,) = run(forward({}, e, data))
    assert res.ok and res.reply.code == 250 and res.reply.enhanced == "2.0.0"
    assert s.commands[:5] == ["EHLO mx.test", "MAIL FROM:<a@example.com>",
                              "RCPT TO:<r1@example.org>", "RCPT TO:<r2@example.org>", "DATA"]
    assert s.commands[5:] == ["QUIT"]
    assert s.message == data + b"\n"    # un-stuffed at the peer == what we stored
    assert b"\r\n..leading dot\r\n...two dots\r\n" in s.wire
    assert s.wire.endswith(b"\r\n..\r\n...\r\nno final newline\r\n.\r\n")
    assert b"\n" not in s.wire.replace(b"\r\n", b"")


def test_smtp_large_message_spooled_to_disk():
    body = b"".join(b".%07d\n" % i for i in range(300000))  # 2.7 MB, every line dotted
    res, (s,) = run(forward({}, env(), body))
    assert res.ok and s.message == body


def test_smtp_downstream_451_at_data_end():
    res, (s,) = run(forward({"eod": "451 4.3.0 try later"}, env(), MSG))
    assert not res.ok and res.reply == reply("downstream_temp")
    assert str(res.reply) == "451 4.4.1 next hop temporarily unavailable"
    assert s.message == MSG and "eod 451" in res.detail


def test_smtp_downstream_554_at_data_end():
    res, _ = run(forward({"eod": "554 5.7.1 spam detected"}, env(), MSG))
    assert str(res.reply) == "554 5.7.1 spam detected"   # the downstream's enhanced code


def test_smtp_connection_refused():
    async def go():
        # a port that was just bound then closed: nothing listens there
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        d = Delivery.from_spec(f"smtp:127.0.0.1:{port}")
        return await deliver(d, env(), MSG)
    res = run(go())
    assert not res.ok and str(res.reply) == "451 4.4.1 next hop temporarily unavailable"
    assert "ECONNREFUSED" in res.detail


def test_smtp_whole_hand_over_has_a_deadline():
    """delivery.HANDOVER_TIMEOUT: the hand-over as a whole ends under the
    client's 10-minute wait for the final reply (RFC 5321 §4.5.3.2.6); only
    each command was bounded (300 s), so a slow next hop could take
    (4 + recipients) x 300 s and deliver after the client had given up."""
    assert HANDOVER_TIMEOUT < 600
    assert Delivery.from_spec("smtp:127.0.0.1:25").timeout == HANDOVER_TIMEOUT
    assert Delivery.from_spec("qmail-queue:/bin/true").timeout == HANDOVER_TIMEOUT
    res, (s,) = run(forward({"eod": "hang"}, env(), MSG, timeout=0.5, command_timeout=30))
    assert not res.ok and res.reply == reply("downstream_temp")
    assert res.detail.endswith("hand-over took over 0.5 s")
    assert s.message == MSG


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data", "eod"])
def test_smtp_drop_at_any_stage_is_451(stage):
    res, _ = run(forward({stage: "drop"}, env(), MSG))
    assert not res.ok and res.reply == reply("downstream_temp")


def test_smtp_command_timeout_is_451():
    res, _ = run(forward({"eod": "hang"}, env(), MSG, command_timeout=0.5))
    assert not res.ok and res.reply == reply("downstream_temp")


def test_smtp_rcpt_550_all_is_554_no_data():
    res, (s,) = run(forward({"rcpt": "550 5.1.1 no such user here"}, env(), MSG))
    assert str(res.reply) == "554 5.1.1 no such user here"
    assert "DATA" not in s.commands and s.message == b""


def test_smtp_rcpt_partial_deferral_is_451_no_data():
    """A 4xx for one recipient: the whole message is retried (451), no DATA."""
    script = {"rcpt": {"bad@example.org": "450 4.2.1 try later"}}
    res, (s,) = run(forward(script, env(rcpts=["ok@example.org", "bad@example.org"]), MSG))
    assert not res.ok and res.reply.code == 451 and res.reply.enhanced == "4.4.1"
    assert "<bad@example.org>" in res.reply.text and "try later" in res.reply.text
    assert "DATA" not in s.commands


def test_smtp_rcpt_rejection_reply_fits_512_octets():
    """RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets. The
    recipient (up to ~500 octets) and the next hop's text (up to 300) made
    an 851-octet 451; the line is cut, with "...", its code kept."""
    long_rcpt = "r" * 480 + "@example.org"
    script = {"rcpt": {long_rcpt: "550 5.1.1 " + "T" * 400}}
    res, _ = run(forward(script, env(rcpts=["ok@example.org", long_rcpt]), MSG))
    line = res.reply.line()
    assert len(line) == 512 and line.startswith(b"554 5.1.1 delivered to 1 of 2 recipients; next hop rejected <rrr")
    assert line.endswith(b"...\r\n")
    # cut on a character boundary: the reply still decodes (str() is what the log writes)
    for n in range(3):
        r = reply("downstream_rejected", text="x" * (490 + n) + "\u00e9" * 40)
        assert len(r.line()) <= 512 and str(r).endswith("...")


def test_smtp_rcpt_4xx_is_451():
    script = {"rcpt": {"full@example.org": "452 4.2.2 mailbox full"}}
    res, (s,) = run(forward(script, env(rcpts=["full@example.org", "ok@example.org"]), MSG))
    assert str(res.reply) == "451 4.4.1 next hop deferred <full@example.org>: mailbox full"
    assert "DATA" not in s.commands


def test_smtp_mail_5xx_and_greeting_5xx():
    res, _ = run(forward({"mail": "553 5.7.1 sender refused"}, env(), MSG))
    assert str(res.reply) == "554 5.7.1 sender refused"
    # a 554 greeting says nothing about this message: temporary
    res, _ = run(forward({"greeting": "554 5.3.2 go away"}, env(), MSG))
    assert res.reply == reply("downstream_temp")


def test_smtp_ehlo_rejected_falls_back_to_helo():
    res, (s,) = run(forward({"ehlo": "502 5.5.2 what"}, env(), MSG))
    # the peer answers both EHLO and HELO from the same script entry -> 451
    assert res.reply == reply("downstream_temp")
    assert s.commands[:2] == ["EHLO mx.test", "HELO mx.test"]


def test_lmtp_all_accepted():
    e = env(rcpts=["a@x", "b@x"])
    res, (s,) = run(forward({"eod": ["250 2.0.0 a ok", "250 2.0.0 b ok"]}, e, MSG, lmtp=True))
    assert res.ok and res.reply.code == 250
    assert s.commands[0] == "LHLO mx.test"
    assert [(r.code, r.text) for r in res.per_recipient] == [(250, "a ok"), (250, "b ok")]


def test_lmtp_mixed_results_per_recipient():
    e = env(rcpts=["a@x", "b@x", "c@x"])
    script = {"eod": ["250 2.0.0 delivered", "452 4.2.2 over quota", "550 5.1.1 gone"]}
    res, (s,) = run(forward(script, e, MSG, lmtp=True))
    assert s.message == MSG
    assert not res.ok and res.reply.code == 451      # any 4xx -> 451 (dup over loss)
    assert [(r.code, r.enhanced) for r in res.per_recipient] == [
        (250, "2.0.0"), (452, "4.2.2"), (550, "5.1.1")]
    assert "<b@x>" in res.reply.text


def test_lmtp_all_5xx_is_554_and_2xx_5xx_mix_is_554_delivered_to_some():
    """A 2xx/5xx mix after DATA was 451, so every retry delivered the message
    again to the recipient that had it, for as long as the client retried
    (a 5xx does not go away): now one 554 that says who got it."""
    e = env(rcpts=["a@x", "b@x"])
    res, _ = run(forward({"eod": ["550 5.1.1 gone", "552 5.2.2 full"]}, e, MSG, lmtp=True))
    assert str(res.reply) == "554 5.1.1 gone"
    res, (s,) = run(forward({"eod": ["250 2.0.0 ok", "550 5.1.1 gone"]}, e, MSG, lmtp=True))
    assert str(res.reply) == "554 5.1.1 delivered to 1 of 2 recipients; next hop rejected <b@x>: gone"
    assert not res.ok and [r.code for r in res.per_recipient] == [250, 550]
    assert s.message == MSG


@pytest.mark.parametrize("lmtp", [False, True])
def test_rcpt_5xx_for_some_delivers_to_the_others(lmtp):
    """A 5xx at RCPT for one recipient and 2xx for the other: DATA goes to
    the accepted one, whose mail used to wait behind a 451 until the
    client's queue expired; the client gets 554 naming the refused one.
    LMTP: one final reply per ACCEPTED recipient (RFC 2033 §4.2)."""
    e = env(rcpts=["ok@example.org", "bad@example.org", "ok2@example.org"])
    script = {"rcpt": {"bad@example.org": "550 5.1.1 no such user"}}
    res, (s,) = run(forward(script, e, MSG, lmtp=lmtp))
    assert s.commands[4:6] == ["RCPT TO:<ok2@example.org>", "DATA"]
    assert s.message == MSG
    assert not res.ok
    assert str(res.reply) == ("554 5.1.1 delivered to 2 of 3 recipients; "
                              "next hop rejected <bad@example.org>: no such user")
    if lmtp:
        assert [r.code for r in res.per_recipient] == [250, 550, 250]


@pytest.mark.parametrize("lmtp", [False, True])
def test_smtp_envelope_paths_are_rfc5321_quoted(lmtp):
    # The parser hands over unquoted addresses; a strict downstream must get
    # RFC 5321 §4.1.2 paths: Dot-string when possible, else Quoted-string.
    rcpts = ["john smith@example.org", 'a"b\\c@example.org', "a..b@example.org",
             ".lead@example.org", "plain.dots@example.org", "x@y@example.org"]
    e = env(sender="the sender@example.com", rcpts=rcpts)

    async def go():
        async with Peer(lmtp=lmtp, strict=True) as peer:
            d = Delivery.from_spec(f"{'lmtp' if lmtp else 'smtp'}:127.0.0.1:{peer.port}")
            return await deliver(d, e, MSG), peer.sessions
    res, (s,) = run(go())
    assert res.ok, (str(res.reply), res.detail)
    assert s.commands[1:8] == [
        'MAIL FROM:<"the sender"@example.com>',
        'RCPT TO:<"john smith"@example.org>',
        'RCPT TO:<"a\\"b\\\\c"@example.org>',
        'RCPT TO:<"a..b"@example.org>',
        'RCPT TO:<".lead"@example.org>',
        "RCPT TO:<plain.dots@example.org>",
        'RCPT TO:<"x@y"@example.org>',
    ]
    assert s.message == MSG


EHLO_EXT = "250-peer.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME"


@pytest.mark.parametrize("lmtp", [False, True])
def test_smtp_mail_carries_size_and_body_8bitmime_when_announced(lmtp):
    # RFC 1870 §6 / RFC 6152 §3: SIZE= is the CRLF size; BODY=8BITMIME only
    # for a message that holds an 8-bit byte (decided from the bytes). A
    # strict peer 555s any parameter it did not announce.
    e = env()
    eight = MSG + "caf\u00e9 \u00fcber\n".encode()

    async def go(data):
        async with Peer({"ehlo": EHLO_EXT}, lmtp=lmtp, strict=True) as peer:
            d = Delivery.from_spec(f"{'lmtp' if lmtp else 'smtp'}:127.0.0.1:{peer.port}")
            return await deliver(d, e, data, bytewise=len(data) < 200), peer.sessions
    bare_cr = MSG + b"old mac\rline ends\r"     # each bare CR leaves as CRLF: one octet more
    for data, body in ((eight, " BODY=8BITMIME"), (MSG, ""), (bare_cr, "")):
        res, (s,) = run(go(data))
        assert res.ok, (str(res.reply), res.detail)
        wire_size = len(data) + data.count(b"\n") + data.count(b"\r")
        assert s.commands[1] == f"MAIL FROM:<a@example.com> SIZE={wire_size}{body}"
        assert s.message == data.replace(b"\r", b"\n")
        # the estimate is the wire size before dot-stuffing (RFC 1870 allows
        # an estimate; the stuffed dots are the only difference)
        assert len(s.wire) - len(b".\r\n") - wire_size == MSG.count(b"\n.")


def test_smtp_no_parameters_without_extensions():
    # a peer that lists no extensions (or a HELO fallback) gets a bare MAIL,
    # 8-bit body or not: qmail-remote sends 8-bit text as is
    data = MSG + b"\xff\n"
    res, (s,) = run(forward({}, env(), data))
    assert res.ok and s.commands[1] == "MAIL FROM:<a@example.com>" and s.message == data
    res, (s,) = run(forward({"ehlo": "502 5.5.2 what", "helo": "250-peer.test\r\n250 8BITMIME"},
                            env(), data))
    assert res.ok and s.commands[:3] == ["EHLO mx.test", "HELO mx.test", "MAIL FROM:<a@example.com>"]


def test_smtp_downstream_size_limit_refuses_at_mail():
    # a next hop with a smaller SIZE limit says 552 at MAIL: the body is
    # never sent and the client gets a permanent 554 with the hop's code
    async def go():
        async with Peer({"ehlo": "250-peer.test\r\n250 SIZE 100"}, strict=True) as peer:
            d = Delivery.from_spec(f"smtp:127.0.0.1:{peer.port}")
            return await deliver(d, env(), b"x" * 200 + b"\n"), peer.sessions
    res, (s,) = run(go())
    assert str(res.reply) == "554 5.3.4 message size exceeds fixed maximum message size"
    assert s.commands[1:] == ["MAIL FROM:<a@example.com> SIZE=202", "QUIT"] and s.wire == b""


def test_smtp_null_sender_and_bare_postmaster_paths():
    async def go():
        async with Peer(strict=True) as peer:
            d = Delivery.from_spec(f"smtp:127.0.0.1:{peer.port}")
            return await deliver(d, env(sender="", rcpts=["postmaster"]), MSG), peer.sessions
    res, (s,) = run(go())
    assert res.ok and s.commands[1:3] == ["MAIL FROM:<>", "RCPT TO:<postmaster>"]


async def _watch_fifo(path: str):
    """(pid, dead): pid from the hanging fake qmail-queue; `dead` resolves at
    EOF on the fifo, i.e. when the child has exited."""
    loop = asyncio.get_running_loop()
    f = await asyncio.to_thread(open, path, "rb", buffering=0)   # blocks until the child opens it
    pid = int((await asyncio.to_thread(f.readline)).decode())
    dead = loop.create_task(asyncio.to_thread(lambda: (f.read(), f.close())))
    return pid, dead


@pytest.mark.parametrize("nrcpts", [1, 400])   # 400: envelope > pipe buffer, still unsent
def test_qq_timeout_is_451_and_child_killed(monkeypatch, tmp_path, caplog, nrcpts):
    fifo = str(tmp_path / "ready")
    os.mkfifo(fifo)
    monkeypatch.setenv("FAKEQQ_OUT", str(tmp_path / "qq"))
    monkeypatch.setenv("FAKEQQ_EXIT", "hang")
    monkeypatch.setenv("FAKEQQ_READY", fifo)
    d = Delivery.from_spec(f"qmail-queue:{sys.executable} {FAKEQQ}", timeout=1.0)
    e = env(rcpts=[f"{'r' * 200}{i}@example.org" for i in range(nrcpts)])

    async def go():
        watch = asyncio.create_task(_watch_fifo(fifo))
        res = await deliver(d, e, MSG)
        pid, dead = await watch
        await dead
        return res, pid
    caplog.set_level("DEBUG")
    res, pid = run(go())
    assert not res.ok and str(res.reply) == "451 4.3.0 qq timeout"
    assert f"pid={pid} timeout after 1.0s" in res.detail
    with pytest.raises(ProcessLookupError):   # killed and reaped
        os.kill(pid, 0)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_qq_cancelled_commit_kills_child_and_reraises(monkeypatch, tmp_path, caplog):
    # The client went away mid-commit: CancelledError propagates (nothing
    # else), qmail-queue is killed before it commits, nothing is logged.
    fifo = str(tmp_path / "ready")
    os.mkfifo(fifo)
    monkeypatch.setenv("FAKEQQ_OUT", str(tmp_path / "qq"))
    monkeypatch.setenv("FAKEQQ_EXIT", "hang")
    monkeypatch.setenv("FAKEQQ_READY", fifo)
    d = Delivery.from_spec(f"qmail-queue:{sys.executable} {FAKEQQ}")

    async def go():
        watch = asyncio.create_task(_watch_fifo(fifo))
        task = asyncio.create_task(deliver(d, env(), MSG))
        pid, dead = await watch
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await dead          # EOF on the fifo: the child is gone
        return pid
    caplog.set_level("DEBUG")
    run(go())
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.parametrize("stage,line", [
    ("mail", "999 weird"), ("rcpt", "600 weird"), ("data", "199 weird"),
    ("eod", "600 weird"), ("eod", "099 x"), ("ehlo", "700 x"),
    ("mail", "55 short"), ("eod", "5x0 nope"),
])
def test_smtp_garbage_reply_code_is_451_not_554(stage, line):
    # A code outside 200-599 is a protocol error: 451, the client retries;
    # never a permanent 554 bounce of a valid message.
    res, _ = run(forward({stage: line}, env(), MSG))
    assert not res.ok and res.reply == reply("downstream_temp"), str(res.reply)
    assert "malformed reply" in res.detail


def test_lmtp_garbage_reply_code_after_data_is_451():
    e = env(rcpts=["a@x", "b@x"])
    res, _ = run(forward({"eod": ["250 2.0.0 ok", "999 weird"]}, e, MSG, lmtp=True))
    assert not res.ok and res.reply == reply("downstream_temp")


@pytest.mark.parametrize("line,want", [
    ("550 5.1.1 nouser", "554 5.1.1 nouser"),
    ("550 nouser", "554 5.3.0 nouser"),              # none given: ours
    ("550 4.1.1 nouser", "554 5.3.0 nouser"),   # wrong class for a 5xx: ours
    ("552 5.2.2 over quota", "554 5.2.2 over quota"),
])
def test_smtp_rejection_keeps_the_downstream_enhanced_code(line, want):
    res, _ = run(forward({"rcpt": line}, env(), MSG))
    assert str(res.reply) == want
    res, _ = run(forward({"eod": line}, env(), MSG))
    assert str(res.reply) == want
