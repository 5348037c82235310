"""serve/config.py: the one option table and what is derived from it (the
argparse flags, the TOML keys, ServeOptions, check_options). Each test walks
the table, so an option added to it is tested without a line here; the
processes that read these options: test_serve.py."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from mailfilter.cli import build_parser
from mailfilter.serve.config import (
    BOOL, BY_NAME, INT, OPTIONS, SECONDS, TABLES, TEXT, Listener, ServeOptions, StartupError,
    check_options, listeners, options_from,
)

IDS = [o.name for o in OPTIONS]
CLI = [o for o in OPTIONS if o.cli]         # the options with a flag ([[listener]] is TOML only)


def parse(*argv, command="serve"):
    return build_parser().parse_args([command, *map(str, argv)])


def subparser(command):
    parser = build_parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    return sub.choices[command]


def good_value(o):
    """A value of the option's kind, range and choices, never its default."""
    if o.choices:
        return next(c for c in reversed(o.choices) if c != o.default)
    if o.metavar == "HOST:PORT" and not o.repeatable:     # --metrics
        return "127.0.0.1:9100"
    if o.repeatable:
        return {"HOST:PORT": ["127.0.0.1:25", "[::1]:2525"],
                "FILE": [f"{o.name}-ec.pem", f"{o.name}-rsa.pem"]}[o.metavar]
    if o.metavar == "CIDRS":
        return "10.0.0.0/8,192.0.2.1"
    if o.kind is TABLES:
        return [{"listen": "127.0.0.1:2526", "tls": "implicit", "proxy_protocol": ["10.0.0.0/8"]}]
    if o.metavar == "local|URL":        # --state: a store, not any text
        return "redis://127.0.0.1:6390/2"
    return {BOOL: True, INT: 7, SECONDS: 7.5, TEXT: "x.example"}[o.kind]


# an option whose value needs another's: --tls-cert and --tls-key pair in order;
# a proxy listener needs the sources its headers may come from
PAIRED = {"tls_cert": "tls_key", "tls_key": "tls_cert",
          "proxy_listen": "proxy_protocol", "proxy_listen_tls": "proxy_protocol"}


def good_values(o) -> dict:
    """The option's good value, with the values of the options it needs."""
    values = {o.name: good_value(o)}
    if o.name in PAIRED:
        values[PAIRED[o.name]] = good_value(BY_NAME[PAIRED[o.name]])
    return values


def wrong_value(o):
    """A TOML value of another type (a string "false" for a boolean: true in Python)."""
    if o.repeatable:
        return 2525
    return {BOOL: "false", INT: "7", SECONDS: "30", TEXT: 1, TABLES: "x"}[o.kind]


def argv_for(o, value) -> list[str]:
    if o.kind is BOOL:
        return [o.flag] if value else []
    values = value if o.repeatable else [value]
    return [x for v in values for x in (o.flag, str(v))]


def toml_line(key, value) -> str:
    # JSON's true/false, numbers, strings and arrays of them are valid TOML;
    # an array of tables is [[key]] sections (they come last in a file)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "".join(f"[[{key}]]\n" + "".join(toml_line(k, v) for k, v in t.items())
                       for t in value)
    return f"{key} = {json.dumps(value)}\n"


def from_file(tmp_path, text, *argv):
    cfg = tmp_path / "serve.toml"
    cfg.write_text(text)
    return options_from(parse("--config", cfg, *argv))


