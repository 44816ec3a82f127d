"""Honest accounting of what a node spent: tokens, bytes each way, seconds per phase."""

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

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Accounting:
        return cls(int(d["tokens"]), int(d["bytes_up"]), int(d["bytes_down"]), dict(d["seconds"]))
