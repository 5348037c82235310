"""Bounded fuzz of the sans-IO Session (docs/reliability.md#engine-fuzz).

Seeded random byte streams (commands, pipelining, DATA with dots, bare LF
and CR, long lines, AUTH exchanges, STARTTLS, garbage) are fed to
mailfilter/smtp/session.py's Session, once whole and once in random
fragments, by a shell played here (as in tests/smtp/test_session.py: every
request fulfilled by hand, DNS answered, delays and TLS handshakes taken as
done). For every stream: no exception escapes, every request is one of the
six the module documents, every output line is an SMTP reply (RFC 5321
§4.2), and both feeds give the same replies (queue ids, time stamps and
CRAM-MD5 challenges aside; after a STARTTLS handshake only up to its 220,
since bytes pipelined behind STARTTLS are discarded, RFC 3207 §4.2).

Bounded by RELIABILITY_FUZZ_STREAMS (default 20,000) and
RELIABILITY_FUZZ_SECONDS (default 150); RELIABILITY_SEED picks the streams.
"""
from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import ssl
import time
import zlib

import pytest

from mailfilter.auth.session import AuthConfig, AuthService
from mailfilter.auth.verify import Result, Verdict
from mailfilter.delivery import Delivery
from mailfilter.policy.engine import DNS_FAIL, DNS_OK, Client
from mailfilter.smtp.replies import REPLIES
from mailfilter.smtp.session import (
    AuthStep, AwaitLookups, Commit, Delay, Handshake, Lookup, Session, SessionConfig,
)
from mailfilter.tls import NO_TLS, TLSSettings
from tests.support.server_harness import (
    BASE_RULES, CONTENT, HELO_A, MFDNS, PLAIN, RELAY, SMALL, TARPIT, policy_for, write_rules,
)

pytestmark = pytest.mark.slow

STREAMS = int(os.environ.get("RELIABILITY_FUZZ_STREAMS", "20000"))
SECONDS = float(os.environ.get("RELIABILITY_FUZZ_SECONDS", "150"))
SEED = int(os.environ.get("RELIABILITY_SEED", "16"))

AUTH_IP = "127.0.0.12"
CLIENT_IPS = (PLAIN, RELAY, TARPIT, HELO_A, MFDNS, CONTENT, SMALL, AUTH_IP)
REQUESTS = (Lookup, AwaitLookups, Delay, Commit, AuthStep, Handshake)
REPLY_LINE = re.compile(rb"^[2-5]\d\d([ -].*)?$", re.S)
STARTTLS_GO = str(REPLIES["starttls_go"]).encode() + b"\r\n"
VARIABLE = [(re.compile(rb"ok \d+ qp \S+\r"), b"ok N qp N\r"),          # queued: stamp, qid
            (re.compile(rb"^334 \S+\r$", re.M), b"334 X\r")]             # CRAM-MD5 challenge


class Verifier:
    """tim is the one user; any secret passes (the fuzz is about the dialogue)."""

    async def verify(self, creds, env=None):
        return Verdict(Result.OK if creds.user == "tim" else Result.FAIL, "fuzz")

    def close(self):
        pass


# ------------------------------------------------------------ stream generator
ADDRS = ["user@example.com", "u2@example.com", "x@far.test", "", "postmaster", "u%o.test@example.com",
         '"a b"@example.com', "@a,@b:user@example.com", "u@[127.0.0.1]", "spammer@example.org",
         "noreply@example.net", "a@b.invalid", "ü@example.com", "x" * 300 + "@example.com"]
PARAMS = ["", " SIZE=100", " SIZE=99999999999", " BODY=8BITMIME", " SMTPUTF8", " AUTH=<>", " FOO=bar",
          " SIZE=", " BODY=BINARYMIME"]


def b64(s: bytes) -> str:
    return base64.b64encode(s).decode()


def command(rng: random.Random) -> bytes:
    k = rng.randrange(22)
    if k < 2:
        return f"{rng.choice(['HELO', 'EHLO', 'ehlo', 'helo'])} {rng.choice(['c.test', 'nx.test', '', '[1.2.3.4]', 'a' * 70])}".encode()
    if k < 5:
        return f"MAIL FROM:<{rng.choice(ADDRS)}>{rng.choice(PARAMS)}".encode()
    if k < 9:
        return f"RCPT TO:<{rng.choice(ADDRS)}>{rng.choice(['', ' NOTIFY=NEVER', ' X'])}".encode()
    if k < 11:
        return rng.choice([b"RSET", b"NOOP", b"VRFY u", b"HELP", b"EXPN x", b"QUIT" if rng.random() < .2 else b"NOOP"])
    if k < 12:
        return b"STARTTLS"
    if k < 15:
        return rng.choice(["AUTH PLAIN " + b64(b"\0tim\0pw"), "AUTH PLAIN " + b64(b"\0eve\0x"),
                           "AUTH PLAIN", "AUTH LOGIN", f"AUTH LOGIN {b64(b'tim')}", "AUTH CRAM-MD5",
                           "AUTH X", "*", b64(b"tim"), b64(b"pw"), "!!notbase64", b64(b"tim 0123abcd")]).encode()
    if k < 17:
        return b"DATA"
    if k < 18:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))
    if k < 19:
        return b"X" * rng.choice([510, 511, 512, 1000, 1024, 5000])
    if k < 20:
        return b""
    return rng.choice([b"BDAT 10 LAST", b"ETRN x", b"TURN", b"MAIL", b"RCPT", b"MAIL FROM:", b"RCPT TO:<>"])


