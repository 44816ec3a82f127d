"""Small signed records: window-close lists, store announcements, validator scores.

Layout: ``b"LSR1"`` | u32 big-endian body length | msgpack body (a map with str keys,
always holding ``kind`` and ``run``) | 32-byte ed25519 public key | 64-byte signature over
everything before the key. The signature is checked before the body is parsed, and the
body is parsed with msgpack's size limits, so a hostile record costs a hash and a verify.

Maps with a repeated key are refused everywhere (``unpack_strict``): msgpack itself keeps
the last value, a decoder in another language may keep the first, and then the same signed
bytes would mean two different things to two readers.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import RecordRejected
from protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_of,
    verify,
)

MAGIC = b"LSR1"
MAX_RECORD_BYTES = 1 << 20
_PREFIX = len(MAGIC) + 4
_TRAILER = PUBLIC_KEY_BYTES + SIGNATURE_BYTES


@dataclass(frozen=True)
class SignedRecord:
    peer_id: str
    public_key: bytes
    body: dict[str, Any]


class DuplicateKey(ValueError):
    """A msgpack map repeats a key."""


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise DuplicateKey("a map repeats a key")
    return out


def unpack_strict(data: bytes, limit: int) -> Any:
    """msgpack-decode ``data`` with every length bounded by ``limit`` and repeated map keys
    refused. Raises ``ValueError`` (msgpack's own errors derive from it) for bad bytes."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, object_pairs_hook=_strict_map,
            max_bin_len=limit, max_str_len=limit, max_array_len=limit, max_map_len=limit, max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(str(exc)) from exc


def json_strict(data: bytes) -> Any:
    """Parse UTF-8 JSON, refusing objects that repeat a key (for the same reason as above).
    Raises ``ValueError`` for bad bytes, deep nesting included."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_strict_map)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def sign_record(identity: Identity, kind: str, run: str, body: dict[str, Any]) -> bytes:
    """Serialize and sign ``body`` (msgpack-able values only) as a record of ``kind``."""
    packed = msgpack.packb({"kind": kind, "run": run, **body}, use_bin_type=True)
    head = MAGIC + struct.pack(">I", len(packed)) + packed
    return head + identity.public_key + identity.sign(head)


def verify_record(
    data: bytes, *, kind: str, run: str, max_bytes: int = MAX_RECORD_BYTES, signer: str | None = None,
    fields: Collection[str] | None = None,
) -> SignedRecord:
    """Check size, framing, signature, kind and run (and, given ``fields``, that the body
    holds exactly those besides ``kind`` and ``run``); return the signer and body."""
    if len(data) > max_bytes:
        raise RecordRejected(f"{kind} record is {len(data)} bytes, over the cap of {max_bytes}")
    if len(data) < _PREFIX + _TRAILER or data[:4] != MAGIC:
        raise RecordRejected(f"{kind} record is truncated or has a bad magic")
    (n,) = struct.unpack(">I", data[4:_PREFIX])
    if _PREFIX + n + _TRAILER != len(data):
        raise RecordRejected(f"{kind} record length field says {n} body bytes, object has {len(data) - _PREFIX - _TRAILER}")
    head = data[: _PREFIX + n]
    public_key = data[_PREFIX + n : _PREFIX + n + PUBLIC_KEY_BYTES]
    signature = data[_PREFIX + n + PUBLIC_KEY_BYTES :]
    if not verify(public_key, signature, head):
        raise RecordRejected(f"{kind} record has a bad signature")
    peer_id = peer_id_of(public_key)
    if signer is not None and peer_id != signer:
        raise RecordRejected(f"{kind} record is signed by {peer_id}, expected {signer}")
    try:
        body = unpack_strict(data[_PREFIX : _PREFIX + n], n)
    except ValueError as exc:
        raise RecordRejected(f"{kind} record body is not valid msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise RecordRejected(f"{kind} record body is not a map")
    if body.get("kind") != kind:
        raise RecordRejected(f"record is of kind {short(body.get('kind'))}, expected {kind!r}")
    if body.get("run") != run:
        raise RecordRejected(f"{kind} record belongs to run {short(body.get('run'))}, not {run!r}")
    if fields is not None and set(body) != {"kind", "run", *fields}:
        raise RecordRejected(f"{kind} record has fields {short(sorted(map(str, body)))}, expected {sorted(fields)}")
    return SignedRecord(peer_id, public_key, body)


def short(value: object) -> str:
    """``repr`` cut to 80 characters: what a reason may quote of someone else's bytes."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def require(body: dict[str, Any], key: str, typ: type | tuple[type, ...], kind: str) -> Any:
    """A field of a verified body, of exactly the given type (no coercion; bool is not int)."""
    value = body.get(key)
    if isinstance(value, bool) and typ is not bool and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise RecordRejected(f"{kind} record field {key!r} must be {typ}, got a bool")
    if not isinstance(value, typ):
        raise RecordRejected(f"{kind} record field {key!r} must be {typ}, got {type(value).__name__}")
    return value
