"""AUTH benchmarks (issue 4): CRAM-MD5 verifications per second -- Cython from
stored states vs stdlib hmac vs spawning the checkpassword tool per attempt --
and AUTH transactions per second over loopback.

Run: .venv/bin/python -m pytest -q bench/test_bench_auth.py --benchmark-only \
        --benchmark-columns=min,median,mean,ops,rounds
Results go to bench/AUTH.md. Benchmarks only: nothing here asserts a time.

Per-verification rates: the in-process benches do BATCH verifications per
round, so ops/s x BATCH = verifications/s (the table in AUTH.md says which).
"""
import asyncio
import base64
import hmac
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "support"))

from auth_helpers import PY, USERS, ServerThread, make_userdb, serve_opts  # noqa: E402

from mailfilter.core import core  # noqa: E402
from mailfilter.auth.sasl import Credentials, new_challenge  # noqa: E402
from mailfilter.auth.verify import CheckpasswordVerifier, DBVerifier  # noqa: E402

BATCH = 1000
PASSWORD = b"tanstaaftanstaaf"
CHALLENGES = [new_challenge("mx.example.com") for _ in range(BATCH)]
DIGESTS = [hmac.new(PASSWORD, c, "md5").hexdigest().encode() for c in CHALLENGES]
STATES = core.cram_states(PASSWORD)


def test_cram_cython_from_states(benchmark):
    verify, st = core.cram_verify, STATES
    pairs = list(zip(CHALLENGES, DIGESTS))

    def run():
        for c, d in pairs:
            verify(st, c, d)
    benchmark.extra_info["verifications_per_round"] = BATCH
    benchmark(run)
    assert all(verify(st, c, d) for c, d in pairs)


def test_cram_stdlib_hmac_new(benchmark):
    pairs = list(zip(CHALLENGES, DIGESTS))
    new, cmp = hmac.new, hmac.compare_digest

    def run():
        for c, d in pairs:
            cmp(new(PASSWORD, c, "md5").hexdigest().encode(), d)
    benchmark.extra_info["verifications_per_round"] = BATCH
    benchmark(run)


def test_cram_stdlib_hmac_digest(benchmark):
    """The fastest stdlib form (one-shot C HMAC), still needs the clear key."""
    pairs = [(c, bytes.fromhex(d.decode())) for c, d in zip(CHALLENGES, DIGESTS)]
    dig, cmp = hmac.digest, hmac.compare_digest

    def run():
        for c, d in pairs:
            cmp(dig(PASSWORD, c, "md5"), d)
    benchmark.extra_info["verifications_per_round"] = BATCH
    benchmark(run)


@pytest.fixture(scope="module")
def userdb(tmp_path_factory):
    return make_userdb(tmp_path_factory.mktemp("db") / "users.db")


def test_cram_dbverifier_async(benchmark, userdb):
    """The server's built-in path: DB lookup + Cython verify, awaited on a loop."""
    v = DBVerifier(userdb)
    loop = asyncio.new_event_loop()
    creds = [Credentials("CRAM-MD5", "tim", hmac.new(USERS["tim"].encode(), c, "md5").hexdigest().encode(), c)
             for c in CHALLENGES[:100]]

    async def many():
        for c in creds:
            await v.verify(c)

    benchmark.extra_info["verifications_per_round"] = 100
    benchmark(lambda: loop.run_until_complete(many()))
    loop.close()
    v.close()


def test_cram_spawn_cmd5checkpw(benchmark, userdb):
    """One spawned `mailfilter cmd5checkpw` per attempt (Python start-up dominates)."""
    v = CheckpasswordVerifier([PY, "-m", "mailfilter", "cmd5checkpw", "--db", userdb, "true"])
    loop = asyncio.new_event_loop()
    c = CHALLENGES[0]
    cred = Credentials("CRAM-MD5", "tim", hmac.new(USERS["tim"].encode(), c, "md5").hexdigest().encode(), c)
    benchmark.pedantic(lambda: loop.run_until_complete(v.verify(cred)), rounds=10, iterations=1)
    loop.close()


def test_cram_spawn_shell_true(benchmark):
    """Spawn floor: /bin/true as the checkprogram (the cost of fork+exec+wait alone)."""
    v = CheckpasswordVerifier(["/bin/true"])
    loop = asyncio.new_event_loop()
    cred = Credentials("PLAIN", "tim", b"x")
    benchmark.pedantic(lambda: loop.run_until_complete(v.verify(cred)), rounds=50, iterations=1)
    loop.close()


# --- AUTH transactions over loopback ---------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, userdb):
    d = tmp_path_factory.mktemp("srv")
    srv = ServerThread(serve_opts(d, loop="uvloop", auth="+cram", userdb=userdb))
    yield srv
    srv.stop()


def _expect(f, prefix: bytes) -> bytes:
    while True:
        line = f.readline()
        if not line:
            raise EOFError
        if line[3:4] != b"-":
            assert line.startswith(prefix), line
            return line


def auth_transaction(port: int, mech: str) -> None:
    """connect, EHLO, AUTH (CRAM-MD5 or PLAIN), QUIT -- one authenticated session."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _expect(f, b"220")
        s.sendall(b"EHLO bench\r\n")
        _expect(f, b"250")
        if mech == "CRAM-MD5":
            s.sendall(b"AUTH CRAM-MD5\r\n")
            ch = base64.b64decode(_expect(f, b"334")[4:].strip())
            d = hmac.new(USERS["tim"].encode(), ch, "md5").hexdigest().encode()
            s.sendall(base64.b64encode(b"tim " + d) + b"\r\n")
        else:
            s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0tim\0" + USERS["tim"].encode()) + b"\r\n")
        _expect(f, b"235")
        s.sendall(b"QUIT\r\n")
        _expect(f, b"221")


@pytest.mark.parametrize("mech", ["CRAM-MD5", "PLAIN"])
def test_auth_transactions_loopback(benchmark, server, mech):
    auth_transaction(server.port, mech)       # PLAIN: first scrypt, then the success cache
    benchmark(auth_transaction, server.port, mech)
