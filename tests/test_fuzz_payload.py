"""Fuzzing the payload decoder: thousands of mutated payloads, and nothing but
``PayloadRejected`` (or a valid decode) ever comes out.

Unsigned mutations (bit flips, byte changes, truncation, extension, length fields) must all
be refused. Mutations re-signed with the right key reach the deep checks (schema, layout,
sections, indices); some of those are still valid payloads (a flipped code bit is a
different but well-formed update), which is fine as long as what decodes is well-formed.
"""

from __future__ import annotations

import math
import random
import struct
from collections import Counter
from typing import Any

import msgpack
import pytest

from protocol.errors import PayloadRejected
from protocol.wire import decode_payload, read_header
from tests.test_wire import (
    ALICE,
    expectation,
    forge,
    make_payload,
    random_tensors,
    split,
)

ROUNDS = 2600  # x 4 mutation families = 10,400 decodes

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, math.nan, math.inf, 1e300,
    "", "x" * 1000, "emb", b"", b"\x00" * 32, [], [1], [[]], {}, {"a": 1}, [0] * 10, list(range(10)),
]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One unsigned mutation of the raw object."""
    buf = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # flip one bit
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # change a few bytes
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 2:  # truncate
        del buf[rng.randrange(len(buf)) :]
    elif kind == 3:  # extend
        buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 4:  # header length field
        struct.pack_into(">I", buf, 6, rng.choice([0, 1, len(buf), 2**32 - 1, rng.randrange(len(buf) + 10)]))
    else:  # version / magic
        buf[rng.randrange(6)] = rng.randrange(256)
    return bytes(buf)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def edit_header(header: dict[str, Any], rng: random.Random) -> None:
    """Replace, nudge, delete or add one field anywhere in the header."""
    path = rng.choice(_paths(header))
    parent: Any = header
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    old = parent[last]
    kind = rng.randrange(4)
    if kind == 0 and type(old) is int:
        parent[last] = old + rng.choice([-2, -1, 1, 2, 64, -64, 1 << 20])
    elif kind == 1 and isinstance(parent, dict):
        del parent[last]
    elif kind == 2 and isinstance(parent, list):
        parent.append(rng.choice(HOSTILE_VALUES))
    else:
        parent[last] = rng.choice(HOSTILE_VALUES)


def mutate_body(body: bytes, rng: random.Random) -> bytes:
    buf = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def check(data: bytes, expect_rejection: bool) -> str:
    """Decode ``data``; return the refusal's class name, or "accepted" for a well-formed
    payload. Any exception other than PayloadRejected fails the test."""
    try:
        payload = decode_payload(data, EXPECT)
    except PayloadRejected as exc:
        assert exc.reason
        return type(exc).__name__
    assert not expect_rejection, "an unsigned mutation was accepted"
    for t in payload.tensors.values():
        assert t.idx.shape == t.codes.shape == (t.layout.n_chunks, t.layout.k)
        assert int(t.codes.max()) <= 3 and int(t.idx.max()) < t.layout.chunk_len
    return "accepted"


SHAPES = {"blocks.0.w": (16, 8), "blocks.0.norm": (10,), "emb": (1, 70)}
EXPECT = expectation(SHAPES)


@pytest.mark.timeout(120)
def test_mutated_payloads_only_ever_raise_payload_rejected() -> None:
    rng = random.Random(20261123)
    base = make_payload(random_tensors(SHAPES))
    assert check(base, expect_rejection=False) == "accepted"
    header, _ = split(base)
    outcomes: Counter[str] = Counter()
    for _ in range(ROUNDS):
        mutated = mutate_bytes(base, rng)
        outcomes[check(mutated, expect_rejection=mutated != base)] += 1  # a byte may be "changed" to itself
        outcomes[check(forge(base, edit_body=lambda body: mutate_body(body, rng)), expect_rejection=False)] += 1
        outcomes[check(forge(base, edit_header=lambda h: edit_header(h, rng)), expect_rejection=False)] += 1
        raw = bytearray(msgpack.packb(header, use_bin_type=True))
        raw[rng.randrange(len(raw))] = rng.randrange(256)  # msgpack-level damage, signed
        outcomes[check(forge(base, raw_header=bytes(raw)), expect_rejection=False)] += 1
    assert sum(outcomes.values()) >= 10_000
    # The signed mutations reached the deep checks, not only the signature.
    assert {"PayloadTooLarge", "BadSignature", "MalformedPayload", "LayoutMismatch"} <= set(outcomes)
    assert outcomes["accepted"] < ROUNDS * 1.5


def test_read_header_survives_signed_header_edits() -> None:
    rng = random.Random(7)
    base = make_payload(random_tensors(SHAPES))
    for _ in range(500):
        forged = forge(base, edit_header=lambda h: edit_header(h, rng))
        try:
            header, key = read_header(forged, max_bytes=1 << 20)
        except PayloadRejected:
            continue
        assert key == ALICE.public_key and header.peer_id == ALICE.peer_id
