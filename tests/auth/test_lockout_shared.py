"""AUTH failure accounting in the shared store (docs/behaviour/auth.md#fleet):
two servers built by serve's build_state with one `--state redis://`, AUTH
over real sockets. Guesses spread over both lock at the fleet's limit; a
lock one server set refuses on the other; a success from a network makes it
known on both; Redis away: each counts for itself."""
import pytest

from auth_helpers import USERS, ServerThread, auth_plain_from, make_userdb, serve_opts
from tests.support.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support.server_harness import free_port

LOCKED = 454


@pytest.fixture
def pair(tmp_path, redis_server):
    db = make_userdb(tmp_path / "users.db")
    servers = [ServerThread(serve_opts(tmp_path, auth="", userdb=db, state=redis_server.url,
                                       auth_max_fail_ip=4, auth_max_fail_user=100,
                                       auth_max_session_failures=0))
               for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def test_guesses_spread_over_two_servers_lock_the_address_at_the_fleet_limit(pair):
    a, b = pair
    for srv in (a, b, a, b):        # 4 failures in all, 2 per server: under each local limit
        assert auth_plain_from(srv.port, "127.0.5.1", "tim", "guess") == [535]
    assert a.state.auth.by_ip.count("127.0.5.1") == 2
    for srv in (a, b):
        assert auth_plain_from(srv.port, "127.0.5.1", "tim", USERS["tim"]) == [LOCKED]
    assert auth_plain_from(a.port, "127.0.5.2", "tim", USERS["tim"]) == [235]


def test_a_success_makes_the_network_known_on_every_server(tmp_path, redis_server):
    db = make_userdb(tmp_path / "users.db")
    a, b = (ServerThread(serve_opts(tmp_path, auth="", userdb=db, state=redis_server.url,
                                    auth_max_fail_user=2, auth_max_fail_ip=100))
            for _ in range(2))
    try:
        assert auth_plain_from(a.port, "127.0.6.1", "tim", USERS["tim"]) == [235]
        # guesses for tim from that network on the other server never lock tim there
        assert auth_plain_from(b.port, "127.0.6.9", "tim", "guess", tries=2) == [535, 535]
        assert auth_plain_from(b.port, "127.0.6.9", "tim", "guess", tries=2) == [535, 535]
        assert auth_plain_from(b.port, "127.0.6.1", "tim", USERS["tim"]) == [235]
        # from an unknown network they do, on both
        assert auth_plain_from(b.port, "127.0.7.9", "tim", "guess", tries=2) == [535, 535]
        assert auth_plain_from(a.port, "127.0.7.1", "tim", USERS["tim"]) == [LOCKED]
    finally:
        a.stop()
        b.stop()


def test_redis_away_each_server_counts_for_itself(tmp_path):
    db = make_userdb(tmp_path / "users.db")
    srv = ServerThread(serve_opts(tmp_path, auth="", userdb=db,
                                  state=f"redis://127.0.0.1:{free_port()}/0",
                                  auth_max_fail_ip=2, auth_max_session_failures=0))
    try:
        assert auth_plain_from(srv.port, "127.0.8.1", "tim", USERS["tim"]) == [235]
        assert auth_plain_from(srv.port, "127.0.8.1", "tim", "guess", tries=3) == [535, 535, LOCKED]
        assert srv.state.auth.shared.fallbacks > 0
    finally:
        srv.stop()
