"""Elias-Fano index coding and 2-bit code packing: exact round trips, a slow reference
encoder, and refusal of every kind of corrupt section."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.indexcode import (
    CorruptSection,
    chunk_bits,
    code_section_bytes,
    decode_indices,
    encode_indices,
    index_section_bytes,
    low_bits,
    pack_bits,
    pack_codes,
    unpack_bits,
    unpack_codes,
)

torch.set_num_threads(1)


def random_positions(n_chunks: int, chunk_len: int, k: int, seed: int) -> torch.Tensor:
    """int64 [n_chunks, k]: k distinct sorted positions per chunk, uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(chunk_len, generator=gen)[:k] for _ in range(n_chunks)]
    return torch.stack(rows).sort(dim=1).values


def reference_encode(idx: torch.Tensor, chunk_len: int) -> bytes:
    """Obviously-correct Elias-Fano, one position and one bit at a time."""
    n, k = idx.shape
    l = low_bits(chunk_len, k)
    bits: list[int] = []
    for row in idx.tolist():
        for x in row:
            bits += [(x >> b) & 1 for b in range(l)]
        upper = [0] * (k + ((chunk_len - 1) >> l) + 1)
        for i, x in enumerate(row):
            upper[(x >> l) + i] = 1
        bits += upper
    bits += [0] * (-len(bits) % 8)
    return bytes(sum(bits[i + b] << b for b in range(8)) for i in range(0, len(bits), 8))


