"""PolicyEngine: one loaded bundle, read for the policy. Synchronous, no I/O.

Job: one PolicyEngine per bundle (a reload builds a new one): it finds a
client's tcp.smtp rule and ClientProfile, rewrites domain literals naming
this host, asks the bundle's lists, and keeps the verdicts that many
sessions share. One SessionPolicy per SMTP connection (engine.session()).

Invariants: the engine never changes after construction except its caches,
which only ever hold read-only Verdicts (and ClientProfiles) equal to freshly
built ones; every cache is bounded and starts over when full.

Where the names live (all importable from here, as before the split):
Verdict, Client, DNS_* in policy/verdict.py; ClientProfile in
policy/profile.py; SessionPolicy in policy/session.py; the RCPT checks in
policy/rcpt.py; pack_ip in policy/localip.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mailfilter.rules.bundle import Bundle
from mailfilter.rules.format import FLAG_EXCEPTION
from mailfilter.policy.localip import is_local_ipv4, pack_ip
from mailfilter.policy.profile import ClientProfile
from mailfilter.policy.session import SessionPolicy
from mailfilter.policy.verdict import (DNS_FAIL, DNS_NULLMX, DNS_OK, DNS_TEMP, MAIL_OK, NO_RULE,
                                       RCPT_OK, V_RCPT_OK, Client, Verdict)
from mailfilter.smtp.replies import reply
# the former home of int_setting, where tests still look for it
from mailfilter.policy.profile import int_setting as _int_setting  # noqa: F401

__all__ = ["Client", "ClientProfile", "DNS_FAIL", "DNS_NULLMX", "DNS_OK", "DNS_TEMP",
           "PolicyEngine", "PolicyOptions", "SessionPolicy", "Verdict", "pack_ip"]


@dataclass
class PolicyOptions:
    open_relay: bool = False    # docs/behaviour/control-files.md#rcpthosts: only when the
                                # operator says so
    defaults: dict[str, str] = field(default_factory=dict)  # global settings (env names)
    # a client that may not relay may still send % ! @ in a local part or a
    # source route (docs/behaviour/control-files.md#routing); Postfix's
    # allow_untrusted_routing
    allow_routing: bool = False
    is_local_ip: Callable[[str], bool] = is_local_ipv4      # for localiphost
                                                            # (docs/behaviour/control-files.md#localiphost)


# Shared verdicts are cached per rule id; a cache that reaches this many
# entries (distinct rules that rejected something) starts over.
_SHARED_VERDICTS_MAX = 1 << 16
# ClientProfiles (~1 KB each) likewise, per tcp.smtp rule that matched a client.
_PROFILES_MAX = 1 << 14


_new_object = object.__new__


def _remember(cache: dict, key, verdict: Verdict) -> Verdict:
    if len(cache) >= _SHARED_VERDICTS_MAX:
        cache.clear()
    cache[key] = verdict
    return verdict


def _no_match(text: str, mode: int, *flags) -> int:
    """listed / last_match_str of a list that is not there."""
    return NO_RULE


class PolicyEngine:
    """Immutable view of one bundle plus global options (the verdict caches
    only ever hold read-only Verdicts that equal freshly built ones)."""

    def __init__(self, bundle: Bundle, options: PolicyOptions | None = None):
        self.bundle = bundle
        self.options = options or PolicyOptions()
        b = bundle
        self.qregex = b.dialect == "qregex"
        lists = b.lists
        self.badmailfrom = lists.get("badmailfrom")
        self.badmailfromnorelay = lists.get("badmailfromnorelay")
        self.badrcptto = lists.get("badrcptto")
        self.badrcpttonorelay = lists.get("badrcpttonorelay")
        self.badhelo = lists.get("badhelo")
        self.badhelonorelay = lists.get("badhelonorelay")
        self.relaymailfrom = lists.get("relaymailfrom")
        self.rcpthosts = lists.get("rcpthosts")
        self.rcpthosts_present = bool(b.meta.get("rcpthosts_present")) or self.rcpthosts is not None
        t = b.tables
        self.helo_accept = t.get("badhelo.accept")
        self.mf_bypass = t.get("badmailfrom.bypass")
        self.mf_antispoof = t.get("badmailfrom.antispoof")
        self.mf_unknownhost = t.get("badmailfrom.unknownhost")
        self.mf_wellknown = t.get("badmailfrom.wellknown")
        self.mf_mismatch = t.get("badmailfrom.mismatch")
        self.mf_decorated = any(x is not None for x in (
            self.mf_bypass, self.mf_antispoof, self.mf_unknownhost, self.mf_wellknown, self.mf_mismatch))
        self.recipients = t.get("recipients")
        self.recipients_unchecked = t.get("recipients.unchecked")
        self.recipients_domains = t.get("recipients.domains")
        self.recipients_present = bool(b.meta.get("recipients_present"))
        self.tcp_hosts = t.get("tcp.smtp.hosts")
        self.cidr = b.cidr
        greeting = b.scalars.get("smtpgreeting") or b.scalars.get("me") or "localhost"
        self.localiphost = b.scalars.get("localiphost") or b.scalars.get("me") or "localhost"
        self.greeting = greeting
        self.hostname = greeting.split()[0]
        self.greeting_reply = reply("greeting", greeting=greeting)
        self.v_helo = Verdict("HELO", True, reply("helo", greeting=greeting), "ok")
        self._profiles: dict[int, ClientProfile] = {}
        self.rule_words = b.rule_words
        # spamcontrol "listed" (last match decides, `!` = exception) of the
        # lists every envelope consults, on the str as given, bound once (an
        # absent list lists nothing): ListMatcher.listed, one C call per list
        self.badhelo_listed = self.badhelo.listed if self.badhelo is not None else _no_match
        self.badmailfrom_listed = (self.badmailfrom.listed if self.badmailfrom is not None
                                   else _no_match)
        self.badrcptto_listed = (self.badrcptto.listed if self.badrcptto is not None
                                 else _no_match)
        self.rcpthosts_last = (self.rcpthosts.last_match_str if self.rcpthosts is not None
                               else _no_match)
        self._pending: dict[tuple[str, str, int], Verdict] = {}
        self._rejects: dict[tuple, Verdict] = {}
        self._accepts: dict[str, dict[int, Verdict]] = {}
        self.rcpt_ok_by_rule: dict[int, Verdict] = {NO_RULE: V_RCPT_OK}

    def session(self, client: Client) -> SessionPolicy:
        s = _new_object(SessionPolicy)      # = SessionPolicy(self, client), cheaper (_start)
        s._start(self, client)
        return s

    def profile(self, rule_id: int) -> ClientProfile:
        """The client profile of tcp.smtp rule `rule_id`, built once; the
        cache starts over at _PROFILES_MAX (clients fill it one rule at a
        time: a 1M-line tcp.smtp would otherwise keep ~1 GB of profiles)."""
        prof = self._profiles.get(rule_id)
        if prof is None:
            if len(self._profiles) >= _PROFILES_MAX:
                self._profiles.clear()
            prof = self._profiles[rule_id] = ClientProfile(self, rule_id)
        return prof

    def listed(self, matcher, data: bytes, mode: int, qregex: bool | None = None) -> int:
        """Deciding rule id if `data` is listed (rejected), else NO_RULE; an
        `!` exception as last match means "not listed" (spamcontrol,
        docs/behaviour/control-files.md#which-match-wins). `qregex`: the list's dialect (default:
        the rules'); relaymailfrom is a spamcontrol list in both dialects (compiled as one,
        rules/README)."""
        if matcher is None:
            return NO_RULE
        if self.qregex if qregex is None else qregex:
            return matcher.first_fire(data)
        rid = matcher.last_match(data, mode)
        if rid >= 0 and self.bundle.flags(rid) & FLAG_EXCEPTION:
            return NO_RULE
        return rid

    def where(self, rid: int) -> str | None:
        """The rule as file:line, None for NO_RULE (a decision without a rule)."""
        return self.bundle.where(rid) if rid >= 0 else None

    def pending_verdict(self, stage: str, why: str, rid: int) -> Verdict:
        """HELO/MAIL answer 250 while a rejection waits for RCPT
        (docs/behaviour/smtp.md#pending-verdicts): one shared, read-only Verdict per
        (stage, why, rule)."""
        key = (stage, why, rid)
        v = self._pending.get(key)
        if v is None:
            ok = self.v_helo.reply if stage == "HELO" else MAIL_OK
            v = _remember(self._pending, key,
                          Verdict(stage, True, ok, "pending_" + why, self.where(rid)))
        return v

    def reject_verdict(self, reason: str, name: str, rid: int, rule: str | None = None,
                       delay: float = 0.0) -> Verdict:
        """The RCPT rejection with reply `name` for `reason` and rule `rid`
        (or, for a refusal because a list does NOT name the address, that
        list's file name `rule`): one shared, read-only Verdict per (reason,
        name, rule), unless a tarpit `delay` makes it this RCPT's own."""
        if delay:
            return Verdict("RCPT", False, reply(name), reason, rule or self.where(rid), delay)
        key = (reason, name, rid, rule)
        v = self._rejects.get(key)
        if v is None:
            v = _remember(self._rejects, key,
                          Verdict("RCPT", False, reply(name), reason, rule or self.where(rid)))
        return v

    def accept_verdict(self, reason: str, rid: int) -> Verdict:
        """The RCPT accept naming rule `rid` (the rcpthosts, recipients or
        relaymailfrom line that let it through): one shared Verdict per rule.
        The "ok" ones are also in `rcpt_ok_by_rule`, which SessionPolicy.rcpt
        reads first (a dict get instead of a call per accepted RCPT)."""
        if rid < 0:
            return V_RCPT_OK
        cache = self.rcpt_ok_by_rule if reason == "ok" else self._accepts.setdefault(reason, {})
        v = cache.get(rid)
        if v is None:
            if len(cache) >= _SHARED_VERDICTS_MAX:
                cache.clear()
                if reason == "ok":
                    cache[NO_RULE] = V_RCPT_OK
            v = cache[rid] = Verdict("RCPT", True, RCPT_OK, reason, self.where(rid))
        return v

    def local_literal(self, address: str) -> str:
        """`address` with a domain literal naming this host replaced by
        `localiphost` (docs/behaviour/control-files.md#localiphost: the part after the
        last `@` is exactly `[d.d.d.d]` and the address is one of ours), else `address` itself."""
        at = address.rfind("@")
        dom = address[at + 1:]
        if at < 0 or len(dom) < 9 or dom[0] != "[" or dom[-1] != "]":
            return address
        ip = dom[1:-1]
        if pack_ip(ip) is None or ":" in ip or not self.options.is_local_ip(ip):
            return address
        return address[:at + 1] + self.localiphost

    def client_profile(self, client: Client) -> ClientProfile:
        """profile(client_rule(client)), with one method call less."""
        rid = self.client_rule(client)
        prof = self._profiles.get(rid)
        return prof if prof is not None else self.profile(rid)

    def client_rule(self, client: Client) -> int:
        """tcp.smtp rule id for the client (tcpserver order: address prefix,
        then =host, =.suffix, =, then the empty key), NO_RULE if none."""
        if self.cidr is not None:
            rid = self.cidr.lookup_text(client.ip)      # = lookup(pack_ip(ip)), one C call
            if rid >= 0:
                return rid
        hosts = self.tcp_hosts
        host = client.host
        if hosts is not None and host and host != "unknown":
            host = host.lower()
            rid = hosts.get(("=" + host).encode("latin-1", "replace"))
            if rid >= 0:
                return rid
            dot = host.find(".")
            while dot >= 0:
                rid = hosts.get(("=" + host[dot:]).encode("latin-1", "replace"))
                if rid >= 0:
                    return rid
                dot = host.find(".", dot + 1)
            rid = hosts.get(b"=")
            if rid >= 0:
                return rid
        return self.bundle.tcp_default


