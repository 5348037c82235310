"""mailfilter.smtp.events: the engine's events as cdef classes (mailfilter._core).

They must behave as the Python classes they replaced (tests/support/pyengine/
events.py): values compared and hashed by content, read-only fields,
``isinstance`` and ``type(ev)`` dispatch, the same repr and ``owes_reply``.
"""
from __future__ import annotations

import pytest

from mailfilter import _core
from mailfilter.smtp import engine, events
from mailfilter.smtp.replies import REPLIES
from pyengine import events as py_events

SAMPLES = [
    ("Helo", ("EHLO", "client.example")),
    ("Mail", ("a@b.example", {"SIZE": 10})),
    ("Rcpt", ("r@b.example", {}, True)),
    ("DataStart", ()),
    ("DataChunk", (b"x\n",)),
    ("DataEnd", (10, False, 2, False, True)),
    ("AuthStart", ("PLAIN", None)),
    ("AuthResponse", (b"dGVzdA==",)),
    ("StartTLS", ()),
    ("Rset", ()),
    ("Quit", ()),
    ("Noop", ()),
    ("Vrfy", ("someone",)),
    ("Help", ()),
    ("Anomaly", (events.ANOMALY_UNKNOWN, "<5 bytes>")),
    ("Closed", ("eof",)),
]


@pytest.mark.parametrize("name,args", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_event_is_a_value_like_the_python_one(name, args):
    cls, old = getattr(events, name), getattr(py_events, name)
    ev, ref = cls(*args), old(*args)
    assert type(ev).__module__ == "mailfilter._core"
    assert isinstance(ev, events.Event)
    assert ev == cls(*args) and not ev != cls(*args)
    assert repr(ev) == repr(ref)
    assert ev.owes_reply is ref.owes_reply
    for field in ref.__slots__:
        assert getattr(ev, field) == getattr(ref, field)
        with pytest.raises(AttributeError):
            setattr(ev, field, getattr(ref, field))     # readonly
    if name not in ("Mail", "Rcpt"):                    # a dict field is unhashable, as before
        assert hash(ev) == hash(cls(*args))
        assert {ev: 1}[cls(*args)] == 1


def test_events_differ_by_type_and_content():
    assert events.Noop() != events.Rset()
    assert events.Noop() != object()
    assert events.Vrfy("a") != events.Vrfy("b")
    assert events.DataEnd(1, False, 0, False) == events.DataEnd(1, False, 0, False, False)
    assert events.DataEnd(1, False, 0, False) != events.DataEnd(1, True, 0, False)
    assert events.Anomaly("SYNTAX") == events.Anomaly("SYNTAX", None)


def test_dispatch_by_type():
    handlers = {events.Helo: "helo", events.Mail: "mail", events.DataEnd: "end"}
    assert handlers.get(type(events.Helo("HELO", "x"))) == "helo"
    assert handlers.get(type(events.DataEnd(0, False, 0, False))) == "end"
    assert handlers.get(type(events.Noop())) is None


def test_the_modules_export_the_core_objects():
    for name in events.__all__:
        assert getattr(events, name) is getattr(_core, name), name
    for name in ("IDLE", "MAIL", "RCPT", "DATA", "AUTH", "CLOSED", "NEED_DATA", "PAUSED"):
        assert getattr(engine, name) is getattr(events, name), name
    assert events.STATES == py_events.STATES
    assert repr(events.NEED_DATA) == "NEED_DATA" and repr(events.PAUSED) == "PAUSED"
    for name in [n for n in events.__all__ if n.startswith("ANOMALY_")]:
        assert getattr(events, name) == getattr(py_events, name)


def test_state_is_the_exported_string():
    conn = engine.SMTPConnection(engine.EngineConfig())
    assert conn.state is engine.IDLE
    conn.receive_data(b"MAIL FROM:<a@b>\r\n")
    ev = conn.next_event()
    assert type(ev) is engine.Mail
    conn.send(REPLIES["mail_ok"])
    assert conn.state is engine.MAIL
