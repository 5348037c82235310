"""policy/rcpt.py: the RCPT stage as data. The docstring's table is the
table the code runs; every check fires on its own where it should; the
per-profile plans (rows that cannot fire are skipped) answer exactly like
the full table; the policy modules import each other without a cycle."""
import ast
import pathlib
import random
import re

import pytest

import mailfilter.policy
from mailfilter.policy import engine as engine_mod, rcpt
from mailfilter.policy.engine import DNS_FAIL, DNS_NULLMX, DNS_OK, DNS_TEMP, Client, PolicyEngine
from mailfilter.policy.engine import PolicyOptions
from mailfilter.rules import bundle, compiler


def compiled(tmp_path, files: dict[str, str]):
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    files = {"rcpthosts": "example.com\n", **files}
    for name, text in files.items():
        (d / name).write_text(text)
    c = compiler.compile_dir(str(d))
    assert c.diagnostics == []
    return bundle.from_compiled(c)


def options():
    return PolicyOptions(is_local_ip=lambda ip: ip == "192.0.2.1")


class Without(PolicyEngine):
    """An engine whose plans leave out the named rows (and nothing else)."""

    def __init__(self, b, names):
        self.left_out = set(names)
        super().__init__(b, options())

    def profile(self, rule_id):
        prof = super().profile(rule_id)
        for attr in ("rcpt_plans", "relay_rcpt_plans"):
            plans = getattr(prof, attr)
            keep = {c.run for c in rcpt.RCPT_CHECKS if c.name not in self.left_out}
            setattr(prof, attr, tuple(tuple(f for f in p if f in keep) for p in plans))
        return prof


class FullTable(PolicyEngine):
    """An engine that runs every row for every client and state, the split
    horizon alone deciding which (no profile or state pruning)."""

    def profile(self, rule_id):
        prof = super().profile(rule_id)
        for attr, relay in (("rcpt_plans", False), ("relay_rcpt_plans", True)):
            full = tuple(c.run for c in rcpt.RCPT_CHECKS if c.relay or not relay)
            setattr(prof, attr, (full,) * rcpt.STATES)
        return prof


def drive(eng, ip, actions):
    """Run `actions` on a new session; the Verdicts returned, in order."""
    s = eng.session(Client(ip=ip, host="mail.client.example"))
    out = []
    for op, arg in actions:
        if op == "helo_dns":
            s.set_helo_dns(arg)
        elif op == "mail_dns":
            s.set_mail_dns(arg)
        elif op == "auth":
            s.auth_success(arg)
        elif op == "reset":
            s.reset()
        elif op == "data":
            out.append(s.data())
        else:
            out.append(getattr(s, op)(arg))
    return s, out


# -- the docstring's table

def table_rows(doc: str) -> list[list[str]]:
    rows = []
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_docstring_table_is_the_table_the_code_runs():
    rows = table_rows(rcpt.__doc__)
    assert [r[1] for r in rows] == [c.name for c in rcpt.RCPT_CHECKS]
    assert [int(r[0]) for r in rows] == list(range(1, len(rcpt.RCPT_CHECKS) + 1))
    needs = {"-": 0, "HELO": rcpt.KEPT_HELO, "MAIL": rcpt.KEPT_MAIL, "history": rcpt.HISTORY}
    for row, check in zip(rows, rcpt.RCPT_CHECKS):
        assert row[2].rstrip("*") in ("all", "non-relay"), row
        assert (row[2].rstrip("*") == "all") == check.relay, row
        assert needs[row[3]] == check.needs, row
    assert len({c.run for c in rcpt.RCPT_CHECKS}) == len(rcpt.RCPT_CHECKS)


def test_table_parser_sees_a_changed_order():
    """The check above can fail: swapping two rows is noticed."""
    doc = rcpt.__doc__.replace("| 7  | rcpthosts ", "| 7  | recipients").replace(
        "| 10 | recipients", "| 10 | rcpthosts ")
    assert [r[1] for r in table_rows(doc)] != [c.name for c in rcpt.RCPT_CHECKS]


# -- each check fires on its own

HELO, MAIL = ("helo", "mx.sender.example"), ("mail", "a@sender.example")

# name: (files, client ip, actions (the last one is the RCPT looked at), reason)
FIRES = {
    "client_denied": ({"tcp.smtp": "203.0.113.5:deny\n"}, "203.0.113.5",
                      [HELO, MAIL, ("rcpt", "u@example.com")], "client_denied"),
    "auth_required": ({"tcp.smtp": ':allow,SMTPAUTH="!"\n'}, "203.0.113.5",
                      [HELO, MAIL, ("rcpt", "u@example.com")], "auth_required"),
    "helo_missing": ({"tcp.smtp": ':allow,HELOCHECK="!"\n'}, "203.0.113.5",
                     [MAIL, ("rcpt", "u@example.com")], "helo_missing"),
    "bad_helo": ({"badhelo": "localhost\n", "tcp.smtp": ':allow,HELOCHECK=""\n'}, "203.0.113.5",
                 [("helo", "localhost"), MAIL, ("rcpt", "u@example.com")], "bad_helo"),
    "bad_helo/qregex relay": ({"dialect": "qregex\n", "badhelo": "^bad\\.example$\n",
                               "tcp.smtp": '127.0.0.2:allow,RELAYCLIENT=""\n'}, "127.0.0.2",
                              [("helo", "bad.example"), MAIL, ("rcpt", "x@far.example")], "bad_helo"),
    "helo_dns": ({"tcp.smtp": ':allow,HELOCHECK="A"\n'}, "203.0.113.5",
                 [HELO, ("helo_dns", DNS_FAIL), MAIL, ("rcpt", "u@example.com")], "helo_dns"),
    "sender_dns": ({"tcp.smtp": ':allow,MFDNSCHECK=""\n'}, "203.0.113.5",
                   [HELO, MAIL, ("mail_dns", DNS_NULLMX), ("rcpt", "u@example.com")],
                   "mf_dns_null_mx"),
    "rcpthosts": ({}, "203.0.113.5", [HELO, MAIL, ("rcpt", "u@far.example")], "rcpthosts"),
    "routing": ({}, "203.0.113.5", [HELO, MAIL, ("rcpt", "u%far.example@example.com")], "routing"),
    "routing/bang": ({}, "203.0.113.5", [HELO, MAIL, ("rcpt", "far.example!u@example.com")],
                     "routing"),
    "routing/at": ({}, "203.0.113.5", [HELO, MAIL, ("rcpt", "u@far.example@example.com")],
                   "routing"),
    "tarpit_limit": ({"recipients": "u@example.com\n",
                      "tcp.smtp": ':allow,TARPITCOUNT="1",TARPITDELAY="0"\n'}, "203.0.113.5",
                     [HELO, MAIL, ("rcpt", "nobody@example.com"), ("rcpt", "u@example.com")],
                     "too_many_failed_rcpts"),
    "tarpit_delay": ({"tcp.smtp": ':allow,TARPITCOUNT="1",TARPITDELAY="3"\n'}, "203.0.113.5",
                     [HELO, MAIL, ("rcpt", "u@example.com"), ("rcpt", "v@example.com")], None),
    "recipients": ({"recipients": "u@example.com\n"}, "203.0.113.5",
                   [HELO, MAIL, ("rcpt", "nobody@example.com")], "no_mailbox"),
    "badmailfrom": ({"badmailfrom": "@spam.example\n"}, "203.0.113.5",
                    [HELO, ("mail", "x@spam.example"), ("rcpt", "u@example.com")], "badmailfrom"),
    "badrcptto": ({"badrcptto": "bad@example.com\n"}, "203.0.113.5",
                  [HELO, MAIL, ("rcpt", "bad@example.com")], "badrcptto"),
    "badrcptto/qregex norelay": ({"dialect": "qregex\n", "badrcpttonorelay": "^bad@\n"},
                                 "203.0.113.5", [HELO, MAIL, ("rcpt", "bad@example.com")],
                                 "badrcptto"),
    "max_recipients": ({"tcp.smtp": ':allow,MAXRECIPIENTS="1"\n'}, "203.0.113.5",
                       [HELO, MAIL, ("rcpt", "u@example.com"), ("rcpt", "v@example.com")],
                       "too_many_rcpts"),
}


def test_every_check_has_a_case():
    assert {k.split("/")[0] for k in FIRES} == {c.name for c in rcpt.RCPT_CHECKS}


