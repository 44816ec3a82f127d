"""``locoswarm inspect FILE``: show what a payload object holds, or why every receiver refuses it.

Works without the run's manifest: the payload is decoded in full, exactly as a receiver
decodes it (``protocol.wire.decode_payload``: framing, signature, strict header, sections,
every index and code), against what its own header declares. So a payload that every
receiver refuses (duplicate positions in a chunk, say) is refused here too, with the same
error class. Only what needs the run is left out: its run key, the window a receiver is at,
the base digest of its weights, the peer it expects.

A truncated file fails the signature check first (the key and signature sit at the end),
which on its own reads like tampering; so when a file is shorter than its own framing says,
``inspect`` says "truncated" and how many bytes are missing, next to what receivers report.
"""

from __future__ import annotations

import datetime as dt
import os
import struct
import sys
from pathlib import Path

from protocol.errors import PayloadRejected, PayloadTooLarge
from protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from protocol.manifest import CodecConfig
from protocol.records import unpack_strict
from protocol.wire import (
    MAGIC,
    MAX_HEADER_BYTES,
    VERSION,
    Expectation,
    Payload,
    PayloadHeader,
    decode_payload,
    read_header,
)

_PREFIX = struct.Struct(">4sHI")
_TRAILER = PUBLIC_KEY_BYTES + SIGNATURE_BYTES


def run(path: str, *, max_bytes: int = 1 << 30) -> int:
    """Print a payload file's header and per-tensor sizes; 0 when every receiver would
    accept it (as far as it can be told without the run), 2 when refused or unreadable."""
    try:
        size = os.path.getsize(path)
        data = Path(path).read_bytes() if size <= max_bytes else b""
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        if size > max_bytes:
            raise PayloadTooLarge(f"payload is {size} bytes, over the cap of {max_bytes}")
        payload = decode_as_receiver(data, max_bytes=max_bytes)
    except PayloadRejected as exc:
        what = f"{type(exc).__name__}: {exc}"
        cut = truncation(data)
        if cut is not None:
            print(f"{path}: refused: truncated: {cut}; every receiver refuses it as {what}", file=sys.stderr)
        else:
            print(f"{path}: refused: {what}", file=sys.stderr)
        return 2
    for line in describe(payload.header, payload.public_key, size=len(data), path=path):
        print(line)
    print("verdict     valid: every receiver decodes it (not checked without the run: run key, window, "
          "base digest, expected peer)")
    return 0


def decode_as_receiver(data: bytes, *, max_bytes: int) -> Payload:
    """Decode ``data`` as every receiver does, expecting what its own header declares."""
    header, _ = read_header(data, max_bytes=max_bytes)
    c = header.codec
    codec = CodecConfig(chunk=c.chunk, tile=c.tile, topk=c.topk, bits=c.bits)
    expect = Expectation(run=header.run, window=header.window, layouts=header.layouts, codec=codec,
                         max_bytes=max_bytes)
    return decode_payload(data, expect)


def truncation(data: bytes) -> str | None:
    """How a file is shorter than its own framing says it is, or None when it is not (or
    the framing is unreadable). Reads the header without trusting it: it only words the
    report, it decides nothing."""
    if len(data) < _PREFIX.size:
        return f"{len(data)} bytes, shorter than a payload's fixed prefix" if MAGIC.startswith(data[:4]) else None
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION or header_len > MAX_HEADER_BYTES:
        return None
    header_end = _PREFIX.size + header_len
    if len(data) < header_end:
        return f"its header alone takes {header_end} bytes, the file has {len(data)}"
    try:
        tensors = unpack_strict(data[_PREFIX.size:header_end], header_len)["tensors"]
        sections = sum(int(t[7]) + int(t[8]) + int(t[9]) for t in tensors)
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    want = header_end + sections + _TRAILER
    if len(data) >= want:
        return None
    return f"its header declares {want} bytes, the file has {len(data)} ({want - len(data)} missing)"


def describe(header: PayloadHeader, public_key: bytes, *, size: int, path: str) -> list[str]:
    """The lines ``run`` prints for a valid payload."""
    try:
        created = dt.datetime.fromtimestamp(header.created_at, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):  # signed, but nonsense: show the number alone
        created = "not a date"
    c = header.codec
    params = header.numel
    index = sum(t.index_bytes for t in header.tensors)
    codes = sum(t.code_bytes for t in header.tensors)
    scales = sum(t.scale_bytes for t in header.tensors)
    framing = size - index - codes - scales
    lines = [
        f"payload     {path} ({size} bytes)",
        f"format      {MAGIC.decode()} version {VERSION}",
        f"run         {header.run}",
        f"window      {header.window}",
        f"peer        {header.peer_id} (signed by key {public_key.hex()})",
        f"base digest {header.base_digest.hex()}",
        f"tokens      {header.tokens}",
        f"created at  {created} ({header.created_at})",
        (f"codec       chunk={c.chunk} tile={c.tile} topk={c.topk} bits={c.bits} levels={list(c.levels)} "
        f"scale_steps_per_octave={c.scale_steps_per_octave}"),
        f"tensors     {len(header.tensors)}, {params} parameters",
    ]
    width = max(len(t.layout.name) for t in header.tensors)
    lines.append(f"  {'name':<{width}}  {'shape':<16} {'layout':<28} {'idx B':>9} {'code B':>9} {'scale B':>8}  scale_ref")
    for t in header.tensors:
        lay = t.layout
        kind = f"{'tiled' if lay.tiled else 'flat'} {lay.n_chunks}x{lay.chunk_len} k={lay.k}"
        lines.append(
            f"  {lay.name:<{width}}  {list(lay.shape)!s:<16} {kind:<28} {t.index_bytes:>9} {t.code_bytes:>9} "
            f"{t.scale_bytes:>8}  {t.scale_ref:.6g}"
        )
    lines.append(
        f"bits/param  {size * 8 / params:.5f} (indices {index * 8 / params:.5f}, codes {codes * 8 / params:.5f}, "
        f"scales {scales * 8 / params:.5f}, header+signature {framing * 8 / params:.5f})"
    )
    return lines
