"""mailfilter.log: one line per record whatever a client sends
(docs/architecture.md#errors-and-logging): quoting, escaping by code point, the
value cap; the sink (one write per loop turn, syslog framing, the counted gap)."""
import asyncio
import logging
import os
import re
import socket
import types

import pytest

from mailfilter import log
from mailfilter.log.sink import SyslogSink


def test_plain_values_stand_as_they_are():
    assert log.kv(action="accept", rule="badmailfrom:6", to="<a@b.example>") == \
        "action=accept rule=badmailfrom:6 to=<a@b.example>"


def test_quotes_escapes_and_controls():
    assert log.quote('a "b" \\ c') == '"a \\"b\\" \\\\ c"'
    assert log.quote("x\r\ny\x00\x1b") == '"x\\x0d\\x0ay\\x00\\x1b"'
    assert log.quote("") == '""'


def test_code_points_above_0xff_are_not_ambiguous():
    """U+2028 used to be written \\x2028, which reads as \\x20 followed by
    "28"; \\x is now always two hex digits."""
    assert log.quote("\u00e9") == '"\\xe9"'
    assert log.quote("\u2028") == '"\\u2028"'
    assert log.quote("\U0001f600") == '"\\U0001f600"'


def test_long_values_are_cut_and_say_how_much():
    q = log.quote("x" * 10_000)
    assert q.startswith('"xxx') and q.endswith('...[9488 more]"')
    assert len(q) <= log.MAX_VALUE + 20
    # escapes count with their printed length: 9000 control bytes -> 4 chars each
    q = log.quote("\x01" * 9000)
    assert len(q) <= log.MAX_VALUE + 20 and q.endswith(f"...[{9000 - log.MAX_VALUE // 4} more]\"")
    exact = "y" * log.MAX_VALUE
    assert log.quote(exact) == exact


# ------------------------------------------------------------------ the fast sink
# (docs/operations.md#logs): real files and real datagram sockets; the loop
# turn is a real asyncio loop turn; nothing waits on time.

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@pytest.fixture
def installed():
    """log.setup(...) for one test, then the logger as before (caplog tests follow)."""
    yield lambda *a, **kw: log.setup(*a, **kw)
    log.close()


class _Reply:
    temporary = False

    def __str__(self):
        return "250 2.1.5 ok"


def _verdict():
    """What log.decision reads of a policy.Verdict."""
    return types.SimpleNamespace(accept=True, stage="RCPT", reason="ok", rule="rcpthosts:1",
                                 reply=_Reply())


def test_decision_line_is_the_kv_line():
    """log.decision formats the same line kv() would (key order, quoting)."""
    got = []
    handler = logging.Handler()
    handler.emit = lambda record: got.append(record.getMessage())
    logger = logging.getLogger("mailfilter")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        log.decision(_verdict(), client="unknown[127.0.0.1]:5", tls="-", helo="h x", sender="a@b",
                     rcpt="c@d", auth=None, extra="1")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert got == ['action=accept stage=RCPT reason=ok rule=rcpthosts:1 client=unknown[127.0.0.1]:5 '
                   'tls=- helo="<h x>" from=<a@b> to=<c@d> reply="250 2.1.5 ok" extra=1']


def test_file_lines_leave_once_per_loop_turn_in_order(tmp_path, installed):
    """Lines of one loop turn are in the file after the turn, not before;
    a `logging` record (a start-up or error line) lands between them in
    order; the prefix is the logging format operators parse."""
    path = tmp_path / "mail.log"
    with open(path, "w") as fh:
        installed("info", stream=fh)

        async def turn():
            log.event(action="one", client="c")
            logging.getLogger("mailfilter").warning("plain %s", "text")
            log.anomaly("SYNTAX", client="c")
            assert path.read_text() == ""          # still in the buffer
            await asyncio.sleep(0)                  # the turn ends: the flush runs
            await asyncio.sleep(0)
            return path.read_text()

        text = asyncio.run(turn())
        lines = text.splitlines()
        pid = os.getpid()
        assert len(lines) == 3
        assert re.fullmatch(rf"{STAMP} \[{pid}\] INFO action=one client=c", lines[0])
        assert re.fullmatch(rf"{STAMP} \[{pid}\] WARNING plain text", lines[1])
        assert re.fullmatch(rf"{STAMP} \[{pid}\] WARNING anomaly=SYNTAX client=c", lines[2])
        # no running loop (start-up, the --workers supervisor): written at once
        log.event(action="two")
        assert path.read_text().endswith(" INFO action=two\n")


