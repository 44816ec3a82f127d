"""The inner loop: H AdamW steps on the peer's assigned batches (warmup + cosine schedule).

The learning rate follows the run's global step: inner step i of window w is step
``w * H + i`` for everyone, so a peer that joined late or caught up is in phase with the rest.

Under ``torchrun`` the model is wrapped in DDP and each rank takes an equal slice of every
assigned batch, so N GPUs of one peer train exactly what one device would, faster.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from node.model import lm_loss
from protocol.manifest import InnerConfig


def lr_at(step: int, cfg: InnerConfig) -> float:
    """Learning rate at a global inner step: linear warmup, cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


@dataclass
class InnerResult:
    mean_loss: float
    """Mean training loss over the window's steps."""
    tokens: int
    """Tokens trained on (all ranks of the peer together)."""


class InnerLoop:
    """Owns the inner AdamW optimizer; its state carries over from window to window."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig, *, ddp_model: torch.nn.Module | None = None,
                 autocast: torch.dtype | None = None, micro_batch: int = 0):
        """``autocast``: dtype of the forward and backward (None: float32); ``micro_batch``:
        sequences per forward and backward, gradients accumulating over the batch (0: all)."""
        self.model = model
        self.train_model = ddp_model or model
        self.ddp = ddp_model is not None
        self.cfg = cfg
        self.autocast = autocast
        self.micro_batch = micro_batch
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
        )

    def train(self, batches: list[torch.Tensor], window: int,
              after_step: Callable[[], object] | None = None) -> InnerResult:
        """One AdamW step per batch ([B, T+1] token ids) of ``window``; loss and tokens
        trained. ``after_step`` runs between steps (an overlapped peer adds a landed aggregate)."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.train_model.train()
        losses = []
        tokens = 0
        for i, batch in enumerate(batches):
            local = batch[rank::world] if world > 1 else batch
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(window * self.cfg.steps + i, self.cfg)
            loss = self._forward_backward(local)
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            value = loss.detach()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            losses.append(value)  # read back once at the end: no device sync per step
            if after_step is not None:
                after_step()
            tokens += batch.shape[0] * (batch.shape[1] - 1)
        return InnerResult(sum(float(v) for v in losses) / len(losses), tokens)

    def _forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Gradients of the batch's mean loss (in micro-batches when planned); the loss."""
        parts = batch.split(self.micro_batch) if 0 < self.micro_batch < batch.shape[0] else (batch,)
        if len(parts) == 1:
            with self._autocast(batch):
                loss = lm_loss(self.train_model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return loss
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=batch.device)
        for j, part in enumerate(parts):
            weight = part.shape[0] / batch.shape[0]
            # Under DDP, ranks exchange gradients once per batch, at its last micro-batch.
            sync = contextlib.nullcontext() if not self.ddp or j == len(parts) - 1 else self.train_model.no_sync()
            with sync:
                with self._autocast(part):
                    loss = lm_loss(self.train_model, part)
                (loss * weight).backward()
            total += loss.detach() * weight
        return total

    def _autocast(self, batch: torch.Tensor) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=batch.device.type, dtype=self.autocast)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW moments by parameter name, for the resumable state file."""
        out = {}
        for name, p in self.model.named_parameters():
            st = self.optimizer.state.get(p)
            if st:
                out[f"adam.m.{name}"] = st["exp_avg"]
                out[f"adam.v.{name}"] = st["exp_avg_sq"]
                out[f"adam.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.model.named_parameters():
            if f"adam.m.{name}" in tensors:
                self.optimizer.state[p] = {
                    "exp_avg": tensors[f"adam.m.{name}"].to(p.device).clone(),
                    "exp_avg_sq": tensors[f"adam.v.{name}"].to(p.device).clone(),
                    "step": tensors[f"adam.step.{name}"].reshape(()).clone(),
                }
