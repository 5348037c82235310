"""SMTP AUTH inside a server session: modes, the offer, the dialogue, failures.

Job: glue between the engine's AuthStart/AuthResponse events
(mailfilter/smtp/engine.py), the SASL exchanges (mailfilter/auth/sasl.py), a
verifier (mailfilter/auth/verify.py) and the session policy. The SMTP session
(mailfilter/smtp/protocol.py) calls ``AuthSession.handle(ev)`` and gets
either a Reply to send now or a coroutine whose result is the Reply (run
with ``_later``, so the loop never waits on a verifier, a spawned
checkpassword or the failure delay).

SMTPAUTH modes (docs/behaviour/auth.md#modes, Hoffmann; global ``--auth MODE`` is the default
of the per-client tcp.smtp setting ``SMTPAUTH``; prefixes case-insensitive)::

    unset          nothing offered; AUTH -> 503 5.3.3
    "-"            nothing offered
    "" / other     AUTH LOGIN PLAIN
    "+cram"        AUTH LOGIN PLAIN CRAM-MD5
    "cram"         AUTH CRAM-MD5
    "!" prefix     the same offer, and AUTH required before MAIL (530,
                   mailfilter/policy/engine.py)

Replies (docs/behaviour/auth.md#dialogue, RFC 4954; all from mailfilter/smtp/replies.py): unknown
or not offered mechanism 504; ``*`` 501 cancelled; bad base64 / empty line /
wrong shape 501 malformed; success 235 and ``sp.auth_success(user)`` (relay as
RELAYCLIENT="", the user in Received (ESMTPA) and decision lines); wrong
credentials 535 after ``fail_delay`` seconds (asyncio.sleep); verifier trouble
454 4.7.0; locked client IP or user 454 4.7.0 (auth_locked) without verifying;
the ``max_session_failures``-th failure in one session 421 and close. The
engine itself answers a second AUTH (503) and AUTH in a transaction (503);
``MAIL FROM:<..> AUTH=`` is never looked at here.

Failure accounting (docs/behaviour/auth.md#failures-and-lockout): a failure
(535) counts in sliding windows of ``window`` seconds for the client IP
(``by_ip``), for the user from the client's network (``by_user``, keyed by
lockout.user_net_key: IPv4 /24, IPv6 /64) and for the user across all
networks (``user_budget``). ``max_fail_ip`` / ``max_fail_user`` failures lock
that IP / that user-from-that-network for ``lockout`` seconds; a guesser
thus locks the user out of its own network only. A network that
authenticated the user in the last ``known_ttl`` seconds (``known``) is
never locked for that user. Past ``max_fail_user_total`` failures of a user
across networks, attempts for it from unknown networks are spaced out
(``pacer``: one per ``user_pace`` seconds, each waiting at most
``user_pace_max``) -- a delay, never a refusal. A success clears the
user-from-network count (not the IP's, not the budget). The tables are
bounded (LRU). An attempt is counted as in flight for its IP and its
user-from-network from before it is verified (and paced) until its result
is counted, and one is only started while failures in the window + attempts
in flight stay below both limits; the others get the lockout's 454 at once.
So 100 parallel guesses from one network get at most ``max_fail_user``
verifications for one user (and at most ``max_fail_ip`` per address, which
also bounds the checkpassword processes one client can have running).

Where the counts live (docs/behaviour/auth.md#fleet): by default in this
process (the trackers here; with ``serve --workers N`` each worker counts
for itself). With a shared store (``--state redis://...``,
limits/redis.py) the failures, the locks and the known networks are the
fleet's: before verifying, one round trip reads the fleet's locks and
counts (a fleet lock is remembered here until it lapses, so the next AUTH
on this process is refused at once); a failure is counted there too (one
round trip), and so is a success. The local trackers keep counting
alongside -- they are what is in force while Redis cannot be reached. The
attempts in flight and the pacer stay per process: they bound the
verifications running here, not the guesses. Settings: AuthConfig, the
``auth_*`` options of ``serve`` (serve/config.py).

Every attempt is logged as one key=value line: ``action=auth result=ok|fail|
temp|locked|cancel|malformed|unavailable|unknown_mech|paced mech= user=
client= reason=`` (``paced``: the attempt waits before it is verified).
Never a password, digest, challenge or raw AUTH line.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass

from mailfilter import log
from mailfilter.smtp.replies import Reply, reply
from mailfilter.auth.lockout import KnownNetworks, Pacer, user_net_key
from mailfilter.auth.sasl import Challenge, Credentials, Failure, new_exchange
from mailfilter.smtp.engine import AuthStart
from mailfilter.auth.verify import ClientEnv, Result

__all__ = ["AuthMode", "parse_mode", "AuthConfig", "FailureTracker", "AuthService", "AuthSession"]


@dataclass(frozen=True, slots=True)
class AuthMode:
    mechanisms: tuple[str, ...]
    required: bool


_OFF = AuthMode((), False)


@functools.lru_cache(maxsize=256)     # per connection, from a handful of tcp.smtp values
def parse_mode(value: str | None) -> AuthMode:
    """SMTPAUTH value -> offered mechanisms and "required before MAIL"
    (docs/behaviour/auth.md#modes)."""
    if value is None or value == "-":
        return _OFF
    v = value.lower()
    required = v.startswith("!")
    if required:
        v = v[1:]
    if v.startswith("+cram"):
        mechs: tuple[str, ...] = ("LOGIN", "PLAIN", "CRAM-MD5")
    elif v.startswith("cram"):
        mechs = ("CRAM-MD5",)
    elif v == "-":
        mechs = ()
    else:
        mechs = ("LOGIN", "PLAIN")
    return AuthMode(mechs, required)


@dataclass
class AuthConfig:
    fail_delay: float = 2.0            # before every 535 (qmail add-ons sleep 5 s)
    window: float = 600.0              # failure counting window, seconds
    max_fail_ip: int = 20              # failures per client IP in the window -> lockout
    max_fail_user: int = 10            # failures per user from one network in the window -> lockout
    max_fail_user_total: int = 30      # failures per user over all networks -> pacing
    user_pace: float = 5.0             # seconds between paced attempts for one user
    user_pace_max: float = 60.0        # the longest one attempt is paced
    known_ttl: float = 30 * 86400.0    # a network that authenticated a user stays exempt
    lockout: float = 900.0             # seconds a locked key stays locked
    max_session_failures: int = 3      # this many failures in one session -> 421
    table_size: int = 100_000          # keys kept per tracker (LRU)


NEEDS_TLS = frozenset(("PLAIN", "LOGIN"))    # mechanisms that send the password itself

MAX_KEY = 64      # longer keys (a client's user name can be 12 KB) are kept as a digest


def tracker_key(key: str) -> str:
    """`key` itself, or for one longer than MAX_KEY a fixed-size digest of it:
    the client chooses the user name, and 100k kept keys of 9 KB each were
    1.2 GB per process."""
    if len(key) <= MAX_KEY:
        return key
    return "#" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def ip_key(ip: str) -> str:
    """The failure-counting key of a client address: IPv4 as is, IPv6 by its
    /64 (one end site holds a whole /64, so per-address counting let a
    single host spread its guesses over 2^64 keys)."""
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:    # an IPv4 client on a dual-stack socket
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


class FailureTracker:
    """Sliding-window failure counts with a temporary lockout, per key, and the
    attempts in flight (being verified) per key.

    ``admit(key)`` reserves an attempt before it is verified; it is refused
    while the key is locked or while failures in the window + attempts in
    flight reach ``limit`` -- each attempt in flight may still become a
    failure, so parallel attempts cannot overrun the limit. Every admitted
    attempt is ``release``d once its failure (if any) is counted.

    Memory is bounded in keys and in bytes: at most ``size`` keys per table
    (LRU; an entry whose window has passed is dropped first), each key at
    most MAX_KEY characters (tracker_key), each entry a list of at most
    ``limit`` timestamps (the limit locks the key and drops the list); with
    ``limit`` 0 nothing is counted, so nothing is kept.
    """

    def __init__(self, window: float, limit: int, lockout: float, size: int = 100_000,
                 clock=time.monotonic):
        self.window, self.limit, self.lockout, self.size = window, limit, lockout, size
        self.clock = clock
        self._fails: OrderedDict[str, list[float]] = OrderedDict()
        self._locked: dict[str, float] = {}
        self._inflight: dict[str, int] = {}     # entries live only while attempts run

    def locked(self, key: str) -> bool:
        key = tracker_key(key)
        until = self._locked.get(key)
        if until is None:
            return False
        if until > self.clock():
            return True
        del self._locked[key]
        return False

    def failure(self, key: str) -> bool:
        """Count one failure; True when this one locked the key."""
        if self.limit <= 0:             # no lockout: nothing to count
            return False
        key = tracker_key(key)
        now = self.clock()
        edge = now - self.window
        fails = self._fails
        q = fails.get(key)
        if q is None:
            if fails:   # the oldest entry goes at the size cap, or once its window has passed
                oldest_key, oldest = next(iter(fails.items()))
                if len(fails) >= self.size or not oldest or oldest[-1] <= edge:
                    del fails[oldest_key]
            q = fails[key] = []
        else:
            fails.move_to_end(key)
        q.append(now)
        if q[0] <= edge:
            q[:] = [t for t in q if t > edge]
        if len(q) >= self.limit:
            del self._fails[key]
            self._locked[key] = now + self.lockout
            if len(self._locked) > self.size:
                self._locked.pop(next(iter(self._locked)))
            return True
        return False

    def admit(self, key: str, fleet: tuple[int, int] | None = None) -> bool:
        """Reserve one attempt for `key`; False (nothing reserved) when the key is
        locked or failures in the window + attempts in flight reach the limit.
        `fleet`: the shared store's (lock milliseconds left, failures in the
        window) for `key`, counted instead of this process's when higher."""
        key = tracker_key(key)
        if fleet is not None and fleet[0] > 0:
            self.lock_for(key, fleet[0] / 1000)
        if self.locked(key):
            return False
        n = self._inflight.get(key, 0)
        count = self.count(key) if fleet is None else max(fleet[1], self.count(key))
        if self.limit > 0 and count + n >= self.limit:
            return False
        self._inflight[key] = n + 1
        return True

    def lock_for(self, key: str, seconds: float) -> None:
        """Lock `key` for `seconds` from now (a lock the fleet set), unless it
        is locked for longer already."""
        key = tracker_key(key)
        until = self.clock() + seconds
        if self._locked.get(key, 0.0) < until:
            self._locked[key] = until
            if len(self._locked) > self.size:
                self._locked.pop(next(iter(self._locked)))

    def release(self, key: str) -> None:
        """End an admitted attempt (after its failure, if any, was counted)."""
        key = tracker_key(key)
        n = self._inflight.get(key, 0) - 1
        if n > 0:
            self._inflight[key] = n
        else:
            self._inflight.pop(key, None)

    def in_flight(self, key: str) -> int:
        return self._inflight.get(tracker_key(key), 0)

    def clear(self, key: str) -> None:
        self._fails.pop(tracker_key(key), None)

    def count(self, key: str) -> int:
        """Failures of `key` in the current window."""
        q = self._fails.get(tracker_key(key))
        if q is None:
            return 0
        edge = self.clock() - self.window
        if q and q[0] <= edge:
            q[:] = [t for t in q if t > edge]
        return len(q)

    def __len__(self) -> int:
        """Keys with failures counted (for tests and the memory bound)."""
        return len(self._fails)


class AuthService:
    """Per-process AUTH state: config, the verifier (made on first use),
    trackers; `shared`: the fleet's store (limits/redis.py) or None."""

    def __init__(self, config: AuthConfig | None = None, verifier=None, verifier_factory=None,
                 shared=None):
        self.config = cfg = config or AuthConfig()
        self.shared = shared
        self._verifier = verifier
        self._factory = verifier_factory
        self.by_ip = FailureTracker(cfg.window, cfg.max_fail_ip, cfg.lockout, cfg.table_size)
        self.by_user = FailureTracker(cfg.window, cfg.max_fail_user, cfg.lockout, cfg.table_size)
        # over budget = "locked" in this tracker; it only ever paces, never refuses
        self.user_budget = FailureTracker(cfg.window, cfg.max_fail_user_total, cfg.window,
                                          cfg.table_size)
        self.known = KnownNetworks(cfg.known_ttl, cfg.table_size)
        self.pacer = Pacer(cfg.user_pace, cfg.user_pace_max, cfg.table_size)
        self.metrics = None     # the server's metrics Counts (ServerState sets it), None when off

    @property
    def verifier(self):
        if self._verifier is None:
            if self._factory is None:
                from mailfilter.auth.verify import DBVerifier
                self._verifier = DBVerifier()
            else:
                self._verifier = self._factory()
        return self._verifier

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()

    def session(self, sp, client, host: str, *, tls: bool = False,
                plaintext_ok: bool = True, label: str | None = None) -> "AuthSession":
        return AuthSession(self, sp, client, host, tls=tls, plaintext_ok=plaintext_ok, label=label)


class AuthSession:
    """One connection's AUTH dialogue. See the module docstring."""

    __slots__ = ("service", "sp", "client", "host", "mode", "exchange", "failures", "label",
                 "cleartext_ok")

    def __init__(self, service: AuthService, sp, client, host: str, *, tls: bool = False,
                 plaintext_ok: bool = True, label: str | None = None):
        # PLAIN and LOGIN send the password itself: inside TLS only, unless
        # TLS cannot be had or the operator allows them in clear
        # (--auth-plaintext); CRAM-MD5 never shows the password (RFC 4954 §4)
        self.cleartext_ok = tls or plaintext_ok
        self.service = service
        self.sp = sp
        self.client = client
        self.host = host
        self.mode = parse_mode(sp.setting("SMTPAUTH"))
        self.exchange = None
        self.failures = 0
        self.label = label or f"{client.host}[{client.ip}]:{client.port}"

    def mechanisms(self) -> tuple[str, ...]:
        """The mechanisms offered now: the SMTPAUTH mode's, less PLAIN and
        LOGIN while they would cross the network in clear."""
        mechs = self.mode.mechanisms
        if self.cleartext_ok:
            return mechs
        return tuple(m for m in mechs if m not in NEEDS_TLS)

    def ehlo_keywords(self) -> list[str]:
        """The EHLO line for this client (RFC 4954 §3), or nothing."""
        mechs = self.mechanisms()
        return [f"AUTH {' '.join(mechs)}"] if mechs else []

    def _log(self, result: str, mech: str | None, user: str | None, reason: str | None = None) -> None:
        log.event(action="auth", result=result, mech=mech, user=user, client=self.label,
                  reason=reason or None)
        m = self.service.metrics
        if m is not None:
            m.auth(mech, result)

    def handle(self, ev):
        """Reply now, or a coroutine that returns the Reply."""
        if type(ev) is AuthStart:
            return self._start(ev.mechanism, ev.initial)
        ex = self.exchange
        if ex is None:                       # cannot happen: engine only sends after 334
            return reply("auth_malformed")
        return self._outcome(ex.step(ev.line))

    def _start(self, mech: str, initial: str | None):
        mechs = self.mode.mechanisms
        if not mechs:
            self._log("unavailable", mech, None)
            return reply("auth_unavailable")
        if mech in NEEDS_TLS and mech in mechs and not self.cleartext_ok:
            self._log("refused", mech, None, "needs TLS")
            return reply("auth_needs_tls")      # RFC 4954 §4: 538 before STARTTLS
        ex = new_exchange(mech, self.host) if mech in mechs else None
        if ex is None:
            self._log("unknown_mech", mech, None)
            return reply("auth_unknown_mech")
        if self.service.by_ip.locked(ip_key(self.client.ip)):
            self._log("locked", mech, None, "client ip locked")
            return reply("auth_locked")
        self.exchange = ex
        return self._outcome(ex.start(initial))

    def _outcome(self, out):
        ex = self.exchange
        if isinstance(out, Challenge):
            return reply("auth_challenge", data=base64.b64encode(out.data).decode("ascii"))
        self.exchange = None
        if isinstance(out, Failure):
            self._log("cancel" if out.reply == "auth_cancelled" else "malformed",
                      ex.mechanism, ex.user, out.reason)
            return reply(out.reply)
        return self._verify(out)

    async def _verify(self, creds: Credentials) -> Reply:
        svc = self.service
        ip, user = ip_key(self.client.ip), creds.user
        unet = tracker_key(user_net_key(user, self.client.ip))
        shared = svc.shared
        # the fleet's locks and counts, one round trip (None: Redis away, local counts only)
        fleet = (await shared.auth_view(ip, unet, tracker_key(user), svc.config.window)
                 if shared is not None else None)
        # a network that authenticated this user lately is its owner's: never
        # locked for the user, never paced (docs/behaviour/auth.md#failures-and-lockout)
        known = unet in svc.known or (fleet is not None and fleet[3])
        # reserve the attempt BEFORE verifying: failures + attempts in flight
        # stay within the limits however many arrive at once
        if not svc.by_ip.admit(ip, fleet and fleet[0]):
            return self._refused(creds, "client ip", svc.by_ip, ip)
        if not known and not svc.by_user.admit(unet, fleet and fleet[1]):
            svc.by_ip.release(ip)
            return self._refused(creds, "user", svc.by_user, unet)
        try:
            if not known:
                if fleet is not None and fleet[2][0] > 0:     # over budget across the fleet
                    svc.user_budget.lock_for(user, fleet[2][0] / 1000)
                await self._pace(creds)
            result, reason = await self._check(creds)
            if result is Result.FAIL:        # counted before the attempt is released
                self.failures += 1
                locked_ip = svc.by_ip.failure(ip)
                locked_user = not known and svc.by_user.failure(unet)
                svc.user_budget.failure(user)
                if shared is not None:
                    locked_ip, locked_user = await self._fleet_failure(
                        ip, unet, user, known, locked_ip, locked_user)
                if locked_ip or locked_user:
                    reason = f"{reason}; now locked ({'ip' if locked_ip else 'user'})"
        finally:
            svc.by_ip.release(ip)
            if not known:
                svc.by_user.release(unet)
        if result is Result.OK:
            svc.by_user.clear(unet)
            svc.known.remember(unet)
            if shared is not None:
                await shared.auth_success(unet, svc.config.known_ttl)
            self.sp.auth_success(user)
            self._log("ok", creds.mechanism, user, reason)
            return reply("auth_ok")
        if result is Result.TEMP:
            self._log("temp", creds.mechanism, user, reason)
            return reply("auth_temp")
        self._log("fail", creds.mechanism, user, reason)
        cfg = svc.config
        if cfg.fail_delay > 0:
            await asyncio.sleep(cfg.fail_delay)
        if cfg.max_session_failures and self.failures >= cfg.max_session_failures:
            return reply("auth_too_many", host=self.host)
        return reply("auth_failed")

    async def _fleet_failure(self, ip: str, unet: str, user: str, known: bool,
                             locked_ip: bool, locked_user: bool) -> tuple[bool, bool]:
        """Count the failure in the shared store too; a lock it sets there is
        also kept here (the next AUTH on this process is refused at once).
        Whether the ip / the user-from-network is now locked."""
        svc = self.service
        trackers = (svc.by_ip, svc.by_user, svc.user_budget)
        limits = tuple((0 if t is svc.by_user and known else t.limit, t.lockout) for t in trackers)
        got = await svc.shared.auth_failure(ip, unet, tracker_key(user), svc.config.window, limits)
        if got is None:             # Redis away: the local counts decided
            return locked_ip, locked_user
        for tracker, key, locked in zip(trackers, (ip, unet, user), got):
            if locked:
                tracker.lock_for(key, tracker.lockout)
        return locked_ip or got[0], locked_user or got[1]

    async def _pace(self, creds: Credentials) -> None:
        """Past the user's failure budget over all networks, wait for the
        user's next slot: spreading guesses over many networks slows them
        down instead of locking the owner out."""
        svc = self.service
        if not svc.user_budget.locked(creds.user):
            return
        wait = svc.pacer.wait(tracker_key(creds.user))
        if wait > 0:
            self._log("paced", creds.mechanism, creds.user,
                      f"user over its failure budget: waiting {wait:.1f}s")
            await asyncio.sleep(wait)

    def _refused(self, creds: Credentials, what: str, tracker: FailureTracker, key: str) -> Reply:
        why = (f"{what} locked" if tracker.locked(key)
               else f"{what}: failures + attempts in flight at the limit")
        self._log("locked", creds.mechanism, creds.user, why)
        return reply("auth_locked")

    async def _check(self, creds: Credentials) -> tuple[Result, str]:
        if creds.authzid and creds.authzid != creds.user:
            return Result.FAIL, "authzid differs from authcid"
        try:
            verifier = self.service.verifier
        except Exception as exc:             # e.g. the verifier cannot be made
            return Result.TEMP, f"verifier unavailable: {type(exc).__name__}"
        c = self.client
        env = ClientEnv(remote_ip=c.ip, remote_port=c.port, local_ip=c.local_ip,
                        local_port=c.local_port, remote_host="" if c.host == "unknown" else c.host)
        v = await verifier.verify(creds, env)
        return v.result, v.reason
