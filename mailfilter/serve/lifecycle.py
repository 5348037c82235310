"""`mailfilter serve`: start-up, signals, workers.

Job: build the ServerState from options (compile `--rules` or load `--bundle`),
refuse an accidental open relay (SPEC A §4), listen on every `--listen`
address, and run until SIGTERM/SIGINT (then drain: `_drain_sessions`).
SIGHUP recompiles (with `--rules`: in
a child process, `mailfilter compile`, since compiling in a thread would hold
the GIL and stall every session for seconds on a big rule set) or reloads
(with `--bundle`, in a worker thread); a failure keeps the old rules and logs
why, and so does a rule set with diagnostics (a skipped line may be the rule
the operator just added: README "a broken rule set is logged and the old one
kept"; at start-up there is no old set, so the diagnostics are warnings); a
success swaps them for new sessions (sessions in flight finish on the rules
they started with). `--workers N` forks N processes that each bind
the same ports with SO_REUSEPORT; the parent forwards SIGHUP/SIGTERM,
restarts a worker that dies (logged; at most one restart a second) and stops
when a worker cannot start (exit 2: bad rules, port taken); a worker exits
with its parent (PR_SET_PDEATHSIG), so a killed parent leaves no orphan
serving old rules. Before forking, the parent checks that no other process
holds the port (SO_REUSEPORT would otherwise let a second instance share
it silently). A SIGHUP that arrives while the rules are still compiling at
start-up is kept and answered by one reload once the server listens (the
default action, death, would take the MX down after a restart + HUP).

Options may also come from a TOML file (`--config FILE`) whose keys are the
long option names with `_` for `-` (e.g. `listen = ["127.0.0.1:2525"]`,
`deliver = "maildir:var/spool"`); the command line wins, and a rule source
given there (`--rules` or `--bundle`) replaces the file's `rules`/`bundle`.

Limits that come from the rules (`timeoutsmtpd` -> the idle timeout,
`timeoutsession` -> the session deadline) apply unless `--timeout` /
`--session-deadline` were given, and are re-read on every reload.

Every option is checked at start-up, whether it came from the command line
or the TOML file (types: a TOML string "false" for a boolean is an error,
not true; ranges: positive timeouts and caps): a one-line error, exit 2.
An AF_INET6 listener takes IPv6 only (IPV6_V6ONLY, as asyncio's
create_server), so `--listen 0.0.0.0:25 --listen [::]:25` is dual stack.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field

from mailfilter.rules import bundle as bundle_mod
from mailfilter import log
from mailfilter.rules import compiler
from mailfilter.delivery import Delivery
from mailfilter.policy.dns import Resolver
from mailfilter.policy.engine import PolicyEngine, PolicyOptions
from mailfilter.smtp.replies import reply
from mailfilter.smtp.protocol import REMOTE_HOST_MODES, Limits, ServerState, SMTPProtocol

logger = logging.getLogger("mailfilter")

DEFAULT_LISTEN = "127.0.0.1:2525"
DEFAULT_DELIVER = "maildir:var/spool"
DEFAULT_TIMEOUT = 300.0               # without --timeout and timeoutsmtpd
DEFAULT_SESSION_DEADLINE = 3600.0     # without --session-deadline and timeoutsession


@dataclass
class ServeOptions:
    rules: str | None = "rules"
    bundle: str | None = None
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    hostname: str | None = None
    deliver: str = DEFAULT_DELIVER
    workers: int = 1
    loop: str = "uvloop"
    open_relay: bool = False
    resolver: str | None = None
    remote_host: str = "confirmed"      # TCPREMOTEHOST: off | ptr | confirmed (server.py)
    max_connections: int = 10_000
    max_per_ip: int = 100
    timeout: float | None = None        # default: rules' timeoutsmtpd, else 300
    session_deadline: float | None = None   # default: rules' timeoutsession, else 3600
    shutdown_grace: float = 30.0        # SIGTERM: seconds a delivery in flight may take to finish
    syslog: bool = False
    syslog_socket: str = "/dev/log"
    log_level: str = "info"
    # SMTP AUTH (authsession.py, SPEC A §7, B §4.3): `auth` is the global SMTPAUTH
    # (tcp.smtp SMTPAUTH overrides it per client); None = not offered.
    auth: str | None = None
    userdb: str = "var/users.db"
    checkpassword: str | None = None     # "PROG ARGS": external checkprogram per attempt
    checkpassword_order: str = "djb"     # or "dabrowski" (SPEC B §4.5)
    checkpassword_timeout: float = 10.0
    auth_fail_delay: float = 2.0


class StartupError(Exception):
    pass


def parse_listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise StartupError(f"--listen wants HOST:PORT with PORT 0-65535, got {spec!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


_BOOL_OPTIONS = ("open_relay", "syslog")
_INT_OPTIONS = ("workers", "max_connections", "max_per_ip")
_FLOAT_OPTIONS = ("timeout", "session_deadline", "checkpassword_timeout", "auth_fail_delay",
                  "shutdown_grace")
LOOPS = ("uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _typed(where: str, name: str, value):
    """A TOML value as the option's type; anything else is a StartupError
    (a string "false" must not switch open_relay on)."""
    if name in _BOOL_OPTIONS:
        if not isinstance(value, bool):
            raise StartupError(f"{where} must be true or false, not {value!r}")
        return value
    if name in _INT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StartupError(f"{where} must be an integer, not {value!r}")
        return value
    if name in _FLOAT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StartupError(f"{where} must be a number of seconds, not {value!r}")
        return float(value)
    if name == "listen":
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise StartupError(f'{where} must be "HOST:PORT" or a list of them, not {value!r}')
        return value
    if not isinstance(value, str):
        raise StartupError(f"{where} must be a string, not {value!r}")
    return value


def check_options(opts: ServeOptions) -> None:
    """Ranges and choices of every option, wherever it came from."""
    def positive(flag: str, value, minimum=0.0, strict=True):
        ok = value > minimum if strict else value >= minimum
        if not (ok and math.isfinite(value)):
            raise StartupError(f"{flag} must be {'above' if strict else 'at least'} "
                               f"{minimum:g}, not {value!r}")
    positive("--workers", opts.workers, 1, strict=False)
    positive("--max-connections", opts.max_connections, 1, strict=False)
    positive("--max-per-ip", opts.max_per_ip, 1, strict=False)
    for flag, value in (("--timeout", opts.timeout), ("--session-deadline", opts.session_deadline)):
        if value is not None:
            positive(flag, value)
    positive("--checkpassword-timeout", opts.checkpassword_timeout)
    positive("--auth-fail-delay", opts.auth_fail_delay, strict=False)
    positive("--shutdown-grace", opts.shutdown_grace, strict=False)
    if opts.loop not in LOOPS:
        raise StartupError(f"--loop must be uvloop or asyncio, not {opts.loop!r}")
    if opts.log_level not in LOG_LEVELS:
        raise StartupError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {opts.log_level!r}")
    if opts.rules is None and opts.bundle is None:
        raise StartupError("give --rules DIR or --bundle FILE")
    for spec in opts.listen:
        host, port = parse_listen(spec)
        if port == 0 and opts.workers > 1:
            raise StartupError(f"--listen {spec}: --workers needs a fixed port (0 picks one per worker)")


def load_policy(opts: ServeOptions) -> PolicyEngine:
    """Compile or load the rules; raises StartupError with a clear message."""
    try:
        if opts.bundle:
            loaded = bundle_mod.load(opts.bundle)
        else:
            compiled = compiler.compile_dir(opts.rules)
            for d in compiled.diagnostics:
                logger.warning("%s", d)
            loaded = bundle_mod.from_compiled(compiled)
    except (OSError, ValueError, bundle_mod.BundleError) as exc:
        raise StartupError(str(exc)) from None
    defaults = {} if opts.auth is None else {"SMTPAUTH": opts.auth}
    engine = PolicyEngine(loaded, PolicyOptions(open_relay=opts.open_relay, defaults=defaults))
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
    return Limits(max_connections=opts.max_connections, max_per_ip=opts.max_per_ip,
                  idle_timeout=timeout, session_deadline=deadline)


def build_state(opts: ServeOptions) -> ServerState:
    check_options(opts)             # a bad option is a start-up error, not a traceback
    if opts.remote_host not in REMOTE_HOST_MODES:
        raise StartupError(f"--remote-host must be one of {', '.join(REMOTE_HOST_MODES)}, "
                           f"not {opts.remote_host!r}")
    try:
        resolver = Resolver(opts.resolver)
    except ValueError as exc:
        raise StartupError(f"--resolver {exc}") from None
    # after the cheap checks (their errors stay one line), before the slow part
    logger.info("starting (pid %d): %s", os.getpid(),
                f"loading bundle {opts.bundle}" if opts.bundle else f"compiling rules {opts.rules}")
    policy = load_policy(opts)
    try:
        delivery = Delivery.from_spec(opts.deliver)
    except ValueError as exc:
        raise StartupError(f"--deliver: {exc}") from None
    try:
        delivery.check()        # an unusable spool would defer every message with 451
    except OSError as exc:
        raise StartupError(f"--deliver {opts.deliver}: {exc.strerror or exc}"
                           + (f": {exc.filename}" if exc.filename else "")) from None
    return ServerState(policy, delivery, limits=limits_for(opts, policy), resolver=resolver,
                       hostname=opts.hostname, auth=build_auth(opts), remote_host=opts.remote_host)


def build_auth(opts: ServeOptions):
    """The AUTH service; its verifier (user DB or checkpassword) is made on first use."""
    from mailfilter.auth.session import AuthConfig, AuthService
    from mailfilter.auth.verify import CheckpasswordVerifier, DBVerifier

    if opts.checkpassword_order not in ("djb", "dabrowski"):
        raise StartupError("--checkpassword-order must be djb or dabrowski")
    if opts.checkpassword:
        try:
            verifier = CheckpasswordVerifier(opts.checkpassword, order=opts.checkpassword_order,
                                             timeout=opts.checkpassword_timeout)
        except ValueError as exc:
            raise StartupError(f"--checkpassword: {exc}") from None
        return AuthService(AuthConfig(fail_delay=opts.auth_fail_delay), verifier=verifier)
    path = opts.userdb
    return AuthService(AuthConfig(fail_delay=opts.auth_fail_delay),
                       verifier_factory=lambda: DBVerifier(path))


RELOAD_COMPILE_TIMEOUT = 600.0      # seconds for the reload's `mailfilter compile`


def _package_env() -> dict:
    """The environment for a `python -m mailfilter` child: this package first
    on the path, whether it is installed or run from a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


