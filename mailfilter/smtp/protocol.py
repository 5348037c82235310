"""The uvloop/asyncio shell: sockets in, engine + policy + delivery, replies out.

Job: one SMTPProtocol per connection feeds received bytes to the sans-IO
engine (smtpconn), answers each event from the policy (synchronously, inside
data_received) and writes every reply produced by one read in ONE
transport.write, so pipelined commands cost one syscall (RFC 2920).

The only awaits are where the world is slow: the client's host name (reverse
DNS before the greeting, as tcpserver does before qmail-smtpd runs), DNS
answers for HELOCHECK A/M and MFDNSCHECK (started when HELO/MAIL arrive,
awaited at RCPT only if not yet done), tarpit delays, and the delivery commit
after DATA. While one of those is in flight the connection stops reading
(back-pressure) and the engine keeps any pipelined input buffered; nothing
else on the loop waits.

The host name (TCPREMOTEHOST, `remote_host`): "off" keeps "unknown"
(tcpserver -H); "ptr" takes the first PTR name; "confirmed" (the default,
tcpserver -p / Postfix) keeps it only if it resolves back to the client's
address. The session policy (tcp.smtp `=host` keys, HELOCHECK "=",
decorated badmailfrom, the Received header) is made once the name is known;
bytes a client sends before the greeting are kept until then (reading stops
past EARLY_MAX), and a client that leaves meanwhile cancels the lookup.

Invariants:
- a session keeps the PolicyEngine (and so the bundle) and the Limits it
  started with; a SIGHUP reload swaps ServerState.policy and .limits for new
  sessions only;
- "250 means stored": the reply after DATA is the delivery's reply; an
  exception anywhere in a session is logged with its traceback and answered
  421 4.3.0 on that connection only (DESIGN.md, Errors and logging);
- limits: global and per-IP connection caps (421 4.7.0 at connect), an idle
  timeout per read, a total session deadline, the engine's line and
  bad-command limits, databytes while streaming.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict

from mailfilter import log
from mailfilter.auth.session import AuthService
from mailfilter.smtp.content import ContentScanner
from mailfilter.delivery import Delivery, Envelope
from mailfilter.policy.engine import Client, PolicyEngine, Verdict
from mailfilter.smtp.received import received_header
from mailfilter.smtp.replies import Reply, reply
from mailfilter.smtp.engine import (
    NEED_DATA, PAUSED, Anomaly, AuthResponse, AuthStart, Closed, DataChunk, DataEnd,
    DataStart, EngineConfig, Helo, Mail, Rcpt, Rset, SMTPConnection, host_of,
)

logger = logging.getLogger("mailfilter")

REMOTE_HOST_MODES = ("off", "ptr", "confirmed")
EARLY_MAX = 64 * 1024       # bytes kept from a client that talks before the greeting


@dataclasses.dataclass
class Limits:
    max_connections: int = 10_000
    max_per_ip: int = 100
    idle_timeout: float = 300.0        # per read; RFC 5321 §4.5.3.2 wants >= 5 min
    session_deadline: float = 3600.0
    max_bad_commands: int = 10


class ServerState:
    """Per-process shared state: the current policy, delivery, resolver, counters."""

    def __init__(self, policy: PolicyEngine, delivery: Delivery, *, limits: Limits | None = None,
                 resolver=None, hostname: str | None = None, features: list[str] | None = None,
                 auth: AuthService | None = None, remote_host: str = "confirmed"):
        if remote_host not in REMOTE_HOST_MODES:
            raise ValueError(f"remote_host must be one of {', '.join(REMOTE_HOST_MODES)}, "
                             f"not {remote_host!r}")
        self.policy = policy
        self.delivery = delivery
        self.resolver = resolver
        self.remote_host = remote_host
        self.limits = limits or Limits()
        self.hostname = hostname
        self.features = features or []
        self.auth = auth if auth is not None else AuthService()   # verifier made on first AUTH
        self.connections = 0
        self.per_ip: dict[str, int] = defaultdict(int)
        self.sessions: set["SMTPProtocol"] = set()
        self.engine_config = self._engine_config(policy)
        self.host = host_of(self.engine_config.greeting)   # for replies before a session exists
        self.loop: asyncio.AbstractEventLoop | None = None    # cached: get_running_loop() costs a getpid()

    def _engine_config(self, policy: PolicyEngine) -> EngineConfig:
        greeting = self.hostname or policy.greeting
        return EngineConfig(
            greeting=greeting,
            databytes=policy.bundle.integers.get("databytes", 0),
            max_bad_commands=self.limits.max_bad_commands,
            features=[f"rules-dialect={policy.bundle.dialect}", *self.features],
        )

    def swap_policy(self, policy: PolicyEngine, limits: Limits | None = None) -> None:
        """Atomically switch new sessions to `policy` and, when given, to
        `limits` (SIGHUP reload: timeoutsmtpd / timeoutsession may have
        changed); sessions in flight keep the objects they hold."""
        if limits is not None:
            self.limits = limits
        self.policy = policy
        self.engine_config = self._engine_config(policy)
        self.host = host_of(self.engine_config.greeting)

    @property
    def looks_up_hosts(self) -> bool:
        """False with remote_host "off" or without a resolver: every client
        is "unknown" and no session waits."""
        return self.remote_host != "off" and self.resolver is not None

    async def host_name(self, ip: str) -> str:
        """The client's host name per remote_host (dnscheck.Resolver.remote_host)."""
        return await self.resolver.remote_host(ip, confirm=self.remote_host == "confirmed")


