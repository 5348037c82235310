"""The HTTP endpoint Prometheus scrapes (`--metrics HOST:PORT`).

Job: serve a registry at http://HOST:PORT/metrics from prometheus_client's
own HTTP server, in a daemon thread: a scrape never runs on the SMTP event
loop and never waits for it. The address is bound at start, so a port in
use is a start-up error (exit 2, one line naming --metrics) like the SMTP
listeners' (docs/operations.md#metrics).

Invariant: `close()` stops the thread and closes the socket; a forked
worker calls `close_in_child()`, which only closes its copy of the
listening socket (the thread serving it lives in the parent).
"""
from __future__ import annotations

from prometheus_client import start_http_server


class EndpointError(Exception):
    """The endpoint cannot listen: one line, exit 2."""


class Endpoint:
    def __init__(self, host: str, port: int, registry, flag: str = "--metrics"):
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise EndpointError(f"{flag} {where}: {exc.strerror or exc}") from None
        self.host = host
        self.port = self.server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def close_in_child(self) -> None:
        self.server.socket.close()
