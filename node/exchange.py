"""Publish, close and gather: how one window's payloads move between peers through a store.

``publish`` writes our signed payload once (``put_if_absent``: a payload, once listed in a
close record, never changes). ``close`` waits until the window is complete (every expected
peer published, or the deadline passed), then either writes the close record itself or
reads the one another peer wrote first. ``gather`` fetches and verifies exactly the
payloads a close record lists. A bad or missing payload costs only that payload: each
rejection comes back as ``(peer, reason)``, never as an exception out of the window.

Close slots: anyone who can write to the store can put garbage (or a record with a bad
signature) under ``close.lsr`` before the honest closer does, and ``put_if_absent`` would
then keep the honest record out forever. So a window has ``paths.CLOSE_SLOTS`` slots
(``close.lsr``, ``close.1.lsr``, ...): the window's close record is the first slot that
holds a valid record, and a closer writes into the first slot after the invalid ones.
Every replica reads the same slots in the same order, so all agree on one record.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node.accounting import Accounting
from protocol import paths
from protocol.announce import (
    MAX_ANNOUNCEMENT_BYTES,
    make_announcement,
    read_announcement,
)
from protocol.close import CloseRecord, Included, make_close_record, read_close_record
from protocol.errors import (
    LocoError,
    ObjectNotFound,
    PayloadRejected,
    RecordRejected,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from protocol.identity import Identity
from protocol.stores.base import ObjectInfo, Store
from protocol.stores.s3 import PresignedReader, S3Store
from protocol.wire import Expectation, Payload, decode_payload

log = logging.getLogger(__name__)

MAX_CLOSE_BYTES = 1 << 20
PRESIGN_SECONDS = 7 * 24 * 3600
"""Lifetime of the presigned URLs a peer announces (S3's maximum): late joiners replay
windows up to ``run.keep_windows`` old through them."""
FETCH_ATTEMPTS = 4
"""Downloads of one payload after a timeout or an unreachable store, with backoff."""


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
        own_store: S3Store | None = None,
        reader: PresignedReader | None = None,
    ):
        self.store = store
        self.own_store = own_store
        self.reader = reader or PresignedReader()
        self.identity = identity
        self.run_key = run_key
        self.acct = accounting
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.allowed_peers = allowed_peers or (lambda window: None)
        self._invalid_close: set[str] = set()  # slot keys already reported as invalid

    # ------------------------------------------------------------------ publish
    def publish(self, window: int, data: bytes, deadline: float) -> bool:
        """Upload our payload, retrying store failures until the deadline. True if it is there."""
        key = paths.payload_key(window, self.identity.peer_id)
        delay = 0.2
        while True:
            try:
                with self.acct.phase("upload"):
                    wrote = self._upload(window, key, data)
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

    def _upload(self, window: int, key: str, data: bytes) -> bool:
        """Into the run store; or into our own bucket plus a signed announcement of a
        presigned URL in the run store (no credentials ever leave this machine)."""
        if self.own_store is None:
            return self.store.put_if_absent(key, data)
        wrote = self.own_store.put_if_absent(key, data)
        url = self.own_store.presigned_get_url(key, expires=PRESIGN_SECONDS)
        record = make_announcement(self.identity, self.run_key, window, key, url,
                                   hashlib.sha256(data).hexdigest(), len(data))
        self.store.put_if_absent(paths.announce_key(window, self.identity.peer_id), record)
        self.acct.bytes_up += len(record)
        return wrote

    def present(self, window: int) -> dict[str, ObjectInfo]:
        """Peers with a payload for ``window``, in the run store or announced, and its listing."""
        out = {
            paths.peer_of_payload_key(o.key): o
            for o in self.store.list(paths.payloads_prefix(window))
            if o.key.endswith(paths.PAYLOAD_SUFFIX)
        }
        for o in self.store.list(paths.announce_prefix(window)):
            out.setdefault(o.key.rsplit("/", 1)[-1].removesuffix(".lsr"), o)
        return out

    def download(self, window: int, peer: str, max_bytes: int) -> bytes:
        """A peer's payload bytes for ``window``: from the run store, or from the URL its
        signed announcement names (hash and size checked). Raises StoreError/RecordRejected."""
        try:
            return self.store.get(paths.payload_key(window, peer), max_bytes=max_bytes)
        except ObjectNotFound:
            try:
                record = self.store.get(paths.announce_key(window, peer), max_bytes=MAX_ANNOUNCEMENT_BYTES)
            except ObjectNotFound:
                raise ObjectNotFound("no payload and no announcement", key=paths.payload_key(window, peer)) from None
        ann = read_announcement(record, self.run_key, signer=peer)
        if ann.window != window:
            raise RecordRejected(f"announcement of {peer} is for window {ann.window}, not {window}")
        return self.reader.fetch(ann.url, sha256=ann.sha256, size=ann.size, max_bytes=max_bytes)

    # ------------------------------------------------------------------ close
    def read_close(self, window: int) -> CloseRecord | None:
        """The window's close record (the first valid slot), or None while nobody closed it.

        None also when the store cannot be reached right now (logged): callers then train
        and publish as if the window were open, and ``close`` waits the outage out and
        finds the record there if someone closed the window meanwhile. Invalid records are
        logged once and skipped; ``RecordRejected`` only when every slot holds an invalid
        record, since then no honest record can be written at all.
        """
        try:
            return self._first_valid_close(window)
        except (StoreTimeout, StoreUnavailable) as exc:
            log.warning("window %d: store unreachable while reading the close record: %s", window, exc)
            return None

    def _first_valid_close(self, window: int) -> CloseRecord | None:
        for slot in range(paths.CLOSE_SLOTS):
            record = self._read_slot(window, slot)
            if record is None:
                return None
            if isinstance(record, CloseRecord):
                return record
        raise RecordRejected(f"window {window}: all {paths.CLOSE_SLOTS} close slots hold invalid records")

    def _read_slot(self, window: int, slot: int) -> CloseRecord | RecordRejected | None:
        """One slot: its valid record, the reason it is invalid, or None when it is empty."""
        key = paths.close_slot_key(window, slot)
        try:
            data = self.store.get(key, max_bytes=MAX_CLOSE_BYTES)
        except ObjectNotFound:
            return None
        except (StoreTimeout, StoreUnavailable):
            raise
        except StoreError as exc:  # over the size cap, refused, corrupt: as invalid as a bad signature
            rejected = RecordRejected(f"close record {key} cannot be read: {exc}")
        else:
            self.acct.bytes_down += len(data)
            try:
                return read_close_record(data, run=self.run_key, window=window)
            except RecordRejected as exc:
                rejected = exc
        if key not in self._invalid_close:
            self._invalid_close.add(key)
            log.error("window %d: ignoring the invalid close record %s: %s", window, key, rejected)
        return rejected

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
                    existing = self._first_valid_close(window)
                    if existing is not None:
                        break
                    present = self.present(window)
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
        for slot in range(paths.CLOSE_SLOTS):
            if self.store.put_if_absent(paths.close_slot_key(window, slot), blob):
                self.acct.bytes_up += len(blob)
                log.info("window %d: closed with %d payloads", window, len(included))
                return CloseRecord(window, base_digest, record.closed_at, tuple(included), self.identity.peer_id)
            closed = self._read_slot(window, slot)
            if isinstance(closed, CloseRecord):
                return closed
            if closed is None:  # pragma: no cover - a store that loses a put_if_absent winner
                raise StoreError("close record vanished after a lost put_if_absent", key=paths.close_slot_key(window, slot))
        raise RecordRejected(f"window {window}: all {paths.CLOSE_SLOTS} close slots hold invalid records")

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
        with self.acct.phase("download"):
            for attempt in range(FETCH_ATTEMPTS):
                try:
                    data = self.download(window, peer, expectation.max_bytes)
                    break
                except ObjectNotFound:
                    out.rejected.append((peer, "payload listed but not found in the store"))
                    return None
                except (StoreTimeout, StoreUnavailable) as exc:
                    if attempt == FETCH_ATTEMPTS - 1:
                        out.rejected.append((peer, f"payload could not be downloaded: {exc}"))
                        return None
                    time.sleep(0.5 * 2**attempt)
                except RecordRejected as exc:
                    out.rejected.append((peer, f"announcement refused: {exc}"))
                    return None
                except StoreError as exc:  # over the size cap, refused, corrupt: retrying will not help
                    log.warning("window %d: refused the payload object of %s: %s", window, peer, exc)
                    out.rejected.append((peer, f"payload refused by the store: {exc}"))
                    return None
            if peer != self.identity.peer_id:
                self.acct.bytes_down += len(data)
        digest = hashlib.sha256(data).hexdigest()
        if want is not None and digest != want.sha256:
            log.warning("window %d: the payload of %s changed after the close record listed it", window, peer)
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
