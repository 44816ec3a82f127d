"""``locoswarm export``: the run's newest model as a Hugging Face checkpoint.

The newest model is what a late joiner would have: the newest verified checkpoint plus every
decided window after it, replayed (``--checkpoint-only`` skips the replay). With
``--sample`` a few lines generated from the model are written next to it, so a person can
see what it has learned.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from node.dataset import TokenData
from node.follow import replay_to_newest
from node.model import build_model, export_hf, param_shapes
from node.replica import Replica
from protocol.codec_types import model_layout
from protocol.manifest import Manifest
from protocol.stores.base import Store


def export_latest(manifest: Manifest, store: Store, out: Path, *, checkpoint_only: bool = False,
                  sample: str | None = None) -> dict:
    """Write the run's newest model to ``out`` (safetensors + tokenizer, and ``sample.txt``
    with ``sample``); what was exported."""
    data = TokenData.load(manifest, store)
    model = build_model(manifest.model, data.vocab_size, manifest.data.seq_len, manifest.run.seed)
    layouts = model_layout(param_shapes(model), manifest.codec)
    replica, replayed = replay_to_newest(manifest, store, Replica(dict(model.named_parameters()), 0), layouts,
                                         checkpoint_only=checkpoint_only)
    replica.load_into(model)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tok.write_bytes(data.tokenizer_json)
        export_hf(model, str(tok), str(out))
    exported = {"window": replica.window, "replayed": replayed, "digest": replica.digest.hex(), "out": str(out)}
    if sample is not None:
        (out / "sample.txt").write_text(sample_text(model, data, sample) + "\n")
        exported["sample"] = str(out / "sample.txt")
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
