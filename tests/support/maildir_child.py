"""Child process for maildir failure tests (real kernel failures).

usage: maildir_child.py efbig DIR LIMIT SIZE
    RLIMIT_FSIZE=LIMIT with SIGXFSZ ignored, so writes past LIMIT fail with
    EFBIG; writes SIZE bytes through a maildir Sink, commits, prints the
    reply line and the contents of tmp/ and new/ as JSON.
usage: maildir_child.py stall DIR SIZE
    writes SIZE bytes through a Sink, prints "WRITING <tmpfile-count>" and
    blocks reading stdin forever: the parent SIGKILLs it mid-message.
"""
import asyncio
import json
import os
import resource
import signal
import sys

from mailfilter.delivery import Delivery, Envelope

ENV = Envelope("a@example.com", ["b@example.org"], "client.test", "192.0.2.1",
               "client.test", None, False, "mx.test")


async def efbig(path: str, limit: int, size: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    d = Delivery.from_spec("maildir:" + path)
    sink = d.open(ENV)
    line = b"x" * 1023 + b"\n"
    for _ in range(size // 1024):
        sink.write(line)
    res = await sink.commit()
    await d.close()
    print(json.dumps({"reply": str(res.reply), "ok": res.ok, "detail": res.detail,
                      "tmp": os.listdir(os.path.join(path, "tmp")),
                      "new": os.listdir(os.path.join(path, "new"))}), flush=True)


def stall(path: str, size: int) -> None:
    d = Delivery.from_spec("maildir:" + path)
    sink = d.open(ENV)
    line = b"y" * 1023 + b"\n"
    for _ in range(size // 1024):
        sink.write(line)
    print("WRITING", len(os.listdir(os.path.join(path, "tmp"))), flush=True)
    sys.stdin.read()  # the parent kills us here, in the middle of the message


if __name__ == "__main__":
    if sys.argv[1] == "efbig":
        asyncio.run(efbig(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        stall(sys.argv[2], int(sys.argv[3]))
