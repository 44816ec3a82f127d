"""What a node reports about itself on disk, for ``locoswarm up``, health checks and tests
(which assert on this state, not on log text).

- ``progress.json``: what the node is doing right now (phase, window, digest, totals). One
  small JSON object, replaced atomically (temp file + rename), so a reader never sees half
  of it; rewritten at every phase change and every poll while waiting.
- ``history.jsonl``: one JSON line per applied window (losses, bytes, digest), appended, so
  writing it costs the same at window 10 as at window 10,000.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_progress(path: Path, info: dict[str, Any]) -> None:
    """Replace the progress file at ``path`` with ``info``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".progress-")
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def read_progress(path: Path) -> dict | None:
    """A node's last progress snapshot, or None if it has not written one yet."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class History:
    """A node's per-window history, one JSON object per line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every entry written so far (a torn last line, from a kill mid-write, is skipped)."""
        return read_history(self.path)

    def truncate(self, before_window: int) -> list[dict[str, Any]]:
        """Keep only entries of windows before ``before_window`` (a resumed node replays the
        rest); returns what is kept."""
        kept = [e for e in self.read() if e["window"] < before_window]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".history-")
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(tmp, self.path)
        return kept


def read_history(path: Path) -> list[dict[str, Any]]:
    """The entries of a history file; [] when there is none yet."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