async def _recompile(opts: ServeOptions) -> PolicyEngine:
    """--rules on SIGHUP: `mailfilter compile` in a child process into a
    temporary bundle, then load it here (mmap-sized work, not a compile)."""
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
        if proc.returncode == 1:        # diagnostics: the last line counts them
            shown = "; ".join(lines[:3]) + ("; ..." if len(lines) > 4 else "")
            raise StartupError(f"{lines[-1]} in {opts.rules} (run `mailfilter check --rules "
                               f"{opts.rules}`): {shown}")
        if proc.returncode != 0:
            raise StartupError("; ".join(lines[-3:]) or f"compile exited with {proc.returncode}")
        loop = asyncio.get_running_loop()
        policy = await loop.run_in_executor(
            None, load_policy, dataclasses.replace(opts, bundle=tmp, rules=None))
        policy.bundle.source = opts.rules
        return policy
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


async def reload(state: ServerState, opts: ServeOptions) -> bool:
    """SIGHUP: build new rules off the loop; keep the old ones on failure."""
    loop = asyncio.get_running_loop()
    try:
        if opts.bundle:
            policy = await loop.run_in_executor(None, load_policy, opts)
        else:
            policy = await _recompile(opts)
    except StartupError as exc:
        logger.error("reload failed, keeping the current rules: %s", exc)
        return False
    state.swap_policy(policy, limits_for(opts, policy))
    # The old rules hold reference cycles (each lazy regex and its matcher),
    # so only a full collection frees them; without one, 20 reloads of a
    # 100k-rule set kept 8 old copies (+74 MB) until the collector came by.
    # Sessions in flight still reference the old set; it goes with them.
    gc.collect()
    logger.info("reload ok: %d rules from %s", policy.bundle.n_rules, policy.bundle.source)
    return True


