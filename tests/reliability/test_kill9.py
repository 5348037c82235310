"""Durability under kill -9 (docs/reliability.md#kill--9-durability).

A real `mailfilter serve --deliver maildir:` process takes mail from a few
concurrent clients and is killed with SIGKILL at a random (seeded) moment,
then started again on the same spool, RELIABILITY_KILLS times. Every message
whose end of data got its 250 must be in new/, complete (the checksum in its
header matches its body); nothing in new/ may be partial
(docs/behaviour/delivery.md#250-means-stored).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import smtplib
import threading
import time

import pytest

from tests.support.server_harness import TIMEOUT, maildir_files, spawn_serve, write_rules

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("RELIABILITY_KILLS", "5"))
SEED = int(os.environ.get("RELIABILITY_SEED", "16"))
CLIENTS = 4
ROUND_MAX = 3.0          # the latest kill after the clients start, seconds
SUM_RX = re.compile(rb"^X-Battery: (\S+) (\w+)$", re.M)


def message(mid: str, rng: random.Random) -> tuple[bytes, str]:
    """A message whose header carries its id and the SHA-256 of its body as
    stored (lines end in LF in the maildir), 100 B to 40 KB."""
    lines = [f"{mid} line {i} {rng.getrandbits(64):016x}" for i in range(rng.randint(2, 600))]
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    head = f"Subject: battery {mid}\r\nX-Battery: {mid} {digest}\r\n\r\n"
    return (head + body.replace("\n", "\r\n")).encode(), digest


def client(port: int, name: str, seed: int, stop: threading.Event, acked: dict) -> None:
    """Send numbered messages until the server dies or `stop`; record the
    ones whose DATA got 250 (smtplib raises for anything else)."""
    rng = random.Random(seed)
    seq = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
                s.ehlo("battery.test")
                while not stop.is_set():
                    seq += 1
                    mid = f"{name}-{seq}"
                    raw, digest = message(mid, rng)
                    s.sendmail("a@sender.test", ["user@example.com"], raw)
                    acked[mid] = digest
        except (OSError, smtplib.SMTPException):
            return          # killed: this round is over for this client


def stored(spool) -> tuple[dict, list]:
    """new/ as {id: checksum ok}, and the names of files that are not whole."""
    found, partial = {}, []
    for name in maildir_files(spool):
        with open(os.path.join(spool, "new", name), "rb") as fh:
            raw = fh.read()
        head, sep, body = raw.partition(b"\n\n")
        m = SUM_RX.search(head)
        if not sep or not m or hashlib.sha256(body).hexdigest() != m.group(2).decode():
            partial.append(name)
            continue
        found[m.group(1).decode()] = True
    return found, partial


def test_acknowledged_mail_survives_kill_9(tmp_path, figures):
    rules = write_rules(tmp_path / "rules")
    spool = str(tmp_path / "spool")
    rng = random.Random(SEED)
    acked: dict[str, str] = {}
    t0 = time.monotonic()
    for rnd in range(KILLS):
        sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{spool}", "--no-tls")
        stop = threading.Event()
        threads = [threading.Thread(target=client, daemon=True,
                                    args=(sp.port, f"r{rnd}c{i}", rng.getrandbits(32), stop, acked))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, ROUND_MAX))     # the random moment of the kill
        sp.proc.kill()
        assert sp.proc.wait(TIMEOUT) == -signal.SIGKILL
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), "a client hung after the kill"
    found, partial = stored(spool)
    lost = sorted(set(acked) - set(found))
    figures.update(kills=KILLS, acknowledged=len(acked), stored=len(found), lost=len(lost),
                   partial=len(partial), tmp_leftovers=len(maildir_files(spool, "tmp")),
                   seconds=round(time.monotonic() - t0, 1))
    assert acked, "no message was acknowledged: the run proves nothing"
    assert lost == [], f"{len(lost)} acknowledged messages lost, e.g. {lost[:5]}"
    assert partial == [], f"partial messages in new/: {partial[:5]}"
