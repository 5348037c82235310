"""`mailfilter serve`, one serving process: start, reload, stop.

Job: build the ServerState from ServeOptions (compile `--rules` or load
`--bundle`, refuse an accidental open relay:
docs/behaviour/control-files.md#rcpthosts), listen on every `--listen` address, and run until
SIGTERM/SIGINT, then drain (`_drain_sessions`). The options themselves are config.py's; several
processes sharing the port (`--workers`) are supervise.py's.

SIGHUP recompiles (with `--rules`: in a child process, `mailfilter
compile`, since compiling in a thread would hold the GIL and stall every
session for seconds on a big rule set) or reloads (with `--bundle`, in a
worker thread); a rule set that cannot be built keeps the old rules and
logs "reload refused" and why. Start and reload agree on what is fatal
(docs/operations.md#reloading): a line that does not compile is a warning
naming FILE:LINE at both, and the rest of the rules take effect, as
Postfix does with a bad map entry; only a rule set that cannot be built
at all (unreadable, no rcpthosts without --open-relay, a corrupt bundle)
refuses. A success
swaps them for new sessions (sessions in flight finish on the rules they
started with). A SIGHUP that arrives while the rules are still compiling at
start-up is kept (`early_hup`) and answered by one reload once the
server listens (the default action, death, would take the MX down after a
restart + HUP).

TLS (tls/context.py): the settings are built at start, a certificate that
cannot be served is a start-up error naming its file; `--listen` addresses
offer STARTTLS (RFC 3207), `--listen-tls` addresses speak TLS from the
first byte (RFC 8314 §3). SIGHUP also reads the certificates again (after
the rules: the embedded certificate follows the rules' `me`); a bad new
pair is logged ("TLS reload refused: FILE: why") and the current one kept,
whatever the rules did.

The anvil limits and the AUTH failure counts live in the store `--state`
names (limits/store.py): made here, one per process (each worker opens its
own connection pool after --workers forks), closed at shutdown.

Limits that come from the rules (`timeoutsmtpd` -> the idle timeout,
`timeoutsession` -> the session deadline) apply unless `--timeout` /
`--session-deadline` were given, and are re-read on every reload.

File descriptors (serve/descriptors.py, docs/operations.md#file-descriptors):
each process raises its open-file limit and fits `--max-connections` to it
before it serves, and accepts connections itself (descriptors.Acceptor, not
loop.create_server) so that running out of descriptors pauses accepting and
is logged, on either loop.

Invariants: a process serving `--bundle` never imports the rules compiler
(load_policy imports it only to compile `--rules` at start-up; a reload
compiles in a child process). An AF_INET6 listener takes IPv6 only
(IPV6_V6ONLY, as asyncio's create_server), so `--listen 0.0.0.0:25 --listen
[::]:25` is dual stack.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import time

from mailfilter import log
from mailfilter.rules import bundle as bundle_mod
from mailfilter.delivery import Delivery
from mailfilter.limits.anvil import Anvil, LimitsConfig
from mailfilter.limits.store import open_store
from mailfilter.policy.dns import Resolver
from mailfilter.policy.engine import PolicyEngine, PolicyOptions
from mailfilter.serve.config import (
    BY_NAME, DEFAULT_MAX_CONNECTIONS, DEFAULT_SESSION_DEADLINE, DEFAULT_TIMEOUT, ServeOptions, StartupError, check_options,
    check_value, listeners,
)
from mailfilter.serve import metrics as metrics_export, summary
from mailfilter.serve.bundlewatch import BundleWatch
from mailfilter.serve.descriptors import (
    Acceptor, NoDescriptorLog, fit_max_connections, raise_nofile,
)
from mailfilter.smtp.engine import host_of
from mailfilter.smtp.replies import reply
from mailfilter.smtp.protocol import Limits, ServerState, SMTPProtocol
from mailfilter.tls import TLSSettings
from mailfilter.tls.context import TLSConfigError, check_ca_file, load_settings

logger = logging.getLogger("mailfilter")


def load_policy(opts: ServeOptions) -> PolicyEngine:
    """Compile or load the rules; raises StartupError with a clear message."""
    try:
        if opts.bundle:
            loaded = bundle_mod.load(opts.bundle)
        else:
            # here only: a process serving a bundle never loads the compiler
            from mailfilter.rules import compiler
            compiled = compiler.compile_dir(opts.rules)
            for d in compiled.diagnostics:
                logger.warning("%s", d)
            loaded = bundle_mod.from_compiled(compiled)
    except (OSError, ValueError, bundle_mod.BundleError) as exc:
        raise StartupError(str(exc)) from None
    defaults = {} if opts.auth is None else {"SMTPAUTH": opts.auth}
    engine = PolicyEngine(loaded, PolicyOptions(open_relay=opts.open_relay, defaults=defaults,
                                                allow_routing=opts.allow_untrusted_routing))
    if not engine.rcpthosts_present and not opts.open_relay:
        raise StartupError(
            "no rcpthosts in the rules: every recipient of non-relay clients would be refused; "
            "add rules/rcpthosts, or start with --open-relay if you really mean to relay for everyone")
    return engine


def limits_for(opts: ServeOptions, policy: PolicyEngine) -> Limits:
    """The connection limits: options first, then the rules' timeoutsmtpd
    (idle seconds per command) and timeoutsession (seconds per session;
    0 = the default), then the defaults. Made again on every reload."""
    integers = policy.bundle.integers
    timeout = opts.timeout
    if timeout is None:
        timeout = float(integers.get("timeoutsmtpd", DEFAULT_TIMEOUT)) or 1.0
    deadline = opts.session_deadline
    if deadline is None:
        deadline = float(integers.get("timeoutsession", 0)) or DEFAULT_SESSION_DEADLINE
    # None until run_process fits it to the open-file limit (or in a caller's own ServeOptions)
    return Limits(max_connections=opts.max_connections or DEFAULT_MAX_CONNECTIONS, max_per_ip=opts.max_per_ip,
                  idle_timeout=timeout, session_deadline=deadline,
                  data_min_rate=opts.data_min_rate, data_rate_window=opts.data_rate_window,
                  data_deadline=opts.data_deadline, header_size_limit=opts.header_size_limit,
                  greet_wait=opts.greet_wait)


def build_state(opts: ServeOptions) -> ServerState:
    """The state one process serves from: options checked, resolver, rules,
    delivery (checked usable), limits, AUTH; StartupError on any problem."""
    check_options(opts)             # a bad option is a start-up error, not a traceback
    try:
        resolver = Resolver(opts.resolver)
    except ValueError as exc:
        raise StartupError(f"--resolver {exc}") from None
    # after the cheap checks (their errors stay one line), before the slow part
    logger.info("starting (pid %d): %s", os.getpid(),
                f"loading bundle {opts.bundle}" if opts.bundle else f"compiling rules {opts.rules}")
    t0 = time.monotonic()
    policy = load_policy(opts)
    load_seconds = time.monotonic() - t0
    delivery = build_delivery(opts)
    try:
        delivery.check()        # an unusable spool would defer every message with 451
    except OSError as exc:
        raise StartupError(f"--deliver {opts.deliver}: {exc.strerror or exc}"
                           + (f": {exc.filename}" if exc.filename else "")) from None
    tls = build_tls(opts, policy)
    metrics = None
    if opts.metrics is not None:
        from mailfilter.metrics import Counts      # prometheus_client only with --metrics
        metrics = Counts("serve", hop=delivery.kind.split("+")[0])
        metrics.sources["mailfilter_log_dropped_lines"] = log.dropped_total
        metrics.rules_loaded(policy.bundle, load_seconds)
    limits = limits_for(opts, policy)
    anvil = build_anvil(opts, limits)
    return ServerState(policy, delivery, limits=limits, resolver=resolver,
                       hostname=opts.hostname, auth=build_auth(opts, anvil.store),
                       remote_host=opts.remote_host, tls=tls, deny=opts.deny,
                       pregreet=opts.pregreet, smtputf8=not opts.no_smtputf8, metrics=metrics,
                       anvil=anvil)


def build_anvil(opts: ServeOptions, limits: Limits) -> Anvil:
    """The per-client limits and the store they count in (--state)."""
    config = LimitsConfig(max_per_ip=opts.max_per_ip, max_conn_rate=opts.max_conn_rate,
                          max_msg_rate=opts.max_msg_rate, max_rcpt_rate=opts.max_rcpt_rate,
                          window=opts.rate_window, relay_exempt=not opts.rate_relay_clients,
                          # a connection cannot outlive its session deadline: its
                          # shared slot lapses then even if this node dies
                          lease=limits.session_deadline + limits.idle_timeout)
    try:
        store = open_store(opts.state, prefix=opts.state_prefix, timeout=opts.state_timeout,
                           window=opts.rate_window)
    except ValueError as exc:
        raise StartupError(f"--state {exc}") from None
    return Anvil(config, store)


def build_delivery(opts: ServeOptions) -> Delivery:
    """The next hop; the next-hop TLS options are passed only when given
    (the hops that have no TLS refuse them)."""
    hop_tls = {}
    if opts.next_hop_tls_verify or opts.next_hop_tls_ca:
        hop_tls["tls_verify"] = True
    if opts.next_hop_tls_ca:
        try:
            check_ca_file(opts.next_hop_tls_ca)
        except TLSConfigError as exc:
            raise StartupError(f"{exc.option} {exc}") from None
        hop_tls["tls_ca"] = opts.next_hop_tls_ca
    try:
        delivery = Delivery.from_spec(opts.deliver, **hop_tls)
    except ValueError as exc:       # a malformed spec, or TLS options for a hop without TLS
        raise StartupError(f"--deliver: {exc}") from None
    return delivery


def certificate_host(opts: ServeOptions, policy: PolicyEngine) -> str:
    """The name the embedded certificate is made for: --hostname (its
    first word, as in replies), else the rules' `me`, else the greeting's."""
    if opts.hostname:
        return host_of(opts.hostname)
    me = policy.bundle.scalars.get("me", "").strip()
    return host_of(me) if me else policy.hostname


def build_tls(opts: ServeOptions, policy: PolicyEngine) -> TLSSettings:
    """The TLS settings at start, logged; StartupError naming the file."""
    try:
        settings = load_settings(opts, certificate_host(opts, policy))
    except TLSConfigError as exc:
        raise StartupError(f"{exc.option} {exc}") from None
    if not settings.available:
        logger.info("TLS off (--no-tls): STARTTLS not offered")
    else:
        logger.info("TLS on: %s or later, handshake timeout %g s%s", opts.tls_min_version,
                    settings.handshake_timeout,
                    ", required before MAIL (--require-tls)" if settings.required else "")
        if settings.plaintext_auth:
            logger.warning("--auth-plaintext: AUTH PLAIN and LOGIN are accepted before TLS: "
                           "passwords can cross the network in clear")
    return settings


async def reload_tls(state: ServerState, opts: ServeOptions) -> TLSSettings | None:
    """SIGHUP: read the certificates again (off the loop: an RSA key check
    or a new embedded certificate takes milliseconds) and swap them in for
    new sessions (a session keeps the settings it started with); a bad new
    pair is logged and the current settings stay. The new settings, or None."""
    if opts.no_tls:
        return None
    loop = asyncio.get_running_loop()
    try:
        settings = await loop.run_in_executor(
            None, load_settings, opts, certificate_host(opts, state.policy))
    except TLSConfigError as exc:
        logger.error("TLS reload refused: %s", exc)
        if state.metrics is not None:
            state.metrics.reload("tls", False)
        return None
    state.swap_tls(settings)
    if state.metrics is not None:
        state.metrics.reload("tls", True)
    logger.info("TLS reload ok")
    return settings


def build_auth(opts: ServeOptions, store=None):
    """The AUTH service; its verifier (user DB or checkpassword) is made on
    first use. Its settings are the auth_<field> options of AuthConfig's
    fields; with a shared `store` its failure counts are the fleet's."""
    from mailfilter.auth.session import AuthConfig, AuthService
    from mailfilter.auth.verify import CheckpasswordVerifier, DBVerifier

    config = AuthConfig(**{f.name: getattr(opts, "auth_" + f.name)
                           for f in dataclasses.fields(AuthConfig)})
    shared = store if store is not None and store.shared else None
    if opts.checkpassword:
        try:
            verifier = CheckpasswordVerifier(opts.checkpassword, order=opts.checkpassword_order,
                                             timeout=opts.checkpassword_timeout)
        except ValueError as exc:
            raise StartupError(f"--checkpassword: {exc}") from None
        return AuthService(config, verifier=verifier, shared=shared)
    path = opts.userdb
    return AuthService(config, verifier_factory=lambda: DBVerifier(path), shared=shared)


