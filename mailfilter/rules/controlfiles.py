"""Read a rules directory written in qmail control-file syntax.

Job: turn files into plain records that remember where they came from
(file name and line number), and report malformed lines as diagnostics
(`path:line: problem: rule skipped`). Classification of list entries into
matcher kinds is the compiler's job; this module never imports mailfilter._core.

Reading rules (docs/behaviour/control-files.md#reading-control-files, qmail control.c):
- list files: one entry per line; trailing spaces, tabs and CR/LF stripped,
  leading whitespace KEPT; empty lines and lines starting with `#` skipped; a
  last line without newline counts;
- first-line files: only the first line, trailing whitespace stripped;
- integer files: the first line parsed as unsigned decimal; if it does not
  start with a digit the file counts as absent.
- a UTF-8 byte order mark at the start of any file is dropped.
- a line over MAX_LINE bytes is a diagnostic and never parsed
  (docs/behaviour/control-files.md#limits).
A missing file means the feature is off (returns None / empty list).

Bytes are decoded as Latin-1 so every byte maps to exactly one character and
back (`text.encode("latin-1")` gives the original bytes for the matchers).
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from mailfilter.rules.format import clip, leading_int, quoted

# Files the compiler knows, by role.
LIST_FILES = (
    "rcpthosts", "morercpthosts", "badmailfrom", "badrcptto", "badhelo",
    "relaymailfrom", "recipients", "badmimetypes", "badloadertypes",
    # qregex dialect split-horizon files (docs/behaviour/control-files.md#qregex-dialect)
    "badmailfromnorelay", "badrcpttonorelay", "badhelonorelay",
    "dnsbl",    # zone[=filter][*weight] (docs/behaviour/control-files.md#dnsbl)
)
FIRST_LINE_FILES = ("me", "smtpgreeting", "localiphost", "dialect")
INT_FILES = ("databytes", "timeoutsmtpd", "maxrecipients", "timeoutsession", "dnsblthreshold")
TCP_RULES_FILE = "tcp.smtp"
# The longest line any control file may have, in bytes (docs/behaviour/
# control-files.md#limits). The longest real entries are an RFC 5321 path
# (256 octets) with its decorations, a tcp.smtp line with every setting, and
# a regex; 4096 is sixteen addresses' worth, and a longer alternation means
# the same split over several lines. A longer line is refused before it is
# parsed: a 100 MB regex line used to cost minutes and gigabytes in the
# regex analysis before RE2 refused it.
MAX_LINE = 4096
# A diagnostic's problem text is cut here whatever it quotes.
MAX_PROBLEM = 400
DIALECTS = ("spamcontrol", "qregex")


class Line(NamedTuple):
    """One significant line of a control file (a tuple: millions are made)."""
    file: str   # name inside the rules directory, e.g. "badmailfrom"
    line: int   # 1-based line number
    text: str   # Latin-1 decoded, trailing whitespace stripped

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """A line that is not what it says: skipped (the default), or kept with
    part of it ignored (`kept`: an unknown tcp.smtp setting). Either way a
    warning naming FILE:LINE, never fatal (docs/operations.md#reloading)."""
    path: str
    line: int
    problem: str
    kept: bool = False

    def __post_init__(self) -> None:
        # each message quotes with format.quoted; this bounds the rest (a
        # setting name, a suggested rewrite) so no message repeats a long line
        object.__setattr__(self, "problem", clip(self.problem, MAX_PROBLEM))

    def __str__(self) -> str:
        what = "ignored, rule kept" if self.kept else "rule skipped"
        return f"{self.path}:{self.line}: {self.problem}: {what}"


@dataclass(frozen=True, slots=True)
class TcpRule:
    """One tcprules line: `key:allow|deny[,VAR=value...]` (ucspi-tcp tcprules(1))."""
    source: Line
    kind: str              # "cidr", "host" (=name), "hostsuffix" (=.dom), "anyhost" (=), "default" (empty key)
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    networks: tuple        # several networks for a last-octet range `1.2.3.37-53`
    host: str              # lower-cased host name for host rules
    allow: bool
    env: tuple[tuple[str, str], ...]


@dataclass
class RulesSource:
    """Everything read from one rules directory."""
    root: str
    lists: dict[str, list[Line]] = field(default_factory=dict)
    scalars: dict[str, str] = field(default_factory=dict)
    integers: dict[str, int] = field(default_factory=dict)
    tcp_rules: list[TcpRule] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # raw bytes, for the fingerprint

    @property
    def dialect(self) -> str:
        return self.scalars.get("dialect", "spamcontrol")


_BOM = b"\xef\xbb\xbf"


def _strip_bom(data: bytes) -> bytes:
    """A UTF-8 byte order mark (editors on Windows write one) is not part of
    the first entry: qmail would keep it and the first line would never match."""
    return data[3:] if data.startswith(_BOM) else data


def significant_lines(name: str, data: bytes, too_long: list | None = None) -> list[Line]:
    """The entries of list file `name` (its bytes `data`), by the reading
    rules above: Latin-1, trailing blanks and CR stripped, leading blanks
    kept, empty and `#` lines skipped, each with its 1-based line number.
    An entry over MAX_LINE bytes is left out and its (line number, length)
    appended to `too_long`: nothing after this sees it."""
    data = _strip_bom(data)
    make = Line._make
    out = []
    append = out.append
    for number, raw in enumerate(data.decode("latin-1").split("\n"), start=1):
        text = raw.rstrip(" \t\r")
        if text and text[0] != "#":
            if len(text) > MAX_LINE:
                if too_long is not None:
                    too_long.append((number, len(text)))
                continue
            append(make((name, number, text)))
    return out


def too_long_problem(length: int) -> str:
    return (f"line of {length} bytes, over the {MAX_LINE}-byte limit "
            "(docs/behaviour/control-files.md#limits)")


def _first_line(data: bytes) -> str | None:
    first = _strip_bom(data).split(b"\n", 1)[0].decode("latin-1").rstrip(" \t\r\n")
    return first or None




_DIGITS = frozenset("0123456789")


def read_rules_dir(root: str) -> RulesSource:
    """Read every known file of `root`; unknown files are ignored."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"rules directory not found: {root}")
    src = RulesSource(root=root)

    def load(name: str) -> bytes | None:
        path = os.path.join(root, name)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        src.files[name] = data
        return data

    def refuse(name: str, number: int, length: int) -> None:
        src.diagnostics.append(Diagnostic(os.path.join(root, name), number, too_long_problem(length)))

    def lines(name: str, data: bytes) -> list[Line]:
        too_long: list[tuple[int, int]] = []
        out = significant_lines(name, data, too_long)
        for number, length in too_long:
            refuse(name, number, length)
        return out

    def first_line(name: str, data: bytes) -> str | None:
        """The first line, or None if empty or too long (then the file
        counts as absent, as for a number file that holds no number)."""
        value = _first_line(data)
        if value is not None and len(value) > MAX_LINE:
            refuse(name, 1, len(value))
            return None
        return value

    for name in LIST_FILES:
        data = load(name)
        if data is not None:
            src.lists[name] = lines(name, data)
    for name in FIRST_LINE_FILES:
        data = load(name)
        if data is not None:
            value = first_line(name, data)
            if value is not None:
                src.scalars[name] = value
    for name in INT_FILES:
        data = load(name)
        if data is not None:
            first = _first_line(data) or ""
            if len(first) > MAX_LINE:
                refuse(name, 1, len(first))
                continue
            value = leading_int(first)
            if value is None:
                src.diagnostics.append(Diagnostic(
                    os.path.join(root, name), 1,
                    f"not an unsigned decimal number: {quoted(first)}"))
            else:
                src.integers[name] = value
    if src.scalars.get("dialect", "spamcontrol") not in DIALECTS:
        src.diagnostics.append(Diagnostic(
            os.path.join(root, "dialect"), 1,
            f"unknown dialect {quoted(src.scalars['dialect'])} (expected one of {', '.join(DIALECTS)})"))
        src.scalars["dialect"] = "spamcontrol"
    data = load(TCP_RULES_FILE)
    if data is not None:
        for line in lines(TCP_RULES_FILE, data):
            try:
                src.tcp_rules.append(parse_tcp_rule(line))
            except ValueError as exc:
                src.diagnostics.append(Diagnostic(os.path.join(root, line.file), line.line, str(exc)))
    return src


# ---------------------------------------------------------------- tcp.smtp

def _split_action(text: str) -> tuple[str, str, str]:
    """Split `key:allow,rest` at the first `:allow`/`:deny` that ends the key.

    IPv6 keys contain colons, but never the letters of `allow`/`deny`."""
    for action in ("allow", "deny"):
        marker = ":" + action
        start = 0
        while True:
            pos = text.find(marker, start)
            if pos < 0:
                break
            end = pos + len(marker)
            if end == len(text) or text[end] == ",":
                return text[:pos], action, text[end + 1:] if end < len(text) else ""
            start = pos + 1
    # tcprules also accepts a bare `key:` meaning allow with no settings? No:
    # tcprules requires an instruction; refuse so the operator notices.
    raise ValueError("expected KEY:allow or KEY:deny")


def _parse_env(rest: str) -> tuple[tuple[str, str], ...]:
    """`VAR="value",VAR2=value2`: a quote character delimits a value that may
    contain commas (tcprules(1): any quote character, `"` and `'` here)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(rest)
    while i < n:
        eq = rest.find("=", i)
        if eq < 0:
            raise ValueError(f"setting without '=': {quoted(rest[i:])}")
        name = rest[i:eq]
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise ValueError(f"bad variable name {quoted(name)}")
        j = eq + 1
        if j < n and rest[j] in "\"'":
            quote = rest[j]
            close = rest.find(quote, j + 1)
            if close < 0:
                raise ValueError(f"unterminated quote in value of {name}")
            value = rest[j + 1:close]
            j = close + 1
            if j < n and rest[j] != ",":
                raise ValueError(f"junk after quoted value of {name}")
        else:
            close = rest.find(",", j)
            close = n if close < 0 else close
            value = rest[j:close]
            j = close
        out.append((name, value))
        i = j + 1
    return tuple(out)


def _ipv4_range(key: str) -> tuple:
    """`1.2.3.37-53`: a range in the last octet, as CIDR blocks."""
    head, _, tail = key.rpartition(".")
    lo_s, _, hi_s = tail.partition("-")
    first = ipaddress.IPv4Address(f"{head}.{lo_s}")
    last = ipaddress.IPv4Address(f"{head}.{hi_s}")
    if last < first:
        raise ValueError(f"empty address range {quoted(key)}")
    return tuple(ipaddress.summarize_address_range(first, last))


class HostBitsSet(ValueError):
    """A CIDR key with bits set past its prefix (docs/behaviour/tcp-smtp.md#syntax)."""


def _cidr(key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`10.0.0.0/8`. `1.2.3.4/8` is refused, not widened to 1.0.0.0/8 (as
    Postfix's cidr tables refuse it): the writer meant either a host or a
    network, and guessing the wider one could open a relay to a /8."""
    net = ipaddress.ip_network(key, strict=False)
    if net.network_address != ipaddress.ip_interface(key).ip:
        raise HostBitsSet(f"{clip(key)} has host bits set; did you mean {net}?")
    return net


def _network(key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """CIDR (`10.0.0.0/8`, `2001:db8::/32`), a single address, or qmail's
    dotted prefix (`10.`, `192.168.1.`)."""
    if "/" in key:
        return _cidr(key)
    if ":" in key:
        return ipaddress.IPv6Network(key)
    if key.endswith("."):
        octets = key[:-1].split(".")
        if len(octets) > 3 or not all(o and set(o) <= _DIGITS and int(o) < 256 for o in octets):
            raise ValueError(f"bad IPv4 prefix {quoted(key)}")
        padded = octets + ["0"] * (4 - len(octets))
        return ipaddress.IPv4Network(f"{'.'.join(padded)}/{8 * len(octets)}")
    return ipaddress.IPv4Network(key)


def parse_tcp_rule(line: Line) -> TcpRule:
    key, action, rest = _split_action(line.text)
    env = _parse_env(rest) if rest else ()
    allow = action == "allow"
    common = dict(source=line, allow=allow, env=env)
    if key == "":
        return TcpRule(kind="default", network=None, networks=(), host="", **common)
    if key.startswith("="):
        host = key[1:].lower()
        if host == "":
            return TcpRule(kind="anyhost", network=None, networks=(), host="", **common)
        kind = "hostsuffix" if host.startswith(".") else "host"
        return TcpRule(kind=kind, network=None, networks=(), host=host, **common)
    if "@" in key:
        raise ValueError("user@address keys need TCPREMOTEINFO (ident), which mailfilter does not query")
    try:
        if "-" in key and ":" not in key:
            nets = _ipv4_range(key)
            return TcpRule(kind="cidr", network=None, networks=nets, host="", **common)
        net = _network(key)
    except HostBitsSet:
        raise
    except ValueError as exc:
        raise ValueError(f"bad address or network {quoted(key)} ({clip(str(exc))})") from None
    return TcpRule(kind="cidr", network=net, networks=(net,), host="", **common)
