"""``locoswarm export``: the run's newest model as a Hugging Face checkpoint.

The newest model is what a late joiner would have: the newest verified checkpoint plus every
decided window after it, replayed (``--checkpoint-only`` skips the replay). What was
exported says which window it stands after, so an untrained genesis model is never passed
off as the run's. With ``--sample`` a few lines generated from the model are written next
to it, so a person can see what it has learned. ``status --eval`` evaluates the same model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.dataset import TokenData
from node.follow import replay_to_newest
from node.model import build_model, export_hf, heldout_loss, param_shapes
from node.replica import Replica
from protocol.codec_types import model_layout
from protocol.manifest import Manifest
from protocol.stores.base import Store


@dataclass
class NewestModel:
    """The run's newest global weights, loaded into a model."""

    model: torch.nn.Module
    data: TokenData
    replica: Replica
    replayed: int
    """Decided windows replayed on top of the checkpoint (or genesis)."""

    @property
    def after_window(self) -> int | None:
        """The last window whose update the weights include; None for the genesis model."""
        return self.replica.window - 1 if self.replica.window else None

    @property
    def start_window(self) -> int:
        """The window the checkpoint (or genesis) the replay started from was taken at."""
        return self.replica.window - self.replayed

    def facts(self) -> dict[str, Any]:
        """Where the weights stand, as plain data (``status --json`` and ``export`` print it)."""
        return {"after_window": self.after_window, "windows_applied": self.replica.window,
                "checkpoint": self.start_window or None, "replayed": self.replayed,
                "digest": self.replica.digest.hex()}

    def origin(self) -> str:
        """How the weights were obtained, for a person."""
        start, end = self.start_window, self.replica.window - 1
        replay = f"windows {start}-{end} replayed" if self.replayed > 1 else \
            (f"window {start} replayed" if self.replayed else "nothing replayed")
        base = f"checkpoint at the start of window {start}" if start else "genesis"
        return f"{base}, {replay}"


def newest_model(manifest: Manifest, store: Store, *, checkpoint_only: bool = False) -> NewestModel:
    """Build the model and bring it to the run's newest state (or its newest checkpoint)."""
    data = TokenData.load(manifest, store)
    model = build_model(manifest.model, data.vocab_size, manifest.data.seq_len, manifest.run.seed)
    layouts = model_layout(param_shapes(model), manifest.codec)
    replica, replayed = replay_to_newest(manifest, store, Replica(dict(model.named_parameters()), 0), layouts,
                                         checkpoint_only=checkpoint_only)
    replica.load_into(model)
    return NewestModel(model, data, replica, replayed)


def evaluate(newest: NewestModel, manifest: Manifest) -> float:
    """Held-out loss of ``newest`` (the same sequences peers and validators evaluate on)."""
    return heldout_loss(newest.model, newest.data, manifest.data.eval_sequences, manifest.data.batch_size)


def export_latest(manifest: Manifest, store: Store, out: Path, *, checkpoint_only: bool = False,
                  sample: str | None = None) -> dict[str, Any]:
    """Write the run's newest model to ``out`` (safetensors + tokenizer, and ``sample.txt``
    with ``sample``); what was exported and where it stands."""
    newest = newest_model(manifest, store, checkpoint_only=checkpoint_only)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tok.write_bytes(newest.data.tokenizer_json)
        export_hf(newest.model, str(tok), str(out))
    exported = newest.facts() | {"out": str(out), "origin": newest.origin()}
    if sample is not None:
        text = sample_text(newest.model, newest.data, sample)
        (out / "sample.txt").write_text(text + "\n")
        exported["sample"] = str(out / "sample.txt")
        exported["sample_text"] = text
    return exported


@torch.no_grad()
def sample_text(model: torch.nn.Module, data: TokenData, prompt: str, *, tokens: int = 48, seed: int = 0) -> str:
    """``tokens`` tokens sampled (temperature 0.8) after ``prompt``: what the model has learned."""
    tokenizer = data.tokenizer()
    ids = torch.tensor([tokenizer.encode(prompt).ids or [0]])
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    for _ in range(tokens):
        logits = model(input_ids=ids[:, -data.seq_len:]).logits[0, -1] / 0.8
        nxt = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen)
        ids = torch.cat([ids, nxt[None]], dim=1)
    return tokenizer.decode(ids[0].tolist())
