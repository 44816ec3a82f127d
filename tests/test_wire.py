"""The payload wire format: exact round trips, and one test per way a payload is refused."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from locoswarm import inspect
from protocol import codec
from protocol.codec_types import CompressedTensor, TensorLayout, model_layout
from protocol.errors import (
    BadSignature,
    LayoutMismatch,
    MalformedPayload,
    NonFinite,
    OutOfSync,
    PayloadRejected,
    PayloadTooLarge,
    WrongRun,
    WrongWindow,
)
from protocol.identity import Identity
from protocol.indexcode import encode_indices, pack_bits, unpack_bits
from protocol.manifest import CodecConfig
from protocol.wire import (
    MAGIC,
    VERSION,
    Expectation,
    Payload,
    decode_payload,
    encode_payload,
    read_header,
)

torch.set_num_threads(1)

SMALL = CodecConfig(chunk=64, tile=8, topk=4)
SHAPES = {"blocks.0.w": (16, 24), "blocks.0.norm": (10,), "emb": (3, 50)}
RUN = "test@0123456789abcdef"
WINDOW = 7
DIGEST = bytes(range(32))
ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")


def random_compressed(layout: TensorLayout, gen: torch.Generator) -> CompressedTensor:
    """A valid CompressedTensor with random positions, codes and scales."""
    n, c, k = layout.n_chunks, layout.chunk_len, layout.k
    valid = torch.full((n, c), True)
    valid[-1, layout.numel - (n - 1) * c :] = False  # padding of a flat last chunk
    keys = torch.rand(n, c, generator=gen).masked_fill(~valid, 2.0)
    idx = keys.argsort(dim=1)[:, :k].sort(dim=1).values
    codes = torch.randint(0, 4, (n, k), dtype=torch.uint8, generator=gen)
    scale_q = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    scale_ref = float(torch.rand((), generator=gen) * 3)  # a float32 value, as the codec makes
    return CompressedTensor(layout, idx.to(torch.int32), codes, scale_q, scale_ref)


def random_tensors(
    shapes: Mapping[str, tuple[int, ...]] = SHAPES, cfg: CodecConfig = SMALL, seed: int = 0
) -> dict[str, CompressedTensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: random_compressed(lay, gen) for name, lay in model_layout(shapes, cfg).items()}


def make_payload(
    tensors: Mapping[str, CompressedTensor] | None = None, *, cfg: CodecConfig = SMALL, window: int = WINDOW,
    identity: Identity = ALICE, run: str = RUN,
) -> bytes:
    return encode_payload(
        run=run, window=window, base_digest=DIGEST, tokens=4096, tensors=tensors or random_tensors(cfg=cfg),
        codec=cfg, identity=identity, created_at=1700000000.5,
    )


def expectation(shapes: Mapping[str, tuple[int, ...]] = SHAPES, cfg: CodecConfig = SMALL, **overrides: Any) -> Expectation:
    fields: dict[str, Any] = dict(
        run=RUN, window=WINDOW, layouts=model_layout(shapes, cfg), codec=cfg, max_bytes=1 << 20,
        peer_id=ALICE.peer_id, base_digest=DIGEST,
    )
    fields.update(overrides)
    return Expectation(**fields)


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Header map and section bytes of a (trusted, test-made) payload."""
    _, _, header_len = struct.unpack_from(">4sHI", data)
    header = msgpack.unpackb(data[10 : 10 + header_len], raw=False)
    return header, data[10 + header_len : -96]


def forge(
    data: bytes,
    identity: Identity = ALICE,
    edit_header: Callable[[dict[str, Any]], Any] | None = None,
    edit_body: Callable[[bytes], bytes] | None = None,
    raw_header: bytes | None = None,
) -> bytes:
    """Re-sign an edited payload with ``identity``, so the edit reaches the checks after the signature."""
    header, body = split(data)
    if edit_header is not None:
        edit_header(header)
    if edit_body is not None:
        body = edit_body(body)
    packed = raw_header if raw_header is not None else msgpack.packb(header, use_bin_type=True)
    head = struct.pack(">4sHI", MAGIC, VERSION, len(packed)) + packed + body + identity.public_key
    return head + identity.sign(head)


