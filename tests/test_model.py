"""node.model: presets, portable deterministic init, the loss, and Hugging Face export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.corpus import EOT_TOKEN
from node.dataset import prepare
from node.model import (
    PRESET_REFERENCE_VOCAB,
    PRESETS,
    build_model,
    export_hf,
    lm_loss,
    model_config,
    n_params,
    param_shapes,
)
from protocol.errors import ManifestError
from protocol.manifest import Manifest, ModelConfig
from protocol.paths import DATA_TOKENIZER
from protocol.stores.memory import MemoryStore

torch.set_num_threads(1)
TINY = ModelConfig(preset="tiny")


def tiny(seed: int = 0, vocab: int = 512) -> torch.nn.Module:
    return build_model(TINY, vocab, 64, seed)


def test_same_seed_gives_identical_weights():
    a, b = tiny(seed=3), tiny(seed=3)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_different_seed_gives_different_weights():
    a, b = tiny(seed=3).state_dict(), tiny(seed=4).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])  # norms start at 1


def test_init_matches_golden_bits():
    # The genesis weights are part of the protocol: pin a few exact float32 values.
    w = tiny(seed=0).state_dict()["model.embed_tokens.weight"].reshape(-1)[:4]
    assert [float(x).hex() for x in w] == GOLDEN_EMBED


GOLDEN_EMBED = ["0x1.1aa2180000000p-5", "0x1.d0a95e0000000p-12", "0x1.26af2a0000000p-7", "-0x1.0152160000000p-7"]


def test_init_has_the_configured_std_and_norms_start_at_one():
    model = build_model(ModelConfig(preset="25m"), 2048, 64, seed=1)
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0005
    assert w.abs().max().item() <= 0.02 * 3**0.5
    assert torch.all(model.state_dict()["model.layers.0.input_layernorm.weight"] == 1)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_param_shapes_names_every_trainable_parameter():
    model = tiny()
    shapes = param_shapes(model)
    assert shapes["model.embed_tokens.weight"] == (512, 128)
    assert shapes["lm_head.weight"] == (512, 128)  # untied: its own tensor on the wire
    assert sum(int(np.prod(s)) for s in shapes.values()) == n_params(model)
    model.model.norm.weight.requires_grad_(False)
    assert "model.norm.weight" not in param_shapes(model)


def test_lm_loss_equals_hf_shifted_loss():
    model = tiny().eval()
    batch = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    ours = lm_loss(model, batch)
    ref = model(input_ids=batch, labels=batch).loss  # HF shifts labels itself
    assert torch.allclose(ours, ref, atol=1e-5)
    assert abs(ours.item() - np.log(512)) < 0.2  # a fresh model is near uniform


def test_lm_loss_decreases_with_adamw_on_tiny():
    model = tiny()
    batch = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize(
    "preset, low, high", [("tiny", 1e6, 3e6), ("25m", 20e6, 30e6), ("150m", 120e6, 170e6), ("1b", 0.9e9, 1.3e9)]
)
def test_preset_parameter_counts(preset, low, high):
    config = model_config(ModelConfig(preset=preset), PRESET_REFERENCE_VOCAB[preset], 2048)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert low <= n_params(model) <= high


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ManifestError, match="tiny"):
        model_config(ModelConfig(preset="7b"), 2048, 128)


def test_hf_config_file_is_used_with_the_tokenizers_vocab(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 32000}))
    model = build_model(ModelConfig(preset="hf", hf_config=str(path)), 300, 64, seed=0)
    assert param_shapes(model)["model.embed_tokens.weight"] == (300, 64)
    assert len(model.model.layers) == 2
    with pytest.raises(ManifestError, match="hf_config"):
        model_config(ModelConfig(preset="hf"), 300, 64)
    with pytest.raises(ManifestError, match="cannot read"):
        model_config(ModelConfig(preset="hf", hf_config=str(tmp_path / "missing.json")), 300, 64)


def test_preset_dicts_are_llama_config_kwargs():
    for preset, kwargs in PRESETS.items():
        config = transformers.LlamaConfig(**kwargs)
        assert config.hidden_size % config.num_attention_heads == 0, preset


def test_export_hf_round_trip_gives_same_logits_and_tokens(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200)
    store = MemoryStore()
    manifest = Manifest().replace(data__source=str(corpus), data__seq_len=16, tokenizer__vocab_size=300)
    index = prepare(manifest, store)
    tok_path = tmp_path / "tokenizer.json"
    tok_path.write_bytes(store.get(DATA_TOKENIZER))

    model = build_model(TINY, index.vocab_size, 16, seed=5).eval()
    export_hf(model, str(tok_path), str(tmp_path / "export"))
    assert (tmp_path / "export" / "model.safetensors").exists()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, index.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "def add(a, b):\n    return a + b\n"
    assert hf_tok(text)["input_ids"] == Tokenizer.from_file(str(tok_path)).encode(text).ids
    assert hf_tok.eos_token == EOT_TOKEN and hf_tok.eos_token_id == 0
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text


def test_export_without_a_tokenizer_is_refused_before_writing(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b"")
    with pytest.raises(ValueError, match="without its tokenizer"):
        export_hf(tiny(), str(tmp_path / "tokenizer.json"), str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def test_hf_config_of_another_family_builds_deterministically(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 64}))
    cfg = ModelConfig(preset="hf", hf_config=str(path))
    a, b = build_model(cfg, 300, 32, seed=1), build_model(cfg, 300, 32, seed=1)
    assert type(a).__name__ == "GPT2LMHeadModel"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.all(a.state_dict()["transformer.ln_f.weight"] == 1)
    assert torch.all(a.state_dict()["transformer.h.0.attn.c_attn.bias"] == 0)
    batch = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    assert abs(lm_loss(a, batch).item() - np.log(300)) < 0.3
