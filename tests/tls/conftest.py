"""The `tls_server` fixture: TLSServer (helpers.py) instances stopped after the test."""
import ssl

import pytest

from tests.tls.helpers import TLSServer


@pytest.fixture
def tls_server():
    servers = []

    def start(context: ssl.SSLContext) -> TLSServer:
        servers.append(TLSServer(context))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
