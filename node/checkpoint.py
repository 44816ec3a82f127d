"""The run's published checkpoints: the global weights at the start of a window.

A checkpoint of window W lives under ``checkpoints/WWWWWW/`` as two objects named by the
weights' digest (the one every replica computes, ``protocol.digest``)::

    <digest>.safetensors   the weights (multipart above 8 MiB on S3)
    <digest>.json          window, digest, sha256 and size of the weights file: the commit
                           marker, written last, so its presence means the upload is whole

Anyone can write anything there, so nothing in it is trusted by itself: a reader asks for
the checkpoint whose digest the run's decision of window W certifies
(``node.follow.Follower.verified_checkpoint``) and checks the file against it. Naming by
digest means nobody can block the honest checkpoint by writing first under its name: the
publisher overwrites whatever is there with the bytes everyone can check. One replica
publishes each checkpoint (the proposer of the decided round). safetensors never executes
code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from node.state import remove_leftovers
from protocol import paths
from protocol.digest import weights_digest
from protocol.errors import CheckpointError, ObjectNotFound, StoreError
from protocol.manifest import RunConfig
from protocol.records import json_strict
from protocol.retention import gc_windows, retention_floor
from protocol.stores.base import Store

log = logging.getLogger(__name__)

CHECKPOINT_TEMP_PREFIX = ".checkpoint-"

MAX_META_BYTES = 1 << 12
_META_KEYS = {"window", "digest", "sha256", "size"}


def weights_key(window: int, digest: bytes) -> str:
    return f"{paths.checkpoint_dir(window)}{digest.hex()}.safetensors"


def meta_key(window: int, digest: bytes) -> str:
    return f"{paths.checkpoint_dir(window)}{digest.hex()}.json"


def publish_checkpoint(store: Store, window: int, weights: dict[str, torch.Tensor], scratch: Path) -> bytes:
    """Publish the global weights at the start of ``window``; returns their digest.

    The safetensors file is written under the directory ``scratch`` and uploaded from there
    (multipart on S3), so a large model is never one more copy in memory; the small meta
    object is the commit marker, written last."""
    digest = weights_digest(weights)
    scratch.mkdir(parents=True, exist_ok=True)
    remove_leftovers(scratch, CHECKPOINT_TEMP_PREFIX)  # one publish at a time per workdir: older ones were killed
    fd, tmp = tempfile.mkstemp(dir=scratch, prefix=CHECKPOINT_TEMP_PREFIX, suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in sorted(weights.items())}, tmp)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        size = os.path.getsize(tmp)
        store.put_file(weights_key(window, digest), Path(tmp))
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {"window": window, "digest": digest.hex(), "sha256": h.hexdigest(), "size": size}
    store.put(meta_key(window, digest), json.dumps(meta, sort_keys=True).encode())
    return digest


def publish_due(store: Store, run: RunConfig, window: int, weights: dict[str, torch.Tensor], scratch: Path, *,
                checkpoints: bool = True) -> None:
    """What the proposer of a decided round owes the run once it stands at ``window``: the
    checkpoint due there (every ``run.checkpoint_every`` windows; ``checkpoints=False``
    leaves it to others) and the collection of windows retention no longer keeps. Peers and
    validators call it alike, so a run decided by validators is checkpointed and collected
    too. A store error is logged, not raised: the next proposer publishes and collects."""
    every = run.checkpoint_every
    try:
        if checkpoints and window % every == 0:
            publish_checkpoint(store, window, weights, scratch)
            log.info("published the checkpoint of window %d", window)
        gc_windows(store, retention_floor(window, window - window % every, run.keep_windows))
    except StoreError as exc:
        log.warning("window %d: checkpoint or garbage collection skipped: %s", window - 1, exc)


GAP = 2
"""Missing checkpoints in a row (their publishers failed) the search for the newest steps over."""


def checkpoint_windows(store: Store, every: int, after: int = -1) -> Iterator[int]:
    """Windows after ``after`` with a committed checkpoint (its meta object), newest first;
    whether one is right is for the caller to check against the run's decisions.

    Checkpoints are due at multiples of ``every`` (never at 0: genesis is not published). The
    newest is found by probing one checkpoint directory at a time, galloping up from the
    first due after ``after`` and then bisecting: O(log n) small listings however many
    checkpoints the run keeps, and the same on stores that list one level deep (p2p). Up to
    ``GAP`` missing checkpoints in a row (their publishers failed), anywhere, are stepped over.
    """
    seen: dict[int, bool] = {}

    def published(k: int) -> bool:
        if k not in seen:
            seen[k] = any(o.key.endswith(".json") for o in store.list(paths.checkpoint_dir(k * every)))
        return seen[k]

    def reached(k: int) -> bool:  # the run has published a checkpoint at k or up to GAP due ones later
        return any(published(j) for j in range(k, k + GAP + 1))

    first = max(1, after // every + 1)
    if not reached(first):
        return
    lo, step = first, 1
    while reached(lo + step):
        lo, step = lo + step, step * 2
    hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if reached(mid) else (lo, mid)
    newest = max(k for k in range(lo, lo + GAP + 1) if published(k))
    for k in range(newest, first - 1, -1):
        if published(k):
            yield k * every


def fetch_checkpoint(
    store: Store, window: int, digest: bytes, expected_shapes: dict[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """The published weights of ``window`` with ``digest``, verified: commit marker strict,
    size and sha256 of the file, a safetensors file of exactly the run's shapes, and the
    weights' digest. ``CheckpointError`` names what is wrong; nothing is trusted on its own."""
    max_bytes = 4 * sum(math.prod(s) for s in expected_shapes.values()) + (1 << 20)
    try:
        meta = json_strict(store.get(meta_key(window, digest), max_bytes=MAX_META_BYTES))
    except ObjectNotFound as exc:
        raise CheckpointError(f"no checkpoint of window {window} with digest {digest.hex()[:12]}") from exc
    except (ValueError, StoreError) as exc:
        raise CheckpointError(f"checkpoint meta of window {window} cannot be read: {exc}") from exc
    if (not isinstance(meta, dict) or set(meta) != _META_KEYS or meta["window"] != window
            or meta["digest"] != digest.hex() or type(meta["size"]) is not int or not 0 < meta["size"] <= max_bytes
            or not isinstance(meta["sha256"], str)):
        raise CheckpointError(f"checkpoint meta of window {window} is malformed")
    try:
        blob = store.get(weights_key(window, digest), max_bytes=meta["size"])
    except StoreError as exc:
        raise CheckpointError(f"checkpoint of window {window} could not be fetched: {exc}") from exc
    if len(blob) != meta["size"] or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint of window {window} fails its size or sha256 check")
    try:
        weights = load(blob)
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint of window {window} is not valid safetensors: {exc}") from exc
    if {k: tuple(v.shape) for k, v in weights.items()} != expected_shapes:
        raise CheckpointError(f"checkpoint of window {window} does not match the run's model layout")
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    if weights_digest(weights) != digest:
        raise CheckpointError(f"checkpoint of window {window} does not have the digest it is named by")
    return weights
