"""A real redis-server (Debian's package) on a loopback port, for tests.

`RedisServer` starts `redis-server --bind 127.0.0.1 --port P --save ""
--appendonly no` in a temporary directory and waits (bounded) until it
answers PING; `kill()` ends it at once (SIGKILL: a Redis that dies
mid-run), `start()` brings it back on the same port. The `redis_server`
fixture gives a started one per test and stops it after; tests skip, saying
why, only when redis-server is not installed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from tests.support.server_harness import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


def installed() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(0.5)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="mf-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: gone at once, as a crashed Redis."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(START_TIMEOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self):
        """A synchronous redis-py client, to look at the keys."""
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server():
    if not installed():
        pytest.skip(f"redis-server is not installed ({REDIS_SERVER}): apt-get install redis-server")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()
