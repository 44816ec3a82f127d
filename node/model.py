"""Model presets and construction: Hugging Face ``transformers`` causal LMs, Llama first.

Every replica of a run must start from the *same bits*, so genesis weights are not drawn
with torch's RNG (whose CPU normal sampler takes different vectorized paths on different
CPUs). Instead each parameter gets its own stream: SHA-256 of (seed, parameter name) seeds
numpy's PCG64, whose raw 64-bit output is specified and stable across platforms and numpy
versions. Raw bits become a uniform value with the std HF would use for a normal init
(``initializer_range``); the arithmetic is one exactly-rounded float32 multiply, so the
result is bit-identical on any IEEE machine. Norm weights start at 1, biases at 0.

Preset sizes are quoted at a reference vocabulary (``PRESET_REFERENCE_VOCAB``): the
embedding and output matrices scale with the tokenizer, the rest does not.
Shape legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x keeps it in modeling_utils
    from transformers.modeling_utils import no_init_weights

from node.corpus import EOT_TOKEN
from node.dataset import TokenData
from protocol.assignment import heldout_ids
from protocol.errors import ManifestError
from protocol.manifest import ModelConfig

log = logging.getLogger(__name__)

def _llama(**shape: int) -> dict[str, Any]:
    """LlamaConfig kwargs: the given shape plus settings shared by every preset."""
    return dict(shape, tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.02)


PRESETS: dict[str, dict[str, Any]] = {
    # ~1.4M params at vocab 2048: CPU demos and tests.
    "tiny": _llama(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    # ~24M at vocab 32768 (~8M at 2048).
    "25m": _llama(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, intermediate_size=768),
    # ~135M at vocab 32768 (GPT-2-small-like width/depth).
    "150m": _llama(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    # ~1.1B at vocab 32768; Llama-3.2-1B shape with grouped-query attention.
    "1b": _llama(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192
    ),
}

PRESET_REFERENCE_VOCAB = {"tiny": 2048, "25m": 32768, "150m": 32768, "1b": 32768}
"""The vocabulary size at which each preset's name states its parameter count."""

ATTN_IMPLEMENTATION = "sdpa"


def model_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> transformers.PretrainedConfig:
    """The HF config for a run's model: a preset, or ``cfg.hf_config`` when preset is "hf".

    ``vocab_size`` comes from the run's tokenizer and always wins over a config file's value,
    so model and data agree; positions cover at least ``max_seq_len``.
    """
    if vocab_size < 1 or max_seq_len < 1:
        raise ManifestError(f"vocab_size ({vocab_size}) and max_seq_len ({max_seq_len}) must be >= 1")
    if cfg.preset == "hf":
        config = _load_hf_config(cfg.hf_config)
        if getattr(config, "vocab_size", vocab_size) != vocab_size:
            log.info("hf config vocab_size %s replaced by the tokenizer's %d", config.vocab_size, vocab_size)
        config.vocab_size = vocab_size
        if getattr(config, "max_position_embeddings", max_seq_len) < max_seq_len:
            config.max_position_embeddings = max_seq_len
    elif cfg.preset in PRESETS:
        # bos/eos = 0: node.corpus gives EOT_TOKEN id 0 in every tokenizer it trains.
        config = LlamaConfig(
            **PRESETS[cfg.preset],
            vocab_size=vocab_size,
            max_position_embeddings=max_seq_len,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        )
    else:
        raise ManifestError(f"model.preset {cfg.preset!r} is unknown; use one of {', '.join(PRESETS)} or 'hf'")
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def _load_hf_config(path: str) -> transformers.PretrainedConfig:
    """Read a config.json from disk (never the hub); Llama when it names no model_type."""
    if not path:
        raise ManifestError('model.preset = "hf" needs model.hf_config, the path of a config.json')
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read model.hf_config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"model.hf_config {path} must hold a JSON object")
    model_type = raw.pop("model_type", "llama")
    try:
        if model_type == "llama":
            return LlamaConfig.from_dict(raw)
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"model.hf_config {path} is not a usable {model_type} config: {exc}") from exc


def build_model(cfg: ModelConfig, vocab_size: int, max_seq_len: int, seed: int) -> torch.nn.Module:
    """A float32 causal LM on CPU whose weights are a pure function of (config, seed).

    Same seed -> same bits on every machine (see the module docstring for why).
    """
    config = model_config(cfg, vocab_size, max_seq_len)
    # Skip HF's own random init: every parameter is overwritten below.
    with no_init_weights():
        if isinstance(config, LlamaConfig):
            model = LlamaForCausalLM(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype=torch.float32)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(_init_values(seed, name, tuple(param.shape), std)))
    model.train()
    return model


def _init_values(seed: int, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Portable init of one parameter: ones for norm weights, zeros for biases, else uniform(std)."""
    if name.endswith("bias"):
        return np.zeros(shape, dtype=np.float32)
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    digest = hashlib.sha256(f"locoswarm/init/v1|{seed}|{name}".encode()).digest()
    bits = np.random.PCG64(int.from_bytes(digest, "little")).random_raw(int(np.prod(shape)))
    # m = 2k + 1 - 2^23 for the top 23 bits k: odd integers in (-2^23, 2^23), exact in float32,
    # so value = m * (a / 2^23) is uniform on (-a, a) after a single rounding.
    m = ((bits >> np.uint64(41)).astype(np.int64) * 2 + 1 - (1 << 23)).astype(np.float32)
    half_width = np.float32(std * np.sqrt(3.0) / (1 << 23))  # uniform(-a, a) has std a / sqrt(3)
    return (m * half_width).reshape(shape)


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters that train, by name; these names are the wire's tensor names."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def n_params(model: torch.nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (int64 [B, T+1]): inputs [:, :-1], labels [:, 1:]."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits  # [B, T, V]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, data: TokenData, n_eval: int, batch_size: int) -> float:
    """Mean loss of ``model`` over the run's fixed held-out evaluation sequences."""
    ids = heldout_ids(n_eval, data)
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    for i in range(0, len(ids), batch_size):
        batch = data.batch(ids[i : i + batch_size]).to(device)
        total += float(lm_loss(model, batch)) * len(batch)
    return total / len(ids)


def export_hf(model: torch.nn.Module, tokenizer_json_path: str, out_dir: str) -> None:
    """Write a plain HF checkpoint (safetensors + tokenizer) that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load anywhere, without locoswarm installed."""
    tok_path = Path(tokenizer_json_path)
    if not tok_path.is_file() or tok_path.stat().st_size == 0:
        # Runs on pre-tokenized shards may have no tokenizer (TokenData.tokenizer_json == b"").
        raise ValueError(f"{tok_path} is not a tokenizer.json; a model cannot be exported without its tokenizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    if EOT_TOKEN in tokenizer.get_vocab():
        tokenizer.eos_token = EOT_TOKEN
        tokenizer.bos_token = EOT_TOKEN
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = max_positions
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("exported model and tokenizer to %s", out)
