"""Honest accounting of what a node spent: tokens, bytes each way, seconds per phase, and
how often the store failed it after all of the store's own retries.

Every second of a window is counted in exactly one phase: phases nest (a closer downloads
while it waits), and the innermost one is charged while it runs, the outer one only for the
rest. Only the thread that made the ``Accounting`` is timed; helper threads (a pool of
downloads, the exchange that overlaps training) run inside a phase the main thread holds,
or in none (``background``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PHASES = ("compute", "encode", "upload", "wait", "download", "aggregate", "digest", "eval", "save")
"""compute: the inner steps; encode: pseudo-gradient, error feedback, codec, signature;
download: fetching and decoding payloads; aggregate: aggregation and the outer step."""


@dataclass
class Accounting:
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    store_errors: int = 0
    """Store operations that failed even after retries (outages the node waited out)."""
    background: float = 0.0
    """Seconds of exchanging (deciding, gathering, aggregating) done on a helper thread while
    the next window trained: in no phase, because it cost no wall time of its own."""
    _stack: list[str] = field(default_factory=list, repr=False)
    _since: float = field(default=0.0, repr=False)
    _owner: int = field(default_factory=threading.get_ident, repr=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time inside to ``name`` (and not to the phase it interrupts)."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        if threading.get_ident() != self._owner:  # a helper thread: the main thread's phase counts it
            yield
            return
        self._switch(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()
            self._since = time.perf_counter()

    def claim(self) -> None:
        """Time the calling thread from now on (the thread that runs the node's loop)."""
        self._owner = threading.get_ident()

    def _switch(self, name: str) -> None:
        if self._stack:
            self._charge()
        self._stack.append(name)
        self._since = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "seconds": dict(self.seconds), "store_errors": self.store_errors, "background": self.background}

    def restore(self, d: dict) -> None:
        """Continue the totals saved by ``to_dict`` (a resumed node keeps counting)."""
        self.tokens, self.bytes_up, self.bytes_down = int(d["tokens"]), int(d["bytes_up"]), int(d["bytes_down"])
        self.seconds = dict.fromkeys(PHASES, 0.0) | {k: float(v) for k, v in d["seconds"].items() if k in PHASES}
        self.store_errors = int(d.get("store_errors", 0))
        self.background = float(d.get("background", 0.0))
