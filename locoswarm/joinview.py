"""What ``locoswarm join`` shows while it runs: download bars, catch-up, then one line per window.

The peer itself knows nothing of this display. Two taps feed it:

- ``ObservedStore`` wraps the run's store and reports every object it downloads, so the
  tokenizer, the data shards and the checkpoint get bars without the peer's code changing;
- ``JoinView.watch`` reads the peer's ``progress.json`` (``node.progress``), the same file
  ``up`` and ``health`` read, for the phase, the window and the last window's figures.

On a terminal the bars redraw in place; elsewhere (``docker logs``, a file) rich prints
them once when they finish, and each applied window is one plain line either way.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from locoswarm.machine import human_bytes
from node.progress import read_progress
from protocol.stores.base import ObjectInfo, Store


class JoinView:
    """Progress bars and status lines for one joining peer (thread-safe).

    One rich ``Progress`` holds every bar (data, checkpoint, catch-up); it is stopped, bars
    left as they are, once the peer trains, and each applied window prints one line.
    """

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[amount]}"), TimeElapsedColumn(), console=console)
        self._lock = threading.Lock()
        self._live = False
        self._data: TaskID | None = None
        self._data_bytes = 0
        self._expected: dict[str, int] = {}
        self._downloads: dict[str, TaskID] = {}
        self._catch_up: TaskID | None = None
        self._last_window: int | None = None

    def say(self, text: str) -> None:
        """A line above the bars (markup allowed)."""
        self.console.print(text, highlight=False)

    def _task(self, description: str, total: float | None) -> TaskID:
        if not self._live:
            self.progress.start()
            self._live = True
        return self.progress.add_task(description, total=total, amount="")

    def _bytes(self, task: TaskID, completed: int, total: int | None, moved: int | None = None) -> None:
        """Show ``completed`` of ``total`` bytes; the rate counts ``moved`` (default: all) bytes."""
        moved = completed if moved is None else moved
        elapsed = self.progress.tasks[task].elapsed or 0.0
        rate = f", {human_bytes(moved / elapsed)}/s" if elapsed > 0.05 and moved else ""
        of = f" of {human_bytes(total)}" if total else ""
        self.progress.update(task, completed=completed, total=total, amount=f"{human_bytes(completed)}{of}{rate}")

    # --------------------------------------------------------------------- downloads
    def expect_data(self, sizes: dict[str, int]) -> None:
        """The data download starts: the tokenizer and shards, bytes by key."""
        with self._lock:
            self._expected = dict(sizes)
            total = sum(sizes.values())
            self._data = self._task(f"data: {len(sizes)} objects (tokenizer, shards)", total)
            self._bytes(self._data, 0, total)

    def data_ready(self) -> None:
        """The peer holds its data: whatever was not downloaded came from the cache."""
        with self._lock:
            if self._data is None:
                return
            total = sum(self._expected.values())
            self._bytes(self._data, total, total, moved=self._data_bytes)
            cached = total - self._data_bytes
            if cached > 0:
                self.progress.update(self._data, description=f"data ready ({human_bytes(cached)} from the cache)")
            else:
                self.progress.update(self._data, description="data ready")

    def download_started(self, key: str, size: int | None) -> None:
        if key.startswith("checkpoints/") and key.endswith(".safetensors"):
            with self._lock:
                task = self._task(f"checkpoint of window {int(key.split('/')[1])}", size)
                self._downloads[key] = task
                self._bytes(task, 0, size)

    def download_finished(self, key: str, n: int) -> None:
        with self._lock:
            if key in self._expected and self._data is not None:
                self._data_bytes += n
                self._bytes(self._data, self._data_bytes, sum(self._expected.values()))
            elif key in self._downloads:
                self._bytes(self._downloads.pop(key), n, n)

    def close(self) -> None:
        """Stop redrawing; the bars stay as they were last drawn."""
        with self._lock:
            if self._live:
                self.progress.stop()
                self._live = False

    # --------------------------------------------------------------------- the peer
    def watch(self, progress_file: Path, newest_window: int, stop: threading.Event) -> threading.Thread:
        """Follow the peer's progress file until ``stop``: catch-up bar, then a line per window."""

        def loop() -> None:
            while not stop.wait(0.5):
                self.update(read_progress(progress_file), newest_window)

        thread = threading.Thread(target=loop, name="join-view", daemon=True)
        thread.start()
        return thread

    def update(self, info: dict[str, Any] | None, newest_window: int) -> None:
        """Show one progress snapshot of the peer."""
        if info is None:
            return
        phase, window = info.get("phase", ""), int(info.get("window", 0))
        with self._lock:
            if phase == "catch-up":
                if self._catch_up is None:
                    self._catch_up = self._task("catching up: replaying decided windows", None)
                total = max(newest_window, window + 1, int(self.progress.tasks[self._catch_up].total or 0))
                self.progress.update(self._catch_up, completed=window, total=total, amount=f"window {window}/{total}")
            elif self._catch_up is not None:
                total = self.progress.tasks[self._catch_up].total
                self.progress.update(self._catch_up, completed=total, amount=f"at window {window}")
                self._catch_up = None
            if phase in ("train", "publish", "wait", "gather", "aggregate", "done") and self._live:
                self.progress.stop()  # training: from here on, one line per window
                self._live = False
            last = info.get("last") or {}
            if self._last_window is None:  # the first snapshot: where the weights came from
                origin = info.get("origin") or {}
                self.console.print(start_line(origin), highlight=False)
                # A resumed peer's last entry is from before the restart: not news.
                self._last_window = last.get("window", -1) if origin.get("from") == "state" else -2
            if "window" in last and last["window"] != self._last_window and phase != "catch-up":
                self._last_window = last["window"]
                self.console.print(window_line(last), highlight=False)


