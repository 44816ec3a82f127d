"""`locoswarm bench codec`: payload size, reconstruction error and speed versus the reference.

Two workloads, one JSON line each:

1. ``llama150m_synthetic``: every tensor of a LLaMA-shaped ~150M model (vocab 32000,
   hidden 768, 12 layers, intermediate 2048, untied lm_head) holding synthetic
   pseudo-gradients with the structure real ones have: per-row and per-column log-normal
   scales, heavy tails (a Gaussian times a log-normal factor), and small norm-weight deltas.
2. ``tiny_llama_adamw``: the real pseudo-gradient of a small ``LlamaForCausalLM`` after a
   few AdamW steps on random tokens.

Ours = ``protocol.codec.compress`` + ``protocol.wire.encode_payload`` (every byte of the
signed object counted); decode = ``decode_payload`` + ``decompress``. Baseline =
``bench.reference`` (Templar-style: per-tensor 4-bin LUT codes of one byte, 12-bit
indices, dense 1-D tensors). Both use the same top-k selection, so ``rel_error`` (over the
selected positions) compares the value quantizers and ``rel_error_vs_input`` the whole
tensors. Speeds are dense elements per second, the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from bench import reference
from protocol.codec import compress, decompress, unchunk
from protocol.codec_types import CompressedTensor, model_layout
from protocol.identity import Identity
from protocol.indexcode import index_section_bytes
from protocol.manifest import CodecConfig
from protocol.wire import Expectation, decode_payload, encode_payload

RUN = "bench@0000000000000000"


def llama_shapes(*, vocab: int, hidden: int, layers: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a LLaMA with untied embeddings (MHA: k/v as wide as q)."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def synthetic_pseudo_gradients(
    shapes: Mapping[str, tuple[int, ...]], device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Row/column-scaled, heavy-tailed matrices and small 1-D deltas, like real pseudo-gradients."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = 1e-4 * torch.randn(shape, generator=g, device=device)
            continue
        rows, cols = shape
        row = torch.exp(0.5 * torch.randn(rows, 1, generator=g, device=device))
        col = torch.exp(0.5 * torch.randn(1, cols, generator=g, device=device))
        x = torch.randn(shape, generator=g, device=device)
        x.mul_(torch.randn(shape, generator=g, device=device).mul_(0.5).exp_())  # log-normal tails
        out[name] = x.mul_(row).mul_(col).mul_(1e-3)
    return out


def tiny_llama_pseudo_gradients(device: torch.device, steps: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """theta_0 - theta_H of a small LlamaForCausalLM after ``steps`` AdamW steps on random tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(device)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator(device=device).manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=g, device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: start[n] - p.detach() for n, p in model.named_parameters()}


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, result


def _selected(c: CompressedTensor) -> torch.Tensor:
    lay = c.layout
    mask = torch.zeros(lay.n_chunks, lay.chunk_len, dtype=torch.bool, device=c.idx.device)
    mask.scatter_(1, c.idx, True)
    return unchunk(mask, lay)


