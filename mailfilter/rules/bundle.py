"""The compiled rule bundle: one file, written once, mmap'ed and used in place.

Layout (all integers little-endian):

  header, 128 bytes
    0  magic      8   b"MFBUNDL\\0"
    8  version    u32 FORMAT_VERSION
   12  byteorder  u32 0x01020304 (refuses a bundle from a big-endian writer)
   16  n_sections u32
   20  n_rules    u32
   24  payload    u64 length of everything after the header
   32  crc32      u32 of the payload
   36  reserved   u32
   40  fingerprint 32 SHA-256 of the source files (rules/compiler.py fingerprint)
   72  counts     7 x u32: exact, domain+suffix+host, wildmat, regex, cidr, decorated, other
  100  reserved to 128
  table of contents: n_sections x 48 bytes (name 32 bytes NUL-padded, offset u64, length u64)
  sections, each 8-byte aligned; offsets are from the start of the file.

Sections are the flat blobs of rules/compiler.py. Loading reads the file into an
anonymous memory map (see load(): never file-backed, so replacing the file
in place cannot crash a running server), checks magic, version, byte order,
length and checksum, then hands read-only memoryview slices to the Cython
classes, which use them in place: no per-entry Python objects except the compiled
regexes (stored as text, compiled by RE2 on first use, see _LazyRegex; or at
load with eager_regex=True). A bad bundle raises BundleError, always
starting with the bundle path, with a message that says what is wrong (a
rule row that names no file is found when first used, by rule()/where()); load()
can be called again at any time
(SIGHUP reload) and returns a new, independent Bundle.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass

from mailfilter.core import core
from mailfilter.rules.format import FLAG_ALLOW, FLAG_EXCEPTION, FLAG_NEGATED, KINDS, Compiled
from mailfilter.rules.regexes import compile_re2, gate_part

MAGIC = b"MFBUNDL\0"
# 2: regex filter records in LMAT; 3: required-byte filters (LMAT 3);
# 4: regex literals and filters derived from RE2's reading of the pattern
#    (format 3 bundles may hold filters that hide RE2 matches, e.g. of
#    `[[:digit:]]x`: they must be recompiled, not loaded);
# 5: wildmat sets stored as written and matched case-insensitively by the
#    matcher (format 4 folded them at compile time: `[0-Z]` became `[0-z]`),
#    so a format-5 bundle must never meet a format-4 matcher, nor the reverse;
# 6: list literals found by an 8-byte window index (LMAT 4 embeds an LIDX
#    blob where LMAT 3 had an AHOC automaton; same answers, fewer cache misses)
# 7: the tcp.smtp limit settings (MAXCONNIP, MAXCONNRATE, MAXMSGRATE,
#    MAXRCPTRATE: a format-6 compiler dropped them with a warning) and IDN
#    domains stored under both spellings (docs/behaviour/control-files.md):
#    a format-6 bundle would serve the same files with fewer rules
FORMAT_VERSION = 7
BYTEORDER = 0x01020304
HEADER = struct.Struct("<8sIIIIQII32s7I28x")
TOC_ENTRY = struct.Struct("<32sQQ")
assert HEADER.size == 128


class BundleError(Exception):
    """The bundle file cannot be used (missing, truncated, corrupt, wrong version)."""


def _align(n: int) -> int:
    return (n + 7) & ~7


def _count_summary(counts: dict[str, int]) -> tuple[int, ...]:
    g = counts.get
    return (
        g("exact", 0),
        g("domain", 0) + g("suffix", 0) + g("host", 0),
        g("wildmat", 0),
        g("regex", 0),
        g("cidr", 0),
        sum(g(k, 0) for k in ("bypass", "antispoof", "unknownhost", "wellknown", "mismatch", "heloaccept")),
        sum(g(k, 0) for k in ("recipient", "catchall", "unchecked", "signature", "default")),
    )


def serialize(compiled: Compiled) -> bytes:
    """The bundle bytes for a compiled rule set."""
    sections = dict(compiled.sections)
    sections["rules"] = compiled.rule_table
    sections["meta"] = json.dumps(compiled.meta, sort_keys=True).encode()
    names = sorted(sections)
    toc_size = TOC_ENTRY.size * len(names)
    offset = _align(HEADER.size + toc_size)
    toc = bytearray()
    body = bytearray()
    for name in names:
        data = sections[name]
        if len(name.encode()) > 32:
            raise ValueError(f"section name too long: {name}")
        pad = _align(offset + len(body)) - (offset + len(body))
        body += b"\0" * pad
        toc += TOC_ENTRY.pack(name.encode(), offset + len(body), len(data))
        body += data
    payload = bytes(toc) + b"\0" * (offset - HEADER.size - toc_size) + bytes(body)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, BYTEORDER, len(names), compiled.n_rules,
                         len(payload), zlib.crc32(payload), 0, compiled.fingerprint,
                         *_count_summary(compiled.counts))
    return header + payload


def write(compiled: Compiled, path: str) -> int:
    """Write the bundle atomically (temp file, fsync, rename); returns its size.
    The file gets the mode a plain create would (0666 minus the umask), not
    mkstemp's 0600: a server running as another user must be able to read a
    bundle compiled by root (rules are not secrets)."""
    data = serialize(compiled)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", dir=directory)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


class _LazyRegex:
    """A regex compiled on first use (RE2 takes ~20 µs a pattern, so 10k
    regexes would dominate load time). The compiler already proved every
    pattern compiles and the checksum guards the text; should RE2 still refuse
    one (a different RE2 build), the lookup raises and the server answers
    4xx, never a silent accept. After the first call the matcher holds the
    compiled pattern's own contains method: no indirection remains."""

    __slots__ = ("pattern", "index", "matcher")

    def __init__(self, pattern: str, index: int):
        self.pattern = pattern
        self.index = index
        self.matcher = None

    def contains(self, text: bytes) -> bool:
        compiled = compile_re2(self.pattern)
        self.matcher.set_contains(self.index, compiled.contains)
        return compiled.contains(text)


