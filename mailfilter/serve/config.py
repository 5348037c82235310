"""`mailfilter serve`'s options: ONE table, and everything derived from it.

Job: each option is declared once, in OPTIONS (name, kind, default, range or
choices, help, repeatable or not; the flag and the TOML keys follow from the
name). From that table come
  - ServeOptions, the dataclass the server is built from (fields, defaults);
  - add_arguments(), the argparse flags (`--max-per-ip` for max_per_ip),
    with help text that always names the default;
  - the `--config FILE` reader: TOML keys are the option names, `_` or `-`;
  - check_options(), the types, ranges and choices of every value, wherever
    it came from (command line, TOML file, or a ServeOptions made in code).

Invariants:
  - a value has its option's kind or the start stops with a one-line
    StartupError (exit 2): a TOML string "false" for a boolean is an error,
    never true (a non-empty string is true in Python, and `open_relay` is the
    one setting that must never switch on by accident);
  - the command line wins over the file; an option with an `exclusive` group
    given on the command line replaces the file's choice in that group
    (`--rules` drops a file's `bundle` and vice versa); the file may name
    one member of a group, not two;
  - a boolean flag only switches on: "not given" never overrides the file.

Reading an option touches no file but the TOML one: what a value names
(rules, spool, resolver, ports) is checked when lifecycle.py opens it.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass

from mailfilter.auth.session import AuthConfig
from mailfilter.limits.anvil import LIMITS as ANVIL_LIMITS, LimitsConfig
from mailfilter.limits.store import DEFAULT_PREFIX, LOCAL, check_spec
from mailfilter.log.sink import DEFAULT_CAP as DEFAULT_LOG_BUFFER
from mailfilter.smtp.protocol import REMOTE_HOST_MODES    # the server checks them too
from mailfilter.smtp.session import DENY_MODES
from mailfilter.tls import selfsigned
from mailfilter.tls.context import MIN_VERSIONS

DEFAULT_RULES = "rules"
DEFAULT_LISTEN = "127.0.0.1:2525"
DEFAULT_DELIVER = "maildir:var/spool"
DEFAULT_TIMEOUT = 300.0               # without --timeout and timeoutsmtpd
DEFAULT_SESSION_DEADLINE = 3600.0     # without --session-deadline and timeoutsession
DEFAULT_MAX_CONNECTIONS = 10_000      # without --max-connections, if the open-file limit fits it
LOOPS = ("uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
SYSLOG_FORMATS = ("rfc3164", "rfc5424")
CHECKPASSWORD_ORDERS = ("djb", "dabrowski")
TLS_VERSIONS = tuple(MIN_VERSIONS)


class StartupError(Exception):
    """A setting (or what it names) that keeps the server from starting:
    one line for stderr, exit 2."""


@dataclass(frozen=True)
class Kind:
    """What values an option takes."""
    annotation: type
    expects: str                        # "must be <expects>": the error text
    accepts: Callable[[object], bool]
    convert: Callable = lambda v: v     # a TOML value accepted -> the option's value
    cli_type: Callable | None = None    # argparse's type=
    metavar: str | None = None          # in --help, unless the option names its own


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)      # True is an int in Python


BOOL = Kind(bool, "true or false", lambda v: isinstance(v, bool))
INT = Kind(int, "an integer", _is_int, cli_type=int, metavar="N")
SECONDS = Kind(float, "a number of seconds", lambda v: _is_int(v) or isinstance(v, float),
               convert=float, cli_type=float, metavar="SECONDS")
TEXT = Kind(str, "a string", lambda v: isinstance(v, str))
# TOML only: an array of tables, checked key by key by its reader (listeners())
TABLES = Kind(list, "an array of tables",
              lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v))


@dataclass(frozen=True)
class Option:
    """One setting of `mailfilter serve`.

    `default_help` describes a default of None ("rules' smtpgreeting/me");
    other defaults are shown as they are. `minimum`/`strict` bound a number
    (strict: above it, else at least it); `choices` bound a string.
    `repeatable`: the flag may be given several times and the TOML value may
    be one string or a list of them; the value is a list.
    """
    name: str
    kind: Kind
    default: object
    help: str
    default_help: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    strict: bool = False
    repeatable: bool = False
    metavar: str | None = None
    group: str | None = None            # argparse argument group (help layout)
    exclusive: str | None = None        # members replace each other (the rule source)
    cli: bool = True                    # False: a TOML key only, no flag (a table)

    @property
    def flag(self) -> str:
        """The operator's word for it: the long option, or for a TOML-only
        table its [[section]] name."""
        if not self.cli:
            return f"[[{self.name}]]"
        return "--" + self.name.replace("_", "-")

    @property
    def toml_keys(self) -> tuple[str, str]:
        return self.name, self.name.replace("_", "-")

    @property
    def optional(self) -> bool:
        """None is a value: "not set, decide later" (from the rules, or
        off), or another member of the exclusive group was chosen."""
        return self.default is None or self.exclusive is not None

    def shown_default(self) -> str:
        if self.default_help is not None:
            return self.default_help
        value = self.default
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, list):
            return ", ".join(value)
        return str(value)

    def help_text(self) -> str:
        return f"{self.help} (default: {self.shown_default()})"

    def expects(self) -> str:
        if self.repeatable:
            return f'"{self.metavar}" or a list of them'
        return self.kind.expects


AUTH = "SMTP AUTH (docs/behaviour/auth.md#modes)"
RULE_SOURCE = "rule source"
TLS = "TLS (RFC 3207 STARTTLS, RFC 8314 implicit TLS)"
LIMITS = "limits per client and shared state (docs/behaviour/limits.md)"
PROXY = "behind a load balancer (PROXY protocol, docs/operations.md#behind-a-load-balancer)"

OPTIONS: tuple[Option, ...] = (
    Option("rules", TEXT, DEFAULT_RULES, "rules directory, compiled at start", metavar="DIR",
           exclusive=RULE_SOURCE),
    Option("bundle", TEXT, None, "compiled bundle file (`mailfilter compile`), instead of --rules",
           default_help="none", metavar="FILE", exclusive=RULE_SOURCE),
    Option("listen", TEXT, [DEFAULT_LISTEN], "address to listen on (repeatable; [IPV6]:PORT "
           "takes IPv6 only, so 0.0.0.0:25 and [::]:25 together are dual stack)",
           repeatable=True, metavar="HOST:PORT"),
    Option("hostname", TEXT, None, "name in the greeting", default_help="rules' smtpgreeting/me",
           metavar="NAME"),
    Option("deliver", TEXT, DEFAULT_DELIVER,
           "maildir:DIR, qmail-queue:PROG, smtp:HOST:PORT, lmtp:HOST:PORT or discard",
           metavar="NEXT_HOP"),
    Option("workers", INT, 1, "processes sharing the port with SO_REUSEPORT", minimum=1),
    Option("loop", TEXT, "uvloop", "event loop", choices=LOOPS),
    Option("open_relay", BOOL, False, "allow running without rcpthosts (docs/behaviour/control-files.md#rcpthosts)"),
    Option("allow_untrusted_routing", BOOL, False, "let clients that may not relay send % ! @ "
           "in a local part or a source route (Postfix's allow_untrusted_routing; "
           "docs/behaviour/control-files.md#routing)"),
    Option("no_smtputf8", BOOL, False, "do not offer SMTPUTF8 (RFC 6531): an address with "
           "8-bit bytes is then refused, 553 5.6.7 (docs/behaviour/smtp.md#addresses)"),
    Option("greet_wait", SECONDS, 0.0, "seconds to wait before the greeting (postscreen's "
           "greet wait): a client that talks first is a pregreeter; DNSBL lookups run meanwhile",
           minimum=0),
    Option("pregreet", TEXT, "log", "a client that talks before the greeting: log = one line, "
           "the session goes on; refuse = 554 5.5.1 and close", choices=("log", "refuse")),
    Option("deny", TEXT, "close", "what a tcp.smtp `deny` client gets: close = the connection is "
           "closed at once, no session (as tcpserver does); rcpt = 220, then 553 at every RCPT "
           "(its envelopes logged)", choices=DENY_MODES),
    Option("resolver", TEXT, None,
           "DNS server for the client host name, HELOCHECK A/M and MFDNSCHECK: IP, IP:PORT, "
           "[IPV6]:PORT or a bare IPv6 address; several separated by commas are asked in order",
           default_help="/etc/resolv.conf", metavar="ADDR"),
    Option("remote_host", TEXT, "confirmed",
           "client host name (qmail's TCPREMOTEHOST, used by tcp.smtp =host rules, HELOCHECK "
           "\"=\", decorated badmailfrom and the Received header): off = always unknown "
           "(tcpserver -H), ptr = first PTR name, confirmed = the PTR name only if it resolves "
           "back to the client address (tcpserver -p, Postfix)", choices=REMOTE_HOST_MODES),
    # None = not given: the default, lowered to fit the open-file limit; a given
    # value that does not fit is refused (serve/descriptors.py)
    Option("max_connections", INT, None, "sessions at once in this process", minimum=1,
           default_help=f"{DEFAULT_MAX_CONNECTIONS}, fewer if the open-file limit cannot fit them"),
    Option("max_per_ip", INT, LimitsConfig.max_per_ip, "sessions at once from one client "
           "address (IPv6: its /64), fleet-wide with a Redis --state; tcp.smtp MAXCONNIP "
           "overrides it per client", minimum=1, group=LIMITS),
    # the anvil rates, one option each from limits/anvil.py's table; 0 = none, as in Postfix
    *(Option(lim.option, INT, getattr(LimitsConfig, lim.option),
             f"{lim.counts} per --rate-window from one client address (Postfix {lim.postfix}); "
             f"tcp.smtp {lim.setting} per client; 0 = none", minimum=0, group=LIMITS)
      for lim in ANVIL_LIMITS if lim.rate),
    Option("rate_window", SECONDS, LimitsConfig.window, "seconds each rate is counted over (a "
           "fixed window from the client's first event, as Postfix's anvil_rate_time_unit)",
           minimum=0, strict=True, group=LIMITS),
    Option("rate_relay_clients", BOOL, False, "count tcp.smtp RELAYCLIENT clients against the "
           "rate defaults too (without it they are exempt, as Postfix's "
           "smtpd_client_event_limit_exceptions = $mynetworks; a MAXxxxRATE on their own line "
           "applies either way)", group=LIMITS),
    Option("state", TEXT, LOCAL, "where the limits and the AUTH failure counts live: local = "
           "each process counts for itself; redis://HOST:PORT/DB, rediss://HOST:PORT/DB or "
           "unix:///PATH?db=N = one Redis shared by every worker and node (local counts when "
           "it cannot be reached)", metavar="local|URL", group=LIMITS),
    Option("state_prefix", TEXT, DEFAULT_PREFIX, "prefix of every Redis key (several fleets "
           "on one Redis)", metavar="PREFIX", group=LIMITS),
    Option("state_timeout", SECONDS, 0.1, "seconds a Redis check may take before it is "
           "answered locally", minimum=0, strict=True, group=LIMITS),
    Option("timeout", SECONDS, None, "idle seconds per command", minimum=0, strict=True,
           default_help=f"rules' timeoutsmtpd, else {DEFAULT_TIMEOUT:g}"),
    Option("session_deadline", SECONDS, None, "seconds per session", minimum=0, strict=True,
           default_help=f"rules' timeoutsession, else {DEFAULT_SESSION_DEADLINE:g}"),
    # DATA limits (docs/behaviour/smtp.md#limits): a client must keep a minimum
    # rate and finish within a deadline; the header block is cut past a size
    Option("data_min_rate", SECONDS, 500.0,
           "DATA: least bytes per second, averaged over --data-rate-window (Postfix "
           "smtpd_min_data_rate); 0 = none", minimum=0, metavar="BYTES"),
    Option("data_rate_window", SECONDS, 60.0, "DATA: seconds the minimum rate is averaged over",
           minimum=0, strict=True),
    Option("data_deadline", SECONDS, 1800.0, "DATA: seconds a whole message may take; 0 = none",
           minimum=0),
    Option("header_size_limit", INT, 102400,
           "octets of a message's header block kept, the rest of the block cut, the body kept "
           "(Postfix header_size_limit); the block ends at the first line that is not a header "
           "field, as in Postfix; 0 = no limit", minimum=0),
    Option("shutdown_grace", SECONDS, 30.0,
           "SIGTERM: seconds a delivery in flight may take to finish", minimum=0),
    # the log (docs/operations.md#logs): one buffer, written once per event-loop turn
    Option("syslog", BOOL, False, "log to syslog, facility mail, instead of stderr; a socket "
           "that cannot be opened at start is a start-up error"),
    Option("syslog_socket", TEXT, "/dev/log", "syslog socket: a unix datagram socket path "
           "(a value with a /), or HOST:PORT / [IPV6]:PORT for UDP", metavar="PATH|HOST:PORT"),
    Option("syslog_format", TEXT, "rfc3164", "syslog framing: rfc3164 = <PRI>Mmm dd hh:mm:ss "
           "ident[pid]: as glibc's syslog() (the host name too over UDP); rfc5424 = <PRI>1 "
           "TIMESTAMP HOST ident PID - -", choices=SYSLOG_FORMATS),
    Option("log_level", TEXT, "info", "least severe level logged", choices=LOG_LEVELS),
    Option("metrics", TEXT, None, "serve Prometheus metrics at http://HOST:PORT/metrics "
           "(docs/operations.md#metrics); with --workers the parent serves the sum of the workers",
           default_help="off", metavar="HOST:PORT"),
    Option("log_buffer", INT, DEFAULT_LOG_BUFFER, "characters of log lines held between writes; "
           "full: stderr waits for the write, syslog drops lines and logs action=log_gap "
           "dropped=N when it takes them again", minimum=1, metavar="CHARS"),
    # `auth` is the global SMTPAUTH; tcp.smtp SMTPAUTH overrides it per client
    Option("auth", TEXT, None,
           'global SMTPAUTH: "" = LOGIN PLAIN, "+cram" = LOGIN PLAIN CRAM-MD5, "cram" = CRAM-MD5, '
           '"!..." = also required before MAIL, "-" = off; tcp.smtp SMTPAUTH overrides it per '
           "client", default_help="not offered", metavar="MODE", group=AUTH),
    Option("userdb", TEXT, "var/users.db", "user database", metavar="PATH", group=AUTH),
    Option("checkpassword", TEXT, None,
           "verify with a checkpassword-compatible program per attempt, e.g. "
           '"mailfilter cmd5checkpw /bin/true", instead of the user database',
           default_help="none: the user database", metavar='"PROG ARGS"', group=AUTH),
    Option("checkpassword_order", TEXT, "djb", "CRAM-MD5 fd 3 order: djb = user, digest, "
           "challenge; dabrowski = user, challenge, digest", choices=CHECKPASSWORD_ORDERS,
           group=AUTH),
    Option("checkpassword_timeout", SECONDS, 10.0, "seconds per checkpassword attempt",
           minimum=0, strict=True, group=AUTH),
    # the failure accounting (docs/behaviour/auth.md#failures-and-lockout): AuthConfig's
    # fields as auth_<field>, fleet-wide with a Redis --state
    Option("auth_fail_delay", SECONDS, AuthConfig.fail_delay, "seconds before each 535",
           minimum=0, group=AUTH),
    Option("auth_window", SECONDS, AuthConfig.window, "seconds AUTH failures are counted over "
           "(a sliding window)", minimum=0, strict=True, group=AUTH),
    Option("auth_max_fail_ip", INT, AuthConfig.max_fail_ip, "failures from one client address "
           "in the window that lock it for --auth-lockout; 0 = no lock", minimum=0, group=AUTH),
    Option("auth_max_fail_user", INT, AuthConfig.max_fail_user, "failures of one user from one "
           "network (IPv4 /24, IPv6 /64) in the window that lock that user from that network; "
           "0 = no lock", minimum=0, group=AUTH),
    Option("auth_max_fail_user_total", INT, AuthConfig.max_fail_user_total, "failures of one "
           "user from every network in the window past which its attempts from unknown "
           "networks are paced; 0 = no pacing", minimum=0, group=AUTH),
    Option("auth_user_pace", SECONDS, AuthConfig.user_pace, "seconds between paced attempts "
           "for one user", minimum=0, group=AUTH),
    Option("auth_user_pace_max", SECONDS, AuthConfig.user_pace_max, "the longest one attempt "
           "is paced", minimum=0, group=AUTH),
    Option("auth_known_ttl", SECONDS, AuthConfig.known_ttl, "seconds a network that "
           "authenticated a user stays exempt from that user's lock and pacing", minimum=0,
           group=AUTH),
    Option("auth_lockout", SECONDS, AuthConfig.lockout, "seconds a locked address or "
           "user-from-network stays locked", minimum=0, strict=True, group=AUTH),
    Option("auth_max_session_failures", INT, AuthConfig.max_session_failures, "failures in one "
           "session that end it with 421; 0 = never", minimum=0, group=AUTH),
    Option("auth_table_size", INT, AuthConfig.table_size, "keys each AUTH failure table keeps "
           "in a process (LRU)", minimum=1, group=AUTH),
    Option("auth_plaintext", BOOL, False,
           "offer and accept AUTH PLAIN and LOGIN before TLS too: passwords cross the network "
           "in clear; a warning at start. Without it they wait for STARTTLS: 538 5.7.11, RFC 4954",
           group=AUTH),
    # TLS: the settings of tls/context.py (what is served) and the SMTP side's (when)
    Option("tls_cert", TEXT, None,
           "certificate file, PEM, the server's own certificate first, then its chain; "
           "repeatable, paired in order with --tls-key: an ECDSA and an RSA pair are served "
           "side by side and the client's signature algorithms choose",
           default_help="a self-signed ECDSA P-256 certificate for --hostname or the rules' me, "
                        f"made on first start under {selfsigned.DEFAULT_DIR}/ relative to the "
                        "working directory",
           repeatable=True, metavar="FILE", group=TLS),
    Option("tls_key", TEXT, None,
           "private key file of the --tls-cert in the same position, PEM, unencrypted",
           default_help=f"the self-signed certificate's, {selfsigned.DEFAULT_DIR}/"
                        f"{selfsigned.KEY_FILE}",
           repeatable=True, metavar="FILE", group=TLS),
    Option("no_tls", BOOL, False, "no TLS at all: no STARTTLS, no --listen-tls, no self-signed "
           "certificate", group=TLS),
    Option("proxy_listen", TEXT, None, "address a load balancer connects to: a PROXY protocol "
           "header (v1 or v2) names the client before anything else, from a --proxy-protocol "
           "source only; repeatable, forms as --listen", default_help="none", repeatable=True,
           metavar="HOST:PORT", group=PROXY),
    Option("proxy_listen_tls", TEXT, None, "as --proxy-listen, then implicit TLS (the header "
           "comes before the ClientHello)", default_help="none", repeatable=True,
           metavar="HOST:PORT", group=PROXY),
    Option("proxy_protocol", TEXT, None, "CIDR[,CIDR...]: the load balancers that may send "
           "PROXY headers on the proxy listeners (anyone else is closed at once)",
           default_help="none", metavar="CIDRS", group=PROXY),
    Option("listener", TABLES, None, "[[listener]] tables in the --config file, one per "
           "address: listen = \"HOST:PORT\", tls = \"starttls\" or \"implicit\", "
           "proxy_protocol = CIDRs of the load balancers that send a PROXY header there; with "
           "them, listen has no default", default_help="none", group=PROXY, cli=False),
    Option("listen_tls", TEXT, None, "address for implicit TLS, the client speaks TLS first: "
           "RFC 8314, port 465 submission; repeatable, forms as --listen",
           default_help="none", repeatable=True, metavar="HOST:PORT", group=TLS),
    Option("tls_min_version", TEXT, "TLSv1.2", "oldest TLS version accepted", choices=TLS_VERSIONS,
           group=TLS),
    Option("tls_handshake_timeout", SECONDS, 30.0, "seconds for a client to finish the TLS "
           "handshake, STARTTLS or implicit", minimum=0, strict=True, group=TLS),
    Option("require_tls", BOOL, False, "every client must start TLS before MAIL: 530 5.7.0, "
           "RFC 3207 §4; tcp.smtp UCSPITLS=\"!\" does it per client", group=TLS),
    Option("tls_allow_expired", BOOL, False, "serve an expired or not yet valid --tls-cert, with "
           "a warning, instead of refusing to start", group=TLS),
    Option("next_hop_tls_verify", BOOL, False,
           "verify the certificate of an smtp: or lmtp: --deliver next hop against the system "
           "CA store; without it the next hop's STARTTLS is opportunistic, RFC 7435", group=TLS),
    Option("next_hop_tls_ca", TEXT, None, "CA file for --next-hop-tls-verify instead of the system "
           "store; implies --next-hop-tls-verify", default_help="the system store",
           metavar="FILE", group=TLS),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
BY_TOML_KEY: dict[str, Option] = {key: o for o in OPTIONS for key in o.toml_keys}


def _field(o: Option):
    annotation = list[o.kind.annotation] if o.repeatable else o.kind.annotation
    if o.optional:
        annotation = annotation | None
    if isinstance(o.default, list):     # a fresh list per instance
        default = o.default
        return o.name, annotation, dataclasses.field(default_factory=lambda: list(default))
    return o.name, annotation, dataclasses.field(default=o.default)


ServeOptions = dataclasses.make_dataclass("ServeOptions", [_field(o) for o in OPTIONS])
ServeOptions.__module__ = __name__
ServeOptions.__doc__ = "The settings of one `mailfilter serve`: one field per entry of OPTIONS."


# ------------------------------------------------------------------ checks
def _choices_text(choices) -> str:
    if len(choices) == 2:
        return " or ".join(choices)
    return "one of " + ", ".join(choices)


def check_value(o: Option, value) -> None:
    """`value` against the option's kind, range and choices; StartupError
    naming the flag (the operator's word for it, wherever it came from)."""
    if value is None and o.optional:
        return
    if o.repeatable:
        if not (isinstance(value, list) and value):
            raise StartupError(f"{o.flag} must be {o.expects()}, not {value!r}")
        values = value
    else:
        values = [value]
    for v in values:
        if not o.kind.accepts(v):
            raise StartupError(f"{o.flag} must be {o.expects()}, not {value!r}")
        if o.minimum is not None:
            ok = v > o.minimum if o.strict else v >= o.minimum
            if not (ok and math.isfinite(v)):
                raise StartupError(f"{o.flag} must be {'above' if o.strict else 'at least'} "
                                   f"{o.minimum:g}, not {v!r}")
        if o.choices is not None and v not in o.choices:
            raise StartupError(f"{o.flag} must be {_choices_text(o.choices)}, not {v!r}")
        if o.metavar == "HOST:PORT" and not o.repeatable:   # --metrics (the listeners: listeners())
            parse_listen(v, o.flag)


def parse_listen(spec: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise StartupError(f"{flag} wants HOST:PORT with PORT 0-65535, got {spec!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class Listener:
    """One address to listen on, as the operator named it (`where`: the
    flag, or the [[listener]] table) and what it speaks first: a PROXY
    header from `proxy_from` networks only (None: no header), then TLS when
    `implicit_tls`, else SMTP with STARTTLS (docs/operations.md#listener-tables)."""
    where: str
    host: str
    port: int
    implicit_tls: bool = False
    proxy_from: tuple | None = None
    proxy_text: str = ""                # the networks as given, for the listening line


LISTENER_KEYS = ("listen", "tls", "proxy_protocol")
LISTENER_TLS = ("starttls", "implicit")


def parse_networks(text, where: str) -> tuple:
    """CIDRs (a comma-separated string, or a TOML list of them) as
    networks; StartupError naming `where` for one that is not a CIDR."""
    parts = text.split(",") if isinstance(text, str) else text
    nets = []
    for part in parts:
        try:
            nets.append(ipaddress.ip_network(str(part).strip(), strict=False))
        except ValueError:
            raise StartupError(f"{where} {str(part).strip()!r}: not an address or CIDR") from None
    if not nets:
        raise StartupError(f"{where}: no network given")
    return tuple(nets)


def _table_listener(n: int, table: dict) -> Listener:
    """[[listener]] table number `n` (1-based) as a Listener; StartupError
    naming the table for an unknown key or a bad value."""
    where = f"[[listener]] #{n}"
    for key in table:
        if key.replace("-", "_") not in LISTENER_KEYS:
            raise StartupError(f"{where}: unknown key {key!r} (keys: {', '.join(LISTENER_KEYS)})")
    get = {k.replace("-", "_"): v for k, v in table.items()}.get
    spec = get("listen")
    if not isinstance(spec, str):
        raise StartupError(f'{where}: listen = "HOST:PORT" is required')
    tls = get("tls", "starttls")
    if tls not in LISTENER_TLS:
        raise StartupError(f"{where}: tls must be {' or '.join(LISTENER_TLS)}, not {tls!r}")
    proxy = get("proxy_protocol")
    nets = text = None
    if proxy is not None:
        if not (isinstance(proxy, str) or (isinstance(proxy, list)
                                           and all(isinstance(p, str) for p in proxy))):
            raise StartupError(f"{where}: proxy_protocol must be CIDRs, a string or a list")
        nets = parse_networks(proxy, f"{where} proxy_protocol")
        text = proxy if isinstance(proxy, str) else ",".join(proxy)
    return Listener(where, *parse_listen(spec, where), implicit_tls=tls == "implicit",
                    proxy_from=nets, proxy_text=text or "")


def listeners(opts) -> list[Listener]:
    """Every address to listen on, in this order: --listen (STARTTLS unless
    --no-tls), --listen-tls, --proxy-listen, --proxy-listen-tls (from the
    --proxy-protocol networks), then the [[listener]] tables."""
    text = opts.proxy_protocol or ""
    nets = parse_networks(text, "--proxy-protocol") if text else None
    found = [Listener("--listen", *parse_listen(spec)) for spec in opts.listen or ()]
    found += [Listener("--listen-tls", *parse_listen(spec, "--listen-tls"), implicit_tls=True)
              for spec in opts.listen_tls or ()]
    found += [Listener("--proxy-listen", *parse_listen(spec, "--proxy-listen"),
                       proxy_from=nets, proxy_text=text)
              for spec in opts.proxy_listen or ()]
    found += [Listener("--proxy-listen-tls", *parse_listen(spec, "--proxy-listen-tls"),
                       implicit_tls=True, proxy_from=nets, proxy_text=text)
              for spec in opts.proxy_listen_tls or ()]
    found += [_table_listener(n, t) for n, t in enumerate(opts.listener or (), 1)]
    return found


def check_options(opts) -> None:
    """Every value against its option, then the rules between options."""
    for o in OPTIONS:
        value = getattr(opts, o.name)
        if o.name == "listen" and value == [] and opts.listener:
            continue                    # [[listener]] tables name every address
        check_value(o, value)
    if opts.rules is None and opts.bundle is None:
        raise StartupError("give --rules DIR or --bundle FILE")
    if (opts.proxy_listen or opts.proxy_listen_tls) and not opts.proxy_protocol:
        raise StartupError("--proxy-listen needs --proxy-protocol CIDR[,CIDR...]: the load "
                           "balancers that may send PROXY headers")
    seen: dict[tuple[str, int], str] = {}
    for ls in listeners(opts):
        host, port = ls.host, ls.port
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if port == 0 and opts.workers > 1:
            raise StartupError(f"{ls.where} {where}: --workers needs a fixed port (0 picks one "
                               "per worker)")
        if port and (host, port) in seen:
            # with --workers every listener sets SO_REUSEPORT: two of ours on one
            # address would bind both and split its connections between them
            raise StartupError(f"{ls.where} {where}: given twice (also {seen[host, port]})")
        seen[host, port] = ls.where
    _check_tls(opts)
    try:
        check_spec(opts.state)
    except ValueError as exc:
        raise StartupError(f"--state {exc}") from None


def _check_tls(opts) -> None:
    certs, keys = opts.tls_cert or [], opts.tls_key or []
    if len(certs) != len(keys):
        raise StartupError(f"--tls-cert and --tls-key pair in order: {len(certs)} --tls-cert "
                           f"and {len(keys)} --tls-key given")
    if opts.no_tls:
        implicit = [ls.where for ls in listeners(opts) if ls.implicit_tls]
        for flag, given in (("--tls-cert", certs), (implicit[0] if implicit else "", implicit),
                            ("--require-tls", opts.require_tls)):
            if given:
                raise StartupError(f"--no-tls and {flag}: one turns TLS off, the other needs it")


# ------------------------------------------------------------------ TOML
def from_toml(key: str, value, where: str):
    """A TOML value as its option's value; StartupError naming the key as
    the file spells it (`where` comes first). Types only: ranges and
    choices are check_options' (one message for the flag and the key)."""
    o = BY_TOML_KEY.get(key)
    if o is None:
        raise StartupError(f"{where}unknown setting {key!r}")
    if o.repeatable:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and items and all(o.kind.accepts(v) for v in items):
            return [o.kind.convert(v) for v in items]
    elif o.kind.accepts(value):
        return o.kind.convert(value)
    raise StartupError(f"{where}{key} must be {o.expects()}, not {value!r}")


def read_config(path: str) -> dict[str, object]:
    """The TOML file at `path` as {option name: value}."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StartupError(f"--config {path}: {exc}") from None
    values: dict[str, object] = {}
    for key, value in data.items():
        name = BY_TOML_KEY[key].name if key in BY_TOML_KEY else key
        values[name] = from_toml(key, value, f"--config {path}: ")
    for group in {o.exclusive for o in OPTIONS if o.exclusive}:
        named = [o.name for o in OPTIONS if o.exclusive == group and o.name in values]
        if len(named) > 1:
            raise StartupError(f"--config {path}: give {' or '.join(named)}, not both")
    return values


# ------------------------------------------------------------------ command line
def _from_command_line(args, o: Option):
    """The option's value on the command line, None when not given (a
    boolean flag only says on; an absent attribute: a caller's Namespace
    with a few of serve's settings, as `mailfilter check` makes)."""
    value = getattr(args, o.name, None)
    if o.kind is BOOL and value is not True:
        return None
    return value


def options_from(args) -> ServeOptions:
    """ServeOptions from the defaults, then --config, then the command line
    (which wins; its --rules or --bundle replaces the file's rule source)."""
    opts = ServeOptions()
    path = getattr(args, "config", None)
    layers = [read_config(path) if path else {},
              {o.name: v for o in OPTIONS if (v := _from_command_line(args, o)) is not None}]
    if any("listener" in layer for layer in layers) and not any("listen" in layer
                                                                for layer in layers):
        opts.listen = []                # the tables name every address
    for layer in layers:
        for name, value in layer.items():
            setattr(opts, name, value)
            group = BY_NAME[name].exclusive
            if group is not None:       # a rule source named here replaces the one before
                for other in OPTIONS:
                    if other.exclusive == group and other.name != name and other.name not in layer:
                        setattr(opts, other.name, None)
    return opts


def add_arguments(p) -> None:
    """serve's flags on the argparse parser `p`; every default is None
    (= not given), so options_from can tell a flag from the file's value."""
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML file of these settings, keys as the long options with _ or - "
                        "(listen = [\"127.0.0.1:2525\"]); the command line wins (default: none)")
    groups: dict[str | None, object] = {None: p}
    exclusive: dict[str, object] = {}
    for o in OPTIONS:
        if not o.cli:
            continue
        if o.group not in groups:
            groups[o.group] = p.add_argument_group(o.group)
        where = groups[o.group]
        if o.exclusive is not None:
            if o.exclusive not in exclusive:
                exclusive[o.exclusive] = where.add_mutually_exclusive_group()
            where = exclusive[o.exclusive]
        kw = {"help": o.help_text().replace("%", "%%"), "default": None}
        if o.kind is BOOL:
            kw["action"] = "store_true"
        else:
            kw.update(action="append" if o.repeatable else "store",
                      metavar=o.metavar or o.kind.metavar,
                      type=o.kind.cli_type, choices=o.choices)
        where.add_argument(o.flag, **kw)
