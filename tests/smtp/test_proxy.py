"""smtp/proxy.py: the PROXY protocol header, v1 and v2 (HAProxy's
proxy-protocol.txt), fed whole and byte by byte; every malformed form is a
ProxyError, a partial header is None, nothing after the header is taken."""
from __future__ import annotations

import socket
import struct

import pytest

from mailfilter.smtp.proxy import V2_SIGNATURE, ProxyError, parse


def v2(cmd=1, fam=0x11, addr=b"", tlvs=b"", length=None) -> bytes:
    body = addr + tlvs
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack(
        "!H", len(body) if length is None else length) + body


def inet(src="192.0.2.7", dst="198.51.100.1", sport=40123, dport=25) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def inet6(src="2001:db8::7", dst="2001:db8::25", sport=40123, dport=25) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport))


def tlv(t: int, value: bytes) -> bytes:
    return bytes([t]) + struct.pack("!H", len(value)) + value


SSL = tlv(0x20, b"\x07" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_128_GCM_SHA256")
          + tlv(0x22, b"client.example"))

GOOD = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40123 25\r\n", 1, "PROXY",
     ("192.0.2.7", 40123), ("198.51.100.1", 25)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::25 40123 25\r\n", 1, "PROXY",
     ("2001:db8::7", 40123), ("2001:db8::25", 25)),
    (b"PROXY UNKNOWN\r\n", 1, "LOCAL", None, None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", 1, "LOCAL", None, None),
    (v2(addr=inet()), 2, "PROXY", ("192.0.2.7", 40123), ("198.51.100.1", 25)),
    (v2(fam=0x21, addr=inet6()), 2, "PROXY", ("2001:db8::7", 40123), ("2001:db8::25", 25)),
    (v2(cmd=0, fam=0x00), 2, "LOCAL", None, None),                  # a health check
    (v2(cmd=0, addr=inet()), 2, "LOCAL", None, None),               # LOCAL: addresses ignored
    (v2(fam=0x00), 2, "LOCAL", None, None),                         # PROXY + UNSPEC: keep ours
]


@pytest.mark.parametrize("wire,version,command,src,dst", GOOD)
def test_headers_whole_and_byte_by_byte(wire, version, command, src, dst):
    after = b"EHLO x\r\n"
    header, n = parse(wire + after)
    assert (header.version, header.command, header.src, header.dst) == (version, command, src, dst)
    assert n == len(wire)                               # nothing of the client's taken
    for i in range(len(wire)):                          # every prefix: more bytes needed
        assert parse(wire[:i]) is None, i


def test_v2_tlvs_authority_unique_id_ssl():
    wire = v2(addr=inet(), tlvs=tlv(0x02, b"mx.example.com") + tlv(0x05, b"\x01\x02\xff") + SSL
              + tlv(0x04, b"\x00" * 3))
    header, n = parse(wire)
    assert n == len(wire)
    assert header.authority == "mx.example.com" and header.unique_id == "0102ff"
    assert header.ssl == {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256",
                          "cn": "client.example"}
    assert 0x04 in header.tlvs                          # kept by type, unread


BAD = [
    b"EHLO client.test\r\n",                            # a client that speaks SMTP first
    b"GET / HTTP/1.0\r\n",
    b"PROXZ TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",          # family mismatch
    b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",             # a leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",             # two spaces
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                # a bare LF
    b"PROXY TCP4 " + b"1" * 120,                        # no CRLF within 107 bytes
    b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
    V2_SIGNATURE[:6] + b"X" * 10,                       # a broken signature
    V2_SIGNATURE + bytes([0x10, 0x11]) + b"\x00\x0c" + inet(),      # version 1 in v2
    V2_SIGNATURE + bytes([0x22, 0x11]) + b"\x00\x0c" + inet(),      # command 2
    v2(fam=0x41),                                       # family 4
    v2(fam=0x12, addr=inet()),                          # DGRAM
    v2(fam=0x11, addr=inet()[:8]),                      # shorter than its addresses
    v2(fam=0x31, addr=b"\x00" * 216),                   # a unix-socket client
    v2(addr=inet(), tlvs=b"\x02\x00"),                  # a TLV cut short
    v2(addr=inet(), tlvs=b"\x02\x00\x09abc"),           # a TLV longer than the header
    v2(length=5000),                                    # over this server's cap
]


@pytest.mark.parametrize("wire", BAD, ids=range(len(BAD)))
def test_malformed_headers_are_errors(wire):
    with pytest.raises(ProxyError):
        parse(wire)


def test_a_client_that_talks_first_is_refused_at_its_first_byte():
    with pytest.raises(ProxyError):
        parse(b"E")
    with pytest.raises(ProxyError):
        parse(b"\x16\x03\x01")                          # a TLS ClientHello without a header
    assert parse(b"") is None