@pytest.mark.parametrize("case", sorted(FIRES))
def test_check_fires_alone(tmp_path, case):
    """With the full table the RCPT is refused for the check's reason (or,
    tarpit_delay, answered late); with only that row left out it is
    accepted at once: no other row would have refused it."""
    files, ip, actions, reason = FIRES[case]
    b = compiled(tmp_path, files)
    _, out = drive(PolicyEngine(b, options()), ip, actions)
    v = out[-1]
    if reason is None:
        assert (v.accept, v.delay) == (True, 3.0), v
    else:
        assert (v.accept, v.reason, v.stage, v.delay) == (False, reason, "RCPT", 0.0), v
    _, out = drive(Without(b, [case.split("/")[0]]), ip, actions)
    assert (out[-1].accept, out[-1].delay) == (True, 0.0), out[-1]


def test_badrcpttonorelay_spares_relay_clients(tmp_path):
    b = compiled(tmp_path, {"dialect": "qregex\n", "badrcpttonorelay": "^bad@\n",
                            "badrcptto": "^worse@\n", "tcp.smtp": '127.0.0.2:allow,RELAYCLIENT=""\n'})
    eng = PolicyEngine(b, options())
    _, out = drive(eng, "127.0.0.2", [HELO, MAIL, ("rcpt", "bad@example.com"),
                                      ("rcpt", "worse@example.com")])
    assert out[-2].accept and out[-2].reason == "relay_client"
    assert (out[-1].accept, out[-1].reason) == (False, "badrcptto")


def test_recipient_rule(tmp_path):
    b = compiled(tmp_path, {"recipients": "u@example.com\n!example.org\n",
                            "rcpthosts": "example.com\nexample.org\n"})
    eng = PolicyEngine(b, options())
    assert rcpt.NOT_CHECKED < 0 and rcpt.NOT_LISTED < 0 and rcpt.NOT_CHECKED != rcpt.NOT_LISTED
    assert rcpt.recipient_rule(eng, "postmaster") == rcpt.NOT_CHECKED
    assert rcpt.recipient_rule(eng, "nobody@example.com") == rcpt.NOT_LISTED
    assert eng.where(rcpt.recipient_rule(eng, "U@example.com")) == "recipients:1"
    assert eng.where(rcpt.recipient_rule(eng, "x@example.org")) == "recipients:2"


# -- plans answer like the full table

SPAMCONTROL = {
    "rcpthosts": "example.com\nexample.net\n",
    "badhelo": "localhost\n.bad.example\n!ok.bad.example\nok.example!\n",
    "badmailfrom": "@spam.example\n?vip@spam.example\n!boss@spam.example\n",
    "badrcptto": "bad@example.com\n*%*\n",
    "recipients": "u@example.com\nlist-@example.com\n@example.net\n",
    "relaymailfrom": "@partner.example\n",
    "tcp.smtp": ("10.0.0.1:deny\n"
                 '10.0.0.2:allow,SMTPAUTH="!"\n'
                 '10.0.0.3:allow,HELOCHECK="!",MAXRECIPIENTS="2"\n'
                 '10.0.0.4:allow,HELOCHECK="A",MFDNSCHECK=""\n'
                 '10.0.0.5:allow,TARPITCOUNT="2",TARPITDELAY="3",RECIPIENTS450=""\n'
                 '10.0.0.6:allow,TARPITCOUNT="1",TARPITDELAY="999",HELOCHECK="="\n'
                 '10.0.0.7:allow,RELAYCLIENT="@fix",MAXRECIPIENTS="3"\n'
                 '10.0.0.8:allow,RELAYMAILFROM="",DISABLE_BADMAILFROM="",HELOCHECK="."\n'
                 ':allow,HELOCHECK="",MAXRECIPIENTS="4"\n'),
}
QREGEX = {
    "dialect": "qregex\n",
    "rcpthosts": "example.com\n",
    "badhelo": "^bad\\.\n",
    "badhelonorelay": "^local",
    "badmailfrom": "^spam@\n",
    "badmailfromnorelay": "@spam\\.example$\n",
    "badrcptto": "^bad@\n",
    "badrcpttonorelay": "^norelay@\n",
    "recipients": "u@example.com\nbad@example.com\nnorelay@example.com\n",
    "tcp.smtp": ('10.0.0.1:allow,RELAYCLIENT="",NOBADHELO=""\n'
                 '10.0.0.2:allow,RELAYCLIENT=""\n'
                 '10.0.0.3:allow,HELOCHECK="M",MAXRECIPIENTS="2",TARPITCOUNT="1",TARPITDELAY="2"\n'
                 ':allow\n'),
}
HELOS = ["localhost", "mx.bad.example", "ok.bad.example", "OK.example", "bad.example", "local",
         "", "mail.client.example", "mx.good.example"]