def _errors(
    x: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> tuple[float, float]:
    """(error over selected positions / their norm, whole-tensor error / input norm), all tensors."""
    sel_err = sel_norm = err = norm = 0.0
    for name, t in x.items():
        diff = (decoded[name] - t).double()
        m = masks[name]
        sel_err += float(diff[m].square().sum())
        sel_norm += float(t.double()[m].square().sum())
        err += float(diff.square().sum())
        norm += float(t.double().square().sum())
    return math.sqrt(sel_err / sel_norm), math.sqrt(err / norm)


def index_bound_bits(chunk_len: int, k: int) -> float:
    """log2 C(chunk_len, k) / k: the fewest bits per index any position code can average."""
    return (math.lgamma(chunk_len + 1) - math.lgamma(k + 1) - math.lgamma(chunk_len - k + 1)) / math.log(2) / k


def measure(
    workload: str, x: Mapping[str, torch.Tensor], cfg: CodecConfig, *, repeats: int, device: torch.device
) -> dict[str, Any]:
    """All figures of one workload, ours and baseline, as one flat dict."""
    layouts = model_layout({n: tuple(t.shape) for n, t in x.items()}, cfg)
    identity = Identity.from_seed(b"bench codec")
    expect = Expectation(run=RUN, window=0, layouts=layouts, codec=cfg, max_bytes=1 << 34)
    numel = sum(lay.numel for lay in layouts.values())
    kept = sum(lay.n_chunks * lay.k for lay in layouts.values())

    def ours_decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, CompressedTensor]]:
        payload = decode_payload(data, expect, device=device)
        return {name: decompress(c) for name, c in payload.tensors.items()}, payload.tensors

    # Ours and the baseline alternate tensor by tensor, so load from other processes on a
    # shared machine hits both alike. Encode = compress every tensor + encode_payload;
    # decode = decode_payload + decompress every tensor. Each figure: median over repeats.
    keys = ("enc", "dec", "b_enc", "b_dec", "wire_enc", "wire_dec")
    times: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(max(1, repeats)):
        enc = dec = b_enc = b_dec = 0.0
        sent: dict[str, CompressedTensor] = {}
        ref: dict[str, reference.RefTensor] = {}
        for name, lay in layouts.items():
            t, sent[name] = _timed(functools.partial(compress, x[name], lay), device)
            enc += t
            t, ref[name] = _timed(functools.partial(reference.encode_tensor, x[name], lay), device)
            b_enc += t
        t, data = _timed(
            functools.partial(
                encode_payload, run=RUN, window=0, base_digest=bytes(32), tokens=0, tensors=sent, codec=cfg,
                identity=identity,
            ),
            device,
        )
        enc += t
        wire_enc = t
        t, payload = _timed(functools.partial(decode_payload, data, expect, device=device), device)
        dec += t
        wire_dec = t
        for name in layouts:
            dec += _timed(functools.partial(decompress, payload.tensors[name]), device)[0]
            b_dec += _timed(functools.partial(reference.decode_tensor, ref[name], device), device)[0]
        for key, value in zip(keys, (enc, dec, b_enc, b_dec, wire_enc, wire_dec)):
            times[key].append(value)
    enc_s, dec_s, b_enc_s, b_dec_s, wire_enc_s, wire_dec_s = (statistics.median(times[key]) for key in keys)

    decoded, sent = ours_decode(data)
    rel, rel_in = _errors(x, decoded, {n: _selected(c) for n, c in sent.items()})
    index_bytes = sum(index_section_bytes(lay.n_chunks, lay.chunk_len, lay.k) for lay in layouts.values())
    del decoded, sent
    b_decoded = reference.decode(ref, device)
    b_rel, b_rel_in = _errors(x, b_decoded, {n: reference.selected_mask(r).to(device) for n, r in ref.items()})
    del b_decoded
    b_bytes = reference.nbytes(ref)
    sparse_kept = sum(lay.n_chunks * lay.k for name, lay in layouts.items() if len(lay.shape) > 1)

    chunk, k = cfg.chunk, cfg.topk
    fig: dict[str, Any] = {
        "workload": workload,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "params": numel,
        "tensors": len(layouts),
        "chunk": chunk,
        "topk": k,
        "payload_bytes": len(data),
        "bits_per_param": 8 * len(data) / numel,
        "ratio_vs_fp32": 4 * numel / len(data),
        "rel_error": rel,
        "rel_error_vs_input": rel_in,
        "encode_melem_s": numel / enc_s / 1e6,
        "decode_melem_s": numel / dec_s / 1e6,
        "wire_share_of_encode": wire_enc_s / enc_s,
        "wire_share_of_decode": wire_dec_s / dec_s,
        "index_bits_per_index": 8 * index_bytes / kept,
        "index_bits_bound": index_bound_bits(chunk, k),
        "baseline_payload_bytes": b_bytes,
        "baseline_bits_per_param": 8 * b_bytes / numel,
        "baseline_ratio_vs_fp32": 4 * numel / b_bytes,
        "baseline_rel_error": b_rel,
        "baseline_rel_error_vs_input": b_rel_in,
        "baseline_encode_melem_s": numel / b_enc_s / 1e6,
        "baseline_decode_melem_s": numel / b_dec_s / 1e6,
        "baseline_index_bits_per_index": float(reference.INDEX_BITS) if sparse_kept else 0.0,
    }
    fig["bytes_ratio_vs_baseline"] = len(data) / b_bytes
    fig["rel_error_ratio_vs_baseline"] = rel / b_rel if b_rel else float("inf")
    fig["encode_speed_ratio_vs_baseline"] = fig["encode_melem_s"] / fig["baseline_encode_melem_s"]
    fig["decode_speed_ratio_vs_baseline"] = fig["decode_melem_s"] / fig["baseline_decode_melem_s"]
    fig["roundtrip_speed_ratio_vs_baseline"] = (b_enc_s + b_dec_s) / (enc_s + dec_s)
    return {key: round(v, 6) if isinstance(v, float) else v for key, v in fig.items()}


def _table(figures: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [
        ("bits / param", "bits_per_param", "{:.4f}"),
        ("ratio vs fp32", "ratio_vs_fp32", "{:.1f}x"),
        ("rel. error (selected)", "rel_error", "{:.4f}"),
        ("rel. error (whole tensor)", "rel_error_vs_input", "{:.4f}"),
        ("encode Melem/s", "encode_melem_s", "{:.1f}"),
        ("decode Melem/s", "decode_melem_s", "{:.1f}"),
        ("index bits / index", "index_bits_per_index", "{:.2f}"),
    ]
    console = Console()
    for fig in figures:
        table = Table(title=f"{fig['workload']}: {fig['params'] / 1e6:.1f}M params on {fig['device']}")
        table.add_column("figure")
        table.add_column("ours", justify="right")
        table.add_column("reference", justify="right")
        for label, key, fmt in rows:
            table.add_row(label, fmt.format(fig[key]), fmt.format(fig["baseline_" + key]))
        table.add_row("index bound log2 C(n,k)/k", f"{fig['index_bits_bound']:.2f}", "")
        console.print(table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``locoswarm bench codec``."""
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="a smaller model, for a fast look")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def run(args: Any) -> int:
    """CLI entry: ``locoswarm bench codec [--json] [--repeats N] [--device D] [--quick]``."""
    device = torch.device(args.device)
    threads = getattr(args, "threads", None) or 1
    torch.set_num_threads(threads)
    quick = bool(getattr(args, "quick", False))
    cfg = CodecConfig()
    if quick:
        shapes = llama_shapes(vocab=8000, hidden=768, layers=2, intermediate=2048)
    else:
        shapes = llama_shapes(vocab=32000, hidden=768, layers=12, intermediate=2048)
    figures = []
    with torch.no_grad():
        x = synthetic_pseudo_gradients(shapes, device)
        figures.append(measure("llama150m_synthetic" if not quick else "llama_synthetic_quick", x, cfg,
                               repeats=args.repeats, device=device))
        del x
    real = tiny_llama_pseudo_gradients(device)
    with torch.no_grad():
        figures.append(measure("tiny_llama_adamw", real, cfg, repeats=args.repeats, device=device))
    if not args.json:
        _table(figures)
    for fig in figures:
        print(json.dumps(fig), flush=True)
    return 0
