"""smtp:HOST:PORT / lmtp:HOST:PORT -- forward to a downstream MTA, in TLS
when the next hop offers STARTTLS.

Job and invariants: see the package docstring ("smtp:HOST:PORT, lmtp:HOST:PORT"):
250 only after the downstream's 2xx to the end of data; any 4xx, connection
or protocol failure is 451; a recipient is never silently dropped. The
connection itself (replies, STARTTLS upgrade) is nexthop.py; the client
SSLContext, one per Delivery, is tlsclient.py.

TLS to the next hop (RFC 3207):
- Opportunistic by default (RFC 7435): when the EHLO/LHLO reply lists
  STARTTLS, the hand-over goes in TLS, and any certificate is taken (an
  unauthenticated TLS beats clear). After the handshake EHLO/LHLO is sent
  again and only that reply's extensions are used (RFC 3207 §4.2). A next
  hop that does not list STARTTLS gets the message in clear.
- `smtp+tls-required:HOST:PORT`, `lmtp+tls-required:HOST:PORT` and
  certificate verification (`tls_verify=True`, or `tls_ca=FILE`) never hand
  over in clear: no STARTTLS in the reply -> 451 4.7.0. Verification
  implies it: were clear still allowed, whoever strips STARTTLS from the
  EHLO reply would get the mail without any certificate to check.
- STARTTLS listed but failing -> 451 4.7.0, in every mode: a 4xx/5xx to
  STARTTLS, a handshake that breaks, a certificate that does not verify,
  or bytes behind the 220 (nexthop.py). Never a fallback to clear, on this
  connection or a new one: after a failed handshake the connection is
  unusable (TLS records of unknown state crossed it), and a retry in clear
  would hand the mail to anyone able to break a handshake (one RST, one
  garbled record) on a path to a hop that said it speaks TLS. The client
  keeps the message and retries; a 454 is temporary by definition (RFC 3207
  §4), and a broken handshake usually is.
SMTPUTF8 to the next hop (RFC 6531, docs/behaviour/delivery.md#smtputf8):
- a transaction whose MAIL carried SMTPUTF8 is forwarded with the parameter
  when the next hop's EHLO/LHLO reply lists SMTPUTF8;
- when it does not, a message that needs it (`needs_smtputf8`: a UTF-8
  address, or an 8-bit byte in the header block) is not sent (§3.4: the
  client "MUST NOT transmit" it, and rejects it during its own transaction):
  554 5.6.7, permanent, as Postfix bounces it; the detail names the address
  or the header. A message that announced SMTPUTF8 with ASCII addresses and
  header goes without the parameter (§3.4 allows it; Postfix does so).
- The log detail says how the hand-over went, after the next hop:
  `smtp HOST:PORT TLSv1.3/TLS_AES_256_GCM_SHA384 eod 250 ...` (with
  ` verified` after the cipher when the certificate was checked) or
  `smtp HOST:PORT clear eod 250 ...`; a TLS failure as
  `smtp HOST:PORT starttls: <reason>`.
"""
from __future__ import annotations

import asyncio

from mailfilter.delivery.base import (
    HANDOVER_TIMEOUT, DeliveryResult, local_id, os_error_text, queued,
)
from mailfilter.delivery.envelope import Envelope, smtp_path, text_bytes
from mailfilter.delivery.nexthop import Connection, NextHopError, TLSFailed
from mailfilter.delivery.spool import SpoolFacts, SpoolingDelivery, read_chunks
from mailfilter.delivery.tlsclient import client_context
from mailfilter.smtp.replies import REPLIES, Reply, reply

__all__ = [
    "SmtpDelivery", "LmtpDelivery", "SmtpTlsRequiredDelivery", "LmtpTlsRequiredDelivery",
    "ehlo_keywords", "mail_parameters", "needs_smtputf8", "smtp_encode",
]

# A hand-over that TLS stopped: 451 with RFC 3463 X.7.0 "other or undefined
# security status" (the client retries; the next hop's own codes say
# nothing here, it never saw the message).
# the replies when TLS to the next hop is required and not offered, or fails
NO_TLS = REPLIES["downstream_no_tls"]
TLS_FAILED = REPLIES["downstream_tls_failed"]