RELOAD_COMPILE_TIMEOUT = 600.0      # seconds for the reload's `mailfilter compile`


def _package_env() -> dict:
    """The environment for a `python -m mailfilter` child: this package first
    on the path, whether it is installed or run from a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


async def _recompile(opts: ServeOptions) -> tuple[PolicyEngine, int]:
    """--rules on SIGHUP: `mailfilter compile` in a child process into a
    temporary bundle, then load it here (mmap-sized work, not a compile).
    Returns the policy and how many lines were skipped (each logged)."""
    fd, tmp = tempfile.mkstemp(prefix="mailfilter-reload-", suffix=".mfb")
    os.close(fd)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailfilter", "compile", opts.rules, "-o", tmp,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=_package_env())
        try:
            async with asyncio.timeout(RELOAD_COMPILE_TIMEOUT):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise StartupError(f"compiling {opts.rules} took over {RELOAD_COMPILE_TIMEOUT:g} s") from None
        lines = err.decode("utf-8", "replace").strip().splitlines()
        skipped = 0
        if proc.returncode in (0, 1):
            # 1: lines skipped. Each diagnostic is a warning, as at start-up
            # (the child's summary lines, "N line(s) skipped", are not repeated)
            for line in lines:
                if line.endswith(": rule skipped") or line.endswith(": ignored, rule kept"):
                    logger.warning("%s", line)
                    skipped += line.endswith(": rule skipped")
        else:
            raise StartupError("; ".join(lines[-3:]) or f"compile exited with {proc.returncode}")
        loop = asyncio.get_running_loop()
        policy = await loop.run_in_executor(
            None, load_policy, dataclasses.replace(opts, bundle=tmp, rules=None))
        policy.bundle.source = opts.rules
        return policy, skipped
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


async def reload(state: ServerState, opts: ServeOptions) -> bool:
    """SIGHUP: new rules, then the certificates (for the new rules' `me`);
    each failure keeps what it would have replaced. True when the rules
    were reloaded."""
    ok = await reload_rules(state, opts)
    await reload_tls(state, opts)
    return ok


async def reload_rules(state: ServerState, opts: ServeOptions) -> bool:
    """Build new rules off the loop; keep the old ones on failure."""
    loop = asyncio.get_running_loop()
    skipped = 0
    m = state.metrics
    t0 = time.monotonic()
    try:
        if opts.bundle:
            policy = await loop.run_in_executor(None, load_policy, opts)
        else:
            policy, skipped = await _recompile(opts)
    except StartupError as exc:
        logger.error("reload refused, keeping the current rules: %s", exc)
        if m is not None:
            m.reload("rules", False)
        return False
    state.swap_policy(policy, limits_for(opts, policy))
    if m is not None:
        m.rules_loaded(policy.bundle, time.monotonic() - t0)
        m.reload("rules", True)
    # The old rules hold reference cycles (each lazy regex and its matcher),
    # so only a full collection frees them; without one, 20 reloads of a
    # 100k-rule set kept 8 old copies (+74 MB) until the collector came by.
    # Sessions in flight still reference the old set; it goes with them.
    gc.collect()
    logger.info("reload ok: %d rules from %s%s", policy.bundle.n_rules, policy.bundle.source,
                f" ({skipped} line(s) skipped: the warnings above name them)" if skipped else "")
    return True


def bound_socket(host: str, port: int, reuse_port: bool, flag: str = "--listen") -> socket.socket:
    """A bound TCP socket for host:port; StartupError naming the option
    and the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # as asyncio's create_server: [::] takes IPv6 only, so 0.0.0.0:P
            # and [::]:P can both be bound (dual stack)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise StartupError(f"{flag} {where}: {exc.strerror or exc}") from None
    return sock


def _bind(host: str, port: int, reuse_port: bool, flag: str) -> socket.socket:
    sock = bound_socket(host, port, reuse_port, flag)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class _EarlyHup:
    """A SIGHUP that came before the event loop handles SIGHUP (the rules
    still compiling at start-up): noted, answered by one reload later."""

    def __init__(self):
        self.pending = False

    def note(self, _signum=None, _frame=None) -> None:      # a signal.signal handler
        self.pending = True

    def take(self) -> bool:
        pending, self.pending = self.pending, False
        return pending


early_hup = _EarlyHup()


async def serve(opts: ServeOptions, state: ServerState, ready=None, reuse_port: bool = False) -> None:
    """Listen, answer signals, and on SIGTERM/SIGINT close and drain."""
    loop = asyncio.get_running_loop()
    servers = []
    no_fd = NoDescriptorLog(loop, state)    # one rate limit for every listener
    for ls in listeners(opts):
        sock = _bind(ls.host, ls.port, reuse_port, ls.where)
        # a proxy listener: a PROXY header from one of its networks first
        if ls.implicit_tls:        # RFC 8314 §3: TLS from the first byte, then the greeting
            factory = (lambda via=ls.proxy_from: SMTPProtocol(     # noqa: E731
                state, implicit_tls=True, proxy_from=via))
            kind = "implicit TLS"
        else:
            factory = lambda via=ls.proxy_from: SMTPProtocol(state, proxy_from=via)  # noqa: E731
            kind = "no TLS" if opts.no_tls else "STARTTLS"
        if ls.proxy_from is not None:
            kind += ", PROXY header from " + ls.proxy_text
        # our accept, not create_server's: see descriptors.py on EMFILE
        servers.append(Acceptor(loop, sock, factory, no_fd))
        logger.info("listening on %s:%d (pid %d, %s loop, %s)", ls.host, sock.getsockname()[1],
                    os.getpid(), type(loop).__module__.split(".")[0], kind)
    summary.log_in_force(state, opts)      # what is in force, from what serves
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload(state, opts)))
    if early_hup.take():        # the rules may have changed after the start-up compile read them
        loop.create_task(reload(state, opts))
    # --bundle FILE replaced on disk (shipped to this node): reloaded as SIGHUP does
    watch = (BundleWatch(loop, opts.bundle, lambda: loop.create_task(reload(state, opts)))
             if opts.bundle else None)
    if ready is not None:
        ready([s.getsockname() for s in servers])
    await stop.wait()
    if watch is not None:
        watch.close()
    for s in servers:
        s.close()
    for s in servers:           # the connections accepted just before: sessions the drain sees
        await s.wait_closed()
    await _drain_sessions(state, opts.shutdown_grace)
    no_fd.close()
    await state.delivery.close()
    state.auth.close()
    await state.anvil.aclose()


