"""The payload wire format: one signed object per (run, window, peer), and its decoder.

Layout (all integers big-endian; docs/protocol.md spells it out byte by byte)::

    magic b"LSPW" | u16 version | u32 header length H | msgpack header (H bytes)
    | sections (per tensor, in header order: indices, 2-bit codes, scale codes)
    | 32-byte ed25519 public key | 64-byte signature over every byte before it

The encoder takes ``CompressedTensor``s (protocol/codec.py makes them) and the decoder
gives them back exactly. The decoder trusts nothing, and checks in this order so that a
hostile object costs as little as possible: total size against the cap, magic and
version, framing lengths, the signature (before msgpack sees a byte of the header), the
signer against the header's peer id, a strict header schema (exact types, no unknown or
missing fields), run, window, codec parameters, tensor layouts, section lengths (before
any tensor is allocated), then the decoded indices, scale_ref, base digest and expected
peer. Each refusal is a ``PayloadRejected`` subclass whose reason names what is wrong.
Both directions are whole-tensor torch ops on the tensors' device (see protocol/indexcode.py).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from protocol.codec_types import (
    LEVELS,
    SCALE_STEPS_PER_OCTAVE,
    CompressedTensor,
    TensorLayout,
    tensor_layout,
)
from protocol.errors import (
    BadSignature,
    LayoutMismatch,
    MalformedPayload,
    ManifestError,
    NonFinite,
    OutOfSync,
    PayloadTooLarge,
    WrongRun,
    WrongWindow,
)
from protocol.identity import (
    PEER_ID_HEX_CHARS,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_of,
    verify,
)
from protocol.indexcode import (
    CorruptSection,
    check_indices,
    code_section_bytes,
    decode_indices,
    encode_indices,
    index_section_bytes,
    pack_codes,
    unpack_codes,
)
from protocol.manifest import CodecConfig
from protocol.records import short, unpack_strict

MAGIC = b"LSPW"
VERSION = 1
DIGEST_BYTES = 32
MAX_HEADER_BYTES = 16 << 20
"""A header describes tensors, not their data: 16 MiB is thousands of times a 1B model's."""
MAX_RUN_CHARS = 256
MAX_NAME_CHARS = 512
MAX_DIMS = 8
MAX_DIM = 1 << 40
MAX_TENSORS = 1 << 16
"""Far above any model's parameter count; bounds the Python work a signed but hostile header costs."""

_PREFIX = struct.Struct(">4sHI")  # magic, version, header length
_TRAILER = PUBLIC_KEY_BYTES + SIGNATURE_BYTES
_HEADER_KEYS = ("run", "window", "peer_id", "base_digest", "tokens", "created_at", "codec", "tensors")
_CODEC_KEYS = ("chunk", "tile", "topk", "bits", "levels", "scale_steps_per_octave")
_TENSOR_FIELDS = 10  # name, shape, tiled, n_chunks, chunk_len, k, scale_ref, 3 section lengths


@dataclass(frozen=True)
class WireCodec:
    """The codec parameters a payload declares; must equal the run's for it to be used."""

    chunk: int
    tile: int
    topk: int
    bits: int
    levels: tuple[float, ...]
    scale_steps_per_octave: int

    @classmethod
    def of(cls, cfg: CodecConfig) -> WireCodec:
        """What a payload encoded under ``cfg`` by this version declares."""
        return cls(cfg.chunk, cfg.tile, cfg.topk, cfg.bits, tuple(LEVELS), SCALE_STEPS_PER_OCTAVE)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's line of the header: its layout, reference scale and section byte lengths."""

    layout: TensorLayout
    scale_ref: float
    index_bytes: int
    code_bytes: int
    scale_bytes: int

    @property
    def section_bytes(self) -> int:
        return self.index_bytes + self.code_bytes + self.scale_bytes


@dataclass(frozen=True)
class PayloadHeader:
    run: str
    window: int
    peer_id: str
    base_digest: bytes
    """SHA-256 digest of the global weights the update was computed from."""
    tokens: int
    """Tokens the peer trained on for this update."""
    created_at: float
    """Unix time the peer encoded the payload (informational; nothing trusts it)."""
    codec: WireCodec
    tensors: tuple[TensorEntry, ...]
    """Sorted by tensor name; the order of the sections."""

    @property
    def layouts(self) -> dict[str, TensorLayout]:
        return {t.layout.name: t.layout for t in self.tensors}

    @property
    def numel(self) -> int:
        return sum(t.layout.numel for t in self.tensors)


