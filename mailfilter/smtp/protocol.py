"""The uvloop/asyncio shell: transport, timers, tasks and back-pressure.

Job: one SMTPProtocol per connection feeds received bytes to its sans-IO
Session (smtp/session.py), which answers every complete command
synchronously inside data_received; every reply produced by one read leaves
in ONE transport.write, so pipelined commands cost one syscall (RFC 2920).
Policy, AUTH, the transaction and the decision log live in the Session; this
module only fulfils the Session's requests (smtp/session.py, "Theory of
operation"): a DNS Lookup is started as a Task, AwaitLookups / Delay /
Commit / AuthStep are awaited in one Task per session (only when the answer
is not already there: a finished lookup or a delivery that needs no I/O is
answered in the same pass, without a Task).

The only awaits are where the world is slow: the client's host name (reverse
DNS before the greeting, as tcpserver does before qmail-smtpd runs), DNS
answers for HELOCHECK A/M and MFDNSCHECK (started when HELO/MAIL arrive,
awaited at RCPT only if not yet done), tarpit delays, AUTH verification and
the delivery commit after DATA. While one of those is in flight the
connection stops reading (back-pressure) and the engine keeps any pipelined
input buffered; nothing else on the loop waits.

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
  421 4.3.0 on that connection only (docs/architecture.md#errors-and-logging);
- limits: the global connection cap (421 4.7.0 at connect); the client's
  anvil limits (limits/anvil.py: connections at once and per window, 421
  4.7.0 before the greeting, once the client's tcp.smtp rule is known;
  with the Redis store the check is awaited before the greeting, as the
  host name is; the slot is given back when the connection goes); an idle
  timeout per read, a command line complete within the idle timeout from its
  first byte, DATA at a minimum rate and within a data deadline, a total
  session deadline, the engine's line and bad-command limits, databytes while
  streaming (docs/behaviour/smtp.md#limits).
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging

from mailfilter import log
from mailfilter.auth.session import AuthService, ip_key
from mailfilter.delivery import Delivery
from mailfilter.limits.anvil import Anvil, LimitsConfig
from mailfilter.limits.local import LocalStore
from mailfilter.metrics.counts import Counts, session_outcome
from mailfilter.policy.dnsbl import Dnsbl, DnsblResult
from mailfilter.policy.engine import Client, PolicyEngine
from mailfilter.smtp import proxy
from mailfilter.smtp.clock import TimerWheel
from mailfilter.smtp.engine import SMTPConnection
from mailfilter.smtp.replies import reply
from mailfilter.smtp.session import (
    AwaitLookups, AuthStep, Commit, Delay, Handshake, LimitCheck, Lookup, Session, SessionConfig,
)
from mailfilter.smtp.tls import TLSFailed, TLSLayer
from mailfilter.tls import NO_TLS, TLSSettings

logger = logging.getLogger("mailfilter")

REMOTE_HOST_MODES = ("off", "ptr", "confirmed")
PROXY_TIMEOUT = 10.0        # seconds for a load balancer's whole PROXY header
EARLY_MAX = 64 * 1024       # bytes kept from a client that talks before the greeting


@dataclasses.dataclass
class Limits:
    """Connection caps and timers (docs/operations.md#limits-and-timeouts,
    docs/behaviour/smtp.md#limits)."""
    max_connections: int = 10_000
    max_per_ip: int = 100       # the default of the anvil's conn_count (limits/anvil.py)
    # per read, and for a whole command line from its first byte (a client
    # dribbling one byte per second never goes idle); RFC 5321 §4.5.3.2 wants >= 5 min
    idle_timeout: float = 300.0
    session_deadline: float = 3600.0
    max_bad_commands: int = 10
    # DATA: at least data_min_rate bytes/s averaged over each data_rate_window
    # seconds (Postfix smtpd_min_data_rate is 500), and the whole message within
    # data_deadline: 25 MB passes at >= 14.6 KB/s (docs/behaviour/smtp.md#limits)
    data_min_rate: float = 500.0       # 0 = no minimum rate
    data_rate_window: float = 60.0
    data_deadline: float = 1800.0      # 0 = no data deadline
    header_size_limit: int = 0         # header block octets kept (--header-size-limit); 0 = all
    # seconds before the greeting (postscreen_greet_wait): a client that talks
    # before it is a pregreeter (docs/behaviour/control-files.md#pregreet)
    greet_wait: float = 0.0


class ServerState:
    """Per-process shared state: the current SessionConfig (policy, AUTH,
    delivery), the resolver, the limits, the connection counters, the
    anvil (limits/anvil.py: the per-client limits and their store, local
    or Redis; closed at shutdown by serve/lifecycle.py)."""

    def __init__(self, policy: PolicyEngine, delivery: Delivery, *, limits: Limits | None = None,
                 resolver=None, hostname: str | None = None, features: list[str] | None = None,
                 auth: AuthService | None = None, remote_host: str = "confirmed",
                 tls: TLSSettings = NO_TLS, deny: str = "close", pregreet: str = "log",
                 smtputf8: bool = True, metrics: Counts | None = None,
                 anvil: Anvil | None = None):
        if remote_host not in REMOTE_HOST_MODES:
            raise ValueError(f"remote_host must be one of {', '.join(REMOTE_HOST_MODES)}, "
                             f"not {remote_host!r}")
        self.delivery = delivery
        self.resolver = resolver
        self.remote_host = remote_host
        self.limits = limits or Limits()
        self.hostname = hostname
        self.features = features or []
        self.auth = auth if auth is not None else AuthService()   # verifier made on first AUTH
        self.connections = 0
        # without one given: the local store, --max-per-ip's connections at once, no rates
        self.anvil = anvil or Anvil(LimitsConfig(max_per_ip=self.limits.max_per_ip,
                                                 lease=self.limits.session_deadline), LocalStore())
        self.sessions: set["SMTPProtocol"] = set()
        self.loop: asyncio.AbstractEventLoop | None = None    # cached: get_running_loop() costs a getpid()
        self.clock: TimerWheel | None = None    # every session's idle/deadline clock, on self.loop
        self.tls = tls
        self.deny = deny            # what a tcp.smtp deny client gets (SessionConfig.deny)
        self.pregreet = pregreet    # a client that talks before the greeting: "log" or "refuse"
        self.smtputf8 = smtputf8    # SMTPUTF8 offered (SessionConfig.smtputf8, RFC 6531)
        # the process's metrics counts (--metrics), None when off: every hook tests it
        self.metrics = metrics
        self.auth.metrics = metrics
        if metrics is not None:
            metrics.sources["mailfilter_connections_open"] = lambda: self.connections
            if self.anvil.store.shared:     # checks the shared store could not answer
                self.anvil.store.on_fallback = metrics.state_fallback
        self.swap_policy(policy)

    def swap_policy(self, policy: PolicyEngine, limits: Limits | None = None) -> None:
        """Atomically switch new sessions to `policy` and, when given, to
        `limits` (SIGHUP reload: timeoutsmtpd / timeoutsession may have
        changed); sessions in flight keep the objects they hold."""
        if limits is not None:
            self.limits = limits
        self.policy = policy
        self.anvil.forget()         # the old rules' profiles go with them
        self.session_config = SessionConfig(
            policy, auth=self.auth, delivery=self.delivery, hostname=self.hostname,
            features=self.features, max_bad_commands=self.limits.max_bad_commands,
            dns=self.resolver is not None, tls=self.tls,
            header_limit=self.limits.header_size_limit, deny=self.deny, smtputf8=self.smtputf8,
            metrics=self.metrics, anvil=self.anvil)
        self.engine_config = self.session_config.engine_config
        self.host = self.session_config.host       # for replies before a session exists
        # the bundle's DNS blocklists (none without a resolver to ask them)
        self.dnsbl = Dnsbl.from_bundle(policy.bundle) if self.resolver is not None else Dnsbl([])

    def swap_tls(self, tls: TLSSettings) -> None:
        """New certificates or TLS options (SIGHUP) for new sessions; a
        session keeps the settings it started with."""
        self.tls = tls
        self.swap_policy(self.policy)

    @property
    def per_ip(self) -> dict[str, int]:
        """Connections open per client key in this process (the anvil's local counts)."""
        return self.anvil.local.conns

    @property
    def looks_up_hosts(self) -> bool:
        """False with remote_host "off" or without a resolver: every client
        is "unknown" and no session waits."""
        return self.remote_host != "off" and self.resolver is not None

    async def host_name(self, ip: str) -> str:
        """The client's host name per remote_host (policy/dns.py Resolver.remote_host)."""
        return await self.resolver.remote_host(ip, confirm=self.remote_host == "confirmed")


class SMTPProtocol(asyncio.Protocol):
    """One connection: transport, timers, tasks and back-pressure around a
    sans-IO Session (smtp/session.py), whose requests it fulfils."""

    __slots__ = (
        "state", "transport", "session", "engine", "client", "client_label", "loop",
        "last_read", "timer", "deadline_at", "waiting", "task", "lookups",
        "counted", "reading_paused", "limits", "early", "write_paused",
        "implicit_tls", "tls", "handshake_timer", "slot", "dnsbl_score",
        "proxy_from", "proxy_buf", "proxy_peer", "proxy_local",
        "line_start", "data_start", "window_start", "window_bytes", "outcome",
        "client_limits", "anvil_key", "anvil_member",
    )

    def __init__(self, state: ServerState, implicit_tls: bool = False, proxy_from=None):
        self.state = state
        self.implicit_tls = implicit_tls    # a --listen-tls connection: TLS from the first byte
        # a --proxy-listen connection: the networks its PROXY header may come from
        # (smtp/proxy.py); the header, read first, names the client
        self.proxy_from = proxy_from
        self.proxy_buf: bytearray | None = None     # the header so far
        self.proxy_peer = ("", 0)       # the load balancer's address and port
        self.proxy_local = None
        self.tls: TLSLayer | None = None    # the record layer once TLS starts
        self.handshake_timer = None
        self.session: Session | None = None
        self.engine: SMTPConnection | None = None   # the session's engine, once there is one
        self.transport = None
        self.waiting = False            # a request is being fulfilled: input waits
        self.task: asyncio.Task | None = None
        self.lookups: dict[str, asyncio.Task] = {}  # DNS checks in flight, by kind
        self.counted = False
        self.reading_paused = False
        self.write_paused = False   # the transport's buffer is full (pause_writing)
        self.slot = None                # the connection's one clock: its slot in state.clock
        self.dnsbl_score: DnsblResult | None = None     # the client's DNSBL score, once known
        self.timer = None               # the close-after-drain timer (_close), rare
        self.deadline_at = 0.0
        self.line_start: float | None = None    # first byte of an incomplete command line
        self.data_start: float | None = None    # the message began (354 sent)
        self.window_start = 0.0         # the DATA rate window began
        self.window_bytes = 0           # bytes read in it
        self.limits: Limits | None = None   # the state's Limits when the session began
        self.early: bytearray | None = None  # input before the greeting (host lookup)
        self.outcome: str | None = None     # why the server ended the session (metrics), if it did
        self.client_limits = None       # the client's anvil limits, once its rule is known
        self.anvil_key: str | None = None   # the client key while it holds a connection slot
        self.anvil_member: str | None = None    # the slot's name in the shared store

    # ------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        m = self.state.metrics
        if m is not None:
            m.connection()
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        if self.proxy_from is not None:
            self._proxy_start(peer, local)
            return
        self._begin(peer, local)

    def _begin(self, peer, local) -> None:
        """The connection of the client at `peer` (from the socket, or from
        the PROXY header): limits, counting, then the TLS handshake, the
        lookups before the greeting, or the session."""
        transport = self.transport
        st = self.state
        lim = st.limits
        ip = peer[0]
        host = st.host
        if st.connections >= lim.max_connections:
            transport.write(reply("too_many_conns", host=host).line())
            transport.close()
            log.event(action="refuse", stage="CONNECT", reason="max_connections", client=f"[{ip}]")
            self._refused("max_connections", limit=True)
            return
        st.connections += 1
        st.sessions.add(self)
        self.counted = True
        loop = self._loop()
        self.limits = lim
        self.deadline_at = loop.time() + lim.session_deadline
        self.client = Client(ip=ip, port=peer[1], local_ip=local[0], local_port=local[1])
        self.client_label = f"{self.client.host}[{ip}]:{peer[1]}"
        # the shared store's connection check is awaited before the greeting
        waits = st.looks_up_hosts or bool(st.dnsbl) or lim.greet_wait > 0 or st.anvil.shared
        if self.implicit_tls:
            # RFC 8314: the handshake first, the greeting inside TLS; the host
            # name and DNSBL lookups run meanwhile
            if not st.tls.available:
                log.event(action="tls_fail", stage="CONNECT", reason="no_certificate",
                          client=self.client_label)
                if st.metrics is not None:
                    st.metrics.handshake("CONNECT", "no_certificate")
                transport.close()
                return
            self._start_tls(st.tls)
            if not waits:
                return
        elif not waits:
            self._start_session()
            return
        self.early = bytearray()
        self.task = loop.create_task(self._before_greeting())

    # ------------------------------------------------------------ PROXY protocol
    def _proxy_start(self, peer, local) -> None:
        """A --proxy-listen connection: only a --proxy-protocol source may
        open it, and its PROXY header comes before anything else (the server
        speaks first in SMTP, so it waits for the whole header, at most
        PROXY_TIMEOUT seconds). Nothing is guessed: a connection from
        elsewhere, or bytes that are not a header, are closed with one line."""
        self.proxy_peer = peer
        if not _proxy_source(self.proxy_from, peer[0]):
            log.event(action="refuse", stage="CONNECT", reason="proxy_source", client=f"[{peer[0]}]")
            self._refused("proxy_source")
            self.transport.close()
            return
        self.proxy_buf = bytearray()
        self.proxy_local = local
        # the connection's one clock (smtp/clock.py) is free until the session: its deadline
        loop = self._loop()
        self.state.clock.set(self, loop.time() + PROXY_TIMEOUT)

    def _proxy_data(self, data: bytes) -> None:
        buf = self.proxy_buf
        buf += data
        try:
            found = proxy.parse(buf)
        except proxy.ProxyError as exc:
            self._proxy_failed(str(exc))
            return
        if found is None:
            return
        header, n = found
        rest = bytes(buf[n:])
        self.proxy_buf = None
        self.state.clock.cancel(self)           # the session arms the clock for itself
        peer = header.src if header.src is not None else self.proxy_peer     # LOCAL: the balancer's
        local = header.dst if header.dst is not None else self.proxy_local
        log.event(action="proxy", client=f"[{peer[0]}]:{peer[1]}", via=self.proxy_peer[0],
                  version=header.version, command=header.command, authority=header.authority,
                  unique_id=header.unique_id,
                  ssl=(f"{header.ssl.get('version', '?')}/{header.ssl.get('cipher', '?')}"
                       if header.ssl else None))
        if self.state.metrics is not None:
            self.state.metrics.proxy_header(header.version, header.command)
        self._begin(peer, local)
        if rest and not self.transport.is_closing():
            self.data_received(rest)

    def _proxy_failed(self, why: str) -> None:
        log.event(action="refuse", stage="CONNECT", reason="proxy_header", client=f"[{self.proxy_peer[0]}]",
                  detail=why)
        self._refused("proxy_header")
        self.proxy_buf = None
        self.state.clock.cancel(self)
        self.transport.close()

    def _refused(self, reason: str, limit: bool = False) -> None:
        """Metrics: a connection refused at connect (one action=refuse line),
        a limit reached when `limit`."""
        m = self.state.metrics
        if m is not None:
            m.refuse(reason)
            if limit:
                m.limit_hit(reason)

    def _loop(self):
        """The running loop, cached with its TimerWheel on the state (a
        get_running_loop() costs a getpid())."""
        st = self.state
        loop = st.loop
        if loop is None or loop.is_closed():
            loop = st.loop = asyncio.get_running_loop()
            st.clock = TimerWheel(loop)
        self.loop = loop
        return loop

    async def _before_greeting(self) -> None:
        """What comes before the greeting, at once: TCPREMOTEHOST (tcpserver
        resolves before qmail-smtpd runs: tcp.smtp `=host` rules decide
        allow/deny and settings), the DNSBL score, the greet wait; then the
        session. Input that came meanwhile is a pregreet (logged; refused
        with --pregreet refuse), else processed after the greeting."""
        st = self.state
        ip = self.client.ip
        host, score, _ = await asyncio.gather(
            st.host_name(ip) if st.looks_up_hosts else _none(),
            st.dnsbl.check(st.resolver, ip) if st.dnsbl else _none(),
            asyncio.sleep(self.limits.greet_wait) if self.limits.greet_wait > 0 else _none(),
            return_exceptions=True)
        if isinstance(host, BaseException):
            if isinstance(host, asyncio.CancelledError):
                raise host
            logger.error("host name lookup failed client=[%s]: %r", ip, host)
            host = None
        if isinstance(score, BaseException):
            if isinstance(score, asyncio.CancelledError):
                raise score
            logger.error("DNSBL lookup failed client=[%s]: %r", ip, score)   # never a rejection
            score = None
        self.task = None
        if self.transport.is_closing():
            return
        if host is not None:
            self.client.host = host or "unknown"
        self.dnsbl_score = score
        if st.anvil.shared and not await self._admit_shared():
            return
        early = self.early
        if early and self.tls is None:      # in TLS a pregreet is the handshake's business
            label = f"{self.client.host}[{ip}]:{self.client.port}"
            log.anomaly("pregreet", client=label, detail=f"{len(early)} bytes")
            if st.pregreet == "refuse":
                log.event(action="refuse", stage="CONNECT", reason="pregreet", client=label,
                          reply=str(reply("pregreet")))
                self._refused("pregreet")
                self.early = None
                self.transport.write(reply("pregreet").line())
                self._close()
                return
        if self.tls is not None and not self.tls.handshaken:
            return                      # implicit TLS: the session starts after the handshake
        self._start_session()
        early, self.early = self.early, None
        if early and self.session is not None:
            self._take(bytes(early))
        if not self.waiting:
            self._resume_reading()

    # ------------------------------------------------------------ anvil
    def _admit(self, limits) -> bool:
        """The local store's connection check (synchronous), with the limits
        the new session found for the client (its tcp.smtp rule is known
        now: the host name, which `=host` rules need, came first); False:
        refused."""
        if self.anvil_key is not None:      # admitted already (the shared store's check)
            return True
        anvil = self.state.anvil
        key = ip_key(self.client.ip)
        reason, n = anvil.connect(key, limits, None)
        if reason is None:
            self.anvil_key = key
            return True
        return self._admitted(key, None, reason, n, limits)

    async def _admit_shared(self) -> bool:
        """The shared store's connection check, awaited before the greeting.
        The check runs shielded: a client that leaves meanwhile cancels this
        task, and a slot the check took anyway is given back."""
        st = self.state
        anvil = st.anvil
        policy = st.policy
        limits = self.client_limits = anvil.for_client(policy.client_profile(self.client),
                                                       policy.where)
        key = ip_key(self.client.ip)
        member = anvil.member()
        check = asyncio.ensure_future(anvil.connect(key, limits, member))
        try:
            reason, n = await asyncio.shield(check)
        except asyncio.CancelledError:
            check.add_done_callback(lambda f: _give_back(f, anvil, key, member))
            raise
        if self.transport.is_closing():
            if reason is None:
                anvil.disconnect(key, member)
            return False
        return self._admitted(key, member, reason, n, limits)

    def _admitted(self, key: str, member, reason, n: int, limits) -> bool:
        if reason is None:
            self.anvil_key, self.anvil_member = key, member
            return True
        log.event(action="refuse", stage="CONNECT", reason=reason, rule=limits.rule(reason),
                  client=f"{self.client.host}[{self.client.ip}]", limit=getattr(limits, reason),
                  count=n)
        self._refused(reason, limit=True)
        line = reply("too_many_conns_ip", host=self.state.host).line()
        tls = self.tls
        if tls is None:
            self.transport.write(line)
        elif tls.handshaken:            # implicit TLS: the refusal inside it
            tls.send(line)
            self.transport.write(tls.data_to_send())
        self._close()
        return False

    def _start_session(self) -> None:
        """The Session for self.client (its policy, engine, AUTH) and the greeting."""
        st = self.state
        client = self.client
        if client.host != "unknown":    # the host lookup named it: the label made at connect is stale
            self.client_label = f"{client.host}[{client.ip}]:{client.port}"
        try:
            session = Session(st.session_config, client,
                              tls=self.tls.info if self.tls is not None else None,
                              label=self.client_label, limits=self.client_limits)
            if not self._admit(session.limits):
                return
            greeted = session.start(dnsbl=self.dnsbl_score)
            self.session = session
            self.engine = session.engine
            if not greeted:             # a denied client: closed without a word (tcpserver)
                self.outcome = "refused"
                self._close()
                return
            self._flush()
        except Exception:
            logger.exception("session setup failed client=%s", self.client_label)
            self.session = self.engine = None
            self.transport.write(reply("internal_error", host=st.host).line())
            self._close()
            return
        now = self.loop.time()
        self.last_read = now
        self._arm(now + self.limits.idle_timeout)

    def connection_lost(self, exc) -> None:
        session = self.session
        if session is not None:
            session.lost()
            m = self.state.metrics
            if m is not None:
                m.session_end(self.outcome or session_outcome(session.end or "eof"))
        if self.slot is not None:
            self.state.clock.cancel(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for task in self.lookups.values():
            if not task.done():
                task.cancel()
        if self.counted:
            st = self.state
            st.connections -= 1
            if self.anvil_key is not None:
                st.anvil.disconnect(self.anvil_key, self.anvil_member)
                self.anvil_key = None
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
        """Reading resumes only when nothing holds it: neither a request in
        flight (`waiting`, checked by the callers) nor a full write buffer --
        an async reply finishing must not lift the back-pressure, or a client
        that never reads makes the server buffer replies without limit."""
        if self.write_paused:
            return
        if self.reading_paused and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------ timers
    def _arm(self, due: float) -> None:
        """(Re)schedule the connection's one clock at `due`, never past the
        session deadline: one slot in the server's TimerWheel (smtp/clock.py:
        no event-loop timer per connection; at most clock.RESOLUTION late)."""
        self.state.clock.set(self, min(due, self.deadline_at))

    def _timer_due(self) -> None:
        """The connection's one timer: the session deadline, else the idle
        and command-line timeouts (DATA's rate and deadline are checked per
        read, see _data_read). Re-armed lazily (not one timer per read) at
        the earliest real due time (a fixed minimum here made every timeout
        late: --timeout 1 behaved like 2); while a request is in flight the
        client is not idle, so the clocks restart."""
        if self.proxy_buf is not None:      # still waiting for the PROXY header
            self._proxy_failed(f"no whole header in {PROXY_TIMEOUT:g} s")
            return
        now = self.loop.time()
        if now >= self.deadline_at:
            self._expire("session_deadline")
            return
        if self.waiting:
            self._arm(now + self.limits.idle_timeout)
            return
        idle = self.limits.idle_timeout
        if self.line_start is not None:
            # a command line must be complete idle_timeout after its first byte
            # (qmail's timeoutsmtpd is per read, which a client sending a byte
            # every few seconds never meets: docs/behaviour/smtp.md#limits)
            due, reason = self.line_start + idle, "command_timeout"
        else:
            due, reason = self.last_read + idle, "timeout"
        if now < due:
            self._arm(due)
            return
        self._expire(reason)

    def _expire(self, reason: str) -> None:
        """A limit fired: one decision line, its 421 4.4.2, the close."""
        log.event(action="close", reason=reason, client=self.client_label)
        m = self.state.metrics
        if m is not None:
            m.limit_hit(reason)
        self.abort(reply(reason, host=self.session.host), reason)

    def _data_read(self, data: bytes, now: float) -> None:
        """A read while a message is (or was, until this read) coming in.
        A message (DATA, or BDAT from its first chunk to its LAST) must
        keep data_min_rate bytes/s averaged over each
        data_rate_window (a short stall is forgiven) and end within
        data_deadline. Checked here, per read, not by a timer: a client that
        sends nothing meets the idle timeout, and any other client is checked
        at its next read, which costs no timer per message
        (docs/behaviour/smtp.md#limits)."""
        if not self.engine.receiving:
            self.data_start = None          # the message ended in this read
            self._line_read(data, now)
            return
        if self.data_start is None:         # the 354 was sent (or a BDAT message began) in this read
            self.data_start = self.window_start = now
            self.window_bytes = 0
            self.line_start = None
            return
        self.window_bytes += len(data)
        lim = self.limits
        if 0 < lim.data_deadline <= now - self.data_start:
            self._expire("data_deadline")
            return
        span = now - self.window_start
        if span >= lim.data_rate_window > 0:
            if self.window_bytes < lim.data_min_rate * span:
                self._expire("data_too_slow")
                return
            self.window_start = now
            self.window_bytes = 0

    def _line_read(self, data: bytes, now: float) -> None:
        """A read between commands: when the incomplete command line, if
        any, began (bulk: the read's last LF ends every line begun before it)."""
        if data[-1:] == b"\n":
            self.line_start = None
            return
        if not data:
            return
        if self.line_start is None or b"\n" in data:
            self.line_start = now

    def abort(self, r, outcome: str) -> None:
        """End the session now with `r` (timeout, shutdown, internal error);
        `outcome` names it in the metrics (mailfilter_sessions_total)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.outcome is None:
            self.outcome = outcome
        if self.session is None:          # no session yet (host lookup): just hang up
            self._close()
            return
        self.session.abort(r)
        self._flush()

    # ------------------------------------------------------------ input
    def data_received(self, data: bytes) -> None:
        if self.proxy_buf is not None:      # the PROXY header first (before any TLS)
            self._proxy_data(data)
            return
        tls = self.tls
        if tls is not None:
            data = self._decrypt(data)      # may finish the handshake first
            if data:
                self._take(data)
            if tls.eof:                     # close_notify: as a FIN in clear
                self.eof_received()
            return
        self._take(data)

    def _take(self, data: bytes) -> None:
        """Plaintext from the client: to the engine, or kept until the session exists."""
        engine = self.engine        # the session's engine: its receive_data, one call less per read
        if engine is None:
            self._early_data(data)
            return
        now = self.last_read = self.loop.time()
        engine.receive_data(data)
        if not self.waiting:
            self._drain()
        if self.data_start is not None or engine.receiving:
            self._data_read(data, now)
        elif data[-1:] == b"\n":
            self.line_start = None          # the common case: whole lines
        else:
            self._line_read(data, now)

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
        tls = self.tls
        if tls is not None and not tls.handshaken:
            self._tls_failed("eof")    # the client left mid-handshake
            return False
        if self.session is None:
            # EOF before the greeting (host lookup in flight): the client is
            # gone (a FIN looks the same as a half-close, and a client that
            # talks before the 220 is misbehaving anyway): the lookup is
            # cancelled with the connection, nothing is answered.
            return False
        self.session.receive_data(b"")
        if not self.waiting:
            self._drain()
        return False

    def _drain(self, request=None) -> None:
        """Let the session answer every complete command; fulfil its requests
        (a request that needs no wait is answered here, in the same pass);
        the replies leave in one write."""
        session = self.session
        try:
            while True:
                if request is None:
                    request = session.drain()
                    if request is None:
                        break
                request = self._fulfil(request)
                if request is _TASK:
                    return                  # a Task answers it, then drains again
        except Exception:
            logger.exception("internal error client=%s", self.client_label)
            self.abort(reply("internal_error", host=session.host), "internal_error")
            return
        self._flush()

    def _fulfil(self, request):
        """Fulfil one session request: None when it was answered at once, the
        next request when the answer led to one, _TASK when a Task answers it."""
        t = type(request)
        if t is Lookup:
            self._start_lookup(request)
            return None
        if t is AwaitLookups:
            tasks = self.lookups
            pending = [tasks[k] for k in self.session.lookups if k in tasks]
            if all(task.done() for task in pending):      # answered already: no Task
                self.session.dns_answers(self._dns_answers())
                return self.session.resume()
            coro = self._await_lookups(pending)
        elif t is Delay:
            coro = self._sleep(request.seconds)
        elif t is Commit:
            coro = request.sink.commit()
        elif t is AuthStep or t is LimitCheck:
            coro = request.awaitable
        elif t is Handshake:
            self._flush()           # the 220 leaves in clear; what follows is TLS
            self.waiting = True     # no command is read until the handshake is done
            self._start_tls(self.session.config.tls)
            return _TASK
        else:   # pragma: no cover - Session only makes the requests above
            raise TypeError(f"unknown session request {request!r}")
        self._flush()           # replies so far leave now, before the wait
        self.waiting = True
        self._pause_reading()
        self.task = self.loop.create_task(self._run(coro))
        return _TASK

    def _start_lookup(self, request: Lookup) -> None:
        """Start a HELOCHECK/MFDNSCHECK query; a newer one of the same kind
        replaces the older (else 300 pipelined EHLOs leave 300 queries
        running after the session is gone)."""
        old = self.lookups.get(request.kind)
        if old is not None and not old.done():
            old.cancel()
        resolver = self.state.resolver
        if request.kind == "helo":
            coro = resolver.check(request.rdtype, request.name)
        else:
            coro = resolver.has_mx(request.name)
        self.lookups[request.kind] = self.loop.create_task(coro)

    def _dns_answers(self) -> dict[str, str]:
        tasks = self.lookups
        answers = {k: tasks.pop(k).result() for k in self.session.lookups if k in tasks}
        return answers

    async def _await_lookups(self, pending):
        await asyncio.gather(*pending)
        self.session.dns_answers(self._dns_answers())

    async def _sleep(self, seconds: float) -> None:
        """A tarpit delay (Delay request): only this session waits."""
        await asyncio.sleep(seconds)

    async def _run(self, coro) -> None:
        """Await a request's answer, hand it back, go on draining."""
        session = self.session
        try:
            try:
                result = await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                after = session.resume(error=exc)
            else:
                after = session.resume(result)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("internal error client=%s", self.client_label)
            self.waiting = False
            self.abort(reply("internal_error", host=session.host), "internal_error")
            return
        self.waiting = False
        self.task = None
        if self.transport.is_closing():
            return
        now = self.last_read = self.loop.time()
        if self.line_start is not None:
            self.line_start = now       # the client waited for us: its line's clock restarts
        self._resume_reading()
        self._drain(after)
        if self.data_start is not None or self.engine.receiving:
            self._data_read(b"", now)       # DATA began (or ended) after the wait

    def _flush(self) -> None:
        engine = self.engine        # Session.data_to_send / .closing, without the extra calls
        out = engine.data_to_send()
        if out and not self.transport.is_closing():
            tls = self.tls
            if tls is None:
                self.transport.write(out)
            elif tls.handshaken:
                tls.send(out)
                self.transport.write(tls.data_to_send())
            # mid-handshake (a timeout or shutdown 421): nothing can be said
        if engine.closing and not self.transport.is_closing():
            if self.tls is not None and self.tls.handshaken:
                self.tls.close()        # close_notify after the last reply
                self.transport.write(self.tls.data_to_send())
            self._close()

    # ------------------------------------------------------------ TLS
    def _start_tls(self, settings: TLSSettings) -> None:
        """The record layer begins (after our 220 to STARTTLS, or at connect
        for implicit TLS); the handshake must end within its timeout."""
        self.tls = TLSLayer(settings.context)
        self.handshake_timer = self.loop.call_later(settings.handshake_timeout,
                                                    self._handshake_timeout)

    def _decrypt(self, data: bytes) -> bytes:
        """Ciphertext in, plaintext for the engine out; runs the handshake
        and its completion, writes what TLS has to send."""
        tls = self.tls
        was_handshaken = tls.handshaken
        try:
            plain = tls.feed(data)
        except TLSFailed as exc:
            self._tls_failed(str(exc))
            return b""
        out = tls.data_to_send()
        if out:
            self.transport.write(out)
        if not was_handshaken and tls.handshaken:
            self._handshake_done()      # before the plaintext: the session must be in TLS first
        return plain

    def _handshake_done(self) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        session = self.session
        m = self.state.metrics
        if m is not None:
            m.handshake("STARTTLS" if session is not None else "CONNECT", "ok")
        if session is None:             # implicit TLS: now the session (unless the lookup runs)
            if self.task is None:
                self._start_session()
            return
        # STARTTLS: the session starts over inside TLS (RFC 3207 §4.2)
        self.waiting = False
        self.last_read = self.loop.time()
        try:
            after = session.resume(self.tls.info)
        except Exception:
            logger.exception("internal error client=%s", self.client_label)
            self.abort(reply("internal_error", host=session.host), "internal_error")
            return
        self._drain(after)

    def _handshake_timeout(self) -> None:
        self.handshake_timer = None
        self._tls_failed("timeout")

    def _tls_failed(self, reason: str) -> None:
        """A handshake that failed, stalled or was abandoned: one log line,
        the alert (if any) sent, the connection closed; nothing else runs."""
        if self.transport.is_closing():
            return
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        stage = "STARTTLS" if self.session is not None else "CONNECT"
        log.event(action="tls_fail", stage=stage, reason=reason, client=self.client_label)
        m = self.state.metrics
        if m is not None:
            m.handshake(stage, reason)
        if self.outcome is None:
            self.outcome = "tls_fail"
        out = self.tls.data_to_send() if self.tls is not None else b""
        if out:
            self.transport.write(out)
        if self.session is not None:
            self.session.lost()
        self._close()

    def _close(self) -> None:
        """Close once the replies are out. close() alone waits for the write
        buffer to drain, forever if the client stops reading, and the
        connection keeps its slot (max_per_ip, max_connections): such a
        client gets one more idle timeout to read, then the connection is
        aborted."""
        transport = self.transport
        transport.close()
        if self.slot is not None:
            self.state.clock.cancel(self)
        if transport.get_write_buffer_size():
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(self.limits.idle_timeout, transport.abort)


_TASK = object()    # _fulfil: a Task answers the request and drains again


async def _none():
    return None


def _give_back(check: asyncio.Future, anvil, key: str, member) -> None:
    """A connection check whose client left while it ran: the slot it took, back."""
    if not check.cancelled() and check.exception() is None and check.result()[0] is None:
        anvil.disconnect(key, member)


_PROXY_SOURCES: dict[tuple, bool] = {}     # (networks, peer address) -> may send a header


def _proxy_source(nets: tuple, ip: str) -> bool:
    """Is `ip` in one of `nets`? Remembered: a listener sees the same few
    balancers again and again (bounded: a flood of others starts it over)."""
    key = (nets, ip)
    ok = _PROXY_SOURCES.get(key)
    if ok is None:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            addr = None
        ok = addr is not None and any(addr in net for net in nets)
        if len(_PROXY_SOURCES) >= 4096:
            _PROXY_SOURCES.clear()
        _PROXY_SOURCES[key] = ok
    return ok