@pytest.mark.parametrize("command", ["serve", "run"])
def test_every_flag_has_help_naming_its_default(command):
    """--help names each default, and the default it names is the one
    ServeOptions has (read back from the help text, in the option's kind)."""
    actions = {a.option_strings[-1]: a for a in subparser(command)._actions if a.option_strings}
    defaults = ServeOptions()
    for flag, action in actions.items():
        if flag == "--help":
            continue
        m = re.search(r"\(default: ([^()]*)\)$", action.help or "")
        assert m, f"{flag}: no default in its help: {action.help!r}"
    for o in CLI:
        shown = re.search(r"\(default: ([^()]*)\)$", actions[o.flag].help).group(1)
        default = getattr(defaults, o.name)
        if o.default_help is not None:
            assert default is None and shown == o.default_help, o.name
        elif o.kind is BOOL:
            assert shown == {False: "off", True: "on"}[default], o.name
        elif o.kind in (INT, SECONDS):
            assert o.kind.annotation(shown) == default, o.name
        elif o.repeatable:
            assert shown.split(", ") == default, o.name
        else:
            assert shown == default, o.name


def test_flags_toml_keys_and_fields_are_the_table():
    """Nothing is declared beside the table: serve's flags are the table's
    (plus --config and --help), ServeOptions' fields are its names."""
    flags = {s for a in subparser("serve")._actions for s in a.option_strings}
    assert flags == {o.flag for o in CLI} | {"--config", "-h", "--help"}
    assert [f.name for f in dataclasses.fields(ServeOptions)] == [o.name for o in OPTIONS]
    assert {o.flag for o in CLI} == {"--" + o.name.replace("_", "-") for o in CLI}


@pytest.mark.parametrize("o", CLI, ids=[o.name for o in CLI])
def test_each_option_from_the_command_line(o):
    value = good_value(o)
    opts = options_from(parse(*[a for name, v in good_values(o).items()
                                for a in argv_for(BY_NAME[name], v)]))
    assert getattr(opts, o.name) == value and type(getattr(opts, o.name)) is type(value)
    check_options(opts)
    if o.kind in (INT, SECONDS):                  # argparse refuses another type
        with pytest.raises(SystemExit):
            parse(o.flag, "seven")
    if o.choices:
        with pytest.raises(SystemExit):
            parse(o.flag, "none-of-them")
    if o.kind is BOOL:                            # a switch takes no value
        with pytest.raises(SystemExit):
            parse(o.flag, "false")


@pytest.mark.parametrize("o", OPTIONS, ids=IDS)
def test_each_option_from_the_config_file(tmp_path, o):
    """Both spellings of the key; the value keeps its kind (an integer
    number of seconds becomes a float); a value of another type is refused
    naming the key as the file spells it."""
    value = good_value(o)
    needed = "".join(toml_line(name, v) for name, v in good_values(o).items() if name != o.name)
    for key in sorted({o.name, o.name.replace("_", "-")}):      # the long option, _ or -
        opts = from_file(tmp_path, toml_line(key, value) + needed)
        assert getattr(opts, o.name) == value and type(getattr(opts, o.name)) is type(value)
        check_options(opts)
        bad = wrong_value(o)
        with pytest.raises(StartupError) as err:
            from_file(tmp_path, toml_line(key, bad))
        assert str(err.value) == (f"--config {tmp_path / 'serve.toml'}: {key} must be "
                                  f"{o.expects()}, not {bad!r}")
    if o.kind is SECONDS:
        assert getattr(from_file(tmp_path, toml_line(o.name, 7)), o.name) == 7.0
        assert type(getattr(from_file(tmp_path, toml_line(o.name, 7)), o.name)) is float
    if o.kind is INT:
        with pytest.raises(StartupError, match=f"{o.name} must be an integer, not 2.5"):
            from_file(tmp_path, toml_line(o.name, 2.5))
    if o.repeatable:                              # one string is a list of one
        assert getattr(from_file(tmp_path, toml_line(o.name, value[0])), o.name) == value[:1]
        with pytest.raises(StartupError, match=f"{o.name} must be"):
            from_file(tmp_path, toml_line(o.name, []))


@pytest.mark.parametrize("o", [o for o in OPTIONS if o.minimum is not None or o.choices],
                         ids=lambda o: o.name)
