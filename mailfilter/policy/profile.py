"""ClientProfile: what one tcp.smtp rule decides for the clients it matches.

Job: resolve a rule's settings once per bundle: the rule's own settings over
the global defaults, read into typed fields (numbers qmail-style), the
verdicts that depend on nothing else, and the RCPT checks that can fire for
such a client (rcpt.plan), one plan for relay clients and one for the others.

Invariants: settings are the qmail environment names (docs/behaviour/tcp-smtp.md#settings); "set"
(even to "") and "unset" differ, as in qmail. A profile is read-only once
built and shared by every session of its rule.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mailfilter.rules.format import leading_int
from mailfilter.policy import rcpt
from mailfilter.policy.verdict import NO_RULE, RCPT_OK, Verdict
from mailfilter.smtp.replies import reply

if TYPE_CHECKING:
    from mailfilter.policy.engine import PolicyEngine


def int_setting(value: str | None, default: int = 0) -> int:
    """qmail-style: leading decimal digits, garbage -> default
    (docs/behaviour/tcp-smtp.md#values)."""
    if value is None:
        return default
    n = leading_int(value.strip())
    return default if n is None else n


class ClientProfile:
    """Everything a tcp.smtp rule decides, resolved once per rule per bundle
    (rule_id NO_RULE: no rule matched, the global defaults alone)."""

    __slots__ = ("rule_id", "rule", "allowed", "settings", "relay", "relay_suffix",
                 "helocheck", "mfdnscheck", "tarpit_count", "tarpit_delay", "recipients450",
                 "relaymailfrom", "nobadhelo", "disable_badmailfrom", "auth_required",
                 "databytes", "max_recipients", "connect_verdict", "relay_verdict", "own_settings",
                 "auth_required_verdict", "denied_verdict", "rcpt_plans", "relay_rcpt_plans")

    def __init__(self, engine: PolicyEngine, rule_id: int):
        b = engine.bundle
        settings = dict(engine.options.defaults)
        self.rule_id = rule_id
        self.rule = b.where(rule_id) if rule_id >= 0 else None
        self.allowed = True
        self.own_settings: frozenset[str] = frozenset()
        if rule_id >= 0:
            ref = b.rule(rule_id)
            self.allowed = ref.allow
            settings.update(b.tcp_settings[ref.aux])
            self.own_settings = frozenset(b.tcp_settings[ref.aux])
        self.settings = settings
        g = settings.get
        self.relay = "RELAYCLIENT" in settings
        self.relay_suffix = g("RELAYCLIENT", "")
        self.helocheck = g("HELOCHECK")
        self.mfdnscheck = "MFDNSCHECK" in settings
        self.tarpit_count = int_setting(g("TARPITCOUNT"))
        self.tarpit_delay = int_setting(g("TARPITDELAY"))
        self.recipients450 = "RECIPIENTS450" in settings
        self.relaymailfrom = "RELAYMAILFROM" in settings
        self.nobadhelo = "NOBADHELO" in settings
        self.disable_badmailfrom = "DISABLE_BADMAILFROM" in settings
        self.auth_required = g("SMTPAUTH", "").startswith("!")
        self.databytes = (int_setting(settings["DATABYTES"]) if "DATABYTES" in settings
                          else b.integers.get("databytes", 0))
        self.max_recipients = (int_setting(settings["MAXRECIPIENTS"]) if "MAXRECIPIENTS" in settings
                               else b.integers.get("maxrecipients", 0))
        if self.allowed:
            self.connect_verdict = Verdict("CONNECT", True, engine.greeting_reply,
                                           "relay_client" if self.relay else "ok", self.rule)
        else:   # 220 now, 553 at every RCPT (docs/behaviour/tcp-smtp.md#denied-clients), like HELO
                # and MAIL's pending verdicts
            self.connect_verdict = Verdict("CONNECT", True, engine.greeting_reply,
                                           "pending_client_denied", self.rule)
        self.auth_required_verdict = Verdict("MAIL", False, reply("auth_required"), "auth_required",
                                             engine.where(self.setting_rule("SMTPAUTH")))
        self.relay_verdict = Verdict("RCPT", True, RCPT_OK, "relay_client", self.rule)
        self.denied_verdict = (None if self.allowed else
                               engine.reject_verdict("client_denied", "client_denied", rule_id))
        self.rcpt_plans = rcpt.plans(self, engine, relay=False)
        self.relay_rcpt_plans = rcpt.plans(self, engine, relay=True)

    def setting_rule(self, name: str) -> int:
        """The tcp.smtp rule id that set `name` for this client, NO_RULE when
        the setting came from the global defaults (or is unset): a verdict
        that a setting caused names that line in the decision log."""
        return self.rule_id if name in self.own_settings else NO_RULE