def assert_same(a: Mapping[str, CompressedTensor], b: Mapping[str, CompressedTensor]) -> None:
    assert list(a) == sorted(b)
    for name, x in b.items():
        y = a[name]
        assert y.layout == x.layout
        assert torch.equal(y.idx, x.idx) and y.idx.dtype == torch.int32
        assert torch.equal(y.codes, x.codes) and y.codes.dtype == torch.uint8
        assert torch.equal(y.scale_q, x.scale_q) and y.scale_q.dtype == torch.uint8
        assert y.scale_ref == x.scale_ref


# ---------------------------------------------------------------- round trips


def test_payload_round_trips_field_by_field() -> None:
    tensors = random_tensors()
    data = make_payload(tensors)
    payload = decode_payload(data, expectation())
    assert isinstance(payload, Payload)
    h = payload.header
    assert (h.run, h.window, h.peer_id, h.base_digest, h.tokens, h.created_at) == (
        RUN, WINDOW, ALICE.peer_id, DIGEST, 4096, 1700000000.5,
    )
    assert (h.codec.chunk, h.codec.tile, h.codec.topk, h.codec.bits) == (64, 8, 4, 2)
    assert payload.public_key == ALICE.public_key and payload.size == len(data)
    assert_same(payload.tensors, tensors)


@st.composite
def model_shapes(draw: st.DrawFn) -> dict[str, tuple[int, ...]]:
    names = draw(st.lists(st.text("abcxyz._0123", min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
    shape = st.one_of(
        st.tuples(st.integers(1, 300)),
        st.tuples(st.sampled_from([8, 16, 24]), st.sampled_from([8, 16, 40])),  # tiled
        st.tuples(st.integers(1, 20), st.integers(1, 20)),
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)),
        st.just(()),
    )
    return {n: draw(shape) for n in names}


@settings(max_examples=40, deadline=None)
@given(
    shapes=model_shapes(),
    topk=st.integers(1, 64),
    seed=st.integers(0, 10_000),
    run=st.text(min_size=1, max_size=40),
    window=st.integers(0, 2**62),
    tokens=st.integers(0, 2**62),
    created_at=st.floats(allow_nan=False, allow_infinity=False),
    digest=st.binary(min_size=32, max_size=32),
)
def test_any_model_round_trips_exactly(
    shapes: dict[str, tuple[int, ...]], topk: int, seed: int, run: str, window: int, tokens: int, created_at: float,
    digest: bytes,
) -> None:
    cfg = CodecConfig(chunk=64, tile=8, topk=topk)
    # A last flat chunk with fewer real positions than k cannot be sent by any codec.
    assume(all(lay.k <= lay.chunk_len - (lay.padded - lay.numel) for lay in model_layout(shapes, cfg).values()))
    tensors = random_tensors(shapes, cfg, seed)
    data = encode_payload(
        run=run, window=window, base_digest=digest, tokens=tokens, tensors=tensors, codec=cfg, identity=MALLORY,
        created_at=created_at,
    )
    expect = Expectation(
        run=run, window=window, layouts=model_layout(shapes, cfg), codec=cfg, max_bytes=len(data),
        peer_id=MALLORY.peer_id, base_digest=digest,
    )
    payload = decode_payload(data, expect)
    h = payload.header
    assert (h.run, h.window, h.peer_id, h.base_digest, h.tokens, h.created_at) == (
        run, window, MALLORY.peer_id, digest, tokens, created_at,
    )
    assert h.layouts == model_layout(shapes, cfg)
    assert_same(payload.tensors, tensors)
    header, key = read_header(data, max_bytes=len(data))
    assert header == payload.header and key == MALLORY.public_key


def test_default_codec_round_trips() -> None:
    cfg = CodecConfig()
    shapes = {"attn.w": (256, 768), "norm": (768,), "bias": (5000,)}
    tensors = random_tensors(shapes, cfg)
    data = make_payload(tensors, cfg=cfg)
    assert_same(decode_payload(data, expectation(shapes, cfg, max_bytes=len(data))).tensors, tensors)


def test_codec_output_survives_the_wire_bit_for_bit() -> None:
    cfg = CodecConfig()
    shapes = {"attn.w": (128, 192), "norm": (192,), "odd": (3, 1000)}
    layouts = model_layout(shapes, cfg)
    gen = torch.Generator().manual_seed(3)
    dense = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    sent = {name: codec.compress(dense[name], lay) for name, lay in layouts.items()}
    data = make_payload(sent, cfg=cfg)
    received = decode_payload(data, expectation(shapes, cfg)).tensors
    for name in shapes:
        assert torch.equal(codec.decompress(received[name]), codec.decompress(sent[name]))


def gpt_150m_like_shapes(d: int = 768, layers: int = 12, vocab: int = 32768) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"tok_emb": (vocab, d), "lm_head": (vocab, d), "final_norm": (d,)}
    for i in range(layers):
        shapes |= {
            f"h.{i}.qkv": (3 * d, d), f"h.{i}.proj": (d, d), f"h.{i}.fc": (4 * d, d), f"h.{i}.fc2": (d, 4 * d),
            f"h.{i}.ln1": (d,), f"h.{i}.ln2": (d,),
        }
    return shapes