class _LazyGate:
    """One RE2 alternation of a list's regexes that have no selective literal
    (ListMatcher.gated_regexes): a lookup that would run each of them runs
    this once, and only on a hit the individual regexes (the deciding rule is
    still the last match). Compiled on first use; if RE2 refuses the
    alternation (too large), the list simply runs without a gate."""

    __slots__ = ("pattern", "matcher")

    def __init__(self, pattern: str, matcher):
        self.pattern = pattern
        self.matcher = matcher

    def contains(self, text: bytes) -> bool:
        try:
            compiled = compile_re2(self.pattern, limit_expansion=False)
        except ValueError:
            self.matcher.set_gate(None)
            return True                   # no gate: every regex runs
        self.matcher.set_gate(compiled.contains)
        return compiled.contains(text)


@dataclass(frozen=True, slots=True)
class RuleRef:
    """What the rule table says about one rule id."""
    id: int
    file: str
    line: int
    kind: str
    flags: int
    aux: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def exception(self) -> bool:
        return bool(self.flags & FLAG_EXCEPTION)

    @property
    def negated(self) -> bool:
        return bool(self.flags & FLAG_NEGATED)

    @property
    def allow(self) -> bool:
        return bool(self.flags & FLAG_ALLOW)


class Bundle:
    """A loaded bundle: matchers by name plus the rule table."""

    def __init__(self, buf, source: str = "<memory>", _keep=None, eager_regex: bool = False):
        self.source = source
        self.eager_regex = eager_regex
        self._keep = _keep          # the mmap, kept alive as long as the bundle
        try:
            self._parse(memoryview(buf), source)
        except BundleError:
            raise
        except Exception as exc:
            # The checks below name what they test; anything else a damaged
            # (or hand-made, with a recomputed CRC) bundle trips over, such as
            # a UnicodeDecodeError or struct.error deep in a section, must
            # still say which file it is: the operator has several.
            raise BundleError(f"{source}: damaged bundle ({type(exc).__name__}: {exc})") from None

    def _parse(self, mv: memoryview, source: str) -> None:
        if len(mv) < HEADER.size:
            raise BundleError(f"{source}: truncated bundle ({len(mv)} bytes, header needs {HEADER.size})")
        (magic, version, byteorder, n_sections, n_rules, payload_len, crc, _r,
         fp, *counts) = HEADER.unpack_from(mv, 0)
        if magic != MAGIC:
            raise BundleError(f"{source}: not a mailfilter rule bundle (bad magic)")
        if byteorder != BYTEORDER:
            raise BundleError(f"{source}: bundle written with another byte order")
        if version != FORMAT_VERSION:
            raise BundleError(f"{source}: bundle format version {version}, this mailfilter reads "
                              f"version {FORMAT_VERSION}: recompile with `mailfilter compile`")
        if HEADER.size + payload_len != len(mv):
            raise BundleError(f"{source}: truncated or padded bundle: header says "
                              f"{HEADER.size + payload_len} bytes, file has {len(mv)}")
        if zlib.crc32(mv[HEADER.size:]) != crc:
            raise BundleError(f"{source}: checksum mismatch: the bundle is corrupt")
        self.fingerprint = fp
        self.n_rules = n_rules
        self.header_counts = tuple(counts)
        self._sections: dict[str, memoryview] = {}
        for i in range(n_sections):
            raw, off, length = TOC_ENTRY.unpack_from(mv, HEADER.size + i * TOC_ENTRY.size)
            try:
                name = raw.rstrip(b"\0").decode()
            except UnicodeDecodeError:
                raise BundleError(f"{source}: section {i} has a name that is not UTF-8 "
                                  f"({raw.rstrip(bytes(1))[:32]!r})") from None
            if off < HEADER.size or off + length > len(mv):
                raise BundleError(f"{source}: section {name} lies outside the file")
            self._sections[name] = mv[off:off + length]
        try:
            self.meta = json.loads(bytes(self._sections["meta"]))
            rules = self._sections["rules"]
        except (KeyError, ValueError) as exc:
            raise BundleError(f"{source}: missing or unreadable metadata ({exc})") from None
        if len(rules) != 12 * n_rules:
            raise BundleError(f"{source}: rule table has {len(rules)} bytes for {n_rules} rules")
        # 3 u32 words per rule id: file index << 16 | kind << 8 | flags, line,
        # aux. Public so the policy can test a flag without a method call.
        self.rule_words = rules.cast("I")
        try:
            self.files: list[str] = list(self.meta["files"])
            self.dialect: str = self.meta["dialect"]
            self.scalars: dict[str, str] = dict(self.meta["scalars"])
            self.integers: dict[str, int] = dict(self.meta["integers"])
            tcp = dict(self.meta.get("tcp", {}))
            self.tcp_settings: list[dict[str, str]] = list(tcp.get("settings", []))
            self.tcp_default: int = int(tcp.get("default", -1))
            self.tcp_present: bool = bool(tcp.get("present", False))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # a CRC only proves the file is as written; a hand-made bundle can
            # still be malformed: refuse it here, not with a traceback later
            raise BundleError(f"{source}: malformed metadata ({type(exc).__name__}: {exc})") from None
        try:
            self.lists = {name: self._list(name) for name in self.meta["lists"]}
            self.tables = {name: core.HashTable(self._sections["H:" + name]) for name in self.meta["tables"]}
            self.signatures = {name: core.AhoCorasick(self._sections["A:" + name])
                               for name in self.meta["signatures"]}
            self.cidr = core.CidrTrie(self._sections["C:tcp.smtp"]) if "C:tcp.smtp" in self._sections else None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise BundleError(f"{source}: damaged section ({exc})") from None

    def _list(self, name: str):
        sources = self.meta["regex"].get(name, [])
        if self.eager_regex:
            try:
                regexes = [compile_re2(s) for s in sources]
            except ValueError as exc:
                raise BundleError(f"{self.source}: {exc}") from None
            matcher = core.ListMatcher(self._sections["L:" + name], regexes)
        else:
            stubs = [_LazyRegex(s, i) for i, s in enumerate(sources)]
            matcher = core.ListMatcher(self._sections["L:" + name], stubs)
            for stub in stubs:
                stub.matcher = matcher
        # listed() tells an `!` exception line from a listing by its flags
        matcher.set_rule_flags(self.rule_words, FLAG_EXCEPTION)
        gated = matcher.gated_regexes()
        parts = [gate_part(sources[i]) for i in gated]
        if len(parts) >= 2 and None not in parts:    # else no gate: every regex runs
            gate = _LazyGate("|".join(parts), matcher)
            matcher.set_gate(gate.contains)
        return matcher

    # -- rule table
    def rule(self, rid: int) -> RuleRef:
        if not 0 <= rid < self.n_rules:
            raise IndexError(rid)
        words = self.rule_words
        w0 = words[3 * rid]
        try:
            return RuleRef(rid, self.files[w0 >> 16], words[3 * rid + 1],
                           KINDS[(w0 >> 8) & 0xFF], w0 & 0xFF, words[3 * rid + 2])
        except IndexError:
            raise self._bad_rule(rid, w0) from None

    def where(self, rid: int) -> str:
        w0 = self.rule_words[3 * rid]
        try:
            return f"{self.files[w0 >> 16]}:{self.rule_words[3 * rid + 1]}"
        except IndexError:
            raise self._bad_rule(rid, w0) from None

    def _bad_rule(self, rid: int, w0: int) -> BundleError:
        """The rule table is not walked at load (a million rules would cost a
        reload time); a damaged row is named when it is first used."""
        return BundleError(f"{self.source}: rule {rid} names file {w0 >> 16} and kind "
                           f"{(w0 >> 8) & 0xFF}, which the bundle does not have")

    def flags(self, rid: int) -> int:
        return self.rule_words[3 * rid] & 0xFF

    def section_sizes(self) -> dict[str, int]:
        return {name: len(mv) for name, mv in self._sections.items()}

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.meta.get("counts", {}))


