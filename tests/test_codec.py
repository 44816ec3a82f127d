"""The SparseLoCo codec math: chunking, top-k selection, 2-bit quantization, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import reference
from protocol.codec import (
    chunk_view,
    compress,
    decompress,
    flat_positions,
    sparse_values,
    unchunk,
)
from protocol.codec_types import LEVELS, SCALE_ZERO_CODE, tensor_layout
from protocol.manifest import CodecConfig

SMALL = CodecConfig(chunk=16, tile=4, topk=3)
"""4x4 tiles, 3 of 16 kept: exercises tiling, padding and ragged chunks on tiny tensors."""
DEFAULT = CodecConfig()

shapes = st.one_of(
    st.tuples(st.integers(1, 70)),
    st.tuples(st.integers(1, 13), st.integers(1, 13)),
    st.tuples(st.integers(1, 4).map(lambda n: 4 * n), st.integers(1, 4).map(lambda n: 4 * n)),
    st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)),
)


def _data(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _slow_topk_magnitudes(x: torch.Tensor, layout) -> list[list[float]]:
    """Per chunk, the k largest |values| among the chunk's real positions, by plain sorting."""
    out = []
    for c in range(layout.n_chunks):
        if layout.tiled:
            t = math.isqrt(layout.chunk_len)
            per_row = layout.shape[1] // t
            r, q = divmod(c, per_row)
            members = x[r * t : (r + 1) * t, q * t : (q + 1) * t].reshape(-1).tolist()
        else:
            start = c * layout.chunk_len
            members = x.reshape(-1)[start : min(start + layout.chunk_len, layout.numel)].tolist()
        out.append(sorted((abs(v) for v in members), reverse=True)[: layout.k])
    return out


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_chunk_view_and_unchunk_round_trip_exactly(shape, seed):
    x = _data(shape, seed)
    layout = tensor_layout("t", shape, SMALL)
    chunks = chunk_view(x, layout)
    assert chunks.shape == (layout.n_chunks, layout.chunk_len)
    assert torch.equal(unchunk(chunks, layout), x)
    if not layout.tiled:
        assert torch.equal(chunks.reshape(-1)[layout.numel :], torch.zeros(layout.padded - layout.numel))


def test_tiles_are_row_major_blocks_row_major_inside():
    x = torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12)
    layout = tensor_layout("w", (8, 12), SMALL)
    assert layout.tiled and layout.n_chunks == 6
    chunks = chunk_view(x, layout)
    assert torch.equal(chunks[0], x[0:4, 0:4].reshape(-1))
    assert torch.equal(chunks[1], x[0:4, 4:8].reshape(-1))
    assert torch.equal(chunks[3], x[4:8, 0:4].reshape(-1))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_compress_keeps_exactly_the_top_k_magnitudes_of_each_chunk(shape, seed):
    x = _data(shape, seed)
    layout = tensor_layout("t", shape, SMALL)
    c = compress(x, layout)
    assert c.idx.dtype == torch.int32 and c.idx.shape == (layout.n_chunks, layout.k)
    assert bool((c.idx[:, 1:] > c.idx[:, :-1]).all()), "positions must be strictly increasing"
    kept = chunk_view(x, layout).gather(1, c.idx).abs()
    got = [sorted(row, reverse=True) for row in kept.tolist()]
    assert got == _slow_topk_magnitudes(x, layout)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(17, 200), zeros_tail=st.booleans(), seed=st.integers(0, 2**16))
