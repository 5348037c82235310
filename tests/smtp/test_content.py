"""content.py: badmimetypes / badloadertypes during DATA (docs/behaviour/smtp.md#content-checks,
"Content filters"), fed whole and one byte at a time (docs/architecture.md#tests-and-benches: every
byte-level scenario both ways), with the real Aho-Corasick automata."""
import base64

import pytest

from mailfilter.smtp.content import ContentScanner
from mailfilter.core import core

MIME = core.AhoCorasick(core.aho_build([b"TVqQAAMAA", b"TVpQAAIAA"], [10, 11], False))
LOADER = core.AhoCorasick(core.aho_build([b"Mi5kb", b"MzIuZ"], [20, 21], False))
MZ = base64.b64encode(b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" + bytes(50)).decode()


def message(parts: list[tuple[str, str]], preamble: str = "") -> bytes:
    out = ["From: a@b\nSubject: t\nMIME-Version: 1.0\n"
           "Content-Type: multipart/mixed; boundary=\"XX\"\n\n" + preamble]
    for headers, body in parts:
        out.append(f"--XX\n{headers}\n\n{body}\n")
    out.append("--XX--\nepilogue\n")
    return "".join(out).encode()


def scan(data: bytes, bytewise: bool, **kw) -> tuple | None:
    s = ContentScanner(MIME, LOADER, **kw)
    if bytewise:
        for i in range(len(data)):
            s.feed(data[i:i + 1])
    else:
        s.feed(data)
    s.finish()
    return s.hit


CASES = [
    ("mz attachment", message([("Content-Type: text/plain", "hello\n-- \nsig"),
                               ("Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64",
                                "\n" + MZ[:40] + "\n" + MZ[40:])]), {}, ("badmimetypes", 10)),
    ("base64 but harmless", message([("Content-Transfer-Encoding: BASE64",
                                      base64.b64encode(b"just text here, nothing else").decode())]), {}, None),
    ("mz in a quoted-printable part", message([("Content-Transfer-Encoding: quoted-printable",
                                                MZ)]), {}, None),
    ("folded CTE header", message([("Content-Type: application/x\nContent-Transfer-Encoding:\n base64",
                                    MZ)]), {}, ("badmimetypes", 10)),
    ("loader anywhere in a later line", message([("Content-Transfer-Encoding: base64",
                                                  "AAAAAAAAAAAA\nAAAAMzIuZAAAA\n")]), {}, ("badloadertypes", 21)),
    ("loader text outside base64", message([("Content-Type: text/plain", "Mi5kb in plain text")]), {}, None),
    ("whitespace in base64, strict", message([("Content-Transfer-Encoding: base64", "AAAA AAAA\n")]),
     {"strict_whitespace": True}, ("badmimetypes", -1)),
    ("whitespace in base64, not strict", message([("Content-Transfer-Encoding: base64", "AAAA AAAA\n")]), {}, None),
    ("single-part base64 message", b"Subject: x\nContent-Transfer-Encoding: base64\n\n" + MZ.encode() + b"\n",
     {}, ("badmimetypes", 10)),
    ("no final newline", b"Content-Transfer-Encoding: base64\n\n" + MZ[:20].encode(), {}, ("badmimetypes", 10)),
    ("CRLF kept in headers", message([("Content-Transfer-Encoding: base64\r", "\r\n" + MZ)]), {},
     ("badmimetypes", 10)),
    # a forwarded message (message/rfc822): its own header block is read
    ("single-part base64 inside message/rfc822",
     message([("Content-Type: message/rfc822", "Subject: fwd\nContent-Transfer-Encoding: base64\n\n" + MZ)]),
     {}, ("badmimetypes", 10)),
    ("harmless message/rfc822", message([("Content-Type: Message/RFC822; x=1",
                                          "Subject: fwd\n\nContent-Transfer-Encoding: base64\n\n" + MZ)]),
     {}, None),
    # message/* with base64 encoding is base64; the next part starts afresh
    ("message part encoded base64, then text",
     message([("Content-Type: message/global\nContent-Transfer-Encoding: base64", "U3ViamVjdDogeA=="),
              ("Content-Type: text/plain", "Content-Transfer-Encoding: base64\n\n" + MZ)]), {}, None),
    # spamcontrol compares the start of the value: comments and parameters count
    ("CTE with a comment", message([("Content-Transfer-Encoding: base64 (binary)", MZ)]), {},
     ("badmimetypes", 10)),
    ("CTE with a leading comment", message([("Content-Transfer-Encoding: (x) BASE64", MZ)]), {},
     ("badmimetypes", 10)),
    ("CTE base64;", message([("Content-Transfer-Encoding: base64;", MZ)]), {}, ("badmimetypes", 10)),
    # a part with headers and no body: its encoding dies at the next boundary
    ("headers without a body, then a text part",
     b"Content-Type: multipart/mixed; boundary=XX\n\n--XX\nContent-Transfer-Encoding: base64\n"
     b"--XX\nContent-Type: text/plain\n\n" + MZ.encode() + b"\n--XX--\n", {}, None),
    # the first hit in message order is reported, however the data is split
    ("mime signature and loader in one first line",
     message([("Content-Transfer-Encoding: base64", "TVqQAAMAAMi5kbAAAA")]), {}, ("badmimetypes", 10)),
    ("loader before whitespace", message([("Content-Transfer-Encoding: base64", "AAMi5kb AAAA")]),
     {"strict_whitespace": True}, ("badloadertypes", 20)),
    ("whitespace before loader", message([("Content-Transfer-Encoding: base64", "AAAA\nAA AAMi5kb")]),
     {"strict_whitespace": True}, ("badmimetypes", -1)),
    # BADLOADERTYPE=c: only windows starting with c (docs/behaviour/smtp.md#content-checks)
    ("loader with its first character", message([("Content-Transfer-Encoding: base64", "AAAAMzIuZA")]),
     {"loader_first": ord("M")}, ("badloadertypes", 21)),
    ("loader with another first character", message([("Content-Transfer-Encoding: base64", "AAAAMzIuZA")]),
     {"loader_first": ord("T")}, None),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name,data,kw,expect", CASES, ids=[c[0] for c in CASES])
def test_scanner(name, data, kw, expect, bytewise):
    assert scan(data, bytewise, **kw) == expect


def test_long_lines_keep_boundaries_and_signatures():
    # an over-long body line is carried capped, yet the next boundary and a
    # loader signature at its end are still seen (chunked feed)
    body = "A" * 20000 + "Mi5kb\n"
    data = message([("Content-Type: text/plain", "x" * 30000),
                    ("Content-Transfer-Encoding: base64", body)])
    s = ContentScanner(MIME, LOADER)
    for i in range(0, len(data), 4096):
        s.feed(data[i:i + 4096])
    s.finish()
    assert s.hit == ("badloadertypes", 20)


def test_inactive_without_automata():
    s = ContentScanner(None, None)
    assert not s.active
    s.feed(message([("Content-Transfer-Encoding: base64", MZ)]))
    assert s.hit is None


def test_whitespace_check_needs_no_signature_list():
    # docs/behaviour/tcp-smtp.md#settings: BADMIMETYPE="!" is a check of its own
    s = ContentScanner(None, None, strict_whitespace=True)
    assert s.active
    s.feed(message([("Content-Transfer-Encoding: base64", "AAAA\tAAAA")]))
    s.finish()
    assert s.hit == ("badmimetypes", -1)


def test_loader_first_character_skips_other_windows():
    # a list entry that does not begin with c is never looked up; the search
    # goes on past it to one that does
    loader = core.AhoCorasick(core.aho_build([b"Mi5kb", b"TVqQA"], [20, 22], False))
    data = message([("Content-Transfer-Encoding: base64", "AATVqQAxxMi5kbAA")])
    for first, want in ((ord("M"), ("badloadertypes", 20)), (ord("T"), ("badloadertypes", 22)),
                        (ord("Z"), None), (None, ("badloadertypes", 22))):
        s = ContentScanner(None, loader, loader_first=first)
        s.feed(data)
        s.finish()
        assert s.hit == want, first


def test_signature_in_the_middle_of_an_overlong_base64_line():
    body = "A" * 10000 + "MzIuZ" + "A" * 10000 + "\n"
    data = message([("Content-Transfer-Encoding: base64", body)])
    s = ContentScanner(MIME, LOADER)
    for i in range(0, len(data), 4096):
        s.feed(data[i:i + 4096])
    s.finish()
    assert s.hit == ("badloadertypes", 21)


class _LineByLine(ContentScanner):
    """The reference for the bulk header path: every header line through
    _header_line, as the scanner did before header blocks went in bulk."""
    __slots__ = ()

    def _header_block(self, data, pos, end):
        while pos < end:
            nl = data.find(b"\n", pos, end)
            self._header_line(data[pos:nl])
            pos = nl + 1
            if self._mode != 0:          # HEADER left: the empty line was seen
                break
        return pos


_HEADER_LINES = [b"Subject: x", b"Content-Transfer-Encoding: base64", b"content-transfer-encoding:",
                 b" base64", b"\tBASE64", b" quoted-printable", b"Content-Transfer-Encoding: 7bit",
                 b"X-Long: aaaa", b"Content-Transfer-Encoding: base64\r", b"Content-Type: a/b", b"\r",
                 b"Content-Type: message/rfc822", b"Content-Transfer-Encoding: base64 (c)", b"--XX"]
_BODY_LINES = [MZ.encode()[:40], b"AAAAMzIuZAAAA", b"AAAA AAAA", b"plain text", b"", b"--XX",
               b"--XX--", b"Mi5kbAAAA", b"\r"]


@pytest.mark.parametrize("seed", range(300))
def test_bulk_headers_equal_line_by_line(seed):
    """Differential, seeded: random header blocks (folded CTE lines, CR line
    ends, empty lines) and bodies, fed whole and in random chunks."""
    import random
    rnd = random.Random(seed)
    lines = []
    for _ in range(rnd.randint(1, 4)):
        lines += [rnd.choice(_HEADER_LINES) for _ in range(rnd.randint(0, 6))]
        lines.append(b"")
        lines += [rnd.choice(_BODY_LINES) for _ in range(rnd.randint(0, 5))]
        lines.append(b"--XX")
    data = b"\n".join(lines) + (b"\n" if rnd.random() < 0.8 else b"")
    kw = {"strict_whitespace": rnd.random() < 0.3}
    cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(0, 12))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    for feed in ([data], chunks):
        got, ref = ContentScanner(MIME, LOADER, **kw), _LineByLine(MIME, LOADER, **kw)
        for c in feed:
            got.feed(c)
            ref.feed(c)
        got.finish()
        ref.finish()
        assert got.hit == ref.hit, (data, feed)


def test_continuation_after_a_bulk_block_joins_that_blocks_last_line():
    # chunk 2 holds no CTE line and goes in bulk; the continuation in chunk 3
    # belongs to its "Subject" line, not to the CTE line of chunk 1
    chunks = [b"Content-Transfer-Encoding:\n", b"Subject: x\n", b" base64\n\n" + MZ.encode() + b"\n"]
    for cls in (ContentScanner, _LineByLine):
        s = cls(MIME, LOADER)
        for c in chunks:
            s.feed(c)
        s.finish()
        assert s.hit is None, cls
    s = ContentScanner(MIME, LOADER)
    for c in (chunks[0], chunks[2]):      # without the Subject line the fold is the CTE value
        s.feed(c)
    s.finish()
    assert s.hit == ("badmimetypes", 10)


def test_a_later_content_type_in_another_chunk_still_counts():
    """`Content-Type: message/rfc822`, then (in a later chunk, passed in
    bulk) `Content-Type: multipart/mixed`: the last one decides, so the body
    is no message and its `Content-Transfer-Encoding` line is body text. The
    bulk path skipped the second line and the verdict depended on the split."""
    msg = (b"Content-Type: message/rfc822\nX-Foo: bar\n"
           b"Content-Type: multipart/mixed; boundary=b\n\n"
           b"Content-Transfer-Encoding: base64\n\n" + MZ.encode() + b"\n")
    for cut in range(len(msg) + 1):
        s = ContentScanner(MIME, LOADER)
        s.feed(msg[:cut])
        s.feed(msg[cut:])
        s.finish()
        assert s.hit is None, cut