SENDERS = ["", "x@spam.example", "vip@spam.example", "boss@spam.example", "a@partner.example",
           "spam@x.example", "a@good.example", "u@[192.0.2.1]"]
RCPTS = ["u@example.com", "nobody@example.com", "bad@example.com", "a%b@example.com",
         "list-x@example.com", "any@example.net", "x@far.example", "postmaster", "someone",
         "norelay@example.com", "u@[192.0.2.1]", "u@[192.0.2.9]"]
STATUSES = [DNS_OK, DNS_FAIL, DNS_TEMP, DNS_NULLMX]


def random_actions(r: random.Random, n: int) -> list[tuple[str, object]]:
    out = []
    for _ in range(n):
        x = r.random()
        if x < 0.15:
            out.append(("helo", r.choice(HELOS)))
        elif x < 0.3:
            out.append(("mail", r.choice(SENDERS)))
        elif x < 0.75:
            out.append(("rcpt", r.choice(RCPTS)))
        elif x < 0.82:
            out.append(("helo_dns", r.choice(STATUSES)))
        elif x < 0.89:
            out.append(("mail_dns", r.choice(STATUSES)))
        elif x < 0.92:
            out.append(("auth", "alice"))
        elif x < 0.96:
            out.append(("reset", None))
        else:
            out.append(("data", None))
    return out


def fields(v):
    return (v.stage, v.accept, v.reply, v.reason, v.rule, v.delay, v.close, v.recipient)


def state(s):
    return (s.failed_recipients, s.notorious, s.accepted, s.rcpt_count, s.sender,
            s.sender_verdict, s.helo_verdict, s.authenticated)


@pytest.mark.parametrize("files", [SPAMCONTROL, QREGEX], ids=["spamcontrol", "qregex"])
def test_plans_answer_like_the_full_table(tmp_path, files):
    """Random sessions, every client line: the pruned plans give the same
    Verdicts and leave the same session state as running every row."""
    b = compiled(tmp_path, dict(files))
    pruned, full = PolicyEngine(b, options()), FullTable(b, options())
    r = random.Random(11)
    ips = [f"10.0.0.{i}" for i in range(1, 9)] + ["203.0.113.5"]
    refused = set()
    for _ in range(600):
        ip, actions = r.choice(ips), random_actions(r, r.randint(1, 14))
        s1, out1 = drive(pruned, ip, actions)
        s2, out2 = drive(full, ip, actions)
        assert [fields(v) for v in out1] == [fields(v) for v in out2], (ip, actions)
        assert state(s1) == state(s2), (ip, actions)
        refused |= {v.reason for v in out1 if not v.accept and v.stage == "RCPT"}
    # the sessions did reach most rows
    assert len(refused) >= (10 if files is SPAMCONTROL else 5), refused


def test_plans_skip_what_cannot_fire(tmp_path):
    b = compiled(tmp_path, {"tcp.smtp": '127.0.0.1:allow,RELAYCLIENT=""\n:allow,MAXRECIPIENTS="9"\n'})
    eng = PolicyEngine(b, options())
    names = {c.run: c.name for c in rcpt.RCPT_CHECKS}
    other = eng.session(Client(ip="203.0.113.5")).profile
    assert [names[f] for f in other.rcpt_plans[0]] == ["rcpthosts", "routing"]   # no badrcptto file
    assert [names[f] for f in other.rcpt_plans[rcpt.STATES - 1]] == [
        "bad_helo", "helo_dns", "sender_dns", "rcpthosts", "routing", "badmailfrom",
        "max_recipients"]
    # --allow-untrusted-routing: the row is not in the plans at all
    lax = PolicyEngine(b, PolicyOptions(is_local_ip=lambda ip: ip == "192.0.2.1", allow_routing=True))
    assert [names[f] for f in lax.session(Client(ip="203.0.113.5")).profile.rcpt_plans[0]] == [
        "rcpthosts"]
    relay = eng.session(Client(ip="127.0.0.1")).profile
    assert [names[f] for f in relay.relay_rcpt_plans[rcpt.STATES - 1]] == ["badmailfrom"]
    assert relay.relay_rcpt_plans[0] == ()
    # profiles with the same rows share their plans
    assert eng.session(Client(ip="198.51.100.1")).profile.rcpt_plans is other.rcpt_plans


