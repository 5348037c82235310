"""Certificates for the next-hop TLS tests: a CA (tests/support/certs.py)
that issues server certificates by DNS names and IP addresses, and the
fake next hop's server SSLContext. Made in the test run, never checked in.
"""
from __future__ import annotations

import ipaddress
import ssl

from cryptography import x509

from tests.support import certs


class CA:
    """A throwaway CA whose PEM file is `file` (for tls_ca=)."""

    def __init__(self, directory: str, name: str = "mailfilter test CA") -> None:
        self.directory = directory
        self._ca = certs.make_ca(directory, name=name)
        self.file = str(self._ca.cert)

    def issue(self, stem: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              expired: bool = False) -> tuple[str, str]:
        """A server certificate with these DNS names and IP addresses as
        subjectAltNames (besides `stem`, its CN): (cert file, key file)."""
        sans = (*(x509.DNSName(d) for d in dns), *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips))
        pair = certs.write_pair(self.directory, host=stem, alt_names=sans, name=stem,
                                issuer=self._ca, expired=expired)
        return str(pair.cert), str(pair.key)


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The fake next hop's side: that certificate, the ssl module's defaults."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx
