"""mailfilter/auth/session.py: SMTPAUTH modes, failure tracking, and the AUTH
dialogue on the sans-IO engine fed whole and one byte at a time
(docs/architecture.md#tests-and-benches)."""
import asyncio
import base64
import hmac

import pytest

from mailfilter.auth.session import (
    MAX_KEY, AuthConfig, AuthService, FailureTracker, ip_key, parse_mode, tracker_key,
)
from mailfilter.policy.engine import Client
from mailfilter.smtp.engine import AuthResponse, AuthStart
from mailfilter.auth.verify import DBVerifier

from auth_helpers import USERS, make_userdb
from smtp_driver import FEEDS, App


@pytest.mark.parametrize("value,mechs,required", [
    (None, (), False), ("-", (), False), ("", ("LOGIN", "PLAIN"), False),
    ("anything", ("LOGIN", "PLAIN"), False), ("+cram", ("LOGIN", "PLAIN", "CRAM-MD5"), False),
    ("+CRAM", ("LOGIN", "PLAIN", "CRAM-MD5"), False), ("cram", ("CRAM-MD5",), False),
    ("!", ("LOGIN", "PLAIN"), True), ("!cram", ("CRAM-MD5",), True),
    ("!+cram", ("LOGIN", "PLAIN", "CRAM-MD5"), True),
])
def test_smtpauth_modes_spec_b_4_3(value, mechs, required):
    m = parse_mode(value)
    assert (m.mechanisms, m.required) == (mechs, required)


def test_failure_tracker_window_and_lockout():
    now = [1000.0]
    t = FailureTracker(window=60, limit=3, lockout=300, clock=lambda: now[0])
    assert not t.failure("a") and not t.failure("a")
    now[0] += 61                                   # both fell out of the window
    assert not t.failure("a") and t.count("a") == 1
    assert not t.failure("a")
    assert t.failure("a") and t.locked("a")        # third in the window locks
    now[0] += 299
    assert t.locked("a") and not t.locked("b")
    now[0] += 2
    assert not t.locked("a")


def test_failure_tracker_counts_attempts_in_flight():
    now = [1000.0]
    t = FailureTracker(window=60, limit=3, lockout=300, clock=lambda: now[0])
    assert t.admit("a") and t.admit("a") and t.admit("a")
    assert not t.admit("a") and t.in_flight("a") == 3      # 3 in flight may all fail
    assert t.admit("b")                                    # other keys are independent
    t.release("a")
    assert t.admit("a")
    assert not t.failure("a")                              # one of the 3 failed
    t.release("a")
    assert t.count("a") == 1 and t.in_flight("a") == 2 and not t.admit("a")
    now[0] += 61                                           # the failure leaves the window
    assert t.admit("a")
    for _ in range(3):
        t.release("a")
    assert t.in_flight("a") == 0 and "a" not in t._inflight
    t.failure("a"), t.failure("a")
    assert t.failure("a") and not t.admit("a")             # locked
    unlimited = FailureTracker(window=60, limit=0, lockout=300)
    assert all(unlimited.admit("x") for _ in range(1000))


def test_failure_tracker_is_bounded():
    t = FailureTracker(window=60, limit=100, lockout=1, size=10)
    for i in range(50):
        t.failure(f"ip{i}")
    assert len(t._fails) == 10


class FakeSP:
    def __init__(self, mode):
        self.mode = mode
        self.authenticated = None

    def setting(self, name):
        return self.mode if name == "SMTPAUTH" else None

    def auth_success(self, user):
        self.authenticated = user


def make_app(tmp_path, mode="+cram"):
    db = make_userdb(tmp_path / "u.db")
    svc = AuthService(AuthConfig(fail_delay=0), verifier=DBVerifier(db))
    sp = FakeSP(mode)
    sess = svc.session(sp, Client(ip="127.0.0.1", port=1234, local_ip="127.0.0.1", local_port=25),
                       "mx.test")
    loop = asyncio.new_event_loop()
    challenges = []

    def answer(conn, ev):
        r = sess.handle(ev)
        if not hasattr(r, "line"):
            r = loop.run_until_complete(r)
        if r.code == 334 and sess.exchange is not None and sess.exchange.mechanism == "CRAM-MD5":
            challenges.append(base64.b64decode(r.text))
        return r

    app = App(script={AuthStart: answer, AuthResponse: answer})
    app.conn.set_extra_ehlo(sess.ehlo_keywords())
    return app, sp, challenges, loop


