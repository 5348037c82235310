"""Which anvil limit applies to which client, and the checks the server
runs (docs/behaviour/limits.md).

Job: the four limits per client key (``ip_key``: an IPv4 address, an IPv6
/64) -- connections at once, connections, messages (MAIL) and recipients
(RCPT) per window -- as one table, LIMITS: each limit's default is a
``serve`` option, its per-client override a tcp.smtp setting, its refusal
a reply of smtp/replies.py. ``Anvil`` asks the store (local.py or
redis.py) and answers with the limit a client is over, or nothing.

Invariants:
  - with the local store every check is synchronous (a bool or a reason,
    no coroutine): the message path stays as cheap as without limits; with
    the Redis store a check is a coroutine the caller awaits;
  - a limit of 0 is no limit (Postfix's convention) and costs nothing;
  - RELAYCLIENT clients are exempt from the rate defaults (Postfix's
    smtpd_client_event_limit_exceptions = $mynetworks) unless
    ``relay_exempt`` is off; a tcp.smtp setting on the client's own rule
    applies to it whatever its relay state; the connection count applies to
    every client (it was --max-per-ip before there were rates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from mailfilter.policy.profile import int_setting

__all__ = ["Limit", "LIMITS", "LimitsConfig", "ClientLimits", "Anvil", "NO_LIMITS"]


class Limit(NamedTuple):
    name: str           # the decision line's reason=
    setting: str        # the tcp.smtp setting that overrides it per client
    option: str         # the serve option that sets the default
    stage: str          # where it is checked
    reply: str          # smtp/replies.py: the refusal
    rate: bool          # counted per window (else: at once)
    counts: str         # what it counts (the option's help)
    postfix: str        # Postfix's parameter for the same limit


LIMITS: tuple[Limit, ...] = (
    Limit("conn_count", "MAXCONNIP", "max_per_ip", "CONNECT", "too_many_conns_ip", False,
          "sessions at once", "smtpd_client_connection_count_limit"),
    Limit("conn_rate", "MAXCONNRATE", "max_conn_rate", "CONNECT", "too_many_conns_ip", True,
          "connections", "smtpd_client_connection_rate_limit"),
    Limit("msg_rate", "MAXMSGRATE", "max_msg_rate", "MAIL", "too_many_msgs", True,
          "MAIL commands", "smtpd_client_message_rate_limit"),
    Limit("rcpt_rate", "MAXRCPTRATE", "max_rcpt_rate", "RCPT", "too_many_rcpts_rate", True,
          "RCPT commands", "smtpd_client_recipient_rate_limit"),
)
BY_NAME = {lim.name: lim for lim in LIMITS}
SETTINGS = tuple(lim.setting for lim in LIMITS)


@dataclass(frozen=True)
class LimitsConfig:
    """The defaults (serve options; docs/behaviour/limits.md#limits)."""
    max_per_ip: int = 100           # connections at once per client key
    max_conn_rate: int = 0          # connections per window; 0 = none
    max_msg_rate: int = 0           # MAIL commands per window
    max_rcpt_rate: int = 0          # RCPT commands per window
    window: float = 60.0            # seconds (Postfix anvil_rate_time_unit)
    relay_exempt: bool = True       # RELAYCLIENT clients skip the rate defaults
    lease: float = 3600.0           # Redis: a connection's slot lapses after (the session deadline)


class ClientLimits(NamedTuple):
    """The limits of one client: values by limit name (0 = none) and where
    each came from (the tcp.smtp line, or the option's flag)."""
    conn_count: int
    conn_rate: int
    msg_rate: int
    rcpt_rate: int
    rules: dict

    def rule(self, name: str) -> str:
        return self.rules[name]


NO_LIMITS = ClientLimits(0, 0, 0, 0, {})
PROFILES_KEPT = 1 << 14     # as many as the policy engine keeps (policy/engine.py)


class Anvil:
    """The limits' defaults and the store that counts: one per process."""

    __slots__ = ("config", "store", "shared", "local", "_by_profile")

    def __init__(self, config: LimitsConfig, store):
        self.config = config
        self.store = store
        self.shared = store.shared      # counts shared with other processes (Redis)
        self.local = store.local if store.shared else store     # this process's own counts
        # ClientLimits per tcp.smtp profile, made once (a profile is read-only);
        # forgotten when the rules change (forget()) so old profiles can go
        self._by_profile: dict = {}

    def for_client(self, profile, where) -> ClientLimits:
        """The limits of a client with tcp.smtp `profile`; `where(rule id)`
        names a tcp.smtp line for the decision log."""
        cache = self._by_profile
        limits = cache.get(profile)
        if limits is None:
            if len(cache) >= PROFILES_KEPT:
                cache.clear()
            limits = cache[profile] = self._resolve(profile, where)
        return limits

    def forget(self) -> None:
        """New rules (SIGHUP): the profiles of the old ones are not kept."""
        self._by_profile.clear()

    def _resolve(self, profile, where) -> ClientLimits:
        cfg = self.config
        own = profile.own_settings
        exempt = cfg.relay_exempt and profile.relay
        values, rules = [], {}
        for lim in LIMITS:
            if lim.setting in own:      # the client's own line decides, relay or not
                values.append(int_setting(profile.settings[lim.setting]))
                rules[lim.name] = where(profile.rule_id)
            else:
                values.append(0 if exempt and lim.rate else getattr(cfg, lim.option))
                rules[lim.name] = "--" + lim.option.replace("_", "-")
        return ClientLimits(*values, rules)

    # ------------------------------------------------------------ connections
    def connect(self, key: str, limits: ClientLimits, member: str | None):
        """A new connection of `key`: (reason or None, count) -- a
        coroutine with the Redis store. None: admitted, and disconnect()
        gives its slot back."""
        if self.shared:
            return self._connect_shared(key, limits, member)
        answer = self.store.connect(key, limits.conn_count, limits.conn_rate)
        return _ADMITTED if answer[0] else _connect_reason(answer, limits)

    async def _connect_shared(self, key: str, limits: ClientLimits, member: str):
        answer = await self.store.connect(key, limits.conn_count, limits.conn_rate, member,
                                          self.config.lease)
        return _connect_reason(answer, limits)

    def disconnect(self, key: str, member: str | None) -> None:
        self.store.disconnect(key, member)

    def member(self) -> str | None:
        """A fleet-unique name for a connection (Redis), else None."""
        return self.store.member() if self.shared else None

    # ------------------------------------------------------------ MAIL / RCPT
    def over(self, kind: str, key: str, limit: int):
        """Count one `kind` event ("msg", "rcpt") of `key`: is it over `limit`?
        A bool, or with the Redis store a coroutine of one."""
        if self.shared:
            return self._over_shared(kind, key, limit)
        return self.store.hit(kind, key) > limit

    async def _over_shared(self, kind: str, key: str, limit: int) -> bool:
        return await self.store.hit(kind, key) > limit

    async def aclose(self) -> None:
        if self.shared:
            await self.store.aclose()


_ADMITTED = (None, 0)       # connect(): taken (the count is not needed then)


def _connect_reason(answer: tuple[bool, int, int], limits: ClientLimits):
    taken, n, r = answer
    if taken:
        return None, n
    if 0 < limits.conn_count <= n:
        return "conn_count", n
    return "conn_rate", r
