"""The run's published checkpoints: the global weights at the start of a window.

Published checkpoints hold only the global weights at the start of a window plus a small
JSON meta (window, digest, sha256 of the weights file). Any replica may publish one
(``put_if_absent``: honest replicas would write identical bytes); a late joiner checks the
file's hash and the weights' digest before using it. safetensors never executes code.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from protocol import paths
from protocol.digest import weights_digest
from protocol.errors import CheckpointError, ObjectNotFound, StoreError
from protocol.stores.base import Store

MAX_META_BYTES = 1 << 16


def publish_checkpoint(store: Store, window: int, weights: dict[str, torch.Tensor]) -> bool:
    """Publish the global weights at the start of ``window``; False if one was already there."""
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in sorted(weights.items())})
    meta = {
        "window": window,
        "digest": weights_digest(weights).hex(),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }
    wrote = store.put_if_absent(paths.checkpoint_weights_key(window), blob)
    if wrote:
        store.put(paths.checkpoint_meta_key(window), json.dumps(meta).encode())
    return wrote


def latest_checkpoint(store: Store, every: int) -> int | None:
    """The newest window with a published checkpoint, or None.

    Lists ``checkpoints/`` when the store can list that deep; a store whose listing is one
    level deep (p2p) is probed at multiples of ``every`` (galloping, then bisecting), which
    relies on checkpoints never being deleted.
    """
    listed = {paths.window_of_key(o.key) for o in store.list("checkpoints/") if o.key.endswith("/meta.json")}
    listed.discard(None)
    if listed:
        return max(listed)

    def published(k: int) -> bool:
        return store.exists(paths.checkpoint_meta_key(k * every))

    if not published(0):
        return None
    lo, hi = 0, 1
    while published(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if published(mid) else (lo, mid)
    return lo * every


def load_checkpoint_into(model: torch.nn.Module, store: Store, window: int) -> bytes:
    """Set ``model``'s parameters to the verified published weights of ``window``; its digest."""
    weights, digest = fetch_checkpoint(store, window, {n: tuple(p.shape) for n, p in model.named_parameters()})
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return digest


def fetch_checkpoint(
    store: Store, window: int, expected_shapes: dict[str, tuple[int, ...]], max_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], bytes]:
    """Download, hash-check and shape-check the published weights of ``window``.

    ``max_bytes`` defaults to what float32 weights of those shapes take, plus 1 MiB.
    """
    if max_bytes is None:
        max_bytes = 4 * sum(math.prod(s) for s in expected_shapes.values()) + (1 << 20)
    try:
        meta = json.loads(store.get(paths.checkpoint_meta_key(window), max_bytes=MAX_META_BYTES))
        blob = store.get(paths.checkpoint_weights_key(window), max_bytes=max_bytes)
    except (ObjectNotFound, ValueError) as exc:
        raise CheckpointError(f"checkpoint of window {window} is missing or unreadable: {exc}") from exc
    except StoreError as exc:
        raise CheckpointError(f"checkpoint of window {window} could not be fetched: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("window") != window:
        raise CheckpointError(f"checkpoint meta of window {window} is malformed")
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint of window {window} fails its sha256 check")
    try:
        weights = load(blob)
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint of window {window} is not valid safetensors: {exc}") from exc
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected_shapes:
        raise CheckpointError(f"checkpoint of window {window} does not match the run's model layout")
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    digest = weights_digest(weights)
    if digest.hex() != meta.get("digest"):
        raise CheckpointError(f"checkpoint of window {window} has digest {digest.hex()[:12]}, meta says otherwise")
    return weights, digest
