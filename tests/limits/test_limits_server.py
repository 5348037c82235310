"""Each anvil limit on a real server (both loops, real sockets): its reply,
its one decision line naming the limit and where its value came from; the
local store, then the Redis store shared by two servers, and a Redis that
is down (mail still accepted)."""
import pytest

from mailfilter.limits.anvil import Anvil, LimitsConfig
from mailfilter.limits.local import LocalStore
from mailfilter.limits.redis import RedisStore
from tests.support.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support.server_harness import (
    LOOPS, PLAIN, RELAY, RawClient, first, free_port, start_server, write_rules,
)

OWN = "127.0.0.30"          # tcp.smtp MAXCONNIP="1",MAXMSGRATE="1"

RULES = {"tcp.smtp": (f'{RELAY}:allow,RELAYCLIENT=""\n'
                      f'{OWN}:allow,MAXCONNIP="1",MAXMSGRATE="1"\n'
                      ':allow\n')}

TOO_MANY_CONNS = "421 4.7.0 mx.test too many connections from your address, try again later"
TOO_MANY_MSGS = "451 4.7.1 too many messages from your address, try again later"
TOO_MANY_RCPTS = "451 4.7.1 too many recipients from your address, try again later"


@pytest.fixture(params=LOOPS)
def start(request, tmp_path):
    servers = []
    rules = write_rules(tmp_path / "rules", RULES)

    def _start(**config):
        store = config.pop("store", None) or LocalStore()
        anvil = Anvil(LimitsConfig(**config), store)
        srv = start_server(request.param, rules, str(tmp_path / f"spool{len(servers)}"),
                           remote_host="off", anvil=anvil)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        if srv.state.anvil.shared:
            srv.call(srv.state.anvil.aclose())
        srv.stop()


def session(port, source=PLAIN):
    c = RawClient(port, source)
    assert first(c.reply()).startswith("220 ")
    assert first(c.cmd("EHLO client.test")).startswith("250")
    return c


def mail(c) -> str:
    r = first(c.cmd("MAIL FROM:<a@sender.test>"))
    c.cmd("RSET")
    return r


def lines_with(decisions, text):
    return [line for line in decisions() if text in line]


def check_line(decisions, reason: str, start: str, holds: str) -> None:
    """There is one decision line of `reason`: it begins with `start` and holds `holds`."""
    [line] = lines_with(decisions, f"reason={reason}")
    assert line.startswith(start) and holds in line, line


def finish_message(c) -> str:
    """DATA, a short message, the end of data: its reply."""
    assert first(c.cmd("DATA")).startswith("354")
    c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
    return first(c.reply())


def test_message_rate_451_at_mail_with_its_decision_line(start, decisions):
    srv = start(max_msg_rate=2)
    c = session(srv.port)
    assert [mail(c) for _ in range(3)] == ["250 2.1.0 ok", "250 2.1.0 ok", TOO_MANY_MSGS]
    c.close()
    check_line(decisions, "msg_rate", "action=tempfail stage=MAIL reason=msg_rate "
               "rule=--max-msg-rate", f'reply="{TOO_MANY_MSGS}"')
    # another session from the same address: still over, in the same window
    c = session(srv.port)
    assert mail(c) == TOO_MANY_MSGS
    c.close()


def test_recipient_rate_451_at_rcpt_and_the_others_are_delivered(start, decisions):
    srv = start(max_rcpt_rate=2)
    c = session(srv.port)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    got = [first(c.cmd(f"RCPT TO:<{u}@example.com>")) for u in ("user", "u2", "u3")]
    assert got == ["250 2.1.5 ok", "250 2.1.5 ok", TOO_MANY_RCPTS]
    assert finish_message(c).startswith("250 ")
    c.close()
    check_line(decisions, "rcpt_rate", "action=tempfail stage=RCPT reason=rcpt_rate "
               "rule=--max-rcpt-rate", "to=<u3@example.com>")


def test_connection_rate_421_at_connect_with_its_decision_line(start, decisions):
    srv = start(max_conn_rate=2)
    for _ in range(2):
        session(srv.port).close()
    c = RawClient(srv.port)
    assert first(c.reply()) == TOO_MANY_CONNS
    assert c.at_eof()
    c.close()
    check_line(decisions, "conn_rate", "action=refuse stage=CONNECT reason=conn_rate "
               "rule=--max-conn-rate", "limit=2 count=3")


def test_tcp_smtp_settings_override_per_client_and_are_named(start, decisions):
    srv = start(max_per_ip=100)
    a = session(srv.port, OWN)
    b = RawClient(srv.port, OWN)            # MAXCONNIP="1"
    assert first(b.reply()) == TOO_MANY_CONNS
    b.close()
    assert mail(a) == "250 2.1.0 ok"
    assert mail(a) == TOO_MANY_MSGS          # MAXMSGRATE="1"
    a.close()
    other = session(srv.port)                # the defaults: no rate
    assert [mail(other) for _ in range(3)] == ["250 2.1.0 ok"] * 3
    other.close()
    rules = [line.split(" rule=")[1].split()[0] for line in decisions()
             if "reason=conn_count" in line or "reason=msg_rate" in line]
    assert len(rules) == 2 and all(r.endswith("tcp.smtp:2") for r in rules)


def test_relay_clients_are_exempt_from_the_rate_defaults(start):
    srv = start(max_msg_rate=1)
    c = session(srv.port, RELAY)
    assert [mail(c) for _ in range(3)] == ["250 2.1.0 ok"] * 3
    c.close()


def test_the_redis_store_shares_the_limits_between_two_servers(start, redis_server, decisions):
    """Two servers, one Redis: the message rate and the connections at once
    are counted across both (each check awaited as a LimitCheck)."""
    a, b = (start(max_msg_rate=3, max_per_ip=2,
                  store=RedisStore(redis_server.url, prefix="s:", timeout=0.5)) for _ in range(2))
    ca, cb = session(a.port), session(b.port)
    got = [mail(c) for c in (ca, cb, ca, cb)]
    assert got == ["250 2.1.0 ok"] * 3 + [TOO_MANY_MSGS]
    third = RawClient(a.port)               # 2 open across both servers already
    assert first(third.reply()) == TOO_MANY_CONNS
    third.close()
    ca.close()
    cb.close()
    assert len(lines_with(decisions, "reason=conn_count")) == 1
    assert int(redis_server.client().get("s:rate:msg:127.0.0.1")) == 4


def test_a_redis_that_is_down_never_refuses_mail(start, decisions):
    srv = start(max_msg_rate=2, store=RedisStore(f"redis://127.0.0.1:{free_port()}/0",
                                                 prefix="s:", timeout=0.2))
    c = session(srv.port)
    assert mail(c) == "250 2.1.0 ok"
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<user@example.com>")) == "250 2.1.5 ok"
    assert finish_message(c).startswith("250 ")
    assert mail(c) == TOO_MANY_MSGS           # the local limit is in force
    c.close()
    assert len(lines_with(decisions, "action=state_fallback")) == 1
    assert srv.state.anvil.store.fallbacks >= 4
