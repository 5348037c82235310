"""TLS to the next hop (smtp:/lmtp:, RFC 3207): real sockets on 127.0.0.1,
a fake next hop doing real TLS with certificates made here, both loops.

What each test pins: opportunistic STARTTLS when offered (EHLO/LHLO again
inside TLS, the new extensions used), clear when not offered,
+tls-required refusing clear, verification (CA file, host name, IP SAN,
expiry), every way an offered STARTTLS can fail being a 451 with no
cleartext fallback, and from_spec's handling of the TLS options.
"""
from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from mailfilter.delivery import Delivery, LmtpDelivery, SmtpDelivery
from mailfilter.delivery.forward import NO_TLS, TLS_FAILED
from tests.delivery.test_delivery import MSG, deliver, env
from tests.delivery.tls_certs import CA, server_context
from tests.support.smtp_peer import Peer

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a runtime dependency
    uvloop = None

LOOPS = {"asyncio": asyncio.new_event_loop}
if uvloop is not None:
    LOOPS["uvloop"] = uvloop.new_event_loop


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """docs/architecture.md#tests-and-benches: every test on both event loops."""
    def run(coro, timeout: float = 30):
        async def bounded():
            return await asyncio.wait_for(coro, timeout)
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(bounded())
    return run


@pytest.fixture
def ca(tmp_path):
    return CA(str(tmp_path))


@pytest.fixture
def peer_tls(ca):
    """The next hop's context: a certificate for 127.0.0.1 and localhost."""
    return server_context(*ca.issue("peer", dns=("localhost",), ips=("127.0.0.1",)))


async def forward(script, lmtp=False, *, tls=None, kind=None, host="127.0.0.1",
                  strict=False, messages=1, **opts):
    kind = kind or ("lmtp" if lmtp else "smtp")
    async with Peer(script, lmtp=lmtp, strict=strict, tls=tls) as peer:
        d = Delivery.from_spec(f"{kind}:{host}:{peer.port}", **opts)
        results = [await deliver(d, env(), MSG) for _ in range(messages)]
        await d.close()
        return (results[0] if messages == 1 else results), peer.sessions


HELLO = {False: "EHLO mx.test", True: "LHLO mx.test"}
BOTH = pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])


# ---------------------------------------------------------------------------
# opportunistic (the default)
# ---------------------------------------------------------------------------

@BOTH
def test_starttls_used_when_offered_and_hello_repeated(run, peer_tls, lmtp):
    res, (s,) = run(forward({}, lmtp, tls=peer_tls))
    assert res.ok and res.reply.code == 250, res.detail
    assert s.tls is not None and s.tls.startswith("TLSv1.")
    assert s.commands[:4] == [HELLO[lmtp], "STARTTLS", HELLO[lmtp], "MAIL FROM:<a@example.com>"]
    assert s.message == MSG
    # the log detail names the TLS the peer saw; not verified: nothing was checked
    assert res.detail.startswith(f"{'lmtp' if lmtp else 'smtp'} 127.0.0.1:")
    assert f" {s.tls} eod 2" in res.detail and "verified" not in res.detail


@BOTH
def test_clear_when_not_offered(run, lmtp):
    res, (s,) = run(forward({}, lmtp))
    assert res.ok, res.detail
    assert "STARTTLS" not in s.commands and s.tls is None
    assert " clear eod 2" in res.detail


@pytest.mark.parametrize("cert", ["other CA, other name", "expired"])
def test_opportunistic_takes_any_certificate(run, tmp_path, cert):
    """RFC 7435: without verification an invalid certificate still gives
    an encrypted hand-over (better than clear)."""
    other = CA(str(tmp_path), name="unknown CA")
    if cert == "expired":
        pair = other.issue("old", ips=("127.0.0.1",), expired=True)
    else:
        pair = other.issue("wrong", dns=("somewhere.else.test",))
    res, (s,) = run(forward({}, tls=server_context(*pair)))
    assert res.ok and s.tls is not None and s.message == MSG, res.detail