class SMTPProtocol(asyncio.Protocol):
    __slots__ = (
        "state", "transport", "engine", "sp", "client", "client_label", "loop",
        "last_read", "timer", "deadline_at", "waiting", "task", "sink",
        "scanner", "scan_choice", "rcpts", "helo_dns", "mail_dns", "counted", "reading_paused",
        "auth", "limits", "early", "write_paused",
    )

    def __init__(self, state: ServerState):
        self.state = state
        self.engine: SMTPConnection | None = None
        self.transport = None
        self.waiting = False
        self.task: asyncio.Task | None = None
        self.sink = None
        self.scanner: ContentScanner | None = None
        self.scan_choice: tuple | None = None      # (relay, mime, loader, strict)
        self.rcpts: list[str] = []
        self.helo_dns: asyncio.Task | None = None
        self.mail_dns: asyncio.Task | None = None
        self.counted = False
        self.reading_paused = False
        self.write_paused = False   # the transport's buffer is full (pause_writing)
        self.timer = None               # one timer per connection: idle and deadline
        self.deadline_at = 0.0
        self.auth = None
        self.limits: Limits | None = None   # the state's Limits when the session began
        self.early: bytearray | None = None  # input before the greeting (host lookup)

    # ------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        st = self.state
        lim = st.limits
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        ip = peer[0]
        host = st.host
        if st.connections >= lim.max_connections:
            transport.write(reply("too_many_conns", host=host).line())
            transport.close()
            log.event(action="refuse", stage="CONNECT", reason="max_connections", client=f"[{ip}]")
            return
        if st.per_ip[ip] >= lim.max_per_ip:
            transport.write(reply("too_many_conns_ip", host=host).line())
            transport.close()
            log.event(action="refuse", stage="CONNECT", reason="max_per_ip", client=f"[{ip}]")
            return
        st.connections += 1
        st.per_ip[ip] += 1
        st.sessions.add(self)
        self.counted = True
        loop = st.loop
        if loop is None or loop.is_closed():
            loop = st.loop = asyncio.get_running_loop()
        self.loop = loop
        self.limits = lim
        self.deadline_at = loop.time() + lim.session_deadline
        self.client = Client(ip=ip, port=peer[1], local_ip=local[0], local_port=local[1])
        if not st.looks_up_hosts:
            self._start_session()
            return
        self.early = bytearray()
        self.task = loop.create_task(self._resolve_host())

    async def _resolve_host(self) -> None:
        """TCPREMOTEHOST first (tcpserver resolves before qmail-smtpd runs:
        tcp.smtp `=host` rules decide allow/deny and settings), then the
        session; input that came meanwhile is processed after the greeting."""
        try:
            host = await self.state.host_name(self.client.ip)
        except Exception:
            logger.exception("host name lookup failed client=[%s]", self.client.ip)
            host = "unknown"
        self.task = None
        if self.transport.is_closing():
            return
        self.client.host = host or "unknown"
        self._start_session()
        early, self.early = self.early, None
        if early and self.engine is not None:
            self.data_received(bytes(early))
        if not self.waiting:
            self._resume_reading()

    def _start_session(self) -> None:
        """The session policy, the engine and the greeting for self.client."""
        st = self.state
        transport = self.transport
        client = self.client
        self.client_label = f"{client.host}[{client.ip}]:{client.port}"
        try:
            self.sp = st.policy.session(client)
            cfg = st.engine_config
            databytes = self.sp.databytes
            if databytes != cfg.databytes:
                cfg = dataclasses.replace(cfg, databytes=databytes)
            self.engine = SMTPConnection(cfg)
            self.auth = st.auth.session(self.sp, client, st.host)   # SMTPAUTH, SPEC B §4.3
            offer = self.auth.ehlo_keywords()
            if offer:
                self.engine.set_extra_ehlo([*cfg.extra_ehlo, *offer])
            self.engine.auth_offered = bool(offer)
            verdict = self.sp.connect()
            if not self.sp.profile.allowed:     # 220 now, 553 at every RCPT: say so once
                self._log(verdict)
            self.engine.greet()
            self._flush()
        except Exception:
            logger.exception("session setup failed client=%s", self.client_label)
            self.engine = None
            transport.write(reply("internal_error", host=st.host).line())
            self._close()
            return
        now = self.loop.time()
        self.last_read = now
        self.timer = self.loop.call_at(min(now + self.limits.idle_timeout, self.deadline_at),
                                       self._timer_due)

    def connection_lost(self, exc) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        if self.timer is not None:
            self.timer.cancel()
        for task in (self.task, self.helo_dns, self.mail_dns):
            if task is not None and not task.done():
                task.cancel()
        if self.counted:
            st = self.state
            st.connections -= 1
            ip = self.client.ip
            left = st.per_ip[ip] - 1
            if left:
                st.per_ip[ip] = left
            else:
                del st.per_ip[ip]
            st.sessions.discard(self)
            self.counted = False

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.waiting:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        """Reading resumes only when nothing holds it: neither a reply in
        flight (`waiting`, checked by the callers) nor a full write buffer --
        an async reply finishing must not lift the back-pressure, or a client
        that never reads makes the server buffer replies without limit."""
        if self.write_paused:
            return
        if self.reading_paused and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------ timers
    def _timer_due(self) -> None:
        """The connection's one timer: the session deadline, else the idle
        timeout. Re-armed lazily (not one timer per read) at the earlier of
        the two real due times (a fixed minimum here made every timeout late:
        --timeout 1 behaved like 2); while a reply is in flight the client is
        not idle, so the idle clock restarts."""
        now = self.loop.time()
        if now >= self.deadline_at:
            log.event(action="close", reason="session_deadline", client=self.client_label)
            self._abort(reply("session_deadline", host=self.engine.host))
            return
        idle = self.limits.idle_timeout
        due = now + idle if self.waiting else self.last_read + idle
        if now < due:
            self.timer = self.loop.call_at(min(due, self.deadline_at), self._timer_due)
            return
        log.event(action="close", reason="timeout", client=self.client_label)
        self._abort(reply("timeout", host=self.engine.host))

    def _abort(self, r) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.engine is None:          # no session yet (host lookup): just hang up
            self._close()
            return
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        self.engine.abort(r)
        self._flush()

    # ------------------------------------------------------------ input
    def data_received(self, data: bytes) -> None:
        engine = self.engine
        if engine is None:
            self._early_data(data)
            return
        self.last_read = self.loop.time()
        engine.receive_data(data)
        if not self.waiting:
            self._drain()

    def _early_data(self, data: bytes) -> None:
        """Input before the greeting (host lookup in flight): kept, and reading
        stops once EARLY_MAX bytes wait (no session yet: nothing else to do)."""
        early = self.early
        if early is None:                # session setup failed: closing
            return
        early += data
        if len(early) > EARLY_MAX:
            self._pause_reading()

    def eof_received(self):
        if self.engine is None:
            # EOF before the greeting (host lookup in flight): the client is
            # gone (a FIN looks the same as a half-close, and a client that
            # talks before the 220 is misbehaving anyway): the lookup is
            # cancelled with the connection, nothing is answered.
            return False
        self.engine.receive_data(b"")
        if not self.waiting:
            self._drain()
        return False

    def _drain(self) -> None:
        """Process every complete event; replies leave in one write."""
        engine = self.engine
        handlers = _HANDLERS
        try:
            while True:
                ev = engine.next_event()
                if ev is NEED_DATA or ev is PAUSED:
                    break
                handler = handlers.get(type(ev))
                if handler is not None:
                    handler(self, ev)
                    if self.waiting:
                        break
                if type(ev) is Closed:
                    break
        except Exception:
            logger.exception("internal error client=%s", self.client_label)
            self._abort(reply("internal_error", host=engine.host))
            return
        self._flush()

    def _flush(self) -> None:
        out = self.engine.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)
        if self.engine.closing and not self.transport.is_closing():
            self._close()

    def _close(self) -> None:
        """Close once the replies are out. close() alone waits for the write
        buffer to drain, forever if the client stops reading, and the
        connection keeps its slot (max_per_ip, max_connections): such a
        client gets one more idle timeout to read, then the connection is
        aborted."""
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(self.limits.idle_timeout, transport.abort)

    # ------------------------------------------------------------ async replies
    def _later(self, coro) -> None:
        """Answer the pending event from a coroutine; input waits meanwhile."""
        self.waiting = True
        self._pause_reading()
        self.task = self.loop.create_task(self._run_later(coro))

    async def _run_later(self, coro) -> None:
        engine = self.engine
        try:
            r = await coro
            if engine.pending is not None:
                engine.send(r)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("internal error client=%s", self.client_label)
            self.waiting = False
            self._abort(reply("internal_error", host=engine.host))
            return
        self.waiting = False
        self.task = None
        if self.transport.is_closing():
            return
        self.last_read = self.loop.time()
        self._resume_reading()
        self._drain()

    def _log(self, v: Verdict, rcpt: str | None = None) -> None:
        log.decision(v, client=self.client_label, helo=self.sp.helo_name,
                     sender=self.sp.sender, rcpt=rcpt, auth=self.sp.authenticated)

    # ------------------------------------------------------------ events
    def on_helo(self, ev: Helo) -> None:
        sp = self.sp
        v = sp.helo(ev.name)
        self.rcpts = []
        if sp.helo_verdict is not None:
            self._log(v)
        query = sp.helo_dns_query()
        self.helo_dns = _cancelled(self.helo_dns)   # one lookup per session at a time
        if query is not None and self.state.resolver is not None:
            self.helo_dns = self.loop.create_task(self.state.resolver.check(*query))
        engine = self.engine
        engine.send(engine.ehlo_reply() if ev.verb == "EHLO" else engine.helo_reply())

    def on_mail(self, ev: Mail) -> None:
        sp = self.sp
        v = sp.mail(ev.address)
        self.rcpts = []
        if not v.accept or sp.sender_verdict is not None:
            self._log(v)
        self.mail_dns = _cancelled(self.mail_dns)
        domain = sp.mail_dns_query()
        if domain is not None and self.state.resolver is not None:
            self.mail_dns = self.loop.create_task(self.state.resolver.has_mx(domain))
        self.engine.send(v.reply)

    def on_rcpt(self, ev: Rcpt) -> None:
        pending = [t for t in (self.helo_dns, self.mail_dns) if t is not None and not t.done()]
        if pending:
            self._later(self._rcpt_after_dns(ev, pending))
            return
        self._apply_dns()
        v = self.sp.rcpt(ev.address)
        if v.delay:
            self._later(self._tarpit(ev, v))
            return
        self._rcpt_verdict(ev, v)

    def _apply_dns(self) -> None:
        sp = self.sp
        for task, setter in ((self.helo_dns, sp.set_helo_dns), (self.mail_dns, sp.set_mail_dns)):
            if task is not None:
                setter(task.result())
        self.helo_dns = self.mail_dns = None

    async def _rcpt_after_dns(self, ev: Rcpt, pending):
        await asyncio.gather(*pending)
        self._apply_dns()
        v = self.sp.rcpt(ev.address)
        if v.delay:
            await asyncio.sleep(v.delay)
        self._record_rcpt(ev, v)
        return v.reply

    async def _tarpit(self, ev: Rcpt, v: Verdict):
        await asyncio.sleep(v.delay)
        self._record_rcpt(ev, v)
        return v.reply

    def _record_rcpt(self, ev: Rcpt, v: Verdict) -> None:
        if v.accept:
            self.rcpts.append(v.recipient if v.recipient is not None else ev.address)
        self._log(v, ev.address)

    def _rcpt_verdict(self, ev: Rcpt, v: Verdict) -> None:
        self._record_rcpt(ev, v)
        self.engine.send(v.reply)

    def on_data_start(self, ev: DataStart) -> None:
        sp = self.sp
        v = sp.data()
        if not v.accept:
            self._log(v)
            # notorious session: 503 and hang up (B §2.8); the engine closes,
            # so nothing pipelined after DATA is parsed or checked
            self.engine.send(v.reply, close=v.close)
            return
        env = Envelope(
            sender=sp.sender or "", recipients=list(self.rcpts), helo=sp.helo_name or "",
            client_ip=self.client.ip, client_host=self.client.host,
            auth_user=sp.authenticated, tls=False,
            local_host=self.engine.host, esmtp=self.engine.esmtp)
        sink = self.state.delivery.open(env)
        sink.write(received_header(env))
        self.sink = sink
        self.scanner = self._content_scanner()
        self.engine.send(v.reply)

    def _content_scanner(self) -> ContentScanner | None:
        """A scanner per message when the client's BADMIMETYPE/BADLOADERTYPE
        ask for one (SPEC B §2.8); the choice depends only on the session's
        settings and its relay state, so it is made once per relay state."""
        relay = self.sp.relay_client
        choice = self.scan_choice
        if choice is None or choice[0] != relay:
            choice = self.scan_choice = (relay, *self._scan_lists(relay))
        _, mime, loader, strict, first = choice
        if mime is None and loader is None and not strict:
            return None
        return ContentScanner(mime, loader, strict_whitespace=strict, loader_first=first)

    def _scan_lists(self, relay: bool):
        sp = self.sp
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

    def on_data_chunk(self, ev: DataChunk) -> None:
        if self.sink is not None:
            self.sink.write(ev.data)
        if self.scanner is not None:
            self.scanner.feed(ev.data)

    def on_data_end(self, ev: DataEnd) -> None:
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
                    rid = self.sp.profile.setting_rule("BADMIMETYPE")
                rule = self.sp.engine.bundle.where(rid) if rid >= 0 else kind
        if reason is not None:
            r = reply(reason)
            if sink is not None:
                sink.abort()
            if rule is None:
                rule = self._data_end_rule(reason)
            if log.logger.isEnabledFor(logging.INFO):
                log.event(action="tempfail" if r.temporary else "reject", stage="DATA",
                          rule=rule, reason=reason, client=self.client_label,
                          **self._who(), size=ev.size, hops=ev.hops, reply=str(r))
            self.rcpts = []
            engine.send(r)
            return
        # the transaction as the decision line names it, taken before any await
        who = self._who() if log.logger.isEnabledFor(logging.INFO) else None
        t0 = time.monotonic()
        try:
            result = sink.commit_now()
        except Exception:
            engine.send(self._commit_failed(sink, who))
            return
        if result is None:              # the next hop needs I/O: answer from a Task
            self._later(self._commit(sink, ev, t0, who))
        else:                           # nothing to wait for: no Task, input keeps flowing
            engine.send(self._committed(result, ev, t0, who))

    def _who(self) -> dict:
        """helo=, from= and to= (every accepted recipient, comma separated)
        for a DATA-stage decision line, as DESIGN "Errors and logging" has them."""
        sp = self.sp
        return {"helo": None if sp.helo_name is None else f"<{sp.helo_name}>",
                "from": None if sp.sender is None else f"<{sp.sender}>",
                "to": ",".join(f"<{r}>" for r in self.rcpts) or None,
                "auth": sp.authenticated}

    def _data_end_rule(self, reason: str) -> str | None:
        """What decided an engine refusal at the end of data: the size limit
        names where DATABYTES came from (the client's tcp.smtp line, else the
        databytes control file); the hop limit is qmail's built-in MAXHOPS;
        bare LF is refused unconditionally (no rule)."""
        if reason == "size_exceeded":
            rid = self.sp.profile.setting_rule("DATABYTES")
            return self.sp.engine.bundle.where(rid) if rid >= 0 else "databytes"
        if reason == "too_many_hops":
            return "maxhops"
        return None

    async def _commit(self, sink, ev: DataEnd, t0: float, who: dict | None):
        try:
            result = await sink.commit()
        except Exception:
            return self._commit_failed(sink, who)
        return self._committed(result, ev, t0, who)

    def _commit_failed(self, sink, who: dict | None) -> Reply:
        """A commit that raised: the message is dropped, the client retries (451)."""
        logger.exception("delivery failed client=%s", self.client_label)
        sink.abort()
        r = reply("store_failed")
        log.event(action="tempfail", stage="DATA", reason="delivery_error",
                  client=self.client_label, **(who or {}), reply=str(r))
        self.rcpts = []
        return r

    def _committed(self, result, ev: DataEnd, t0: float, who: dict | None) -> Reply:
        """The reply to a finished commit; its decision line."""
        if who is not None:   # format the line only if someone reads it
            log.event(action="accept" if result.ok else ("tempfail" if result.reply.temporary else "reject"),
                      stage="DATA", client=self.client_label, **who, size=ev.size,
                      rcpts=len(self.rcpts), ms=f"{(time.monotonic() - t0) * 1000:.1f}",
                      detail=result.detail or None, reply=str(result.reply))
        self.rcpts = []
        return result.reply

    def on_auth(self, ev) -> None:
        """AUTH dialogue in authsession; verification and failure delays run async."""
        r = self.auth.handle(ev)
        if isinstance(r, Reply):
            self.engine.send(r)
        else:
            self._later(r)

    def on_rset(self, ev: Rset) -> None:
        self.sp.reset()
        self.rcpts = []

    def on_anomaly(self, ev: Anomaly) -> None:
        log.anomaly(ev.tag, client=self.client_label, detail=ev.detail)

    def on_closed(self, ev: Closed) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        if ev.reason not in _QUIET_CLOSES:     # the server hung up: say why
            r = self.engine.close_reply
            log.event(action="close", reason=ev.reason.replace(" ", "_"), client=self.client_label,
                      reply=None if r is None else str(r))


# the client ended the session (EOF, QUIT); the engine's own closes (too many
# errors, bare LF in DATA, an app reply 421/503 that closes) are logged
_QUIET_CLOSES = frozenset(("eof", "quit"))


def _cancelled(task) -> None:
    """Cancel a lookup a new HELO/MAIL made stale (else 300 pipelined EHLOs
    leave 300 queries running after the session is gone)."""
    if task is not None and not task.done():
        task.cancel()
    return None


_HANDLERS = {
    Helo: SMTPProtocol.on_helo,
    Mail: SMTPProtocol.on_mail,
    Rcpt: SMTPProtocol.on_rcpt,
    DataStart: SMTPProtocol.on_data_start,
    DataChunk: SMTPProtocol.on_data_chunk,
    DataEnd: SMTPProtocol.on_data_end,
    AuthStart: SMTPProtocol.on_auth,
    AuthResponse: SMTPProtocol.on_auth,
    Rset: SMTPProtocol.on_rset,
    Anomaly: SMTPProtocol.on_anomaly,
    Closed: SMTPProtocol.on_closed,
}
