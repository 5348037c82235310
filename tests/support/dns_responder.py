"""A tiny UDP DNS server on 127.0.0.1:0 for the DNS-check tests, built on dnspython.

    with DnsResponder({("ok.test", "MX"): ["10 mx.ok.test."],
                       ("ok.test", "A"): ["192.0.2.1"],
                       "nx.test": "NXDOMAIN",
                       "fail.test": "SERVFAIL",
                       ("nodata.test", "MX"): []}) as dns:
        Resolver(f"127.0.0.1:{dns.port}")

Keys are a name (every type) or (name, type); values are a list of rdata in
zone-file text (an empty list = NOERROR with no answer), "NXDOMAIN",
"SERVFAIL", "REFUSED" or "DROP" (no answer at all: the client times out).
A name that is not in the table at all answers NXDOMAIN. Every query is
recorded as (name, type) before it is answered, and `wait_query()` blocks
(bounded) until a given one has arrived. PTR names are written as usual:
("21.0.0.127.in-addr.arpa", "PTR"): ["host.test."].
"""
from __future__ import annotations

import select
import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

_RCODES = {"NXDOMAIN": dns.rcode.NXDOMAIN, "SERVFAIL": dns.rcode.SERVFAIL,
           "REFUSED": dns.rcode.REFUSED}


class DnsResponder:
    def __init__(self, table: dict, ttl: int = 60, port: int = 0):
        self.table = {}
        for key, value in table.items():
            if isinstance(key, tuple):
                name, rdtype = key
                key = (name.lower().rstrip("."), rdtype.upper())
            else:
                key = key.lower().rstrip(".")
            self.table[key] = value
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._arrived = threading.Condition()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))    # 0: any free port (the tests)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-responder", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "DnsResponder":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def wait_query(self, name: str, rdtype: str, since: int = 0, timeout: float = 10.0) -> bool:
        """True once (name, rdtype) was asked after the first `since` queries
        (pass len(self.queries) taken before), False after `timeout` s."""
        key = (name.lower().rstrip("."), rdtype.upper())
        with self._arrived:
            return self._arrived.wait_for(lambda: key in self.queries[since:], timeout)

    def _lookup(self, name: str, rdtype: str):
        value = self.table.get((name, rdtype))
        if value is None:
            value = self.table.get(name)
        if value is None:
            # a name known under another type exists: NOERROR, no data
            if any(isinstance(k, tuple) and k[0] == name for k in self.table):
                return []
            return "NXDOMAIN"
        return value

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        with self._arrived:
            self.queries.append((name, rdtype))
            self._arrived.notify_all()
        value = self._lookup(name, rdtype)
        if value == "DROP":
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if isinstance(value, str):
            resp.set_rcode(_RCODES[value])
        elif value:
            rrset = dns.rrset.from_text_list(q.name, self.ttl, dns.rdataclass.IN, q.rdtype, value)
            resp.answer.append(rrset)
        return resp.to_wire()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                wire, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            try:
                out = self.answer(wire)
            except Exception:       # a malformed query: drop it, keep serving
                continue
            if out is not None:
                self.sock.sendto(out, addr)
