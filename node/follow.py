"""Following a run from its store: the read side that peers, validators, ``status`` and
``export`` share.

Every role needs the same facts and must read them the same way, or replicas drift:

- the run's manifest (``read_manifest``; ``check_run_manifest`` refuses a different one);
- the record that closed each window: the first valid close slot (``CloseReader``);
- the newest published checkpoint, verified (``node.checkpoint``);
- the global weights after replaying closed windows (``Follower``): start from local state
  or a checkpoint, then for each closed window gather exactly the payloads its record lists,
  aggregate and take the outer step. When a window's objects were collected while we were
  away, jump to the newest checkpoint instead of waiting on a window nobody will close.

``Follower.next_closed`` is a pull API (no callbacks): the caller decides what to do with
each closed window before ``advance`` applies it (a validator scores it first).
"""

from __future__ import annotations

import logging

from node.accounting import Accounting
from node.checkpoint import fetch_checkpoint, latest_checkpoint
from node.exchange import Exchange, Gathered
from node.replica import Replica
from protocol import paths
from protocol.aggregate import aggregate
from protocol.close import CloseRecord, read_close_record
from protocol.codec_types import TensorLayout
from protocol.errors import RETRYABLE, ManifestError, ObjectNotFound, RecordRejected, ReplicaDiverged, StoreError
from protocol.manifest import Manifest
from protocol.stores.base import Store
from protocol.wire import Expectation

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20
MAX_CLOSE_BYTES = 1 << 20


def find_manifest(store: Store) -> Manifest | None:
    """The manifest of the run in ``store``; None when the store holds no run."""
    try:
        data = store.get(paths.MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
    except ObjectNotFound:
        return None
    return Manifest.from_bytes(data)


def read_manifest(store: Store) -> Manifest:
    """The manifest of the run in ``store``; ``ManifestError`` when there is none."""
    manifest = find_manifest(store)
    if manifest is None:
        raise ManifestError(f"no run in {store.uri}: create one with `locoswarm init`")
    return manifest


def check_run_manifest(store: Store, manifest: Manifest) -> Manifest:
    """The store's manifest, which must be ``manifest``: refuse to mix two runs."""
    theirs = read_manifest(store)
    if theirs.digest != manifest.digest:
        raise ManifestError(
            f"this manifest ({manifest.run_key}) differs from the run's in {store.uri} "
            f"({theirs.run_key}); refusing to mix"
        )
    return theirs


class CloseReader:
    """Reads close records: a window's record is its first close slot holding a valid one.

    Anyone who can write to the store can put garbage into a slot before the honest closer,
    so a window has ``paths.CLOSE_SLOTS`` slots; every reader reads them in the same order,
    so all agree on one record. Invalid slots are logged once each.
    """

    def __init__(self, store: Store, run_key: str, accounting: Accounting | None = None):
        self.store = store
        self.run_key = run_key
        self.acct = accounting or Accounting()
        self._reported: set[str] = set()

    def first_valid(self, window: int) -> CloseRecord | None:
        """The window's record; None while nobody closed it. Raises the store's retryable
        errors, and ``RecordRejected`` when every slot holds an invalid record."""
        for slot in range(paths.CLOSE_SLOTS):
            record = self.read_slot(window, slot)
            if record is None:
                return None
            if isinstance(record, CloseRecord):
                return record
        raise RecordRejected(f"window {window}: all {paths.CLOSE_SLOTS} close slots hold invalid records")

    def read(self, window: int) -> CloseRecord | None:
        """``first_valid``, or None (logged) while the store cannot be reached."""
        try:
            return self.first_valid(window)
        except RETRYABLE as exc:
            log.warning("window %d: store unreachable while reading the close record: %s", window, exc)
            return None

    def read_slot(self, window: int, slot: int) -> CloseRecord | RecordRejected | None:
        """One slot: its valid record, the reason it is invalid, or None when it is empty."""
        key = paths.close_slot_key(window, slot)
        try:
            data = self.store.get(key, max_bytes=MAX_CLOSE_BYTES)
        except ObjectNotFound:
            return None
        except RETRYABLE:
            raise
        except StoreError as exc:  # over the size cap, refused, corrupt: as invalid as a bad signature
            rejected = RecordRejected(f"close record {key} cannot be read: {exc}")
        else:
            self.acct.bytes_down += len(data)
            try:
                return read_close_record(data, run=self.run_key, window=window)
            except RecordRejected as exc:
                rejected = exc
        if key not in self._reported:
            self._reported.add(key)
            log.error("window %d: ignoring the invalid close record %s: %s", window, key, rejected)
        return rejected


class Follower:
    """The global weights, advanced window by window exactly as every replica advances them."""

    def __init__(self, manifest: Manifest, store: Store, exchange: Exchange, replica: Replica,
                 layouts: dict[str, TensorLayout]):
        self.manifest = manifest
        self.store = store
        self.exchange = exchange
        self.replica = replica
        self.layouts = layouts
        self.closes = CloseReader(store, manifest.run_key, exchange.acct)
        self.jumps = 0
        """How often the follower restarted from a newer checkpoint."""

    def expectation(self, window: int) -> Expectation:
        """What a payload of ``window`` must be to count (any peer; ``gather`` names each)."""
        return Expectation(
            run=self.manifest.run_key, window=window, layouts=self.layouts, codec=self.manifest.codec,
            max_bytes=self.manifest.outer.max_payload_bytes, base_digest=self.replica.digest,
        )

    def next_closed(self) -> CloseRecord | None:
        """The close record of the window we are at; None once we are at the open window.

        When the window is not closed but a checkpoint newer than us exists, its objects may
        have been collected: restart from that checkpoint and look again.
        """
        while True:
            close = self.closes.read(self.replica.window)
            if close is not None or not self.jump_to_checkpoint():
                return close

    def jump_to_checkpoint(self) -> bool:
        """Move to the newest published checkpoint if it is ahead of us; True if we moved."""
        window = latest_checkpoint(self.store, self.manifest.run.checkpoint_every)
        if window is None or window <= self.replica.window:
            return False
        log.warning("window %d is gone from the store; jumping to the checkpoint of window %d",
                    self.replica.window, window)
        self.replica = checkpoint_replica(self.store, window, {n: lay.shape for n, lay in self.layouts.items()})
        self.jumps += 1
        return True

    def gather(self, close: CloseRecord) -> Gathered:
        return self.exchange.gather(close, self.expectation(close.window))

    def advance(self, close: CloseRecord, gathered: Gathered) -> None:
        """Aggregate the close record's payloads and take the outer step."""
        check_base(self.replica, close)
        outer = self.manifest.outer
        update = aggregate(gathered.contributions(), self.layouts, rule=outer.rule, clip=outer.clip)
        self.replica.apply(update, outer.lr)


def check_base(replica: Replica, close: CloseRecord) -> None:
    """Refuse to apply a window the network closed on other base weights than ours."""
    if close.base_digest != replica.digest:
        raise ReplicaDiverged(
            f"window {close.window}: the network's base digest {close.base_digest.hex()[:12]} differs from "
            f"ours {replica.digest.hex()[:12]}; this replica is out of sync (remove its state to resync)"
        )


def checkpoint_replica(store: Store, window: int, shapes: dict[str, tuple[int, ...]]) -> Replica:
    """The global weights of a published checkpoint, verified (hash, layout, digest)."""
    weights, _ = fetch_checkpoint(store, window, shapes)
    return Replica(weights, window)
