"""Shared pieces for the AUTH tests: a rules dir, a user DB, a server in a thread,
a syslog socket.

The server runs the real ServerState/SMTPProtocol on a real loop (asyncio or
uvloop) in a background thread, listening on 127.0.0.1 port 0; tests talk to
it with real clients (smtplib, swaks).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import threading

from mailfilter.serve.config import ServeOptions
from mailfilter.serve.lifecycle import build_state, new_loop
from mailfilter.smtp.protocol import SMTPProtocol
from mailfilter.auth.userdb import UserDB

PY = sys.executable
TOOL = [PY, "-m", "mailfilter"]

# 127.0.0.1: AUTH per --auth; 127.0.0.2: AUTH required (!+cram); 127.0.0.3: AUTH off
TCP_SMTP = """\
127.0.0.2:allow,SMTPAUTH="!+cram"
127.0.0.3:allow,SMTPAUTH="-"
:allow
"""

USERS = {"tim": "tanstaaftanstaaf", "alice": "wonder land:42", "bob": "b0b"}


def make_rules(root) -> str:
    d = os.path.join(str(root), "rules")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "rcpthosts"), "w") as fh:
        fh.write("example.com\n")
    with open(os.path.join(d, "me"), "w") as fh:
        fh.write("mx.test\n")
    with open(os.path.join(d, "tcp.smtp"), "w") as fh:
        fh.write(TCP_SMTP)
    return d


def make_userdb(path, users=USERS, **attrs) -> str:
    path = str(path)
    with UserDB(path, scrypt_n=1 << 10) as db:
        db.put_many([db.make_user(u, p.encode(), **attrs) for u, p in users.items()])
    return path


class ServerThread:
    """build_state(opts) served on its own loop in a thread."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        # AUTH in clear is what these tests are about: no TLS, so PLAIN and
        # LOGIN are offered before STARTTLS (docs/behaviour/tls.md#auth-and-tls)
        self.state = build_state(dataclasses.replace(opts, no_tls=True))
        self.loop = new_loop(opts.loop)
        self.port = None
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)

            async def start():
                self.server = await self.loop.create_server(
                    lambda: SMTPProtocol(self.state), "127.0.0.1", 0)
                self.port = self.server.sockets[0].getsockname()[1]
                ready.set()
            self.loop.run_until_complete(start())
            self.loop.run_forever()
            self.server.close()
            self.loop.run_until_complete(self.server.wait_closed())
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("server did not start")

    def stop(self):
        # the state store's connections are the loop's: closed on it, as serve does
        asyncio.run_coroutine_threadsafe(self.state.anvil.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.state.auth.close()


def serve_opts(tmp_path, loop="asyncio", **kw) -> ServeOptions:
    # remote_host off: AUTH tests are not about host names, and no connection
    # should wait on the system resolver (it may be unreachable in CI)
    opts = ServeOptions(rules=make_rules(tmp_path), listen=["127.0.0.1:0"],
                        deliver=f"maildir:{tmp_path}/spool", loop=loop, auth_fail_delay=0.01,
                        remote_host="off")
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


class SyslogSink:
    """A unix datagram socket bound in a temp dir: a stand-in for /dev/log."""

    def __init__(self, directory):
        self.path = os.path.join(str(directory), "log.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(5)

    def lines(self) -> list[str]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode("utf-8", "replace"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5)
        return out

    def close(self):
        self.sock.close()


def auth_plain_from(port: int, source: str, user: str, pw: str, tries: int = 1) -> list[int]:
    """`tries` AUTH PLAIN attempts in one session from the client address
    `source` (any of 127.0.0.0/8 on loopback, so tests can act from several
    client networks); the reply codes."""
    import base64
    import smtplib
    s = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        s.ehlo("client.test")
        arg = "PLAIN " + base64.b64encode(f"\0{user}\0{pw}".encode()).decode()
        return [s.docmd("AUTH", arg)[0] for _ in range(tries)]
    finally:
        s.close()
