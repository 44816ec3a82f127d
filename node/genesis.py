"""``locoswarm init``: create a run in a store (manifest, tokenizer, data)."""

from __future__ import annotations

import logging
import time

from node.dataset import TokenData, prepare
from node.runinfo import find_manifest
from protocol import paths
from protocol.errors import ManifestError
from protocol.manifest import Manifest
from protocol.stores.base import Store

log = logging.getLogger(__name__)


def init_run(manifest: Manifest, store: Store) -> Manifest:
    """Write the run's data and manifest; returns the final manifest.

    ``init`` fills in what only it can know: the genesis time (when 0) and the data index
    hash. The genesis weights are not uploaded: they are a pure function of the manifest,
    and every peer computes them. Re-running it on a store that already holds the same run
    returns that run's manifest; a store holding a different run, or a manifest that trusts
    nobody to close windows, is refused before anything is written.
    """
    manifest.check_authority()
    existing = find_manifest(store)
    if existing is not None:
        same = manifest.replace(run__genesis=existing.run.genesis, data__index_sha256=existing.data.index_sha256)
        if same.digest != existing.digest:
            raise ManifestError(f"{store.uri} already holds run {existing.run_key}; use another store or run id")
        return existing
    if manifest.run.genesis == 0.0:
        manifest = manifest.replace(run__genesis=round(time.time(), 3))
    t0 = time.perf_counter()
    manifest = manifest.replace(data__index_sha256=prepare(manifest, store).digest)
    data = TokenData.load(manifest, store)
    log.info("data ready in %.1fs: %d train / %d held-out sequences", time.perf_counter() - t0, data.n_train, data.n_heldout)
    store.put_if_absent(paths.MANIFEST, manifest.to_toml().encode())  # last: a run exists once complete
    return manifest
