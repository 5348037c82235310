"""A tiny scripted SMTP/LMTP server on 127.0.0.1 for delivery tests.

It records every command line and the DATA bytes exactly as received (wire
form) plus the un-stuffed LF message, and answers per stage from a script:

    Peer(script={"rcpt": {"bad@x": "550 5.1.1 no such user"}, "eod": "451 4.3.0 later"})

Stages: greeting, ehlo (EHLO/HELO/LHLO; HELO alone when the script has a
"helo" stage), mail, rcpt, data, eod, quit. A stage
value is a reply line (CRLF added), "drop" (close the connection at once) or
"hang" (never answer). "rcpt" may be a dict keyed by address; for LMTP "eod"
may be a list, one reply per accepted recipient (RFC 2033 §4.2).
`strict=True` checks the MAIL/RCPT path against the RFC 5321 §4.1.2 grammar
(Dot-string or Quoted-string local part) and answers 501 to anything else,
as a strict downstream does; it also answers 555 to a MAIL parameter whose
keyword its EHLO/LHLO reply did not list (RFC 5321 §4.1.1.11) and 552 to a
SIZE= above its announced `SIZE n` (RFC 1870 §6.1).
Everything is recorded before the reply to it is written, so a test that has
awaited the delivery result can read the records without further sync.

STARTTLS (RFC 3207): `Peer(tls=server_context)` lists STARTTLS in its
EHLO/LHLO reply until the session is in TLS (so does a script with a
"starttls" stage), answers STARTTLS from the "starttls" stage (default
`220 2.0.0 ready to start TLS`) and then does the handshake with that
context. Inside TLS the "ehlo_tls" stage answers EHLO/LHLO (default: the
"ehlo" stage, without STARTTLS). Besides a reply line, "drop" and "hang",
"starttls" may be:
  "break"  -- 220, then bytes that are no TLS record, then close;
  "close"  -- 220, then close before any handshake;
  "stall"  -- 220, then never a byte of handshake;
  "inject" -- `220 ...` and a `250 injected` line in one write (a
              cleartext response injected behind the 220), then the handshake.
`Session.tls` is `TLSv1.3/TLS_AES_256_GCM_SHA384` once the handshake
succeeded; `Session.tls_error` says why the peer's side of a handshake failed.
"""
from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field

DEFAULTS = {
    "greeting": "220 peer.test ESMTP",
    "ehlo": "250 peer.test",
    "mail": "250 2.1.0 ok",
    "rcpt": "250 2.1.5 ok",
    "data": "354 go ahead",
    "eod": "250 2.0.0 ok queued",
    "quit": "221 2.0.0 bye",
    "starttls": "220 2.0.0 ready to start TLS",
}

# RFC 5321 §4.1.2 (ASCII only): Path = "<" Mailbox ">"; "<>" for MAIL and
# "<Postmaster>" for RCPT are the special cases.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")'
_SUB = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_SUB}(?:\.{_SUB})*|\[[\x21-\x5a\x5e-\x7e]+\])"
MAILBOX = re.compile(rf"<{_LOCAL}@{_DOMAIN}>")


def strict_path_ok(verb: str, path: str) -> bool:
    if verb == "MAIL" and path == "<>":
        return True
    if verb == "RCPT" and path.lower() == "<postmaster>":
        return True
    return MAILBOX.fullmatch(path) is not None


def announced(ehlo_reply: str) -> dict[str, str]:
    """Keyword -> argument of the extensions a scripted EHLO reply lists."""
    out = {}
    for line in ehlo_reply.split("\r\n")[1:]:
        word, _, arg = line[4:].partition(" ")
        out[word.upper()] = arg
    return out


def strict_mail_params(params: list[str], ehlo_reply: str) -> str | None:
    """The reply a strict server gives to MAIL parameters, None when fine."""
    ext = announced(ehlo_reply)
    for p in params:
        key, _, value = p.partition("=")
        key = key.upper()
        if {"BODY": "8BITMIME"}.get(key, key) not in ext:      # RFC 6152 §3
            return "555 5.5.4 unsupported parameter " + key
        if key == "SIZE" and ext[key] and int(value) > int(ext[key]):
            return "552 5.3.4 message size exceeds fixed maximum message size"
    return None


def with_keyword(ehlo_reply: str, keyword: str) -> str:
    """A 250 EHLO/LHLO reply with one more extension line."""
    if not ehlo_reply.startswith("250"):
        return ehlo_reply
    texts = [line[4:] for line in ehlo_reply.split("\r\n")] + [keyword]
    last = len(texts) - 1
    return "\r\n".join(f"250{'-' if i < last else ' '}{t}" for i, t in enumerate(texts))


@dataclass
class Session:
    commands: list[str] = field(default_factory=list)
    wire: bytes = b""        # DATA bytes as received, up to and incl. ".\r\n"
    message: bytes = b""     # un-stuffed, CRLF -> LF
    rcpts_ok: list[str] = field(default_factory=list)
    tls: str | None = None   # "TLSv1.3/TLS_AES_256_GCM_SHA384" once in TLS
    tls_error: str | None = None