def test_ranges_and_choices_name_the_flag_wherever_the_value_came_from(tmp_path, o):
    if o.choices:
        bad, message = "none-of-them", f"{o.flag} must be "
    else:
        bad = o.minimum if o.strict else o.minimum - 1
        bad = o.kind.convert(bad)
        message = f"{o.flag} must be {'above' if o.strict else 'at least'} {o.minimum:g}, not {bad!r}"
    with pytest.raises(StartupError) as err:
        check_options(from_file(tmp_path, toml_line(o.name, bad)))
    assert str(err.value).startswith(message)
    if not o.choices:
        with pytest.raises(StartupError) as err:
            check_options(options_from(parse(o.flag, bad)))
        assert str(err.value) == message
        edge = o.kind.convert(o.minimum + 1 if o.strict else o.minimum)
        check_options(from_file(tmp_path, toml_line(o.name, edge)))
    if o.kind is SECONDS:
        for odd in ("nan", "inf"):
            with pytest.raises(StartupError, match=f"{o.flag} must be"):
                check_options(options_from(parse(o.flag, odd)))


@pytest.mark.parametrize("o", OPTIONS, ids=IDS)
def test_options_made_in_code_are_checked_too(o):
    """A ServeOptions made by a caller (tests, bench) gets the same checks
    as one read from the command line or a file."""
    bad = wrong_value(o)
    with pytest.raises(StartupError, match=f"^{re.escape(o.flag)} must be {re.escape(o.expects())}, "):
        check_options(dataclasses.replace(ServeOptions(), **{o.name: bad}))


def test_a_switch_not_given_keeps_the_files_value(tmp_path):
    """`open_relay = true` in the file stays on without --open-relay (a
    switch only switches on); `mailfilter check` passes its own
    open_relay=False the same way."""
    import argparse
    cfg = tmp_path / "serve.toml"
    cfg.write_text("open_relay = true\nsyslog = true\n")
    opts = options_from(parse("--config", cfg))
    assert (opts.open_relay, opts.syslog) == (True, True)
    check = argparse.Namespace(config=str(cfg), auth=None, hostname=None, open_relay=False)
    assert options_from(check).open_relay is True
    assert options_from(argparse.Namespace(open_relay=False)).open_relay is False


def test_unknown_key_and_bad_file(tmp_path):
    with pytest.raises(StartupError, match="unknown setting 'config'"):
        from_file(tmp_path, 'config = "other.toml"\n')          # not a setting of its own
    with pytest.raises(StartupError, match=r"^--config \S+serve.toml: "):
        from_file(tmp_path, "listen = [\n")
    with pytest.raises(StartupError, match=r"^--config \S+missing.toml: "):
        options_from(parse("--config", tmp_path / "missing.toml"))


def test_defaults_without_flags_or_file():
    """The embedded defaults (`mailfilter run`): every field of a
    ServeOptions() is the table's default; a fresh list for each."""
    opts = options_from(parse(command="run"))
    assert opts == ServeOptions()
    for o in OPTIONS:
        assert getattr(opts, o.name) == o.default
    assert opts.listen is not ServeOptions().listen
    check_options(opts)


# ------------------------------------------------------------------ rules between the TLS options
def _checked(*argv):
    check_options(options_from(parse(*argv)))


