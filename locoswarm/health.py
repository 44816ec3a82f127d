"""``locoswarm health --workdir DIR``: is the peer or validator using DIR still making progress?

Made for container healthchecks (``HEALTHCHECK`` in ``docker/Dockerfile``), which run it
every minute inside the container, so it reads a few files and imports neither torch nor
the node. It judges by what the process writes, never by asking it: a peer rewrites
``progress.json`` at every phase of a window (train, publish, wait, aggregate, done), and a
validator writes ``dashboard.url`` when it starts and ``state.safetensors`` after every
window it scores. A process that hangs, deadlocks or died stops touching them.

A healthy process goes at most about one window length between writes (a peer waits for
the window's deadline; a validator for the window's close record), so ``max_age`` should be
a few window lengths; loading data or a checkpoint at start is longer, which is what a
healthcheck's start period is for.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HEARTBEATS = ("progress.json", "state.safetensors", "dashboard.url")
"""The files a running peer or validator rewrites, newest-wins."""


def check(workdir: Path, max_age: float, *, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, one-line reason)`` for the process writing into ``workdir``."""
    now = time.time() if now is None else now
    seen = {}
    for name in HEARTBEATS:
        try:
            seen[name] = (workdir / name).stat().st_mtime
        except OSError:
            continue
    if not seen:
        return False, f"{workdir}: no {', '.join(HEARTBEATS)} yet: nothing has started here"
    name, mtime = max(seen.items(), key=lambda item: item[1])
    age = max(0.0, now - mtime)  # a clock step backwards must not read as staleness
    what = f"{name} written {age:.0f}s ago{_describe_progress(workdir / 'progress.json')}"
    if age > max_age:
        return False, f"{workdir}: {what}, more than --max-age {max_age:.0f}s: stuck or gone"
    return True, f"{workdir}: {what}"


def _describe_progress(path: Path) -> str:
    """", window W, phase P" from a peer's progress file, or "" (a validator has none)."""
    try:
        info = json.loads(path.read_text())
        return f", window {int(info['window'])}, phase {info['phase']}"
    except (OSError, ValueError, TypeError, KeyError):
        return ""


def run(workdir: str | Path, max_age: float) -> int:
    """Print the one-line verdict; exit status 0 when healthy, 1 when not."""
    healthy, reason = check(Path(workdir), max_age)
    print(("ok: " if healthy else "unhealthy: ") + reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1