@dataclass(frozen=True)
class Expectation:
    """What the receiver knows the payload must be; anything else is refused."""

    run: str
    window: int | None
    """None accepts any window (inspection, catch-up over several windows)."""
    layouts: Mapping[str, TensorLayout]
    codec: CodecConfig
    max_bytes: int
    peer_id: str | None = None
    base_digest: bytes | None = None
    max_header_bytes: int = MAX_HEADER_BYTES
    """Refuse a header longer than this before checking the signature (``header_bound``)."""
    min_bytes: int = 0
    """A valid payload is at least this long (its sections alone): shorter objects in a
    listing are not worth a download."""

    @classmethod
    def of_run(cls, run: str, window: int, layouts: Mapping[str, TensorLayout], codec: CodecConfig, *,
               cap: int, base_digest: bytes | None = None) -> Expectation:
        """What a payload of the run's model must be: sizes bounded by what the layouts imply
        (a valid payload is within a few hundred bytes of ``payload_bound``), and by ``cap``."""
        return cls(run=run, window=window, layouts=layouts, codec=codec, base_digest=base_digest,
                   max_bytes=min(cap, payload_bound(layouts)), max_header_bytes=header_bound(layouts),
                   min_bytes=payload_bound(layouts) - header_bound(layouts))


def header_bound(layouts: Mapping[str, TensorLayout]) -> int:
    """Bytes a valid header describing ``layouts`` takes at most (run key, ids, digest and
    numbers at their widest msgpack encodings, plus each tensor's name and shape)."""
    fixed = 512 + MAX_RUN_CHARS
    per_tensor = sum(len(name.encode()) + 9 * len(lay.shape) + 96 for name, lay in layouts.items())
    return fixed + per_tensor


def payload_bound(layouts: Mapping[str, TensorLayout]) -> int:
    """Bytes a valid payload for ``layouts`` takes at most: framing, ``header_bound`` and the
    exact section lengths (a pure function of the layouts)."""
    sections = sum(
        index_section_bytes(lay.n_chunks, lay.chunk_len, lay.k) + code_section_bytes(lay.n_chunks, lay.k) + lay.n_chunks
        for lay in layouts.values()
    )
    return _PREFIX.size + header_bound(layouts) + sections + _TRAILER


@dataclass
class Payload:
    header: PayloadHeader
    tensors: dict[str, CompressedTensor]
    public_key: bytes
    size: int
    """Bytes of the whole signed object."""


# ---------------------------------------------------------------------------- encode


def encode_payload(
    *,
    run: str,
    window: int,
    base_digest: bytes,
    tokens: int,
    tensors: Mapping[str, CompressedTensor],
    codec: CodecConfig,
    identity: Identity,
    created_at: float | None = None,
) -> bytes:
    """Pack and sign one payload. Tensors may live on any device; the bytes end on the CPU.

    Raises ``ValueError`` when the inputs are not a valid payload (a bug in the caller):
    a layout that ``codec`` would not produce, wrong dtypes/shapes, unsorted positions.
    """
    if len(base_digest) != DIGEST_BYTES:
        raise ValueError(f"base_digest must be {DIGEST_BYTES} bytes, got {len(base_digest)}")
    if not tensors:
        raise ValueError("a payload needs at least one tensor")
    entries: list[list[Any]] = []
    sections: list[torch.Tensor] = []
    for name in sorted(tensors):
        ct = tensors[name]
        lay = ct.layout
        _check_compressed(name, ct, codec)
        idx_bytes = encode_indices(ct.idx, lay.chunk_len)
        code_bytes = pack_codes(ct.codes)
        sections += [idx_bytes, code_bytes, ct.scale_q.reshape(-1)]
        entries.append(
            [name, list(lay.shape), lay.tiled, lay.n_chunks, lay.chunk_len, lay.k, float(ct.scale_ref),
             idx_bytes.numel(), code_bytes.numel(), lay.n_chunks]
        )
    wc = WireCodec.of(codec)
    header = {
        "run": run,
        "window": int(window),
        "peer_id": identity.peer_id,
        "base_digest": bytes(base_digest),
        "tokens": int(tokens),
        "created_at": float(time.time() if created_at is None else created_at),
        "codec": {
            "chunk": wc.chunk, "tile": wc.tile, "topk": wc.topk, "bits": wc.bits,
            "levels": list(wc.levels), "scale_steps_per_octave": wc.scale_steps_per_octave,
        },
        "tensors": entries,
    }
    packed = msgpack.packb(header, use_bin_type=True)
    device = sections[0].device
    body = torch.cat([s.to(device) for s in sections]).cpu().numpy().tobytes()
    head = _PREFIX.pack(MAGIC, VERSION, len(packed)) + packed + body + identity.public_key
    return head + identity.sign(head)


