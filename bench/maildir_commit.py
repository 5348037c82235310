"""Ad hoc: maildir commits/s with C concurrent committers, 1 KB messages.

usage: [BENCH_DIR=/var/tmp] [SYNC_THREADS=16] PYTHONPATH=. python bench/maildir_commit.py [N] [C ...]
(BENCH_DIR=/dev/shm shows the CPU ceiling: fsync is a no-op on tmpfs.)
Each commit is durable (file fsync, rename, new/ fsync shared per batch).
Besides commits/s: process CPU per commit (user and system: every thread,
the committer's and the kernel's work in fsync included) and voluntary
context switches per commit (thread hand-offs and fsync waits).
Numbers are for comparison in one run, never asserted in tests.
"""
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time

from mailfilter.delivery import Delivery, Envelope

ENV = Envelope("a@example.com", ["b@example.org"], "c.test", "192.0.2.1", "c.test",
               None, False, "mx.test")
BODY = (b"x" * 63 + b"\n") * 16  # 1 KB


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_nvcsw


async def bench(n: int, c: int) -> tuple[float, int, tuple]:
    root = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    options = {}
    if "SYNC_THREADS" in os.environ:
        options["sync_threads"] = int(os.environ["SYNC_THREADS"])
    d = Delivery.from_spec(f"maildir:{root}/Maildir", **options)
    sem = asyncio.Semaphore(c)

    async def one():
        async with sem:
            sink = d.open(ENV)
            sink.write(BODY)
            res = await sink.commit()
            assert res.ok, res

    await asyncio.gather(*(one() for _ in range(20)))  # warm-up
    u0 = _usage()
    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    dt = time.perf_counter() - t
    u1 = _usage()
    batches = d._committer.batches
    await d.close()
    shutil.rmtree(root)
    return n / dt, batches, tuple((b - a) / n for a, b in zip(u0, u1))


def naive(n: int) -> float:
    """Baseline on the same disk: per message write, fsync, rename, fsync new/."""
    root = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    for sub in ("tmp", "new"):
        os.mkdir(os.path.join(root, sub))
    dfd = os.open(os.path.join(root, "new"), os.O_RDONLY)
    t = time.perf_counter()
    for i in range(n):
        tmp = os.path.join(root, "tmp", str(i))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, BODY)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(root, "new", str(i)))
        os.fsync(dfd)
    dt = time.perf_counter() - t
    os.close(dfd)
    shutil.rmtree(root)
    return n / dt


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"naive sequential baseline: {naive(n // 2):7.0f} commits/s")
    for c in [int(x) for x in sys.argv[2:]] or [1, 50]:
        rate, batches, (user, system, vcsw) = asyncio.run(bench(n, c))
        print(f"c={c:3d}  {rate:7.0f} commits/s  ({batches} batches for {n + 20} commits)  "
              f"CPU/commit user {user * 1e6:5.1f} µs sys {system * 1e6:6.1f} µs  "
              f"{vcsw:4.1f} ctx switches")


if __name__ == "__main__":
    main()
