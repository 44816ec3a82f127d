"""Deterministic aggregation: rules, median clipping, order and thread independence."""

from __future__ import annotations

import random

import pytest
import torch

from protocol.aggregate import aggregate, clip_factors, tensor_norm
from protocol.codec import compress, decompress
from protocol.codec_types import CompressedTensor, model_layout, tensor_layout
from protocol.errors import LayoutMismatch, ManifestError
from protocol.manifest import CodecConfig

TINY = CodecConfig(chunk=16, tile=4, topk=2)
"""One flat 16-element chunk keeping 2 values: small enough to write expectations by hand."""
SHAPES = {"attn": (256, 128), "norm": (128,), "odd": (5, 999)}


def _hand(idx: list[int], codes: list[int], scale_ref: float = 1.0) -> CompressedTensor:
    """A 16-element tensor with values at ``idx``; code 1 = +1, 0 = +0.5, 3 = -1, 2 = -0.5 (times scale_ref)."""
    layout = tensor_layout("v", (16,), TINY)
    return CompressedTensor(
        layout=layout,
        idx=torch.tensor([idx], dtype=torch.int32),
        codes=torch.tensor([codes], dtype=torch.uint8),
        scale_q=torch.zeros(1, dtype=torch.uint8),
        scale_ref=scale_ref,
    )


def _layouts() -> dict:
    return {"v": tensor_layout("v", (16,), TINY)}


def _peers(n: int, seed: int = 0) -> list[tuple[str, dict[str, CompressedTensor]]]:
    layouts = model_layout(SHAPES, CodecConfig())
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(n):
        scale = float(torch.exp(torch.randn(1, generator=g)))
        tensors = {name: compress(torch.randn(lay.shape, generator=g) * scale, lay) for name, lay in layouts.items()}
        out.append((f"peer{p:02d}", tensors))
    return out


def test_mean_selected_averages_each_coordinate_over_the_peers_that_sent_it():
    a = _hand([0, 1], [1, 1])  # +1 at 0, +1 at 1
    b = _hand([1, 2], [3, 0])  # -1 at 1, +0.5 at 2
    out = aggregate([("a", {"v": a}), ("b", {"v": b})], _layouts(), rule="mean_selected", clip="none")["v"]
    want = torch.zeros(16)
    want[0], want[1], want[2] = 1.0, 0.0, 0.5
    assert torch.equal(out, want)


def test_mean_divides_every_coordinate_by_the_number_of_peers():
    a = _hand([0, 1], [1, 1])
    b = _hand([1, 2], [3, 0])
    out = aggregate([("a", {"v": a}), ("b", {"v": b})], _layouts(), rule="mean", clip="none")["v"]
    want = torch.zeros(16)
    want[0], want[1], want[2] = 0.5, 0.0, 0.25
    assert torch.equal(out, want)


def test_each_contribution_is_clipped_to_the_median_norm():
    small = _hand([0, 1], [1, 1])  # norm sqrt(2)
    middle = _hand([2, 3], [1, 1], scale_ref=2.0)  # norm 2*sqrt(2): the median
    huge = _hand([4, 5], [1, 3], scale_ref=100.0)  # norm 100*sqrt(2)
    contributions = [("a", {"v": small}), ("b", {"v": middle}), ("c", {"v": huge})]
    assert tensor_norm(huge) == pytest.approx(100 * 2**0.5)
    out = aggregate(contributions, _layouts(), rule="mean", clip="median")["v"]
    want = torch.zeros(16)
    want[0:2] = 1.0 / 3
    want[2:4] = 2.0 / 3
    want[4], want[5] = 2.0 / 3, -2.0 / 3  # huge clipped to norm 2*sqrt(2): values +-2
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    unclipped = aggregate(contributions, _layouts(), rule="mean", clip="none")["v"]
    assert float(unclipped[4]) == pytest.approx(100.0 / 3)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    factors = clip_factors({"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0})
    assert factors == {"a": 1.0, "b": 1.0, "c": 0.75, "d": 0.375}


def test_norm_from_codes_matches_the_decoded_tensor():
    for _, tensors in _peers(2):
        for c in tensors.values():
            assert tensor_norm(c) == pytest.approx(float(decompress(c).double().norm()), rel=1e-6)


def test_result_is_bit_identical_for_any_order_and_thread_count():
    peers = _peers(7)
    layouts = model_layout(SHAPES, CodecConfig())
    before = torch.get_num_threads()
    results = []
    try:
        for threads, seed in [(1, 0), (2, 1), (1, 2), (2, 3)]:
            torch.set_num_threads(threads)
            shuffled = peers[:]
            random.Random(seed).shuffle(shuffled)
            results.append(aggregate(shuffled, layouts))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name in SHAPES:
            assert torch.equal(results[0][name].view(torch.int32), other[name].view(torch.int32))


def test_result_is_float32_of_the_model_shapes():
    layouts = model_layout(SHAPES, CodecConfig())
    out = aggregate(_peers(3), layouts, rule="mean")
    assert {n: tuple(t.shape) for n, t in out.items()} == SHAPES
    assert all(t.dtype == torch.float32 for t in out.values())


def test_no_contributions_give_a_zero_update():
    out = aggregate(iter(()), _layouts())
    assert torch.equal(out["v"], torch.zeros(16))


def test_contribution_with_missing_tensor_is_rejected_with_its_peer():
    peers = _peers(2)
    del peers[1][1]["norm"]
    with pytest.raises(LayoutMismatch, match="missing") as info:
        aggregate(peers, model_layout(SHAPES, CodecConfig()))
    assert info.value.peer == "peer01"


def test_same_peer_twice_is_refused():
    a = _hand([0, 1], [1, 1])
    with pytest.raises(ValueError, match="twice"):
        aggregate([("a", {"v": a}), ("a", {"v": a})], _layouts())


def test_unknown_rule_is_refused_by_the_manifest_check():
    with pytest.raises(ManifestError, match="outer.rule"):
        aggregate([], _layouts(), rule="median")
