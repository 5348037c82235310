"""`mailfilter check`: drive one SessionPolicy through a whole envelope.

Job: the same calls the server makes (connect, HELO, MAIL, each RCPT), with
the reply the server would send at each stage and the deciding rule as
file:line, like `postmap -q` for a whole envelope. Verdicts that qmail
reports later (client, HELO, sender: at RCPT, SPEC B §1.5, §2.7) are shown
at their own stage as "pending" so the operator sees where they come from.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mailfilter.rules.bundle import Bundle
from mailfilter.policy.dns import literal_status
from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions, Verdict
from mailfilter.smtp.replies import REPLIES, Reply, reply
from mailfilter.smtp.engine import NEED_DATA, Closed, EngineConfig, Helo, Mail, Rcpt, SMTPConnection


@dataclass
class StageResult:
    stage: str
    argument: str
    verdict: str              # accept / reject / tempfail / pending-reject
    reply: str
    reason: str
    rule: str | None
    note: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass
class CheckReport:
    stages: list[StageResult] = field(default_factory=list)

    @property
    def all_accepted(self) -> bool:
        """README: exit 0 when every recipient would be accepted. A stage's
        pending rejection shows at the RCPTs (a relay client may pass it), so
        with recipients only their verdicts and hard refusals count; without
        any, a pending rejection means every RCPT would be refused."""
        if any(s.verdict in ("reject", "tempfail") for s in self.stages):
            return False
        rcpts = [s for s in self.stages if s.stage == "RCPT"]
        return all(s.verdict == "accept" for s in (rcpts or self.stages))

    def as_dict(self) -> dict:
        return {"accepted": self.all_accepted, "stages": [s.as_dict() for s in self.stages]}

    def as_text(self) -> str:
        lines = []
        for s in self.stages:
            arg = f" {s.argument}" if s.argument else ""
            rule = f"  rule={s.rule}" if s.rule else ""
            note = f"  ({s.note})" if s.note else ""
            lines.append(f"{s.stage}{arg}: {s.verdict} \"{s.reply}\" reason={s.reason}{rule}{note}")
        return "\n".join(lines)


def _result(v: Verdict, argument: str, note: str = "") -> StageResult:
    if v.accept:
        kind = "accept"
    else:
        kind = "tempfail" if v.reply.temporary else "reject"
    if v.delay:
        tarpit = f"tarpit {v.delay:g} s before the reply"
        note = f"{note}; {tarpit}" if note else tarpit
    return StageResult(v.stage, argument, kind, str(v.reply), v.reason, v.rule, note)


def _add_note(res: StageResult, note: str) -> None:
    res.note = f"{res.note}; {note}" if res.note else note


def _dns_check(res: StageResult, resolver, label: str, lookup, record, name: str) -> None:
    """The server's DNS call for this stage, or a note that it was skipped;
    an address literal needs no DNS (dnscheck.literal_status), so it is
    judged here as the server judges it, with or without --dns."""
    literal = literal_status(name)
    if literal is not None:
        record(literal)
        _add_note(res, f"{label}: {literal} (address literal, no lookup)")
        return
    if resolver is None:
        _add_note(res, f"{label}: not performed (use --dns)")
        return
    status = asyncio.run(lookup(resolver))
    record(status)
    _add_note(res, f"{label}: {status}")


class _Syntax:
    """The server's own command parsing (smtpconn) in front of the policy, so
    `check` refuses what the server refuses before any rule is asked
    (`HELO` without a name, `RCPT TO:<>`, 8-bit addresses, over-long ones,
    SIZE over databytes...) and hands the policy the name or address as the
    server would (a HELO name without its padding). Arguments are sent as
    the UTF-8 bytes a terminal gives, as a client would send them."""

    def __init__(self, engine: PolicyEngine, greeting: str):
        self.conn = SMTPConnection(EngineConfig(
            greeting=greeting, databytes=engine.bundle.integers.get("databytes", 0)))
        self.closed = False         # too many bad commands: the server hangs up

    def command(self, line: str, ok_reply: Reply | None = None):
        """(event, None) when the engine passes `line` on as HELO/MAIL/RCPT
        (answered `ok_reply`, as the policy's accept would; HELO: the
        server's 250), else (None, its reply line)."""
        conn = self.conn
        conn.receive_data(line.encode("utf-8", "surrogateescape") + b"\r\n")
        while True:
            ev = conn.next_event()
            if type(ev) is Helo:
                conn.send(conn.helo_reply())
                conn.data_to_send()
                return ev, None
            if type(ev) is Mail or type(ev) is Rcpt:
                conn.send(ok_reply)
                conn.data_to_send()
                return ev, None
            if type(ev) is Closed:
                self.closed = True
                break
            if ev is NEED_DATA or getattr(ev, "owes_reply", False):
                break
        lines = conn.data_to_send().decode("latin-1").split("\r\n")
        return None, " / ".join(line for line in lines if line)


def _refused(stage: str, argument: str, line: str) -> StageResult:
    verdict = "tempfail" if line[:1] == "4" else "reject"
    return StageResult(stage, argument, verdict, line, "syntax", None,
                       "refused by the SMTP command parser, before any rule")


def _mail_first(report: CheckReport, recipients, why: str) -> None:
    """The server's answer to every RCPT after a MAIL it refused: 503."""
    for rcpt in recipients:
        report.stages.append(StageResult("RCPT", f"<{rcpt}>", "reject", str(reply("mail_first")),
                                         "mail_first", None, why))


def run_check(bundle: Bundle, *, ip: str, host: str = "unknown", helo: str | None = None,
              sender: str | None = None, recipients: list[str] = (),
              open_relay: bool = False, auth_user: str | None = None,
              resolver=None, auth_mode: str | None = None,
              hostname: str | None = None) -> CheckReport:
    """With a dnscheck.Resolver the DNS checks are made with the server's own
    two calls (HELOCHECK: resolver.check, MFDNSCHECK: resolver.has_mx);
    without one they are reported as not performed. `auth_mode` and
    `hostname` are the server's --auth and --hostname (serve.load_policy
    makes --auth every client's default SMTPAUTH)."""
    defaults = {} if auth_mode is None else {"SMTPAUTH": auth_mode}
    engine = PolicyEngine(bundle, PolicyOptions(open_relay=open_relay, defaults=defaults))
    greeting = hostname or engine.greeting
    session = engine.session(Client(ip=ip, host=host))
    report = CheckReport()
    connect = session.connect()
    res = _result(connect, f"{host}[{ip}]")
    res.reply = str(reply("greeting", greeting=greeting))
    if not session.profile.allowed:
        res.verdict = "pending-reject"
        res.reason = "client_denied"
        res.note = "220 now; every RCPT gets 553"
    report.stages.append(res)
    if auth_user:
        session.auth_success(auth_user)
    syntax = _Syntax(engine, greeting)
    if helo is not None:
        ev, refused = syntax.command(f"HELO {helo}")
        if refused is not None:     # no name: the session goes on without a HELO
            report.stages.append(_refused("HELO", helo, refused))
        else:
            v = session.helo(ev.name)           # the bytes as the server decodes them
            res = _result(v, helo.strip(" "))
            res.reply = str(syntax.conn.helo_reply())
            if session.helo_verdict is not None:
                res.verdict = "pending-reject"
                res.reason = session.helo_verdict[0]
                res.note = "HELO gets 250; non-relay RCPTs get 550"
            query = session.helo_dns_query()
            if query is not None:
                _dns_check(res, resolver, f"HELOCHECK DNS {query[0]} {query[1]}",
                           lambda r: r.check(*query), session.set_helo_dns, query[1])
            report.stages.append(res)
    if sender is None:
        if recipients:
            _mail_first(report, recipients, "give --from to check recipients")
        return report
    ev, refused = syntax.command(f"MAIL FROM:<{sender}>", REPLIES["mail_ok"])
    if refused is not None:
        report.stages.append(_refused("MAIL", f"<{sender}>", refused))
        if not syntax.closed:
            _mail_first(report, recipients, "MAIL was refused")
        return report
    v = session.mail(ev.address)
    res = _result(v, f"<{sender}>")
    if v.accept and session.sender_verdict is not None and not session.sender_bypass:
        res.verdict = "pending-reject"
        res.reason = session.sender_verdict[0]
        res.note = "MAIL gets 250; every RCPT gets 553"
    elif session.sender_bypass:
        res.note = "sender bypasses badmailfrom (? entry)"
    dom = session.mail_dns_query()
    if dom is not None:
        _dns_check(res, resolver, f"MFDNSCHECK MX {dom}", lambda r: r.has_mx(dom),
                   session.set_mail_dns, dom)
    report.stages.append(res)
    if not v.accept:
        _mail_first(report, recipients, "MAIL was refused")
        return report
    for rcpt in recipients:
        ev, refused = syntax.command(f"RCPT TO:<{rcpt}>", REPLIES["rcpt_ok"])
        if refused is not None:
            report.stages.append(_refused("RCPT", f"<{rcpt}>", refused))
            if syntax.closed:
                _add_note(report.stages[-1], "the server closes the connection here")
                break
            continue
        rv = session.rcpt(ev.address)
        res = _result(rv, f"<{rcpt}>")
        if rv.accept and rv.recipient is not None and rv.recipient != rcpt:
            _add_note(res, f"delivered as <{rv.recipient}>")
        report.stages.append(res)
    return report
