"""Policy: spamcontrol semantics over a loaded bundle. Synchronous, no I/O.

One PolicyEngine per bundle; one SessionPolicy per SMTP connection. The
server and `mailfilter check` both drive a SessionPolicy through the same
calls: connect (in the constructor), helo(), mail(), rcpt(), data(), so a
`check` answer is the server's answer.

Semantics (SPEC A §1-§4, B §2.4-§2.9, §3; bugs of B §2.14 fixed):
- per-client settings come from tcp.smtp (longest prefix wins, then host
  rules), overlaid on global defaults; names are the qmail environment names;
- split horizon: relay clients (RELAYCLIENT set, authenticated, or a
  relaymailfrom sender where RELAYMAILFROM is set for the client) skip HELO
  checks, MFDNSCHECK, rcpthosts, recipients and `+` entries; badmailfrom and
  badrcptto apply to everyone;
- verdicts about the client, the HELO name and the sender are computed when
  seen and reported at RCPT, in the order of B §2.8's RCPT table;
- spamcontrol dialect: the last matching line of a list decides, `!` lines are
  exceptions (every entry kind takes part); qregex dialect: the first firing
  line decides and `!` means "must match" (B §3.2);
- DNS answers (HELOCHECK A/M, MFDNSCHECK) are looked up by the caller and
  handed in (set_helo_dns / set_mail_dns): this module never blocks.
Quirks fixed: `@dom-` and `user@dom+` entries work (B §2.14 #1, #2), a DNS
soft failure is one 451 at RCPT (#3), SIZE is refused at MAIL by the engine
(#4), matching is case-insensitive in every stage (#5), only accepted
recipients count towards MAXRECIPIENTS (#7).
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from mailfilter.rules.bundle import Bundle
from mailfilter.rules.format import MODE_ADDRESS, MODE_HOST
from mailfilter.rules.format import FLAG_EXCEPTION, leading_int
from mailfilter.policy.localip import is_local_ipv4
from mailfilter.smtp.replies import Reply, reply

DNS_OK, DNS_FAIL, DNS_TEMP = "ok", "fail", "temp"
DNS_NULLMX = "nullmx"       # the domain says it takes no mail (RFC 7505)


class Verdict:
    """One policy answer. Accept verdicts without variable parts are shared
    constants (built once per engine), so treat Verdicts as read-only."""

    __slots__ = ("stage", "accept", "reply", "reason", "rule", "delay", "close", "recipient")

    def __init__(self, stage: str, accept: bool, reply: Reply, reason: str,
                 rule: str | None = None, delay: float = 0.0, close: bool = False,
                 recipient: str | None = None):
        self.stage = stage          # CONNECT, HELO, MAIL, RCPT, DATA
        self.accept = accept
        self.reply = reply
        self.reason = reason        # short tag for the decision log
        self.rule = rule            # deciding rule as file:line
        self.delay = delay          # tarpit: seconds to wait before replying
        self.close = close          # close the session after this reply
        self.recipient = recipient  # as delivered (RELAYCLIENT suffix); None = as given

    def __repr__(self) -> str:
        return (f"Verdict({self.stage} {'accept' if self.accept else 'reject'} "
                f"{self.reply} {self.reason} {self.rule})")


@dataclass(slots=True)
class Client:
    ip: str
    port: int = 0
    host: str = "unknown"       # TCPREMOTEHOST
    local_ip: str = ""
    local_port: int = 0


@dataclass
class PolicyOptions:
    open_relay: bool = False    # SPEC A §4: only when the operator says so
    defaults: dict[str, str] = field(default_factory=dict)  # global settings (env names)
    is_local_ip: Callable[[str], bool] = is_local_ipv4      # for localiphost (B §1.7)


def _domain(address: str) -> str:
    at = address.rfind("@")
    return address[at + 1:] if at >= 0 else ""


def _int_setting(value: str | None, default: int = 0) -> int:
    """qmail-style: leading decimal digits, garbage -> default (B §1.2)."""
    if value is None:
        return default
    n = leading_int(value.strip())
    return default if n is None else n


def pack_ip(ip: str) -> bytes | None:
    """4 or 16 bytes for an address literal (an IPv6 zone `%...` is ignored),
    None if it is not one. Only IPv6 text contains ':' and dotted IPv4 never
    does, so one inet_pton call decides. CidrTrie.lookup_text does the same
    in C; this is its reference (tests)."""
    try:
        if ":" in ip:
            return _inet_pton(_AF_INET6, ip.split("%", 1)[0])
        return _inet_pton(_AF_INET, ip)
    except OSError:
        return None


_inet_pton, _AF_INET, _AF_INET6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6


class ClientProfile:
    """Everything a tcp.smtp rule decides, resolved once per rule per bundle.

    Settings are the qmail environment names (SPEC A §3); "set" (even to "")
    and "unset" differ, as in qmail."""

    __slots__ = ("rule_id", "rule", "allowed", "settings", "relay", "relay_suffix",
                 "helocheck", "mfdnscheck", "tarpit_count", "tarpit_delay", "recipients450",
                 "relaymailfrom", "nobadhelo", "disable_badmailfrom", "auth_required",
                 "databytes", "max_recipients", "connect_verdict", "relay_verdict", "own_settings",
                 "auth_required_verdict")

    def __init__(self, engine: "PolicyEngine", rule_id: int):
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
        self.tarpit_count = _int_setting(g("TARPITCOUNT"))
        self.tarpit_delay = _int_setting(g("TARPITDELAY"))
        self.recipients450 = "RECIPIENTS450" in settings
        self.relaymailfrom = "RELAYMAILFROM" in settings
        self.nobadhelo = "NOBADHELO" in settings
        self.disable_badmailfrom = "DISABLE_BADMAILFROM" in settings
        self.auth_required = g("SMTPAUTH", "").startswith("!")
        self.databytes = (_int_setting(settings["DATABYTES"]) if "DATABYTES" in settings
                          else b.integers.get("databytes", 0))
        self.max_recipients = (_int_setting(settings["MAXRECIPIENTS"]) if "MAXRECIPIENTS" in settings
                               else b.integers.get("maxrecipients", 0))
        if self.allowed:
            self.connect_verdict = Verdict("CONNECT", True, engine.greeting_reply,
                                           "relay_client" if self.relay else "ok", self.rule)
        else:   # 220 now, 553 at every RCPT (SPEC A §3), like HELO and MAIL's pending verdicts
            self.connect_verdict = Verdict("CONNECT", True, engine.greeting_reply,
                                           "pending_client_denied", self.rule)
        self.auth_required_verdict = Verdict("MAIL", False, reply("auth_required"), "auth_required",
                                             engine.where(self.setting_rule("SMTPAUTH")))
        self.relay_verdict = Verdict("RCPT", True, _RCPT_OK, "relay_client", self.rule)

    def setting_rule(self, name: str) -> int:
        """The tcp.smtp rule id that set `name` for this client, -1 when the
        setting came from the global defaults (or is unset): a verdict that a
        setting caused names that line in the decision log."""
        return self.rule_id if name in self.own_settings else -1


_RCPT_OK = reply("rcpt_ok")
_MAIL_OK = reply("mail_ok")
_V_MAIL_OK = Verdict("MAIL", True, _MAIL_OK, "ok")
_V_RCPT_OK = Verdict("RCPT", True, _RCPT_OK, "ok")
_V_RCPT_AUTH = Verdict("RCPT", True, _RCPT_OK, "relay_auth")
_V_DATA_OK = Verdict("DATA", True, reply("data_go"), "ok")
_V_NOTORIOUS = Verdict("DATA", False, reply("notorious_data"), "notorious", close=True)


# Shared verdicts are cached per rule id; a cache that reaches this many
# entries (distinct rules that rejected something) starts over.
_SHARED_VERDICTS_MAX = 1 << 16
# ClientProfiles (~1 KB each) likewise, per tcp.smtp rule that matched a client.
_PROFILES_MAX = 1 << 14


def _remember(cache: dict, key, verdict: Verdict) -> Verdict:
    if len(cache) >= _SHARED_VERDICTS_MAX:
        cache.clear()
    cache[key] = verdict
    return verdict


def _no_match(data: bytes, mode: int) -> int:
    """last_match of a list that is not there."""
    return -1


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
        # spamcontrol last_match of the lists every envelope consults, bound
        # once (an absent list matches nothing)
        self.badhelo_last = self.badhelo.last_match if self.badhelo is not None else _no_match
        self.badmailfrom_last = (self.badmailfrom.last_match if self.badmailfrom is not None
                                 else _no_match)
        self.badrcptto_last = self.badrcptto.last_match if self.badrcptto is not None else _no_match
        self._pending: dict[tuple[str, str, int], Verdict] = {}
        self._rejects: dict[tuple, Verdict] = {}
        self._accepts: dict[str, dict[int, Verdict]] = {}
        self.rcpt_ok_by_rule: dict[int, Verdict] = {-1: _V_RCPT_OK}

    def session(self, client: Client) -> "SessionPolicy":
        return SessionPolicy(self, client)

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

    def where(self, rid: int) -> str | None:
        """The rule as file:line, None for -1 (a decision without a rule)."""
        return self.bundle.where(rid) if rid >= 0 else None

    def pending_verdict(self, stage: str, why: str, rid: int) -> Verdict:
        """HELO/MAIL answer 250 while a rejection waits for RCPT (SPEC B
        §1.5, §2.7): one shared, read-only Verdict per (stage, why, rule)."""
        key = (stage, why, rid)
        v = self._pending.get(key)
        if v is None:
            ok = self.v_helo.reply if stage == "HELO" else _MAIL_OK
            v = _remember(self._pending, key,
                          Verdict(stage, True, ok, "pending_" + why, self.where(rid)))
        return v

    def reject_verdict(self, reason: str, name: str, rid: int, rule: str | None = None) -> Verdict:
        """The RCPT rejection with reply `name` for `reason` and rule `rid`
        (or, for a refusal because a list does NOT name the address, that
        list's file name `rule`), no tarpit delay: one shared, read-only
        Verdict per (reason, name, rule)."""
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
            return _V_RCPT_OK
        cache = self.rcpt_ok_by_rule if reason == "ok" else self._accepts.setdefault(reason, {})
        v = cache.get(rid)
        if v is None:
            if len(cache) >= _SHARED_VERDICTS_MAX:
                cache.clear()
                if reason == "ok":
                    cache[-1] = _V_RCPT_OK
            v = cache[rid] = Verdict("RCPT", True, _RCPT_OK, reason, self.where(rid))
        return v

    def local_literal(self, address: str) -> str:
        """`address` with a domain literal naming this host replaced by
        `localiphost` (SPEC B §1.7: the part after the last `@` is exactly
        `[d.d.d.d]` and the address is one of ours), else `address` itself."""
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
        then =host, =.suffix, =, then the empty key), -1 if none."""
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


class SessionPolicy:
    """Per-connection policy state. Methods return Verdicts; nothing blocks."""

    __slots__ = ("engine", "client", "profile", "authenticated", "helo_name", "helo_verdict",
                 "helo_skip_dns", "helo_dns", "notorious", "failed_recipients", "sender",
                 "sender_verdict", "sender_bypass", "sender_relay", "mail_dns", "rcpt_count",
                 "accepted", "_in_transaction")

    def __init__(self, engine: PolicyEngine, client: Client):
        self.engine = engine
        self.client = client
        self.profile = engine.client_profile(client)
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

    def _listed(self, matcher, data: bytes, mode: int, qregex: bool | None = None) -> int:
        """Deciding rule id if `data` is listed (rejected), else -1; an `!`
        exception as last match means "not listed" (spamcontrol, B §2.5).
        `qregex`: the list's dialect (default: the rules'); relaymailfrom is
        a spamcontrol list in both dialects (compiled as one, rules/README)."""
        if matcher is None:
            return -1
        if self.engine.qregex if qregex is None else qregex:
            return matcher.first_fire(data)
        rid = matcher.last_match(data, mode)
        if rid >= 0 and self.engine.bundle.flags(rid) & FLAG_EXCEPTION:
            return -1
        return rid

    def connect(self) -> Verdict:
        return self.profile.connect_verdict

    # -- HELO/EHLO (B §2.7): always 250, verdict kept for RCPT
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
                rid = self._listed(eng.badhelo, data, MODE_HOST)
                if rid >= 0:
                    self.helo_verdict = ("bad_helo", rid)
                elif not self.relay_client:
                    rid = self._listed(eng.badhelonorelay, data, MODE_HOST)
                    if rid >= 0:
                        self.helo_verdict = ("bad_helo_norelay", rid)
            if self.helo_verdict is None and prof.helocheck is not None:
                # the dialect decides how lists read; HELOCHECK's other demands hold too
                self.helo_verdict = self._helocheck_name(name, prof.helocheck)
        elif prof.helocheck is not None:
            self.helo_verdict = self._spamcontrol_helo(name, prof.helocheck)
        hv = self.helo_verdict
        if hv is not None:             # 250 now, 550 at RCPT (SPEC B §2.7)
            return eng.pending_verdict("HELO", hv[0], hv[1])
        return eng.v_helo

    def _helocheck_name(self, name: str, mode: str) -> tuple[str, int] | None:
        """HELOCHECK's demands on the name itself, apart from the badhelo list
        (B §2.8): `!` and `.` refuse an empty name, `=` one that is not the
        client's host name. A client without a known name ("unknown") cannot
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
        key = name.lower().encode("latin-1", "replace")
        if eng.helo_accept is not None:
            rid = eng.helo_accept.get(key)
            if rid >= 0:                       # name!: acceptable, no DNS test
                self.helo_skip_dns = True
                return None
        rid = eng.badhelo_last(key, MODE_HOST)     # last match decides, `!` = exception (B §2.5)
        if rid >= 0 and not eng.rule_words[3 * rid] & FLAG_EXCEPTION:
            return ("bad_helo", rid)
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

    # -- MAIL (B §2.8 MAIL list)
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
            return _V_MAIL_OK
        data = sender.encode("latin-1", "replace")
        if prof.relaymailfrom and eng.relaymailfrom is not None:
            rid = self._listed(eng.relaymailfrom, data, MODE_ADDRESS, qregex=False)
            if rid >= 0:
                self.sender_relay = eng.accept_verdict("relay_sender", rid)
        if prof.disable_badmailfrom:
            return _V_MAIL_OK
        sv = self.sender_verdict = self._sender_verdict(sender, data)
        if sv is None:
            return _V_MAIL_OK
        # 250 now, the rejection is reported at every RCPT (SPEC B §1.5)
        return eng.pending_verdict("MAIL", sv[0], sv[1])

    def _sender_verdict(self, sender: str, data: bytes) -> tuple[str, int] | None:
        eng = self.engine
        if eng.qregex:
            rid = self._listed(eng.badmailfrom, data, MODE_ADDRESS)
            if rid < 0 and not self.relay_client:
                rid = self._listed(eng.badmailfromnorelay, data, MODE_ADDRESS)
            return ("badmailfrom", rid) if rid >= 0 else None
        if eng.mf_decorated:
            verdict = self._decorated(sender)
            if verdict is not None or self.sender_bypass:
                return verdict
        rid = eng.badmailfrom_last(data, MODE_ADDRESS)   # last match decides, `!` = exception (B §2.5)
        if rid >= 0 and not eng.rule_words[3 * rid] & FLAG_EXCEPTION:
            return ("badmailfrom", rid)
        return None

    def _decorated(self, sender: str) -> tuple[str, int] | None:
        """Decorated badmailfrom entries, in spamcontrol's order (B §2.6)."""
        eng = self.engine
        folded = sender.lower()
        dom = _domain(folded)
        at_dom = ("@" + dom).encode("latin-1", "replace")
        full = folded.encode("latin-1", "replace")
        if eng.mf_bypass is not None and eng.mf_bypass.get(full) >= 0:
            self.sender_bypass = True
            return None
        host = self.client.host.lower()
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
            if rid >= 0 and not (host == dom or host.endswith("." + dom)):
                return ("badmailfrom", rid)
        if eng.mf_mismatch is not None and dom and host != "unknown" \
                and not (host == dom or host.endswith("." + dom)):
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

    # -- RCPT (B §2.8 RCPT table, in order)
    def _reject(self, reason: str, name: str, rid: int = -1, delay: float = 0.0,
                rule: str | None = None) -> Verdict:
        if delay:
            return Verdict("RCPT", False, reply(name), reason, rule or self.engine.where(rid), delay)
        return self.engine.reject_verdict(reason, name, rid, rule)

    def rcpt(self, recipient: str) -> Verdict:
        eng = self.engine
        prof = self.profile
        self._in_transaction = True
        self.rcpt_count += 1
        relay = prof.relay or self.authenticated is not None or self.sender_relay is not None
        delay = 0.0
        if not prof.allowed:
            return self._reject("client_denied", "client_denied", prof.rule_id)
        if prof.auth_required and self.authenticated is None:
            return self._reject("auth_required", "auth_required", prof.setting_rule("SMTPAUTH"))
        given = recipient
        if recipient and recipient[-1] == "]":
            recipient = eng.local_literal(recipient)
        data = recipient.encode("latin-1", "replace")   # one byte per character
        if not relay:
            hv = self.helo_verdict
            if hv is not None:
                return self._reject(hv[0], "bad_helo", hv[1])
            mode = prof.helocheck
            if mode is not None and len(mode) == 1 and self.helo_name is None:
                return self._reject("helo_missing", "bad_helo", prof.setting_rule("HELOCHECK"))
            if self.helo_dns is not None or self.mail_dns is not None:
                verdict = self._dns_verdict()
                if verdict is not None:
                    return verdict
            accepted_by = self._rcpthosts(data)
            if accepted_by == -2:       # no rcpthosts line names the domain
                return self._reject("rcpthosts", "rcpthosts", rule="rcpthosts")
            tarpit_count = prof.tarpit_count
            if tarpit_count:
                if eng.recipients_present and self.failed_recipients >= tarpit_count:
                    if prof.tarpit_delay == 999:
                        self.notorious = True
                    return self._reject("too_many_failed_rcpts", "too_many_rcpts",
                                        prof.setting_rule("TARPITCOUNT"))
                # "after tarpitcount RCPTs, sleep tarpitdelay seconds before
                # answering each further RCPT" (SPEC B §2.2)
                if self.rcpt_count > tarpit_count and 0 < prof.tarpit_delay < 999:
                    delay = float(prof.tarpit_delay)
            if eng.recipients_present:
                known = self._recipient_known(recipient)
                if known == -2:         # no recipients line names the address
                    self.failed_recipients += 1
                    return self._reject("no_mailbox", "no_mailbox_450" if prof.recipients450 else "no_mailbox",
                                        delay=delay, rule="recipients")
                if known >= 0:
                    accepted_by = known
        elif eng.qregex:
            # qregex has no split horizon for badhelo: it binds relay clients
            # too; only badhelonorelay (and HELOCHECK) spare them (B §3.1)
            hv = self.helo_verdict
            if hv is not None and hv[0] == "bad_helo":
                return self._reject(hv[0], "bad_helo", hv[1])
        sv = self.sender_verdict
        if sv is not None and not self.sender_bypass:
            return self._reject(sv[0], "badmailfrom", sv[1], delay)
        if eng.qregex:
            rid = self._listed(eng.badrcptto, data, MODE_ADDRESS)
        else:                                        # last match decides, `!` = exception (B §2.5)
            rid = eng.badrcptto_last(data, MODE_ADDRESS)
            if rid >= 0 and eng.rule_words[3 * rid] & FLAG_EXCEPTION:
                rid = -1
        if rid < 0 and not relay and eng.badrcpttonorelay is not None:
            rid = self._listed(eng.badrcpttonorelay, data, MODE_ADDRESS)
        if rid >= 0:
            return self._reject("badrcptto", "badrcptto", rid, delay)
        limit = prof.max_recipients
        if limit and self.accepted >= limit:
            return self._reject("too_many_rcpts", "too_many_rcpts",
                                prof.setting_rule("MAXRECIPIENTS"), delay)
        self.accepted += 1
        if relay:
            if prof.relay:
                verdict = prof.relay_verdict
            else:
                verdict = _V_RCPT_AUTH if self.authenticated is not None else self.sender_relay
            if prof.relay_suffix or delay or recipient is not given:
                return Verdict("RCPT", True, _RCPT_OK, verdict.reason, verdict.rule, delay,
                               recipient=recipient + prof.relay_suffix)
            return verdict
        if delay or recipient is not given:
            return Verdict("RCPT", True, _RCPT_OK, "ok", eng.where(accepted_by), delay,
                           recipient=None if recipient is given else recipient)
        v = eng.rcpt_ok_by_rule.get(accepted_by)
        return v if v is not None else eng.accept_verdict("ok", accepted_by)

    def _dns_verdict(self) -> Verdict | None:
        rule = self.profile.setting_rule
        if self.helo_dns == DNS_FAIL:
            return self._reject("helo_dns", "bad_helo", rule("HELOCHECK"))
        if self.helo_dns == DNS_TEMP:
            return self._reject("helo_dns_temp", "helo_dns_temp", rule("HELOCHECK"))
        if self.mail_dns == DNS_FAIL:
            return self._reject("mf_dns", "sender_must_exist", rule("MFDNSCHECK"))
        if self.mail_dns == DNS_NULLMX:     # it exists but can take no reply (RFC 7505 §4.2)
            return self._reject("mf_dns_null_mx", "sender_null_mx", rule("MFDNSCHECK"))
        if self.mail_dns == DNS_TEMP:
            return self._reject("mf_dns_temp", "mf_dns_temp", rule("MFDNSCHECK"))
        return None

    def _rcpthosts(self, data: bytes) -> int:
        """Rule id allowing the domain of the encoded recipient `data`, -1 when
        no check applies, -2 = refuse."""
        eng = self.engine
        if not eng.rcpthosts_present:
            return -1 if eng.options.open_relay else -2
        at = data.rfind(b"@")    # the recipient's last "@" (latin-1: same position)
        if at < 0:
            return -1            # B §1.8 step 2: addresses without @ are local
        if eng.rcpthosts is None:
            return -2            # an existing but empty rcpthosts rejects everything
        rid = eng.rcpthosts.last_match(data[at + 1:], MODE_HOST)
        return rid if rid >= 0 else -2

    def _recipient_known(self, recipient: str) -> int:
        """Rule id accepting the recipient (or the `!domain` / `!*` line that
        exempts it from the check), -1 if not checked, -2 = unknown (B §2.9)."""
        eng = self.engine
        addr = recipient.lower()
        if "@" not in addr:
            if addr == "postmaster":
                return -1    # RFC 5321 §4.5.1: <postmaster> is always taken, whatever the list says
            addr += "@localhost"
        local, _, dom = addr.rpartition("@")
        unchecked = eng.recipients_unchecked
        if unchecked is not None:
            rid = unchecked.get(dom.encode("latin-1", "replace"))
            if rid >= 0:
                return rid              # `!domain`: not checked, that line let it in
        table = eng.recipients
        if table is not None:
            rid = table.get(addr.encode("latin-1", "replace"))
            if rid >= 0:
                return rid
            dash = local.find("-")
            if dash >= 0:
                rid = table.get(f"{local[:dash + 1]}@{dom}".encode("latin-1", "replace"))
                if rid >= 0:
                    return rid
            rid = table.get(("@" + dom).encode("latin-1", "replace"))
            if rid >= 0:
                return rid
        # `!*`: recipients at domains the file does not name are not checked
        if unchecked is not None:
            rid = unchecked.get(b"*")
            if rid >= 0 and not (eng.recipients_domains is not None
                                 and eng.recipients_domains.get(dom.encode("latin-1", "replace")) >= 0):
                return rid
        return -2

    # -- DATA
    def data(self) -> Verdict:
        return _V_NOTORIOUS if self.notorious else _V_DATA_OK

    # -- AUTH success (SPEC A §7): relaying as RELAYCLIENT="" for the session
    def auth_success(self, user: str) -> None:
        self.authenticated = user

    def reset(self) -> None:
        self._reset_transaction()
