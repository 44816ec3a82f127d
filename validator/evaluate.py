"""Evaluate one peer's update alone: does applying it lower the loss, and on whose data?

For a payload P of window w the validator computes, with the global weights theta(w),

    L_a(theta), L_a(theta')   mean loss on the peer's *assigned* batches (recomputable by
                              anyone from (run seed, window, peer id))
    L_u(theta), L_u(theta')   mean loss on *unassigned* batches, drawn from seed material
                              the peer could not know when it trained

where theta' = theta - lr * scale * decompress(P) (``scale`` is the weight the payload would
have in the aggregate, e.g. 1 / n_peers, so the step is the size it would really take).
Then

    gain_assigned   = L_a(theta) - L_a(theta')
    gain_unassigned = L_u(theta) - L_u(theta')          generalization: it helps everyone
    evidence        = gain_assigned - gain_unassigned   > 0 when it fits the peer's own data
    score           = gain_unassigned + EVIDENCE_WEIGHT * evidence

With ``EVIDENCE_WEIGHT = 0.5`` the score is the mean of the two gains. A peer that sends
noise gains nothing on either set; one that trained on other data than it was assigned
(or replays an old update) has evidence near zero or below; only an update that was
trained on the assigned batches earns both terms. Ranking within a window uses ``score``;
the ratings keep a moving average of ``evidence`` as a second, slower signal.

The model's weights are restored exactly after each evaluation (a copy of every touched
parameter is taken first and copied back, never "re-added"), so one model object serves
a whole window of evaluations without drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from node.model import lm_loss
from protocol.codec import decompress
from protocol.codec_types import CompressedTensor
from protocol.errors import LayoutMismatch

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
"""``loss_fn(model, batch int64 [B, T+1]) -> scalar mean loss``; ``node.model.lm_loss``."""

EVIDENCE_WEIGHT = 0.5
"""How much the evidence of training on assigned data adds to the generalization gain."""


@dataclass(frozen=True)
class Evaluation:
    """Losses before and after applying one update, on assigned and unassigned data."""

    assigned_before: float
    assigned_after: float
    unassigned_before: float
    unassigned_after: float

    @property
    def gain_assigned(self) -> float:
        return self.assigned_before - self.assigned_after

    @property
    def gain_unassigned(self) -> float:
        return self.unassigned_before - self.unassigned_after

    @property
    def evidence(self) -> float:
        """How much more the update helps the peer's own data than unseen data."""
        return self.gain_assigned - self.gain_unassigned

    @property
    def score(self) -> float:
        """The quantity a window's peers are ranked by (see the module docstring)."""
        return self.gain_unassigned + EVIDENCE_WEIGHT * self.evidence

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.assigned_after, self.unassigned_after, self.score))

    def components(self) -> dict[str, float]:
        """Named figures for score records and the dashboard; non-finite ones are left out."""
        values = {
            "gain_assigned": self.gain_assigned,
            "gain_unassigned": self.gain_unassigned,
            "evidence": self.evidence,
            "score": self.score,
        }
        return {k: v for k, v in values.items() if math.isfinite(v)}


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: torch.Tensor, loss_fn: LossFn = lm_loss) -> float:
    """Mean of ``loss_fn`` over ``batches`` (int64 [n_batches, B, T+1]), in evaluation mode."""
    if batches.ndim != 3 or batches.shape[0] == 0:
        raise ValueError(f"batches must be a non-empty int64 [n_batches, B, T+1] tensor, got shape {tuple(batches.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total = math.fsum(float(loss_fn(model, batch.to(device))) for batch in batches)
    finally:
        model.train(was_training)
    return total / batches.shape[0]


@torch.no_grad()
def evaluate_update(
    model: torch.nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    lr: float,
    scale: float,
    assigned: torch.Tensor,
    unassigned: torch.Tensor,
    loss_fn: LossFn = lm_loss,
    unassigned_before: float | None = None,
) -> Evaluation:
    """Losses before/after ``theta - lr * scale * update`` (dense tensors by parameter name).

    ``unassigned_before`` may pass the unassigned loss of the unchanged model when the
    caller evaluates several peers on the same unassigned batches (it is then computed
    once per window instead of once per peer). The weights are restored bit-exactly.
    """
    params = dict(model.named_parameters())
    for name, delta in update.items():
        if name not in params:
            raise LayoutMismatch(f"update names tensor {name!r}, which the model does not have")
        if tuple(delta.shape) != tuple(params[name].shape):
            raise LayoutMismatch(f"tensor {name!r} has shape {tuple(delta.shape)}, model has {tuple(params[name].shape)}")
    a0 = mean_loss(model, assigned, loss_fn)
    u0 = mean_loss(model, unassigned, loss_fn) if unassigned_before is None else unassigned_before
    saved = {name: params[name].detach().clone() for name in update}
    try:
        for name, delta in update.items():
            p = params[name]
            p.sub_((delta.to(p.device, torch.float32) * (lr * scale)).to(p.dtype))
        a1 = mean_loss(model, assigned, loss_fn)
        u1 = mean_loss(model, unassigned, loss_fn)
    finally:
        for name, value in saved.items():
            params[name].copy_(value)
    return Evaluation(a0, a1, u0, u1)


def evaluate_payload(
    model: torch.nn.Module,
    tensors: Mapping[str, CompressedTensor],
    *,
    lr: float,
    scale: float,
    assigned: torch.Tensor,
    unassigned: torch.Tensor,
    loss_fn: LossFn = lm_loss,
    unassigned_before: float | None = None,
) -> Evaluation:
    """``evaluate_update`` for a decoded payload's compressed tensors (decompressed here)."""
    update = {name: decompress(c) for name, c in tensors.items()}
    return evaluate_update(
        model,
        update,
        lr=lr,
        scale=scale,
        assigned=assigned,
        unassigned=unassigned,
        loss_fn=loss_fn,
        unassigned_before=unassigned_before,
    )