def _check_compressed(name: str, ct: CompressedTensor, codec: CodecConfig) -> None:
    lay = ct.layout
    if lay.name != name:
        raise ValueError(f"tensor stored under {name!r} has layout named {lay.name!r}")
    if lay != tensor_layout(name, lay.shape, codec):
        raise ValueError(f"layout of {name!r} is not what the codec config gives for shape {lay.shape}")
    n, k = lay.n_chunks, lay.k
    for what, t, shape, dtypes in (
        ("idx", ct.idx, (n, k), (torch.int32, torch.int64)),
        ("codes", ct.codes, (n, k), (torch.uint8,)),
        ("scale_q", ct.scale_q, (n,), (torch.uint8,)),
    ):
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            raise ValueError(f"{name}.{what} is {t.dtype} {tuple(t.shape)}, expected {dtypes[0]} {shape}")
    if bool((ct.codes > 3).any()):
        raise ValueError(f"{name}.codes holds values above 3")
    try:
        check_indices(ct.idx, lay.chunk_len, _last_valid(lay))
    except CorruptSection as exc:
        raise ValueError(f"{name}.idx: {exc}") from exc
    ref = float(ct.scale_ref)
    if not (math.isfinite(ref) and ref >= 0.0 and _is_float32(ref)):
        raise ValueError(f"{name}.scale_ref must be a finite float32 >= 0, got {ref!r}")


# ---------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class _Parsed:
    """A payload whose framing, signature and header schema are checked; nothing more."""

    header: PayloadHeader
    public_key: bytes
    body_start: int
    body_len: int


def read_header(data: bytes, *, max_bytes: int) -> tuple[PayloadHeader, bytes]:
    """Verify size, framing, signature and the header's internal consistency (every layout
    is what its shape and the declared codec give, section lengths add up); return the
    header and the signer's public key. Decodes no tensor data; needs no expectation."""
    parsed = _parse(data, max_bytes=max_bytes, peer=None, window=None)
    header = parsed.header
    ctx = {"peer": header.peer_id, "window": header.window}
    try:
        cfg = CodecConfig(chunk=header.codec.chunk, tile=header.codec.tile, topk=header.codec.topk, bits=header.codec.bits)
    except ManifestError as exc:
        raise MalformedPayload(f"header declares impossible codec parameters: {exc}", **ctx) from exc
    if header.codec != WireCodec.of(cfg):
        raise MalformedPayload(
            f"header declares levels {header.codec.levels} / {header.codec.scale_steps_per_octave} scale steps per "
            f"octave; wire version {VERSION} uses {LEVELS} / {SCALE_STEPS_PER_OCTAVE}", **ctx,
        )
    for entry in header.tensors:
        lay = entry.layout
        try:
            want = tensor_layout(lay.name, lay.shape, cfg)
        except ValueError as exc:
            raise MalformedPayload(f"tensor {lay.name!r}: {exc}", **ctx) from exc
        if lay != want:
            raise MalformedPayload(f"tensor {lay.name!r} declares layout {_describe(lay)}; its shape gives {_describe(want)}", **ctx)
    _check_sections(parsed, ctx)
    for entry in header.tensors:
        _check_scale_ref(entry, ctx)
    return header, parsed.public_key


