"""The data types the codec, the wire format and aggregation share.

A tensor's ``TensorLayout`` is a pure function of its shape and the run's ``CodecConfig``,
so every peer and validator derives the same layout for the run's model and a decoder can
check a payload against it before allocating anything.

Chunking (SparseLoCo paper, Sec. 3): a 2-D tensor whose both dims divide by ``tile`` is cut
into tile x tile blocks (row-major over blocks, row-major inside a block); any other tensor
is flattened and cut into ``n_chunks = ceil(numel / chunk)`` equal chunks of
``chunk_len = ceil(numel / n_chunks)`` elements, the last one padded by fewer than
``n_chunks`` positions that never hold data. Each chunk keeps ``k`` values: ``topk``,
scaled down to the configured density for short chunks and never more than the last
chunk's real length (so padding can never be selected).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protocol.manifest import CodecConfig

LEVELS: tuple[float, float] = (0.5, 1.0)
"""Magnitudes of the two 2-bit levels relative to a chunk's scale (low, high)."""

SCALE_STEPS_PER_OCTAVE = 8
SCALE_ZERO_CODE = 255


def _scale_table() -> torch.Tensor:
    # Computed in float64 and rounded once, so every device multiplies by the same float32
    # constants (exp2 itself may differ by an ulp between CPU and CUDA).
    q = torch.arange(256, dtype=torch.float64)
    table = torch.exp2(-q / SCALE_STEPS_PER_OCTAVE)
    table[SCALE_ZERO_CODE] = 0.0
    return table.to(torch.float32)


SCALE_TABLE: torch.Tensor = _scale_table()
"""float32 [256]: scale_q -> multiplier of scale_ref; 2^(-q/8), and 0 for q = 255."""


@dataclass(frozen=True)
class TensorLayout:
    name: str
    shape: tuple[int, ...]
    tiled: bool
    """True: tile x tile blocks of a 2-D tensor; False: flat chunks."""
    n_chunks: int
    chunk_len: int
    """Positions per chunk (tile*tile when tiled)."""
    k: int
    """Values kept per chunk."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def padded(self) -> int:
        """Positions in the chunked view, padding included."""
        return self.n_chunks * self.chunk_len


def tensor_layout(name: str, shape: Sequence[int], cfg: CodecConfig) -> TensorLayout:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"tensor {name!r} is empty")
    if len(shape) == 2 and shape[0] % cfg.tile == 0 and shape[1] % cfg.tile == 0:
        n_chunks = numel // cfg.chunk
        return TensorLayout(name, shape, True, n_chunks, cfg.chunk, cfg.topk)
    n_chunks = -(-numel // cfg.chunk)
    chunk_len = -(-numel // n_chunks)
    # Keep the configured density on short chunks (a 128-wide norm keeps 2, not 64).
    last_len = numel - (n_chunks - 1) * chunk_len
    k = max(1, min(cfg.topk, last_len, -(-chunk_len * cfg.topk // cfg.chunk)))
    return TensorLayout(name, shape, False, n_chunks, chunk_len, k)


def model_layout(shapes: Mapping[str, Sequence[int]], cfg: CodecConfig) -> dict[str, TensorLayout]:
    """Layouts of a whole model, ordered by tensor name (the wire and aggregation order)."""
    return {name: tensor_layout(name, shapes[name], cfg) for name in sorted(shapes)}


@dataclass
class CompressedTensor:
    """Exactly what one tensor's section of a payload carries, decoded.

    Reconstruction: value[c, j] = sign * LEVELS[code & 1] * scale[c], sign = -1 when
    ``code & 2``, scale[c] = scale_ref * SCALE_TABLE[scale_q[c]] (0 when scale_q is
    255); placed at position ``idx[c, j]`` of chunk ``c``. Every tensor lives on the
    device of the tensors it came from.
    """

    layout: TensorLayout
    idx: torch.Tensor
    """int32 [n_chunks, k]: strictly increasing positions inside each chunk (chunks hold at
    most 65536 values; int32 halves what every held payload costs against int64)."""
    codes: torch.Tensor
    """uint8 [n_chunks, k]: 2-bit codes, bit 1 = negative, bit 0 = high magnitude."""
    scale_q: torch.Tensor
    """uint8 [n_chunks]: per-chunk scale code, see ``SCALE_TABLE``; 255 = all-zero chunk."""
    scale_ref: float
    """Per-tensor reference scale (a finite float32 >= 0): the largest chunk scale."""

    def scales(self) -> torch.Tensor:
        """float32 [n_chunks]: the per-chunk scales, computed identically on every device."""
        table = SCALE_TABLE.to(self.scale_q.device)
        return torch.tensor(self.scale_ref, dtype=torch.float32, device=self.scale_q.device) * table[
            self.scale_q.long()
        ]
