"""Resumable local state and published checkpoints."""

import hashlib
import itertools
import json

import pytest
import torch
from safetensors.torch import save

from node.checkpoint import (
    checkpoint_windows,
    fetch_checkpoint,
    meta_key,
    publish_checkpoint,
    publish_due,
    weights_key,
)
from node.state import LocalState, load_local_state, save_local_state
from protocol import paths
from protocol.digest import weights_digest
from protocol.errors import CheckpointError
from protocol.manifest import RunConfig
from protocol.stores.memory import MemoryStore


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(3, generator=g)}


def test_writes_a_kill_interrupted_are_cleaned_up_by_the_next_process(tmp_path):
    """A SIGKILL during a state or checkpoint write leaves a model-sized temp file behind;
    the next process holding the workdir removes those, and nothing else."""
    (tmp_path / ".state-k1ll3d").write_bytes(b"\0" * 1000)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".checkpoint-k1ll3d.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "notes.state-keep").write_text("not ours")
    assert load_local_state(tmp_path / "state.safetensors") is None  # the first write was the one killed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "notes.state-keep"]
    publish_checkpoint(MemoryStore(), 4, _weights(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_local_state_round_trip_is_exact(tmp_path):
    path = tmp_path / "state.safetensors"
    state = LocalState(7, _weights(), {"adam.m.a": torch.ones(2)}, {"a.weight": torch.zeros(8, 4)}, {"k": [1, 2]})
    save_local_state(path, state)
    back = load_local_state(path)
    assert back.window == 7 and back.meta == {"k": [1, 2]}
    assert weights_digest(back.weights) == weights_digest(state.weights)
    assert torch.equal(back.optimizer["adam.m.a"], torch.ones(2))
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


def test_missing_local_state_is_none_and_corrupt_is_a_clear_error(tmp_path):
    assert load_local_state(tmp_path / "none.safetensors") is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_local_state(bad)


def test_published_checkpoint_is_fetched_by_the_digest_a_decision_names(tmp_path):
    store = MemoryStore()
    w = _weights()
    digest = publish_checkpoint(store, 5, w, tmp_path)
    assert digest == weights_digest(w)
    publish_checkpoint(store, 5, _weights(1), tmp_path)  # another one at the same window does not displace it
    shapes = {k: tuple(v.shape) for k, v in w.items()}
    assert weights_digest(fetch_checkpoint(store, 5, digest, shapes)) == digest
    assert list(checkpoint_windows(store, every=5)) == [5]


def test_tampered_misshapen_or_misnamed_checkpoint_is_refused(tmp_path):
    store = MemoryStore()
    w = _weights()
    digest = publish_checkpoint(store, 2, w, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in w.items()}
    with pytest.raises(CheckpointError, match="layout"):
        fetch_checkpoint(store, 2, digest, {"a.weight": (4, 8), "b.bias": (3,)})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fetch_checkpoint(store, 3, digest, shapes)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fetch_checkpoint(store, 2, b"\x01" * 32, shapes)
    blob = bytearray(store.get(weights_key(2, digest)))
    blob[-1] ^= 1
    store.put(weights_key(2, digest), bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        fetch_checkpoint(store, 2, digest, shapes)
    # A forger names its file after the honest digest, with a self-consistent meta: the
    # weights' own digest gives it away.
    forged = _weights(7)
    forged_blob = save({k: v.contiguous() for k, v in sorted(forged.items())})
    store.put(weights_key(2, digest), forged_blob)
    meta = {"window": 2, "digest": digest.hex(), "sha256": hashlib.sha256(forged_blob).hexdigest(), "size": len(forged_blob)}
    store.put(meta_key(2, digest), json.dumps(meta).encode())
    with pytest.raises(CheckpointError, match="digest it is named by"):
        fetch_checkpoint(store, 2, digest, shapes)
    store.put(meta_key(2, digest), b'{"window": 2, "window": 3}')
    with pytest.raises(CheckpointError, match="repeats a key"):
        fetch_checkpoint(store, 2, digest, shapes)


class OneLevelStore(MemoryStore):
    """Lists one directory level only, as the p2p store does."""

    listings = 0

    def list(self, prefix: str = ""):
        self.listings += 1
        return [o for o in super().list(prefix) if "/" not in o.key[len(prefix):]]


def test_checkpoints_are_found_by_probing_when_listing_is_shallow(tmp_path):
    store = OneLevelStore()
    assert list(checkpoint_windows(store, every=3)) == []
    for w in range(3, 301, 3):
        publish_checkpoint(store, w, _weights(), tmp_path)
    store.listings = 0
    assert list(itertools.islice(checkpoint_windows(store, every=3), 3)) == [300, 297, 294]
    assert store.listings <= 30  # galloping and bisecting over 100 checkpoints, not a listing of each
    assert list(checkpoint_windows(store, every=3, after=290)) == [300, 297, 294, 291]
    assert list(checkpoint_windows(store, every=3, after=300)) == []
    for w in (3, 6, 150, 153, 291, 294, 300):  # publishers failed: at the start, in the middle, the newest
        store.delete(meta_key(w, weights_digest(_weights())))
    assert list(itertools.islice(checkpoint_windows(store, every=3), 3)) == [297, 288, 285]
    assert next(checkpoint_windows(store, every=3, after=150)) == 297
    assert list(checkpoint_windows(store, every=3, after=289)) == [297]
    store.delete(meta_key(9, weights_digest(_weights())))  # three in a row: beyond what the search steps over
    assert list(checkpoint_windows(store, every=3)) == []


def test_the_proposer_publishes_the_checkpoint_that_is_due_and_collects_what_retention_drops(tmp_path):
    store, run = MemoryStore(), RunConfig(checkpoint_every=2, keep_windows=2)
    for w in range(6):
        store.put(paths.payload_key(w, "a" * 24), b"x")

    def windows() -> list[int]:
        return sorted(paths.window_of_key(o.key) for o in store.list("windows/"))

    publish_due(store, run, 4, _weights(), tmp_path)  # due; the floor is min(4 - 1, 4 - 2) = 2
    assert list(checkpoint_windows(store, 2)) == [4] and windows() == [2, 3, 4, 5]
    publish_due(store, run, 5, _weights(1), tmp_path)  # not due; the floor is min(3, 3)
    assert list(checkpoint_windows(store, 2)) == [4] and windows() == [3, 4, 5]
    publish_due(store, run, 6, _weights(2), tmp_path, checkpoints=False)  # collects, leaves the checkpoint to others
    assert list(checkpoint_windows(store, 2)) == [4] and windows() == [4, 5]