def load(path: str, eager_regex: bool = False) -> Bundle:
    """Read and validate the bundle at `path`; regexes compile on first use
    unless `eager_regex` (then a pattern RE2 refuses is a BundleError here).

    The file is read ONCE into an anonymous memory map (transparent huge pages
    where the kernel allows them) and the sections are used in place from
    there. A file-backed map would be shared with the file: an operator's
    `cp new.mfb rules.mfb` truncates the file in place and the running server
    would die of SIGBUS at its next lookup. `mailfilter compile` replaces the
    file atomically (rename), but the server must not depend on that."""
    try:
        fh = open(path, "rb", buffering=0)
    except OSError as exc:
        raise BundleError(f"{path}: cannot open bundle: {exc.strerror}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise BundleError(f"{path}: empty file, not a bundle")
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass                      # no THP here: 4 KB pages, same result
        view = memoryview(memory)
        got = 0
        while got < size:
            n = fh.readinto(view[got:])
            if not n:
                break
            got += n
        view.release()
    if got != size:
        raise BundleError(f"{path}: the file changed while it was being read ({got} of {size} bytes)")
    return Bundle(memoryview(memory).toreadonly(), source=path, _keep=memory,
                  eager_regex=eager_regex)


def from_compiled(compiled: Compiled) -> Bundle:
    """A bundle straight from memory (`check --rules`, compile at start)."""
    return Bundle(serialize(compiled), source=compiled.meta.get("rules_dir", "<memory>"))
