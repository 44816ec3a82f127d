"""LoCo: error-compensated 4-bit gradient communication inside one multi-GPU/multi-machine peer.

A peer with several GPUs runs its inner loop under DDP. Plain DDP all-reduces fp32 gradients
every step; LoCo ("Low-Bit Communication Adaptor for Large-scale Model Training", Xie et al.
2024, Alg. 1) sends 4-bit codes instead and keeps the quantization error in a memory so
that what is lost in one step is sent in a later one. Per DDP bucket, every step:

    h  = g + e                                  compensate with the error memory
    q  = Q(h)                                   4-bit symmetric, one fp32 scale per group
    all_gather(q) -> g_avg = mean_r deQ(q_r)    codes cannot be summed on the wire (overflow)
    e <- beta * e + (1 - beta) * (h - deQ(q))   moving average of the error (paper Eq. 4)
    e is stored in 8 bits (int8 + per-group scale) and reset to zero every T steps

Wire cost: ``bits`` per element (two 4-bit codes per byte) plus one fp32 scale per ``group``
elements, i.e. 4.25 bits/element for the defaults: one payload is 7.5x smaller than fp32.
But codes are all-gathered, so each of W ranks receives W - 1 payloads, where a ring
all-reduce of fp32 moves 2 (W - 1) / W vectors per rank: LoCo saves 64 / (4.25 W), about
15 / W, of what a rank receives (7.5x at W = 2, 1.9x at W = 8, nothing at W = 15).

``LocoCompressor`` is the pure per-worker math (no torch.distributed), reused by
``bench/convergence.py`` to simulate R workers in one process; ``loco_hook`` wraps it as a
DDP communication hook. ``compensate=False`` gives the same quantizer without memory, the
baseline the paper compares against.
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MEMORY_BITS = 8
"""The error memory is held as int8 with one fp32 scale per group (paper Sec. 3.2)."""


@dataclass(frozen=True)
class LocoConfig:
    bits: int = 4
    """Bits per transmitted gradient element: 2, 4 or 8 (paper: 4)."""
    group: int = 128
    """Elements sharing one fp32 scale; a multiple of 8, so packed codes always fill whole bytes."""
    beta: float = 0.8
    """Error-memory decay: e <- beta*e + (1-beta)*err (paper default 0.8)."""
    reset_every: int = 1024
    """T: the error memory is zeroed after every T steps (paper: keeps stale error bounded)."""
    compensate: bool = True
    """False: plain 4-bit quantization with no error memory (the uncompensated baseline)."""

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"LocoConfig.bits={self.bits}: use 2, 4 or 8 (codes are packed whole into bytes)")
        if self.group < 8 or self.group % 8:
            raise ValueError(f"LocoConfig.group={self.group}: use a multiple of 8 such as 128")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"LocoConfig.beta={self.beta}: must be in [0, 1)")
        if self.reset_every < 1:
            raise ValueError(f"LocoConfig.reset_every={self.reset_every}: must be >= 1 step")

    @property
    def levels(self) -> int:
        """Largest code magnitude: symmetric codes in [-levels, levels] (7 for 4 bits: 15 values)."""
        return 2 ** (self.bits - 1) - 1

    def payload_bytes(self, numel: int) -> int:
        """Bytes one worker sends for a ``numel``-element buffer: packed codes + fp32 scales."""
        n_groups = math.ceil(numel / self.group)
        return n_groups * self.group * self.bits // 8 + 4 * n_groups


# ---------------------------------------------------------------------------------------
# Pure quantizer: flat fp32 -> (packed codes uint8, fp32 scales) and back
# ---------------------------------------------------------------------------------------


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """float32 [n] -> [n_groups, group], zero-padded at the end."""
    n_groups = math.ceil(x.numel() / group)
    pad = n_groups * group - x.numel()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(n_groups, group)


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of a flat tensor.

    Returns (codes uint8 [n_groups * group * bits / 8] packed, scales float32 [n_groups]).
    Each element's error is at most scale/2, scale = max|x| of its group / levels.
    """
    levels = 2 ** (bits - 1) - 1
    xg = _grouped(x.float(), group)  # [G, group]
    scales = xg.abs().amax(dim=1) / levels  # [G]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(xg / safe[:, None]).clamp_(-levels, levels)
    codes = (q + levels).to(torch.uint8).view(-1)  # values in [0, 2*levels]
    return _pack(codes, bits), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int, numel: int) -> torch.Tensor:
    """Inverse of ``quantize``: float32 [numel]."""
    levels = 2 ** (bits - 1) - 1
    q = _unpack(codes, bits).view(-1, group).float() - levels  # [G, group]
    return (q * scales[:, None]).view(-1)[:numel]


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [n] with values < 2**bits -> uint8 [n*bits/8]; element i sits in the low bits first."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    c = codes.view(-1, per_byte)
    out = c[:, 0].clone()
    for j in range(1, per_byte):
        out |= c[:, j] << (bits * j)
    return out


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per_byte)]
    return torch.stack(parts, dim=1).view(-1)