@pytest.mark.parametrize("before,after,want", [
    # offered only inside TLS: used
    ("250 peer.test", "250-peer.test\r\n250-8BITMIME\r\n250 SIZE 1000000", " SIZE="),
    # offered only before TLS: forgotten (the strict peer answers 555 to it)
    ("250-peer.test\r\n250-8BITMIME\r\n250 SIZE 1000000", "250 peer.test", ""),
])
def test_extensions_are_the_ones_offered_inside_tls(run, peer_tls, before, after, want):
    """RFC 3207 §4.2: the client discards what it learnt before TLS."""
    res, (s,) = run(forward({"ehlo": before, "ehlo_tls": after}, tls=peer_tls, strict=True))
    assert res.ok, (str(res.reply), res.detail)
    mail = next(c for c in s.commands if c.startswith("MAIL"))
    assert (want in mail) if want else mail == "MAIL FROM:<a@example.com>"


# ---------------------------------------------------------------------------
# +tls-required
# ---------------------------------------------------------------------------

@BOTH
def test_tls_required_refuses_clear(run, lmtp):
    kind = "lmtp+tls-required" if lmtp else "smtp+tls-required"
    res, (s,) = run(forward({}, lmtp, kind=kind))
    assert not res.ok and res.reply == NO_TLS and str(res.reply).startswith("451 4.7.0 ")
    assert s.commands == [HELLO[lmtp], "QUIT"]       # nothing of the message went out
    assert "STARTTLS not offered" in res.detail


@BOTH
def test_tls_required_works_with_tls(run, peer_tls, lmtp):
    kind = "lmtp+tls-required" if lmtp else "smtp+tls-required"
    res, (s,) = run(forward({}, lmtp, tls=peer_tls, kind=kind))
    assert res.ok and s.tls is not None and s.message == MSG, res.detail
    assert s.commands[:3] == [HELLO[lmtp], "STARTTLS", HELLO[lmtp]]


def test_tls_required_kinds_and_spec():
    s = Delivery.from_spec("smtp+tls-required:mx.example:25")
    assert isinstance(s, SmtpDelivery) and not s.lmtp and s.tls_required and not s.tls_verify
    assert s.spec == "smtp+tls-required:mx.example:25"
    l6 = Delivery.from_spec("lmtp+tls-required:[::1]:24")
    assert isinstance(l6, LmtpDelivery) and l6.lmtp and l6.tls_required
    assert l6.spec == "lmtp+tls-required:[::1]:24"
    assert not Delivery.from_spec("smtp:mx.example:25").tls_required
    with pytest.raises(ValueError, match=r"expected smtp\+tls-required:HOST:PORT"):
        Delivery.from_spec("smtp+tls-required:mx.example")


# ---------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------

@BOTH
def test_verify_with_the_right_ca(run, ca, peer_tls, lmtp):
    res, (s,) = run(forward({}, lmtp, tls=peer_tls, tls_ca=ca.file))
    assert res.ok and s.message == MSG, res.detail
    assert f" {s.tls} verified eod 2" in res.detail


def test_verify_by_dns_name(run, ca, peer_tls):
    """HOST is a name: checked against the DNS subjectAltName."""
    res, (s,) = run(forward({}, tls=peer_tls, tls_ca=ca.file, host="localhost"))
    assert res.ok and s.tls is not None, res.detail


@BOTH
def test_verify_with_a_wrong_ca_is_451(run, tmp_path, peer_tls, lmtp):
    other = CA(str(tmp_path), name="some other CA")
    res, sessions = run(forward({}, lmtp, tls=peer_tls, tls_ca=other.file))
    assert not res.ok and res.reply == TLS_FAILED and str(res.reply).startswith("451 4.7.0 ")
    assert "certificate verify failed: unable to get local issuer certificate" in res.detail
    (s,) = sessions                                 # no second, cleartext attempt
    assert s.tls is None and s.commands == [HELLO[lmtp], "STARTTLS"] and s.message == b""


