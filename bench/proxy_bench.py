"""What a PROXY header costs per connection (issue 14), without sockets.

usage: .venv/bin/python bench/proxy_bench.py [--connections N] [--repeat 5]

Each connection is SMTPProtocol on bench/proto_bench.py's fake transport:
connection_made, EHLO, QUIT, connection_lost, with the decision log on (a
temporary file), as shipped. Cells: a plain listener; a --proxy-listen one
with a v1 header; with a v2 header (no TLVs); with a v2 header carrying
AUTHORITY, UNIQUE_ID and SSL TLVs; and smtp/proxy.py's parse() alone.
Best of --repeat, µs per connection. Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def v2(tlvs: bytes = b"") -> bytes:
    from mailfilter.smtp.proxy import V2_SIGNATURE
    body = (socket.inet_aton("192.0.2.7") + socket.inet_aton("127.0.0.1")
            + struct.pack("!HH", 40000, 25) + tlvs)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def tlv(t: int, value: bytes) -> bytes:
    return bytes([t]) + struct.pack("!H", len(value)) + value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    import uvloop
    import proto_bench
    import servers
    from mailfilter import log
    from mailfilter.serve.config import ServeOptions
    from mailfilter.serve.lifecycle import build_state
    from mailfilter.smtp.protocol import SMTPProtocol
    from mailfilter.smtp.proxy import parse
    log.setup("info", stream=tempfile.TemporaryFile(mode="w"))
    state = build_state(ServeOptions(rules=servers.norelay_rules(tempfile.mkdtemp()), deliver="discard",
                                     max_per_ip=10**9, max_connections=10**9, remote_host="off"))
    nets = (ipaddress.ip_network("127.0.0.0/8"),)
    headers = {
        "plain listener": None,
        "v1 header": b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n",
        "v2 header": v2(),
        "v2 + TLVs": v2(tlv(0x02, b"mx.example.com") + tlv(0x05, os.urandom(16))
                        + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")
                              + tlv(0x23, b"TLS_AES_256_GCM_SHA384"))),
    }
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def run(header, n):
        t0 = time.process_time()
        for _ in range(n):
            t = proto_bench.FakeTransport()
            p = SMTPProtocol(state, proxy_from=None if header is None else nets)
            p.connection_made(t)
            if header is not None:
                p.data_received(header)
            p.data_received(b"EHLO bench.client.example\r\n")
            p.data_received(b"QUIT\r\n")
            p.connection_lost(None)
        return (time.process_time() - t0) / n * 1e6

    loop.run_until_complete(run(None, 500))
    for name, header in headers.items():
        best = min(loop.run_until_complete(run(header, a.connections)) for _ in range(a.repeat))
        print(f"{name:16} {best:7.2f} µs per connection (connect, [header], EHLO, QUIT)")
    for name in ("v1 header", "v2 header", "v2 + TLVs"):
        h = headers[name]
        n = 100000
        t0 = time.process_time()
        for _ in range(n):
            parse(h)
        print(f"parse {name:10} {(time.process_time() - t0) / n * 1e6:7.2f} µs")
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