@pytest.mark.parametrize("feed", list(FEEDS))
def test_plain_and_login_dialogues_any_fragmentation(tmp_path, feed):
    app, sp, _, loop = make_app(tmp_path)
    pw = USERS["alice"].encode()
    data = (b"EHLO c\r\nAUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n"
            + base64.b64encode(b"bad") + b"\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN "
            + base64.b64encode(b"\0alice\0" + pw) + b"\r\nAUTH PLAIN\r\nQUIT\r\n")
    FEEDS[feed](app, data)
    loop.close()
    assert app.lines[1:] == [
        "250-mx.example.com", "250-PIPELINING", "250-CHUNKING", "250-SIZE 0", "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES", "250 AUTH LOGIN PLAIN CRAM-MD5",
        "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "535 5.7.8 authentication failed",
        "334 ", "501 5.0.0 auth exchange cancelled",
        "235 2.7.0 ok, go ahead",
        "503 5.5.1 you're already authenticated",
        app.lines[-1],
    ]
    assert app.lines[-1].startswith("221")
    assert sp.authenticated == "alice"


@pytest.mark.parametrize("feed", list(FEEDS))
def test_cram_dialogue_any_fragmentation(tmp_path, feed):
    app, sp, challenges, loop = make_app(tmp_path, "cram")
    app.conn.receive_data(b"EHLO c\r\nAUTH CRAM-MD5\r\n")
    app.drain()
    (ch,) = challenges
    digest = hmac.new(USERS["tim"].encode(), ch, "md5").hexdigest().encode()
    FEEDS[feed](app, base64.b64encode(b"tim " + digest) + b"\r\n")
    loop.close()
    assert app.lines[-1] == "235 2.7.0 ok, go ahead" and sp.authenticated == "tim"
    assert app.lines[-2] == "334 " + base64.b64encode(ch).decode()


def test_mode_without_mechanism_and_not_offered(tmp_path):
    app, sp, _, loop = make_app(tmp_path, "cram")
    FEEDS["whole"](app, b"EHLO c\r\nAUTH PLAIN\r\nAUTH LOGIN\r\n")
    assert app.lines[-2:] == ["504 5.5.4 auth type unimplemented"] * 2
    loop.close()
    (tmp_path / "off").mkdir()
    app, sp, _, loop = make_app(tmp_path / "off", None)           # SMTPAUTH unset
    FEEDS["whole"](app, b"EHLO c\r\nAUTH PLAIN\r\n")
    assert app.lines[-1] == "503 5.3.3 auth not available"
    assert not any("AUTH" in l for l in app.lines[:-1])
    loop.close()


def test_failure_tables_are_bounded_in_bytes_not_only_keys():
    """A client picks the user name (up to a 12 KB AUTH line): 100k kept
    names of 9 KB with a deque each were 1.2 GB per process. Long keys are
    kept as a fixed-size digest, each entry holds at most `limit` times."""
    now = [0.0]
    t = FailureTracker(600, 10, 900, size=1000, clock=lambda: now[0])
    names = [f"{i:05d}" + "x" * 9000 for i in range(3000)]
    for name in names:
        assert t.failure(name) is False
    assert len(t) == 1000                                    # the size cap
    assert all(len(k) <= MAX_KEY for k in t._fails)
    assert all(len(q) == 1 for q in t._fails.values())
    long = names[-1]                                         # a long name still counts as itself
    for _ in range(8):
        t.failure(long)
    assert t.count(long) == 9 and t.count(names[-2]) == 1
    assert t.failure(long) is True and t.locked(long) and not t.locked(names[-2])
    assert tracker_key(long) != tracker_key(names[-2]) and tracker_key("tim") == "tim"


def test_failure_entries_past_their_window_make_room_and_limit_0_keeps_nothing():
    now = [0.0]
    t = FailureTracker(600, 5, 900, size=100, clock=lambda: now[0])
    for i in range(50):
        t.failure(f"u{i}")
    now[0] = 601.0                                           # every window has passed
    for i in range(50):
        t.failure(f"v{i}")
    assert len(t) == 50 and not any(k.startswith("u") for k in t._fails)
    off = FailureTracker(600, 0, 900)
    for i in range(100):
        assert off.failure(f"w{i}") is False and off.admit(f"w{i}")
    assert len(off) == 0


def test_ip_key_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4():
    """One end site holds a /64: per-address counting gave a single host 2^64
    keys to spread its guesses over."""
    assert ip_key("2001:db8:1:2::5") == ip_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::5") != ip_key("2001:db8:1:2::5")
    assert ip_key("::ffff:192.0.2.7") == ip_key("192.0.2.7") == "192.0.2.7"
    assert ip_key("fe80::1%eth0") == "fe80::/64"
