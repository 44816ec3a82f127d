"""``locoswarm init``: create a run in a store (manifest, tokenizer, data, genesis weights)."""

from __future__ import annotations

import logging
import time

from node.checkpoint import publish_checkpoint
from node.data import TokenData, prepare
from node.model import build_model
from protocol import paths
from protocol.errors import ManifestError, ObjectNotFound
from protocol.manifest import Manifest
from protocol.stores.base import Store

log = logging.getLogger(__name__)


def init_run(manifest: Manifest, store: Store) -> Manifest:
    """Write the run's manifest, data and window-0 checkpoint; idempotent for the same manifest.

    A manifest whose ``genesis`` is 0 gets the current time first, so the returned manifest
    (the one peers must use) may differ from the argument.
    """
    if manifest.run.genesis == 0.0:
        manifest = manifest.replace(run__genesis=round(time.time(), 3))
    try:
        existing = Manifest.from_bytes(store.get(paths.MANIFEST, max_bytes=1 << 20))
    except ObjectNotFound:
        existing = None
    if existing is not None and existing.run.id == manifest.run.id and manifest.run.genesis != existing.run.genesis:
        manifest = manifest.replace(run__genesis=existing.run.genesis)
    if existing is not None and existing.digest != manifest.digest:
        raise ManifestError(f"{store.uri} already holds run {existing.run_key}; use another store or run id")
    store.put_if_absent(paths.MANIFEST, manifest.to_toml().encode())
    t0 = time.perf_counter()
    prepare(manifest, store)
    data = TokenData.load(manifest, store)
    log.info("data ready in %.1fs: %d train / %d held-out sequences", time.perf_counter() - t0, data.n_train, data.n_heldout)
    model = build_model(manifest.model, data.vocab_size, manifest.data.seq_len, manifest.run.seed)
    publish_checkpoint(store, 0, {n: p.detach() for n, p in model.named_parameters()})
    return manifest