def smtp_encode(chunk: bytes, at_bol: bool) -> tuple[bytes, bool]:
    """Stored LF text -> SMTP DATA wire form: dot-stuff (RFC 5321 §4.5.2) and
    LF -> CRLF, in bulk. `at_bol`: the previous chunk ended a line. Returns
    the wire bytes and the new `at_bol`.

    A CR in stored text is a bare CR (the spool keeps qmail's "CR not
    followed by LF is stored as is", docs/behaviour/delivery.md#storage-format): it
    goes out as a line end, dot-stuffed like any other, never as a bare CR (RFC 5321 §2.3.8;
    a next hop that ends DATA at `<CR>.<CR>` would otherwise read the rest
    of the message as commands: SMTP smuggling, docs/behaviour/smtp.md#data)."""
    if not chunk:
        return b"", at_bol
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r", b"\n")
    out = chunk.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
    if at_bol and chunk[:1] == b".":
        out = b"." + out
    return out, chunk[-1:] == b"\n"


def ehlo_keywords(lines: list[bytes]) -> frozenset[bytes]:
    """The service extensions of an EHLO/LHLO reply (RFC 5321 §4.1.1.1: the
    lines after the first, keyword first, case-insensitive)."""
    return frozenset(line.split(None, 1)[0].upper() for line in lines[1:] if line.split())


def mail_parameters(keywords: frozenset[bytes], facts: SpoolFacts, smtputf8: bool = False) -> bytes:
    """MAIL FROM parameters the next hop announced it understands: SIZE
    (RFC 1870 §6: the size with CRLF line ends), BODY=8BITMIME (RFC 6152
    §3) for a message holding 8-bit bytes, and SMTPUTF8 (RFC 6531 §3.4) for
    a transaction that carried it (`smtputf8`). Nothing unannounced: a strict
    server answers 555 to it (RFC 5321 §4.1.1.11)."""
    params = b""
    if b"SIZE" in keywords:
        params += b" SIZE=%d" % facts.wire_size
    if facts.eight_bit and b"8BITMIME" in keywords:
        params += b" BODY=8BITMIME"
    if smtputf8 and b"SMTPUTF8" in keywords:
        params += b" SMTPUTF8"
    return params


def needs_smtputf8(env: Envelope, facts: SpoolFacts) -> str | None:
    """Why an SMTPUTF8 transaction cannot go to a next hop without
    SMTPUTF8 (RFC 6531 §3.4: a UTF-8 address, or UTF-8 in the header
    fields, RFC 6532), as the decision line's detail; None when its
    addresses and header block are ASCII and it may go without it."""
    for addr in (env.sender, *env.recipients):
        if not addr.isascii():
            return f"<{addr}> is not ASCII"
    if facts.header_eight_bit:
        return "the header is not ASCII"
    return None


def _rejected(x: Reply, name: str = "downstream_rejected", **fields) -> Reply:
    """554 with the downstream's text, and its enhanced code when it gave a
    valid permanent one (RFC 3463: 5.x.y with a 5xx); else 5.3.0."""
    r = reply(name, text=x.text, **fields)
    if x.enhanced[:2] == "5." and x.code // 100 == 5:
        r = r._replace(enhanced=x.enhanced)
    return r


