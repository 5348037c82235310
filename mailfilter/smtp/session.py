"""One SMTP session without I/O: engine + policy + AUTH + the transaction.

Job: everything one SMTP session decides, for the asyncio shell
(smtp/protocol.py) and for `mailfilter check` (mailfilter/check.py) alike, so
`check` answers what the server answers by construction. The Session owns

- the engine (smtp/engine.py: framing, command table, transitions, replies),
- the SessionPolicy (policy/: spamcontrol semantics, one Verdict per stage),
- the AUTH sub-dialogue (auth/session.py),
- the transaction: sender, MAIL parameters and the accepted recipients (as
  delivered), kept here and nowhere else (the engine keeps only the state
  its sequencing needs, the policy only its verdicts),
- the end-of-data policy: the engine's bare LF / hop / size refusal, the
  badmimetypes/badloadertypes scan, and the rule that decided,
- the decision log lines (log.py), one per verdict.

Theory of operation
-------------------
The shell feeds bytes with ``receive_data()`` and calls ``drain()``, which
answers every complete command synchronously and returns ``None`` when it
needs more input, or a *request* when an answer needs the world:

=================  ===========================================  ===================
request            the shell does                                then
=================  ===========================================  ===================
``Lookup``         starts the DNS query (HELOCHECK A/M:          ``drain()`` again
                   ``kind="helo"``; MFDNSCHECK: ``kind="mx"``)   at once (no wait)
                   in the background; a newer Lookup of the
                   same kind replaces (cancels) the older one
``AwaitLookups``   waits until the started lookups are           ``dns_answers()``,
                   answered (a RCPT needs them)                  ``resume()``
``Delay``          waits ``seconds`` (tarpit, RCPT)              ``resume()``
``Commit``         awaits ``sink.commit()`` (delivery)           ``resume(result)``
``AuthStep``       awaits ``awaitable`` (AUTH verification       ``resume(reply)``
                   and failure delay, auth/session.py)
``LimitCheck``     awaits ``awaitable``: a rate check in the      ``resume(over)``
                   shared (Redis) store (limits/anvil.py); with
                   the local store the check is synchronous
``Handshake``      writes the 220 to STARTTLS in clear, then     ``resume(info)``,
                   runs the TLS handshake (smtp/tls.py); a       info = "TLSv1.3/
                   failed one ends the connection (logged)       CIPHER"
=================  ===========================================  ===================

``resume()`` (or ``resume(error=exc)`` when the awaited thing raised) may
return the next request (DNS answers, then a tarpit Delay); else the shell
calls ``drain()`` again. While a request is outstanding the engine
holds any pipelined input (``next_event()`` is PAUSED), so replies leave in
command order (RFC 2920). ``data_to_send()`` gives every queued reply for one
write; ``closing`` says the session is over.

Invariants:
- no awaits and no sockets here: every method returns at once;
- "250 means stored": the reply to the end of data is the delivery's reply
  (a Commit's result), and a commit that raised is a 451, never a 250;
- a verdict is logged once, where it is given (pending HELO/MAIL verdicts
  when seen, RCPT verdicts when answered, DATA when the message is done);
- the PolicyEngine (and so the rule bundle) is the one the session started
  with; after STARTTLS the session starts over with a new SessionPolicy and
  AUTH dialogue from it (RFC 3207 §4.2: nothing said in clear is kept).
"""
from __future__ import annotations

import dataclasses
import logging
import time

from mailfilter import log
from mailfilter.auth.session import ip_key
from mailfilter.delivery import Envelope
from mailfilter.limits.anvil import BY_NAME as ANVIL_LIMITS, NO_LIMITS, ClientLimits
from mailfilter.policy.engine import Client, PolicyEngine, Verdict
from mailfilter.smtp.content import ContentScanner
from mailfilter.smtp.engine import (
    NEED_DATA, PAUSED, Anomaly, AuthResponse, AuthStart, BdatStart, Closed, DataChunk,
    DataEnd, DataStart, EngineConfig, Helo, Mail, Rcpt, Rset, SMTPConnection, StartTLS,
    host_of,
)
from mailfilter.smtp.received import received_header
from mailfilter.smtp.replies import REPLIES, Reply, reply
from mailfilter.tls import NO_TLS, TLSSettings

logger = logging.getLogger("mailfilter")

