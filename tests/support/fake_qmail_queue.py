"""A fake qmail-queue (qmail-queue(8) protocol, docs/behaviour/delivery.md#qmail-queue) for tests.

Reads the message from fd 0 to EOF, then the envelope from fd 1 to EOF, writes
them to $FAKEQQ_OUT.msg and $FAKEQQ_OUT.env, and exits with $FAKEQQ_EXIT
(default 0). FAKEQQ_EXIT=kill: SIGKILL itself after reading;
FAKEQQ_EXIT=noread:N exits N without reading anything. FAKEQQ_EXIT=hang
reads the message, then writes its pid and a newline to the fifo $FAKEQQ_READY
(when set), keeps the fifo open and never exits: the test sees the pid, and
EOF on the fifo once the child is dead. FAKEQQ_EXIT=wait:PATH writes the
outputs, then exits 0 once PATH exists (at most 60 s, else exit 81).
"""
import os
import signal
import sys
import time


def read_all(fd: int) -> bytes:
    parts = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(parts)
        parts.append(b)


def main() -> int:
    how = os.environ.get("FAKEQQ_EXIT", "0")
    if how.startswith("noread:"):
        return int(how.split(":", 1)[1])
    msg = read_all(0)
    if how == "hang":
        ready = os.environ.get("FAKEQQ_READY")
        if ready:
            fd = os.open(ready, os.O_WRONLY)
            os.write(fd, b"%d\n" % os.getpid())
        while True:
            signal.pause()
    env = read_all(1)
    out = os.environ["FAKEQQ_OUT"]
    with open(out + ".msg", "wb") as f:
        f.write(msg)
    if how.startswith("wait:"):
        with open(out + ".env", "wb") as f:
            f.write(env)
        go = how.split(":", 1)[1]
        for _ in range(1200):
            if os.path.exists(go):
                return 0
            time.sleep(0.05)
        return 81
    with open(out + ".env", "wb") as f:
        f.write(env)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return int(how)


if __name__ == "__main__":
    sys.exit(main())