def decode_payload(data: bytes, expect: Expectation, device: str | torch.device = "cpu") -> Payload:
    """Check ``data`` against everything the receiver knows, then decode it onto ``device``.

    Raises only ``PayloadRejected`` subclasses (see the module docstring for the order).
    """
    parsed = _parse(data, max_bytes=expect.max_bytes, peer=expect.peer_id, window=expect.window,
                    max_header=expect.max_header_bytes)
    header = parsed.header
    ctx = {"peer": header.peer_id, "window": expect.window if expect.window is not None else header.window}
    if header.run != expect.run:
        raise WrongRun(f"payload belongs to run {short(header.run)}, expected {expect.run!r}", **ctx)
    if expect.window is not None and header.window != expect.window:
        raise WrongWindow(f"payload is for window {header.window}, expected window {expect.window}", **ctx)
    want_codec = WireCodec.of(expect.codec)
    if header.codec != want_codec:
        raise LayoutMismatch(f"payload codec {header.codec} differs from the run's {want_codec}", **ctx)
    _check_layouts(header, expect.layouts, ctx)
    _check_sections(parsed, ctx)

    body = torch.frombuffer(bytearray(data[parsed.body_start : parsed.body_start + parsed.body_len]), dtype=torch.uint8)
    body = body.to(device)
    tensors: dict[str, CompressedTensor] = {}
    offset = 0
    for entry in header.tensors:
        lay = entry.layout
        idx_data = body[offset : offset + entry.index_bytes]
        offset += entry.index_bytes
        code_data = body[offset : offset + entry.code_bytes]
        offset += entry.code_bytes
        scale_q = body[offset : offset + entry.scale_bytes].clone()
        offset += entry.scale_bytes
        try:
            idx = decode_indices(idx_data, lay.n_chunks, lay.chunk_len, lay.k, _last_valid(lay))
            codes = unpack_codes(code_data, lay.n_chunks, lay.k)
        except CorruptSection as exc:
            raise MalformedPayload(f"tensor {lay.name!r}: {exc}", **ctx) from exc
        tensors[lay.name] = CompressedTensor(lay, idx, codes, scale_q, entry.scale_ref)

    for entry in header.tensors:
        _check_scale_ref(entry, ctx)
    if expect.base_digest is not None and header.base_digest != expect.base_digest:
        raise OutOfSync(
            f"payload was computed from weights {header.base_digest.hex()[:16]}…, "
            f"the current global weights are {expect.base_digest.hex()[:16]}…", **ctx,
        )
    if expect.peer_id is not None and header.peer_id != expect.peer_id:
        raise BadSignature(f"payload is signed by peer {header.peer_id}, expected peer {expect.peer_id}", **ctx)
    return Payload(header, tensors, parsed.public_key, len(data))


def _parse(data: bytes, *, max_bytes: int, peer: str | None, window: int | None,
           max_header: int = MAX_HEADER_BYTES) -> _Parsed:
    """Size cap, magic/version, framing, signature, signer == peer id, header schema."""
    ctx: dict[str, Any] = {"peer": peer, "window": window}
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(data)} bytes, over the cap of {max_bytes}", **ctx)
    if len(data) < _PREFIX.size + _TRAILER:
        raise MalformedPayload(f"payload is {len(data)} bytes, shorter than the smallest possible object", **ctx)
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MalformedPayload(f"bad magic {magic!r}: not a locoswarm payload (expected {MAGIC!r})", **ctx)
    if version != VERSION:
        raise MalformedPayload(f"wire version {version} is not supported (this build reads version {VERSION})", **ctx)
    if header_len > max_header:
        raise PayloadTooLarge(f"header length field says {header_len} bytes, over the cap of {max_header}", **ctx)
    body_start = _PREFIX.size + header_len
    body_len = len(data) - body_start - _TRAILER
    if body_len < 0:
        raise MalformedPayload(f"header length field says {header_len} bytes, more than the object holds", **ctx)
    signed_end = len(data) - SIGNATURE_BYTES
    public_key = bytes(data[signed_end - PUBLIC_KEY_BYTES : signed_end])
    if not verify(public_key, bytes(data[signed_end:]), bytes(data[:signed_end])):
        raise BadSignature("signature does not verify: the object was altered or signed by someone else", **ctx)
    ctx["peer"] = signer = peer_id_of(public_key)
    try:
        raw = unpack_strict(data[_PREFIX.size : body_start], header_len)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MalformedPayload(f"header is not valid msgpack: {exc}", **ctx) from exc
    if type(raw) is not dict:
        raise MalformedPayload(f"header is a {type(raw).__name__}, not a map", **ctx)
    claimed = raw.get("peer_id")
    if claimed != signer:
        raise BadSignature(f"header claims peer {_short(claimed)} but the signing key belongs to {signer}", **ctx)
    header = _header_from_raw(raw, ctx)
    return _Parsed(header, public_key, body_start, body_len)


