"""LoCo (node/loco.py): the 4-bit quantizer, the 8-bit error memory, and the DDP hook on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from node.ddp import run_local_ranks, wrap_ddp
from node.loco import LocoCompressor, LocoConfig, dequantize, quantize

D = 256
"""Regression dimension: one DDP bucket of 256 weights."""
STEPS = 300


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_is_at_most_half_a_step_per_group(bits: int) -> None:
    x = torch.randn(1000) * torch.logspace(-3, 2, 1000)
    codes, scales = quantize(x, bits, 128)
    y = dequantize(codes, scales, bits, 128, x.numel())
    step = torch.repeat_interleave(scales, 128)[: x.numel()]
    assert torch.all((x - y).abs() <= step / 2 + 1e-6 * x.abs())
    assert codes.dtype == torch.uint8 and codes.numel() == 8 * 128 * bits // 8


def test_four_bit_codes_are_packed_two_per_byte() -> None:
    codes, scales = quantize(torch.randn(4096), 4, 128)
    assert codes.numel() == 2048 and scales.numel() == 32
    assert LocoConfig().payload_bytes(4096) == 2048 + 4 * 32


def test_all_zero_group_decodes_to_zero() -> None:
    x = torch.zeros(300)
    x[200] = 3.0
    codes, scales = quantize(x, 4, 128)
    assert scales[0] == 0
    assert torch.equal(dequantize(codes, scales, 4, 128, 300), x)


def test_memory_carries_error_that_plain_quantization_drops() -> None:
    # One large coordinate makes the small ones round to zero in every step; with the memory
    # their sum is eventually sent, without it never.
    g = torch.full((128,), 0.01)
    g[0] = 1.0
    comp = LocoCompressor(LocoConfig(), 128)
    plain = LocoCompressor(LocoConfig(compensate=False), 128)
    sent = sum(comp.decode(comp.encode(g)) for _ in range(50))
    sent_plain = sum(plain.decode(plain.encode(g)) for _ in range(50))
    assert sent_plain[1:].abs().max() == 0
    assert sent[1:].mean() > 0.5 * 50 * 0.01


def test_memory_is_reset_to_zero_every_T_steps() -> None:
    comp = LocoCompressor(LocoConfig(reset_every=5), 1000)
    g = torch.randn(1000)
    for step in range(1, 12):
        comp.encode(g)
        if step % 5 == 0:
            assert comp.memory().abs().max() == 0, f"memory not zero after step {step}"
        else:
            assert comp.memory().abs().max() > 0
    assert comp.resets == 2


def test_memory_is_stored_in_8_bits_per_element() -> None:
    comp = LocoCompressor(LocoConfig(), 1000)
    comp.encode(torch.randn(1000))
    assert comp._mem_q.dtype == torch.int8


def test_config_rejects_unpackable_group_size() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        LocoConfig(group=100)


# ---------------------------------------------------------------------------------------
# The DDP hook on 2 gloo ranks (one spawn for every distributed check: startup costs ~5 s)
# ---------------------------------------------------------------------------------------


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 10))


def _hook_vs_true_average(rank: int) -> dict:
    """One step: DDP+LoCo gradients against the exact all-reduced average of the same grads."""
    ref = _mlp()
    ddp, state = wrap_ddp(_mlp(), comm="loco", bucket_cap_mb_list=[0.01, 0.01])
    torch.manual_seed(100 + rank)
    x, y = torch.randn(16, 64), torch.randn(16, 10)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    true = torch.cat([p.grad.view(-1) for p in ref.parameters()])
    local_max = true.abs().max().clone()
    dist.all_reduce(true)
    true /= dist.get_world_size()
    dist.all_reduce(local_max, op=dist.ReduceOp.MAX)
    got = torch.cat([p.grad.view(-1) for p in ddp.module.parameters()])
    return {
        "max_err": (got - true).abs().max().item(),
        "bound": (local_max / 7 / 2).item(),
        "rel_err": ((got - true).norm() / true.norm()).item(),
        "buckets": len(state.compressors),
    }


def _regression(rank: int, comm: str, cfg: LocoConfig | None) -> dict:
    """SGD on least squares whose features span 1.5 decades of scale: 4-bit rounding zeroes
    the gradients of the small-scale weights whenever a large one shares their group."""
    g = torch.Generator().manual_seed(0)
    feat = torch.logspace(-1, 0.5, D)[torch.randperm(D, generator=g)]
    w_star = torch.randn(D, generator=g) / feat
    x_eval = torch.randn(2048, D, generator=g) * feat
    y_eval = x_eval @ w_star
    model = torch.nn.Linear(D, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ddp, state = wrap_ddp(model, comm=comm, loco=cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1000 + rank)
    bytes_per_step = []
    for _ in range(STEPS):
        x = torch.randn(32, D, generator=data) * feat
        y = x @ w_star + 0.1 * torch.randn(32, generator=data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x).squeeze(-1), y).backward()
        opt.step()
        if state is not None:
            bytes_per_step.append((state.bytes_sent_step, state.fp32_bytes_step))
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(model(x_eval).squeeze(-1), y_eval).item()
    return {
        "loss": loss,
        "bytes": bytes_per_step[-1] if bytes_per_step else None,
        "steps": state.step if state else STEPS,
        "resets": state.resets if state else 0,
        "weight": model.weight.detach().view(-1).tolist(),
    }


def _worker(rank: int, world: int) -> dict:
    return {
        "hook": _hook_vs_true_average(rank),
        "fp32": _regression(rank, "none", None),
        "loco": _regression(rank, "loco", LocoConfig(reset_every=100)),
        "plain4": _regression(rank, "loco", LocoConfig(compensate=False)),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_local_ranks(_worker, 2, timeout_s=90)


def test_hook_average_is_within_quantization_bound_of_true_average(two_ranks: list[dict]) -> None:
    hook = two_ranks[0]["hook"]
    assert hook["buckets"] > 1, "the test meant to cover several buckets"
    assert hook["max_err"] <= hook["bound"] + 1e-6
    assert hook["rel_err"] < 0.2  # 4-bit noise is ~10%; a wrong decode is ~100%


def test_ranks_stay_identical_under_the_hook(two_ranks: list[dict]) -> None:
    for run in ("fp32", "loco", "plain4"):
        assert two_ranks[0][run]["weight"] == two_ranks[1][run]["weight"], run


def test_compensated_run_beats_plain_4bit_and_stays_close_to_fp32(two_ranks: list[dict]) -> None:
    fp32, loco, plain = (two_ranks[0][k]["loss"] for k in ("fp32", "loco", "plain4"))
    assert loco < 0.8 * plain, (fp32, loco, plain)
    assert loco < 1.1 * fp32, (fp32, loco, plain)


def test_hook_resets_memory_every_T_steps(two_ranks: list[dict]) -> None:
    loco = two_ranks[0]["loco"]
    assert loco["steps"] == STEPS
    assert loco["resets"] == STEPS // 100


def test_bytes_sent_per_step_are_about_an_eighth_of_fp32(two_ranks: list[dict]) -> None:
    sent, fp32 = two_ranks[0]["loco"]["bytes"]
    assert fp32 == 4 * D
    assert sent == D // 2 + 4 * (D // 128)
    assert 1 / 8 <= sent / fp32 <= 1 / 7
