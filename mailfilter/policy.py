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

import ipaddress
from dataclasses import dataclass, field

from mailfilter.bundle import MODE_ADDRESS, MODE_HOST, Bundle
from mailfilter.compiler import FLAG_EXCEPTION
from mailfilter.replies import Reply, reply

DNS_OK, DNS_FAIL, DNS_TEMP = "ok", "fail", "temp"


@dataclass(slots=True)
class Verdict:
    stage: str                  # CONNECT, HELO, MAIL, RCPT, DATA
    accept: bool
    reply: Reply
    reason: str                 # short tag for the decision log
    rule: str | None = None     # deciding rule as file:line
    delay: float = 0.0          # tarpit: seconds to wait before replying
    close: bool = False         # close the session after this reply
    recipient: str | None = None  # recipient as it will be delivered (RELAYCLIENT suffix)


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


def _domain(address: str) -> str:
    at = address.rfind("@")
    return address[at + 1:] if at >= 0 else ""


def _int_setting(value: str | None, default: int = 0) -> int:
    """qmail-style: leading decimal digits, garbage -> default (B §1.2)."""
    if value is None:
        return default
    digits = ""
    for ch in value.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else default


class PolicyEngine:
    """Immutable view of one bundle plus global options."""

    def __init__(self, bundle: Bundle, options: PolicyOptions | None = None):
        self.bundle = bundle
        self.options = options or PolicyOptions()
        b = bundle
        self.qregex = b.dialect == "qregex"
        self.badmailfrom = b.lists.get("badmailfrom")
        self.badmailfromnorelay = b.lists.get("badmailfromnorelay")
        self.badrcptto = b.lists.get("badrcptto")
        self.badrcpttonorelay = b.lists.get("badrcpttonorelay")
        self.badhelo = b.lists.get("badhelo")
        self.badhelonorelay = b.lists.get("badhelonorelay")
        self.relaymailfrom = b.lists.get("relaymailfrom")
        self.rcpthosts = b.lists.get("rcpthosts")
        self.rcpthosts_present = bool(b.meta.get("rcpthosts_present")) or self.rcpthosts is not None
        t = b.tables
        self.helo_accept = t.get("badhelo.accept")
        self.mf_bypass = t.get("badmailfrom.bypass")
        self.mf_antispoof = t.get("badmailfrom.antispoof")
        self.mf_unknownhost = t.get("badmailfrom.unknownhost")
        self.mf_wellknown = t.get("badmailfrom.wellknown")
        self.mf_mismatch = t.get("badmailfrom.mismatch")
        self.recipients = t.get("recipients")
        self.recipients_unchecked = t.get("recipients.unchecked")
        self.recipients_present = bool(b.meta.get("recipients_present"))
        self.tcp_hosts = t.get("tcp.smtp.hosts")
        greeting = b.scalars.get("smtpgreeting") or b.scalars.get("me") or "localhost"
        self.greeting = greeting
        self.hostname = greeting.split()[0]

    def session(self, client: Client) -> "SessionPolicy":
        return SessionPolicy(self, client)

    def client_rule(self, client: Client) -> int:
        """tcp.smtp rule id for the client (tcpserver order: address prefix,
        then =host, =.suffix, =, then the empty key), -1 if none."""
        b = self.bundle
        if b.cidr is not None:
            try:
                packed = ipaddress.ip_address(client.ip).packed
            except ValueError:
                packed = None
            if packed is not None:
                rid = b.cidr.lookup(packed)
                if rid >= 0:
                    return rid
        if self.tcp_hosts is not None and client.host and client.host != "unknown":
            host = client.host.lower()
            rid = self.tcp_hosts.get(("=" + host).encode("latin-1"))
            if rid >= 0:
                return rid
            dot = host.find(".")
            while dot >= 0:
                rid = self.tcp_hosts.get(("=" + host[dot:]).encode("latin-1"))
                if rid >= 0:
                    return rid
                dot = host.find(".", dot + 1)
            rid = self.tcp_hosts.get(b"=")
            if rid >= 0:
                return rid
        return b.tcp_default