def _header_from_raw(raw: dict[str, Any], ctx: dict[str, Any]) -> PayloadHeader:
    """The strict schema: exact key sets and exact types (bool is not int, int is not float)."""
    s = _Schema(ctx)
    s.keys(raw, _HEADER_KEYS, "header")
    window = s.int(raw["window"], "window", 0, 1 << 62)
    ctx["window"] = ctx["window"] if ctx["window"] is not None else window
    run = s.str(raw["run"], "run", MAX_RUN_CHARS)
    peer_id = s.str(raw["peer_id"], "peer_id", PEER_ID_HEX_CHARS)
    digest = raw["base_digest"]
    if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
        raise MalformedPayload(f"header field base_digest must be {DIGEST_BYTES} raw bytes, got {_kind(digest)}", **ctx)
    tokens = s.int(raw["tokens"], "tokens", 0, 1 << 62)
    created_at = s.float(raw["created_at"], "created_at")
    if not math.isfinite(created_at):
        raise MalformedPayload(f"header field created_at must be finite, got {created_at}", **ctx)

    rc = raw["codec"]
    s.keys(rc, _CODEC_KEYS, "codec")
    levels = s.list(rc["levels"], "codec.levels", 1, 16)
    codec = WireCodec(
        chunk=s.int(rc["chunk"], "codec.chunk", 1, 65536),
        tile=s.int(rc["tile"], "codec.tile", 1, 65536),
        topk=s.int(rc["topk"], "codec.topk", 1, 65536),
        bits=s.int(rc["bits"], "codec.bits", 1, 8),
        levels=tuple(s.float(v, "codec.levels[]") for v in levels),
        scale_steps_per_octave=s.int(rc["scale_steps_per_octave"], "codec.scale_steps_per_octave", 1, 1 << 16),
    )

    entries = []
    previous = None
    for i, rt in enumerate(s.list(raw["tensors"], "tensors", 1, MAX_TENSORS)):
        where = f"tensors[{i}]"
        fields = s.list(rt, where, _TENSOR_FIELDS, _TENSOR_FIELDS)
        name = s.str(fields[0], f"{where}.name", MAX_NAME_CHARS)
        where = f"tensor {name!r}"
        if previous is not None and name <= previous:
            raise MalformedPayload(f"{where} comes after {previous!r}: tensors must be sorted by name, without repeats", **ctx)
        previous = name
        shape = tuple(s.int(d, f"{where} shape[]", 1, MAX_DIM) for d in s.list(fields[1], f"{where} shape", 0, MAX_DIMS))
        if type(fields[2]) is not bool:
            raise MalformedPayload(f"header field {where} tiled must be a bool, got {_kind(fields[2])}", **ctx)
        n_chunks = s.int(fields[3], f"{where} n_chunks", 1, MAX_DIM)
        chunk_len = s.int(fields[4], f"{where} chunk_len", 1, 65536)
        k = s.int(fields[5], f"{where} k", 1, chunk_len)
        layout = TensorLayout(name, shape, fields[2], n_chunks, chunk_len, k)
        entries.append(
            TensorEntry(
                layout,
                s.float(fields[6], f"{where} scale_ref"),
                s.int(fields[7], f"{where} index section length", 0, 1 << 62),
                s.int(fields[8], f"{where} code section length", 0, 1 << 62),
                s.int(fields[9], f"{where} scale section length", 0, 1 << 62),
            )
        )
    return PayloadHeader(run, window, peer_id, digest, tokens, created_at, codec, tuple(entries))


