"""How one window's payloads move between peers through a store: publish, list, gather.

``publish`` writes our signed payload once (``put_if_absent``: a payload, once listed in a
close record, never changes), retrying outages until the window's deadline. ``present``
lists who published. ``gather`` fetches and verifies exactly the payloads a close record
lists, by SHA-256. A bad or missing payload costs only that payload: each rejection comes
back as ``(peer, reason)``, never as an exception out of the window.

Verified payloads are kept for the window that is being closed, so the peer that closes a
window (and already fetched everything to list it) does not download anything twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from node.accounting import Accounting
from protocol import paths
from protocol.announce import MAX_ANNOUNCEMENT_BYTES, make_announcement, read_announcement
from protocol.close import CloseRecord, Included
from protocol.codec_types import CompressedTensor
from protocol.errors import RETRYABLE, ObjectNotFound, PayloadRejected, RecordRejected, StoreError
from protocol.identity import Identity
from protocol.retry import RetryPolicy
from protocol.stores.base import ObjectInfo, Store
from protocol.stores.s3 import PresignedReader, S3Store
from protocol.wire import Expectation, Payload, decode_payload

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 7 * 24 * 3600
"""Lifetime of the presigned URLs a peer announces (S3's maximum): late joiners replay
windows up to ``run.keep_windows`` old through them."""


@dataclass
class Gathered:
    """The verified payloads of a window, and why any listed one was refused."""

    accepted: dict[str, Payload] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def contributions(self) -> Iterator[tuple[str, Mapping[str, CompressedTensor]]]:
        """``(peer, tensors)`` of every accepted payload, by peer id: what ``aggregate`` takes."""
        for peer in sorted(self.accepted):
            yield peer, self.accepted[peer].tensors


class Exchange:
    """Publishes this node's payloads and gathers everyone's, through ``store``."""

    def __init__(
        self,
        store: Store,
        identity: Identity,
        run_key: str,
        accounting: Accounting,
        *,
        policy: RetryPolicy | None = None,
        own_store: S3Store | None = None,
    ):
        self.store = store
        self.own_store = own_store
        self.identity = identity
        self.run_key = run_key
        self.acct = accounting
        self.policy = policy or RetryPolicy()
        self.reader = PresignedReader(self.policy)
        self._verified: dict[tuple[int, str], Payload] = {}  # (window, sha256) of the open window

    # ------------------------------------------------------------------ publish
    def publish(self, window: int, data: bytes, deadline: float) -> bool:
        """Upload our payload, retrying outages until ``deadline``; True if it is there.

        Each failed try of the policy counts as a store error (the node's own accounting), so
        an outage shows while it lasts. An error that retrying cannot fix (refused
        credentials, a missing bucket) is raised.
        """
        key = paths.payload_key(window, self.identity.peer_id)
        with self.acct.phase("upload"):
            while True:
                try:
                    wrote = self.policy.call(lambda: self._upload(window, key, data),
                                             what=f"publish of window {window}", deadline=deadline)
                    break
                except RETRYABLE as exc:
                    self.acct.store_errors += 1
                    if time.time() >= deadline:
                        log.error("window %d: could not publish before the deadline: %s", window, exc)
                        return False
                    log.warning("window %d: publish failed, trying again: %s", window, exc)
                    time.sleep(min(self.policy.backoff(self.policy.attempts), max(0.0, deadline - time.time())))
        if wrote:
            self.acct.bytes_up += len(data)
        else:
            log.warning("window %d: a payload of ours was already published (restart?)", window)
        return True

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

    # ------------------------------------------------------------------ read
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

    def verify(self, peer: str, expect: Expectation, out: Gathered, want: Included | None = None) -> Included | None:
        """Fetch and verify ``peer``'s payload of ``expect.window`` into ``out``; what a close
        record would list for it, or None (the reason is in ``out.rejected``)."""
        window = expect.window
        assert window is not None
        expect = dataclasses.replace(expect, peer_id=peer)
        if want is not None and (window, want.sha256) in self._verified:
            payload = self._verified[(window, want.sha256)]
            out.accepted[peer], out.sha256[peer] = payload, want.sha256
            return want
        with self.acct.phase("download"):
            try:
                data = self.download(window, peer, expect.max_bytes)
            except ObjectNotFound:
                out.rejected.append((peer, "payload listed but not found in the store"))
                return None
            except RecordRejected as exc:
                out.rejected.append((peer, f"announcement refused: {exc}"))
                return None
            except StoreError as exc:  # retried by the policy already, or not worth retrying
                log.warning("window %d: could not fetch the payload of %s: %s", window, peer, exc)
                out.rejected.append((peer, f"payload could not be downloaded: {exc}"))
                return None
            if peer != self.identity.peer_id:
                self.acct.bytes_down += len(data)
        digest = hashlib.sha256(data).hexdigest()
        if want is not None and digest != want.sha256:
            log.warning("window %d: the payload of %s changed after the close record listed it", window, peer)
            out.rejected.append((peer, f"payload sha256 {digest[:12]} differs from the close record's {want.sha256[:12]}"))
            return None
        try:
            payload = decode_payload(data, expect)
        except PayloadRejected as exc:
            log.warning("window %d: rejected payload of %s: %s", window, peer, exc)
            out.rejected.append((peer, f"{type(exc).__name__}: {exc.reason}"))
            return None
        self._verified = {k: v for k, v in self._verified.items() if k[0] == window}
        self._verified[(window, digest)] = payload
        out.accepted[peer], out.sha256[peer] = payload, digest
        return Included(peer, digest, len(data))

    def gather(self, record: CloseRecord, expect: Expectation) -> Gathered:
        """Fetch and verify every payload the close record lists (reusing verified ones)."""
        out = Gathered()
        for inc in record.included:
            self.verify(inc.peer_id, expect, out, want=inc)
        return out
