"""Honest accounting of what a node spent: tokens, bytes each way, seconds per phase, and
how often the store failed it after all of the store's own retries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

PHASES = ("compute", "upload", "wait", "download", "aggregate")


@dataclass
class Accounting:
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    store_errors: int = 0
    """Store operations that failed even after retries (outages the node waited out)."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def to_dict(self) -> dict:
        return asdict(self)

    def restore(self, d: dict) -> None:
        """Continue the totals saved by ``to_dict`` (a resumed node keeps counting)."""
        self.tokens, self.bytes_up, self.bytes_down = int(d["tokens"]), int(d["bytes_up"]), int(d["bytes_down"])
        self.seconds = dict.fromkeys(PHASES, 0.0) | {k: float(v) for k, v in d["seconds"].items()}
        self.store_errors = int(d.get("store_errors", 0))