CANCEL_GRACE = 5.0         # after --shutdown-grace: seconds for the hand-overs cut short to clean up


async def _drain_sessions(state: ServerState, grace: float) -> None:
    """SIGTERM: idle sessions get 421 at once; a session whose reply is in
    flight (a delivery being committed, a DNS answer, a tarpit) may finish
    it for up to `grace` seconds (--shutdown-grace), as qmail's running qmail-smtpd
    children finish after tcpserver stops: a message being stored is not
    thrown away (the client would send it again: a duplicate at best).
    Then every session left gets the 421."""
    bye = reply("shutdown", host=state.engine_config.greeting.split()[0])
    busy = []
    for session in list(state.sessions):
        task = session.task
        if task is not None and not task.done():
            busy.append(task)
        else:
            session.abort(bye, "shutdown")
    if busy:
        logger.info("shutdown: waiting up to %g s for %d session(s) with a reply in flight",
                    grace, len(busy))
        _, late = await asyncio.wait(busy, timeout=grace)
        if late:
            logger.warning("shutdown: %d session(s) still busy after %g s: closed",
                           len(late), grace)
    else:
        late = set()
    for session in list(state.sessions):
        session.abort(bye, "shutdown")
    if late:
        # cut short: each hand-over cleans up before the loop goes (a
        # qmail-queue child is killed before it commits, as when the client
        # leaves; left alone, it outlived the server on the asyncio loop and
        # could still queue a message whose client was told 421)
        for task in late:
            task.cancel()
        await asyncio.wait(late, timeout=CANCEL_GRACE)
    logger.info("shutdown: done")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind `--loop` names."""
    check_value(BY_NAME["loop"], kind)
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_process(opts: ServeOptions, reuse_port: bool, worker: bool = False) -> int:
    """One serving process from start to exit: 0, or 2 after a start-up
    error (printed as one line). `worker`: one of --workers (its metrics
    go to the parent's files, serve/metrics.py)."""
    exporter = None
    try:
        state = build_state(opts)
        # after the rules and the spool (their errors stay one line), per
        # process: each worker has its own descriptor table (--workers)
        opts.max_connections = fit_max_connections(opts, raise_nofile())
        state.limits = limits_for(opts, state.policy)      # a reload makes them from opts too
        loop = new_loop(opts.loop)
        if state.metrics is not None:
            exporter = metrics_export.start_process(state.metrics, opts, loop, worker)
    except StartupError as exc:
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        return 2
    try:
        loop.run_until_complete(serve(opts, state, reuse_port=reuse_port))
    except (OSError, StartupError) as exc:
        log.flush()             # the lines before it, then the error
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        return 2
    finally:
        if exporter is not None:
            exporter.close()    # a worker's last counts are written
        # the last loop turn's lines ("shutdown: done"): its scheduled flush
        # would run on a loop that no longer turns
        log.flush()
        loop.close()
    return 0
