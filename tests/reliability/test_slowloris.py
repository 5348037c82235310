"""Slow clients en masse (docs/reliability.md#slowloris).

A real `mailfilter serve` process gets SLOW_CLIENTS connections from many
loopback addresses that each dribble a command line one byte at a time, so
every read restarts the idle timer: only the command-line deadline
(`--timeout`, counted from a line's first byte, docs/operations.md#limits-and-timeouts)
ends them. Meanwhile a normal client runs whole transactions. The test
asserts what must hold (every slow client is closed by the server with its
421 and one `reason=command_timeout` line, the normal client's every
transaction is accepted) and records the normal client's latency unloaded
and loaded as figures, not as assertions (timings on a shared 2-core host
are not a test's business).
"""
from __future__ import annotations

import asyncio
import os
import resource
import smtplib
import statistics
import time

import pytest

from tests.support.server_harness import TIMEOUT, spawn_serve, write_rules

pytestmark = pytest.mark.slow

SLOW_CLIENTS = int(os.environ.get("RELIABILITY_SLOW_CLIENTS", "2000"))
PER_ADDRESS = 50                 # under the default --max-per-ip (100)
LINE_TIMEOUT = 3                 # --timeout: the command-line deadline, seconds
DRIP = 0.5                       # seconds between a slow client's bytes (< LINE_TIMEOUT)
TRANSACTIONS = 40                # the normal client's, unloaded and loaded each


def transaction_times(port: int, n: int) -> list[float]:
    """n whole transactions (new connection each); seconds per transaction."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
            s.ehlo("normal.test")
            s.sendmail("a@sender.test", ["user@example.com"], f"Subject: {i}\r\n\r\nnormal\r\n")
        times.append(time.perf_counter() - t0)
    return times


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


async def slow_client(port: int, source: str, results: dict) -> None:
    """Greeting, then `EHLO` one byte per DRIP seconds, never a line end:
    returns when the server closes the connection."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        results["connect_failed"] += 1
        return
    try:
        await asyncio.wait_for(reader.readline(), TIMEOUT)      # 220
        results["connected"] += 1
        got = b""
        for byte in b"EHLO slowloris.example.invalid-and-more-and-more" * 4:
            writer.write(bytes([byte]))
            try:
                got = await asyncio.wait_for(reader.read(512), DRIP)
            except asyncio.TimeoutError:
                continue
            break                               # the server spoke (its 421) or closed
        if got.startswith(b"421 "):
            results["closed_421"] += 1
        elif got == b"":
            results["closed_silently"] += 1
        else:
            results["other"] += 1
    except (OSError, asyncio.TimeoutError):
        results["errors"] += 1
    finally:
        writer.close()


async def slow_crowd(port: int, results: dict) -> None:
    addresses = [f"127.0.{2 + i // 250}.{1 + i % 250}" for i in range(SLOW_CLIENTS // PER_ADDRESS + 1)]
    tasks = [asyncio.create_task(slow_client(port, addresses[i // PER_ADDRESS], results))
             for i in range(SLOW_CLIENTS)]
    await asyncio.gather(*tasks)


def test_slow_clients_are_closed_by_the_line_deadline_and_others_are_served(tmp_path, figures):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SLOW_CLIENTS + 256
    if hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need} for {SLOW_CLIENTS} client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    sp = spawn_serve("--rules", write_rules(tmp_path / "rules"), "--deliver", "discard",
                     "--no-tls", "--timeout", str(LINE_TIMEOUT), "--log-level", "info")
    try:
        unloaded = transaction_times(sp.port, TRANSACTIONS)
        results = dict.fromkeys(("connected", "connect_failed", "closed_421", "closed_silently",
                                 "other", "errors"), 0)
        loaded: list[float] = []

        async def both():
            crowd = asyncio.create_task(slow_crowd(sp.port, results))
            await asyncio.sleep(DRIP * 2)       # the crowd is connected and dribbling
            loaded.extend(await asyncio.to_thread(transaction_times, sp.port, TRANSACTIONS))
            await crowd

        t0 = time.monotonic()
        asyncio.run(both())
        elapsed = time.monotonic() - t0
        closes = sp.log.wait_for(r"action=close reason=command_timeout", count=results["connected"],
                                 timeout=30)
    finally:
        sp.stop()
    figures.update(slow_clients=SLOW_CLIENTS, connected=results["connected"],
                   closed_421=results["closed_421"], command_timeout_lines=len(closes),
                   normal_p50_ms=round(statistics.median(unloaded) * 1000, 1),
                   normal_p99_ms=round(p99(unloaded) * 1000, 1),
                   loaded_p50_ms=round(statistics.median(loaded) * 1000, 1),
                   loaded_p99_ms=round(p99(loaded) * 1000, 1), seconds=round(elapsed, 1))
    assert results["connect_failed"] == results["errors"] == results["other"] == 0, results
    assert results["connected"] == SLOW_CLIENTS
    assert results["closed_421"] == SLOW_CLIENTS          # each ended by the server, with its 421
    assert len(loaded) == TRANSACTIONS                     # every normal transaction was accepted
