"""SessionPolicy: spamcontrol semantics for one SMTP connection. No I/O.

Job: keep one connection's policy state (client profile, HELO, AUTH, the
transaction's sender and counters) and answer each SMTP stage with a
Verdict. The server and `mailfilter check` both drive a SessionPolicy
through the same calls: connect(), helo(), mail(), rcpt(), data(), so a
`check` answer is the server's answer.

Semantics
(docs/behaviour/control-files.md#which-match-wins, #regular-expressions, #rcpthosts,
#decorated-entries, #recipients, #qregex-dialect, docs/behaviour/tcp-smtp.md#settings,
docs/behaviour/smtp.md#pending-verdicts, #rcpt-checks; spamcontrol's bugs fixed
(docs/behaviour/differences.md#spamcontrol-bugs)):
- per-client settings come from tcp.smtp (ClientProfile);
- split horizon: relay clients (RELAYCLIENT set, authenticated, or a
  relaymailfrom sender where RELAYMAILFROM is set for the client) skip HELO
  checks, MFDNSCHECK, rcpthosts, recipients and `+` entries; badmailfrom and
  badrcptto apply to everyone;
- verdicts about the client, the HELO name and the sender are computed when
  seen (HELO and MAIL answer 250) and reported at RCPT, by the checks of
  policy/rcpt.py in spamcontrol's order;
- spamcontrol dialect: the last matching line of a list decides, `!` lines are
  exceptions (every entry kind takes part); qregex dialect: the first firing
  line decides and `!` means "must match" (docs/behaviour/control-files.md#qregex-dialect);
- DNS answers (HELOCHECK A/M, MFDNSCHECK) are looked up by the caller and
  handed in (set_helo_dns / set_mail_dns): this module never blocks.
Quirks fixed: `@dom-` and `user@dom+` entries work
(docs/behaviour/differences.md#spamcontrol-bugs #1, #2), a DNS soft failure is one 451 at RCPT
(#3), SIZE is refused at MAIL by the engine (#4), matching is case-insensitive in every stage
(#5), only accepted recipients count towards MAXRECIPIENTS (#7).

Invariants: the transaction fields hold their initial values whenever
_in_transaction is False; Verdicts returned may be shared (read-only).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mailfilter.rules.format import MODE_ADDRESS, MODE_HOST
from mailfilter.policy.rcpt import HISTORY, KEPT_HELO, KEPT_MAIL, address_bytes
from mailfilter.policy.verdict import (DNS_OK, NO_RULE, RCPT_OK, V_DATA_OK, V_MAIL_OK, V_NOTORIOUS,
                                       V_RCPT_AUTH, Client, Verdict)

if TYPE_CHECKING:
    from mailfilter.policy.engine import PolicyEngine


def _domain(address: str) -> str:
    at = address.rfind("@")
    return address[at + 1:] if at >= 0 else ""


class SessionPolicy:
    """Per-connection policy state. Methods return Verdicts; nothing blocks."""

    __slots__ = ("engine", "client", "profile", "authenticated", "helo_name", "helo_verdict",
                 "helo_skip_dns", "helo_dns", "notorious", "failed_recipients", "sender",
                 "sender_verdict", "sender_bypass", "sender_relay", "mail_dns", "rcpt_count",
                 "accepted", "rcpt_rule", "rcpt_delay", "rcpt_routed", "_in_transaction")

    def __init__(self, engine: PolicyEngine, client: Client):
        self.engine = engine
        self.client = client
        rid = engine.client_rule(client)        # = engine.client_profile(client), a call less
        prof = engine._profiles.get(rid)
        self.profile = prof if prof is not None else engine.profile(rid)
        # False while the transaction fields below hold their initial values
        # (set by every method that changes one): resetting is then a no-op.
        self._in_transaction = False
        self.authenticated: str | None = None
        self.helo_name: str | None = None
        self.helo_verdict: tuple[str, int] | None = None   # (reason, rule id) when rejected
        self.helo_skip_dns = False
        self.helo_dns: str | None = None
        self.notorious = False
        self.failed_recipients = 0
        self.sender: str | None = None
        self.sender_verdict: tuple[str, int] | None = None
        self.sender_bypass = False
        self.sender_relay: Verdict | None = None   # the relaymailfrom line's RCPT accept
        self.mail_dns: str | None = None
        self.rcpt_count = 0
        self.accepted = 0
        # the RCPT being checked: the rcpthosts or recipients line that let
        # it in, the tarpit delay of its answer (set by rcpt(), then its checks)
        self.rcpt_rule = NO_RULE
        self.rcpt_delay = 0.0
        self.rcpt_routed = False    # its path had a source route (the engine dropped it)

    # PolicyEngine.session() starts a session as object.__new__ + _start:
    # calling a Python class costs CPython 3.11 a C-level call chain
    # (type_call, slot_tp_init, a fresh evaluation loop) that a method call
    # from Python code does not; same state as SessionPolicy(engine, client).
    _start = __init__

    # -- settings
    @property
    def settings(self) -> dict[str, str]:
        return self.profile.settings

    @property
    def client_rule(self) -> int:
        return self.profile.rule_id

    def setting(self, name: str) -> str | None:
        return self.profile.settings.get(name)

    @property
    def relay_client(self) -> bool:
        return self.profile.relay or self.authenticated is not None or self.sender_relay is not None

    @property
    def databytes(self) -> int:
        return self.profile.databytes

    @property
    def max_recipients(self) -> int:
        return self.profile.max_recipients

    def _reset_transaction(self) -> None:
        self._in_transaction = False
        self.sender = None
        self.sender_verdict = None
        self.sender_bypass = False
        self.sender_relay = None
        self.mail_dns = None
        self.rcpt_count = 0
        self.accepted = 0

    def connect(self) -> Verdict:
        return self.profile.connect_verdict

    # -- HELO/EHLO (docs/behaviour/smtp.md#pending-verdicts): always 250, verdict kept for RCPT
    def helo(self, name: str) -> Verdict:
        if self._in_transaction:
            self._reset_transaction()
        self.helo_name = name
        self.helo_verdict = None
        self.helo_skip_dns = False
        self.helo_dns = None
        eng = self.engine
        prof = self.profile
        if eng.qregex:
            if not prof.nobadhelo:
                data = name.encode("latin-1", "replace")
                rid = eng.listed(eng.badhelo, data, MODE_HOST)
                if rid >= 0:
                    self.helo_verdict = ("bad_helo", rid)
                elif not self.relay_client:
                    rid = eng.listed(eng.badhelonorelay, data, MODE_HOST)
                    if rid >= 0:
                        self.helo_verdict = ("bad_helo_norelay", rid)
            if self.helo_verdict is None and prof.helocheck is not None:
                # the dialect decides how lists read; HELOCHECK's other demands hold too
                self.helo_verdict = self._helocheck_name(name, prof.helocheck)
        elif prof.helocheck is not None:
            self.helo_verdict = self._spamcontrol_helo(name, prof.helocheck)
        hv = self.helo_verdict
        if hv is not None:             # 250 now, 550 at RCPT
                                       # (docs/behaviour/smtp.md#pending-verdicts)
            return eng.pending_verdict("HELO", hv[0], hv[1])
        return eng.v_helo

    def _helocheck_name(self, name: str, mode: str) -> tuple[str, int] | None:
        """HELOCHECK's demands on the name itself, apart from the badhelo list
        (docs/behaviour/tcp-smtp.md#settings): `!` and `.` refuse an empty name, `=`
        one that is not the client's host name. A client without a known name ("unknown") cannot
        pass `=`, not even by saying `HELO unknown`."""
        if mode in ("!", ".") and not name.strip():
            return ("helo_empty", self.profile.setting_rule("HELOCHECK"))
        if mode == "=":
            host = self.client.host.lower()
            if host == "unknown" or name.lower() != host:
                return ("helo_mismatch", self.profile.setting_rule("HELOCHECK"))
        return None

    def _spamcontrol_helo(self, name: str, mode: str) -> tuple[str, int] | None:
        eng = self.engine
        if mode in ("!", ".") and not name.strip():
            return ("helo_empty", self.profile.setting_rule("HELOCHECK"))
        if mode == "!":
            return None
        if eng.helo_accept is not None:
            rid = eng.helo_accept.get(name.lower().encode("latin-1", "replace"))
            if rid >= 0:                       # name!: acceptable, no DNS test
                self.helo_skip_dns = True
                return None
        rid = eng.badhelo_listed(name, MODE_HOST, True)    # lower-cased, last match decides,
        if rid >= 0:                                       # `!` = exception
            return ("bad_helo", rid)                       # (docs/behaviour/control-files.md
                                                           # #which-match-wins)
        return self._helocheck_name(name, mode) if mode == "=" else None

    def helo_dns_query(self) -> tuple[str, str] | None:
        """(rdtype, name) the caller should resolve for HELOCHECK A/M, or None."""
        mode = self.profile.helocheck
        if (mode in ("A", "M") and self.helo_name and not self.helo_skip_dns
                and self.helo_verdict is None and not self.relay_client):
            return ("A" if mode == "A" else "MX", self.helo_name)
        return None

    def set_helo_dns(self, status: str) -> None:
        self.helo_dns = status

    # -- MAIL (docs/behaviour/smtp.md#mail-checks)
    def mail(self, sender: str) -> Verdict:
        if self._in_transaction:
            self._reset_transaction()
        self._in_transaction = True
        prof = self.profile
        if prof.auth_required and self.authenticated is None:
            return prof.auth_required_verdict
        eng = self.engine
        if sender and sender[-1] == "]":
            sender = eng.local_literal(sender)
        self.sender = sender
        if not sender:
            return V_MAIL_OK
        # the lists read an SMTPUTF8 address as its UTF-8 bytes (rcpt.address_bytes)
        if prof.relaymailfrom and eng.relaymailfrom is not None:
            rid = eng.listed(eng.relaymailfrom, address_bytes(sender), MODE_ADDRESS,
                             qregex=False)
            if rid >= 0:
                self.sender_relay = eng.accept_verdict("relay_sender", rid)
        if prof.disable_badmailfrom:
            return V_MAIL_OK
        sv = self.sender_verdict = self._sender_verdict(sender)
        if sv is None:
            return V_MAIL_OK
        # 250 now, the rejection is reported at every RCPT
        # (docs/behaviour/smtp.md#pending-verdicts)
        return eng.pending_verdict("MAIL", sv[0], sv[1])

    def _sender_verdict(self, sender: str) -> tuple[str, int] | None:
        eng = self.engine
        if eng.qregex:
            data = address_bytes(sender)
            rid = eng.listed(eng.badmailfrom, data, MODE_ADDRESS)
            if rid < 0 and not self.relay_client:
                rid = eng.listed(eng.badmailfromnorelay, data, MODE_ADDRESS)
            return ("badmailfrom", rid) if rid >= 0 else None
        if eng.mf_decorated:
            verdict = self._decorated(sender)
            if verdict is not None or self.sender_bypass:
                return verdict
        rid = eng.badmailfrom_listed(sender, MODE_ADDRESS, False, True)  # last match decides,
                                                                         # `!` = exception
                                                             # (docs/behaviour/control-files.md
                                                             # #which-match-wins)
        return ("badmailfrom", rid) if rid >= 0 else None

    def _decorated(self, sender: str) -> tuple[str, int] | None:
        """Decorated badmailfrom entries, in spamcontrol's order
        (docs/behaviour/control-files.md#decorated-entries)."""
        eng = self.engine
        # the UTF-8 bytes, A-Z folded (bytes.lower()), as the tables hold them
        full = address_bytes(sender).lower()
        dom = full[full.rfind(b"@") + 1:] if b"@" in full else b""
        at_dom = b"@" + dom
        if eng.mf_bypass is not None and eng.mf_bypass.get(full) >= 0:
            self.sender_bypass = True
            return None
        host = self.client.host.lower()
        hostb = address_bytes(host)
        if eng.mf_antispoof is not None and not self.relay_client:
            rid = max(eng.mf_antispoof.get(full), eng.mf_antispoof.get(at_dom))
            if rid >= 0:
                return ("badmailfrom", rid)
        if eng.mf_unknownhost is not None and host == "unknown":
            rid = eng.mf_unknownhost.get(at_dom)
            if rid >= 0:
                return ("badmailfrom", rid)
        if eng.mf_wellknown is not None and dom:
            rid = eng.mf_wellknown.get(at_dom)
            if rid >= 0 and not (hostb == dom or hostb.endswith(b"." + dom)):
                return ("badmailfrom", rid)
        if eng.mf_mismatch is not None and dom and host != "unknown" \
                and not (hostb == dom or hostb.endswith(b"." + dom)):
            part = host
            while part:
                rid = eng.mf_mismatch.get(part.encode("latin-1", "replace"))
                if rid >= 0:
                    return ("badmailfrom", rid)
                dot = part.find(".")
                part = part[dot + 1:] if dot >= 0 else ""
        return None

    def mail_dns_query(self) -> str | None:
        """Sender domain the caller should MX-check for MFDNSCHECK, or None."""
        if (self.profile.mfdnscheck and self.sender and not self.sender_bypass
                and not self.relay_client):
            return _domain(self.sender) or None
        return None

    def set_mail_dns(self, status: str) -> None:
        self._in_transaction = True
        self.mail_dns = status

    # -- RCPT: the checks of policy/rcpt.py, then the accept
    def rcpt(self, recipient: str, routed: bool = False) -> Verdict:
        """The first refusal of the rows of rcpt.RCPT_CHECKS that can fire
        (the profile's plan for this state), else the accept. `routed`: the
        path carried a source route (@a,@b:), which the engine dropped."""
        self._in_transaction = True
        self.rcpt_count += 1
        prof = self.profile
        relay = prof.relay or self.authenticated is not None or self.sender_relay is not None
        given = recipient
        if recipient and recipient[-1] == "]":
            recipient = self.engine.local_literal(recipient)
        self.rcpt_rule = NO_RULE
        self.rcpt_delay = 0.0
        self.rcpt_routed = routed
        # the state bits of rcpt.py: which rows can fire at all
        state = 0
        if self.helo_verdict is not None or (self.helo_dns is not None
                                             and self.helo_dns != DNS_OK):
            state = KEPT_HELO
        if self.sender_verdict is not None or (self.mail_dns is not None
                                               and self.mail_dns != DNS_OK):
            state |= KEPT_MAIL
        if self.rcpt_count > 1 or self.failed_recipients:
            state |= HISTORY
        checks = (prof.relay_rcpt_plans if relay else prof.rcpt_plans)[state]
        for check in checks:
            verdict = check(self, recipient, relay)
            if verdict is not None:
                return verdict
        self.accepted += 1
        if relay:       # delivered with the RELAYCLIENT value appended
                        # (docs/behaviour/tcp-smtp.md#settings)
            if prof.relay:
                verdict = prof.relay_verdict
            else:
                verdict = V_RCPT_AUTH if self.authenticated is not None else self.sender_relay
            if prof.relay_suffix or recipient is not given:
                return Verdict("RCPT", True, RCPT_OK, verdict.reason, verdict.rule,
                               recipient=recipient + prof.relay_suffix)
            return verdict
        eng = self.engine
        delay = self.rcpt_delay
        if delay or recipient is not given:
            return Verdict("RCPT", True, RCPT_OK, "ok", eng.where(self.rcpt_rule), delay,
                           recipient=None if recipient is given else recipient)
        v = eng.rcpt_ok_by_rule.get(self.rcpt_rule)
        return v if v is not None else eng.accept_verdict("ok", self.rcpt_rule)

    # -- DATA
    def data(self) -> Verdict:
        return V_NOTORIOUS if self.notorious else V_DATA_OK

    # -- AUTH success (docs/behaviour/auth.md#after-success): relaying as
    # RELAYCLIENT="" for the session
    def auth_success(self, user: str) -> None:
        self.authenticated = user

    def reset(self) -> None:
        self._reset_transaction()