# -- module structure

def test_policy_modules_import_without_cycles():
    """Run-time imports between the policy modules form no cycle (imports
    under `if TYPE_CHECKING:` are for annotations only)."""
    root = pathlib.Path(mailfilter.policy.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.parse(path.read_text()).body:       # top level only
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "mailfilter.policy":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("mailfilter.policy."):
                    deps.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = deps
    done, path_ = set(), []

    def visit(m):
        assert m not in path_, "cycle: " + " -> ".join(path_ + [m])
        if m in done:
            return
        path_.append(m)
        for d in graph.get(m, ()):
            visit(d)
        path_.pop()
        done.add(m)

    for m in graph:
        visit(m)
    assert graph["session"] >= {"rcpt", "verdict"} and "engine" not in graph["session"]


def test_old_names_still_import_from_engine():
    from mailfilter.policy import localip, profile, session, verdict
    assert engine_mod.Verdict is verdict.Verdict and engine_mod.Client is verdict.Client
    assert (engine_mod.DNS_OK, engine_mod.DNS_FAIL, engine_mod.DNS_TEMP, engine_mod.DNS_NULLMX) == (
        verdict.DNS_OK, verdict.DNS_FAIL, verdict.DNS_TEMP, verdict.DNS_NULLMX)
    assert engine_mod.pack_ip is localip.pack_ip
    assert engine_mod.ClientProfile is profile.ClientProfile
    assert engine_mod.SessionPolicy is session.SessionPolicy


def test_no_magic_sentinels_left():
    """Named constants instead of bare -1/-2 in the policy's code."""
    root = pathlib.Path(mailfilter.policy.__file__).parent
    for name in ("engine", "session", "rcpt", "profile"):
        code = [line.split("#")[0] for line in (root / f"{name}.py").read_text().splitlines()]
        hits = [line for line in code if re.search(r"(return|[=<>]|\{)\s*-[12]\b", line)
                and not re.match(r"[A-Z_]+ = ", line)]          # the constants' definitions
        assert hits == [], (name, hits)


def test_routing_source_route_relay_clients_and_the_option(tmp_path):
    """docs/behaviour/control-files.md#routing: a source route the engine
    dropped counts like % ! @ in the local part; relay clients may route;
    allow_routing lets everyone."""
    b = compiled(tmp_path, {"tcp.smtp": '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'})
    eng = PolicyEngine(b, options())
    s = eng.session(Client(ip="203.0.113.5"))
    s.helo("mx.far.example")
    s.mail("a@far.example")
    assert s.rcpt("u@example.com").accept
    v = s.rcpt("u@example.com", routed=True)
    assert (v.accept, v.reason, v.rule, v.reply.code) == (False, "routing", "routing", 553)
    for form in ("u%far.example@example.com", "far.example!u@example.com", "far.example!u",
                 "u@far.example@example.com"):
        assert s.rcpt(form).reason == "routing", form
    relay = eng.session(Client(ip="127.0.0.1"))
    relay.mail("a@far.example")
    assert relay.rcpt("u%far.example@example.com").accept
    assert relay.rcpt("u@example.com", routed=True).accept
    lax = PolicyEngine(b, PolicyOptions(is_local_ip=lambda ip: ip == "192.0.2.1", allow_routing=True))
    s = lax.session(Client(ip="203.0.113.5"))
    s.mail("a@far.example")
    assert s.rcpt("u%far.example@example.com").accept
    assert s.rcpt("u@example.com", routed=True).accept
