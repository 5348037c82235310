"""limits/local.py and limits/anvil.py: the local store's counts and which
limit applies to which client (tcp.smtp settings over the options)."""
from mailfilter.limits.anvil import LIMITS, Anvil, LimitsConfig
from mailfilter.limits.local import LocalStore
from mailfilter.policy.verdict import Client
from mailfilter.rules.format import KNOWN_SETTINGS, NUMERIC_SETTINGS
from tests.support.server_harness import policy_for, write_rules


def test_connect_counts_at_once_and_per_window_and_gives_slots_back():
    store = LocalStore(60.0)
    assert store.connect("k", 2, 0) == (True, 1, 0)
    assert store.connect("k", 2, 0) == (True, 2, 0)
    assert store.connect("k", 2, 0) == (False, 2, 0)      # refused: nothing taken
    store.disconnect("k")
    assert store.connect("k", 2, 0) == (True, 2, 0)
    store.disconnect("k")
    store.disconnect("k")
    assert store.conns == {}
    # the rate: the third connection in the window is over 2
    assert store.connect("r", 0, 2)[0] and store.connect("r", 0, 2)[0]
    assert store.connect("r", 0, 2) == (False, 2, 3)


def test_every_limit_has_a_known_numeric_tcp_smtp_setting():
    for lim in LIMITS:
        assert lim.setting in KNOWN_SETTINGS and lim.setting in NUMERIC_SETTINGS


def _anvil_and_policy(tmp_path, cfg):
    rules = write_rules(tmp_path / "rules", {"tcp.smtp": (
        '127.0.0.20:allow,MAXMSGRATE="3",MAXCONNIP="0"\n'
        '127.0.0.21:allow,RELAYCLIENT=""\n'
        '127.0.0.22:allow,RELAYCLIENT="",MAXRCPTRATE="5"\n'
        ':allow\n')})
    return Anvil(cfg, LocalStore()), policy_for(rules)


def _limits(anvil, policy, ip):
    return anvil.for_client(policy.client_profile(Client(ip=ip, port=1)), policy.where)


def test_tcp_smtp_settings_override_the_options_and_name_their_line(tmp_path):
    anvil, policy = _anvil_and_policy(tmp_path, LimitsConfig(max_per_ip=10, max_msg_rate=100,
                                                             max_rcpt_rate=7))
    own = _limits(anvil, policy, "127.0.0.20")
    assert (own.conn_count, own.msg_rate, own.rcpt_rate) == (0, 3, 7)
    assert own.rule("msg_rate").endswith("tcp.smtp:1") and own.rule("rcpt_rate") == "--max-rcpt-rate"
    other = _limits(anvil, policy, "127.0.0.99")
    assert (other.conn_count, other.msg_rate, other.conn_rate) == (10, 100, 0)
    assert other.rule("conn_count") == "--max-per-ip"


def test_relay_clients_skip_the_rate_defaults_not_their_own_settings(tmp_path):
    cfg = LimitsConfig(max_per_ip=10, max_conn_rate=50, max_msg_rate=100, max_rcpt_rate=7)
    anvil, policy = _anvil_and_policy(tmp_path, cfg)
    relay = _limits(anvil, policy, "127.0.0.21")
    assert (relay.conn_count, relay.conn_rate, relay.msg_rate, relay.rcpt_rate) == (10, 0, 0, 0)
    own = _limits(anvil, policy, "127.0.0.22")
    assert own.rcpt_rate == 5 and own.msg_rate == 0
    counted = Anvil(LimitsConfig(max_msg_rate=100, relay_exempt=False), LocalStore())
    assert _limits(counted, policy, "127.0.0.21").msg_rate == 100


def test_over_is_synchronous_with_the_local_store():
    anvil = Anvil(LimitsConfig(), LocalStore())
    answers = [anvil.over("msg", "k", 2) for _ in range(3)]
    assert answers == [False, False, True]
    assert anvil.over("rcpt", "k", 2) is False        # each kind counts apart
    assert anvil.member() is None and not anvil.shared


def test_check_names_a_clients_tcp_smtp_limits(tmp_path):
    from mailfilter.check import run_check
    from mailfilter.rules import bundle as bundle_mod
    from mailfilter.rules import compiler
    rules = write_rules(tmp_path / "rules", {"tcp.smtp": (
        '127.0.0.20:allow,MAXMSGRATE="3",MAXCONNIP="0"\n:allow\n')})
    bundle = bundle_mod.from_compiled(compiler.compile_dir(rules))
    [connect] = run_check(bundle, ip="127.0.0.20").stages
    assert "limits per client (tcp.smtp:1): MAXCONNIP=0, MAXMSGRATE=3" in connect.note
    [other] = run_check(bundle, ip="127.0.0.21").stages
    assert "limits" not in (other.note or "")
