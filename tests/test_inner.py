"""The inner loop: micro-batches and autocast change where memory goes, not what is learned."""

from __future__ import annotations

import copy

import pytest
import torch

from node.inner import InnerLoop, lr_at
from node.model import build_model
from protocol.manifest import InnerConfig, ModelConfig


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (8, 33), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ModelConfig(), 256, 32, seed=3)


def _train(model: torch.nn.Module, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    m = copy.deepcopy(model)
    loop = InnerLoop(m, InnerConfig(steps=3, warmup_steps=1, total_steps=100), **kw)
    result = loop.train(_batches(3, 0), window=0)
    return result.mean_loss, {n: p.detach().clone() for n, p in m.named_parameters()}


def _gradients(model: torch.nn.Module, batch: torch.Tensor, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    m = copy.deepcopy(model)
    loss = InnerLoop(m, InnerConfig(), **kw)._forward_backward(batch)
    return float(loss), {n: p.grad.clone() for n, p in m.named_parameters()}


def test_micro_batches_give_the_gradient_of_the_whole_batch(model):
    batch = _batches(1, 0)[0]
    whole_loss, whole = _gradients(model, batch)
    micro_loss, micro = _gradients(model, batch, micro_batch=3)  # 8 = 3 + 3 + 2: parts weigh by size
    assert micro_loss == pytest.approx(whole_loss, rel=1e-6)
    for name, g in whole.items():
        assert torch.allclose(micro[name], g, rtol=1e-4, atol=1e-7), name
    trained_loss, _ = _train(model, micro_batch=3)
    assert trained_loss == pytest.approx(_train(model)[0], rel=1e-5)


def test_bf16_autocast_trains_close_to_float32(model):
    f32_loss, f32 = _train(model)
    bf16_loss, bf16 = _train(model, autocast=torch.bfloat16)
    assert bf16_loss == pytest.approx(f32_loss, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in bf16.values())  # weights and optimizer stay float32
    moved = sum(float((bf16[n] - model.state_dict()[n]).norm()) for n in bf16)
    assert moved > 0


def test_the_learning_rate_follows_the_global_step():
    cfg = InnerConfig(steps=10, warmup_steps=5, total_steps=100)
    assert lr_at(0, cfg) < lr_at(4, cfg) == pytest.approx(cfg.lr)
    assert lr_at(100, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
