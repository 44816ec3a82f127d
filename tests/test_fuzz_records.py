"""Fuzzing every record kind a process reads from others, as the payload decoder is fuzzed:
announcements, validator scores, proposals, votes, decisions, p2p object records, checkpoint
metadata, the data index and the manifest.

Four mutation families per kind: unsigned byte damage (always refused: the signature no
longer holds), signed field edits (a field replaced, deleted or added anywhere in the body,
re-signed with the right key, so the strict parsers are reached), signed msgpack damage, and
a repeated map key (always refused). The only way out of a reader is its typed refusal or a
well-formed record.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch

from node.checkpoint import fetch_checkpoint, meta_key, publish_checkpoint
from protocol.announce import Announcement, make_announcement, read_announcement
from protocol.consensus import (
    PRECOMMIT,
    CloseValue,
    Decision,
    Included,
    Proposal,
    Vote,
    read_decision,
    read_proposal,
    read_vote,
    sign_decision,
    sign_proposal,
    sign_vote,
)
from protocol.dataindex import DataIndex
from protocol.errors import (
    CheckpointError,
    IntegrityError,
    ManifestError,
    RecordRejected,
)
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.paths import payload_key
from protocol.records import sign_record
from protocol.scores import PeerScore, ScoreRecord, make_score_record, read_score_record
from protocol.stores.memory import MemoryStore
from protocol.stores.p2p import KIND as OBJECT_KIND
from protocol.stores.p2p import ObjectRecord, parse_record
from tests.test_fuzz_payload import HOSTILE_VALUES, edit_header, mutate_bytes

ROUNDS = 400  # x 4 families x 7 signed kinds, plus the JSON and TOML kinds
RUN = "fuzz@00112233445566778899aabb"
WINDOW = 3
KEYS = [Identity.from_seed(f"fuzz closer {i}".encode()) for i in range(3)]
CLOSERS = [k.public_key.hex() for k in KEYS]
SIGNER = KEYS[0]
HOSTILE = [*HOSTILE_VALUES, "<script>alert(1)</script>", "line\n2026-01-01 INFO forged", "0" * 24 + "\n",
           "A" * 24, b"\xff" * 64, 1.5, -1.5]

VALUE = CloseValue(b"\x01" * 32, 1_800_000_000.0, 2, (KEYS[2].peer_id,), tuple(
    Included(k.peer_id, f"{i:064x}", 1000 + i, i == 0) for i, k in enumerate(sorted(KEYS, key=lambda k: k.peer_id))))


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    valid: bytes
    read: Callable[[bytes], Any]
    result: type


def _kinds() -> list[Kind]:
    precommits = [sign_vote(k, RUN, PRECOMMIT, WINDOW, 1, VALUE.id) for k in KEYS]
    scores = {k.peer_id: PeerScore(0.5 + i / 10, True, standing=i == 0, components={"score": 0.1 * i}) for i, k in enumerate(KEYS)}
    owner = Identity.from_seed(b"fuzz owner")
    key = payload_key(WINDOW, owner.peer_id)
    return [
        Kind("announce", make_announcement(SIGNER, RUN, WINDOW, payload_key(WINDOW, SIGNER.peer_id),
                                           "https://example.org/p.lsp", "ab" * 32, 1234),
             lambda d: read_announcement(d, RUN), Announcement),
        Kind("scores", make_score_record(SIGNER, RUN, WINDOW, scores),
             lambda d: read_score_record(d, RUN, [SIGNER.public_key.hex()]), ScoreRecord),
        Kind("proposal", sign_proposal(SIGNER, RUN, WINDOW, 1, VALUE, 0),
             lambda d: read_proposal(d, run=RUN, window=WINDOW, closers=CLOSERS), Proposal),
        Kind("precommit", precommits[0],
             lambda d: read_vote(d, run=RUN, kind=PRECOMMIT, window=WINDOW, closers=CLOSERS), Vote),
        Kind("decision", sign_decision(SIGNER, RUN, WINDOW, VALUE, precommits[:2]),
             lambda d: read_decision(d, run=RUN, window=WINDOW, closers=CLOSERS, quorum=2), Decision),
        Kind("p2p object", sign_record(owner, OBJECT_KIND, RUN, {
            "key": key, "sha256": "cd" * 32, "size": 99, "holder": "QmHolder", "addrs": ["/ip4/127.0.0.1/tcp/1"],
            "created_at": 1_800_000_000.0, "deleted": False}), lambda d: parse_record(d, RUN), ObjectRecord),
    ]


KINDS = _kinds()
SIGNERS = {"p2p object": Identity.from_seed(b"fuzz owner")}


def split_record(data: bytes) -> tuple[bytes, bytes]:
    """(msgpack body, public key) of a signed record."""
    (n,) = struct.unpack(">I", data[4:8])
    return data[8 : 8 + n], data[8 + n : 8 + n + 32]


def resign(identity: Identity, body: bytes) -> bytes:
    head = b"LSR1" + struct.pack(">I", len(body)) + body
    return head + identity.public_key + identity.sign(head)


def repeat_a_key(body: bytes, rng: random.Random) -> bytes:
    """The same map with one key written twice (msgpack keeps the last; others the first)."""
    parsed = msgpack.unpackb(body, raw=False)
    assert body[0] & 0xF0 == 0x80, "bodies are small fixmaps"
    key = rng.choice(sorted(parsed))
    return bytes([0x80 | (len(parsed) + 1)]) + body[1:] + msgpack.packb(key) + msgpack.packb(rng.choice(HOSTILE))


def outcome(kind: Kind, data: bytes) -> str:
    """The refusal's class, or "accepted" for a well-formed record; anything else fails."""
    try:
        got = kind.read(data)
    except RecordRejected as exc:
        assert 0 < len(str(exc)) < 400, str(exc)[:400]
        return type(exc).__name__
    assert isinstance(got, kind.result)
    return "accepted"


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_mutated_records_only_ever_raise_record_rejected(kind: Kind) -> None:
    rng = random.Random(f"records {kind.name}")
    signer = SIGNERS.get(kind.name, SIGNER)
    assert outcome(kind, kind.valid) == "accepted"
    body, _ = split_record(kind.valid)
    parsed = msgpack.unpackb(body, raw=False)
    seen: Counter[str] = Counter()
    for _ in range(ROUNDS):
        mutated = mutate_bytes(kind.valid, rng)
        result = outcome(kind, mutated)
        assert result != "accepted" or mutated == kind.valid, "an unsigned mutation was accepted"
        edited: dict[str, Any] = msgpack.unpackb(body, raw=False)
        edit_header(edited, rng)
        seen[outcome(kind, resign(signer, msgpack.packb(edited, use_bin_type=True)))] += 1
        damaged = bytearray(body)
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        seen[outcome(kind, resign(signer, bytes(damaged)))] += 1
        assert outcome(kind, resign(signer, repeat_a_key(body, rng))) != "accepted", "a repeated key was accepted"
    assert parsed["kind"] and seen["RecordRejected"] > ROUNDS // 2  # the strict parsers were reached