def _socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound TCP socket for host:port; StartupError naming the address."""
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
        raise StartupError(f"--listen {where}: {exc.strerror or exc}") from None
    return sock


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = _socket(host, port, reuse_port)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def check_ports_free(opts: ServeOptions) -> None:
    """Before --workers forks: bind each address WITHOUT SO_REUSEPORT (and
    without listening), which fails when anybody holds the port, including
    another instance whose workers set SO_REUSEPORT and would otherwise
    share it silently."""
    for spec in opts.listen:
        _socket(*parse_listen(spec), reuse_port=False).close()


_early_hup = [False]


def _note_hup(_signum, _frame) -> None:
    """SIGHUP before the event loop handles it (rules still compiling)."""
    _early_hup[0] = True


async def serve(opts: ServeOptions, state: ServerState, ready=None, reuse_port: bool = False) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in opts.listen:
        host, port = parse_listen(spec)
        sock = _bind(host, port, reuse_port)
        servers.append(await loop.create_server(lambda: SMTPProtocol(state), sock=sock))
        logger.info("listening on %s:%d (pid %d, %s loop)", host, sock.getsockname()[1],
                    os.getpid(), type(loop).__module__.split(".")[0])
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload(state, opts)))
    if _early_hup[0]:           # the rules may have changed after the start-up compile read them
        _early_hup[0] = False
        loop.create_task(reload(state, opts))
    if ready is not None:
        ready([s.sockets[0].getsockname() for s in servers])
    await stop.wait()
    for s in servers:
        s.close()
    await _drain_sessions(state, opts.shutdown_grace)
    for s in servers:
        await s.wait_closed()
    await state.delivery.close()
    state.auth.close()


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
            session._abort(bye)
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
        session._abort(bye)
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
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    if kind == "asyncio":
        return asyncio.new_event_loop()
    raise StartupError(f"--loop must be uvloop or asyncio, not {kind!r}")


def _die_with_parent(parent: int) -> None:
    """In a worker: SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG),
    so a killed supervisor leaves no orphan serving old rules."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:          # it died before prctl took effect
        os._exit(0)