class SessionPolicy:
    """Per-connection policy state. Methods return Verdicts; nothing blocks."""

    def __init__(self, engine: PolicyEngine, client: Client):
        self.engine = engine
        self.client = client
        b = engine.bundle
        self.settings: dict[str, str] = dict(engine.options.defaults)
        self.client_rule = engine.client_rule(client)
        self.client_allowed = True
        if self.client_rule >= 0:
            ref = b.rule(self.client_rule)
            self.client_allowed = ref.allow
            self.settings.update(b.tcp_settings[ref.aux])
        elif b.tcp_present:
            # tcp.smtp exists but no line (not even the empty key) matched:
            # tcpserver lets such clients in with no settings.
            pass
        self.authenticated: str | None = None
        self.helo_name: str | None = None
        self.helo_verdict: tuple[str, int] | None = None   # (reason, rule id) when rejected
        self.helo_skip_dns = False
        self.helo_dns: str | None = None
        self.notorious = False
        self.failed_recipients = 0
        self._reset_transaction()

    # -- settings
    def setting(self, name: str) -> str | None:
        return self.settings.get(name)

    @property
    def relay_client(self) -> bool:
        return "RELAYCLIENT" in self.settings or self.authenticated is not None or self.sender_relay

    @property
    def relay_suffix(self) -> str:
        return self.settings.get("RELAYCLIENT", "")

    @property
    def databytes(self) -> int:
        if "DATABYTES" in self.settings:
            return _int_setting(self.settings["DATABYTES"])
        return self.engine.bundle.integers.get("databytes", 0)

    @property
    def max_recipients(self) -> int:
        if "MAXRECIPIENTS" in self.settings:
            return _int_setting(self.settings["MAXRECIPIENTS"])
        return self.engine.bundle.integers.get("maxrecipients", 0)

    @property
    def auth_required(self) -> bool:
        return self.settings.get("SMTPAUTH", "").startswith("!")

    def _reset_transaction(self) -> None:
        self.sender: str | None = None
        self.sender_verdict: tuple[str, int] | None = None
        self.sender_bypass = False
        self.sender_relay = False
        self.mail_dns: str | None = None
        self.rcpt_count = 0
        self.accepted = 0

    def _rule(self, rid: int) -> str | None:
        return self.engine.bundle.where(rid) if rid >= 0 else None

    def _listed(self, matcher, text: str, mode: int) -> int:
        """Deciding rule id if `text` is listed (rejected), else -1; an `!`
        exception as last match means "not listed" (spamcontrol, B §2.5)."""
        if matcher is None:
            return -1
        data = text.encode("latin-1", "replace")
        if self.engine.qregex:
            return matcher.first_fire(data)
        rid = matcher.last_match(data, mode)
        if rid >= 0 and self.engine.bundle.flags(rid) & FLAG_EXCEPTION:
            return -1
        return rid

    def connect(self) -> Verdict:
        rule = self._rule(self.client_rule)
        if not self.client_allowed:
            return Verdict("CONNECT", False, reply("client_denied"), "client_denied", rule)
        reason = "relay_client" if "RELAYCLIENT" in self.settings else "ok"
        return Verdict("CONNECT", True, reply("greeting", greeting=self.engine.greeting), reason, rule)

    # -- HELO/EHLO (B §2.7): always 250, verdict kept for RCPT
    def helo(self, name: str) -> Verdict:
        self._reset_transaction()
        self.helo_name = name
        self.helo_verdict = None
        self.helo_skip_dns = False
        self.helo_dns = None
        eng = self.engine
        mode = self.setting("HELOCHECK")
        if eng.qregex:
            if "NOBADHELO" not in self.settings:
                rid = self._listed(eng.badhelo, name, MODE_HOST)
                if rid < 0 and not self.relay_client:
                    rid = self._listed(eng.badhelonorelay, name, MODE_HOST)
                if rid >= 0:
                    self.helo_verdict = ("bad_helo", rid)
        elif mode is not None:
            self.helo_verdict = self._spamcontrol_helo(name, mode)
        return Verdict("HELO", True, reply("helo", greeting=eng.greeting), "ok",
                       self._rule(self.helo_verdict[1]) if self.helo_verdict else None)

    def _spamcontrol_helo(self, name: str, mode: str) -> tuple[str, int] | None:
        eng = self.engine
        if mode in ("!", ".") and not name.strip():
            return ("helo_empty", -1)
        if mode == "!":
            return None
        key = name.lower().encode("latin-1", "replace")
        if eng.helo_accept is not None:
            rid = eng.helo_accept.get(key)
            if rid >= 0:                       # name!: acceptable, no DNS test
                self.helo_skip_dns = True
                return None
        rid = self._listed(eng.badhelo, name, MODE_HOST)
        if rid >= 0:
            return ("bad_helo", rid)
        if mode == "=" and name.lower() != self.client.host.lower():
            return ("helo_mismatch", -1)
        return None

    def helo_dns_query(self) -> tuple[str, str] | None:
        """(rdtype, name) the caller should resolve for HELOCHECK A/M, or None."""
        mode = self.setting("HELOCHECK")
        if (mode in ("A", "M") and self.helo_name and not self.helo_skip_dns
                and self.helo_verdict is None and not self.relay_client and not self.engine.qregex):
            return ("A" if mode == "A" else "MX", self.helo_name)
        return None

    def set_helo_dns(self, status: str) -> None:
        self.helo_dns = status

    # -- MAIL (B §2.8 MAIL list)
    def mail(self, sender: str) -> Verdict:
        self._reset_transaction()
        self.sender = sender
        eng = self.engine
        if self.auth_required and self.authenticated is None:
            self.sender = None
            return Verdict("MAIL", False, reply("auth_required"), "auth_required")
        if "RELAYMAILFROM" in self.settings and sender and eng.relaymailfrom is not None:
            rid = self._listed(eng.relaymailfrom, sender, MODE_ADDRESS)
            if rid >= 0:
                self.sender_relay = True
        if sender and "DISABLE_BADMAILFROM" not in self.settings:
            self.sender_verdict = self._sender_verdict(sender)
        return Verdict("MAIL", True, reply("mail_ok"), "ok",
                       self._rule(self.sender_verdict[1]) if self.sender_verdict else None)

    def _sender_verdict(self, sender: str) -> tuple[str, int] | None:
        eng = self.engine
        if eng.qregex:
            rid = self._listed(eng.badmailfrom, sender, MODE_ADDRESS)
            if rid < 0 and not self.relay_client:
                rid = self._listed(eng.badmailfromnorelay, sender, MODE_ADDRESS)
            return ("badmailfrom", rid) if rid >= 0 else None
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
        rid = self._listed(eng.badmailfrom, sender, MODE_ADDRESS)
        return ("badmailfrom", rid) if rid >= 0 else None

    def mail_dns_query(self) -> str | None:
        """Sender domain the caller should MX-check for MFDNSCHECK, or None."""
        if ("MFDNSCHECK" in self.settings and self.sender and not self.sender_bypass
                and not self.relay_client):
            dom = _domain(self.sender)
            return dom or None
        return None

    def set_mail_dns(self, status: str) -> None:
        self.mail_dns = status

    # -- RCPT (B §2.8 RCPT table, in order)
    def rcpt(self, recipient: str) -> Verdict:
        eng = self.engine
        self.rcpt_count += 1
        relay = self.relay_client
        R = lambda reason, name, rid=-1, **kw: Verdict(  # noqa: E731
            "RCPT", False, reply(name), reason, self._rule(rid), **kw)
        if not self.client_allowed:
            return R("client_denied", "client_denied", self.client_rule)
        if self.auth_required and self.authenticated is None:
            return R("auth_required", "auth_required")
        if not relay:
            hv = self.helo_verdict
            mode = self.setting("HELOCHECK")
            if not eng.qregex and mode is not None and len(mode) == 1 and not self.helo_name:
                return R("helo_missing", "bad_helo")
            if hv is not None:
                return R(hv[0], "bad_helo", hv[1])
            if self.helo_dns == DNS_FAIL:
                return R("helo_dns", "bad_helo")
            if self.helo_dns == DNS_TEMP:
                return R("helo_dns_temp", "helo_dns_temp")
            if self.mail_dns == DNS_FAIL:
                return R("mf_dns", "sender_must_exist")
            if self.mail_dns == DNS_TEMP:
                return R("mf_dns_temp", "mf_dns_temp")
            rid = self._rcpthosts(recipient)
            if rid == -2:
                return R("rcpthosts", "rcpthosts")
            tarpit_count = _int_setting(self.setting("TARPITCOUNT"))
            tarpit_delay = _int_setting(self.setting("TARPITDELAY"))
            if eng.recipients_present and tarpit_count and self.failed_recipients >= tarpit_count:
                if tarpit_delay == 999:
                    self.notorious = True
                return R("too_many_failed_rcpts", "too_many_rcpts")
            delay = 0.0
            if tarpit_count and self.rcpt_count > tarpit_count and 0 < tarpit_delay < 999:
                delay = float(tarpit_delay)
            if eng.recipients_present:
                rid = self._recipient_known(recipient)
                if rid == -2:
                    self.failed_recipients += 1
                    name = "no_mailbox_450" if "RECIPIENTS450" in self.settings else "no_mailbox"
                    return R("no_mailbox", name, delay=delay)
        else:
            delay = 0.0
        if self.sender_verdict is not None and not self.sender_bypass:
            reason, rid = self.sender_verdict
            return R(reason, "badmailfrom", rid, delay=delay)
        rid = self._listed(eng.badrcptto, recipient, MODE_ADDRESS)
        if rid < 0 and not relay:
            rid = self._listed(eng.badrcpttonorelay, recipient, MODE_ADDRESS)
        if rid >= 0:
            return R("badrcptto", "badrcptto", rid, delay=delay)
        limit = self.max_recipients
        if limit and self.accepted >= limit:
            return R("too_many_rcpts", "too_many_rcpts", delay=delay)
        self.accepted += 1
        final = recipient + self.relay_suffix if relay else recipient
        reason = "relay_client" if relay else "ok"
        rule = self.client_rule if "RELAYCLIENT" in self.settings else -1
        return Verdict("RCPT", True, reply("rcpt_ok"), reason, self._rule(rule),
                       delay=delay, recipient=final)

    def _rcpthosts(self, recipient: str) -> int:
        """Rule id allowing the domain, -1 when no check applies, -2 = refuse."""
        eng = self.engine
        if not eng.rcpthosts_present:
            return -1 if eng.options.open_relay else -2
        if "@" not in recipient:
            return -1            # B §1.8 step 2: addresses without @ are local
        if eng.rcpthosts is None:
            return -2            # an existing but empty rcpthosts rejects everything
        rid = eng.rcpthosts.last_match(_domain(recipient).lower().encode("latin-1", "replace"), MODE_HOST)
        return rid if rid >= 0 else -2

    def _recipient_known(self, recipient: str) -> int:
        """Rule id accepting the recipient, -1 if not checked, -2 = unknown (B §2.9)."""
        eng = self.engine
        addr = recipient.lower()
        if "@" not in addr:
            addr += "@localhost"
        local, _, dom = addr.rpartition("@")
        unchecked = eng.recipients_unchecked
        if unchecked is not None and unchecked.get(dom.encode("latin-1", "replace")) >= 0:
            return -1
        table = eng.recipients
        if table is not None:
            keys = [addr]
            dash = local.find("-")
            if dash >= 0:
                keys.append(f"{local[:dash + 1]}@{dom}")
            keys.append("@" + dom)
            for key in keys:
                rid = table.get(key.encode("latin-1", "replace"))
                if rid >= 0:
                    return rid
        if unchecked is not None and unchecked.get(b"*") >= 0:
            return -1
        return -2

    # -- DATA
    def data(self) -> Verdict:
        if self.notorious:
            return Verdict("DATA", False, reply("notorious_data"), "notorious", close=True)
        return Verdict("DATA", True, reply("data_go"), "ok")

    # -- AUTH success (SPEC A §7): relaying as RELAYCLIENT="" for the session
    def auth_success(self, user: str) -> None:
        self.authenticated = user

    def reset(self) -> None:
        self._reset_transaction()
