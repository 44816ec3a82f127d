"""One process per workdir: the lock every long-running role (peer, validator, join) takes.

Two processes in one workdir would share a key and a state file: both would sign payloads as
the same peer (validators see an equivocating peer) and overwrite each other's resumable
state. So each role holds an exclusive ``flock`` on ``WORKDIR/lock`` for as long as it runs.
The kernel releases it when the process ends, however it ends (``kill -9`` included), so a
crash never leaves a stale lock behind. The holder writes who it is into the file, and a
second process is refused with that in its message.

Under ``torchrun`` only rank 0 takes the lock: the ranks of one peer share its workdir.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.errors import WorkdirInUse

LOCK_FILE = "lock"


@contextmanager
def hold_workdir(workdir: str | os.PathLike, role: str) -> Iterator[Path]:
    """Hold ``workdir`` (created if missing) for this process while the block runs;
    ``WorkdirInUse`` names the process that already holds it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirInUse(
                f"{workdir} is in use by {_holder(path)}: stop that process first, or give this one "
                "another --workdir (each peer or validator needs its own)"
            ) from None
        me = {"role": role, "pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it (it may be mid-write: say what we can)."""
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"a {info['role']} (pid {info['pid']} on {info['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
