"""Resumable local state and published checkpoints."""

import json

import pytest
import torch

from node.checkpoint import fetch_checkpoint, latest_checkpoint, publish_checkpoint
from node.state import LocalState, load_local_state, save_local_state
from protocol import paths
from protocol.digest import weights_digest
from protocol.errors import CheckpointError
from protocol.stores.memory import MemoryStore


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(3, generator=g)}


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


def test_published_checkpoint_is_verified_on_fetch():
    store = MemoryStore()
    w = _weights()
    assert publish_checkpoint(store, 5, w)
    assert not publish_checkpoint(store, 5, _weights(1))  # first one wins
    assert latest_checkpoint(store, every=5) == 5
    shapes = {k: tuple(v.shape) for k, v in w.items()}
    got, digest = fetch_checkpoint(store, 5, shapes, 1 << 20)
    assert digest == weights_digest(w)


def test_tampered_or_misshapen_checkpoint_is_refused():
    store = MemoryStore()
    w = _weights()
    publish_checkpoint(store, 2, w)
    shapes = {k: tuple(v.shape) for k, v in w.items()}
    with pytest.raises(CheckpointError, match="layout"):
        fetch_checkpoint(store, 2, {"a.weight": (4, 8), "b.bias": (3,)}, 1 << 20)
    blob = bytearray(store.get(paths.checkpoint_weights_key(2)))
    blob[-1] ^= 1
    store.put(paths.checkpoint_weights_key(2), bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        fetch_checkpoint(store, 2, shapes, 1 << 20)
    meta = json.loads(store.get(paths.checkpoint_meta_key(2)))
    with pytest.raises(CheckpointError, match="missing"):
        fetch_checkpoint(store, 3, shapes, 1 << 20)
    assert meta["window"] == 2


class OneLevelStore(MemoryStore):
    """Lists one directory level only, as the p2p store does."""

    def list(self, prefix: str = ""):
        return [o for o in super().list(prefix) if "/" not in o.key[len(prefix):]]


def test_latest_checkpoint_is_found_by_probing_when_listing_is_shallow():
    store = OneLevelStore()
    assert latest_checkpoint(store, every=3) is None
    for w in range(0, 40, 3):
        publish_checkpoint(store, w, _weights())
    assert latest_checkpoint(store, every=3) == 39
