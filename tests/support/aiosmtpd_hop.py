"""aiosmtpd as a next hop: a server we did not write, on 127.0.0.1.

`next_hop(**kwargs)` starts aiosmtpd's Controller (its keyword arguments,
e.g. `enable_SMTPUTF8=True`) on a free port and yields (port, got): `got`
lists every message it took as (MAIL FROM, RCPT TOs, MAIL parameters, the
message bytes as received), recorded before its 250 is sent; the server is
stopped when the block ends. The tests skip when aiosmtpd is missing (it is
the bench extra).
"""
from __future__ import annotations

import contextlib
import socket

import pytest


@contextlib.contextmanager
def next_hop(**kwargs):
    controller_mod = pytest.importorskip("aiosmtpd.controller")
    got: list[tuple] = []

    class Keep:
        async def handle_DATA(self, server, session, envelope):
            got.append((envelope.mail_from, envelope.rcpt_tos, envelope.mail_options,
                        envelope.original_content))
            return "250 2.0.0 kept"

    with socket.socket() as s:          # aiosmtpd's Controller takes a port, not 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = controller_mod.Controller(Keep(), hostname="127.0.0.1", port=port, **kwargs)
    ctl.start()
    try:
        yield port, got
    finally:
        ctl.stop()
