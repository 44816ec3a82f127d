"""``locoswarm export``: the run's latest published checkpoint as a Hugging Face model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from node.checkpoint import latest_checkpoint, load_checkpoint_into
from node.dataset import TokenData
from node.model import build_model, export_hf
from protocol.errors import CheckpointError
from protocol.manifest import Manifest
from protocol.stores.base import Store


def export_latest(manifest: Manifest, store: Store, out: Path) -> int:
    """Write the latest checkpoint to ``out`` (safetensors + tokenizer); returns its window."""
    window = latest_checkpoint(store, manifest.run.checkpoint_every)
    if window is None:
        raise CheckpointError(f"no published checkpoint in {store.uri}")
    data = TokenData.load(manifest, store)
    model = build_model(manifest.model, data.vocab_size, manifest.data.seq_len, manifest.run.seed)
    load_checkpoint_into(model, store, window)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tok.write_bytes(data.tokenizer_json)
        export_hf(model, str(tok), str(out))
    return window
