"""Compile a rules directory into bundle sections.

Job: classify every entry read by controlfiles.py and build, through the Cython
builders in mailfilter._core, the flat sections the bundle stores:
  L:<list>   one ListMatcher per pattern list (hash keys + wildmat + RE2)
  H:<table>  hash tables (decorated badmailfrom entries, badhelo `name!`,
             recipients, tcp.smtp host rules)
  A:<list>   Aho-Corasick automata for badmimetypes / badloadertypes
  C:tcp.smtp the IPv4+IPv6 longest-prefix trie
  rules      the rule table: rule id -> (file, line, kind, flags, aux)
  meta       JSON: scalars, dialect, per-list regex sources, tcp settings, counts

Invariants:
- rule ids are dense, assigned in file order then line order, so within one
  file a larger id is a later line ("last match wins" = largest id);
- every skipped line produces exactly one Diagnostic naming file:line;
- list semantics follow
  docs/behaviour/control-files.md#which-match-wins, #regular-expressions, #decorated-entries,
  #recipients, #qregex-dialect, docs/behaviour/tcp-smtp.md#settings,
  docs/behaviour/smtp.md#pending-verdicts, #rcpt-checks; the entry kinds
  are documented in rules/README.md.
"""
from __future__ import annotations

import array
import dataclasses
import difflib
import hashlib
import ipaddress
import os
import re
import sys
import time
from dataclasses import dataclass, field

from mailfilter.core import core
from mailfilter.rules import controlfiles as cf
from mailfilter.rules.format import (
    BADMIMETYPE_MODES, FLAG_ALLOW, FLAG_EXCEPTION, FLAG_NEGATED, HELOCHECK_MODES, HOST_LISTS, KIND_CODE,
    KINDS, KNOWN_SETTINGS, NUMERIC_SETTINGS, QREGEX_LISTS, SIGNATURE_LISTS, UCSPITLS_MODES, Compiled, quoted,
    parse_dnsbl_site,
)
from mailfilter.rules.idn import IdnProblem, other_spellings
from mailfilter.rules.prefilters import regex_filter, required_literal
from mailfilter.rules.regexes import RegexError, compile_re2


def setting_problem(name: str, value: str) -> str | None:
    """Why `name=value` is meaningless, or None. qmail reads a garbage number
    as 0 (= no limit) and an unknown HELOCHECK mode as no test: silently."""
    if name == "HELOCHECK" and value not in HELOCHECK_MODES:
        return (f"HELOCHECK={quoted(value)} is not one of "
                + ", ".join(repr(m) for m in HELOCHECK_MODES))
    if name in NUMERIC_SETTINGS and not (value and set(value) <= _ASCII_DIGITS):
        return f"{name}={quoted(value)} is not a decimal number"
    if name == "UCSPITLS" and value not in UCSPITLS_MODES:
        return (f"UCSPITLS={quoted(value)} is not one of "
                + ", ".join(repr(m) for m in UCSPITLS_MODES))
    if name == "BADMIMETYPE" and value not in BADMIMETYPE_MODES:
        return (f"BADMIMETYPE={quoted(value)} is not one of "
                + ", ".join(repr(m) for m in BADMIMETYPE_MODES))
    if name == "QMAILQUEUE" and not value.startswith("/"):
        # qmail execs it as given (qmail.c: execv of $QMAILQUEUE, no PATH search)
        return f"QMAILQUEUE={quoted(value)} is not an absolute path to a program"
    if name == "BADLOADERTYPE" and not (value in ("+", "-") or (len(value) == 1 and value in _BASE64)):
        return (f"BADLOADERTYPE={quoted(value)} is not one base64 character (the first character "
                "of the loader signatures), '+' or '-'")
    return None

_has_wildmat = re.compile(r"[*?\[\\]").search
_has_space = re.compile(r"\s").search
_ASCII_DIGITS = frozenset("0123456789")


