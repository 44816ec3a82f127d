"""The memory plan: where a window's tensors live, for each preset and device size."""

from __future__ import annotations

import pytest
import torch

from node.memory import ModelShape, NotEnoughMemory, plan_memory
from node.model import PRESETS

GiB = 1 << 30


def shape(preset: str, vocab: int = 32768, seq_len: int = 2048, batch: int = 16) -> ModelShape:
    p = PRESETS[preset]
    h, layers, ffn = p["hidden_size"], p["num_hidden_layers"], p["intermediate_size"]
    kv = h * p.get("num_key_value_heads", p["num_attention_heads"]) // p["num_attention_heads"]
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h) + 2 * vocab * h + h
    return ModelShape(params, layers, h, vocab, seq_len, batch)


def test_cpu_plan_is_everything_on_the_cpu_in_whole_batches():
    plan = plan_memory("cpu", shape("tiny", 2048, 128, 8))
    assert (plan.device, plan.state_device, plan.autocast, plan.micro_batch) == (
        torch.device("cpu"), torch.device("cpu"), None, 8)
    assert not plan.streamed


def test_1b_trains_on_a_24_gib_gpu_with_the_replica_streamed_from_host_memory():
    s = shape("1b")
    assert 1.0e9 < s.params < 1.5e9
    plan = plan_memory("cuda", s, device_bytes=24 * GiB)
    assert plan.streamed and plan.state_device == torch.device("cpu")
    assert plan.autocast == torch.bfloat16 and 1 <= plan.micro_batch < 16 and 16 % plan.micro_batch == 0
    assert plan.need <= plan.budget < 24 * GiB
    assert "pinned host memory" in plan.describe()


def test_150m_on_a_24_gib_gpu_keeps_everything_on_the_device():
    plan = plan_memory("cuda:1", shape("150m", seq_len=1024, batch=8), device_bytes=24 * GiB)
    assert plan.device == torch.device("cuda", 1) and not plan.streamed and plan.micro_batch == 8


def test_a_model_that_cannot_fit_names_what_is_missing():
    with pytest.raises(NotEnoughMemory, match="16 bytes per parameter.*--device cpu"):
        plan_memory("cuda", shape("1b"), device_bytes=12 * GiB)


def test_a_forced_micro_batch_is_kept_when_it_fits():
    plan = plan_memory("cuda", shape("150m", seq_len=512, batch=8), micro_batch=2, device_bytes=80 * GiB)
    assert plan.micro_batch == 2


def test_overlap_plans_room_for_its_stand_in_next_to_the_replica():
    s = shape("150m", seq_len=1024, batch=8)
    serial = plan_memory("cuda", s, device_bytes=80 * GiB)
    overlapped = plan_memory("cuda", s, device_bytes=80 * GiB, overlap=True)
    assert not serial.streamed and not overlapped.streamed
    assert overlapped.need - serial.need == 4 * s.params
