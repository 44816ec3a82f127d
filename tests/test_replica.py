"""The replica's outer step: two rounded float32 operations, so every device agrees."""

from __future__ import annotations

import numpy as np
import torch

from node.replica import Replica


def test_the_outer_step_rounds_lr_times_update_before_subtracting():
    """The reference is numpy's float32 arithmetic (IEEE, one rounding per operation, no
    fused multiply-add), over a length that fills vector lanes and leaves a scalar tail."""
    g = torch.Generator().manual_seed(0)
    theta, update = torch.randn(10_007, generator=g), torch.randn(10_007, generator=g) * 1e-3
    replica = Replica({"w": theta}, 3)
    before = replica.digest
    replica.apply({"w": update}, lr=0.7)
    lr = np.float32(0.7)
    expected = theta.numpy() - (update.numpy() * lr).astype(np.float32)
    assert expected.dtype == np.float32
    assert np.array_equal(replica.params["w"].numpy().view(np.uint32), expected.view(np.uint32))
    assert replica.window == 4 and replica.digest != before
    assert torch.equal(theta, Replica({"w": theta}, 3).params["w"])  # the caller's tensor was copied, not stepped


def test_the_pseudo_gradient_is_theta_minus_the_local_weights_when_read():
    model = torch.nn.Linear(4, 3)
    replica = Replica(dict(model.named_parameters()), 0)
    delta = replica.pseudo_gradient(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(delta["weight"], replica.params["weight"] - model.weight.detach())
    assert torch.allclose(delta["weight"], torch.full((3, 4), -1.0))
    assert torch.equal(delta["bias"], torch.zeros(3)) and set(delta) == {"bias", "weight"}