@st.composite
def chunk_shapes(draw: st.DrawFn) -> tuple[int, int, int]:
    chunk_len = draw(st.one_of(st.integers(1, 300), st.integers(1, 65536), st.sampled_from([1, 2, 4096, 65536])))
    k = draw(st.one_of(st.integers(1, chunk_len), st.sampled_from([1, chunk_len, max(1, chunk_len // 64)])))
    n_chunks = draw(st.integers(1, 3 if chunk_len * k < 1 << 20 else 1))
    return n_chunks, chunk_len, k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=chunk_shapes(), seed=st.integers(0, 2**31 - 1))
def test_any_sorted_distinct_positions_round_trip_exactly(shape: tuple[int, int, int], seed: int) -> None:
    n_chunks, chunk_len, k = shape
    idx = random_positions(n_chunks, chunk_len, k, seed)
    packed = encode_indices(idx, chunk_len)
    assert packed.dtype == torch.uint8
    assert packed.numel() == index_section_bytes(n_chunks, chunk_len, k)
    assert torch.equal(decode_indices(packed, n_chunks, chunk_len, k, chunk_len), idx)


@settings(max_examples=60, deadline=None)
@given(
    chunk_len=st.integers(1, 200),
    data=st.data(),
)
def test_vectorized_encoder_matches_the_reference_bit_for_bit(chunk_len: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, chunk_len))
    rows = [sorted(data.draw(st.sets(st.integers(0, chunk_len - 1), min_size=k, max_size=k))) for _ in range(2)]
    idx = torch.tensor(rows, dtype=torch.int64)
    assert encode_indices(idx, chunk_len).numpy().tobytes() == reference_encode(idx, chunk_len)


@pytest.mark.parametrize(
    "chunk_len,k,rows",
    [
        (4096, 4096, [list(range(4096))]),  # every position
        (4096, 64, [list(range(64)), list(range(4032, 4096))]),  # all at the start / the end
        (4096, 1, [[0], [4095]]),
        (1, 1, [[0], [0], [0]]),
        (65536, 1, [[65535]]),
        (65536, 65536, [list(range(65536))]),
        (3, 2, [[0, 2], [1, 2], [0, 1]]),
    ],
)
def test_edge_case_positions_round_trip(chunk_len: int, k: int, rows: list[list[int]]) -> None:
    idx = torch.tensor(rows, dtype=torch.int64)
    packed = encode_indices(idx, chunk_len)
    assert torch.equal(decode_indices(packed, len(rows), chunk_len, k, chunk_len), idx)


def test_worked_example_of_the_protocol_doc() -> None:
    packed = encode_indices(torch.tensor([[60, 61, 62, 63]]), 64)
    assert packed.numpy().tobytes() == bytes.fromhex("DCFE78")


def test_default_codec_costs_eight_bits_per_index_near_the_bound() -> None:
    bound = (math.lgamma(4097) - math.lgamma(65) - math.lgamma(4033)) / math.log(2) / 64
    assert chunk_bits(4096, 64) / 64 == 8.0
    assert 7.3 < bound < 7.4
    assert chunk_bits(4096, 64) / 64 < 12  # the reference implementation's packing


def test_chunk_declaring_too_few_positions_is_refused() -> None:
    idx = torch.tensor([[1, 5, 9, 13]])
    packed = encode_indices(idx, 64)
    l = low_bits(64, 4)
    bits = unpack_bits(packed, chunk_bits(64, 4)).clone()
    first_one = 4 * l + int(bits[4 * l :].nonzero()[0])
    bits[first_one] = 0
    with pytest.raises(CorruptSection, match="codes 3 positions"):
        decode_indices(pack_bits(bits), 1, 64, 4, 64)


def test_position_past_the_chunk_end_is_refused() -> None:
    # 4096 / 64: the high vector can name high part 64, i.e. position >= 4096.
    k, chunk_len = 64, 4096
    l = low_bits(chunk_len, k)
    upper = torch.zeros(k + ((chunk_len - 1) >> l) + 1, dtype=torch.uint8)
    upper[-k:] = 1  # every high part = 64
    low = ((torch.arange(k)[:, None] >> torch.arange(l)) & 1).to(torch.uint8).view(-1)  # low parts 0..63
    bits = torch.cat([low, upper])
    with pytest.raises(CorruptSection, match="past its length"):
        decode_indices(pack_bits(bits), 1, chunk_len, k, chunk_len)


def test_equal_positions_are_refused() -> None:
    # Same high part, same low bits twice: not strictly increasing.
    chunk_len, k = 64, 2
    l = low_bits(chunk_len, k)  # 5
    low = [1, 0, 0, 0, 0] * 2
    upper = [1, 1] + [0] * (k + ((chunk_len - 1) >> l) + 1 - 2)
    bits = torch.tensor(low + upper, dtype=torch.uint8)
    with pytest.raises(CorruptSection, match="not strictly increasing"):
        decode_indices(pack_bits(bits), 1, chunk_len, k, chunk_len)


def test_position_in_the_padding_of_the_last_chunk_is_refused() -> None:
    idx = torch.tensor([[0, 9], [3, 9]])
    packed = encode_indices(idx, 10)
    assert torch.equal(decode_indices(packed, 2, 10, 2, 10), idx)
    with pytest.raises(CorruptSection, match="padding"):
        decode_indices(packed, 2, 10, 2, 9)


def test_nonzero_unused_bits_are_refused() -> None:
    idx = torch.tensor([[0, 1, 2]])
    packed = encode_indices(idx, 6).clone()
    assert chunk_bits(6, 3) == 9  # 3 low bits + 6 high bits: 7 unused bits in the last byte
    packed[-1] |= 0x80
    with pytest.raises(CorruptSection, match="unused bits"):
        decode_indices(packed, 1, 6, 3, 6)


def test_section_of_wrong_length_is_refused() -> None:
    packed = encode_indices(torch.tensor([[2, 7]]), 16)
    with pytest.raises(CorruptSection, match="bytes"):
        decode_indices(torch.cat([packed, packed.new_zeros(1)]), 1, 16, 2, 16)


@settings(max_examples=50, deadline=None)
@given(n_chunks=st.integers(1, 50), k=st.integers(1, 70), seed=st.integers(0, 1000))
def test_codes_round_trip_four_per_byte(n_chunks: int, k: int, seed: int) -> None:
    codes = torch.randint(0, 4, (n_chunks, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes)
    assert packed.numel() == code_section_bytes(n_chunks, k)
    assert torch.equal(unpack_codes(packed, n_chunks, k), codes)


def test_code_layout_is_little_end_first() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(codes).tolist() == [1 | 2 << 2 | 3 << 4, 3]


def test_codes_with_nonzero_unused_bits_are_refused() -> None:
    packed = pack_codes(torch.tensor([[1, 2, 3]], dtype=torch.uint8)).clone()
    packed[0] |= 0xC0
    with pytest.raises(CorruptSection, match="unused bits"):
        unpack_codes(packed, 1, 3)