__all__ = ["SessionConfig", "Session", "Transaction",
           "Lookup", "AwaitLookups", "Delay", "Commit", "AuthStep", "LimitCheck", "Handshake",
           "AWAIT_LOOKUPS", "HANDSHAKE"]


# --- requests: what the session needs from the shell --------------------------
class Lookup:
    """Start a DNS check now and hand its answer back when a RCPT needs it:
    kind "helo" -> resolver.check(rdtype, name); kind "mx" -> resolver.has_mx(name)."""
    __slots__ = ("kind", "rdtype", "name")

    def __init__(self, kind: str, rdtype: str, name: str) -> None:
        self.kind = kind
        self.rdtype = rdtype
        self.name = name

    def __repr__(self) -> str:
        return f"Lookup({self.kind} {self.rdtype} {self.name})"


class AwaitLookups:
    """Wait for the answers of the Lookups started so far, then dns_answers()."""
    __slots__ = ()


AWAIT_LOOKUPS = AwaitLookups()


class Delay:
    """Wait `seconds` before the reply (tarpit)."""
    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Commit:
    """Await `sink.commit()`; resume(result) with its DeliveryResult."""
    __slots__ = ("sink",)

    def __init__(self, sink) -> None:
        self.sink = sink


class AuthStep:
    """Await `awaitable` (AUTH verification, failure delay); resume(reply)."""
    __slots__ = ("awaitable",)

    def __init__(self, awaitable) -> None:
        self.awaitable = awaitable


class LimitCheck:
    """Await `awaitable`, a rate check of the shared store (limits/anvil.py
    Anvil.over); resume(over) with its answer."""
    __slots__ = ("awaitable",)

    def __init__(self, awaitable) -> None:
        self.awaitable = awaitable


class Handshake:
    """The 220 to STARTTLS is queued: write it, run the TLS handshake, then
    resume(info) with the session's "version/cipher" (smtp/tls.describe)."""
    __slots__ = ()


HANDSHAKE = Handshake()


# --- configuration shared by the sessions of one policy ------------------------
# what a tcp.smtp `deny` client gets (docs/behaviour/tcp-smtp.md#denied-clients)
DENY_MODES = ("close", "rcpt")


class SessionConfig:
    """What every new session starts from: the policy (one rule bundle), the
    AUTH service, the delivery, the engine configuration. A SIGHUP reload
    makes a new SessionConfig; sessions in flight keep theirs."""

    __slots__ = ("policy", "auth", "delivery", "engine_config", "host", "dns", "tls", "offers",
                 "deny", "metrics", "anvil")

    def __init__(self, policy: PolicyEngine, *, auth=None, delivery=None, hostname: str | None = None,
                 features: list[str] | None = None, max_bad_commands: int = 10,
                 dns: bool = True, tls: TLSSettings = NO_TLS,
                 header_limit: int = 0, deny: str = "close", smtputf8: bool = True,
                 metrics=None, anvil=None) -> None:
        if deny not in DENY_MODES:
            raise ValueError(f"deny must be one of {', '.join(DENY_MODES)}, not {deny!r}")
        if auth is None:
            from mailfilter.auth.session import AuthService   # verifier made on first AUTH
            auth = AuthService()
        self.policy = policy
        self.auth = auth
        self.delivery = delivery
        self.dns = dns      # the shell can answer Lookups (it has a resolver)
        self.tls = tls      # STARTTLS offered when tls.available; --require-tls; --auth-plaintext
        self.deny = deny    # a tcp.smtp deny client: "close" (tcpserver) or "rcpt" (553 per RCPT)
        self.anvil = anvil  # the rate limits' counts (limits/anvil.py); None: no limits (`check`)
        self.offers: dict = {}  # (STARTTLS?, AUTH mechanisms) -> the extra EHLO keywords
        self.metrics = metrics  # metrics/counts.py Counts (serve --metrics), else None
        self.engine_config = EngineConfig(
            greeting=hostname or policy.greeting,
            databytes=policy.bundle.integers.get("databytes", 0),
            max_bad_commands=max_bad_commands,
            header_limit=header_limit,
            features=[f"rules-dialect={policy.bundle.dialect}", *(features or [])],
            # RFC 6531: offered unless `serve --no-smtputf8` (docs/behaviour/smtp.md#addresses)
            smtputf8=smtputf8,
        )
        self.host = host_of(self.engine_config.greeting)   # this server's name in replies