@pytest.mark.parametrize("names,host,why", [
    ({"dns": ("mx.other.test",)}, "127.0.0.1", "IP address mismatch"),
    # an IP address is matched against the iPAddress SAN only, never a DNS name
    ({"dns": ("127.0.0.1",)}, "127.0.0.1", "IP address mismatch"),
    ({"ips": ("127.0.0.1",)}, "localhost", "Hostname mismatch"),
])
@BOTH
def test_verify_host_name_mismatch_is_451(run, ca, lmtp, names, host, why):
    tls = server_context(*ca.issue("mismatch", **names))
    res, (s,) = run(forward({}, lmtp, tls=tls, tls_ca=ca.file, host=host))
    assert not res.ok and res.reply == TLS_FAILED
    assert why in res.detail and "starttls: certificate verify failed" in res.detail
    assert s.message == b"" and "MAIL FROM:<a@example.com>" not in s.commands


def test_verify_expired_is_451(run, ca):
    tls = server_context(*ca.issue("old", ips=("127.0.0.1",), expired=True))
    res, (s,) = run(forward({}, tls=tls, tls_ca=ca.file))
    assert res.reply == TLS_FAILED and "certificate has expired" in res.detail
    assert s.message == b""


def test_verify_against_the_system_store(run, peer_tls):
    """tls_verify=True: the system store, which does not know our test CA."""
    res, (s,) = run(forward({}, tls=peer_tls, tls_verify=True))
    assert res.reply == TLS_FAILED and "certificate verify failed" in res.detail
    assert s.message == b""


@BOTH
def test_verification_implies_tls_required(run, ca, lmtp):
    """Checking certificates but sending in clear when STARTTLS is missing
    would let whoever strips STARTTLS read the mail: refused."""
    res, (s,) = run(forward({}, lmtp, tls_ca=ca.file))
    assert res.reply == NO_TLS and s.commands == [HELLO[lmtp], "QUIT"]


# ---------------------------------------------------------------------------
# STARTTLS offered, then failing: 451, never clear
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("action,why", [
    ("454 4.7.0 TLS not available due to temporary reason", "starttls: 454 4.7.0 TLS not available"),
    ("502 5.5.1 changed my mind", "starttls: 502 5.5.1 changed my mind"),
    ("break", "starttls: "),                 # OpenSSL's reason, e.g. WRONG_VERSION_NUMBER
    ("close", "starttls: connection closed by next hop"),
    ("stall", "starttls: handshake timed out"),
    ("inject", "starttls: next hop sent data after its 220 to STARTTLS"),
])
@BOTH
def test_offered_starttls_failing_is_451_without_fallback(run, peer_tls, lmtp, action, why):
    res, sessions = run(forward({"starttls": action}, lmtp, tls=peer_tls,
                                connect_timeout=0.5))
    assert not res.ok and res.reply == TLS_FAILED, res.detail
    assert why in res.detail
    (s,) = sessions                      # one connection: no retry in clear
    assert s.commands[:2] == [HELLO[lmtp], "STARTTLS"]
    assert not any(c.startswith(("MAIL", "RCPT", "DATA")) for c in s.commands)
    assert s.message == b"" and s.tls is None


def test_injected_reply_is_never_read(run, peer_tls):
    """The `250 injected` behind the 220 would have been taken for the
    reply to the EHLO inside TLS: refused before the handshake starts."""
    res, (s,) = run(forward({"starttls": "inject"}, tls=peer_tls))
    assert res.reply == TLS_FAILED and "injected" in res.detail
    assert s.tls is None and s.tls_error is not None   # the peer's handshake never completed


# ---------------------------------------------------------------------------
# the context and from_spec's options
# ---------------------------------------------------------------------------