def start_line(origin: dict[str, Any]) -> str:
    """Where the peer's weights came from: its saved state, a checkpoint, or genesis."""
    window = origin.get("window", 0)
    if origin.get("from") == "state":
        return f"resumed   from the saved state at window {window}"
    if origin.get("from") == "checkpoint":
        return f"start     from the verified checkpoint of window {window}"
    return "start     from the genesis weights (window 0)"


def window_line(last: dict[str, Any]) -> str:
    """One line per applied window: losses, peers counted, bytes, digest."""
    if "train_loss" not in last and "replayed" not in last:  # the entry written before any window
        return f"held-out  loss {_loss(last.get('heldout_loss'))} before training (window {last['window'] + 1})"
    if "replayed" in last:
        n = last["replayed"]
        return (f"caught up {n} window{'s' if n != 1 else ''}: at window {last['window'] + 1}, held-out loss "
                f"{_loss(last.get('heldout_loss'))}, digest {last['digest'][:12]}")
    return (f"window {last['window']:>4}  train loss {_loss(last.get('train_loss'))}  held-out "
            f"{_loss(last.get('heldout_loss'))}  peers counted {last.get('included', '?')}  "
            f"sent {human_bytes(last.get('bytes_up', 0))}  received {human_bytes(last.get('bytes_down', 0))}  "
            f"digest {last['digest'][:12]}")


def _loss(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"




class ObservedStore(Store):
    """``inner`` with every ``get`` reported to a ``JoinView``; everything else passes through.

    Listing results are remembered so a download's size is known when it starts.
    """

    def __init__(self, inner: Store, view: JoinView):
        self.inner = inner
        self.view = view
        self.uri = inner.uri
        self._sizes: dict[str, int] = {}

    @property
    def trusted_clock(self) -> bool:  # type: ignore[override]
        return self.inner.trusted_clock

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        self.view.download_started(key, self._sizes.get(key))
        data = self.inner.get(key, max_bytes=max_bytes)
        self.view.download_finished(key, len(data))
        return data

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        found = self.inner.list(prefix)
        if prefix.startswith("checkpoints/"):
            self._sizes.update((o.key, o.size) for o in found)
        return found

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self.inner.put_if_absent(key, data)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Backend extras some callers look for (a p2p store's addresses, an S3 store's stats).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
