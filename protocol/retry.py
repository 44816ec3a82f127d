"""The one retry and timeout policy every network layer reads.

Before this module each layer had its own: botocore retried a request four times, the S3
store reconnected on top, the exchange fetched a payload four times on top of that, the
presigned reader retried three times, and publish and close had loops of their own: up to
32 requests for one payload, and nothing checked how the limits related.

Now there is one layer of retries, here. Backends make *one* attempt per call (botocore
retries are off) and translate failures into ``protocol.errors``; ``RetryPolicy.call``
retries only ``RETRYABLE`` errors (timeouts, outages) with full-jitter exponential backoff
(AWS Architecture Blog, "Exponential Backoff And Jitter"), and stops at ``attempts`` tries
or at a caller's deadline, whichever comes first. Every other ``StoreError`` (not found,
too large, access denied, missing bucket) is final and surfaces at once.

The policy is local to one machine (how patient *this* peer is with *its* link), so it is
not part of the hashed run manifest.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from protocol.errors import RETRYABLE

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for one request, and how often to try again."""

    request_timeout: float = 20.0
    """Seconds one request may wait for the server: connecting, and each read of a body."""
    attempts: int = 4
    """Tries of one operation (the first included) after a timeout or an outage."""
    backoff_base: float = 0.2
    """Seconds: the backoff before try n+1 is uniform in [0, min(backoff_cap, base * 2^n)]."""
    backoff_cap: float = 5.0
    """Seconds: the longest single backoff."""
    object_seconds: float = 300.0
    """Total seconds one object download may take, all tries and backoffs included: a
    server that trickles bytes costs at most this, however often it sends one."""
    min_bytes_per_second: float = 64 * 1024
    """An object whose size is known must arrive at least this fast (after one request
    timeout of slack): a 100 KB payload trickled a byte at a time is cut after about
    ``request_timeout`` seconds, not ``object_seconds``."""

    def download_seconds(self, size: int | None) -> float:
        """How long a download of ``size`` bytes may take in all."""
        if size is None:
            return self.object_seconds
        return min(self.object_seconds, self.request_timeout + size / self.min_bytes_per_second)

    def __post_init__(self) -> None:
        if self.request_timeout <= 0 or self.attempts < 1:
            raise ValueError("request_timeout must be > 0 and attempts >= 1")
        if self.min_bytes_per_second <= 0:
            raise ValueError("min_bytes_per_second must be > 0")
        if not 0 <= self.backoff_base <= self.backoff_cap:
            raise ValueError("need 0 <= backoff_base <= backoff_cap")
        if self.object_seconds < self.request_timeout:
            raise ValueError(
                f"object_seconds ({self.object_seconds}) must be at least request_timeout "
                f"({self.request_timeout}): one download must be allowed one full request"
            )

    @property
    def connect_timeout(self) -> float:
        """Seconds to open a connection: a quarter of the request timeout, at least 1 s."""
        return max(1.0, self.request_timeout / 4)

    def backoff(self, attempt: int) -> float:
        """Full-jitter backoff before try ``attempt + 1`` (``attempt`` counts from 0)."""
        return random.uniform(0.0, min(self.backoff_cap, self.backoff_base * (2**attempt)))

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str,
        deadline: float | None = None,
        attempts: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """``fn()``, tried again after ``RETRYABLE`` errors; any other error passes at once.

        Stops after ``attempts`` tries (default: the policy's; ``0`` means no limit, only the
        deadline) or when the next backoff would end past ``deadline`` (unix seconds), and
        then raises the last error. ``what`` names the operation in log lines.
        """
        limit = self.attempts if attempts is None else attempts
        attempt = 0
        while True:
            try:
                return fn()
            except RETRYABLE as exc:
                attempt += 1
                delay = self.backoff(attempt - 1)
                out_of_tries = limit and attempt >= limit
                if out_of_tries or (deadline is not None and clock() + delay > deadline):
                    raise
                log.info("%s failed (%s); try %d in %.2f s", what, exc, attempt + 1, delay)
                sleep(delay)