@dataclass
class _ListParts:
    hash_keys: list[bytes] = field(default_factory=list)
    hash_ids: list[int] = field(default_factory=list)
    wild_patterns: list[bytes] = field(default_factory=list)
    wild_ids: list[int] = field(default_factory=list)
    regex_ids: list[int] = field(default_factory=list)
    regex_literals: list[bytes] = field(default_factory=list)
    regex_negated: list[bool] = field(default_factory=list)
    regex_sources: list[str] = field(default_factory=list)
    regex_filters: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.hash_keys or self.wild_patterns or self.regex_ids)


def _fold(text: str) -> bytes:
    return text.encode("latin-1").lower()


def is_address_literal(text: str) -> bool:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]`: an RFC 5321 address literal."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            if not all(p and set(p) <= _ASCII_DIGITS for p in inner.split(".")):
                return False
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def literal_entry(body: str) -> bool:
    """An entry qmail reads as exact whose domain is an address literal
    (`[192.0.2.1]`, `@[192.0.2.1]`, `user@[IPv6:2001:db8::1]`): exact, not
    wildmat, although it contains `[` (rules/README.md)."""
    local, at, dom = body.rpartition("@")
    if at and _has_wildmat(local):
        return False
    return is_address_literal(dom)


def wildmat_problem(pattern: str) -> str | None:
    """Why `pattern` is not a well-formed wildmat, or None. Mirrors the matcher
    (_core/wildmat.pxi, Salz's wildmat): inside [...] a backslash is an
    ordinary character, a `]` right after `[` or `[^` is a member."""
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                return "wildmat ends with a lone backslash"
            i += 2
            continue
        if c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            first = True
            while True:
                if j >= n:
                    return "unclosed '[' in wildmat"
                if pattern[j] == "]" and not first:
                    break
                first = False
                j += 3 if j + 2 < n and pattern[j + 1] == "-" and pattern[j + 2] != "]" else 1
            i = j + 1
            continue
        i += 1
    return None


_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_\-\x80-\xff]+\Z")


def _rcpthost_ok(text: str) -> bool:
    """`example.com`, `.example.com` or an address literal `[192.0.2.1]`."""
    if is_address_literal(text):
        return True
    name = text[1:] if text.startswith(".") else text
    return bool(name) and all(_HOST_LABEL.match(label) for label in name.split("."))


def _cidr_key(net) -> tuple:
    """An IPv4-mapped IPv6 prefix (::ffff:a.b.c.d/96+) is the IPv4 prefix it
    matches: the trie stores it so (cidr_build), dual-stack clients are
    looked up as IPv4, so `10.1.2.3` and `::ffff:10.1.2.3` are one key."""
    mapped = net.network_address.ipv4_mapped if net.version == 6 and net.prefixlen >= 96 else None
    if mapped is not None:
        return ("cidr", mapped.packed, net.prefixlen - 96)
    return ("cidr", net.network_address.packed, net.prefixlen)


def _tcp_keys(rule: cf.TcpRule) -> list[tuple]:
    """The tcprules keys a rule stands for: `1.2.3.` and `1.2.3.0/24` are one key."""
    if rule.kind == "cidr":
        return [_cidr_key(n) for n in rule.networks]
    if rule.kind == "default":
        return [("default",)]
    return [("host", rule.host)]


class _Compiler:
    def __init__(self, src: cf.RulesSource, progress=None):
        self.src = src
        self.progress = progress
        self.diagnostics = list(src.diagnostics)
        self.files: list[str] = []
        self.file_index: dict[str, int] = {}
        # rule table, 3 words a rule: file<<16|kind<<8|flags, line, aux
        self.rows = array.array("I")
        self.sections: dict[str, bytes] = {}
        self.meta: dict = {"lists": {}, "tables": [], "signatures": [], "regex": {}}
        self.counts: dict[str, int] = {k: 0 for k in KINDS}

    # -- helpers
    def each(self, name: str, lines: list[cf.Line]):
        """Iterate `lines`, reporting progress for long lists."""
        total = len(lines)
        if self.progress is None or total < 50_000:
            yield from lines
            return
        for i, line in enumerate(lines):
            if i % 20_000 == 0:
                self.progress(name, i, total)
            yield line
        self.progress(name, total, total)

    def diag(self, line: cf.Line, problem: str, kept: bool = False) -> None:
        self.diagnostics.append(cf.Diagnostic(os.path.join(self.src.root, line.file), line.line,
                                              problem, kept))

    def add_rule(self, line: cf.Line, kind: str, flags: int = 0, aux: int = 0) -> int:
        idx = self.file_index.get(line.file)
        if idx is None:
            idx = self.file_index[line.file] = len(self.files)
            self.files.append(line.file)
        rows = self.rows
        rows.append(idx << 16 | KIND_CODE[kind] << 8 | flags)
        rows.append(line.line)
        rows.append(aux & 0xFFFFFFFF)
        self.counts[kind] += 1
        return len(rows) // 3 - 1

    def keys(self, line: cf.Line, text: str, host: bool = False) -> list[bytes]:
        """The hash keys of an exact, @domain or .suffix entry (`host`: the
        whole entry is a host name): the entry ASCII-folded, then the same
        with its domain in its other IDN spellings (rules/idn.py,
        docs/behaviour/control-files.md#international-domain-names)."""
        key = _fold(text)
        if text.isascii() and b"xn--" not in key:
            return [key]
        at = -1 if host else text.rfind("@")
        if at < 0 and not host and not text.startswith("."):
            return [key]        # a local part alone names no domain
        try:
            spelled = other_spellings(text[at + 1:])
        except IdnProblem as exc:
            self.diag(line, f"{exc}: only the spelling written matches", kept=True)
            return [key]
        out = [key]
        for other in spelled:
            k = _fold(text[:at + 1] + other)
            if k not in out:
                out.append(k)
        return out

    def not_utf8(self, line: cf.Line, text: str) -> bool:
        """True, with the diagnostic, when an address list's line has 8-bit
        bytes that are not UTF-8: an address with 8-bit bytes is UTF-8 (RFC
        6531 §3.3; docs/behaviour/control-files.md#reading-control-files), so
        the line could never match."""
        if text.isascii():
            return False
        raw = text.encode("latin-1")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.diag(line, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not "
                            "UTF-8, and an 8-bit address is (RFC 6531): it can never match")
            return True
        return False

    def put_table(self, name: str, keys: list[bytes], ids: list[int]) -> None:
        if keys:
            self.sections["H:" + name] = core.hashtab_build(keys, ids)
            self.meta["tables"].append(name)

    def put_list(self, name: str, parts: _ListParts) -> None:
        if not parts:
            return
        self.sections["L:" + name] = core.listmatch_build(
            parts.hash_keys, parts.hash_ids, parts.wild_patterns, parts.wild_ids,
            parts.regex_ids, parts.regex_literals, parts.regex_negated, parts.regex_filters)
        self.meta["lists"][name] = len(parts.regex_sources)
        if parts.regex_sources:
            self.meta["regex"][name] = parts.regex_sources

    def add_regex(self, parts: _ListParts, line: cf.Line, pattern: str, flags: int) -> None:
        if not pattern:
            self.diag(line, "empty regular expression")
            return
        try:
            compile_re2(pattern)
        except RegexError as exc:
            self.diag(line, str(exc))
            return
        rid = self.add_rule(line, "regex", flags)
        parts.regex_ids.append(rid)
        parts.regex_literals.append(required_literal(pattern))
        parts.regex_negated.append(bool(flags & FLAG_NEGATED))
        parts.regex_sources.append(pattern)
        parts.regex_filters.append(regex_filter(pattern))

    # -- spamcontrol pattern lists
    # (docs/behaviour/control-files.md#which-match-wins, #decorated-entries)
    def spamcontrol_entry(self, parts: _ListParts, line: cf.Line, body: str, flags: int,
                          host: bool = False) -> None:
        """One entry of a spamcontrol list; `host`: the list names hosts
        (badhelo), so an exact entry is a domain."""
        if not body:
            self.diag(line, "empty entry after '!'")
            return
        if body[0].isspace():
            self.diag(line, "leading whitespace is part of the entry (qmail keeps it), so it can never match")
            return
        if len(body) >= 2 and body[0] == "/" and body[-1] == "/":
            self.add_regex(parts, line, body[1:-1], flags)
            return
        if body[0] == "/":
            self.diag(line, "regular expression without its closing '/' (write /regex/)")
            return
        if not host and self.not_utf8(line, body):
            return
        if _has_wildmat(body) and not literal_entry(body):
            problem = wildmat_problem(body)
            if problem:
                self.diag(line, problem)
                return
            dom = body.rpartition("@")[2]
            if "@" in body and is_address_literal(dom):
                self.diag(line, f"in a wildmat the domain literal {dom} is a character set; "
                                "write it as \\[...\\] to match the address literal")
                return
            rid = self.add_rule(line, "wildmat", flags)
            parts.wild_patterns.append(body.encode("latin-1"))   # _core folds it (sets kept)
            parts.wild_ids.append(rid)
            return
        if body.startswith("@"):
            kind = "domain"
        elif body.startswith("."):
            kind = "suffix"
        else:
            kind = "exact"
        if body in ("@", "."):
            self.diag(line, f"'{body}' alone names no domain")
            return
        rid = self.add_rule(line, kind, flags)
        for key in self.keys(line, body, host):
            parts.hash_keys.append(key)
            parts.hash_ids.append(rid)

    def compile_badmailfrom(self, lines: list[cf.Line]) -> None:
        parts = _ListParts()
        decorated: dict[str, tuple[list[bytes], list[int]]] = {
            k: ([], []) for k in ("bypass", "antispoof", "unknownhost", "wellknown", "mismatch")}

        def deco(kind: str, line: cf.Line, key: str) -> None:
            if not key or key in ("@",):
                self.diag(line, "decorated entry names no address or domain")
                return
            if self.not_utf8(line, key):
                return
            rid = self.add_rule(line, kind)
            for k in self.keys(line, key, host=kind == "mismatch"):
                decorated[kind][0].append(k)
                decorated[kind][1].append(rid)

        marks = {"+": "antispoof", "-": "unknownhost", "=": "wellknown"}
        for line in self.each("badmailfrom", lines):
            text = line.text
            if text.startswith("?"):                       # ?user@dom: bypass
                key = text[1:]
                local, at, dom = key.rpartition("@")
                if (not at or not local or not dom or _has_wildmat(local) or _has_space(key)
                        or (_has_wildmat(dom) and not is_address_literal(dom))):
                    self.diag(line, f"a '?' bypass entry takes a full address user@domain, not {quoted(key)}")
                else:
                    deco("bypass", line, key)
                continue
            if text.startswith("~"):                       # ~dom: mismatched domains
                key = text[1:].lstrip(".")
                if not key or "@" in key or _has_wildmat(key) or _has_space(key):
                    self.diag(line, f"a '~' entry takes a host or domain name (~yahoo.com), not {quoted(text[1:])}")
                else:
                    deco("mismatch", line, key)
                continue
            negated = text.startswith("!")
            body = text[1:] if negated else text
            mark = body[-1:]
            if mark in marks and ("@" in body or body.startswith(".")) and not body.startswith("/"):
                core_ = body[:-1]
                if negated:
                    self.diag(line, f"'!' cannot be combined with the decoration '{mark}'")
                elif core_.startswith(".") or (_has_wildmat(core_) and not literal_entry(core_)):
                    self.diag(line, f"a '{mark}' entry takes a plain address or @domain, not a wildmat or .suffix")
                elif mark != "+" and not core_.startswith("@"):
                    self.diag(line, f"'{mark}' takes @domain only (docs/behaviour/control-files.md#decorated-entries), not a full address: "
                                    f"write @{core_.rpartition('@')[2]}{mark}")
                elif not core_.rpartition("@")[2] or _has_space(core_):
                    self.diag(line, "decorated entry names no address or domain")
                else:
                    deco(marks[mark], line, core_)
                continue
            if negated:
                self.spamcontrol_entry(parts, line, body, FLAG_EXCEPTION)
            else:
                self.spamcontrol_entry(parts, line, body, 0)
        self.put_list("badmailfrom", parts)
        for kind, (keys, ids) in decorated.items():
            self.put_table(f"badmailfrom.{kind}", keys, ids)

    def compile_badhelo(self, lines: list[cf.Line]) -> None:
        parts = _ListParts()
        keys: list[bytes] = []
        ids: list[int] = []
        for line in self.each("badhelo", lines):
            text = line.text
            if text.endswith("!") and len(text) > 1:
                name = text[:-1]
                if text.startswith("!"):
                    self.diag(line, "'!' exception cannot be combined with a trailing '!' (name!)")
                    continue
                if (name.startswith((".", "/")) or name[0].isspace()
                        or (_has_wildmat(name) and not is_address_literal(name))):
                    self.diag(line, "'name!' takes a plain HELO name, not a wildmat, .suffix or regex")
                    continue
                rid = self.add_rule(line, "heloaccept")     # name!: acceptable, no DNS test
                for key in self.keys(line, name, host=True):
                    keys.append(key)
                    ids.append(rid)
            elif text.startswith("!"):
                self.spamcontrol_entry(parts, line, text[1:], FLAG_EXCEPTION, host=True)
            else:
                self.spamcontrol_entry(parts, line, text, 0, host=True)
        self.put_list("badhelo", parts)
        self.put_table("badhelo.accept", keys, ids)

    def compile_plain_list(self, name: str, lines: list[cf.Line]) -> None:
        parts = _ListParts()
        for line in self.each(name, lines):
            text = line.text
            if text.startswith("!"):
                self.spamcontrol_entry(parts, line, text[1:], FLAG_EXCEPTION)
            else:
                self.spamcontrol_entry(parts, line, text, 0)
        self.put_list(name, parts)

    # -- qregex (docs/behaviour/control-files.md#regular-expressions, #qregex-dialect): every line
    # a regex, `!` = must match
    def compile_qregex_list(self, name: str, lines: list[cf.Line]) -> None:
        parts = _ListParts()
        for line in self.each(name, lines):
            text = line.text
            if text[0].isspace() or (text[0] == "!" and text[1:2].isspace()):
                self.diag(line, "leading whitespace is part of the regex (qmail keeps it); "
                                "write \\x20 if a space is really meant")
                continue
            if text.startswith("!"):
                self.add_regex(parts, line, text[1:], FLAG_NEGATED)
            else:
                self.add_regex(parts, line, text, 0)
        self.put_list(name, parts)

    # -- rcpthosts + morercpthosts (docs/behaviour/control-files.md#rcpthosts): exact
    # domain or .suffix
    def compile_rcpthosts(self) -> None:
        present = [n for n in HOST_LISTS if n in self.src.lists]
        if not present:
            return
        # either file turns the check on, even empty
        # (docs/behaviour/control-files.md#rcpthosts: an existing empty list accepts no domain); an
        # empty morercpthosts alone used to count as "no list" (open relay with --open-relay,
        # postmaster refused)
        self.meta["rcpthosts_present"] = True
        parts = _ListParts()
        for name in present:
            for line in self.each(name, self.src.lists[name]):
                text = line.text
                if self.not_utf8(line, text):
                    continue
                if not _rcpthost_ok(text):
                    self.diag(line, f"{name} takes a domain or .suffix, not {quoted(text)}")
                    continue
                kind = "suffix" if text.startswith(".") else "host"
                rid = self.add_rule(line, kind)
                for key in self.keys(line, text, host=True):
                    parts.hash_keys.append(key)
                    parts.hash_ids.append(rid)
        self.put_list("rcpthosts", parts)

    # -- recipients (docs/behaviour/control-files.md#recipients, text form): addresses,
    # @domain catch-alls
    def compile_recipients(self, lines: list[cf.Line]) -> None:
        keys: list[bytes] = []
        ids: list[int] = []
        ukeys: list[bytes] = []
        uids: list[int] = []
        named: dict[bytes, int] = {}
        for line in self.each("recipients", lines):
            text = line.text
            if self.not_utf8(line, text):
                continue
            if text.startswith("!"):
                dom = text[1:]
                if (not dom or "@" in dom or _has_space(dom) or dom.startswith(".")
                        or (dom != "*" and _has_wildmat(dom) and not is_address_literal(dom))):
                    self.diag(line, "'!' takes a domain (exact, no wildcards or .suffix) or '*'")
                    continue
                rid = self.add_rule(line, "unchecked")
                for key in self.keys(line, dom, host=True):
                    ukeys.append(key)
                    uids.append(rid)
                continue
            if text.startswith(":"):                       # fastforward key form
                text = text[1:]
            if "|" in text or text.endswith(".cdb") or ":" in text:
                self.diag(line, "cdb and program recipient checks are not supported; list addresses in the file")
                continue
            if "@" not in text or _has_space(text):
                self.diag(line, f"expected user@domain, @domain or !domain, not {quoted(text)}")
                continue
            local, _, dom = text.rpartition("@")
            if not dom:
                self.diag(line, f"{quoted(text)} names no domain")
                continue
            if "*" in text:
                self.diag(line, "recipients entries are literal ('*' is no wildcard); "
                                "write @domain for every address at a domain")
                continue
            if local.endswith("-") and "-" in local[:-1]:
                self.diag(line, f"an extension entry is the local part up to and including its FIRST '-' "
                                f"(docs/behaviour/control-files.md#recipients), so {quoted(text)} can never match: write "
                                f"{local[:local.index('-') + 1]}@{dom}")
                continue
            kind = "catchall" if text.startswith("@") else "recipient"
            rid = self.add_rule(line, kind)
            spelled = self.keys(line, text)
            for key in spelled:
                keys.append(key)
                ids.append(rid)
                named.setdefault(key[key.rindex(b"@") + 1:], rid)
        self.meta["recipients_present"] = True
        self.put_table("recipients", keys, ids)
        self.put_table("recipients.unchecked", ukeys, uids)
        # the domains the file names: `!*` spares only the others (rules/README.md)
        self.put_table("recipients.domains", list(named), list(named.values()))

    def compile_signatures(self, name: str, width: int, lines: list[cf.Line]) -> None:
        patterns: list[bytes] = []
        ids: list[int] = []
        for line in lines:
            sig = line.text[:width]
            if len(sig) < width or not set(sig) <= _BASE64:
                self.diag(line, f"{name} signature must be {width} base64 characters")
                continue
            rid = self.add_rule(line, "signature")
            patterns.append(sig.encode("latin-1"))
            ids.append(rid)
        if patterns:
            self.sections["A:" + name] = core.aho_build(patterns, ids, False)
            self.meta["signatures"].append(name)

    # -- tcp.smtp (docs/behaviour/tcp-smtp.md#syntax)
    def compile_tcp_rules(self) -> None:
        settings: list[dict[str, str]] = []
        settings_index: dict[tuple, int] = {}
        cidr: list[tuple[bytes, int, int]] = []
        host_keys: list[bytes] = []
        host_ids: list[int] = []
        default_id = -1
        # tcprules builds a cdb and tcpserver reads the FIRST record of a key:
        # a later line with the same key is dead, so it is a diagnostic.
        seen: dict[tuple, cf.Line] = {}
        for rule in self.src.tcp_rules:
            # real tcp.smtp files carry variables for other programs (RBLSMTPD,
            # QMAILQUEUE, SIMSCAN*, CHKUSER_*...): the rule stays, each such
            # variable is ignored with a warning (docs/behaviour/tcp-smtp.md#syntax)
            unknown = [n for n, _ in rule.env if n not in KNOWN_SETTINGS]
            if unknown:
                for name in dict.fromkeys(unknown):
                    near = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1, cutoff=0.8)
                    hint = f" (did you mean {near[0]}?)" if near else ""
                    self.diag(rule.source, f"setting {name} is not one of mailfilter's{hint}",
                              kept=True)
                rule = dataclasses.replace(
                    rule, env=tuple((n, v) for n, v in rule.env if n in KNOWN_SETTINGS))
            problem = next((p for p in (setting_problem(n, v) for n, v in rule.env) if p), None)
            if problem:
                self.diag(rule.source, problem)
                continue
            keys = _tcp_keys(rule)
            first = next((seen[k] for k in keys if k in seen), None)
            if first is not None:
                self.diag(rule.source, f"same key as {first.where}, which wins")
                continue
            for k in keys:
                seen[k] = rule.source
            idx = settings_index.get(rule.env)
            if idx is None:
                idx = settings_index[rule.env] = len(settings)
                settings.append(dict(rule.env))
            flags = FLAG_ALLOW if rule.allow else 0
            if rule.kind == "cidr":
                rid = self.add_rule(rule.source, "cidr", flags, idx)
                for net in rule.networks:
                    cidr.append((net.network_address.packed, net.prefixlen, rid))
            elif rule.kind == "default":
                default_id = self.add_rule(rule.source, "default", flags, idx)
            else:
                rid = self.add_rule(rule.source, "host", flags, idx)
                host_keys.append(b"=" + rule.host.encode("latin-1"))
                host_ids.append(rid)
        self.meta["tcp"] = {"settings": settings, "default": default_id,
                            "present": bool(self.src.tcp_rules)}
        if cidr:
            self.sections["C:tcp.smtp"] = core.cidr_build(cidr)
        self.put_table("tcp.smtp.hosts", host_keys, host_ids)

    # -- dnsbl (docs/behaviour/control-files.md#dnsbl): sites go into the
    # bundle's meta as written (zone, filter text, weight, line); the policy
    # parses them again with the same function when it loads the bundle
    def compile_dnsbl(self, lines: list[cf.Line]) -> None:
        sites = []
        seen: dict[tuple, cf.Line] = {}
        for line in lines:
            try:
                zone, flt, weight = parse_dnsbl_site(line.text)
            except ValueError as exc:
                self.diag(line, str(exc))
                continue
            if weight == 0:
                self.diag(line, "weight 0 counts for nothing")
                continue
            key = (zone, flt)
            if key in seen:
                self.diag(line, f"same zone and filter as {seen[key].where}")
                continue
            seen[key] = line
            sites.append({"site": line.text.strip(), "line": line.line})
        if sites:
            self.meta["dnsbl"] = sites

    def run(self) -> Compiled:
        src = self.src
        dialect = src.dialect
        lists = src.lists
        if dialect == "qregex":
            for name in QREGEX_LISTS:
                if name in lists:
                    self.compile_qregex_list(name, lists[name])
            if "relaymailfrom" in lists:
                self.compile_plain_list("relaymailfrom", lists["relaymailfrom"])
        else:
            for name in ("badmailfromnorelay", "badrcpttonorelay", "badhelonorelay"):
                for line in lists.get(name, []):
                    self.diag(line, f"{name} is a qregex file; set `dialect` to qregex to use it")
            if "badmailfrom" in lists:
                self.compile_badmailfrom(lists["badmailfrom"])
            if "badhelo" in lists:
                self.compile_badhelo(lists["badhelo"])
            for name in ("badrcptto", "relaymailfrom"):
                if name in lists:
                    self.compile_plain_list(name, lists[name])
        self.compile_rcpthosts()
        if "recipients" in lists:
            self.compile_recipients(lists["recipients"])
        for name, width in SIGNATURE_LISTS.items():
            if name in lists:
                self.compile_signatures(name, width, lists[name])
        self.compile_tcp_rules()
        self.compile_dnsbl(lists.get("dnsbl", []))

        if self.rows.itemsize != 4:
            raise RuntimeError("array('I') is not 32-bit on this platform")
        if sys.byteorder != "little":
            self.rows.byteswap()
        table = self.rows.tobytes()
        self.meta.update(
            dialect=dialect,
            files=self.files,
            kinds=list(KINDS),
            scalars=dict(src.scalars),
            integers=dict(src.integers),
            rules_dir=os.path.abspath(src.root),
            compiled_at=int(time.time()),
            counts={k: v for k, v in self.counts.items() if v},
        )
        return Compiled(
            sections=self.sections, meta=self.meta, rule_table=bytes(table),
            n_rules=len(self.rows) // 3, fingerprint=fingerprint(src),
            diagnostics=self.diagnostics, counts=self.counts)


def fingerprint(src: cf.RulesSource) -> bytes:
    """SHA-256 over the names and bytes of every file read."""
    h = hashlib.sha256()
    for name in sorted(src.files):
        data = src.files[name]
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.digest()


def compile_source(src: cf.RulesSource, progress=None) -> Compiled:
    """Compile; `progress(phase, done, total)` is called now and then."""
    return _Compiler(src, progress).run()


def compile_dir(root: str) -> Compiled:
    return compile_source(cf.read_rules_dir(root))