# ---------------------------------------------------------------------------------------
# One worker's compressor: error memory (8-bit) + quantizer
# ---------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """What one worker transmits for one flat buffer."""

    codes: torch.Tensor
    """uint8 [n_groups * group * bits / 8]: packed codes."""
    scales: torch.Tensor
    """float32 [n_groups]."""
    numel: int


class LocoCompressor:
    """One worker's LoCo state for one flat gradient buffer (a DDP bucket, or a whole model).

    ``encode`` compensates with the memory, quantizes, updates the memory and counts steps;
    the memory is zeroed after every ``reset_every`` encodes.
    """

    def __init__(self, cfg: LocoConfig, numel: int, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.numel = numel
        self.steps = 0
        self.resets = 0
        n_groups = math.ceil(numel / cfg.group)
        # 8-bit error memory: int8 codes [n_groups * group] and one fp32 scale per group.
        self._mem_q = torch.zeros(n_groups * cfg.group, dtype=torch.int8, device=device)
        self._mem_scale = torch.zeros(n_groups, dtype=torch.float32, device=device)

    def memory(self) -> torch.Tensor:
        """float32 [numel]: the current error memory e, decoded from 8 bits."""
        q = self._mem_q.view(-1, self.cfg.group).float()
        return (q * self._mem_scale[:, None]).view(-1)[: self.numel]

    def _store_memory(self, e: torch.Tensor) -> None:
        levels = 2 ** (MEMORY_BITS - 1) - 1
        eg = _grouped(e, self.cfg.group)
        scale = eg.abs().amax(dim=1) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        self._mem_q.copy_(torch.round(eg / safe[:, None]).clamp_(-levels, levels).to(torch.int8).view(-1))
        self._mem_scale.copy_(scale)

    def encode(self, grad: torch.Tensor) -> Quantized:
        """Quantize one step's flat gradient (any float dtype, [numel]) and update the memory."""
        cfg = self.cfg
        h = grad.detach().float().reshape(-1)
        if cfg.compensate:
            h = h + self.memory()
        codes, scales = quantize(h, cfg.bits, cfg.group)
        if cfg.compensate:
            err = h - dequantize(codes, scales, cfg.bits, cfg.group, self.numel)
            self._store_memory(cfg.beta * self.memory() + (1.0 - cfg.beta) * err)
        self.steps += 1
        if cfg.compensate and self.steps % cfg.reset_every == 0:
            self._mem_q.zero_()
            self._mem_scale.zero_()
            self.resets += 1
        return Quantized(codes, scales, self.numel)

    def decode(self, q: Quantized) -> torch.Tensor:
        """float32 [numel] from one worker's transmission."""
        return dequantize(q.codes, q.scales, self.cfg.bits, self.cfg.group, q.numel)


def average_quantized(parts: list[Quantized], cfg: LocoConfig) -> torch.Tensor:
    """Mean over workers of the decoded gradients, float32 [numel], summed in rank order."""
    total = dequantize(parts[0].codes, parts[0].scales, cfg.bits, cfg.group, parts[0].numel)
    for p in parts[1:]:
        total += dequantize(p.codes, p.scales, cfg.bits, cfg.group, p.numel)
    return total / len(parts)


# ---------------------------------------------------------------------------------------
# DDP communication hook
# ---------------------------------------------------------------------------------------


@dataclass
class LocoState:
    """State of the LoCo hook on one rank: per-bucket compressors and byte counters."""

    process_group: dist.ProcessGroup | None
    cfg: LocoConfig
    compressors: dict[int, LocoCompressor] = field(default_factory=dict)
    step: int = 0
    """Completed optimizer steps (counted when the last bucket of a backward pass is hooked)."""
    bytes_sent_step: int = 0
    """Bytes this rank contributed in the last completed step (codes + scales, all buckets)."""
    fp32_bytes_step: int = 0
    """What the same buckets cost as fp32, for the compression ratio."""
    bytes_sent_total: int = 0
    _bytes_current: int = 0
    _fp32_current: int = 0

    @property
    def resets(self) -> int:
        """Times the error memory of bucket 0 was zeroed (every bucket resets on the same step)."""
        comp = self.compressors.get(0)
        return comp.resets if comp is not None else 0


def loco_hook_state(process_group: dist.ProcessGroup | None, cfg: LocoConfig) -> LocoState:
    """A fresh hook state; ``process_group=None`` means the default group."""
    return LocoState(process_group=process_group, cfg=cfg)


def _compressor_for(state: LocoState, index: int, numel: int, device: torch.device) -> LocoCompressor:
    comp = state.compressors.get(index)
    if comp is None or comp.numel != numel:
        # DDP rebuilds its buckets after the first iteration, so bucket i may change size once;
        # the memory of a rebuilt bucket starts again from zero.
        if comp is not None:
            log.debug("LoCo: bucket %d changed from %d to %d elements; memory reset", index, comp.numel, numel)
        comp = LocoCompressor(state.cfg, numel, device)
        comp.steps = state.step
        state.compressors[index] = comp
    return comp


def loco_hook(state: LocoState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: quantize this bucket with error compensation, all-gather, average.

    Register with ``ddp_model.register_comm_hook(state, loco_hook)`` (or ``register_loco``).
    Works on any backend with all_gather of uint8 tensors (gloo on CPU, NCCL on GPUs).
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    cfg = state.cfg
    comp = _compressor_for(state, bucket.index(), buf.numel(), buf.device)
    q = comp.encode(buf)

    # One uint8 message per rank: packed codes, then the scales' raw bytes. Same length on
    # every rank, since all ranks hold identical bucket layouts.
    msg = torch.cat([q.codes, q.scales.view(torch.uint8)])
    gathered = [torch.empty_like(msg) for _ in range(world)]
    n_codes = q.codes.numel()
    state._bytes_current += msg.numel()
    state._fp32_current += 4 * buf.numel()
    if bucket.is_last():
        for stale in [i for i in state.compressors if i > bucket.index()]:
            del state.compressors[stale]  # buckets were rebuilt into fewer ones
        state.step += 1
        state.bytes_sent_step, state.fp32_bytes_step = state._bytes_current, state._fp32_current
        state.bytes_sent_total += state._bytes_current
        state._bytes_current = state._fp32_current = 0

    fut = dist.all_gather(gathered, msg, group=group, async_op=True).get_future()

    def decode(_: torch.futures.Future) -> torch.Tensor:
        # clone: the scales' slice starts at an arbitrary byte offset, a float32 view needs 4.
        parts = [Quantized(m[:n_codes], m[n_codes:].clone().view(torch.float32), buf.numel()) for m in gathered]
        buf.copy_(average_quantized(parts, cfg).to(buf.dtype))
        return buf

    return fut.then(decode)


def register_loco(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    cfg: LocoConfig | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> LocoState:
    """Install the LoCo hook on a DDP model; the returned state carries the byte counters."""
    state = loco_hook_state(process_group, cfg or LocoConfig())
    ddp_model.register_comm_hook(state, loco_hook)
    return state