def test_level_filters_before_formatting(tmp_path, installed):
    path = tmp_path / "mail.log"
    with open(path, "w") as fh:
        installed("warning", stream=fh)
        log.event(action="quiet")
        log.decision(_verdict(), client="c")
        log.anomaly("SYNTAX", client="c")
    assert path.read_text().count("\n") == 1 and "anomaly=SYNTAX" in path.read_text()


def test_without_setup_lines_are_logger_records(caplog):
    """Library use and caplog: no sink, the `mailfilter` logger's records."""
    logging.getLogger("mailfilter").propagate = True
    caplog.set_level(logging.INFO, logger="mailfilter")
    log.event(action="x", client="y")
    log.anomaly("BARE NEWLINE", client="y")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mailfilter"] == [
        ("INFO", "action=x client=y"), ("WARNING", 'anomaly="BARE NEWLINE" client=y')]


def test_close_gives_the_logger_back(tmp_path):
    with open(tmp_path / "l", "w") as fh:
        log.setup("info", stream=fh)
        log.close()
    logger = logging.getLogger("mailfilter")
    assert log._sink is None and logger.propagate and logger.level == logging.NOTSET
    assert not any(type(h).__name__ == "_SinkHandler" for h in logger.handlers)


# --- syslog ---------------------------------------------------------------------------
RFC3164 = re.compile(r"<(?P<pri>\d+)>(?P<mon>[A-Z][a-z]{2}) (?P<day>[ \d]\d) (?P<time>\d\d:\d\d:\d\d) "
                     r"(?:(?P<host>\S+) )?(?P<ident>[^\[ ]+)\[(?P<pid>\d+)\]: (?P<msg>.*)", re.S)
RFC5424 = re.compile(r"<(?P<pri>\d+)>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(?:Z|[+-]\d\d:\d\d)) "
                     r"(?P<host>\S+) (?P<app>\S+) (?P<pid>\d+) - - (?P<msg>.*)", re.S)