@pytest.mark.parametrize("argv,message", [
    (["--tls-cert", "a.pem"], "--tls-cert and --tls-key pair in order: 1 --tls-cert and 0 --tls-key given"),
    (["--tls-key", "a.key"], "--tls-cert and --tls-key pair in order: 0 --tls-cert and 1 --tls-key given"),
    (["--tls-cert", "a.pem", "--tls-cert", "b.pem", "--tls-key", "a.key"],
     "--tls-cert and --tls-key pair in order: 2 --tls-cert and 1 --tls-key given"),
    (["--no-tls", "--tls-cert", "a.pem", "--tls-key", "a.key"],
     "--no-tls and --tls-cert: one turns TLS off, the other needs it"),
    (["--no-tls", "--listen-tls", "127.0.0.1:465"],
     "--no-tls and --listen-tls: one turns TLS off, the other needs it"),
    (["--no-tls", "--require-tls"], "--no-tls and --require-tls: one turns TLS off, the other needs it"),
    (["--listen", "127.0.0.1:465", "--listen-tls", "127.0.0.1:465"],
     "--listen-tls 127.0.0.1:465: given twice (also --listen)"),
    (["--listen-tls", "[::1]:465", "--listen-tls", "[::1]:465"],
     "--listen-tls [::1]:465: given twice (also --listen-tls)"),
    (["--workers", "2", "--listen", "127.0.0.1:25", "--listen-tls", "127.0.0.1:0"],
     "--listen-tls 127.0.0.1:0: --workers needs a fixed port (0 picks one per worker)"),
    (["--listen-tls", "465"], "--listen-tls wants HOST:PORT with PORT 0-65535, got '465'"),
])
def test_tls_options_that_contradict_each_other(argv, message):
    with pytest.raises(StartupError) as err:
        _checked(*argv)
    assert str(err.value) == message


def test_tls_options_that_go_together():
    _checked("--tls-cert", "ec.pem", "--tls-key", "ec.key", "--tls-cert", "rsa.pem",
             "--tls-key", "rsa.key", "--require-tls", "--auth-plaintext", "--tls-allow-expired")
    _checked("--no-tls", "--auth-plaintext")          # AUTH in clear without TLS: nothing contradicts
    _checked("--listen", "127.0.0.1:0", "--listen-tls", "127.0.0.1:0")    # two ports picked
    _checked("--next-hop-tls-ca", "ca.pem")           # implies --next-hop-tls-verify


def test_listeners_in_order_with_their_kind():
    opts = options_from(parse("--listen", "127.0.0.1:25", "--listen", "[::]:25",
                              "--listen-tls", ":465", "--listen-tls", "[::1]:465"))
    assert [(ls.where, ls.host, ls.port, ls.implicit_tls, ls.proxy_from) for ls in listeners(opts)] == [
        ("--listen", "127.0.0.1", 25, False, None), ("--listen", "::", 25, False, None),
        ("--listen-tls", "0.0.0.0", 465, True, None), ("--listen-tls", "::1", 465, True, None)]
    assert listeners(ServeOptions()) == [Listener("--listen", "127.0.0.1", 2525)]


LISTENER_TABLES = """
[[listener]]
listen = "0.0.0.0:25"

[[listener]]
listen = "10.0.1.1:2525"
proxy_protocol = ["10.0.0.10", "10.0.0.11/32"]

[[listener]]
listen = "[::]:4650"
tls = "implicit"
proxy-protocol = "10.0.0.0/24,2001:db8::/64"
"""


def test_listener_tables_each_with_its_own_balancers(tmp_path):
    """[[listener]] tables (TOML only): each address says what it speaks
    first; with tables and no `listen` the default address is not used."""
    import ipaddress
    opts = from_file(tmp_path, LISTENER_TABLES)
    check_options(opts)
    assert opts.listen == []
    got = listeners(opts)
    assert [(ls.where, ls.host, ls.port, ls.implicit_tls) for ls in got] == [
        ("[[listener]] #1", "0.0.0.0", 25, False), ("[[listener]] #2", "10.0.1.1", 2525, False),
        ("[[listener]] #3", "::", 4650, True)]
    assert got[0].proxy_from is None
    assert got[1].proxy_from == (ipaddress.ip_network("10.0.0.10/32"), ipaddress.ip_network("10.0.0.11/32"))
    assert got[1].proxy_text == "10.0.0.10,10.0.0.11/32"
    assert got[2].proxy_from == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::/64"))
    # `listen` given as well (in the file or on the command line): both are served
    opts = from_file(tmp_path, 'listen = "127.0.0.1:2500"\n' + LISTENER_TABLES)
    assert [ls.port for ls in listeners(opts)] == [2500, 25, 2525, 4650]
    opts = from_file(tmp_path, LISTENER_TABLES, "--listen", "127.0.0.1:2501")
    assert [ls.port for ls in listeners(opts)] == [2501, 25, 2525, 4650]


