"""serve's DATA limit options reach the sessions: --data-min-rate,
--data-rate-window, --data-deadline (smtp/protocol.py's Limits) and
--header-size-limit (the engine's DATA byte machine), from the command line
through options_from, as an operator gives them."""
from __future__ import annotations

import argparse
import logging

from mailfilter.cli import build_parser
from mailfilter.policy.engine import Client
from mailfilter.serve.config import options_from
from mailfilter.serve.lifecycle import build_state
from mailfilter.smtp.session import Session
from tests.support.server_harness import write_rules


def opts_for(tmp_path, *args):
    rules = write_rules(tmp_path / "rules")
    ns = build_parser().parse_args(["serve", "--rules", rules, "--deliver", "discard", "--no-tls",
                                    "--remote-host", "off", *args])
    assert isinstance(ns, argparse.Namespace)
    return options_from(ns)


def test_data_limits_reach_the_server_state(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mailfilter")
    logging.getLogger("mailfilter").propagate = True
    state = build_state(opts_for(tmp_path, "--data-min-rate", "100", "--data-rate-window", "10",
                                 "--data-deadline", "60", "--header-size-limit", "200"))
    lim = state.limits
    assert (lim.data_min_rate, lim.data_rate_window, lim.data_deadline, lim.header_size_limit) == \
        (100.0, 10.0, 60.0, 200)
    assert state.session_config.engine_config.header_limit == 200
    # a session made from that state cuts a 1000-octet header block at 200
    s = Session(state.session_config, Client(ip="127.0.0.1", port=4000))
    s.start()
    s.receive_data(b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
                   b"X-Long: " + b"z" * 1000 + b"\r\n\r\nbody\r\n.\r\n")
    assert s.drain() is None
    assert s.data_to_send().decode().splitlines()[-1].startswith("250")
    [line] = [r.getMessage() for r in caplog.records if "stage=DATA" in r.getMessage()]
    assert "header_cut=yes" in line


def test_defaults(tmp_path):
    lim = build_state(opts_for(tmp_path)).limits
    assert (lim.data_min_rate, lim.data_rate_window, lim.data_deadline, lim.header_size_limit) == \
        (500.0, 60.0, 1800.0, 102400)
