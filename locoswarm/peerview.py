"""What a person running ``locoswarm peer`` sees: a live table in a terminal, plain log lines
otherwise, and a summary when the peer stops.

The view reads only what the peer writes into its workdir (``node/progress.py``):
``progress.json`` (the phase it is in now) and ``history.jsonl`` (one line per applied
window), so it never slows or changes the window loop. Warnings the peer logs (a payload it
had to wait for, a proposal it voted against and why, junk it ignored) are counted and the
newest are shown in the table; in plain mode they are logged as they happen anyway.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

from locoswarm.status import human_ago
from node.progress import read_progress
from validator.charts import human_bytes

log = logging.getLogger("locoswarm.peer")

PHASES = {
    "train": "training", "publish": "publishing its payload", "wait": "waiting for the window's decision",
    "gather": "fetching the counted payloads", "aggregate": "aggregating", "done": "window applied",
    "catch-up": "catching up on decided windows", "finished": "finished",
}
SHOWN_WINDOWS = 6
"""Newest windows the live table lists."""
SHOWN_PROBLEMS = 3


class _Warnings(logging.Handler):
    """Counts WARNING and worse records and keeps the newest few, for the table."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.newest: deque[str] = deque(maxlen=SHOWN_PROBLEMS)

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.newest.append(record.getMessage()[:200])


class HistoryTail:
    """The entries appended to a history file since ``since`` (unix time), read
    incrementally; a rewritten file (a resumed peer truncates its history) is reread."""

    def __init__(self, path: Path, since: float):
        self.path = path
        self.since = since
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self.entries: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """New entries since the last poll."""
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset, self._partial = st.st_ino, 0, b""
            self.entries = []  # the file was rewritten (or is new): read it again
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        new = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("time", 0) >= self.since and "window" in entry:
                new.append(entry)
        self.entries.extend(new)
        return new


