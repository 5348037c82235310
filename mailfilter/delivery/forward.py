"""smtp:HOST:PORT / lmtp:HOST:PORT -- forward to a downstream MTA.

Job and invariants: see the package docstring ("smtp:HOST:PORT, lmtp:HOST:PORT"):
250 only after the downstream's 2xx to the end of data; any 4xx, connection
or protocol failure is 451; a recipient is never silently dropped.
"""
from __future__ import annotations

import asyncio
import re

from mailfilter.delivery.base import (
    HANDOVER_TIMEOUT, DeliveryResult, local_id, os_error_text, queued,
)
from mailfilter.delivery.envelope import Envelope, smtp_path, text_bytes
from mailfilter.delivery.spool import SpoolFacts, SpoolingDelivery, read_chunks
from mailfilter.smtp.replies import Reply, reply

__all__ = ["SmtpDelivery", "LmtpDelivery", "ehlo_keywords", "mail_parameters", "smtp_encode"]


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


_ENH = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3}) ")
_PRINTABLE = bytes(b if 32 <= b < 127 else ord("?") for b in range(256))


class _Downstream(Exception):
    """Transport-level failure talking to the next hop (-> 451)."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.lines: list[bytes] = []     # the texts of the last reply, one per line

    async def reply(self) -> Reply:
        """One (possibly multi-line) reply as a Reply: code, enhanced, text;
        the lines' texts stay in `self.lines` (EHLO keywords)."""
        texts = []
        code = None
        async with asyncio.timeout(self.timeout):
            while True:
                line = await self.reader.readline()
                if not line.endswith(b"\n"):
                    raise _Downstream("connection closed by next hop")
                line = line.rstrip(b"\r\n")
                # RFC 5321 §4.2: a reply code is 2xx-5xx; anything else is a
                # protocol error (451), never a permanent rejection.
                if (len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"2345"
                        or line[3:4] not in (b"", b" ", b"-")):
                    raise _Downstream("malformed reply from next hop: "
                                      + line[:40].translate(_PRINTABLE).decode("ascii"))
                if code is not None and int(line[:3]) != code:
                    raise _Downstream("inconsistent multi-line reply from next hop")
                code = int(line[:3])
                texts.append(line[4:])
                if line[3:4] != b"-":
                    break
        self.lines = texts
        text = b" ".join(texts)
        m = _ENH.match(text)
        enhanced = m.group(1).decode() if m else ""
        if m:
            text = text[m.end():]
        return Reply(code, enhanced, text[:300].translate(_PRINTABLE).decode("ascii"))

    async def command(self, line: bytes) -> Reply:
        self.writer.write(line)
        return await self.reply()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()


def ehlo_keywords(lines: list[bytes]) -> frozenset[bytes]:
    """The service extensions of an EHLO/LHLO reply (RFC 5321 §4.1.1.1: the
    lines after the first, keyword first, case-insensitive)."""
    return frozenset(line.split(None, 1)[0].upper() for line in lines[1:] if line.split())


def mail_parameters(keywords: frozenset[bytes], facts: SpoolFacts) -> bytes:
    """MAIL FROM parameters the next hop announced it understands: SIZE
    (RFC 1870 §6: the size with CRLF line ends) and BODY=8BITMIME (RFC 6152
    §3) for a message holding 8-bit bytes. Nothing unannounced: a strict
    server answers 555 to it (RFC 5321 §4.1.1.11)."""
    params = b""
    if b"SIZE" in keywords:
        params += b" SIZE=%d" % facts.wire_size
    if facts.eight_bit and b"8BITMIME" in keywords:
        params += b" BODY=8BITMIME"
    return params


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
    """smtp:HOST:PORT -- forward with 250 only after the downstream's 250."""

    lmtp = False

    def __init__(self, host: str, port: int, *, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, timeout: float = HANDOVER_TIMEOUT,
                 helo_name: str | None = None, **spool) -> None:
        super().__init__(**spool)
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.timeout = timeout      # the whole hand-over, connect to the final reply
        self.helo_name = helo_name
        kind = "lmtp" if self.lmtp else "smtp"
        self.spec = f"{kind}:{host}:{port}" if ":" not in host else f"{kind}:[{host}]:{port}"

    @classmethod
    def parse(cls, arg: str, **options) -> "SmtpDelivery":
        kind = "lmtp" if cls.lmtp else "smtp"
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

    async def _session(self, env: Envelope, spool, facts: SpoolFacts, where: str) -> DeliveryResult:
        writer = None
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
            except (OSError, TimeoutError) as exc:
                raise _Downstream(f"connect: {os_error_text(exc)}") from exc
            conn = _Conn(reader, writer, self.command_timeout)
            res = await self._transaction(conn, env, spool, facts)
            res.detail = f"{where} {res.detail}"
            return res
        except (_Downstream, OSError, TimeoutError, ValueError) as exc:
            # ValueError: StreamReader line limit exceeded by a runaway reply
            why = str(exc) if isinstance(exc, _Downstream) else os_error_text(exc)
            return DeliveryResult(False, reply("downstream_temp"), None, f"{where} {why}")
        finally:
            if writer is not None:
                writer.close()
                try:
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()
                except (OSError, TimeoutError):
                    pass

    async def _transaction(self, conn: _Conn, env: Envelope, spool,
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
        if self.lmtp:
            r = await conn.command(b"LHLO " + name + b"\r\n")
        else:
            r = await conn.command(b"EHLO " + name + b"\r\n")
            if r.code >= 500:  # RFC 5321 §3.2: fall back to HELO
                r = await conn.command(b"HELO " + name + b"\r\n")
                conn.lines = []            # HELO: no extensions, whatever it lists
        if r.code != 250:
            return temp("ehlo", r)
        params = mail_parameters(ehlo_keywords(conn.lines), facts)
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
    async def _quit(conn: _Conn) -> None:
        """QUIT and wait (briefly) for the 221, so the downstream logs a clean
        session end. Politeness only: the outcome is already decided."""
        conn.timeout = min(conn.timeout, 5.0)
        try:
            await conn.command(b"QUIT\r\n")
        except (_Downstream, OSError, TimeoutError, ValueError):
            pass


class LmtpDelivery(SmtpDelivery, kind="lmtp", form="lmtp:HOST:PORT"):
    """lmtp:HOST:PORT -- RFC 2033, per-recipient replies after DATA."""

    lmtp = True
