"""Publish, close and gather: how one window's payloads move between peers through a store.

``publish`` writes our signed payload once (``put_if_absent``: a payload, once listed in a
close record, never changes). ``close`` waits until the window is complete (every expected
peer published, or the deadline passed), then either writes the close record itself or
reads the one another peer wrote first. ``gather`` fetches and verifies exactly the
payloads a close record lists. A bad or missing payload costs only that payload: each
rejection comes back as ``(peer, reason)``, never as an exception out of the window.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node.accounting import Accounting
from protocol import paths
from protocol.close import CloseRecord, Included, make_close_record, read_close_record
from protocol.errors import LocoError, ObjectNotFound, PayloadRejected, StoreError
from protocol.identity import Identity
from protocol.stores.base import Store
from protocol.wire import Expectation, Payload, decode_payload

log = logging.getLogger(__name__)


@dataclass
class Gathered:
    """The verified payloads of a window, and why any listed one was refused."""

    accepted: dict[str, Payload] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)


class Exchange:
    def __init__(
        self,
        store: Store,
        identity: Identity,
        run_key: str,
        accounting: Accounting,
        *,
        poll_seconds: float = 0.2,
        clock: Callable[[], float] = time.time,
        allowed_peers: Callable[[int], set[str] | None] | None = None,
    ):
        self.store = store
        self.identity = identity
        self.run_key = run_key
        self.acct = accounting
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.allowed_peers = allowed_peers or (lambda window: None)

    # ------------------------------------------------------------------ publish
    def publish(self, window: int, data: bytes, deadline: float) -> bool:
        """Upload our payload, retrying store failures until the deadline. True if it is there."""
        key = paths.payload_key(window, self.identity.peer_id)
        delay = 0.2
        while True:
            try:
                with self.acct.phase("upload"):
                    wrote = self.store.put_if_absent(key, data)
                if wrote:
                    self.acct.bytes_up += len(data)
                else:
                    log.warning("window %d: a payload of ours was already published (restart?)", window)
                return True
            except StoreError as exc:
                if self.clock() + delay > deadline:
                    log.error("window %d: could not publish before the deadline: %s", window, exc)
                    return False
                log.warning("window %d: publish failed, retrying in %.1fs: %s", window, delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------------ close
    def read_close(self, window: int) -> CloseRecord | None:
        """The window's close record if one exists (a malformed one is reported and raised)."""
        try:
            data = self.store.get(paths.close_key(window), max_bytes=1 << 20)
        except ObjectNotFound:
            return None
        self.acct.bytes_down += len(data)
        return read_close_record(data, run=self.run_key, window=window)

    def close(
        self,
        window: int,
        *,
        base_digest: bytes,
        expected: set[str],
        min_peers: int,
        deadline: float,
        expect: Callable[[str], Expectation],
    ) -> tuple[CloseRecord, Gathered]:
        """Wait until the window is complete, then return its close record and the payloads.

        Complete means: every peer in ``expected`` and at least ``min_peers`` peers have
        published, or ``deadline`` passed. Store outages while waiting are logged and
        waited out; nobody can close a window while the store is down.
        """
        gathered = Gathered()
        with self.acct.phase("wait"):
            while True:
                try:
                    existing = self.read_close(window)
                    if existing is not None:
                        break
                    present = {
                        paths.peer_of_payload_key(o.key): o
                        for o in self.store.list(paths.payloads_prefix(window))
                        if o.key.endswith(paths.PAYLOAD_SUFFIX)
                    }
                    complete = expected <= present.keys() and len(present) >= min_peers
                    if complete or self.clock() >= deadline:
                        existing = self._write_close(window, base_digest, sorted(present), expect, gathered)
                        break
                except StoreError as exc:
                    log.warning("window %d: store unavailable while waiting: %s", window, exc)
                    time.sleep(min(2.0, self.poll_seconds * 5))
                    continue
                time.sleep(self.poll_seconds)
        return existing, self.gather(existing, expect, gathered)

    def _write_close(
        self, window: int, base_digest: bytes, peers: list[str], expect: Callable[[str], Expectation], gathered: Gathered
    ) -> CloseRecord:
        """Verify what is present and try to be the one who closes the window."""
        allowed = self.allowed_peers(window)
        included = []
        for peer in peers:
            if allowed is not None and peer not in allowed:
                gathered.rejected.append((peer, "not in the validators' allowed set"))
                continue
            data = self._fetch(window, peer, expect(peer), gathered)
            if data is not None:
                included.append(Included(peer, hashlib.sha256(data).hexdigest(), len(data)))
        record = CloseRecord(window, base_digest, self.clock(), tuple(included))
        blob = make_close_record(self.identity, self.run_key, record)
        if self.store.put_if_absent(paths.close_key(window), blob):
            self.acct.bytes_up += len(blob)
            log.info("window %d: closed with %d payloads", window, len(included))
            return CloseRecord(window, base_digest, record.closed_at, tuple(included), self.identity.peer_id)
        closed = self.read_close(window)
        if closed is None:  # pragma: no cover - a store that loses a put_if_absent winner
            raise StoreError("close record vanished after a lost put_if_absent", key=paths.close_key(window))
        return closed

    # ------------------------------------------------------------------ gather
    def gather(self, record: CloseRecord, expect: Callable[[str], Expectation], gathered: Gathered | None = None) -> Gathered:
        """Fetch and verify every payload the close record lists (reusing what we have)."""
        have = gathered or Gathered()
        out = Gathered()
        for inc in record.included:
            if have.sha256.get(inc.peer_id) == inc.sha256:
                out.accepted[inc.peer_id] = have.accepted[inc.peer_id]
                out.sha256[inc.peer_id] = inc.sha256
                continue
            self._fetch(record.window, inc.peer_id, expect(inc.peer_id), out, want=inc)
        out.rejected.extend((p, r) for p, r in have.rejected if p not in out.accepted)
        return out

    def _fetch(
        self, window: int, peer: str, expectation: Expectation, out: Gathered, want: Included | None = None
    ) -> bytes | None:
        key = paths.payload_key(window, peer)
        with self.acct.phase("download"):
            for attempt in range(4):
                try:
                    data = self.store.get(key, max_bytes=expectation.max_bytes)
                    break
                except ObjectNotFound:
                    out.rejected.append((peer, "payload listed but not found in the store"))
                    return None
                except StoreError as exc:
                    if attempt == 3:
                        out.rejected.append((peer, f"payload could not be downloaded: {exc}"))
                        return None
                    time.sleep(0.5 * 2**attempt)
            if peer != self.identity.peer_id:
                self.acct.bytes_down += len(data)
        digest = hashlib.sha256(data).hexdigest()
        if want is not None and digest != want.sha256:
            out.rejected.append((peer, f"payload sha256 {digest[:12]} differs from the close record's {want.sha256[:12]}"))
            return None
        try:
            payload = decode_payload(data, expectation)
        except PayloadRejected as exc:
            log.warning("window %d: rejected payload of %s: %s", window, peer, exc)
            out.rejected.append((peer, f"{type(exc).__name__}: {exc.reason}"))
            return None
        except LocoError as exc:
            out.rejected.append((peer, f"{type(exc).__name__}: {exc}"))
            return None
        out.accepted[peer] = payload
        out.sha256[peer] = digest
        return data