@pytest.mark.parametrize("table,message", [
    ('port = "0.0.0.0:25"', "[[listener]] #1: unknown key 'port' (keys: listen, tls, proxy_protocol)"),
    ('tls = "implicit"', '[[listener]] #1: listen = "HOST:PORT" is required'),
    ('listen = "0.0.0.0"', "[[listener]] #1 wants HOST:PORT with PORT 0-65535, got '0.0.0.0'"),
    ('listen = ":25"\ntls = "starttls-maybe"', "[[listener]] #1: tls must be starttls or implicit, "
                                               "not 'starttls-maybe'"),
    ('listen = ":25"\nproxy_protocol = "10.0.0.0/33"',
     "[[listener]] #1 proxy_protocol '10.0.0.0/33': not an address or CIDR"),
    ('listen = ":25"\nproxy_protocol = []', "[[listener]] #1 proxy_protocol: no network given"),
    ('listen = ":25"\nproxy_protocol = 10', "[[listener]] #1: proxy_protocol must be CIDRs, a "
                                            "string or a list"),
])
def test_a_bad_listener_table_names_itself(tmp_path, table, message):
    with pytest.raises(StartupError) as err:
        check_options(from_file(tmp_path, "[[listener]]\n" + table + "\n"))
    assert str(err.value) == message


def test_listener_tables_against_the_other_options(tmp_path):
    with pytest.raises(StartupError, match=r"^\[\[listener\]\] #2 0.0.0.0:25: given twice "
                                           r"\(also \[\[listener\]\] #1\)$"):
        check_options(from_file(tmp_path, '[[listener]]\nlisten = ":25"\n[[listener]]\nlisten = ":25"\n'))
    with pytest.raises(StartupError, match=r"^--no-tls and \[\[listener\]\] #1: one turns TLS off"):
        check_options(from_file(tmp_path, 'no_tls = true\n[[listener]]\nlisten = ":465"\ntls = "implicit"\n'))


def test_tls_defaults():
    """TLS is on by default with the embedded certificate (no pair given)."""
    opts = ServeOptions()
    assert (opts.no_tls, opts.tls_cert, opts.tls_key, opts.listen_tls) == (False, None, None, None)
    assert (opts.tls_min_version, opts.tls_handshake_timeout) == ("TLSv1.2", 30.0)
    assert not (opts.require_tls or opts.auth_plaintext or opts.tls_allow_expired
                or opts.next_hop_tls_verify or opts.next_hop_tls_ca)


def test_the_limit_and_auth_options_reach_what_serves(tmp_path):
    """Every auth_* option is the AuthConfig field of its name; the anvil's
    defaults and store are the limit options'."""
    from mailfilter.auth.session import AuthConfig
    from mailfilter.serve.lifecycle import build_state
    from tests.support.server_harness import write_rules
    values = {f"auth_{f.name}": (7 if f.type == "int" else 7.5) for f in dataclasses.fields(AuthConfig)}
    opts = ServeOptions(rules=write_rules(tmp_path / "rules"), deliver="discard", no_tls=True,
                        remote_host="off", max_per_ip=9, max_conn_rate=3, max_msg_rate=4,
                        max_rcpt_rate=5, rate_window=30.0, rate_relay_clients=True, **values)
    state = build_state(opts)
    assert dataclasses.asdict(state.auth.config) == {k[5:]: v for k, v in values.items()}
    cfg = state.anvil.config
    assert (cfg.max_per_ip, cfg.max_conn_rate, cfg.max_msg_rate, cfg.max_rcpt_rate, cfg.window,
            cfg.relay_exempt) == (9, 3, 4, 5, 30.0, False)
    assert not state.anvil.shared and state.auth.shared is None
    with pytest.raises(StartupError, match="--state 'memcached://h:1': give local or a redis://"):
        build_state(dataclasses.replace(opts, state="memcached://h:1"))