def _loss(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def describe_window(entry: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """One plain line for an applied window."""
    if "replayed" in entry:
        return (f"caught up {entry['replayed']} decided windows; now after window {entry['window']}, "
                f"held-out loss {_loss(entry.get('heldout_loss'))}")
    if "included" not in entry:  # the model a peer starts from, written before its first window
        where = "genesis" if entry["window"] < 0 else f"the model after window {entry['window']}"
        return f"starting from {where}: held-out loss {_loss(entry.get('heldout_loss'))}"
    up, down = _window_bytes(entry, previous)
    ours = "" if "counted" not in entry else (", ours counted" if entry["counted"] else ", ours NOT counted")
    return (f"window {entry['window']}: train loss {_loss(entry.get('train_loss'))}, held-out "
            f"{_loss(entry.get('heldout_loss'))}, {entry.get('included', 0)} payloads kept{ours}, "
            f"up {human_bytes(up)}, down {human_bytes(down)}, digest {entry['digest'][:8]}")


def _window_bytes(entry: dict[str, Any], previous: dict[str, Any] | None) -> tuple[int, int]:
    if previous is None:
        return entry.get("payload_bytes") or 0, 0
    return entry["bytes_up"] - previous["bytes_up"], entry["bytes_down"] - previous["bytes_down"]


class PeerView:
    """Shows the peer writing into ``workdir``: ``start()`` before the peer runs, ``stop()``
    (which prints the summary) when it ends, however it ends."""

    def __init__(self, workdir: Path, *, console: Console | None = None, interval: float = 1.0):
        self.workdir = Path(workdir)
        self.console = console or Console(stderr=True)
        self.interval = interval
        self.started = time.time()
        self.tail = HistoryTail(self.workdir / "history.jsonl", since=self.started)
        self.warnings = _Warnings()
        self._live: Live | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._handlers: list[logging.Handler] = []
        self._logged = 0

    @property
    def live(self) -> bool:
        return self._live is not None

    def start(self) -> PeerView:
        root = logging.getLogger()
        root.addHandler(self.warnings)
        if self.console.is_terminal:
            # Log records go above the live table instead of through it.
            self._handlers = [h for h in root.handlers if h is not self.warnings]
            for h in self._handlers:
                root.removeHandler(h)
            root.addHandler(RichHandler(console=self.console, show_path=False, level=root.level))
            self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=2,
                              transient=False, redirect_stderr=False)
            self._live.start()
        else:
            self._thread = threading.Thread(target=self._log_windows, name="peer-view", daemon=True)
            self._thread.start()
        return self

    def _log_windows(self) -> None:
        while not self._stop.wait(self.interval):
            self._log_new()

    def _log_new(self) -> None:
        self.tail.poll()
        entries = self.tail.entries
        for i in range(min(self._logged, len(entries)), len(entries)):
            log.info("%s", describe_window(entries[i], entries[i - 1] if i else None))
        self._logged = len(entries)

    def stop(self) -> None:
        """Stop showing, and print the summary of this session."""
        root = logging.getLogger()
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.stop()
            for h in list(root.handlers):
                if isinstance(h, RichHandler):
                    root.removeHandler(h)
            for h in self._handlers:
                root.addHandler(h)
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._log_new()
        root.removeHandler(self.warnings)
        for line in self.summary():
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    # ------------------------------------------------------------------ what is shown
    def render(self) -> Group:
        """The live table: now, then the newest windows."""
        self.tail.poll()
        info = read_progress(self.workdir / "progress.json")
        now = time.time()
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        if info is None:
            head.add_row("peer", f"starting: loading data and building the model ({human_ago(now - self.started)})")
            return Group(head)
        acct = info.get("accounting", {})
        head.add_row("peer", f"{info['peer']}, running for {human_ago(now - self.started)}")
        head.add_row("window", f"{info['window']}: {PHASES.get(info['phase'], info['phase'])}")
        entries = self.tail.entries
        last = entries[-1] if entries else info.get("last") or {}
        head.add_row("loss", f"train {_loss(last.get('train_loss'))}   held-out {_loss(last.get('heldout_loss'))}"
                             + (f" (after window {last['window']})" if "window" in last else ""))
        head.add_row("bytes", f"up {human_bytes(acct.get('bytes_up', 0))}, down {human_bytes(acct.get('bytes_down', 0))} "
                              f"in total")
        if "counted" in last:
            head.add_row("payloads", f"{last.get('included', 0)} kept in window {last['window']}; ours "
                                     + ("counted" if last["counted"] else "NOT counted (late or refused: see warnings)"))
        head.add_row("warnings", f"{self.warnings.count}" + "".join(f"\n{m}" for m in self.warnings.newest))
        head.add_row("digest", f"{info['digest'][:16]}  ({_origin(info)})")
        table = Table(title=None, expand=False)
        for col in ("window", "train loss", "held-out", "kept", "ours", "up", "down"):
            table.add_column(col, justify="right")
        shown = entries[-SHOWN_WINDOWS:]
        first = len(entries) - len(shown)
        for i, e in enumerate(shown, first):
            up, down = _window_bytes(e, entries[i - 1] if i else None)
            table.add_row(str(e["window"]), _loss(e.get("train_loss")), _loss(e.get("heldout_loss")),
                          str(e.get("included", "")), "" if "counted" not in e else ("yes" if e["counted"] else "NO"),
                          human_bytes(up), human_bytes(down))
        return Group(head, table) if shown else Group(head)

    def summary(self) -> list[str]:
        """What this session did, in a few lines."""
        info = read_progress(self.workdir / "progress.json") or {}
        windows = [e for e in self.tail.entries if "included" in e]
        lines = [f"peer stopped after {human_ago(time.time() - self.started)}"
                 + (f" at window {info['window']} ({PHASES.get(info['phase'], info['phase'])})" if info else "")]
        if not windows:
            lines.append("no window was trained in this session")
            return lines
        first, last = windows[0], windows[-1]
        heldout = [e["heldout_loss"] for e in windows if e.get("heldout_loss") is not None]
        counted = sum(1 for e in windows if e.get("counted"))
        acct = info.get("accounting", {})
        trained = f"window {first['window']}" if len(windows) == 1 else \
            f"windows {first['window']}-{last['window']} ({len(windows)})"
        lines.append(f"trained {trained}; our payload counted in {counted} of {len(windows)}")
        if heldout:
            lines.append(f"held-out loss {heldout[0]:.4f}" + (f" -> {heldout[-1]:.4f}" if len(heldout) > 1 else ""))
        lines.append(f"sent {human_bytes(acct.get('bytes_up', 0))}, received {human_bytes(acct.get('bytes_down', 0))} "
                     f"in total; {self.warnings.count} warnings")
        seconds = acct.get("seconds") or {}
        if seconds:
            lines.append("seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
        lines.append(f"digest {last['digest']}")
        return lines


def _origin(info: dict[str, Any]) -> str:
    origin = info.get("origin") or {}
    where = {"state": "resumed from its state", "checkpoint": "started from a checkpoint",
             "genesis": "started from genesis"}.get(origin.get("from"), "started")
    return f"{where} at window {origin.get('window', '?')}, {info.get('replayed', 0)} windows replayed"
