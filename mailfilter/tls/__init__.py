"""TLS for the server: what the sessions need to know (TLSSettings), the
SSLContext built from the operator's certificates (tls/context.py) and the
embedded self-signed default (tls/selfsigned.py).

TLSSettings is built at start and on every SIGHUP by serve/lifecycle.py and
swapped into ServerState as a whole (ServerState.swap_tls): a session keeps
the settings it started with.
"""
from __future__ import annotations

import dataclasses
import ssl


@dataclasses.dataclass(frozen=True)
class TLSSettings:
    """The server's TLS as the SMTP side sees it."""
    context: ssl.SSLContext | None = None   # None: no TLS (--no-tls): STARTTLS not offered
    required: bool = False          # --require-tls: 530 5.7.0 before MAIL without TLS (RFC 3207 §4)
    plaintext_auth: bool = False    # --auth-plaintext: PLAIN/LOGIN offered before TLS too
    handshake_timeout: float = 30.0  # seconds for a TLS handshake (STARTTLS or implicit)

    @property
    def available(self) -> bool:
        return self.context is not None


NO_TLS = TLSSettings()
