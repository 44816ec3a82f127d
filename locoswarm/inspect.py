"""``locoswarm inspect FILE``: show what a payload object holds, or why it is refused.

Works without the run's manifest: it checks size, framing, signature and the header's
internal consistency (``protocol.wire.read_header``) but decodes no tensor data, so it is
also the tool for looking at a payload some peer refused.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from protocol.errors import PayloadRejected, PayloadTooLarge
from protocol.wire import MAGIC, VERSION, PayloadHeader, read_header


def run(path: str, *, max_bytes: int = 1 << 30) -> int:
    """Print a payload file's header and per-tensor sizes; 0 when valid, 2 when refused."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise PayloadTooLarge(f"payload is {size} bytes, over the cap of {max_bytes}")
        data = Path(path).read_bytes()
        header, public_key = read_header(data, max_bytes=max_bytes)
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except PayloadRejected as exc:
        print(f"{path}: refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for line in describe(header, public_key, size=len(data), path=path):
        print(line)
    return 0


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
        f"codec       chunk={c.chunk} tile={c.tile} topk={c.topk} bits={c.bits} levels={list(c.levels)} "
        f"scale_steps_per_octave={c.scale_steps_per_octave}",
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