@pytest.fixture
def unix_receiver(tmp_path):
    path = str(tmp_path / "log.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(5)
    yield path, rx
    rx.close()


@pytest.fixture
def udp_receiver():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    yield f"127.0.0.1:{rx.getsockname()[1]}", rx
    rx.close()


def test_rfc3164_to_a_unix_socket_as_glibc(unix_receiver, installed):
    path, rx = unix_receiver
    installed("info", use_syslog=True, syslog_address=path)
    log.event(action="accept", client="c")
    logging.getLogger("mailfilter").error("boom")
    first, second = rx.recv(4096).decode(), rx.recv(4096).decode()
    m = RFC3164.fullmatch(first)
    assert m and m["host"] is None, first          # no host name to the local socket
    assert (m["pri"], m["ident"], int(m["pid"]), m["msg"]) == \
        ("22", "mailfilter", os.getpid(), "action=accept client=c")   # mail.info = 2*8+6
    m = RFC3164.fullmatch(second)
    assert (m["pri"], m["msg"]) == ("19", "boom")                      # mail.err = 2*8+3


def test_rfc3164_over_udp_names_the_host(udp_receiver, installed):
    addr, rx = udp_receiver
    installed("info", use_syslog=True, syslog_address=addr)
    log.anomaly("SYNTAX", client="c")
    m = RFC3164.fullmatch(rx.recv(4096).decode())
    assert m and m["host"] == socket.gethostname() and m["pri"] == "20"   # mail.warning
    assert m["msg"] == "anomaly=SYNTAX client=c"


def test_rfc5424_framing(udp_receiver, installed):
    addr, rx = udp_receiver
    installed("info", use_syslog=True, syslog_address=addr, syslog_format="rfc5424")
    log.event(action="accept", client="c")
    m = RFC5424.fullmatch(rx.recv(4096).decode())
    assert m, "not RFC 5424"
    assert (m["pri"], m["host"], m["app"], int(m["pid"]), m["msg"]) == \
        ("22", socket.gethostname(), "mailfilter", os.getpid(), "action=accept client=c")


def test_missing_syslog_socket_is_one_setup_error(tmp_path):
    with pytest.raises(log.LogSetupError, match=r"--syslog-socket .*/nope: No such file or directory"):
        log.setup("info", use_syslog=True, syslog_address=str(tmp_path / "nope"))
    with pytest.raises(log.LogSetupError, match="neither a socket path"):
        log.setup("info", use_syslog=True, syslog_address="localhost")
    assert log._sink is None


def _drain(rx) -> list[str]:
    rx.setblocking(False)
    got = []
    try:
        while True:
            got.append(rx.recv(65536).decode())
    except BlockingIOError:
        pass
    rx.settimeout(5)
    return got


def test_full_buffer_drops_with_a_counted_gap(unix_receiver):
    """The receiver does not read: its queue fills, then the buffer (cap),
    then lines are dropped and counted; once it reads again, the buffered
    lines go, then `action=log_gap dropped=N`, then the new lines: every
    line is either received or counted."""
    path, rx = unix_receiver
    sink = SyslogSink(path, logging.INFO, cap=4096)
    total = 3000

    async def burst():
        for i in range(total):
            sink.write(logging.INFO, f"n={i} " + "x" * 100)   # one loop turn: no flush between
        assert sink.dropped > 0
        received = []
        for _ in range(total):              # the receiver reads again (its queue is short)
            received += _drain(rx)
            if not sink.pending:
                break
            sink.flush()
        sink.write(logging.INFO, "n=after")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return received + _drain(rx)

    try:
        lines = [RFC3164.fullmatch(d)["msg"] for d in asyncio.run(burst())]
    finally:
        sink.close()
    gaps = [i for i, m in enumerate(lines) if m.startswith("action=log_gap")]
    assert len(gaps) == 1, lines[-5:]
    dropped = int(lines[gaps[0]].split("dropped=")[1])
    kept = [int(m.split()[0][2:]) for m in lines if m.startswith("n=") and m != "n=after"]
    assert dropped > 0 and len(kept) + dropped == total
    assert kept == sorted(kept) and lines[-1] == "n=after" and gaps[0] == len(lines) - 2


def test_kv_line_in_c_equals_the_python_reference():
    """log/quoting.py's kv_line is _core's (logline.pxi); kv_line_py is its
    reference: the same line for random values of every kind."""
    import random
    from mailfilter.log.quoting import MAX_VALUE, kv_line, kv_line_py
    rng = random.Random(5)
    alphabet = ("abcXYZ019.-_@:[]<>+/=%!" + ' "\\\t\r\n\x00\x7f\x80\xe9\xff' + "\u20ac\U0001f600")
    for _ in range(3000):
        fields = {}
        for i in range(rng.randint(0, 6)):
            kind = rng.random()
            if kind < 0.1:
                value = None
            elif kind < 0.2:
                value = rng.randint(-5, 10**6)
            elif kind < 0.25:
                value = "a" * rng.choice((MAX_VALUE - 1, MAX_VALUE, MAX_VALUE + 1, 3 * MAX_VALUE))
            else:
                value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            fields[f"k{i}"] = value
        assert kv_line(fields) == kv_line_py(fields), fields