class Peer:
    def __init__(self, script: dict | None = None, lmtp: bool = False,
                 strict: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.offers_starttls = tls is not None or "starttls" in (script or {})
        self.script = dict(DEFAULTS, **(script or {}))
        self.script.setdefault("ehlo_tls", self.script["ehlo"])
        self.lmtp = lmtp
        self.strict = strict
        self.tls = tls
        self.sessions: list[Session] = []
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()
        self.port = 0

    async def __aenter__(self) -> "Peer":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        # End handlers by closing their connections (a cancelled handler task
        # makes asyncio's start_server callback log a spurious error).
        self._server.close()
        self._closing.set()
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def _action(self, stage: str, key: str | None = None, index: int = 0):
        a = self.script[stage]
        if isinstance(a, dict):
            a = a.get(key, DEFAULTS[stage])
        elif isinstance(a, list):
            a = a[index]
        return a

    async def _say(self, writer: asyncio.StreamWriter, action: str) -> bool:
        """Send the scripted reply; False when the connection is to end."""
        if action == "drop":
            writer.transport.abort()
            return False
        if action == "hang":
            await self._closing.wait()   # set by __aexit__
            return False
        writer.write(action.encode() + b"\r\n")
        await writer.drain()
        return True

    def _ehlo(self, s: Session) -> str:
        """The EHLO/LHLO reply for the session's state: STARTTLS listed
        until TLS is on (RFC 3207 §4.2: not after)."""
        if s.tls is not None:
            return self._action("ehlo_tls")
        reply = self._action("ehlo")
        return with_keyword(reply, "STARTTLS") if self.offers_starttls else reply

    async def _starttls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        s: Session) -> asyncio.StreamWriter | None:
        """Answer STARTTLS and do the handshake: the writer to go on with
        (a new one inside TLS), or None when the session ends."""
        act = self._action("starttls")
        ready = DEFAULTS["starttls"].encode() + b"\r\n"
        if act in ("break", "close", "stall"):
            writer.write(ready)
            if act == "break":
                writer.write(b"this is no TLS record, just text\r\n" * 8)
            await writer.drain()
            if act == "stall":
                await reader.read()          # until the client gives up and closes
            return None
        if act == "inject":
            writer.write(ready + b"250 injected\r\n")   # one write: one segment
            await writer.drain()
        elif not await self._say(writer, act):
            return None
        elif not act.startswith("220"):
            return writer
        # loop.start_tls, not StreamWriter.start_tls: when the client goes
        # as the handshake ends, the loop returns no transport, and a
        # StreamWriter left holding None fails in its __del__.
        loop = asyncio.get_running_loop()
        protocol = writer.transport.get_protocol()
        try:
            transport = await loop.start_tls(writer.transport, protocol, self.tls,
                                             server_side=True)
        except (ssl.SSLError, OSError) as exc:
            s.tls_error = getattr(exc, "reason", None) or type(exc).__name__
            return None
        if transport is None:
            s.tls_error = "connection lost at the end of the handshake"
            return None
        obj = transport.get_extra_info("ssl_object")
        s.tls = f"{obj.version()}/{obj.cipher()[0]}"
        return asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        self._writers.add(writer)
        s = Session()
        self.sessions.append(s)
        try:
            if not await self._say(writer, self._action("greeting")):
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                cmd = line.decode().rstrip("\r\n")
                s.commands.append(cmd)
                verb = cmd.split(" ", 1)[0].upper()
                rest = cmd.split(":", 1)[-1]
                end = rest.rfind(">") + 1        # the path ends at its last ">"
                path, params = rest[:end], rest[end:].split()
                if (self.strict and verb in ("MAIL", "RCPT")
                        and not strict_path_ok(verb, path)):
                    act = "501 5.1.3 bad address syntax"
                elif (self.strict and verb == "MAIL"
                        and strict_mail_params(params, self._ehlo(s)) is not None):
                    act = strict_mail_params(params, self._ehlo(s))
                elif verb == "HELO" and "helo" in self.script:
                    act = self._action("helo")
                elif verb in ("EHLO", "LHLO"):
                    act = self._ehlo(s)
                elif verb == "HELO":
                    act = self._action("ehlo")
                elif verb == "STARTTLS" and self.offers_starttls and s.tls is None:
                    tls_writer = await self._starttls(reader, writer, s)
                    if tls_writer is None:
                        return
                    self._writers.discard(writer)
                    writer = tls_writer
                    self._writers.add(writer)
                    continue
                elif verb == "MAIL":
                    act = self._action("mail")
                elif verb == "RCPT":
                    addr = cmd.split(":", 1)[1].strip().strip("<>")
                    act = self._action("rcpt", addr)
                    if act.startswith("2"):
                        s.rcpts_ok.append(addr)
                elif verb == "DATA":
                    act = self._action("data")
                    if not await self._say(writer, act):
                        return
                    if act.startswith("354"):
                        await self._read_data(reader, s)
                        n = len(s.rcpts_ok) if self.lmtp else 1
                        for i in range(n):
                            if not await self._say(writer, self._action("eod", index=i)):
                                return
                    continue
                elif verb == "QUIT":
                    await self._say(writer, self._action("quit"))
                    return
                else:
                    act = "250 2.0.0 ok"
                if not await self._say(writer, act):
                    return
        finally:
            writer.close()
            self._writers.discard(writer)
            self._handlers.discard(asyncio.current_task())

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader, s: Session) -> None:
        wire, msg = [], []
        while True:
            line = await reader.readline()
            if not line:
                return   # EOF inside DATA: the session ends, nothing recorded
            wire.append(line)
            if line == b".\r\n":
                break
            if line.startswith(b"."):
                line = line[1:]   # RFC 5321 §4.5.2 transparency
            msg.append(line.replace(b"\r\n", b"\n"))
        s.wire = b"".join(wire)
        s.message = b"".join(msg)