def body(rng: random.Random) -> bytes:
    """Message lines with dots, bare LF/CR, long lines; usually the end of data."""
    parts = [b"Subject: fuzz\r\n\r\n"] if rng.random() < .7 else []
    for _ in range(rng.randrange(8)):
        parts.append(rng.choice([b"text\r\n", b"..dot\r\n", b".\r\n" if rng.random() < .1 else b"x\r\n",
                                 b"bare lf\n", b"bare cr\r", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n",
                                 b"y" * rng.choice([100, 998, 1001, 3000]) + b"\r\n",
                                 b"Content-Type: application/x\r\n\r\nTVqQAAMAA\r\n", b"\x00\xff\r\n"]))
    if rng.random() < .85:
        parts.append(b".\r\n")
    return b"".join(parts)


def stream(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randrange(1, 16)):
        line = command(rng)
        out.append(line + rng.choices([b"\r\n", b"\n", b"\r", b""], [90, 5, 3, 2])[0])
        if line == b"DATA" and rng.random() < .8:
            out.append(body(rng))
    return b"".join(out)


def fragments(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 12)))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


# ------------------------------------------------------------ the shell
def fulfil(s: Session, req, loop, seen: list) -> object:
    """Answer one request as the asyncio shell would; the next request or None."""
    assert type(req) in REQUESTS, req
    seen.append(type(req).__name__)
    if type(req) is Lookup:
        return s.drain()
    if type(req) is AwaitLookups:
        s.dns_answers({k: DNS_FAIL if zlib.crc32(k.encode()) & 1 else DNS_OK for k in s.lookups})
        return s.resume()
    if type(req) is Delay:
        return s.resume()
    if type(req) is Commit:
        result = req.sink.commit_now()
        if result is None:
            result = loop.run_until_complete(req.sink.commit())
        return s.resume(result)
    if type(req) is AuthStep:
        return s.resume(loop.run_until_complete(req.awaitable))
    return s.resume("TLSv1.3/FUZZ")         # Handshake: taken as done


def play(config_for, ip: str, chunks: list[bytes], loop) -> tuple[bytes, list]:
    """Feed `chunks` then EOF; all output, the requests seen."""
    s = Session(config_for(), Client(ip=ip, port=4000))
    s.start()
    out = [s.data_to_send()]
    seen: list = []
    for chunk in [*chunks, b""]:
        if s.closing:
            break
        s.receive_data(chunk)
        req = s.drain()
        while True:
            while req is not None:
                req = fulfil(s, req, loop, seen)
            out.append(s.data_to_send())
            req = s.drain()
            if req is None:
                break
    out.append(s.data_to_send())
    return b"".join(out), seen


def check_replies(out: bytes) -> None:
    assert out == b"" or out.endswith(b"\r\n"), out[-80:]
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line


def normal(out: bytes, handshake: bool) -> bytes:
    if handshake:
        out = out[:out.find(STARTTLS_GO) + len(STARTTLS_GO)] if STARTTLS_GO in out else out
    for rx, sub in VARIABLE:
        out = rx.sub(sub, out)
    return out


def test_session_survives_random_streams(tmp_path, figures):
    # the AUTH client's rule goes before the others (first match wins)
    policy = policy_for(write_rules(tmp_path / "rules", {
        "tcp.smtp": f'{AUTH_IP}:allow,SMTPAUTH="+cram"\n' + BASE_RULES["tcp.smtp"]}))
    delivery = Delivery.from_spec("discard")
    tls = TLSSettings(context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    auth_cfg = AuthConfig(fail_delay=0, user_pace=0, user_pace_max=0)
    rng = random.Random(SEED)
    loop = asyncio.new_event_loop()
    t0 = time.monotonic()
    n = frags = handshakes = 0
    try:
        while n < STREAMS and time.monotonic() - t0 < SECONDS:
            data = stream(rng)
            ip = rng.choice(CLIENT_IPS)
            with_tls = rng.random() < .5
            chunks = fragments(rng, data)

            def config_for():
                # a fresh AUTH service per feed: failure counters must not
                # carry over from one feed to the other
                return SessionConfig(policy, delivery=delivery, tls=tls if with_tls else NO_TLS,
                                     auth=AuthService(auth_cfg, verifier=Verifier()))
            try:
                whole, seen_w = play(config_for, ip, [data], loop)
                split, seen_s = play(config_for, ip, chunks, loop)
                check_replies(whole)
                check_replies(split)
                hs = "Handshake" in seen_w or "Handshake" in seen_s
                assert normal(whole, hs) == normal(split, hs)
            except Exception as exc:
                raise AssertionError(f"stream {n} (seed {SEED}, ip {ip}, tls {with_tls}): {data!r} "
                                     f"in {len(chunks)} fragments") from exc
            n += 1
            frags += len(chunks)
            handshakes += hs
    finally:
        loop.close()
    figures.update(streams=n, fragments=frags, starttls_handshakes=handshakes, exceptions=0,
                   seconds=round(time.monotonic() - t0, 1))
    assert n >= min(STREAMS, 1000), f"only {n} streams in {SECONDS} s"
