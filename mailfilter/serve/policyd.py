"""`mailfilter policyd`: the rules as a Postfix SMTPD policy delegation service.

Job: let an existing Postfix fleet use spamcontrol lists compiled into a
bundle. Postfix's smtpd (`check_policy_service inet:HOST:PORT` or
`unix:PATH` in its restrictions) sends one request per check as `name=value`
lines ended by an empty line, on a connection it keeps for more requests
(Postfix SMTPD_POLICY_README, "Protocol description"); each is answered
`action=...` and an empty line.

Semantics (docs/behaviour/policyd.md): each request is one fresh
SessionPolicy for `client_address` / `client_name` (Postfix's verified
name, as TCPREMOTEHOST), run through the stages the request has reached,
exactly as the SMTP server runs them:
- a tcp.smtp `deny` client: the client_denied refusal, at any stage;
- CONNECT, HELO/EHLO, MAIL: DUNNO (spamcontrol's HELO and MAIL verdicts
  are pending: they refuse at RCPT, docs/behaviour/smtp.md#pending-verdicts),
  unless MAIL itself is refused;
- RCPT: the RCPT verdict, with the HELO, sender and `sasl_username` (an
  authenticated client may relay) of the request;
- DATA, END-OF-MESSAGE, VRFY, ETRN: DUNNO.
A refusal is `action=<code> <enhanced> <text>` with the server's own reply
text; an accept is `action=DUNNO`, so Postfix's later restrictions still run.
DNS checks (HELOCHECK A/M, MFDNSCHECK) are not made here: Postfix has its
own (reject_unknown_helo_hostname, reject_unknown_sender_domain).
Every verdict is one decision line naming its rule, as the server's.

`--metrics HOST:PORT` serves Prometheus metrics (docs/operations.md#metrics):
requests by protocol_state and action, the rules in force, reloads.

Invariants: a request is at most MAX_REQUEST bytes and MAX_ATTRIBUTES lines
(else the connection is closed with one log line); a malformed line or an
unknown request type gets `action=DUNNO` and a log line, never a refusal; an
internal error answers `action=DEFER_IF_PERMIT` (a 4xx later, never a silent
accept or a 5xx); SIGHUP loads the rules again (a failure keeps the old ones);
SIGTERM stops.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from mailfilter import log
from mailfilter.policy.engine import Client, PolicyEngine

logger = logging.getLogger("mailfilter")

MAX_REQUEST = 64 * 1024       # bytes per request (Postfix sends a few hundred)
MAX_ATTRIBUTES = 256          # lines per request
DUNNO = b"action=DUNNO\n\n"
INTERNAL = b"action=DEFER_IF_PERMIT Service temporarily unavailable\n\n"
# protocol_state values at which the RCPT verdict is asked (the others: DUNNO)
_RCPT_STATES = frozenset(("RCPT",))
_MAIL_STATES = frozenset(("MAIL", "RCPT"))


def parse_request(block: bytes) -> dict[str, str]:
    """The attributes of one request (its lines without the empty line).
    ValueError for a line without `=`."""
    attrs: dict[str, str] = {}
    for raw in block.split(b"\n"):
        if not raw:
            continue
        name, eq, value = raw.decode("utf-8", "surrogateescape").partition("=")
        if not eq or not name:
            raise ValueError(f"not name=value: {raw[:40]!r}")
        attrs[name] = value
    return attrs


class PolicyService:
    """Answers requests from one PolicyEngine (swapped by reload())."""

    def __init__(self, engine: PolicyEngine, metrics=None):
        self.engine = engine
        self.metrics = metrics      # metrics/counts.py Counts("policyd") with --metrics, else None

    def answer(self, attrs: dict[str, str]) -> bytes:
        """The `action=` reply (with its empty line) to one request."""
        if attrs.get("request") != "smtpd_access_policy":
            log.event(action="dunno", stage="POLICYD", reason="unknown_request",
                      detail=attrs.get("request", "-"))
            return DUNNO
        state = attrs.get("protocol_state", "").upper()
        ip = attrs.get("client_address", "")
        host = attrs.get("client_name") or "unknown"
        sp = self.engine.session(Client(ip=ip, host=host))
        label = f"{host}[{ip}]"
        helo = attrs.get("helo_name") or None
        sender = attrs.get("sender")
        rcpt = attrs.get("recipient")
        v = sp.connect()
        if not sp.profile.allowed:          # deny: refused whatever the stage
            v = sp.profile.denied_verdict
            return self._reply(v, label, helo, sender, rcpt)
        user = attrs.get("sasl_username")
        if user:
            sp.auth_success(user)
        if helo is not None:
            sp.helo(helo)
        if state not in _MAIL_STATES or sender is None:
            return DUNNO
        v = sp.mail(sender)
        if not v.accept:
            return self._reply(v, label, helo, sender, None)
        if state not in _RCPT_STATES or not rcpt:
            return DUNNO
        return self._reply(sp.rcpt(rcpt), label, helo, sender, rcpt)

    @staticmethod
    def _reply(v, label, helo, sender, rcpt) -> bytes:
        log.decision(v, client=label, helo=helo, sender=sender, rcpt=rcpt, detail="policyd")
        if v.accept:
            return DUNNO
        r = v.reply
        return f"action={r.code} {r.enhanced} {r.text}\n\n".encode("utf-8", "backslashreplace")


# the first character after `action=`: a 5xx refusal, a 4xx one, else DUNNO
_ACTIONS = {b"5": "reject", b"4": "defer"}


class PolicyProtocol(asyncio.Protocol):
    """One Postfix connection: requests in, answers out, in order."""

    def __init__(self, service: PolicyService):
        self.service = service
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                break
            block = bytes(self.buf[:end])
            del self.buf[:end + 2]
            out.append(self._one(block))
        if out:
            self.transport.write(b"".join(out))
        if len(self.buf) > MAX_REQUEST:
            log.event(action="close", stage="POLICYD", reason="request_too_long",
                      detail=f"{len(self.buf)} bytes")
            self.transport.close()

    def _one(self, block: bytes) -> bytes:
        if len(block) > MAX_REQUEST or block.count(b"\n") >= MAX_ATTRIBUTES:
            log.event(action="dunno", stage="POLICYD", reason="request_too_long")
            return self._counted("-", "bad_request", DUNNO)
        try:
            attrs = parse_request(block.replace(b"\r", b""))
        except ValueError as exc:
            log.event(action="dunno", stage="POLICYD", reason="bad_request", detail=str(exc))
            return self._counted("-", "bad_request", DUNNO)
        stage = attrs.get("protocol_state", "").upper()
        try:
            answer = self.service.answer(attrs)
        except Exception:
            logger.exception("policyd: internal error")
            return self._counted(stage, "internal_error", INTERNAL)
        return self._counted(stage, _ACTIONS.get(answer[7:8], "dunno"), answer)

    def _counted(self, stage: str, action: str, answer: bytes) -> bytes:
        m = self.service.metrics
        if m is not None:
            m.policyd_request(stage, action)
        return answer


def load_engine(rules: str | None, bundle: str | None, open_relay: bool) -> PolicyEngine:
    """The rules as `serve` loads them (serve/lifecycle.py load_policy: the
    bundle, or the directory compiled with its diagnostics as warnings, and
    the rcpthosts check); StartupError with one line on any problem."""
    from mailfilter.serve.config import ServeOptions
    from mailfilter.serve.lifecycle import load_policy
    return load_policy(ServeOptions(rules=rules, bundle=bundle, open_relay=open_relay))


async def serve(listen: str, service: PolicyService, reload, ready=None) -> None:
    loop = asyncio.get_running_loop()
    if listen.startswith("unix:"):
        path = listen[5:]
        if os.path.exists(path):
            os.unlink(path)             # a stale socket of an earlier run
        server = await loop.create_unix_server(lambda: PolicyProtocol(service), path)
        where = path
    else:
        host, _, port = listen.rpartition(":")
        server = await loop.create_server(lambda: PolicyProtocol(service),
                                          host.strip("[]") or "127.0.0.1", int(port))
        where = "%s:%d" % server.sockets[0].getsockname()[:2]
    logger.info("policyd: listening on %s (pid %d)", where, os.getpid())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    if ready is not None:
        ready(where)
    await stop.wait()
    server.close()
    await server.wait_closed()
    logger.info("policyd: stopped")


def add_parser(sub) -> None:
    p = sub.add_parser("policyd", help="the rules as a Postfix SMTPD policy service",
                       epilog="Postfix: smtpd_recipient_restrictions = ..., check_policy_service "
                              "inet:HOST:PORT (or unix:PATH), ... exit codes: 0 stopped (SIGTERM), "
                              "2 could not start. SIGHUP loads the rules again.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rules", metavar="DIR", help="rules directory, compiled at start")
    src.add_argument("--bundle", metavar="FILE", help="compiled bundle (`mailfilter compile`)")
    p.add_argument("--listen", default="127.0.0.1:10040", metavar="HOST:PORT|unix:PATH",
                   help="where Postfix connects (default: 127.0.0.1:10040)")
    p.add_argument("--open-relay", action="store_true",
                   help="allow rules without rcpthosts (docs/behaviour/control-files.md#rcpthosts)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="least severe level logged (default: info)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    p.set_defaults(func=cmd_policyd)


def cmd_policyd(args) -> int:
    log.setup(args.log_level)
    from mailfilter.serve.config import StartupError
    metrics = endpoint = None
    try:
        t0 = time.monotonic()
        engine = load_engine(args.rules, args.bundle, args.open_relay)
        if args.metrics is not None:
            from mailfilter.metrics import Counts
            from mailfilter.metrics.collector import registry_for
            from mailfilter.serve.metrics import endpoint as metrics_endpoint
            metrics = Counts("policyd")
            metrics.sources["mailfilter_log_dropped_lines"] = log.dropped_total
            metrics.rules_loaded(engine.bundle, time.monotonic() - t0)
            endpoint = metrics_endpoint(args.metrics, registry_for(metrics))
            logger.info("policyd: metrics on %s", endpoint.url)
    except StartupError as exc:
        print(f"mailfilter policyd: {exc}", file=sys.stderr)
        return 2
    service = PolicyService(engine, metrics)

    async def reload() -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            new = await loop.run_in_executor(None, load_engine, args.rules, args.bundle,
                                             args.open_relay)
        except Exception as exc:
            logger.error("policyd: reload refused, keeping the current rules: %s", exc)
            if metrics is not None:
                metrics.reload("rules", False)
            return
        service.engine = new
        if metrics is not None:
            metrics.rules_loaded(new.bundle, time.monotonic() - t0)
            metrics.reload("rules", True)
        logger.info("policyd: reload ok: %d rules from %s", new.bundle.n_rules,
                    args.bundle or args.rules)

    try:
        asyncio.run(serve(args.listen, service, reload))
    except OSError as exc:
        print(f"mailfilter policyd: --listen {args.listen}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    finally:
        if endpoint is not None:
            endpoint.close()
        log.flush()
    return 0
