"""THE fleet test: three `mailfilter serve` processes on loopback sharing
one real redis-server (--state redis://). An AUTH brute force spread
round-robin over the three is locked out at the fleet's limit; a message
rate holds across them; Redis killed mid-run leaves all three serving
(mail accepted, the local limits in force, one state_fallback line each).
Every loop is bounded in count; every wait is on a reply or a log line."""
import base64
import os

import pytest

from auth_helpers import USERS, make_rules, make_userdb
from tests.support.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support.server_harness import RawClient, first, spawn_serve

NODES = 3
MAX_FAIL_IP = 6
MSG_RATE = 10
TOO_MANY_MSGS = "451 4.7.1 too many messages from your address, try again later"


@pytest.fixture
def fleet(tmp_path, redis_server):
    rules = make_rules(tmp_path)
    db = make_userdb(tmp_path / "users.db")
    nodes = []
    try:
        for i in range(NODES):
            spool = tmp_path / f"spool{i}"
            for sub in ("tmp", "new", "cur"):
                os.makedirs(spool / sub)
            nodes.append(spawn_serve(
                "--rules", rules, "--deliver", f"maildir:{spool}", "--no-tls", "--auth", "",
                "--userdb", db, "--state", redis_server.url, "--state-timeout", "0.5",
                "--auth-max-fail-ip", str(MAX_FAIL_IP), "--auth-max-session-failures", "0",
                "--auth-fail-delay", "0", "--max-msg-rate", str(MSG_RATE)))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def session(port, source):
    c = RawClient(port, source)
    assert first(c.reply()).startswith("220 ")
    assert first(c.cmd("EHLO client.test")).startswith("250")
    return c


def auth(port, source, user, password) -> str:
    c = session(port, source)
    try:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return first(c.cmd(f"AUTH PLAIN {token}"))
    finally:
        c.close()


def send(port, source) -> list[str]:
    """One whole message: the replies to MAIL, RCPT and the end of data."""
    c = session(port, source)
    try:
        out = [first(c.cmd("MAIL FROM:<a@sender.test>"))]
        if out[0].startswith("250"):
            out.append(first(c.cmd("RCPT TO:<user@example.com>")))
            assert first(c.cmd("DATA")).startswith("354")
            c.send(b"Subject: fleet\r\n\r\nhello\r\n.\r\n")
            out.append(first(c.reply()))
        return out
    finally:
        c.close()


def test_the_fleet_shares_limits_and_survives_redis(fleet, redis_server):
    ports = [node.port for node in fleet]
    for node in fleet:
        node.log.wait_for(r"state: Redis redis://127\.0\.0\.1:\d+/0 ")

    # (a) AUTH brute force round-robin: 2 guesses per node, 6 in the fleet
    guesser = "127.0.20.1"
    for i in range(MAX_FAIL_IP):
        assert auth(ports[i % NODES], guesser, "tim", f"guess{i}").startswith("535 ")
    for port in ports:          # the next attempt, on any node, even the right password
        assert auth(port, guesser, "tim", USERS["tim"]) == \
            "454 4.7.0 too many authentication failures, try again later"
    assert auth(ports[0], "127.0.21.1", "tim", USERS["tim"]).startswith("235 ")

    # (b) a message rate of 10 per window holds across the three
    sender = "127.0.22.1"
    replies = [send(ports[i % NODES], sender)[0] for i in range(MSG_RATE + 1)]
    assert replies[:MSG_RATE] == ["250 2.1.0 ok"] * MSG_RATE
    assert replies[MSG_RATE] == TOO_MANY_MSGS
    assert int(redis_server.client().get(f"mailfilter:rate:msg:{sender}")) == MSG_RATE + 1

    # (c) Redis killed mid-run: every node keeps serving, on local limits
    redis_server.kill()
    for port in ports:
        r = send(port, "127.0.23.1")
        assert r[0] == "250 2.1.0 ok" and r[2].startswith("250 "), r
    for node in fleet:
        node.log.wait_for(r"action=state_fallback store=redis://127\.0\.0\.1:\d+/0")
    # the local message rate is in force on each node (its own count)
    local = [send(ports[0], "127.0.24.1")[0] for _ in range(MSG_RATE + 1)]
    assert local[:MSG_RATE] == ["250 2.1.0 ok"] * MSG_RATE and local[MSG_RATE] == TOO_MANY_MSGS
    for node in fleet:
        assert node.proc.poll() is None
        assert len(node.log.wait_for("action=state_fallback")) == 1


def test_workers_share_the_redis_counts(tmp_path, redis_server):
    """--workers 2 with one --state: each worker opens its own pool after
    the fork, and the count is the same whichever worker takes a connection."""
    node = spawn_serve("--rules", make_rules(tmp_path), "--deliver", "discard", "--no-tls",
                       "--workers", "2", "--state", redis_server.url, "--state-timeout", "0.5",
                       "--max-msg-rate", "4", listening=2)
    try:
        node.log.wait_for(r"state: Redis ", count=2)
        replies = [send(node.port, "127.0.25.1")[0] for _ in range(5)]
        assert replies == ["250 2.1.0 ok"] * 4 + [TOO_MANY_MSGS]
        assert int(redis_server.client().get("mailfilter:rate:msg:127.0.25.1")) == 5
        assert "state_fallback" not in node.log.text()
    finally:
        node.stop()