class Transaction:
    """The mail transaction (RFC 5321 §3.3): the one place that holds it."""

    __slots__ = ("sender", "params", "recipients")

    def __init__(self) -> None:
        self.sender: str | None = None      # as the policy took it (address literal rewritten)
        self.params: dict = _NO_PARAMS      # MAIL parameters (SIZE, BODY, AUTH, SMTPUTF8)
        self.recipients: list[str] = []     # accepted, as delivered (RELAYCLIENT suffix)

    def begin(self, sender: str | None, params: dict) -> None:
        """A MAIL the server took (2xx): a new transaction."""
        self.sender = sender
        self.params = params
        if self.recipients:
            self.recipients = []

    def clear(self) -> None:
        """RSET, HELO, end of data, a refused MAIL: no transaction."""
        if self.sender is not None or self.recipients:
            self.sender = None
            self.params = _NO_PARAMS
            self.recipients = []


_NO_LOOKUPS = frozenset()
_HELO = frozenset(("helo",))
_MX = frozenset(("mx",))
_NO_PARAMS: dict = {}     # shared, never mutated: MAIL's params dict replaces it


# the client ended the session (EOF, QUIT); the engine's own closes (too many
# errors, bare LF in DATA, an app reply 421/503 that closes) are logged
_QUIET_CLOSES = frozenset(("eof", "quit"))