class _Schema:
    """Exact-type field readers that raise ``MalformedPayload`` naming the field."""

    def __init__(self, ctx: dict[str, Any]):
        self.ctx = ctx

    def fail(self, what: str, want: str, value: Any) -> MalformedPayload:
        return MalformedPayload(f"header field {what} must be {want}, got {_kind(value)}", **self.ctx)

    def keys(self, value: Any, keys: tuple[str, ...], what: str) -> None:
        if type(value) is not dict:
            raise self.fail(what, "a map", value)
        missing = [k for k in keys if k not in value]
        unknown = sorted(str(k) for k in value if k not in keys)
        if missing or unknown:
            raise MalformedPayload(f"{what} has missing fields {missing} and unknown fields {unknown}", **self.ctx)

    def int(self, value: Any, what: str, lo: int, hi: int) -> int:
        if type(value) is not int:
            raise self.fail(what, "an integer", value)
        if not lo <= value <= hi:
            raise MalformedPayload(f"header field {what} is {value}, outside [{lo}, {hi}]", **self.ctx)
        return value

    def str(self, value: Any, what: str, max_chars: int) -> str:
        if type(value) is not str:
            raise self.fail(what, "a string", value)
        if not 0 < len(value) <= max_chars:
            raise MalformedPayload(f"header field {what} must be 1 to {max_chars} characters, got {len(value)}", **self.ctx)
        return value

    def float(self, value: Any, what: str) -> float:
        if type(value) is not float:
            raise self.fail(what, "a float", value)
        return value

    def list(self, value: Any, what: str, lo: int, hi: int) -> list:
        if type(value) is not list:
            raise self.fail(what, "an array", value)
        if not lo <= len(value) <= hi:
            raise MalformedPayload(f"header field {what} has {len(value)} items, expected {lo} to {hi}", **self.ctx)
        return value


def _check_layouts(header: PayloadHeader, want: Mapping[str, TensorLayout], ctx: dict[str, Any]) -> None:
    got = header.layouts
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise LayoutMismatch(
            f"payload tensors differ from the run's model: missing {_few(missing)}, unexpected {_few(extra)}", **ctx
        )
    for name, lay in got.items():
        if lay != want[name]:
            raise LayoutMismatch(f"tensor {name!r} is {_describe(lay)}, the run's model has {_describe(want[name])}", **ctx)


def _check_sections(parsed: _Parsed, ctx: dict[str, Any]) -> None:
    """Section lengths must be exactly what each layout implies and fill the body exactly."""
    for entry in parsed.header.tensors:
        lay = entry.layout
        want = (index_section_bytes(lay.n_chunks, lay.chunk_len, lay.k), code_section_bytes(lay.n_chunks, lay.k), lay.n_chunks)
        got = (entry.index_bytes, entry.code_bytes, entry.scale_bytes)
        if got != want:
            raise MalformedPayload(
                f"tensor {lay.name!r} declares section lengths {got} (indices, codes, scales); its layout implies {want}", **ctx
            )
    total = sum(e.section_bytes for e in parsed.header.tensors)
    if total != parsed.body_len:
        raise MalformedPayload(f"sections add up to {total} bytes but the object carries {parsed.body_len}", **ctx)


def _check_scale_ref(entry: TensorEntry, ctx: dict[str, Any]) -> None:
    ref = entry.scale_ref
    if not math.isfinite(ref) or ref < 0.0:
        raise NonFinite(f"tensor {entry.layout.name!r} has scale_ref {ref}; it must be finite and >= 0", **ctx)
    if not _is_float32(ref):
        raise MalformedPayload(f"tensor {entry.layout.name!r} has scale_ref {ref!r}, not a float32 value", **ctx)


def _last_valid(lay: TensorLayout) -> int:
    """Positions of the last chunk that hold data (the rest of a flat chunk is padding)."""
    return lay.chunk_len if lay.tiled else lay.numel - (lay.n_chunks - 1) * lay.chunk_len


def _is_float32(x: float) -> bool:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0] == x
    except OverflowError:  # finite but beyond float32's range
        return False


def _describe(lay: TensorLayout) -> str:
    kind = "tiled" if lay.tiled else "flat"
    return f"shape {list(lay.shape)} {kind}, {lay.n_chunks} chunks of {lay.chunk_len} keeping {lay.k}"


def _short(value: Any) -> str:
    """repr cut to 40 characters: hostile values must not make huge error messages."""
    text = repr(value)
    return text[:40] + ("…" if len(text) > 40 else "")


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {_short(value)}"


def _few(names: list[str]) -> str:
    return repr(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


__all__ = [
    "MAGIC",
    "VERSION",
    "Expectation",
    "Payload",
    "PayloadHeader",
    "TensorEntry",
    "WireCodec",
    "decode_payload",
    "encode_payload",
    "read_header",
]