def test_150m_like_payload_fits_the_bit_budget() -> None:
    cfg = CodecConfig()
    layouts = model_layout(gpt_150m_like_shapes(), cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, lay in layouts.items():
        step = lay.chunk_len // lay.k  # one position per stride: cheap to draw, strictly increasing
        idx = torch.arange(lay.k) * step + torch.randint(0, step, (lay.n_chunks, lay.k), generator=gen)
        codes = torch.randint(0, 4, (lay.n_chunks, lay.k), dtype=torch.uint8, generator=gen)
        tensors[name] = CompressedTensor(lay, idx.to(torch.int32), codes, torch.zeros(lay.n_chunks, dtype=torch.uint8), 1.5)
    data = make_payload(tensors, cfg=cfg)
    params = sum(lay.numel for lay in layouts.values())
    assert 130e6 < params < 160e6
    assert len(data) * 8 / params <= 0.16
    assert_same(decode_payload(data, expectation(gpt_150m_like_shapes(), cfg, max_bytes=len(data))).tensors, tensors)


def test_object_starts_with_magic_and_version_and_ends_with_key_and_signature() -> None:
    data = make_payload()
    assert data[:4] == MAGIC and struct.unpack_from(">H", data, 4)[0] == VERSION
    assert data[-96:-64] == ALICE.public_key


def test_decode_places_tensors_on_the_requested_device() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    tensors = random_tensors()
    for device in devices:
        moved = {n: CompressedTensor(t.layout, t.idx.to(device), t.codes.to(device), t.scale_q.to(device), t.scale_ref)
                 for n, t in tensors.items()}
        data = make_payload(moved)
        assert data == make_payload(tensors)  # same bytes from any device
        payload = decode_payload(data, expectation(), device=device)
        for t in payload.tensors.values():
            assert t.idx.device.type == t.codes.device.type == t.scale_q.device.type == device


# ---------------------------------------------------------------- rejections, in checking order


def test_oversized_payload_rejected_before_parsing() -> None:
    data = make_payload()
    with pytest.raises(PayloadTooLarge, match="over the cap"):
        decode_payload(data, expectation(max_bytes=len(data) - 1))
    with pytest.raises(PayloadTooLarge):
        decode_payload(b"\xff" * 5000, expectation(max_bytes=4999))  # garbage, but too big first


def test_bad_magic_is_rejected() -> None:
    with pytest.raises(MalformedPayload, match="magic"):
        decode_payload(b"NOPE" + make_payload()[4:], expectation())


def test_unsupported_version_is_rejected() -> None:
    data = make_payload()
    with pytest.raises(MalformedPayload, match="version 2"):
        decode_payload(data[:4] + struct.pack(">H", 2) + data[6:], expectation())


def test_truncated_payload_is_rejected() -> None:
    data = make_payload()
    for cut in (0, 10, 105, len(data) // 2, len(data) - 1):
        with pytest.raises(PayloadRejected):
            decode_payload(data[:cut], expectation())
    with pytest.raises(MalformedPayload, match="shorter"):
        decode_payload(data[:50], expectation())


def test_header_length_past_the_end_is_rejected() -> None:
    data = make_payload()
    with pytest.raises(MalformedPayload, match="more than the object holds"):
        decode_payload(data[:6] + struct.pack(">I", len(data)) + data[10:], expectation())


def test_trailing_bytes_are_rejected() -> None:
    data = make_payload()
    with pytest.raises(BadSignature):
        decode_payload(data + b"\0", expectation())
    signed_extra = forge(data, edit_body=lambda body: body + b"\0")
    with pytest.raises(MalformedPayload, match="sections add up"):
        decode_payload(signed_extra, expectation())


def test_altered_byte_breaks_the_signature() -> None:
    data = bytearray(make_payload())
    data[len(data) // 2] ^= 1
    with pytest.raises(BadSignature, match="does not verify"):
        decode_payload(bytes(data), expectation())


def test_signature_by_other_key_is_rejected() -> None:
    # Mallory signs Alice's header: the signature verifies, but the key is not Alice's.
    stolen = forge(make_payload(), identity=MALLORY)
    with pytest.raises(BadSignature, match="belongs to"):
        decode_payload(stolen, expectation())


def test_payload_from_unexpected_peer_is_rejected() -> None:
    data = make_payload(identity=MALLORY)
    with pytest.raises(BadSignature, match="expected peer"):
        decode_payload(data, expectation())
    assert decode_payload(data, expectation(peer_id=None)).header.peer_id == MALLORY.peer_id


def test_header_that_is_not_msgpack_is_rejected() -> None:
    with pytest.raises(MalformedPayload, match="not valid msgpack"):
        decode_payload(forge(make_payload(), raw_header=b"\xc1\xc1"), expectation())


def test_header_that_is_not_a_map_is_rejected() -> None:
    with pytest.raises(MalformedPayload, match="not a map"):
        decode_payload(forge(make_payload(), raw_header=msgpack.packb([1, 2])), expectation())


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        target: Any = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.pop(key)


@pytest.mark.parametrize(
    "edit,message",
    [
        (_set(("window",), "7"), "window must be an integer"),
        (_set(("window",), 7.0), "window must be an integer"),
        (_set(("window",), True), "window must be an integer"),
        (_set(("window",), -1), "outside"),
        (_set(("run",), 5), "run must be a string"),
        (_set(("run",), b"test"), "run must be a string"),
        (_set(("tokens",), -5), "outside"),
        (_set(("created_at",), 1700000000), "created_at must be a float"),
        (_set(("created_at",), math.nan), "finite"),
        (_set(("base_digest",), DIGEST.hex()), "base_digest"),
        (_set(("base_digest",), DIGEST[:31]), "base_digest"),
        (_set(("extra",), 1), "unknown fields \\['extra'\\]"),
        (_delete("tokens"), "missing fields \\['tokens'\\]"),
        (_set(("codec",), [64, 8, 4, 2]), "codec must be a map"),
        (_set(("codec", "chunk"), 64.0), "codec.chunk must be an integer"),
        (_set(("codec", "levels"), "0.5,1"), "codec.levels must be an array"),
        (_set(("tensors",), {}), "tensors must be an array"),
        (_set(("tensors",), []), "0 items"),
        (_set(("tensors", 0), ["blocks.0.norm"]), "1 items"),
        (_set(("tensors", 0, 0), 3), "name must be a string"),
        (_set(("tensors", 0, 1), "10"), "shape must be an array"),
        (_set(("tensors", 0, 1), [10.0]), "shape\\[\\] must be an integer"),
        (_set(("tensors", 0, 1), [0]), "outside"),
        (_set(("tensors", 0, 2), 0), "tiled must be a bool"),
        (_set(("tensors", 0, 3), None), "n_chunks must be an integer"),
        (_set(("tensors", 0, 5), 99), "outside"),
        (_set(("tensors", 0, 6), 1), "scale_ref must be a float"),
        (_set(("tensors", 0, 7), "3"), "index section length must be an integer"),
        (_set(("tensors", 1, 0), "blocks.0.norm"), "sorted by name"),
    ],
)
def test_header_with_wrong_types_or_fields_is_rejected(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    # Re-signed by the right key: only the schema can refuse it.
    with pytest.raises(MalformedPayload, match=message):
        decode_payload(forge(make_payload(), edit_header=edit), expectation())


def test_header_claiming_another_peer_id_is_rejected() -> None:
    forged = forge(make_payload(), edit_header=_set(("peer_id",), MALLORY.peer_id))
    with pytest.raises(BadSignature, match="claims peer"):
        decode_payload(forged, expectation())


def test_payload_from_other_run_is_rejected() -> None:
    with pytest.raises(WrongRun, match="other@"):
        decode_payload(make_payload(run="other@0000"), expectation())


def test_payload_replayed_into_other_window_is_rejected() -> None:
    data = make_payload(window=WINDOW)
    with pytest.raises(WrongWindow, match="window 7, expected window 8") as info:
        decode_payload(data, expectation(window=8))
    assert info.value.peer == ALICE.peer_id and info.value.window == 8
    assert decode_payload(data, expectation(window=None)).header.window == WINDOW


def test_codec_params_differing_from_the_run_are_rejected() -> None:
    data = make_payload()
    with pytest.raises(LayoutMismatch, match="codec"):
        decode_payload(data, expectation(cfg=CodecConfig(chunk=64, tile=8, topk=5), layouts=model_layout(SHAPES, SMALL)))
    other_levels = forge(data, edit_header=_set(("codec", "levels"), [0.25, 1.0]))
    with pytest.raises(LayoutMismatch, match="codec"):
        decode_payload(other_levels, expectation())


def test_shape_mismatch_is_rejected() -> None:
    shapes = dict(SHAPES, emb=(5, 30))
    with pytest.raises(LayoutMismatch, match="'emb' is shape \\[3, 50\\]"):
        decode_payload(make_payload(), expectation(layouts=model_layout(shapes, SMALL)))


def test_missing_or_unexpected_tensor_is_rejected() -> None:
    shapes = dict(SHAPES, head=(8, 8))
    with pytest.raises(LayoutMismatch, match="missing \\['head'\\]"):
        decode_payload(make_payload(), expectation(layouts=model_layout(shapes, SMALL)))
    fewer = {n: s for n, s in SHAPES.items() if n != "emb"}
    with pytest.raises(LayoutMismatch, match="unexpected \\['emb'\\]"):
        decode_payload(make_payload(), expectation(layouts=model_layout(fewer, SMALL)))


def test_section_length_disagreeing_with_layout_is_rejected() -> None:
    def longer_index_section(header: dict[str, Any]) -> None:
        header["tensors"][0][7] += 1
        header["tensors"][0][9] -= 1  # same total, so only the per-section check can see it

    with pytest.raises(MalformedPayload, match="section lengths"):
        decode_payload(forge(make_payload(), edit_header=longer_index_section), expectation())


def with_index_bits(data: bytes, name: str, edit: Callable[[torch.Tensor], None]) -> bytes:
    """Re-signed copy of ``data`` whose index section of ``name`` had its bits edited in place."""
    header, _ = split(data)
    offset = 0
    for entry in header["tensors"]:
        if entry[0] == name:
            break
        offset += entry[7] + entry[8] + entry[9]
    length = entry[7]

    def edit_body(body: bytes) -> bytes:
        bits = unpack_bits(torch.tensor(list(body[offset : offset + length]), dtype=torch.uint8), length * 8).clone()
        edit(bits)
        return body[:offset] + pack_bits(bits).numpy().tobytes() + body[offset + length :]

    return forge(data, edit_body=edit_body)


def test_index_pointing_into_padding_is_rejected() -> None:
    shapes = dict(SHAPES, emb=(1, 130))  # flat: 3 chunks of 44 = 132 positions, 2 of them padding
    lay = model_layout(shapes, SMALL)["emb"]
    assert (lay.n_chunks, lay.chunk_len, lay.k, lay.padded - lay.numel) == (3, 44, 3, 2)
    tensors = random_tensors(shapes)
    t = tensors["emb"]
    assert int(t.idx[-1, -1]) < 42
    bad = t.idx.clone()
    bad[-1, -1] = 43  # the last position of the last chunk is padding
    packed = encode_indices(bad, lay.chunk_len)

    def put(bits: torch.Tensor) -> None:
        bits[:] = unpack_bits(packed, packed.numel() * 8)

    with pytest.raises(MalformedPayload, match="'emb'.*padding"):
        decode_payload(with_index_bits(make_payload(tensors), "emb", put), expectation(shapes))


def test_index_past_the_chunk_is_rejected() -> None:
    # blocks.0.w: tiled chunks of 64 keeping 4, so 4 low bits and an 8-bit high vector.
    idx = torch.tensor([[60, 61, 62, 63]] * 6)
    tensors = random_tensors()
    tensors["blocks.0.w"].idx = idx
    data = make_payload(tensors)

    def move_high_bit(bits: torch.Tensor) -> None:
        upper = bits[16:24]  # chunk 0's high vector: high part 3 for all four positions
        assert upper.tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
        upper[3], upper[7] = 0, 1  # now high part 4 for all: positions 76..79

    with pytest.raises(MalformedPayload, match="position 79, past its length 64"):
        decode_payload(with_index_bits(data, "blocks.0.w", move_high_bit), expectation())


def test_index_section_with_wrong_count_is_rejected() -> None:
    def drop_a_position(bits: torch.Tensor) -> None:
        bits[16 + int(bits[16:24].nonzero()[0])] = 0

    with pytest.raises(MalformedPayload, match="codes 3 positions"):
        decode_payload(with_index_bits(make_payload(), "blocks.0.w", drop_a_position), expectation())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_non_finite_or_negative_scale_ref_is_rejected(value: float) -> None:
    forged = forge(make_payload(), edit_header=_set(("tensors", 1, 6), value))
    with pytest.raises(NonFinite, match="scale_ref"):
        decode_payload(forged, expectation())


def test_scale_ref_beyond_float32_is_rejected() -> None:
    forged = forge(make_payload(), edit_header=_set(("tensors", 1, 6), 0.1))
    with pytest.raises(MalformedPayload, match="not a float32"):
        decode_payload(forged, expectation())


def test_payload_from_other_base_weights_is_rejected() -> None:
    with pytest.raises(OutOfSync, match="other base|computed from weights"):
        decode_payload(make_payload(), expectation(base_digest=bytes(32)))


def test_read_header_refuses_layout_inconsistent_with_shape() -> None:
    def more_chunks(header: dict[str, Any]) -> None:
        header["tensors"][1][3] = 2  # blocks.0.w: says 2 chunks, its shape gives 6

    with pytest.raises(MalformedPayload, match="'blocks.0.w' declares layout"):
        read_header(forge(make_payload(), edit_header=more_chunks), max_bytes=1 << 20)


def test_read_header_refuses_impossible_codec() -> None:
    with pytest.raises(MalformedPayload, match="impossible codec"):
        read_header(forge(make_payload(), edit_header=_set(("codec", "tile"), 7)), max_bytes=1 << 20)


def test_encoder_refuses_invalid_tensors() -> None:
    tensors = random_tensors()
    t = tensors["emb"]
    unsorted = CompressedTensor(t.layout, t.idx.flip(1), t.codes, t.scale_q, t.scale_ref)
    with pytest.raises(ValueError, match="strictly increasing"):
        make_payload(dict(tensors, emb=unsorted))
    bad_ref = CompressedTensor(t.layout, t.idx, t.codes, t.scale_q, 0.1)
    with pytest.raises(ValueError, match="float32"):
        make_payload(dict(tensors, emb=bad_ref))
    with pytest.raises(ValueError, match="codec config"):
        make_payload(tensors, cfg=CodecConfig(chunk=64, tile=8, topk=8))


# ---------------------------------------------------------------- locoswarm inspect


def test_inspect_prints_header_and_sizes_of_a_valid_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "payload.bin"
    path.write_bytes(make_payload())
    assert inspect.run(str(path)) == 0
    out = capsys.readouterr().out
    for text in (RUN, "window      7", ALICE.peer_id, DIGEST.hex(), "chunk=64 tile=8 topk=4", "blocks.0.w", "bits/param"):
        assert text in out


def test_inspect_reports_the_error_class_of_a_bad_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "payload.bin"
    path.write_bytes(forge(make_payload(), identity=MALLORY))
    assert inspect.run(str(path)) == 2
    assert "BadSignature" in capsys.readouterr().err
    assert inspect.run(str(path), max_bytes=100) == 2
    assert "PayloadTooLarge" in capsys.readouterr().err
    assert inspect.run(str(tmp_path / "missing.bin")) == 2


def test_inspect_shows_a_payload_with_an_absurd_timestamp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "payload.bin"
    path.write_bytes(forge(make_payload(), edit_header=_set(("created_at",), 1e300)))
    assert inspect.run(str(path)) == 0
    assert "not a date (1e+300)" in capsys.readouterr().out


def test_inspect_says_truncated_for_a_cut_file_next_to_what_receivers_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_payload()
    header_end = 10 + struct.unpack_from(">I", data, 6)[0]
    cases = {
        len(data) - 40: f"the file has {len(data) - 40} (40 missing); every receiver refuses it as BadSignature",
        header_end - 5: f"its header alone takes {header_end} bytes, the file has {header_end - 5}; every receiver "
                        f"refuses it as MalformedPayload",
        8: "8 bytes, shorter than a payload's fixed prefix",
    }
    for cut, says in cases.items():
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut])
        assert inspect.run(str(path)) == 2
        err = capsys.readouterr().err
        assert "refused: truncated: " in err and says in err, err
    forged = tmp_path / "forged.bin"
    forged.write_bytes(forge(data, identity=MALLORY)[:-1] + b"\0")  # whole length, bad signature: not truncated
    assert inspect.run(str(forged)) == 2
    assert "refused: truncated" not in capsys.readouterr().err


def test_inspect_refuses_what_every_receiver_refuses_duplicate_positions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = random_tensors()
    valid = make_payload(tensors)
    entries = read_header(valid, max_bytes=1 << 20)[0].tensors
    at = next(i for i, e in enumerate(entries) if e.layout.k >= 2)
    offset = sum(e.section_bytes for e in entries[:at])
    dup = tensors[entries[at].layout.name].idx.clone()
    dup[0, 1] = dup[0, 0]  # one error-feedback position twice in a chunk
    section = encode_indices(dup, entries[at].layout.chunk_len).numpy().tobytes()
    assert len(section) == entries[at].index_bytes
    data = forge(valid, edit_body=lambda body: body[:offset] + section + body[offset + len(section):])
    with pytest.raises(MalformedPayload, match="strictly increasing"):
        decode_payload(data, expectation())  # what a receiver says
    path = tmp_path / "dup.bin"
    path.write_bytes(data)
    assert inspect.run(str(path)) == 2
    err = capsys.readouterr().err
    assert "MalformedPayload" in err and "strictly increasing" in err and "refused: truncated" not in err