def run_process(opts: ServeOptions, reuse_port: bool) -> int:
    try:
        state = build_state(opts)
        loop = new_loop(opts.loop)
    except StartupError as exc:
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        return 2
    try:
        loop.run_until_complete(serve(opts, state, reuse_port=reuse_port))
    except (OSError, StartupError) as exc:
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    return 0


def run(opts: ServeOptions) -> int:
    try:
        check_options(opts)
        if opts.workers > 1:
            check_ports_free(opts)
    except StartupError as exc:
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGHUP, _note_hup)     # inherited by the workers until their loop runs
    log.setup(opts.log_level, use_syslog=opts.syslog, syslog_address=opts.syslog_socket)
    if opts.workers <= 1:
        return run_process(opts, reuse_port=False)
    return supervise(opts)


def _spawn_worker(opts: ServeOptions) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # not the parent's forwarding handlers (a restarted worker inherits them)
            signal.signal(signal.SIGHUP, _note_hup)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent(parent)
            code = run_process(opts, reuse_port=True)
        finally:
            os._exit(code)
    return pid


RESTART_MIN_INTERVAL = 1.0      # a worker that keeps dying is restarted at most once a second


def supervise(opts: ServeOptions) -> int:
    """The --workers parent: forward signals, restart dead workers, stop
    when one cannot start (exit 2) or on SIGTERM/SIGINT."""
    children: dict[int, float] = {}     # pid -> start time
    stopping: list[int] = []
    status = 0

    def forward(signum, _frame=None):
        if signum != signal.SIGHUP:
            stopping.append(signum)
        for child in list(children):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for _ in range(opts.workers):
        children[_spawn_worker(opts)] = time.monotonic()
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    if _early_hup[0]:                   # came before `forward` was in place
        _early_hup[0] = False
        forward(signal.SIGHUP)
    while children:
        try:
            pid, wstatus = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        code = os.waitstatus_to_exitcode(wstatus)
        if stopping:
            status = status or code
            continue
        if code == 2:                   # start-up error: the others are alike
            logger.error("worker %d could not start (exit 2); stopping", pid)
            status = 2
            forward(signal.SIGTERM)
            continue
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        logger.error("worker %d %s; starting a new one", pid, how)
        if time.monotonic() - started < RESTART_MIN_INTERVAL:
            time.sleep(RESTART_MIN_INTERVAL)
        if not stopping:
            children[_spawn_worker(opts)] = time.monotonic()
    return status


_FLAGS = ("rules", "bundle", "hostname", "deliver", "workers", "loop", "resolver", "remote_host",
          "syslog_socket", "max_connections", "max_per_ip", "timeout", "session_deadline", "log_level",
          "auth", "userdb", "checkpassword", "checkpassword_order", "checkpassword_timeout",
          "auth_fail_delay", "shutdown_grace")


