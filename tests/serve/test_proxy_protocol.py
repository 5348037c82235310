"""`serve --proxy-listen` behind a load balancer (docs/operations.md#behind-a-load-balancer):
the PROXY header names the client everywhere (tcp.smtp, per-IP limits, the
decision log, the Received header); only --proxy-protocol sources may
connect; a bad header closes with one line. Spawned servers, real sockets
bound to 127.0.0.x sources, and a real HAProxy with send-proxy-v2."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time

import pytest

from mailfilter.smtp.proxy import V2_SIGNATURE
from tests.support.server_harness import (
    RELAY, TIMEOUT, RawClient, first, free_port, read_new, spawn_serve, write_rules,
)

LB = "127.0.0.9"            # the load balancer's address: --proxy-protocol
HAPROXY = shutil.which("haproxy")


def v1(src: str, sport: int = 40000, dst: str = "127.0.0.1", dport: int = 25) -> bytes:
    return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int = 40000, tlvs: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, 25) + tlvs
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def tlv(t: int, value: bytes) -> bytes:
    return bytes([t]) + struct.pack("!H", len(value)) + value


@pytest.fixture
def served(tmp_path):
    rules = write_rules(tmp_path / "rules")
    started = []

    def _start(*args):
        pport = free_port()
        sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{tmp_path}/spool",
                         "--proxy-listen", f"127.0.0.1:{pport}", "--proxy-protocol", f"{LB}/32", *args)
        sp.pport = pport
        started.append(sp)
        return sp

    yield _start
    for sp in started:
        sp.stop()


def via_lb(port: int, header: bytes, byte_by_byte: bool = False) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), source_address=(LB, 0), timeout=TIMEOUT)
    s.settimeout(TIMEOUT)
    if byte_by_byte:
        for b in header:
            s.send(bytes([b]))
    else:
        s.sendall(header)
    return s


class Reader:
    """Whole SMTP replies from a socket (multi-line ones joined)."""

    def __init__(self, s: socket.socket):
        self.s, self.buf = s, b""

    def reply(self) -> str:
        while True:
            for i, line in enumerate(self.buf.split(b"\r\n")[:-1]):
                if line[3:4] != b"-":
                    whole = b"\r\n".join(self.buf.split(b"\r\n")[:i + 1])
                    self.buf = self.buf[len(whole) + 2:]
                    return whole.decode()
            chunk = self.s.recv(4096)
            assert chunk, self.buf
            self.buf += chunk

    def cmd(self, line: bytes) -> str:
        self.s.sendall(line + b"\r\n")
        return self.reply()


def greeted_then_quit(port: int, header: bytes) -> None:
    """Through the balancer with `header`: a 220, and QUIT answered."""
    s = via_lb(port, header)
    try:
        r = Reader(s)
        assert r.reply().startswith("220 ")
        assert r.cmd(b"QUIT").startswith("221 ")
    finally:
        s.close()


def closed_at_once(port: int, source: str) -> None:
    """A connection from `source` is closed without a byte."""
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=TIMEOUT)
    try:
        assert s.recv(100) == b""
    finally:
        s.close()


@pytest.mark.parametrize("form", ["v1", "v2", "v1 byte by byte", "v2 byte by byte"])
def test_the_header_names_the_client_everywhere(served, tmp_path, form):
    """RELAY (127.0.0.2) is a RELAYCLIENT in tcp.smtp: through the balancer
    it relays, the log and the Received header name it, not the balancer."""
    sp = served()
    header = (v1 if form.startswith("v1") else v2)(RELAY, 41234)
    s = via_lb(sp.pport, header, byte_by_byte="byte" in form)
    r = Reader(s)
    try:
        assert r.reply().startswith("220 ")
        assert r.cmd(b"EHLO client.test").startswith("250-")
        assert r.cmd(b"MAIL FROM:<a@sender.test>") == "250 2.1.0 ok"
        assert r.cmd(b"RCPT TO:<x@elsewhere.test>").startswith("250 ")     # relayed
        assert r.cmd(b"DATA").startswith("354 ")
        assert r.cmd(b"Subject: via the balancer\r\n\r\nhi\r\n.").startswith("250 ")
    finally:
        s.close()
    sp.log.wait_for(rf"action=proxy client=\[{RELAY}\]:41234 via={LB} version={form[1]} command=PROXY")
    sp.log.wait_for(rf"action=accept stage=RCPT reason=relay_client .*client=unknown\[{RELAY}\]:41234 ")
    [text] = read_new(f"{tmp_path}/spool")
    assert f"({RELAY})".encode() in text and LB.encode() not in text     # the Received line


def test_v2_tlvs_are_logged(served):
    sp = served()
    s = via_lb(sp.pport, v2(RELAY, 40001, tlv(0x02, b"mx.example.com") + tlv(0x05, b"\xab\xcd")
                            + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")
                                  + tlv(0x23, b"TLS_AES_256_GCM_SHA384"))))
    try:
        assert Reader(s).reply().startswith("220 ")
    finally:
        s.close()
    sp.log.wait_for(r"action=proxy .* authority=mx\.example\.com unique_id=abcd "
                    r"ssl=TLSv1\.3/TLS_AES_256_GCM_SHA384")


def test_a_health_check_is_greeted(served):
    """v2 LOCAL (the balancer's own check): a session with its address."""
    sp = served()
    greeted_then_quit(sp.pport, V2_SIGNATURE + b"\x20\x00\x00\x00")
    sp.log.wait_for(rf"action=proxy client=\[{LB}\]:\d+ via={LB} version=2 command=LOCAL")


@pytest.mark.parametrize("header,why", [
    (b"EHLO client.test\r\n", "not a PROXY header"),
    (b"PROXY TCP4 127.0.0.2 127.0.0.1 99999 25\r\n", "not a port"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12, "not a stream"),
])
def test_a_bad_header_closes_with_one_line(served, header, why):
    sp = served()
    s = via_lb(sp.pport, header)
    try:
        assert s.recv(100) == b""                       # closed, nothing said
    finally:
        s.close()
    [line] = sp.log.wait_for(rf"action=refuse stage=CONNECT reason=proxy_header client=\[{LB}\]")
    assert why in line.string


def test_only_the_balancers_may_connect(served):
    """A client that reaches the proxy listener directly is closed at once:
    its header is never guessed (the plain listener still serves it)."""
    sp = served()
    closed_at_once(sp.pport, RELAY)
    sp.log.wait_for(rf"action=refuse stage=CONNECT reason=proxy_source client=\[{RELAY}\]")
    c = RawClient(sp.port, RELAY)
    assert c.reply()[0] == 220
    c.close()


def test_per_ip_limit_counts_the_real_client(served):
    """--max-per-ip 1: two clients through one balancer are both served;
    a second connection of the same client is refused."""
    sp = served("--max-per-ip", "1")
    a = via_lb(sp.pport, v1("127.0.0.21"))
    b = via_lb(sp.pport, v1("127.0.0.22"))
    again = via_lb(sp.pport, v1("127.0.0.21"))
    try:
        assert Reader(a).reply().startswith("220 ")
        assert Reader(b).reply().startswith("220 ")
        assert Reader(again).reply().startswith("421 4.7.0 ")
    finally:
        for s in (a, b, again):
            s.close()


def test_header_before_the_client_hello(tmp_path):
    """--proxy-listen-tls: the header, then implicit TLS (RFC 8314)."""
    rules = write_rules(tmp_path / "rules")
    tport = free_port()
    sp = spawn_serve("--rules", rules, "--deliver", "discard", "--proxy-listen-tls", f"127.0.0.1:{tport}",
                     "--proxy-protocol", LB, cwd=str(tmp_path))
    try:
        raw = socket.create_connection(("127.0.0.1", tport), source_address=(LB, 0), timeout=TIMEOUT)
        raw.sendall(v2(RELAY, 40002))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw) as s:
            s.settimeout(TIMEOUT)
            assert s.recv(200).startswith(b"220 ")
            s.sendall(b"EHLO client.test\r\n")
            assert s.recv(500).startswith(b"250-")
        sp.log.wait_for(rf"action=proxy client=\[{RELAY}\]:40002 via={LB} version=2")
    finally:
        sp.stop()


