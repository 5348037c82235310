"""`mailfilter check`: one envelope through the server's own Session.

Job: the commands a client would send (HELO, MAIL, each RCPT) fed to the
same sans-IO Session the server runs (smtp/session.py: engine, policy,
replies), with the reply the server would send at each stage and the
deciding rule as file:line, like `postmap -q` for a whole envelope: check =
server by construction (tests/smtp/test_check_vs_server.py proves it on
real sockets). Verdicts that qmail
reports later (client, HELO, sender: at RCPT, docs/behaviour/smtp.md#pending-verdicts) are shown
at their own stage as "pending" so the operator sees where they come from.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from mailfilter.limits.anvil import LIMITS as ANVIL_LIMITS
from mailfilter.policy.dns import literal_status
from mailfilter.policy.dnsbl import Dnsbl
from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions, Verdict
from mailfilter.rules.bundle import Bundle
from mailfilter.smtp.replies import REPLIES
from mailfilter.smtp.session import AwaitLookups, Delay, Lookup, Session, SessionConfig
from mailfilter.tls import TLSSettings


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


class _Driver:
    """Feeds `check`'s commands to a Session exactly as a client would and
    fulfils its requests synchronously: a DNS Lookup with the server's own
    resolver calls (HELOCHECK: resolver.check, MFDNSCHECK: resolver.has_mx)
    when --dns was given, an address literal without DNS (as the server
    judges it), otherwise a note that the lookup was skipped; a tarpit Delay
    is not waited for (its length is shown). Arguments are sent as the UTF-8
    bytes a terminal gives, as a client would send them."""

    def __init__(self, session: Session, resolver) -> None:
        self.session = session
        self.resolver = resolver
        self.notes: list[str] = []

    def command(self, line: str) -> tuple[Verdict | None, str]:
        """(the policy's verdict, or None when the command never reached the
        policy (the engine answered it), and the reply as sent)."""
        session = self.session
        session.last_verdict = None
        self.notes = []
        session.receive_data(line.encode("utf-8", "surrogateescape") + b"\r\n")
        request = session.drain()
        while request is not None:
            request = self._fulfil(request)
            if request is None:
                request = session.drain()
        lines = session.data_to_send().decode("utf-8", "replace").split("\r\n")
        return session.last_verdict, " / ".join(text for text in lines if text)

    def _fulfil(self, request):
        session = self.session
        if type(request) is Lookup:
            label = (f"HELOCHECK DNS {request.rdtype} {request.name}" if request.kind == "helo"
                     else f"MFDNSCHECK MX {request.name}")
            status = literal_status(request.name)
            if status is not None:
                self.notes.append(f"{label}: {status} (address literal, no lookup)")
            elif self.resolver is None:
                self.notes.append(f"{label}: not performed (use --dns)")
            else:
                r = self.resolver
                status = asyncio.run(r.check(request.rdtype, request.name) if request.kind == "helo"
                                     else r.has_mx(request.name))
                self.notes.append(f"{label}: {status}")
            session.dns_answers({} if status is None else {request.kind: status})
            return None
        if type(request) is AwaitLookups:        # every Lookup was answered when asked
            session.dns_answers({})
            return session.resume()
        if type(request) is Delay:               # shown as a note on the verdict, not waited for
            return session.resume()
        raise RuntimeError(f"check cannot fulfil {request!r}")   # no DATA, no AUTH dialogue


def _refused(stage: str, argument: str, line: str) -> StageResult:
    verdict = "tempfail" if line[:1] == "4" else "reject"
    return StageResult(stage, argument, verdict, line, "syntax", None,
                       "refused by the SMTP command parser, before any rule")


_MAIL_FIRST = str(REPLIES["mail_first"])


def _engine_reply(stage: str, argument: str, line: str, why: str) -> StageResult:
    """A command the engine answered without asking the policy: after a
    refused (or missing) MAIL every RCPT gets the server's 503."""
    if line == _MAIL_FIRST:
        return StageResult(stage, argument, "reject", line, "mail_first", None, why)
    return _refused(stage, argument, line)


