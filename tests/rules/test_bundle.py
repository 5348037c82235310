"""The bundle file (docs/architecture.md#the-rule-bundle): round trip through a real
file and mmap, and refusal of truncated, corrupt and wrong-version bundles."""
import os
import re
import struct

import pytest

from mailfilter.rules import bundle as bm
from mailfilter.rules import compiler
from mailfilter.rules.format import MODE_ADDRESS

RULES = os.path.join(os.path.dirname(__file__), "golden", "spamcontrol", "rules")


@pytest.fixture(scope="module")
def compiled():
    return compiler.compile_dir(RULES)


@pytest.fixture
def written(compiled, tmp_path):
    path = str(tmp_path / "rules.mfb")
    size = bm.write(compiled, path)
    assert os.path.getsize(path) == size
    return path


def test_round_trip_same_answers(compiled, written):
    mem = bm.from_compiled(compiled)
    disk = bm.load(written)
    assert disk.n_rules == mem.n_rules == compiled.n_rules
    assert disk.fingerprint == compiled.fingerprint
    assert disk.section_sizes() == mem.section_sizes()
    queries = [b"spammer@example.org", b"x@spam.example.org", b"boss@freemail.example",
               b"anyone@freemail.example", b"nobody@nowhere.example", b""]
    for q in queries:
        assert (disk.lists["badmailfrom"].last_match(q, MODE_ADDRESS)
                == mem.lists["badmailfrom"].last_match(q, MODE_ADDRESS))
    rid = disk.lists["badmailfrom"].last_match(b"spammer@example.org", MODE_ADDRESS)
    assert disk.where(rid) == "badmailfrom:2"
    assert disk.rule(rid).kind == "exact"


def test_fingerprint_tracks_sources(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "rcpthosts").write_text("example.com\n")
    fp1 = compiler.compile_dir(str(d)).fingerprint
    (d / "rcpthosts").write_text("example.net\n")
    fp2 = compiler.compile_dir(str(d)).fingerprint
    assert fp1 != fp2


def test_load_is_repeatable(written):
    # SIGHUP reload: loading again gives a new, independent bundle.
    a = bm.load(written)
    b = bm.load(written)
    assert a is not b and a.lists["badmailfrom"] is not b.lists["badmailfrom"]


def corrupt(path, offset, data):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_truncated_refused(written):
    data = open(written, "rb").read()
    for cut in (0, 10, 127, 200, len(data) - 1):
        with open(written, "wb") as fh:
            fh.write(data[:cut])
        with pytest.raises(bm.BundleError) as exc:
            bm.load(written)
        assert written in str(exc.value)
        msg = str(exc.value)
        assert ("truncated" in msg) or ("empty file" in msg)


def test_bad_magic_refused(written):
    corrupt(written, 0, b"NOTABUND")
    with pytest.raises(bm.BundleError, match="not a mailfilter rule bundle"):
        bm.load(written)


def test_wrong_version_refused(written):
    corrupt(written, 8, struct.pack("<I", bm.FORMAT_VERSION + 1))
    with pytest.raises(bm.BundleError, match="recompile with `mailfilter compile`"):
        bm.load(written)


@pytest.mark.parametrize("old", [3, 4])
def test_older_formats_refused(written, old):
    # format 3 stored regex filters derived from Python's reading of RE2
    # patterns (`[[:digit:]]x` got the literal "]x"); format 4 stored wildmat
    # sets folded at compile time (`[0-Z]` became `[0-z]`): never load either
    assert bm.FORMAT_VERSION >= 5
    corrupt(written, 8, struct.pack("<I", old))
    with pytest.raises(bm.BundleError) as exc:
        bm.load(written)
    assert f"bundle format version {old}" in str(exc.value)
    assert "recompile with `mailfilter compile`" in str(exc.value)


def test_flipped_payload_byte_refused(written):
    size = os.path.getsize(written)
    for offset in (128, size // 2, size - 1):
        data = bytearray(open(written, "rb").read())
        data[offset] ^= 0x40
        with open(written, "wb") as fh:
            fh.write(bytes(data))
        with pytest.raises(bm.BundleError, match="checksum mismatch"):
            bm.load(written)
        data[offset] ^= 0x40
        with open(written, "wb") as fh:
            fh.write(bytes(data))
        bm.load(written)   # restored: loads again


@pytest.mark.parametrize("old,new", [(b'"scalars"', b'"scalarz"'), (b'"files"', b'"filez"')])
def test_malformed_metadata_with_a_good_checksum_refused(written, tmp_path, old, new):
    """A CRC proves only that the file is as written: a hand-made bundle with
    a renamed or mistyped meta key is refused with BundleError (it used to
    load and fail later with a KeyError traceback)."""
    import struct
    import zlib
    data = bytearray(open(written, "rb").read())
    h = bm.HEADER.size
    for i in range(struct.unpack_from("<I", data, 16)[0]):
        name, off, length = bm.TOC_ENTRY.unpack_from(data, h + i * bm.TOC_ENTRY.size)
        if name.rstrip(b"\0") == b"meta":
            blob = bytes(data[off:off + length])
            assert old in blob and len(old) == len(new)
            data[off:off + length] = blob.replace(old, new, 1)
    struct.pack_into("<I", data, 32, zlib.crc32(data[h:]))
    bad = tmp_path / "crafted.mfb"
    bad.write_bytes(data)
    with pytest.raises(bm.BundleError, match="malformed metadata"):
        bm.load(str(bad))


def test_written_bundle_has_the_umask_mode(compiled, tmp_path):
    """Not mkstemp's 0600: a server running as another user reads it."""
    old = os.umask(0o027)
    try:
        bm.write(compiled, str(tmp_path / "u.mfb"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "u.mfb").st_mode & 0o777 == 0o640


def test_missing_file(tmp_path):
    with pytest.raises(bm.BundleError, match="cannot open bundle"):
        bm.load(str(tmp_path / "nope.mfb"))


def test_write_is_atomic(compiled, tmp_path):
    # the old bundle stays intact until the new one is complete (rename)
    path = str(tmp_path / "b.mfb")
    bm.write(compiled, path)
    before = open(path, "rb").read()
    bm.write(compiled, path)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".bundle-")] == []
    assert open(path, "rb").read()[:8] == before[:8] == bm.MAGIC


