"""The reference (Templar-style) SparseLoCo format, as the baseline our codec must beat.

What the reference sends, per tensor:

- 1-D tensors (norm weights, biases): dense float32.
- every other tensor: the same chunked top-k selection as ours (``protocol.codec.chunk_view``),
  then the kept values quantized with *one* shift/scale for the whole tensor: 4 bins over
  6 standard deviations of the centered kept values, each code stored in one byte, and a
  per-tensor lookup table holding the mean of the values that fell in each bin; positions
  packed at 12 bits each (two per three bytes).

``encode`` builds the actual byte strings (so timings include the packing), ``nbytes`` is the
exact serialized size (codes, packed indices, shift + scale + LUT per tensor, dense 1-D),
and ``decode`` reconstructs dense tensors. This is benchmark code, not a wire format:
nothing decoded here ever comes from a network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from protocol.codec import chunk_view, unchunk
from protocol.codec_types import TensorLayout

N_BINS = 4
RANGE_IN_SIGMAS = 6.0
INDEX_BITS = 12
PER_TENSOR_BYTES = 4 + 4 + 4 * N_BINS
"""float32 shift, float32 scale and a float32 LUT of N_BINS bin means."""


@dataclass
class RefTensor:
    """One tensor in the reference format: either ``dense`` or the sparse fields."""

    layout: TensorLayout
    dense: bytes | None = None
    idx12: bytes = b""
    """Positions inside each chunk, 12 bits each, packed two per three bytes."""
    codes: bytes = b""
    """One byte per kept value: its bin."""
    shift: float = 0.0
    lut: tuple[float, ...] = ()

    @property
    def nbytes(self) -> int:
        if self.dense is not None:
            return len(self.dense)
        return len(self.idx12) + len(self.codes) + PER_TENSOR_BYTES


def _pack12(idx: torch.Tensor) -> bytes:
    """int64 [m] values < 4096 -> ceil(m*12/8) bytes, two values per three bytes."""
    v = idx.reshape(-1).to(torch.int32)
    if v.numel() % 2:
        v = torch.cat([v, v.new_zeros(1)])
    a, b = v[0::2], v[1::2]
    out = torch.stack([a & 0xFF, ((a >> 8) & 0x0F) | ((b & 0x0F) << 4), b >> 4], dim=1).to(torch.uint8)
    return out.cpu().numpy().tobytes()[: math.ceil(idx.numel() * INDEX_BITS / 8)]


def _unpack12(data: bytes, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    raw = bytearray(data)
    if len(raw) % 3:
        raw += bytes(3 - len(raw) % 3)
    t = torch.frombuffer(raw, dtype=torch.uint8).to(device).reshape(-1, 3).to(torch.int64)
    a = t[:, 0] | ((t[:, 1] & 0x0F) << 8)
    b = (t[:, 1] >> 4) | (t[:, 2] << 4)
    return torch.stack([a, b], dim=1).reshape(-1)[:m]


def encode_tensor(x: torch.Tensor, layout: TensorLayout) -> RefTensor:
    """Reference compression of one tensor (1-D: dense float32), computed on ``x``'s device."""
    x = x.detach().to(torch.float32)
    if x.dim() == 1:
        return RefTensor(layout, dense=x.cpu().contiguous().numpy().tobytes())
    if layout.chunk_len > 1 << INDEX_BITS:
        raise ValueError(f"reference format packs positions at 12 bits; chunk_len {layout.chunk_len} is too long")
    chunks = chunk_view(x, layout)
    mag = chunks.abs()
    if layout.padded > layout.numel:
        mag.view(-1)[layout.numel :] = -1.0
    _, idx = torch.topk(mag, layout.k, dim=1, sorted=False)
    idx, _ = torch.sort(idx, dim=1)
    val = chunks.gather(1, idx).reshape(-1)
    shift = val.mean()
    centered = val - shift
    std = centered.norm() / math.sqrt(max(centered.numel() - 1, 1))
    scale = float(RANGE_IN_SIGMAS * std / N_BINS) or 1.0
    q = (centered / scale + N_BINS // 2).round().clamp(0, N_BINS - 1).to(torch.int64)
    sums = centered.new_zeros(N_BINS).scatter_add_(0, q, centered)
    counts = centered.new_zeros(N_BINS).scatter_add_(0, q, torch.ones_like(centered))
    lut = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    return RefTensor(
        layout,
        idx12=_pack12(idx),
        codes=q.to(torch.uint8).cpu().numpy().tobytes(),
        shift=float(shift),
        lut=tuple(float(v) for v in lut),
    )


def decode_tensor(r: RefTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense float32 reconstruction of one reference tensor on ``device``."""
    layout = r.layout
    if r.dense is not None:
        return torch.frombuffer(bytearray(r.dense), dtype=torch.float32).to(device).reshape(layout.shape)
    m = layout.n_chunks * layout.k
    idx = _unpack12(r.idx12, m, device).reshape(layout.n_chunks, layout.k)
    q = torch.frombuffer(bytearray(r.codes), dtype=torch.uint8).to(device).to(torch.int64)
    lut = torch.tensor(r.lut, dtype=torch.float32, device=device)
    vals = (lut[q] + r.shift).reshape(layout.n_chunks, layout.k)
    chunks = torch.zeros(layout.n_chunks, layout.chunk_len, device=device)
    chunks.scatter_(1, idx, vals)
    return unchunk(chunks, layout)


def encode(tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, TensorLayout]) -> dict[str, RefTensor]:
    """Reference compression of a whole model."""
    return {name: encode_tensor(tensors[name], layout) for name, layout in layouts.items()}


def decode(encoded: Mapping[str, RefTensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Dense reconstruction of a whole model on ``device``."""
    return {name: decode_tensor(r, device) for name, r in encoded.items()}


def nbytes(encoded: Mapping[str, RefTensor]) -> int:
    """Exact serialized size of the reference payload's tensor data."""
    return sum(r.nbytes for r in encoded.values())


def selected_mask(r: RefTensor) -> torch.Tensor:
    """bool tensor of the layout's shape: the positions the reference sends (all, if dense)."""
    layout = r.layout
    if r.dense is not None:
        return torch.ones(layout.shape, dtype=torch.bool)
    idx = _unpack12(r.idx12, layout.n_chunks * layout.k).reshape(layout.n_chunks, layout.k)
    chunks = torch.zeros(layout.n_chunks, layout.chunk_len, dtype=torch.bool)
    chunks.scatter_(1, idx, True)
    return unchunk(chunks, layout)
