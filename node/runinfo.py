"""What anyone can read about a run without building a model: its manifest, the decision
records of its windows, and who published in a window.

Imports no torch (nor anything that does), so the CLI opens a run and ``locoswarm status``
answers in about a second. Every record is verified exactly as a replica verifies it
(``protocol.consensus.read_decision``: ``quorum`` precommits signed by the run's closers);
what is read here is only the decision *records* closers write once a window is decided,
not the raw votes a replica falls back to (``node.follow.DecisionReader``), which is enough
to report on a run and never enough to apply a window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from protocol import paths
from protocol.consensus import MAX_DECISION_BYTES, Decision, read_decision
from protocol.errors import (
    ManifestError,
    ObjectNotFound,
    ObjectTooLarge,
    RecordRejected,
)
from protocol.identity import peer_id_of
from protocol.manifest import Manifest
from protocol.stores.base import Store

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20


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


def _log_rejected(key: str, reason: str) -> None:
    log.warning("ignoring %r: %s", key, reason)


class DecisionRecords:
    """Reads the decision records of a run's windows, newest first (the one reader of
    decision records: ``node.follow.DecisionReader`` uses it too)."""

    def __init__(self, store: Store, manifest: Manifest, *,
                 warn: Callable[[str, str], None] = _log_rejected):
        """``warn(key, reason)`` hears of each rejected record (default: a log line)."""
        self.store = store
        self.manifest = manifest
        self.closer_ids = {peer_id_of(bytes.fromhex(k)) for k in manifest.closers}
        self.bytes_read = 0
        self.warn = warn

    def windows(self) -> list[int]:
        """Windows with a decision record under a closer's key (not yet verified), newest
        first: one listing of the run's windows."""
        found = set()
        for info in self.store.list("windows/"):
            window = paths.window_of_key(info.key)
            signer = info.key.rsplit("/", 1)[-1].removesuffix(paths.RECORD_SUFFIX)
            if window is not None and signer in self.closer_ids and info.key == paths.decision_key(window, signer):
                found.add(window)
        return sorted(found, reverse=True)

    def read(self, window: int) -> Decision | None:
        """The first valid decision record of ``window``, or None."""
        for info in self.store.list(paths.decisions_prefix(window)):
            signer = info.key.rsplit("/", 1)[-1].removesuffix(paths.RECORD_SUFFIX)
            if info.key != paths.decision_key(window, signer) or signer not in self.closer_ids \
                    or info.size > MAX_DECISION_BYTES:
                continue
            try:
                data = self.store.get(info.key, max_bytes=MAX_DECISION_BYTES)
                self.bytes_read += len(data)
                return read_decision(data, run=self.manifest.run_key, window=window, closers=self.manifest.closers,
                                     quorum=self.manifest.quorum)
            except (ObjectNotFound, ObjectTooLarge):
                continue
            except RecordRejected as exc:
                self.warn(info.key, str(exc))
        return None

    def newest(self, *, tries: int = 64) -> Decision | None:
        """The newest window with a valid decision record, looking at most ``tries`` windows
        back (junk written under closers' keys for future windows costs a look each)."""
        for window in self.windows()[:tries]:
            decision = self.read(window)
            if decision is not None:
                return decision
        return None


def published(store: Store, window: int) -> set[str]:
    """Peers with a payload object or a payload announcement in ``window``, by strict key
    (nothing is downloaded: a listing says who tried, not what they sent)."""
    peers = set()
    for info in store.list(paths.payloads_prefix(window)):
        peer = paths.peer_of_payload_key(info.key)
        if peer is not None and info.key == paths.payload_key(window, peer):
            peers.add(peer)
    for info in store.list(paths.announce_prefix(window)):
        peer = paths.peer_of_announce_key(info.key)
        if peer is not None and info.key == paths.announce_key(window, peer):
            peers.add(peer)
    return peers
