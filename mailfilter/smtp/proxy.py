"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2).

Job: a load balancer in front of the server (HAProxy `send-proxy` /
`send-proxy-v2`, an AWS NLB, nginx stream `proxy_protocol on`) opens the
connection and sends, before any byte of the client's, a header naming the
client's address and port. `parse(buf)` reads it from the start of what
arrived: None while more bytes are needed, the header and its length once
whole, ProxyError when the bytes cannot be a header. Sans-IO: no sockets.

Version 1 (text): `PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n` or `PROXY
UNKNOWN ...\\r\\n`, at most 107 bytes with its CRLF.
Version 2 (binary): the 12-byte signature, version 2 and a command (LOCAL:
the balancer's own health check, the connection's addresses stand; PROXY),
the family and transport (INET or INET6 over STREAM; UNSPEC), a 16-bit
length, the addresses, then TLVs: AUTHORITY (0x02, the TLS SNI), UNIQUE_ID
(0x05), SSL (0x20: the client's TLS, with VERSION 0x21, CN 0x22, CIPHER
0x23 inside); the others are kept by type, unread.

Invariants: the header is all or nothing (a half header is None, never a
guess); nothing after the header is consumed; no input makes it read past
MAX_V2 bytes or raise anything but ProxyError; an address in the header is
a valid IP address of the family it claims, a port 0..65535.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

V1_PREFIX = b"PROXY "
V1_MAX = 107                    # "PROXY TCP6 " + 2 * 39 + 2 * 5 + spaces + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 2048              # this server's cap on a v2 header (TLVs included)

PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23


class ProxyError(ValueError):
    """Not a PROXY header (the text says what is wrong, for one log line)."""


@dataclass
class ProxyHeader:
    version: int                    # 1 or 2
    command: str                    # "PROXY", or "LOCAL" (v2 health check; v1 UNKNOWN)
    src: tuple[str, int] | None     # the client's address and port; None: keep the connection's
    dst: tuple[str, int] | None     # the address the client connected to
    tlvs: dict[int, bytes] = field(default_factory=dict)
    ssl: dict[str, str] = field(default_factory=dict)   # version, cn, cipher when the client used TLS

    @property
    def authority(self) -> str | None:
        v = self.tlvs.get(PP2_TYPE_AUTHORITY)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def unique_id(self) -> str | None:
        v = self.tlvs.get(PP2_TYPE_UNIQUE_ID)
        return None if v is None else v.hex()


def parse(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    """(header, its length), or None: more bytes needed. ProxyError when
    the start of `buf` cannot be a PROXY header of either version."""
    head = bytes(buf[:16])
    if head[:1] == b"P":
        n = min(len(head), len(V1_PREFIX))
        if head[:n] != V1_PREFIX[:n]:
            raise ProxyError("not a PROXY header")
        return _parse_v1(buf)
    if head[:1] == b"\r":
        n = min(len(head), 12)
        if head[:n] != V2_SIGNATURE[:n]:
            raise ProxyError("not a PROXY header")
        return _parse_v2(buf)
    if head:
        raise ProxyError("not a PROXY header")
    return None


def _parse_v1(buf) -> tuple[ProxyHeader, int] | None:
    end = bytes(buf[:V1_MAX]).find(b"\r\n")
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyError(f"v1: no CRLF within {V1_MAX} bytes")
        if b"\n" in bytes(buf[:V1_MAX]):
            raise ProxyError("v1: a bare LF")
        return None
    line = bytes(buf[:end])
    try:
        parts = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("v1: not ASCII") from None
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, "LOCAL", None, None), end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("v1: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    version = 4 if parts[1] == "TCP4" else 6
    src = (_address(parts[2], version), _port(parts[4]))
    dst = (_address(parts[3], version), _port(parts[5]))
    return ProxyHeader(1, "PROXY", src, dst), end + 2


def _address(text: str, version: int) -> str:
    """The address in its canonical text form (inet_pton/inet_ntop: the C
    library's parser, a tenth of the ipaddress module's cost per header)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        raise ProxyError(f"not an IPv{version} address: {text[:45]!r}") from None


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or int(text) > 65535 \
            or (len(text) > 1 and text[0] == "0"):
        raise ProxyError(f"not a port: {text[:8]!r}")
    return int(text)


def _parse_v2(buf) -> tuple[ProxyHeader, int] | None:
    if len(buf) < 16:
        return None
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2: version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise ProxyError(f"v2: command {cmd}")
    if 16 + length > V2_MAX:
        raise ProxyError(f"v2: {16 + length} bytes, over {V2_MAX}")
    if len(buf) < 16 + length:
        return None
    body = bytes(buf[16:16 + length])
    family, transport = fam >> 4, fam & 0x0F
    src = dst = None
    if family == 1:                 # AF_INET
        need = 12
    elif family == 2:               # AF_INET6
        need = 36
    elif family == 0:               # AF_UNSPEC
        need = 0
    elif family == 3:               # AF_UNIX: no address this server can use
        need = 216
    else:
        raise ProxyError(f"v2: address family {family}")
    if len(body) < need:
        raise ProxyError("v2: shorter than its addresses")
    if cmd == 1 and family in (1, 2):
        if transport != 1:
            raise ProxyError("v2: not a stream (TCP) connection")
        n, af = (4, socket.AF_INET) if family == 1 else (16, socket.AF_INET6)
        s_port, d_port = struct.unpack_from("!HH", body, 2 * n)
        src = (socket.inet_ntop(af, body[:n]), s_port)
        dst = (socket.inet_ntop(af, body[n:2 * n]), d_port)
    elif cmd == 1 and family == 3:
        raise ProxyError("v2: a unix-socket client")
    header = ProxyHeader(2, "PROXY" if cmd == 1 and src is not None else "LOCAL", src, dst)
    header.tlvs = _tlvs(body[need:])
    ssl = header.tlvs.get(PP2_TYPE_SSL)
    if ssl is not None and len(ssl) >= 5:
        sub = _tlvs(ssl[5:])
        for key, t in (("version", PP2_SUBTYPE_SSL_VERSION), ("cn", PP2_SUBTYPE_SSL_CN),
                       ("cipher", PP2_SUBTYPE_SSL_CIPHER)):
            if t in sub:
                header.ssl[key] = sub[t].decode("utf-8", "replace")
    return header, 16 + length


def _tlvs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        if i + 3 > len(data):
            raise ProxyError("v2: a TLV cut short")
        t, n = data[i], struct.unpack_from("!H", data, i + 1)[0]
        if i + 3 + n > len(data):
            raise ProxyError("v2: a TLV longer than the header")
        out[t] = data[i + 3:i + 3 + n]
        i += 3 + n
    return out