def _rcpt_verdict(rcpts: list[str], replies: list[Reply], stage: str) -> DeliveryResult | None:
    """None when every recipient got 2xx; else the message's 451/554 result.

    Any 4xx -> 451 (the client retries the whole message); all 5xx -> 554.
    A 2xx/5xx mix: at RCPT, None too (the message goes to the accepted ones:
    retrying cannot change a 5xx, and a 451 held their mail until the
    client's queue expired); as the final outcome, a 554 that says how many
    got it and why the others did not (SMTP has one reply for the message;
    a 250 would silently drop the refused ones, a 451 would repeat the
    delivery to the others on every retry)."""
    temp = [(r, x) for r, x in zip(rcpts, replies) if x.code // 100 != 2 and x.code < 500]
    perm = [(r, x) for r, x in zip(rcpts, replies) if x.code >= 500]
    if not temp and not perm:
        return None
    if temp:
        r, x = temp[0]
        return DeliveryResult(False, reply("downstream_rcpt_temp", rcpt=r, text=x.text),
                              None, f"{stage} {x.code} <{r}>")
    r, x = perm[0]
    if len(perm) == len(replies):
        return DeliveryResult(False, _rejected(x), None,
                              f"{stage} {x.code} <{r}> all recipients rejected")
    if stage == "rcpt":
        return None
    delivered = len(replies) - len(perm)
    return DeliveryResult(False, _rejected(x, "downstream_partial", delivered=delivered,
                                           total=len(replies), rcpt=r), None,
                          f"{stage} {x.code} <{r}> partial: delivered to {delivered} of {len(replies)}")


class SmtpDelivery(SpoolingDelivery, kind="smtp", form="smtp:HOST:PORT"):
    """smtp:HOST:PORT -- forward with 250 only after the downstream's 250,
    in TLS when the next hop offers it. Options (besides the timeouts):
    `tls_verify=True` checks the certificate against the system store,
    `tls_ca=FILE` against FILE's CA certificates (and implies tls_verify);
    both make TLS required (module docstring)."""

    lmtp = False
    require_tls = False        # the +tls-required kinds
    speaks_tls = True          # Delivery.from_spec: takes tls_verify / tls_ca

    def __init__(self, host: str, port: int, *, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, timeout: float = HANDOVER_TIMEOUT,
                 helo_name: str | None = None, tls_verify: bool = False,
                 tls_ca: str | None = None, **spool) -> None:
        super().__init__(**spool)
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout   # also bounds the TLS handshake
        self.command_timeout = command_timeout
        self.timeout = timeout      # the whole hand-over, connect to the final reply
        self.helo_name = helo_name
        self.tls_verify = bool(tls_verify) or tls_ca is not None
        self.tls_required = self.require_tls or self.tls_verify
        # one context for every message: built (and a CA file read) once, here
        self.tls_context = client_context(verify=self.tls_verify, cafile=tls_ca)
        kind = self.form.partition(":")[0]
        self.spec = f"{kind}:{host}:{port}" if ":" not in host else f"{kind}:[{host}]:{port}"

    @classmethod
    def parse(cls, arg: str, **options) -> "SmtpDelivery":
        kind = cls.form.partition(":")[0]
        host, colon, port = arg.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not colon or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError(f"bad delivery spec {kind}:{arg!r}: expected {kind}:HOST:PORT "
                             "with PORT 1-65535 (IPv6 as [addr]:PORT)")
        return cls(host, int(port), **options)

    def _where(self) -> str:
        return f"{'lmtp' if self.lmtp else 'smtp'} {self.host}:{self.port}"

    async def _deliver(self, env: Envelope, spool, facts: SpoolFacts = SpoolFacts()) -> DeliveryResult:
        where = self._where()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._session(env, spool, facts, where)
        except TimeoutError:    # the whole hand-over: delivery.HANDOVER_TIMEOUT
            return DeliveryResult(False, reply("downstream_temp"), None,
                                  f"{where} hand-over took over {self.timeout:g} s")

    def _security(self, conn: Connection) -> str:
        """`clear`, or the TLS version/cipher (` verified` when checked)."""
        return conn.security + (" verified" if conn.tls and self.tls_verify else "")

    async def _session(self, env: Envelope, spool, facts: SpoolFacts, where: str) -> DeliveryResult:
        conn = None
        try:
            conn = await Connection.open(self.host, self.port, connect_timeout=self.connect_timeout,
                                         timeout=self.command_timeout)
            res = await self._transaction(conn, env, spool, facts)
            res.detail = f"{where} {self._security(conn)} {res.detail}"
            return res
        except TLSFailed as exc:
            return DeliveryResult(False, TLS_FAILED, None, f"{where} starttls: {exc}")
        except (NextHopError, OSError) as exc:     # OSError: TimeoutError of a command too
            why = str(exc) if isinstance(exc, NextHopError) else os_error_text(exc)
            how = f" {self._security(conn)}" if conn is not None else ""
            return DeliveryResult(False, reply("downstream_temp"), None, f"{where}{how} {why}")
        finally:
            if conn is not None:
                await conn.close()

    async def _hello(self, conn: Connection, name: bytes) -> Reply:
        """LHLO, or EHLO with the HELO fallback (RFC 5321 §3.2); after HELO
        `conn.lines` is empty: no extensions, whatever the reply lists."""
        if self.lmtp:
            return await conn.command(b"LHLO " + name + b"\r\n")
        r = await conn.command(b"EHLO " + name + b"\r\n")
        if r.code >= 500:
            r = await conn.command(b"HELO " + name + b"\r\n")
            conn.lines = []
        return r

    async def _transaction(self, conn: Connection, env: Envelope, spool,
                           facts: SpoolFacts) -> DeliveryResult:
        def temp(stage: str, r: Reply) -> DeliveryResult:
            return DeliveryResult(False, reply("downstream_temp"), None,
                                  f"{stage} {r.code} {r.text}")

        def perm(stage: str, r: Reply) -> DeliveryResult:
            return DeliveryResult(False, _rejected(r), None, f"{stage} {r.code} {r.text}")

        greet = await conn.reply()
        if greet.code != 220:
            return temp("greeting", greet)  # 5xx here is not about the message
        name = text_bytes(self.helo_name or env.local_host or "localhost")
        r = await self._hello(conn, name)
        if r.code != 250:
            return temp("ehlo", r)
        if b"STARTTLS" in ehlo_keywords(conn.lines):
            r = await conn.command(b"STARTTLS\r\n")
            if r.code != 220:       # offered, then refused: 451, never on in clear
                await self._quit(conn)
                raise TLSFailed(f"{r.code} {r.enhanced + ' ' if r.enhanced else ''}{r.text}")
            await conn.starttls(self.tls_context, self.host, self.connect_timeout)
            # RFC 3207 §4.2: what the first reply said is forgotten; the
            # extensions (SIZE, 8BITMIME) are the ones offered inside TLS
            r = await self._hello(conn, name)
            if r.code != 250:
                return temp("ehlo", r)
        elif self.tls_required:
            await self._quit(conn)
            return DeliveryResult(False, NO_TLS, None, "STARTTLS not offered, TLS required")
        keywords = ehlo_keywords(conn.lines)
        if env.smtputf8 and b"SMTPUTF8" not in keywords:
            why = needs_smtputf8(env, facts)
            if why is not None:
                await self._quit(conn)
                return DeliveryResult(False, REPLIES["downstream_no_smtputf8"], None,
                                      f"SMTPUTF8 not offered, {why}")
        params = mail_parameters(keywords, facts, env.smtputf8)
        r = await conn.command(b"MAIL FROM:" + smtp_path(env.sender) + params + b"\r\n")
        if r.code // 100 != 2:
            await self._quit(conn)
            return perm("mail", r) if r.code >= 500 else temp("mail", r)
        rcpt_replies = []
        for rcpt in env.recipients:
            rcpt_replies.append(await conn.command(b"RCPT TO:" + smtp_path(rcpt) + b"\r\n"))
        verdict = _rcpt_verdict(env.recipients, rcpt_replies, "rcpt")
        if verdict is not None:
            if self.lmtp:
                verdict.per_recipient = rcpt_replies
            await self._quit(conn)
            return verdict
        # the ones the next hop took; a 2xx/5xx mix goes on with these
        accepted = [i for i, x in enumerate(rcpt_replies) if x.code // 100 == 2]
        r = await conn.command(b"DATA\r\n")
        if r.code != 354:
            await self._quit(conn)
            return perm("data", r) if r.code >= 500 else temp("data", r)
        at_bol = True
        for chunk in read_chunks(spool):
            wire, at_bol = smtp_encode(chunk, at_bol)
            await conn.send(wire)
        await conn.send(b".\r\n" if at_bol else b"\r\n.\r\n")
        if self.lmtp:  # RFC 2033 §4.2: one reply per accepted recipient
            finals = list(rcpt_replies)
            for i in accepted:
                finals[i] = await conn.reply()
            await self._quit(conn)
            verdict = _rcpt_verdict(env.recipients, finals, "eod")
            if verdict is None:
                return DeliveryResult(True, queued(local_id(), "").reply, finals,
                                      f"eod {finals[0].code} x{len(finals)}")
            verdict.per_recipient = finals
            return verdict
        r = await conn.reply()
        await self._quit(conn)
        if r.code // 100 != 2:
            return perm("eod", r) if r.code >= 500 else temp("eod", r)
        if len(accepted) < len(rcpt_replies):   # delivered to some, refused at RCPT for the rest
            finals = [r if x.code // 100 == 2 else x for x in rcpt_replies]
            return _rcpt_verdict(env.recipients, finals, "eod")
        return queued(local_id(), f"eod {r.code} {r.text}")

    @staticmethod
    async def _quit(conn: Connection) -> None:
        """QUIT and wait (briefly) for the 221, so the downstream logs a clean
        session end. Politeness only: the outcome is already decided."""
        conn.timeout = min(conn.timeout, 5.0)
        try:
            await conn.command(b"QUIT\r\n")
        except (NextHopError, OSError):
            pass


class LmtpDelivery(SmtpDelivery, kind="lmtp", form="lmtp:HOST:PORT"):
    """lmtp:HOST:PORT -- RFC 2033, per-recipient replies after DATA."""

    lmtp = True


class SmtpTlsRequiredDelivery(SmtpDelivery, kind="smtp+tls-required",
                              form="smtp+tls-required:HOST:PORT"):
    """smtp+tls-required:HOST:PORT -- smtp:, never in clear (451 4.7.0)."""

    require_tls = True


class LmtpTlsRequiredDelivery(LmtpDelivery, kind="lmtp+tls-required",
                              form="lmtp+tls-required:HOST:PORT"):
    """lmtp+tls-required:HOST:PORT -- lmtp:, never in clear (451 4.7.0)."""

    require_tls = True