def test_loaded_bundle_survives_the_file_being_overwritten_in_place(written):
    # `cp new.mfb rules.mfb` truncates and rewrites the same inode; a
    # file-backed map would fault (SIGBUS) at the next lookup. load() reads
    # the file into anonymous memory, so the loaded rules keep answering.
    b = bm.load(written)
    m = b.lists["badmailfrom"]
    before = m.last_match(b"spammer@example.org", MODE_ADDRESS)
    with open(written, "r+b") as fh:
        fh.truncate(0)
    assert m.last_match(b"spammer@example.org", MODE_ADDRESS) == before >= 0
    assert b.where(before) == "badmailfrom:2"
    with pytest.raises(bm.BundleError, match="empty file"):
        bm.load(written)


def _sections(data):
    """name -> (offset, length) of every section, plus the table of contents."""
    h = bm.HEADER.size
    out = {}
    for i in range(struct.unpack_from("<I", data, 16)[0]):
        name, off, length = bm.TOC_ENTRY.unpack_from(data, h + i * bm.TOC_ENTRY.size)
        out[name.rstrip(b"\0").decode()] = (off, length)
    out["<toc>"] = (h, len(out) * bm.TOC_ENTRY.size)
    return out


def _write_with_good_crc(path, data):
    """A damaged bundle whose checksum was recomputed (a hand-made or
    mis-written bundle): only the loader's own checks stand between it and
    the server."""
    import zlib
    struct.pack_into("<I", data, 32, zlib.crc32(data[bm.HEADER.size:]))
    with open(path, "wb") as fh:
        fh.write(bytes(data))


@pytest.mark.parametrize("section,at,junk", [
    ("meta", 0, b"\xff\xfe"),                 # not UTF-8: json's UnicodeDecodeError
    ("meta", 1, b"\xc3"),                     # a cut multi-byte character
    ("<toc>", 0, b"\xff"),                    # a section name that is not UTF-8
    ("<toc>", 40, b"\xff" * 8),               # a section length past the end
    ("rules", 0, b"\xff" * 4),                # a file index past the file list
    ("L:badmailfrom", 0, b"\xff" * 16),       # a matcher header
])
def test_every_load_error_starts_with_the_bundle_path(written, tmp_path, section, at, junk):
    """docs/architecture.md#the-rule-bundle: a bad bundle is a BundleError that
    says which file; a corrupted section name used to surface as a bare
    `'utf-8' codec can't decode ...` with no path at all."""
    data = bytearray(open(written, "rb").read())
    off, _ = _sections(data)[section]
    data[off + at:off + at + len(junk)] = junk
    bad = str(tmp_path / "damaged.mfb")
    _write_with_good_crc(bad, data)
    try:
        b = bm.load(bad)
    except bm.BundleError as exc:
        assert str(exc).startswith(bad + ": "), str(exc)
    else:
        # the rule table is not checked at load; its lookups still must not
        # name a file the bundle does not have
        assert section == "rules"
        with pytest.raises(bm.BundleError, match="^" + re.escape(bad)):
            b.rule(0)


def test_random_damage_with_a_good_checksum_always_names_the_file(written, tmp_path):
    """A bounded fuzz (a few hundred loads): whatever bytes of whatever
    section are damaged, load() either works or raises a BundleError that
    starts with the path."""
    import random
    rnd = random.Random(16)
    clean = bytearray(open(written, "rb").read())
    bad = str(tmp_path / "fuzzed.mfb")
    for section, (off, length) in sorted(_sections(clean).items()):
        for _ in range(40):
            data = bytearray(clean)
            for _ in range(rnd.choice((1, 3, 8))):
                data[off + rnd.randrange(length)] = rnd.randrange(256)
            _write_with_good_crc(bad, data)
            try:
                bm.load(bad)
            except bm.BundleError as exc:
                assert str(exc).startswith(bad + ": "), (section, str(exc))