def test_every_field_is_checked_not_only_the_signature() -> None:
    """Each top-level field of each kind, replaced by each hostile value of another type and
    re-signed, is refused: types are never coerced, whoever signed."""
    for kind in KINDS:
        signer = SIGNERS.get(kind.name, SIGNER)
        body = msgpack.unpackb(split_record(kind.valid)[0], raw=False)
        for field, original in body.items():
            for value in HOSTILE:
                if _family(value) == _family(original):
                    continue  # e.g. another int: the record's own rules decide
                edited = {**body, field: value}
                result = outcome(kind, resign(signer, msgpack.packb(edited, use_bin_type=True)))
                assert result != "accepted", f"{kind.name}.{field} accepted {value!r:.60}"


def _family(value: object) -> str:
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


# ---------------------------------------------------------------------------- JSON and TOML


SHAPES = {"w": (4, 3), "b": (5,)}


def test_mutated_checkpoint_metadata_only_raises_checkpoint_error(tmp_path) -> None:
    rng = random.Random("checkpoint meta")
    store = MemoryStore()
    weights = {n: torch.randn(s, generator=torch.Generator().manual_seed(1)) for n, s in SHAPES.items()}
    digest = publish_checkpoint(store, WINDOW, weights, tmp_path)
    valid = store.get(meta_key(WINDOW, digest))
    seen: Counter[str] = Counter()
    for _ in range(ROUNDS * 2):
        store.put(meta_key(WINDOW, digest), _mutate_json(valid, rng))
        try:
            got = fetch_checkpoint(store, WINDOW, digest, SHAPES)
            assert all(torch.equal(got[n], weights[n]) for n in SHAPES)
            seen["accepted"] += 1
        except CheckpointError as exc:
            seen[str(exc).split(" is ")[-1][:20]] += 1
    assert seen["accepted"] < ROUNDS


def test_mutated_data_index_only_raises_integrity_error() -> None:
    rng = random.Random("data index")
    valid = DataIndex("ab" * 32, (("data/shard-0000.npy", "cd" * 32, 1000),), 10, 9, 1, 64, 512, 0, "fuzz").to_json()
    accepted = 0
    for _ in range(ROUNDS * 2):
        try:
            DataIndex.from_json(_mutate_json(valid, rng))
            accepted += 1
        except IntegrityError as exc:
            assert len(str(exc)) < 600
    assert accepted < ROUNDS


def test_mutated_manifests_only_raise_manifest_error(tmp_path) -> None:
    from tests.network import small_manifest

    rng = random.Random("manifest")
    valid = small_manifest().to_toml().encode()
    accepted = 0
    for _ in range(ROUNDS):
        buf = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] = rng.choice(b"0123456789.-=[]\"'\n abcxyz\xff")
        try:
            Manifest.from_bytes(bytes(buf))
            accepted += 1
        except ManifestError:
            pass
    assert accepted < ROUNDS


def _mutate_json(valid: bytes, rng: random.Random) -> bytes:
    """Byte damage, a JSON value edit, a repeated key, or deep nesting."""
    import json

    family = rng.randrange(4)
    if family == 0:
        return mutate_bytes(valid, rng)
    if family == 1:
        doc = json.loads(valid)
        edit_header(doc, rng)
        return json.dumps(doc, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)).encode()
    if family == 2:
        return valid[:-1] + b', "' + rng.choice(sorted(json.loads(valid))).encode() + b'": 1}'
    return b"[" * rng.choice([10, 1000, 100_000]) + b"]" * 3