def test_proxy_listen_needs_its_sources(tmp_path):
    rules = write_rules(tmp_path / "rules")
    r = subprocess.run([os.sys.executable, "-m", "mailfilter", "serve", "--rules", rules,
                        "--proxy-listen", f"127.0.0.1:{free_port()}"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--proxy-listen needs --proxy-protocol" in r.stderr
    r = subprocess.run([os.sys.executable, "-m", "mailfilter", "serve", "--rules", rules,
                        "--proxy-listen", f"127.0.0.1:{free_port()}", "--proxy-protocol", "10.0.0.0/33"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--proxy-protocol '10.0.0.0/33': not an address or CIDR" in r.stderr


def test_listener_tables_each_with_its_balancers(tmp_path):
    """[[listener]] tables in --config: the plain table serves clients
    directly; the proxy table takes only its own balancer, and its header
    names the client (docs/operations.md#listener-tables)."""
    rules = write_rules(tmp_path / "rules")
    port, pport, other_lb = free_port(), free_port(), "127.0.0.10"
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'[[listener]]\nlisten = "127.0.0.1:{port}"\n\n'
                   f'[[listener]]\nlisten = "127.0.0.1:{pport}"\nproxy_protocol = ["{LB}/32"]\n')
    sp = spawn_serve("--config", str(cfg), "--rules", rules, "--deliver", f"maildir:{tmp_path}/spool",
                     port=port, listen=False)
    try:
        sp.log.wait_for(rf"listening on 127\.0\.0\.1:{pport} \(.*STARTTLS, PROXY header from {LB}/32\)")
        greeted_then_quit(pport, v2(RELAY, 40123))
        sp.log.wait_for(rf"action=proxy client=\[{RELAY}\]:40123 via={LB} version=2")
        # another balancer is not one of this listener's
        closed_at_once(pport, other_lb)
        sp.log.wait_for(rf"action=refuse stage=CONNECT reason=proxy_source client=\[{other_lb}\]")
        c = RawClient(port, RELAY)          # the plain table: no header expected
        assert c.reply()[0] == 220
        c.close()
    finally:
        sp.stop()


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)")
def test_behind_a_real_haproxy_send_proxy_v2(served, tmp_path):
    """HAProxy (mode tcp, send-proxy-v2) in front: the client's own address
    reaches the session and the log."""
    sp = served("--proxy-protocol", "127.0.0.1/32")
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  log stdout format raw local0\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend smtp\n  bind 127.0.0.1:{front}\n  default_backend mf\n"
        f"backend mf\n  server mf 127.0.0.1:{sp.pport} send-proxy-v2 source 127.0.0.1\n")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "haproxy did not start"
                time.sleep(0.05)
        c = RawClient(front, RELAY)
        try:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.test")[0] == 250
            assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
            assert first(c.cmd("RCPT TO:<x@elsewhere.test>")).startswith("250 ")     # RELAYCLIENT
        finally:
            c.close()
        sp.log.wait_for(rf"action=proxy client=\[{RELAY}\]:\d+ via=127\.0\.0\.1 version=2 command=PROXY")
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_a_header_that_never_completes_is_closed_at_the_deadline(tmp_path, monkeypatch, decisions):
    """The connection's clock (smtp/clock.py) runs for the header: half a
    header and silence is closed with one line when PROXY_TIMEOUT passes
    (0.2 s here; 10 s as shipped)."""
    import asyncio
    import ipaddress

    from mailfilter.smtp import protocol
    from tests.support.server_harness import make_state

    monkeypatch.setattr(protocol, "PROXY_TIMEOUT", 0.2)
    state = make_state(write_rules(tmp_path / "rules"), "discard")

    class Transport(asyncio.Transport):
        def __init__(self):
            super().__init__()
            self.closed = asyncio.get_running_loop().create_future()

        def get_extra_info(self, name, default=None):
            return {"peername": (LB, 40000), "sockname": ("127.0.0.1", 2525)}.get(name, default)

        def write(self, data):
            raise AssertionError(f"nothing is said before the header: {data!r}")

        def close(self):
            if not self.closed.done():
                self.closed.set_result(True)

        def is_closing(self):
            return self.closed.done()

    async def run():
        t = Transport()
        p = protocol.SMTPProtocol(state, proxy_from=(ipaddress.ip_network(f"{LB}/32"),))
        p.connection_made(t)
        p.data_received(b"PROXY TCP4 192.0.2.7 ")
        await asyncio.wait_for(t.closed, 5)
        p.connection_lost(None)

    asyncio.run(run())
    [line] = [l for l in decisions() if "proxy_header" in l]
    assert line == (f'action=refuse stage=CONNECT reason=proxy_header client=[{LB}] '
                    'detail="no whole header in 0.2 s"')
