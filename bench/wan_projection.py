"""The WAN bench's projection to big models on consumer and fast links, from the overlapped
timeline.

Payload sizes are exact: SparseLoCo's packed sections are a pure function of tensor shapes
(``protocol.indexcode``), computed for the real shapes of the 1b preset and of Llama-2-7B-
and Llama-2-70B-shaped models (meta device, nothing allocated), plus the header overhead
per tensor measured on a real tiny payload. Per window a peer uploads its payload once and
downloads the other ``peers - 1``.

Timeline of an overlapped peer (``inner.overlap``, ``node/overlap.py``): while window w+1
trains, window w is uploaded, decided, downloaded and aggregated on a helper thread, so all
of it is hidden as long as it takes less than the compute. Per window:

    overlapped:  wall = max(compute, upload + download + aggregate)
    serial:      wall = compute + upload + download + aggregate

(``overlapped_utilization`` takes what stays on the training path as an argument: nothing
of the exchange since 2026-11-30, when the upload moved to the helper thread.)

and utilization = compute / wall. Aggregation time is an assumption, not a measurement:
the GPU goal of ``bench/device_check.py`` (20 peers' 1b payloads decoded and aggregated in
1 s), scaled linearly with parameters and peers. Compute per window is unknown for a
machine we do not have, so each row gives the compute per window each timeline needs for
the utilization goal, and the utilization at the reference system's ~20 min of compute per
round.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from protocol.codec_types import model_layout
from protocol.indexcode import code_section_bytes, index_section_bytes
from protocol.manifest import CodecConfig, ModelConfig

PEERS = 20
"""Peers per window in the projection (the reference systems' order of magnitude)."""
LINKS_MBIT = (100.0, 1000.0)
UTILIZATION_GOAL = 0.97
REFERENCE_COMPUTE_S = 1200.0
"""~20 min of compute per round: the reference 72B system's (~70 s of communication per round)."""
REFERENCE_70B_COMM_S = 70.0
AGGREGATE_S_PER_1B_20_PEERS = 1.0
"""Assumed seconds to decode and aggregate 20 peers' payloads of 1e9 parameters on a GPU
(``bench/device_check.py``'s goal), scaled linearly."""
TINY_VOCAB = 2048
TINY_SEQ_LEN = 128


def preset_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter shapes of the 1b preset (vocab 32768) and Llama-2-7B / 70B shapes (vocab
    32000), built on the meta device (no memory allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from node.model import model_config

    configs = {
        "1b": model_config(ModelConfig(preset="1b"), 32768, 2048),
        "7b": LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
        "70b": LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                           intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False),
    }
    out = {}
    for name, config in configs.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        out[name] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return out


def sparseloco_section_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Exact bytes of a SparseLoCo payload's packed sections (indices, codes, scales)."""
    total = 0
    for lay in model_layout(shapes, CodecConfig()).values():
        total += index_section_bytes(lay.n_chunks, lay.chunk_len, lay.k) + code_section_bytes(lay.n_chunks, lay.k)
        total += lay.n_chunks  # one scale code byte per chunk
    return total


def tiny_overhead_per_tensor(payload_bytes: int) -> float:
    """Header + key + signature bytes of a measured tiny payload, per tensor (an upper bound
    for big models, where the fixed part is spread over more tensors)."""
    from node.model import build_model, param_shapes

    shapes = param_shapes(build_model(ModelConfig(preset="tiny"), TINY_VOCAB, TINY_SEQ_LEN, 0))
    return (payload_bytes - sparseloco_section_bytes(shapes)) / len(shapes)


def overlapped_utilization(compute: float, on_path: float, hidden: float) -> float:
    """compute / (on_path + max(compute, hidden)): ``on_path`` seconds of exchange on the
    training path, ``hidden`` (upload + download + aggregate) behind the next window's compute."""
    return compute / (on_path + max(compute, hidden))


def compute_for_goal(goal: float, on_path: float, hidden: float) -> float:
    """The least compute per window at which ``overlapped_utilization`` reaches ``goal``
    (it grows with compute, so the answer is unique): below ``hidden`` the wall is fixed at
    on_path + hidden; above it, only ``on_path`` costs."""
    below = goal * (on_path + hidden)
    return below if below <= hidden else goal * on_path / (1.0 - goal)


def serial_utilization(compute: float, comm: float) -> float:
    """compute / (compute + comm): every second of exchange is a second without training."""
    return compute / (compute + comm)


def row(preset: str, params: int, payload: float, mbit: float, peers: int = PEERS) -> dict:
    """One preset on one link: transfer and aggregate seconds, and each timeline's verdict."""
    bps = mbit * 1e6 / 8
    upload = payload / bps
    download = (peers - 1) * payload / bps
    agg = AGGREGATE_S_PER_1B_20_PEERS * params / 1e9 * peers / 20
    c = REFERENCE_COMPUTE_S
    return {
        "preset": preset, "params": params, "link_mbit": mbit, "peers": peers,
        "sparseloco_bytes": int(payload), "sparseloco_bits_per_param": round(8 * payload / params, 4),
        "dense_fp32_bytes": 4 * params, "compression_vs_fp32": round(4 * params / payload, 1),
        "upload_s": round(upload, 2), "download_s": round(download, 2), "aggregate_s_assumed": round(agg, 2),
        "overlap_compute_s_for_goal": round(compute_for_goal(UTILIZATION_GOAL, 0.0, upload + download + agg), 1),
        "serial_compute_s_for_goal": round(UTILIZATION_GOAL / (1 - UTILIZATION_GOAL) * (upload + download + agg), 1),
        "overlap_utilization_at_reference_compute": round(overlapped_utilization(c, 0.0, upload + download + agg), 4),
        "serial_utilization_at_reference_compute": round(serial_utilization(c, upload + download + agg), 4),
        "dense_serial_utilization_at_reference_compute": round(
            serial_utilization(c, peers * 4 * params / bps + agg), 4),
    }


def projections(tiny_payload_bytes: int, peers: int = PEERS) -> dict:
    """The projection line of ``bench wan``: every preset on every link."""
    per_tensor = tiny_overhead_per_tensor(tiny_payload_bytes)
    rows = []
    for preset, shapes in preset_shapes().items():
        params = sum(int(torch.Size(s).numel()) for s in shapes.values())
        payload = sparseloco_section_bytes(shapes) + per_tensor * len(shapes)
        rows.extend(row(preset, params, payload, mbit, peers) for mbit in LINKS_MBIT)
    return {
        "bench": "wan",
        "projections": rows,
        "timeline": "overlapped (inner.overlap): wall = max(compute, upload + download + aggregate): the whole "
                    "exchange of the window before runs beside training. serial: wall = compute + upload "
                    "+ download + aggregate. utilization = compute / wall",
        "assumptions": f"{peers} peers, each uploads its payload once and downloads {peers - 1}, sequentially at the "
                       "link rate; SparseLoCo sizes exact from codec layouts (chunk 4096, top-64, 2-bit, Elias-Fano "
                       "indices) + header overhead per tensor measured on the tiny payload; aggregate seconds "
                       f"ASSUMED = {AGGREGATE_S_PER_1B_20_PEERS:g} s per 1e9 parameters x 20 peers (the GPU goal of "
                       "bench/device_check.py), not measured; dense = fp32, serial",
        "utilization_goal": UTILIZATION_GOAL,
        "reference_compute_s": REFERENCE_COMPUTE_S,
        "reference_70b_comm_s": REFERENCE_70B_COMM_S,
    }