def test_padding_positions_are_never_selected(n, zeros_tail, seed):
    x = _data((n,), seed)
    if zeros_tail:
        x[n // 2 :] = 0.0  # real zeros tie with the padding's zeros
    layout = tensor_layout("t", (n,), SMALL)
    c = compress(x, layout)
    flat_position = c.idx + torch.arange(layout.n_chunks)[:, None] * layout.chunk_len
    assert bool((flat_position < layout.numel).all())


def test_codes_use_the_nearest_level_of_the_decoded_scale_with_the_right_sign():
    x = _data((128, 128), 3) * torch.logspace(-2, 1, 128)[None, :]
    layout = tensor_layout("w", x.shape, DEFAULT)
    c = compress(x, layout)
    true = chunk_view(x, layout).gather(1, c.idx)
    got = sparse_values(c)
    assert torch.equal(got < 0, true < 0)
    s = c.scales()[:, None]
    best = torch.minimum((true.abs() - LEVELS[0] * s).abs(), (true.abs() - LEVELS[1] * s).abs())
    torch.testing.assert_close((got - true).abs(), best, rtol=1e-6, atol=0)


def test_scale_code_of_each_chunk_is_its_octave_fraction_below_the_largest():
    # The same tile repeated with magnitudes shrinking by 2^(-1/8), one grid step per tile.
    tile = _data((64, 64), 1)
    x = torch.cat([tile * 2.0 ** (-c / 8) for c in range(16)], dim=1)
    c = compress(x, tensor_layout("w", x.shape, DEFAULT))
    assert c.scale_q.tolist() == list(range(16))


def test_quantized_reconstruction_is_within_the_quantizers_bound():
    x = _data((256, 256), 7)
    layout = tensor_layout("w", x.shape, DEFAULT)
    c = compress(x, layout)
    true = chunk_view(x, layout).gather(1, c.idx).abs()
    s = c.scales()[:, None]
    # Every kept magnitude lies within the chunk's levels' reach: at most half the gap
    # between levels below the high level, or above it by the chunk's own excess.
    err = (sparse_values(c).abs() - true).abs()
    bound = torch.maximum((LEVELS[1] - LEVELS[0]) / 2 * s, true - LEVELS[1] * s)
    bound = torch.maximum(bound, LEVELS[0] * s - true)
    assert bool((err <= bound * (1 + 1e-6)).all())
    rel = float((decompress(c) - x)[decompress(c) != 0].norm() / chunk_view(x, layout).gather(1, c.idx).norm())
    assert rel < 0.2


def test_all_zero_tensor_codes_scale_255_and_decodes_to_zero():
    layout = tensor_layout("w", (64, 64), DEFAULT)
    c = compress(torch.zeros(64, 64), layout)
    assert c.scale_ref == 0.0
    assert bool((c.scale_q == SCALE_ZERO_CODE).all())
    assert torch.equal(decompress(c), torch.zeros(64, 64))


def test_all_zero_chunk_next_to_a_busy_one_gets_the_zero_scale_code():
    x = torch.zeros(64, 128)
    x[:, 64:] = torch.randn(64, 64)
    c = compress(x, tensor_layout("w", x.shape, DEFAULT))
    assert c.scale_q.tolist()[0] == SCALE_ZERO_CODE and c.scale_q.tolist()[1] == 0


def test_non_finite_input_is_refused():
    x = torch.randn(64, 64)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress(x, tensor_layout("w", x.shape, DEFAULT))


def test_decompress_is_bit_identical_across_thread_counts():
    x = torch.distributions.StudentT(3.0).sample((1024, 1024))
    c = compress(x, tensor_layout("w", x.shape, DEFAULT))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decompress(c)
        torch.set_num_threads(2)
        two = decompress(c)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))


def test_decompress_puts_each_value_at_its_position_and_zero_elsewhere():
    x = _data((40,), 11)
    layout = tensor_layout("t", (40,), SMALL)
    c = compress(x, layout)
    dense = decompress(c)
    assert dense.dtype == torch.float32 and dense.shape == (40,)
    assert int((dense != 0).sum()) == layout.n_chunks * layout.k
    assert torch.equal(dense.sign()[dense != 0], x.sign()[dense != 0])


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(512, 512, generator=g),
        lambda g: torch.randn(512, 512, generator=g) ** 3,
        lambda g: torch.randn(512, 512, generator=g)
        * torch.exp(0.7 * torch.randn(512, 1, generator=g))
        * torch.exp(0.7 * torch.randn(1, 512, generator=g)),
    ],
    ids=["gaussian", "heavy_tailed", "row_and_column_scaled"],
)
def test_two_bit_error_on_selected_values_is_no_worse_than_the_reference_format(make):
    g = torch.Generator().manual_seed(5)
    x = make(g)
    layout = tensor_layout("w", x.shape, DEFAULT)
    ours = decompress(compress(x, layout))
    ref = reference.encode_tensor(x, layout)
    mask = reference.selected_mask(ref)
    assert torch.equal(mask, ours != 0), "both formats select the same positions"
    ours_err = float((ours - x)[mask].norm())
    ref_err = float((reference.decode_tensor(ref) - x)[mask].norm())
    assert ours_err <= ref_err


def test_chunk_too_small_for_the_scale_grid_is_sent_as_zeros_not_overshot():
    x = torch.cat([torch.randn(64, 64), 1e-12 * torch.randn(64, 64)], dim=1)
    c = compress(x, tensor_layout("w", x.shape, DEFAULT))
    assert c.scale_q.tolist() == [0, SCALE_ZERO_CODE]
    assert torch.equal(decompress(c)[:, 64:], torch.zeros(64, 64))


@settings(max_examples=40, deadline=None)
@given(shape=shapes)
def test_flat_positions_agree_with_chunk_view(shape):
    layout = tensor_layout("t", shape, SMALL)
    where = torch.arange(layout.numel).reshape(shape)
    in_chunk = torch.arange(layout.chunk_len).expand(layout.n_chunks, -1)
    got = flat_positions(in_chunk, layout)
    want = chunk_view(where, layout)
    real = torch.arange(layout.padded).reshape(layout.n_chunks, -1) < layout.numel
    assert torch.equal(got[real], want[real])
