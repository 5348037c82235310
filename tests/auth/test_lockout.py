"""Per-user lockout without locking out the owner: per (user, client network)
counting, networks that authenticated the user before, pacing past the
user's budget across networks (docs/behaviour/auth.md#failures-and-lockout).
The real server on 127.0.0.1, smtplib clients from several loopback networks
(127.0.N.x is network 127.0.N.0/24)."""
import logging

import pytest

from mailfilter.auth.lockout import KnownNetworks, Pacer, net_key, user_net_key

from auth_helpers import USERS, ServerThread, auth_plain_from, make_userdb, serve_opts

LOCKED = 454


@pytest.fixture
def srv(tmp_path):
    s = ServerThread(serve_opts(tmp_path, auth="", userdb=make_userdb(tmp_path / "users.db")))
    auth = s.state.auth
    auth.by_user.limit = 3          # per user and network
    auth.by_ip.limit = 100          # per-address limits are not what these tests look at
    yield s
    s.stop()


def test_guesser_locks_the_user_for_its_own_network_only(srv):
    """Old behaviour: 3 wrong guesses from anywhere locked 'tim' everywhere."""
    for host in ("127.0.1.1", "127.0.1.2"):                   # one /24, two addresses
        assert auth_plain_from(srv.port, host, "tim", "guess", tries=2)[0] == 535
    # locked for tim from 127.0.1.0/24, even with the right password
    assert auth_plain_from(srv.port, "127.0.1.3", "tim", USERS["tim"]) == [LOCKED]
    assert auth_plain_from(srv.port, "127.0.1.3", "bob", USERS["bob"]) == [235]
    # the owner from another network is not
    assert auth_plain_from(srv.port, "127.0.2.1", "tim", USERS["tim"]) == [235]
    auth = srv.state.auth
    assert auth.by_user.locked(user_net_key("tim", "127.0.1.9"))
    assert not auth.by_user.locked(user_net_key("tim", "127.0.2.1"))


def test_a_network_that_authenticated_the_user_is_never_locked_for_it(srv, caplog):
    caplog.set_level(logging.INFO, logger="mailfilter")
    assert auth_plain_from(srv.port, "127.0.3.1", "tim", USERS["tim"]) == [235]
    # a guesser on the owner's network: past the per-user limit, never user-locked
    for _ in range(3):
        assert auth_plain_from(srv.port, "127.0.3.66", "tim", "guess", tries=2) == [535, 535]
    assert auth_plain_from(srv.port, "127.0.3.1", "tim", USERS["tim"]) == [235]
    assert "now locked" not in caplog.text
    # the same guesses from an unknown network lock it (for that network)
    assert auth_plain_from(srv.port, "127.0.4.66", "tim", "guess", tries=3) == [535, 535, 421]
    assert auth_plain_from(srv.port, "127.0.4.1", "tim", USERS["tim"]) == [LOCKED]
    assert auth_plain_from(srv.port, "127.0.3.1", "tim", USERS["tim"]) == [235]


def test_guesses_spread_over_networks_are_paced_and_the_owner_gets_in(srv, caplog):
    """Under the per-network limit from each of 8 networks (16 failures, over
    the budget of 4 across networks): later attempts from unknown networks
    wait their turn (logged result=paced); nothing locks 'tim'."""
    caplog.set_level(logging.INFO, logger="mailfilter")
    auth = srv.state.auth
    auth.user_budget.limit = 4
    # one attempt a minute, each waiting at most 0.1 s: every paced attempt
    # after the first waits (and is logged), whatever the machine's speed
    auth.pacer.interval, auth.pacer.max_wait = 60.0, 0.1
    assert auth_plain_from(srv.port, "127.0.5.1", "tim", USERS["tim"]) == [235]   # known
    for n in range(10, 18):
        assert auth_plain_from(srv.port, f"127.0.{n}.7", "tim", "guess", tries=2) == [535, 535]
    assert auth.user_budget.locked("tim")                    # over budget: paced
    assert "result=paced mech=PLAIN user=tim" in caplog.text
    assert "now locked" not in caplog.text
    # the owner from a new network: paced too, then in
    assert auth_plain_from(srv.port, "127.0.30.1", "tim", USERS["tim"]) == [235]
    assert "result=paced mech=PLAIN user=tim client=unknown[127.0.30.1]" in caplog.text
    # from the network that authenticated before: not paced
    assert auth_plain_from(srv.port, "127.0.5.1", "tim", USERS["tim"]) == [235]
    assert all("127.0.5.1" not in line for line in caplog.text.splitlines() if "result=paced" in line)


def test_net_key_is_ipv4_24_and_ipv6_64():
    assert net_key("192.0.2.7") == net_key("192.0.2.250") == "192.0.2.0/24"
    assert net_key("::ffff:192.0.2.7") == "192.0.2.0/24"
    assert net_key("2001:db8:1:2::5") == net_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert net_key("fe80::1%eth0") == "fe80::/64"
    assert user_net_key("tim", "192.0.2.7") != user_net_key("tim", "192.0.3.7")
    assert user_net_key("tim", "192.0.2.7") != user_net_key("bob", "192.0.2.7")


def test_known_networks_expire_and_are_bounded():
    now = [0.0]
    k = KnownNetworks(ttl=100, size=3, clock=lambda: now[0])
    k.remember("a")
    now[0] = 99.0
    assert "a" in k
    now[0] = 100.0
    assert "a" not in k and len(k) == 0                      # expired entries are dropped
    for key in "bcde":
        k.remember(key)
    assert len(k) == 3 and "b" not in k and "e" in k          # least recent success goes


def test_pacer_spaces_attempts_caps_the_wait_and_is_bounded():
    now = [0.0]
    p = Pacer(interval=5, max_wait=12, size=2, clock=lambda: now[0])
    assert [p.wait("tim") for _ in range(5)] == [0, 5, 10, 12, 12]
    now[0] = 100.0                                           # the queue has drained
    assert p.wait("tim") == 0
    p.wait("bob")
    p.wait("eve")
    assert len(p) == 2
    assert Pacer(interval=0, max_wait=12).wait("tim") == 0
