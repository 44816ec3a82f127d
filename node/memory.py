"""Where every tensor of a peer's window lives: the memory plan, decided in one place.

Bytes per parameter, float32 everywhere (the outer step and the digest are float32):

    model weights + gradients + AdamW moments   16    always on the training device
    replica (global weights) + error feedback    8    on the device when everything fits,
                                                      else in pinned host memory, streamed
                                                      through the device one tensor at a time
    overlap's stand-in (``inner.overlap``)      +4    where the replica is (node/overlap.py)
    activations                                   per sequence: 34*s*h bytes per layer in 16-bit
                                                  (Korthikanti et al. 2022, without the 5*a*s^2
                                                  attention scores: SDPA's fused kernels never
                                                  store them), plus the float32 logits, their
                                                  softmax and gradient

On a GPU the inner steps run under bf16 autocast where the GPU supports it, and a batch is
split into micro-batches (gradients accumulate) when a whole one does not fit. On a CPU the
plan is everything on the CPU, no autocast, whole batches: the path the golden digests pin.
Decoding, aggregation and the outer step run on the training device; the replica's bits do
not depend on where it lives (elementwise float32 only, see ``node/replica.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from protocol.errors import LocoError

log = logging.getLogger(__name__)

TRAIN_BYTES_PER_PARAM = 16
STATE_BYTES_PER_PARAM = 8
STAND_IN_BYTES_PER_PARAM = 4
RESERVE_BYTES = 1 << 30
"""Device memory left for the CUDA context, allocator fragmentation and kernels' workspace."""


class NotEnoughMemory(LocoError):
    """The model cannot be trained on this device, even with one sequence per micro-batch."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model and its batches."""

    params: int
    layers: int
    hidden: int
    vocab: int
    seq_len: int
    batch_size: int

    @classmethod
    def of(cls, model: torch.nn.Module, seq_len: int, batch_size: int) -> ModelShape:
        cfg = model.config  # a transformers PretrainedConfig (node/model.py builds Llama models)
        return cls(sum(p.numel() for p in model.parameters()), cfg.num_hidden_layers, cfg.hidden_size,
                   cfg.vocab_size, seq_len, batch_size)

    def activation_bytes(self, sequences: int) -> int:
        """Activation memory of a forward+backward over ``sequences`` sequences (16-bit)."""
        s, h = self.seq_len, self.hidden
        per_layer = 34 * s * h
        logits = s * self.vocab * 4 * 3  # float32 logits, their softmax and gradient
        return int(sequences * (self.layers * per_layer + logits))


@dataclass(frozen=True)
class MemoryPlan:
    device: torch.device
    """The model, its gradients and optimizer; decoding, aggregation, the outer step."""
    state_device: torch.device
    """The replica's global weights and the error-feedback buffer."""
    autocast: torch.dtype | None
    """Autocast dtype of the inner steps (None: float32)."""
    micro_batch: int
    """Sequences per forward and backward; a batch is split into micro-batches of this size."""
    budget: int | None
    """Device bytes the plan may use (None on a CPU)."""
    need: int
    """Device bytes the plan expects to use at its peak."""

    @property
    def streamed(self) -> bool:
        """The replica and error feedback live in host memory and pass through the device."""
        return self.state_device != self.device

    def describe(self) -> str:
        if self.budget is None:
            return f"training on {self.device} in micro-batches of {self.micro_batch}; replica and error feedback there too"
        where = "pinned host memory" if self.streamed else str(self.device)
        amp = f", {str(self.autocast).removeprefix('torch.')} autocast" if self.autocast else ""
        budget = f" of a {self.budget / 2**30:.1f} GiB budget" if self.budget else ""
        return (f"training on {self.device}{amp}, micro-batches of {self.micro_batch}; replica and error feedback "
                f"in {where}; ~{self.need / 2**30:.1f} GiB{budget}")


def plan_memory(device: str | torch.device, shape: ModelShape, *, micro_batch: int = 0,
                device_bytes: int | None = None, overlap: bool = False) -> MemoryPlan:
    """The plan for training ``shape`` on ``device``.

    ``micro_batch`` forces a micro-batch size (0: the largest divisor of the batch that
    fits). ``device_bytes`` overrides the GPU's total memory (for planning elsewhere).
    ``overlap`` keeps one more float32 copy of the model with the replica (the stand-in).
    Raises ``NotEnoughMemory`` naming what is missing.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        mb = micro_batch or shape.batch_size
        return MemoryPlan(dev, dev, None, mb, None, 0)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if device_bytes is None else 0)
    total = device_bytes if device_bytes is not None else torch.cuda.get_device_properties(dev).total_memory
    budget = int(total * 0.95) - RESERVE_BYTES
    train = TRAIN_BYTES_PER_PARAM * shape.params
    state = (STATE_BYTES_PER_PARAM + (STAND_IN_BYTES_PER_PARAM if overlap else 0)) * shape.params
    divisors = [d for d in range(shape.batch_size, 0, -1) if shape.batch_size % d == 0]
    candidates = [micro_batch] if micro_batch else divisors
    for state_on_device in (True, False):
        fixed = train + (state if state_on_device else 0)
        for mb in candidates:
            need = fixed + shape.activation_bytes(mb)
            if need <= budget:
                autocast = torch.bfloat16 if device_bytes is not None or torch.cuda.is_bf16_supported() else None
                return MemoryPlan(dev, dev if state_on_device else torch.device("cpu"), autocast, mb, budget, need)
    smallest = train + shape.activation_bytes(min(candidates))
    raise NotEnoughMemory(
        f"{shape.params / 1e6:.0f}M parameters need ~{math.ceil(smallest / 2**30)} GiB on {dev} for training alone "
        f"(weights, gradients and AdamW moments at 16 bytes per parameter, plus one micro-batch), and this device "
        f"has {total / 2**30:.1f} GiB; use a smaller model preset, a larger GPU, or --device cpu"
    )
