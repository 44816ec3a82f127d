"""How one window's payloads move between peers through a store: publish, list, fetch, gather.

``publish`` writes our signed payload once (``put_if_absent``), retrying outages until the
window's deadline. ``present`` lists who published, ignoring any key that is not a
well-formed payload or announcement key and any object larger than a valid payload can be.
``fetch`` gets a payload by peer and, when a decision names it, by SHA-256, from every
source in turn: the run store, the content-addressed copy the proposer keeps
(``windows/W/blobs/<sha256>.lsp``), the URL the peer's signed announcement names.
``gather`` fetches exactly what a decision counts, several at a time, and never skips one:
a payload no source can give with the decided hash raises ``PayloadUnavailable`` (the
caller waits and tries again), because a replica that applied the window without it would
fork the run.

Verified payloads are kept for the open window, so a closer that verified everything to
propose or to vote never downloads it again to apply it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from node.accounting import Accounting
from protocol import paths
from protocol.announce import (
    MAX_ANNOUNCEMENT_BYTES,
    make_announcement,
    read_announcement,
)
from protocol.codec_types import CompressedTensor
from protocol.consensus import Included
from protocol.errors import (
    RETRYABLE,
    ObjectNotFound,
    PayloadUnavailable,
    RecordRejected,
    StoreError,
)
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.retry import RetryPolicy
from protocol.stores.base import ObjectInfo, Store
from protocol.stores.s3 import S3Store
from protocol.urlfetch import AddressPolicy, UrlReader
from protocol.wire import Expectation, Payload, decode_payload

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 7 * 24 * 3600
"""Lifetime of the presigned URLs a peer announces (S3's maximum): late joiners replay
windows up to ``run.keep_windows`` old through them."""
FETCH_WORKERS = 8
"""Payloads downloaded at once: a slow source costs only its own slot."""


def address_policy(manifest: Manifest) -> AddressPolicy:
    """Where the run lets announced URLs point (``run.announce_hosts``, ``run.announce_private``)."""
    return AddressPolicy(manifest.run.announce_hosts, manifest.run.announce_private)


@dataclass
class Gathered:
    """The verified payloads of a window, by peer id."""

    accepted: dict[str, Payload] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    def contributions(self) -> Iterator[tuple[str, Mapping[str, CompressedTensor]]]:
        """``(peer, tensors)`` of every payload, by peer id: what ``aggregate`` takes."""
        for peer in sorted(self.accepted):
            yield peer, self.accepted[peer].tensors


class Exchange:
    """Publishes this node's payloads and fetches everyone's, through ``store``."""

    def __init__(
        self,
        store: Store,
        identity: Identity,
        run_key: str,
        accounting: Accounting,
        *,
        policy: RetryPolicy | None = None,
        own_store: S3Store | None = None,
        addresses: AddressPolicy | None = None,
        device: torch.device | str = "cpu",
    ):
        """``device``: where payloads are decoded (and later aggregated)."""
        self.store = store
        self.own_store = own_store
        self.identity = identity
        self.run_key = run_key
        self.acct = accounting
        self.policy = policy or RetryPolicy()
        self.reader = UrlReader(self.policy, addresses or AddressPolicy())
        self.device = torch.device(device)
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
    def present(self, window: int, expect: Expectation) -> dict[str, ObjectInfo]:
        """Peers with a payload for ``window`` (in the run store, or announced), and its
        listing. Keys that are not well-formed, and objects no valid payload could be (out
        of ``expect``'s size bounds), are ignored: never read, never counted."""
        out: dict[str, ObjectInfo] = {}
        for o in self.store.list(paths.payloads_prefix(window)):
            peer = paths.peer_of_payload_key(o.key)
            if peer is not None and o.key == paths.payload_key(window, peer) and \
                    expect.min_bytes <= o.size <= expect.max_bytes:
                out[peer] = o
        for o in self.store.list(paths.announce_prefix(window)):
            peer = paths.peer_of_announce_key(o.key)
            if peer is not None and o.key == paths.announce_key(window, peer) and o.size <= MAX_ANNOUNCEMENT_BYTES:
                out.setdefault(peer, o)
        return out

    def fetch(self, window: int, peer: str, max_bytes: int, sha256: str | None = None) -> bytes:
        """A payload's bytes, from the first source that has them (with ``sha256``: the first
        whose bytes hash to it). Raises ``PayloadUnavailable`` naming what each source said."""
        reasons = []
        sources = [("run store", lambda: self.store.get(paths.payload_key(window, peer), max_bytes=max_bytes))]
        if sha256 is not None:
            sources.append(("content copy", lambda: self.store.get(paths.blob_key(window, sha256), max_bytes=max_bytes)))
        sources.append(("announcement", lambda: self._announced(window, peer, max_bytes)))
        for name, get in sources:
            try:
                data = get()
            except ObjectNotFound:
                reasons.append(f"{name}: none")
                continue
            except (StoreError, RecordRejected) as exc:
                reasons.append(f"{name}: {exc}")
                continue
            if peer != self.identity.peer_id:
                self.acct.bytes_down += len(data)
            if sha256 is None or hashlib.sha256(data).hexdigest() == sha256:
                return data
            reasons.append(f"{name}: bytes hash to {hashlib.sha256(data).hexdigest()[:12]}, not {sha256[:12]}")
        raise PayloadUnavailable(peer, "; ".join(reasons))

    def _announced(self, window: int, peer: str, max_bytes: int) -> bytes:
        record = self.store.get(paths.announce_key(window, peer), max_bytes=MAX_ANNOUNCEMENT_BYTES)
        ann = read_announcement(record, self.run_key, signer=peer)
        if ann.window != window or ann.key != paths.payload_key(window, peer):
            raise RecordRejected(f"announcement of {peer} is for window {ann.window} and key {ann.key!r}")
        return self.reader.fetch(ann.url, sha256=ann.sha256, size=ann.size, max_bytes=max_bytes)

    def verify(self, peer: str, expect: Expectation, sha256: str | None = None) -> tuple[Payload, bytes | None]:
        """``peer``'s payload of ``expect.window``, fetched and fully checked; also its bytes
        when they were downloaded now (None when it was verified before). Raises
        ``PayloadUnavailable`` or ``PayloadRejected``."""
        window = expect.window
        assert window is not None
        if sha256 is not None and (window, sha256) in self._verified:
            return self._verified[(window, sha256)], None
        with self.acct.phase("download"):
            data = self.fetch(window, peer, expect.max_bytes, sha256)
            payload = self._keep(window, peer, data, expect)
        return payload, data

    def remember(self, window: int, data: bytes, expect: Expectation) -> None:
        """Our own published payload: checked as anyone's, and never downloaded back."""
        with self.acct.phase("download"):
            self._keep(window, self.identity.peer_id, data, expect)

    def _keep(self, window: int, peer: str, data: bytes, expect: Expectation) -> Payload:
        payload = decode_payload(data, replace(expect, peer_id=peer), device=self.device)
        digest = hashlib.sha256(data).hexdigest()
        self._verified = {k: v for k, v in self._verified.items() if k[0] == window}
        self._verified[(window, digest)] = payload
        return payload

    def gather(self, included: tuple[Included, ...], expect: Expectation) -> Gathered:
        """Fetch and verify every payload a decision counts, ``FETCH_WORKERS`` at a time.

        Raises ``PayloadUnavailable`` if one cannot be fetched with its decided hash (the
        caller waits and tries again), and ``PayloadRejected`` if one that the closers
        accepted fails our checks (our replica disagrees with theirs).
        """
        out = Gathered()

        def one(inc: Included) -> Payload:
            return self.verify(inc.peer_id, expect, inc.sha256)[0]

        with self.acct.phase("download"), \
                ThreadPoolExecutor(max_workers=max(1, min(FETCH_WORKERS, len(included)))) as pool:
            for inc, payload in zip(included, pool.map(one, included)):  # each decoded as it arrives
                out.accepted[inc.peer_id], out.sha256[inc.peer_id] = payload, inc.sha256
        return out