def run_check(bundle: Bundle, *, ip: str, host: str = "unknown", helo: str | None = None,
              sender: str | None = None, recipients: list[str] = (),
              open_relay: bool = False, auth_user: str | None = None,
              resolver=None, auth_mode: str | None = None,
              hostname: str | None = None, tls: bool = False,
              tls_settings: TLSSettings | None = None, deny: str = "close",
              allow_routing: bool = False, smtputf8: bool = True) -> CheckReport:
    """One envelope through the server's own Session (smtp/session.py): the
    same engine, policy and replies the server uses. With a
    policy/dns.py Resolver the DNS checks are made with the server's own two
    calls; without one they are reported as not performed. `auth_mode` and
    `hostname` are the server's --auth and --hostname (the server makes
    --auth every client's default SMTPAUTH). `tls`: the session runs inside
    TLS (after STARTTLS, or on the implicit-TLS listener), so the CONNECT
    stage names what such a session is offered (EHLO keywords, AUTH
    mechanisms); `tls_settings` are the server's (default: TLS available,
    as with the embedded certificate); `deny` is the server's --deny.
    `smtputf8`: the server offers SMTPUTF8 (not --no-smtputf8); the MAIL
    then announces it when an address of the envelope is not ASCII, as a
    client must (RFC 6531 §3.4)."""
    defaults = {} if auth_mode is None else {"SMTPAUTH": auth_mode}
    engine = PolicyEngine(bundle, PolicyOptions(open_relay=open_relay, defaults=defaults,
                                                allow_routing=allow_routing))
    if tls_settings is None:      # the server's default: a certificate, so STARTTLS
        tls_settings = TLSSettings(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    session = Session(SessionConfig(engine, hostname=hostname, tls=tls_settings, deny=deny,
                                    smtputf8=smtputf8),
                      Client(ip=ip, host=host), tls="TLS" if tls else None)
    sp = session.policy
    drive = _Driver(session, resolver)
    report = CheckReport()
    # the DNSBL score, as the server makes it before the greeting (--dns)
    dnsbl = Dnsbl.from_bundle(bundle)
    score = asyncio.run(dnsbl.check(resolver, ip)) if dnsbl and resolver is not None else None
    if not session.start(dnsbl=score):     # a deny client, --deny close: no session at all
        res = _result(session.last_verdict, f"{host}[{ip}]")
        res.reply = "(none: the connection is closed at once)"
        res.note = "tcp.smtp deny, as tcpserver: no greeting, no session"
        report.stages.append(res)
        return report
    res = _result(session.last_verdict, f"{host}[{ip}]")
    res.reply = session.data_to_send().decode("utf-8", "replace").rstrip("\r\n")
    if dnsbl and score is None:
        _add_note(res, f"DNSBL ({len(dnsbl.sites)} site(s)): not performed (use --dns)")
    elif score is not None:
        _add_note(res, f"DNSBL score {score.score} (threshold {score.threshold})"
                       + (f", listed by {score.rules}" if score.listed else "")
                       + (f", no answer from {', '.join(score.temp)}" if score.temp else ""))
    if session.closing:             # refused at connect (DNSBL): nothing more is asked
        report.stages.append(res)
        return report
    if not sp.profile.allowed:
        res.verdict = "pending-reject"
        res.reason = "client_denied"
        res.note = "220 now; every RCPT gets 553"
    if tls:
        _add_note(res, "inside TLS; EHLO offers " + " ".join(session.engine.ehlo_keywords()))
    own = [f"{lim.setting}={sp.profile.settings[lim.setting]}" for lim in ANVIL_LIMITS
           if lim.setting in sp.profile.own_settings]
    if own:         # the serve options' defaults are not known here: the tcp.smtp ones only
        _add_note(res, f"limits per client ({sp.profile.rule}): {', '.join(own)} "
                       "(docs/behaviour/limits.md)")
    report.stages.append(res)
    if auth_user:
        session.authenticated_as(auth_user)
    if helo is not None:
        v, line = drive.command(f"HELO {helo}")
        if v is None:               # no name: the session goes on without a HELO
            report.stages.append(_refused("HELO", helo, line))
        else:
            res = _result(v, helo.strip(" "))
            res.reply = line
            if sp.helo_verdict is not None:
                res.verdict = "pending-reject"
                res.reason = sp.helo_verdict[0]
                res.note = "HELO gets 250; non-relay RCPTs get 550"
            for note in drive.notes:
                _add_note(res, note)
            report.stages.append(res)
    why = "give --from to check recipients"
    if sender is not None:
        utf8 = smtputf8 and not all(a.isascii() for a in (sender, *recipients))
        v, line = drive.command(f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else ""))
        if v is None:
            report.stages.append(_refused("MAIL", f"<{sender}>", line))
        else:
            res = _result(v, f"<{sender}>")
            res.reply = line
            if utf8:
                _add_note(res, "MAIL carries SMTPUTF8: an address is not ASCII")
            if v.accept and sp.sender_verdict is not None and not sp.sender_bypass:
                res.verdict = "pending-reject"
                res.reason = sp.sender_verdict[0]
                res.note = "MAIL gets 250; every RCPT gets 553"
            elif sp.sender_bypass:
                res.note = "sender bypasses badmailfrom (? entry)"
            for note in drive.notes:
                _add_note(res, note)
            report.stages.append(res)
        why = "MAIL was refused"
    for rcpt in recipients:
        if session.closing:
            break
        v, line = drive.command(f"RCPT TO:<{rcpt}>")
        if v is None:
            report.stages.append(_engine_reply("RCPT", f"<{rcpt}>", line, why))
            if session.closing:
                _add_note(report.stages[-1], "the server closes the connection here")
            continue
        res = _result(v, f"<{rcpt}>")
        res.reply = line
        if v.accept and v.recipient is not None and v.recipient != rcpt:
            _add_note(res, f"delivered as <{v.recipient}>")
        report.stages.append(res)
    return report