def _config_file(path: str, opts: ServeOptions) -> set[str]:
    """Apply the TOML file at `path` to `opts`; the option names it set."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StartupError(f"--config {path}: {exc}") from None
    names = set()
    for key, value in data.items():
        name = key.replace("-", "_")
        if not hasattr(opts, name):
            raise StartupError(f"--config {path}: unknown setting {key!r}")
        setattr(opts, name, _typed(f"--config {path}: {key}", name, value))
        names.add(name)
    if {"rules", "bundle"} <= names:
        raise StartupError(f"--config {path}: give rules or bundle, not both")
    return names


def options_from(args) -> ServeOptions:
    """ServeOptions from the defaults, then --config, then the command line
    (which wins; its --rules or --bundle replaces the file's rule source)."""
    opts = ServeOptions()
    from_file = _config_file(args.config, opts) if getattr(args, "config", None) else set()
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(opts, name, value)
    if getattr(args, "listen", None):
        opts.listen = args.listen
    if getattr(args, "open_relay", False):
        opts.open_relay = True
    if getattr(args, "syslog", False):
        opts.syslog = True
    if getattr(args, "rules", None) is not None:
        opts.bundle = None
    elif getattr(args, "bundle", None) is not None or "bundle" in from_file:
        opts.rules = None
    if isinstance(opts.listen, str):
        opts.listen = [opts.listen]
    return opts


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rules", help="rules directory, compiled at start (default rules/)")
    src.add_argument("--bundle", help="compiled bundle file")
    p.add_argument("--listen", action="append", help=f"HOST:PORT (repeatable; default {DEFAULT_LISTEN})")
    p.add_argument("--hostname", help="name in the greeting (default: rules' smtpgreeting/me)")
    p.add_argument("--deliver", help=f"maildir:DIR, qmail-queue:PROG, smtp:HOST:PORT, lmtp:HOST:PORT, discard "
                                     f"(default {DEFAULT_DELIVER})")
    p.add_argument("--workers", type=int, help="processes sharing the port with SO_REUSEPORT")
    p.add_argument("--loop", choices=("uvloop", "asyncio"))
    p.add_argument("--config", help="TOML file with the same settings")
    p.add_argument("--open-relay", action="store_true", help="allow running without rcpthosts (SPEC A §4)")
    p.add_argument("--resolver", metavar="ADDR",
                   help="DNS server for the client host name, HELOCHECK A/M and MFDNSCHECK: "
                        "IP, IP:PORT, [IPV6]:PORT or a bare IPv6 address; several separated by "
                        "commas are asked in order (default: /etc/resolv.conf)")
    p.add_argument("--remote-host", choices=REMOTE_HOST_MODES,
                   help="client host name (qmail's TCPREMOTEHOST, used by tcp.smtp =host rules, "
                        "HELOCHECK \"=\", decorated badmailfrom and the Received header): "
                        "off = always unknown (tcpserver -H), ptr = first PTR name, confirmed = "
                        "the PTR name only if it resolves back to the client address (default; "
                        "tcpserver -p, Postfix)")
    p.add_argument("--max-connections", type=int)
    p.add_argument("--max-per-ip", type=int)
    p.add_argument("--timeout", type=float,
                   help="idle seconds per command (default: rules' timeoutsmtpd, else 300)")
    p.add_argument("--session-deadline", type=float,
                   help="seconds per session (default: rules' timeoutsession, else 3600)")
    p.add_argument("--shutdown-grace", type=float,
                   help="SIGTERM: seconds a delivery in flight may take to finish (default 30)")
    p.add_argument("--syslog", action="store_true", help="log to syslog, facility mail")
    p.add_argument("--syslog-socket", help="syslog socket (default /dev/log)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    a = p.add_argument_group("SMTP AUTH (SPEC A §7, B §4)")
    a.add_argument("--auth", metavar="MODE",
                   help='global SMTPAUTH: "" = LOGIN PLAIN, "+cram" = LOGIN PLAIN CRAM-MD5, "cram" = '
                        'CRAM-MD5, "!..." = also required before MAIL, "-" = off; tcp.smtp SMTPAUTH '
                        'overrides it per client (default: not offered)')
    a.add_argument("--userdb", metavar="PATH", help="user database (default var/users.db)")
    a.add_argument("--checkpassword", metavar='"PROG ARGS"',
                   help='verify with a checkpassword-compatible program per attempt, e.g. '
                        '"mailfilter cmd5checkpw /bin/true" (instead of the user database)')
    a.add_argument("--checkpassword-order", choices=("djb", "dabrowski"),
                   help="CRAM-MD5 fd 3 order: djb user,digest,challenge (default) or "
                        "dabrowski user,challenge,digest")
    a.add_argument("--checkpassword-timeout", type=float, help="seconds per attempt (default 10)")
    a.add_argument("--auth-fail-delay", type=float, help="seconds before each 535 (default 2)")
