"""docs/operations.md#start-up: once it listens, `serve` logs what is in
force (rules and their fingerprint, the next hop, AUTH and its user
database, the limits, the pid to signal), from the objects that serve."""
from __future__ import annotations

import os

import pytest

from mailfilter.rules import bundle as bundle_mod

from tests.support.auth_helpers import make_userdb
from tests.support.server_harness import run_cli, spawn_serve, write_rules


@pytest.fixture
def rules(tmp_path):
    return write_rules(tmp_path / "rules")


def test_single_process_lines(tmp_path, rules):
    out = tmp_path / "rules.mfb"
    assert run_cli("compile", rules, "-o", str(out)).returncode == 0
    fingerprint = bundle_mod.load(str(out)).fingerprint.hex()[:16]
    sp = spawn_serve("--bundle", str(out), "--deliver", f"maildir:{tmp_path}/spool",
                     "--max-per-ip", "7", "--timeout", "40", "--deny", "rcpt")
    try:
        [rules_line] = sp.log.wait_for(r"INFO rules: (\d+) rules from bundle (\S+) \(dialect "
                                       r"spamcontrol, fingerprint (\w+), tcp\.smtp present\)")
        assert rules_line.group(2) == str(out) and rules_line.group(3) == fingerprint
        sp.log.wait_for(rf"INFO deliver: maildir:{tmp_path}/spool$")
        sp.log.wait_for(r"INFO auth: off \(per tcp\.smtp SMTPAUTH only\)$")
        sp.log.wait_for(r"INFO ehlo: PIPELINING, CHUNKING, SIZE \d+, 8BITMIME, "
                        r"ENHANCEDSTATUSCODES, SMTPUTF8; per client: ")
        [limits] = sp.log.wait_for(r"INFO limits: (\d+) sessions, 7 per client address, idle "
                                   r"timeout 40 s, .*tcp\.smtp deny: rcpt$")
        sp.log.wait_for(r"INFO state: local \(each process counts for itself\); per client "
                        r"address: 7 connections at once, per 60 s: connections off, messages "
                        r"off, recipients off \(RELAYCLIENT clients exempt\)")
        sp.log.wait_for(rf"INFO signals: pid {sp.proc.pid}: HUP reloads rules and certificates, "
                        r"TERM stops$")
    finally:
        sp.stop()


def test_the_ehlo_line_says_smtputf8_is_off(tmp_path, rules):
    sp = spawn_serve("--rules", rules, "--deliver", "discard", "--no-smtputf8")
    try:
        [line] = sp.log.wait_for(r"INFO ehlo: (.*); per client")
        assert line.group(1).split(", ")[-1] == "ENHANCEDSTATUSCODES"
    finally:
        sp.stop()


def test_the_state_line_names_a_redis_store_and_the_rates(tmp_path, rules):
    """A Redis that is not there is no start-up error: the line names it,
    the server serves (on local counts until it answers)."""
    sp = spawn_serve("--rules", rules, "--deliver", "discard", "--max-msg-rate", "30",
                     "--rate-window", "120", "--rate-relay-clients",
                     "--state", "redis://:secret@127.0.0.1:1/3", "--state-prefix", "mx1:")
    try:
        sp.log.wait_for(r"INFO state: Redis redis://:\*\*\*@127\.0\.0\.1:1/3 \(prefix 'mx1:', "
                        r"timeout 0\.1 s; .*per 120 s: connections off, messages 30, recipients "
                        r"off \(RELAYCLIENT clients counted\)")
        assert "secret" not in sp.log.text()
    finally:
        sp.stop()


def test_a_missing_user_database_is_a_start_up_warning(tmp_path, rules):
    missing = tmp_path / "nope" / "users.db"
    sp = spawn_serve("--rules", rules, "--deliver", "discard", "--auth", "", "--userdb", str(missing))
    try:
        sp.log.wait_for(rf"WARNING auth: --auth '' for every client; the user database {missing} "
                        r"does not exist: every AUTH will be answered 454")
    finally:
        sp.stop()
    db = make_userdb(tmp_path / "users.db")
    sp = spawn_serve("--rules", rules, "--deliver", "discard", "--auth", "", "--userdb", str(db))
    try:
        sp.log.wait_for(rf"INFO auth: --auth '' for every client; user database {db}$")
        assert "does not exist" not in sp.log.text()
    finally:
        sp.stop()


def test_workers_name_the_parent_to_signal(tmp_path, rules):
    sp = spawn_serve("--rules", rules, "--deliver", "discard", "--workers", "2", listening=2)
    try:
        lines = sp.log.wait_for(r"INFO signals: 2 workers; signal the parent, pid (\d+):", count=2)
        assert {int(m.group(1)) for m in lines} == {sp.proc.pid}
    finally:
        sp.stop()
