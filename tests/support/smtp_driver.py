"""A tiny application for driving mailfilter.smtp.engine in tests.

``App`` plays the role of server.py + policy: it feeds bytes, drains events,
answers the events that owe a reply (from a script, else "ok" to everything) and
collects what the engine writes. ``FEEDS`` are the ways the same bytes reach the
engine: whole, one byte at a time (httptools test_parser_request_fragmented_bytes
pattern), and seeded random fragments. ``run()`` feeds a scenario and, for the
fragmented feeds, checks that events and output equal those of the whole feed.
"""
from __future__ import annotations

import copy
import random

from mailfilter.smtp.replies import Reply, reply
from mailfilter.smtp.engine import (
    NEED_DATA, PAUSED, AuthResponse, AuthStart, BdatStart, Closed, DataChunk, DataEnd,
    DataStart, EngineConfig, Helo, Mail, Rcpt, SMTPConnection,
)

CFG = EngineConfig(greeting="mx.example.com")


def default_answer(conn: SMTPConnection, ev):
    t = type(ev)
    if t is Helo:
        return conn.ehlo_reply() if ev.verb == "EHLO" else conn.helo_reply()
    if t is Mail:
        return reply("mail_ok")
    if t is Rcpt:
        return reply("rcpt_ok")
    if t is DataStart or t is BdatStart:
        return reply("data_go")
    if t is DataEnd:
        return conn.data_end_check(ev) or reply("queued", stamp="1700000000", qid="4711")
    if t is AuthStart or t is AuthResponse:
        return reply("auth_unavailable")
    raise AssertionError(f"no reply for {ev!r}")


class App:
    def __init__(self, config: EngineConfig | None = None, script: dict | None = None,
                 greet: bool = True, manual: bool = False) -> None:
        self.conn = SMTPConnection(config or CFG)
        self.script = copy.deepcopy(script or {})
        self.manual = manual          # do not answer: record PAUSED and stop
        self.events: list = []
        self.writes: list[bytes] = []
        self.closed = False
        if greet:
            self.conn.greet()
            self.flush()

    def answer(self, ev):
        s = self.script.get(type(ev))
        if s is None:
            return default_answer(self.conn, ev)
        if isinstance(s, list):
            r = s.pop(0)
        else:
            r = s
        if callable(r) and not isinstance(r, Reply):
            r = r(self.conn, ev)
        return r

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writes.append(out)

    def drain(self) -> None:
        conn = self.conn
        while not self.closed:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if ev is PAUSED:
                assert self.manual, "engine paused although every event was answered"
                break
            self.events.append(ev)
            if isinstance(ev, Closed):
                self.closed = True
                break
            if ev.owes_reply and not self.manual:
                conn.send(self.answer(ev))
        self.flush()

    # --- views ------------------------------------------------------------
    @property
    def output(self) -> bytes:
        return b"".join(self.writes)

    @property
    def lines(self) -> list[str]:
        return self.output.decode("utf-8", "replace").split("\r\n")[:-1]

    def merged(self) -> list:
        """Events with adjacent DataChunks joined (chunking depends on the feed)."""
        out: list = []
        for ev in self.events:
            if isinstance(ev, DataChunk) and out and isinstance(out[-1], DataChunk):
                out[-1] = DataChunk(out[-1].data + ev.data)
            else:
                out.append(ev)
        return out

    def of(self, cls) -> list:
        return [e for e in self.merged() if isinstance(e, cls)]

    def data(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))


def feed_whole(app: App, data: bytes) -> None:
    app.conn.receive_data(data)
    app.drain()


def feed_bytewise(app: App, data: bytes) -> None:
    for i in range(len(data)):
        app.conn.receive_data(data[i:i + 1])
        app.drain()


def feed_random(app: App, data: bytes) -> None:
    rnd = random.Random(len(data))
    i = 0
    while i < len(data):
        n = rnd.randint(1, 7)
        app.conn.receive_data(data[i:i + n])
        app.drain()
        i += n


FEEDS = {"whole": feed_whole, "bytewise": feed_bytewise, "random": feed_random}


def run(feed, data: bytes, config: EngineConfig | None = None, script: dict | None = None,
        eof: bool = False) -> App:
    app = App(config, script)
    feed(app, data)
    if eof:
        app.conn.receive_data(b"")
        app.drain()
    if feed is not feed_whole:
        ref = run(feed_whole, data, config, script, eof)
        assert app.merged() == ref.merged()
        assert app.output == ref.output
    return app