class Session:
    """One SMTP session, sans-IO. See the module docstring."""

    __slots__ = ("config", "client", "label", "engine", "policy", "auth", "tx", "sink", "end",
                 "scanner",
                 "scan_choice", "lookups", "last_verdict", "_then", "tls", "tls_mode",
                 "_ctx_key", "_ctx_text", "body", "limits", "limit_key")

    def __init__(self, config: SessionConfig, client: Client, tls: str | None = None,
                 label: str | None = None, limits: ClientLimits | None = None) -> None:
        """`tls`: the "version/cipher" of an implicit-TLS connection (RFC 8314),
        whose session starts inside TLS; None for a connection in clear.
        `label`: the shell's host[ip]:port string for `client`, shared rather
        than made again (one string per connection, not three).
        `limits`: the client's anvil limits, as the shell checked its
        connection with (limits/anvil.py); made here when not given."""
        self.config = config
        self.client = client
        self.label = label or f"{client.host}[{client.ip}]:{client.port}"
        self.tx = Transaction()
        self.sink = None
        self.scanner: ContentScanner | None = None
        self.body: str | None = None                # "bdat": the message came by CHUNKING
        self.scan_choice: tuple | None = None      # (relay, mime, loader, strict, first)
        self.lookups = _NO_LOOKUPS                 # kinds asked for and not yet answered
        self.last_verdict: Verdict | None = None   # the latest policy verdict (`check` shows it)
        self._then = None                          # continuation of the outstanding request
        self.tls = tls                             # "TLSv1.3/CIPHER" once in TLS, else None
        self._ctx_key = None                       # (helo, sender, tls) _ctx_text was made for
        self._ctx_text = ""
        self.end: str | None = None                # the engine's close reason, once closed
        self.policy = sp = config.policy.session(client)
        anvil = config.anvil
        if limits is None:
            limits = NO_LIMITS if anvil is None else anvil.for_client(sp.profile, config.policy.where)
        self.limits = limits
        self.limit_key = ip_key(client.ip)      # IPv4 address, IPv6 /64 (as AUTH counts)
        # UCSPITLS (s/qmail's tcp.smtp setting): "-" no STARTTLS for this
        # client, "!" STARTTLS required before MAIL; --require-tls for all
        mode = sp.setting("UCSPITLS")
        self.tls_mode = "!" if config.tls.required and mode != "-" else (mode or "")
        cfg = config.engine_config
        if sp.databytes != cfg.databytes:
            cfg = dataclasses.replace(cfg, databytes=sp.databytes)
        self.engine = engine = SMTPConnection(cfg)
        # PLAIN and LOGIN only inside TLS when TLS can be had (RFC 4954 §4, 538)
        plaintext_ok = not config.tls.available or config.tls.plaintext_auth
        self.auth = config.auth.session(sp, client, config.host, tls=tls is not None,
                                        plaintext_ok=plaintext_ok,   # SMTPAUTH per client
                                        label=self.label)
        if tls is not None:
            engine.tls_started()
        self._offer()

    def _offer(self) -> None:
        """The EHLO keywords for this client now: STARTTLS while it can be
        had and is not running, AUTH with the mechanisms allowed so far.
        A handful of combinations exist per configuration: made once each."""
        engine = self.engine
        config = self.config
        starttls = self.tls is None and config.tls.available and self.tls_mode != "-"
        mechs = self.auth.mechanisms()
        key = (starttls, mechs)
        extra = config.offers.get(key)
        if extra is None:       # the engine's own keywords are the configuration's
            extra = config.offers[key] = (*config.engine_config.extra_ehlo,
                                          *(("STARTTLS",) if starttls else ()),
                                          *self.auth.ehlo_keywords())
        engine.set_extra_ehlo(extra)
        engine.auth_offered = bool(mechs)

    # --- the shell's API ----------------------------------------------------
    def start(self, dnsbl=None) -> bool:
        """Queue the greeting; False when there is no session: a tcp.smtp
        `deny` client with deny "close" is closed at once without a word, as
        tcpserver does (one decision line). With deny "rcpt" it gets its 220
        and 553 at every RCPT; the refusal is logged once, here.
        `dnsbl`: the client's policy/dnsbl.py score, when the rules have
        sites; a listed client that is not a relay client gets 554 5.7.1
        naming the zones instead of the greeting, and the session closes
        (docs/behaviour/control-files.md#dnsbl)."""
        v = self.last_verdict = self.policy.connect()
        profile = self.policy.profile
        if dnsbl is not None and dnsbl.blocked and profile.allowed and not profile.relay:
            r = REPLIES["dnsbl_listed"].format(ip=self.client.ip, zones=dnsbl.zones)
            v = self.last_verdict = Verdict("CONNECT", False, r, "dnsbl", dnsbl.rules)
            log.decision(v, client=self.label, tls=self.tls or "-", score=dnsbl.score)
            m = self.config.metrics
            if m is not None:
                m.decided(v)
                m.refuse("dnsbl")
            self.engine.abort(r)
            return True
        if not profile.allowed:
            if self.config.deny == "close":
                v = self.last_verdict = Verdict("CONNECT", False, REPLIES["client_denied"],
                                                "client_denied", v.rule)
                log.event(action="refuse", stage="CONNECT", reason="client_denied", rule=v.rule,
                          client=self.label, detail="closed")
                m = self.config.metrics
                if m is not None:
                    m.refuse("client_denied")
                return False
            self._log(v)
        self.engine.greet()
        return True

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" is EOF."""
        self.engine.receive_data(data)

    def data_to_send(self) -> bytes:
        return self.engine.data_to_send()

    @property
    def closing(self) -> bool:
        return self.engine.closing

    @property
    def host(self) -> str:
        return self.engine.host

    def drain(self):
        """Answer every complete event; None when input is needed (or the
        session closed), else the request the shell must fulfil first."""
        engine = self.engine
        handlers = _HANDLERS
        while True:
            ev = engine.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                return None
            handler = handlers.get(type(ev))
            if handler is not None:
                request = handler(self, ev)
                if request is not None:
                    return request
            if type(ev) is Closed:
                return None

    def resume(self, result=None, error: BaseException | None = None):
        """The answer to the outstanding request (or the exception it raised);
        returns the next request the answer led to (a tarpit Delay after the
        DNS answers), else None: then drain() goes on."""
        then, self._then = self._then, None
        if then is None:            # aborted meanwhile (timeout, shutdown): nothing owed
            return None
        return then(result, error)

    def dns_answers(self, answers: dict[str, str]) -> None:
        """The statuses of the lookups started so far, by kind (dns.py's
        ok/fail/temp/nullmx), handed in before the RCPT that waited."""
        sp = self.policy
        for kind, status in answers.items():
            if kind == "helo":
                sp.set_helo_dns(status)
            else:
                sp.set_mail_dns(status)
        self.lookups = _NO_LOOKUPS

    def abort(self, r: Reply) -> None:
        """An unsolicited final reply (timeout, shutdown, internal error): the
        message in progress is dropped, the session closes. A request still
        outstanding is finished by its resume() (a commit that completes
        still logs its decision line) but owes no reply any more."""
        self._drop_message()
        self.engine.abort(r)

    def lost(self) -> None:
        """The connection is gone: drop a message being received."""
        self._drop_message()

    def authenticated_as(self, user: str) -> None:
        """Treat the session as authenticated as `user` (`check --auth-user`)."""
        self.policy.auth_success(user)

    # --- helpers --------------------------------------------------------------
    def _log(self, v: Verdict, rcpt: str | None = None) -> None:
        m = self.config.metrics
        if m is not None:
            m.decided(v)
        if log.enabled():
            auth = self.policy.authenticated
            log.decision_in(v, self._ctx(), rcpt, None if auth is None else {"auth": auth})

    def _ctx(self) -> str:
        """The client=, tls=, helo=, from= fields of this session's decision
        lines, quoted once while they stay the same (two lines per message
        share them: the RCPT's and the DATA's)."""
        sp = self.policy
        key = (sp.helo_name, sp.sender, self.tls)
        if key != self._ctx_key:
            self._ctx_key = key
            self._ctx_text = log.kv_line({
                "client": self.label, "tls": self.tls or "-",
                "helo": None if sp.helo_name is None else f"<{sp.helo_name}>",
                "from": None if sp.sender is None else f"<{sp.sender}>"})
        return self._ctx_text

    def _drop_message(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        self.scanner = None

    def _wait(self, request, then):
        self._then = then
        return request

    # --- HELO / EHLO ------------------------------------------------------------
    def on_helo(self, ev: Helo):
        sp = self.policy
        v = self.last_verdict = sp.helo(ev.name)
        self.tx.clear()
        self._drop_message()        # a BDAT message in progress ends (RFC 5321 §4.1.4)
        if sp.helo_verdict is not None:
            self._log(v)
        engine = self.engine
        engine.send(engine.ehlo_reply() if ev.verb == "EHLO" else engine.helo_reply())
        if self.lookups:
            self.lookups = self.lookups - _HELO
        query = sp.helo_dns_query() if self.config.dns else None
        if query is not None:
            self.lookups = self.lookups | _HELO
            return Lookup("helo", query[0], query[1])
        return None

    # --- MAIL ---------------------------------------------------------------------
    def on_mail(self, ev: Mail):
        if self.tls_mode == "!" and self.tls is None:
            return self._tls_first()
        if self.limits.msg_rate:        # 0 (the default): no count, no cost
            return self._rate("msg", "msg_rate", lambda: self._mail(ev))
        return self._mail(ev)

    def _mail(self, ev: Mail):
        sp = self.policy
        v = self.last_verdict = sp.mail(ev.address)
        if v.reply.code < 300:
            self.tx.begin(sp.sender, ev.params)
        else:
            self.tx.clear()
        if not v.accept or sp.sender_verdict is not None:
            self._log(v)
        if self.lookups:
            self.lookups = self.lookups - _MX
        self.engine.send(v.reply)
        domain = sp.mail_dns_query() if self.config.dns else None
        if domain is not None:
            self.lookups = self.lookups | _MX
            return Lookup("mx", "MX", domain)
        return None

    # --- anvil rates (docs/behaviour/limits.md) ----------------------------------
    def _rate(self, kind: str, name: str, go, rcpt: str | None = None):
        """Count a MAIL ("msg") or RCPT ("rcpt") of the client; over its
        limit: the limit's 451 and decision line, else `go()` (the command's
        own checks). The shared store's check is awaited by the shell."""
        over = self.config.anvil.over(kind, self.limit_key, getattr(self.limits, name))
        if over is False:
            return go()
        if over is True:
            return self._over_limit(name, rcpt)
        return self._wait(LimitCheck(over), lambda o, error: self._rate_answer(o, error, name, go, rcpt))

    def _rate_answer(self, over: bool, error, name: str, go, rcpt: str | None):
        if error is not None:
            raise error
        if self.engine.pending is None:     # aborted meanwhile (timeout, shutdown)
            return None
        return self._over_limit(name, rcpt) if over else go()

    def _over_limit(self, name: str, rcpt: str | None):
        """The 451 of a rate limit, one decision line naming it and where
        its value came from (the client's tcp.smtp line or the option)."""
        lim = ANVIL_LIMITS[name]
        v = self.last_verdict = Verdict(lim.stage, False, REPLIES[lim.reply], name,
                                        self.limits.rule(name))
        self._log(v, rcpt)
        m = self.config.metrics
        if m is not None:
            m.limit_hit(name)
        if rcpt is None:
            self.tx.clear()
        self.engine.send(v.reply)
        return None

    def _tls_first(self):
        """530 before MAIL in clear when the client must use TLS (UCSPITLS="!"
        or --require-tls, RFC 3207 §4); the policy is not asked."""
        rid = self.policy.profile.setting_rule("UCSPITLS")
        rule = self.policy.engine.bundle.where(rid) if rid >= 0 else "require-tls"
        v = self.last_verdict = Verdict("MAIL", False, REPLIES["tls_required"], "tls_required", rule)
        self._log(v)
        self.tx.clear()
        self.engine.send(v.reply)
        return None

    # --- RCPT -----------------------------------------------------------------------
    def on_rcpt(self, ev: Rcpt):
        if self.lookups:            # HELOCHECK / MFDNSCHECK answers needed first
            return self._wait(AWAIT_LOOKUPS, lambda _r, error: self._rcpt(ev, error))
        return self._rcpt(ev, None)

    def _rcpt(self, ev: Rcpt, error):
        if error is not None:
            raise error
        if self.limits.rcpt_rate:
            return self._rate("rcpt", "rcpt_rate", lambda: self._rcpt_policy(ev), ev.address)
        return self._rcpt_policy(ev)

    def _rcpt_policy(self, ev: Rcpt):
        v = self.last_verdict = self.policy.rcpt(ev.address, ev.routed)
        if v.delay:
            return self._wait(Delay(v.delay), lambda _r, err: self._rcpt_answer(ev, v, err))
        return self._rcpt_answer(ev, v, None)

    def _rcpt_answer(self, ev: Rcpt, v: Verdict, error):
        if error is not None:
            raise error
        if v.accept:
            self.tx.recipients.append(v.recipient if v.recipient is not None else ev.address)
        self._log(v, ev.address)
        if self.engine.pending is not None:     # None: aborted during a tarpit
            self.engine.send(v.reply)
        return None

    # --- DATA -------------------------------------------------------------------------
    def on_data_start(self, ev: DataStart | BdatStart):
        """DATA, or the first BDAT of a transaction (RFC 3030): the same
        policy, envelope, Received header and content scan; the engine sends
        no 354 to a BDAT (docs/behaviour/smtp.md#chunking)."""
        sp = self.policy
        self.body = "bdat" if type(ev) is BdatStart else None
        v = self.last_verdict = sp.data()
        if not v.accept:
            self._log(v)
            # notorious session: 503 and hang up; the engine closes, so
            # nothing pipelined after DATA is parsed or checked
            self.engine.send(v.reply, close=v.close)
            return None
        tx = self.tx
        client = self.client
        env = Envelope(
            sender=tx.sender or "", recipients=list(tx.recipients), helo=sp.helo_name or "",
            client_ip=client.ip, client_host=client.host, auth_user=sp.authenticated, tls=self.tls,
            local_host=self.engine.host, esmtp=self.engine.esmtp,
            smtputf8="SMTPUTF8" in tx.params, qmailqueue=sp.profile.settings.get("QMAILQUEUE"))
        sink = self.config.delivery.open(env)
        sink.write(received_header(env))
        self.sink = sink
        self.scanner = self._content_scanner()
        self.engine.send(v.reply)
        return None

    def _content_scanner(self) -> ContentScanner | None:
        """A scanner per message when the client's BADMIMETYPE/BADLOADERTYPE
        ask for one; the choice depends only on the session's settings and
        its relay state, so it is made once per relay state."""
        relay = self.policy.relay_client
        choice = self.scan_choice
        if choice is None or choice[0] != relay:
            choice = self.scan_choice = (relay, *self._scan_lists(relay))
        _, mime, loader, strict, first = choice
        if mime is None and loader is None and not strict:
            return None
        return ContentScanner(mime, loader, strict_whitespace=strict, loader_first=first)

    def _scan_lists(self, relay: bool):
        sp = self.policy
        sigs = sp.engine.bundle.signatures
        mime_mode = sp.setting("BADMIMETYPE")
        loader_mode = sp.setting("BADLOADERTYPE")
        mime = sigs.get("badmimetypes") if mime_mode is not None and mime_mode != "-" \
            and not (mime_mode == "+" and relay) else None
        loader = sigs.get("badloadertypes") if loader_mode and loader_mode != "-" \
            and not (loader_mode == "+" and relay) else None
        # BADLOADERTYPE=c: spamcontrol looks up only the windows starting with c;
        # "+" (no character given) looks at every window
        first = ord(loader_mode[0]) if loader and loader_mode != "+" else None
        # "!" checks whitespace in base64 lines even without a badmimetypes file
        return mime, loader, mime_mode == "!", first

    def on_data_chunk(self, ev: DataChunk):
        if self.sink is not None:
            self.sink.write(ev.data)
        if self.scanner is not None:
            self.scanner.feed(ev.data)
        return None

    def on_data_end(self, ev: DataEnd):
        engine = self.engine
        sink, self.sink = self.sink, None
        scanner, self.scanner = self.scanner, None
        reason = engine.data_end_refusal(ev)       # the reply's name is the reason
        rule = None
        if reason is None and scanner is not None:
            scanner.finish()
            if scanner.hit is not None:
                kind, rid = scanner.hit
                reason = "bad_content"
                if rid < 0:     # whitespace in base64: the client's BADMIMETYPE="!" decided
                    rid = self.policy.profile.setting_rule("BADMIMETYPE")
                rule = self.policy.engine.bundle.where(rid) if rid >= 0 else kind
        if reason is not None:
            r = reply(reason)
            if sink is not None:
                sink.abort()
            if rule is None:
                rule = self._data_end_rule(reason)
            m = self.config.metrics
            if m is not None:
                action = "tempfail" if r.temporary else "reject"
                m.verdict("DATA", action, rule)
                m.message("tempfailed" if r.temporary else "rejected", ev.size)
            if log.enabled():
                ctx, to, auth = self._who()
                log.event_in({"action": "tempfail" if r.temporary else "reject", "stage": "DATA",
                              "rule": rule, "reason": reason}, ctx,
                             {"to": to, "auth": auth, "size": ev.size, "hops": ev.hops,
                              "body": self.body, "reply": str(r)})
            self.tx.clear()
            engine.send(r)
            return None
        # the transaction as the decision line names it, taken before any await
        who = self._who() if log.enabled() else None
        t0 = time.monotonic()
        try:
            result = sink.commit_now()
        except Exception:
            engine.send(self._commit_failed(sink, who, None, ev.size))
            return None
        if result is None:              # the next hop needs I/O: the shell awaits it
            return self._wait(Commit(sink), lambda res, error: self._commit_done(sink, ev, t0, who, res, error))
        engine.send(self._committed(result, ev, t0, who))
        return None

    def _commit_done(self, sink, ev: DataEnd, t0: float, who, result, error) -> None:
        if error is not None:
            r = self._commit_failed(sink, who, error, ev.size)
        else:
            r = self._committed(result, ev, t0, who)
        if self.engine.pending is not None:
            self.engine.send(r)

    def _who(self) -> tuple[str, str | None, str | None]:
        """(client= tls= helo= from= as _ctx makes them, to= (every accepted
        recipient, comma separated), auth=) for a DATA-stage decision line."""
        rcpts = self.tx.recipients
        to = f"<{rcpts[0]}>" if len(rcpts) == 1 else (",".join(f"<{r}>" for r in rcpts) or None)
        return self._ctx(), to, self.policy.authenticated

    def _data_end_rule(self, reason: str) -> str | None:
        """What decided an engine refusal at the end of data: the size limit
        names where DATABYTES came from (the client's tcp.smtp line, else the
        databytes control file); the hop limit is qmail's built-in MAXHOPS;
        bare LF is refused unconditionally (no rule)."""
        if reason == "size_exceeded":
            rid = self.policy.profile.setting_rule("DATABYTES")
            return self.policy.engine.bundle.where(rid) if rid >= 0 else "databytes"
        if reason == "too_many_hops":
            return "maxhops"
        return None

    def _commit_failed(self, sink, who: tuple | None, error: BaseException | None, size: int) -> Reply:
        """A commit that raised: the message is dropped, the client retries (451)."""
        if error is None:
            logger.exception("delivery failed client=%s", self.label)
        else:
            logger.error("delivery failed client=%s", self.label, exc_info=error)
        sink.abort()
        r = reply("store_failed")
        m = self.config.metrics
        if m is not None:
            m.verdict("DATA", "tempfail", None)
            m.message("tempfailed", size)
            m.delivery("error", None)
        if who is not None:
            ctx, to, auth = who
            log.event_in({"action": "tempfail", "stage": "DATA", "reason": "delivery_error"}, ctx,
                         {"to": to, "auth": auth, "body": self.body, "reply": str(r)})
        self.tx.clear()
        return r

    def _committed(self, result, ev: DataEnd, t0: float, who: tuple | None) -> Reply:
        """The reply to a finished commit; its decision line."""
        m = self.config.metrics
        if m is not None:
            r = result.reply
            m.committed("accept" if result.ok else ("tempfail" if r.temporary else "reject"),
                        ev.size, time.monotonic() - t0)
        if who is not None:   # format the line only if someone reads it
            ctx, to, auth = who
            r = result.reply
            log.event_in(
                {"action": "accept" if result.ok else ("tempfail" if r.temporary else "reject"),
                 "stage": "DATA"}, ctx,
                {"to": to, "auth": auth, "size": ev.size, "rcpts": len(self.tx.recipients),
                 "header_cut": "yes" if ev.header_cut else None, "body": self.body,
                 "ms": f"{(time.monotonic() - t0) * 1000:.1f}",
                 "detail": result.detail or None, "reply": str(r)})
        self.tx.clear()
        return result.reply

    # --- AUTH, RSET, anomalies, close ---------------------------------------------
    def on_auth(self, ev):
        """The AUTH sub-dialogue (auth/session.py); verification and the
        failure delay are awaited by the shell."""
        r = self.auth.handle(ev)
        if isinstance(r, Reply):
            self.engine.send(r)
            return None
        return self._wait(AuthStep(r), self._auth_done)

    def _auth_done(self, r, error) -> None:
        if error is not None:
            raise error
        if self.engine.pending is not None:
            self.engine.send(r)

    def on_starttls(self, ev: StartTLS):
        """220 and a Handshake request, or 454 when TLS cannot be had here
        (no certificate, --no-tls, UCSPITLS="-" for this client)."""
        if not self.config.tls.available or self.tls_mode == "-":
            self.engine.send(REPLIES["tls_unavailable"])
            return None
        self.engine.send(REPLIES["starttls_go"])
        return self._wait(HANDSHAKE, self._tls_started)

    def _tls_started(self, info, error) -> None:
        """The handshake succeeded: the session starts over inside TLS,
        knowing nothing the client said in clear (RFC 3207 §4.2)."""
        if error is not None:
            raise error
        self.tls = info
        self.engine.tls_started()
        # a new SessionPolicy and AUTH dialogue: HELO, its verdict, AUTH and
        # the transaction are gone; the client's tcp.smtp profile is the same
        config = self.config
        self.policy = sp = config.policy.session(self.client)
        self.auth = config.auth.session(sp, self.client, config.host, tls=True, plaintext_ok=True,
                                        label=self.label)
        self.scan_choice = None
        self.lookups = _NO_LOOKUPS
        self.tx.clear()
        self._offer()

    def on_rset(self, ev: Rset):
        self.policy.reset()
        self.tx.clear()
        self._drop_message()        # a BDAT message in progress is dropped (RFC 3030 §2)
        return None

    def on_anomaly(self, ev: Anomaly):
        log.anomaly(ev.tag, client=self.label, detail=ev.detail)
        return None

    def on_closed(self, ev: Closed):
        self._drop_message()
        self.end = ev.reason
        if ev.reason not in _QUIET_CLOSES:     # the server hung up: say why
            r = self.engine.close_reply
            log.event(action="close", reason=ev.reason.replace(" ", "_"), client=self.label,
                      reply=None if r is None else str(r))
        return None


_HANDLERS = {
    Helo: Session.on_helo,
    Mail: Session.on_mail,
    Rcpt: Session.on_rcpt,
    DataStart: Session.on_data_start,
    BdatStart: Session.on_data_start,
    DataChunk: Session.on_data_chunk,
    DataEnd: Session.on_data_end,
    AuthStart: Session.on_auth,
    AuthResponse: Session.on_auth,
    StartTLS: Session.on_starttls,
    Rset: Session.on_rset,
    Anomaly: Session.on_anomaly,
    Closed: Session.on_closed,
}
"""Event type -> the Session's handler; events not listed (Quit, Noop, Vrfy,
Help) were answered by the engine and need nothing."""