def test_one_client_context_per_delivery(run, peer_tls, ca):
    d = Delivery.from_spec("smtp:127.0.0.1:25", tls_ca=ca.file)
    ctx = d.tls_context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    plain = Delivery.from_spec("smtp:127.0.0.1:25").tls_context
    assert plain.verify_mode == ssl.CERT_NONE and not plain.check_hostname
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    # two messages through one Delivery: the same context, both in TLS
    (r1, r2), sessions = run(forward({}, tls=peer_tls, tls_ca=ca.file, messages=2))
    assert r1.ok and r2.ok and [s.tls is not None for s in sessions] == [True, True]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_peer_offering_only_tls_1_1_is_refused(run, ca):
    pair = ca.issue("legacy", ips=("127.0.0.1",))
    tls = server_context(*pair)
    tls.minimum_version = ssl.TLSVersion.TLSv1
    tls.maximum_version = ssl.TLSVersion.TLSv1_1
    tls.set_ciphers("DEFAULT:@SECLEVEL=0")       # let the peer speak TLS 1.1 at all
    res, (s,) = run(forward({}, tls=tls))
    assert res.reply == TLS_FAILED and s.tls is None and s.message == b""


@pytest.mark.parametrize("kind", ["smtp", "lmtp", "smtp+tls-required", "lmtp+tls-required"])
def test_from_spec_takes_the_tls_options_for_forwarding(ca, kind):
    d = Delivery.from_spec(f"{kind}:127.0.0.1:25", tls_verify=True)
    assert d.tls_verify and d.tls_required
    d = Delivery.from_spec(f"{kind}:127.0.0.1:25", tls_ca=ca.file)
    assert d.tls_verify and d.tls_required


@pytest.mark.parametrize("spec", ["maildir:/nonexistent/md", "qmail-queue:/bin/true", "discard"])
@pytest.mark.parametrize("option,value", [("tls_verify", True), ("tls_ca", "/etc/ca.pem")])
def test_from_spec_refuses_tls_options_elsewhere(spec, option, value):
    with pytest.raises(ValueError, match=f"option {option} is for smtp: and lmtp:"):
        Delivery.from_spec(spec, **{option: value})
    # left unset (None/False) they are dropped: a config layer passes them always
    assert Delivery.from_spec(spec, **{option: None if option == "tls_ca" else False})


def test_unreadable_ca_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match=f"tls_ca {tmp_path}/missing.pem: cannot load"):
        Delivery.from_spec("smtp:127.0.0.1:25", tls_ca=f"{tmp_path}/missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"tls_ca {junk}"):
        Delivery.from_spec("smtp:127.0.0.1:25", tls_ca=str(junk))


# ---------------------------------------------------------------------------
# another implementation as the next hop: aiosmtpd with STARTTLS required
# ---------------------------------------------------------------------------

def test_interop_with_aiosmtpd_requiring_starttls(run, ca, tmp_path):
    """Our client against a server we did not write (aiosmtpd, the bench
    extra): its STARTTLS, its 530 before TLS, verified by our CA file."""
    controller_mod = pytest.importorskip("aiosmtpd.controller")

    class Keep:
        def __init__(self):
            self.got = []

        async def handle_DATA(self, server, session, envelope):
            self.got.append((envelope.mail_from, envelope.rcpt_tos, envelope.content,
                             session.ssl is not None))
            return "250 2.0.0 kept"

    with socket.socket() as s:          # a free port (aiosmtpd's Controller needs one)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keep = Keep()
    tls = server_context(*ca.issue("aio", ips=("127.0.0.1",)))
    ctl = controller_mod.Controller(keep, hostname="127.0.0.1", port=port, tls_context=tls,
                                    require_starttls=True, server_hostname="aio.test")
    ctl.start()
    try:
        d = Delivery.from_spec(f"smtp+tls-required:127.0.0.1:{port}", tls_ca=ca.file)
        res = run(deliver(d, env(), MSG))
    finally:
        ctl.stop()
    assert res.ok, (str(res.reply), res.detail)
    assert " verified eod 250 kept" in res.detail and " TLSv1." in res.detail
    ((sender, rcpts, content, in_tls),) = keep.got
    assert (sender, rcpts, in_tls) == ("a@example.com", ["b@example.org"], True)
    assert content.replace(b"\r\n", b"\n") == MSG
