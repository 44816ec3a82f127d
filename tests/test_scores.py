"""Score records: signing, strict parsing, and the multi-validator combine rule."""

from __future__ import annotations

import pytest

from protocol.errors import RecordRejected
from protocol.identity import Identity
from protocol.paths import score_key
from protocol.records import sign_record
from protocol.scores import (
    PeerScore,
    combine,
    make_score_record,
    read_score_record,
    read_scores,
)
from protocol.stores.memory import MemoryStore

RUN = "test@0123456789abcdef"
V = [Identity.from_seed(f"validator-{i}".encode()) for i in range(3)]
TRUSTED = [v.public_key.hex() for v in V]
P = [Identity.from_seed(f"peer-{i}".encode()).peer_id for i in range(4)]


def scores(**overrides: tuple[float, bool]) -> dict[str, PeerScore]:
    table = {P[0]: (0.9, True), P[1]: (0.8, True), P[2]: (0.1, False)}
    table.update({P[int(k[1:])]: v for k, v in overrides.items()})
    return {p: PeerScore(w, inc, components={"gain_unassigned": 0.01, "mu": 25.0}) for p, (w, inc) in table.items()}


def record(i: int, window: int = 7, **overrides: tuple[float, bool]):
    return read_score_record(make_score_record(V[i], RUN, window, scores(**overrides)), RUN, TRUSTED)


def test_record_round_trips_with_signer_and_components():
    rec = record(0)
    assert rec.validator == V[0].peer_id and rec.window == 7
    assert rec.included == {P[0], P[1]}
    assert rec.peers[P[0]] == PeerScore(0.9, True, components={"gain_unassigned": 0.01, "mu": 25.0})


def test_record_signed_by_untrusted_key_is_refused():
    data = make_score_record(Identity.from_seed(b"mallory"), RUN, 7, scores())
    with pytest.raises(RecordRejected, match="not a trusted validator"):
        read_score_record(data, RUN, TRUSTED)


def test_record_from_other_run_is_refused():
    data = make_score_record(V[0], "other@0000000000000000", 7, scores())
    with pytest.raises(RecordRejected, match="belongs to run"):
        read_score_record(data, RUN, TRUSTED)


def test_tampered_record_is_refused():
    data = bytearray(make_score_record(V[0], RUN, 7, scores()))
    data[20] ^= 1
    with pytest.raises(RecordRejected, match="signature"):
        read_score_record(bytes(data), RUN, TRUSTED)


def _signed_body(body: dict) -> bytes:
    return sign_record(V[0], "scores", RUN, body)


GOOD_ENTRY = {"weight": 0.5, "included": True, "standing": False, "components": {"mu": 1.0}}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"window": 7.0, "peers": {}}, "window"),
        ({"window": True, "peers": {}}, "bool"),
        ({"window": -1, "peers": {}}, ">= 0"),
        ({"window": 7, "peers": []}, "peers"),
        ({"window": 7, "peers": {}, "extra": 1}, "has fields"),
        ({"window": 7, "peers": {"not-a-peer-id": GOOD_ENTRY}}, "invalid peer id"),
        ({"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "weight": 1}}}, "weight"),
        ({"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "weight": 1.5}}}, r"\[0, 1\]"),
        ({"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "weight": float("nan")}}}, r"\[0, 1\]"),
        ({"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "included": 1}}}, "included"),
        ({"window": 7, "peers": {P[0]: {"weight": 0.5, "included": True}}}, "exactly"),
        ({"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "components": {"mu": 1}}}}, "finite float"),
        ({"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "components": {"mu": float("inf")}}}}, "finite float"),
        ({"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "components": {"Bad Name": 1.0}}}}, "component name"),
        (
            {"window": 7, "peers": {P[0]: {**GOOD_ENTRY, "components": {f"c{i}": 1.0 for i in range(17)}}}},
            "over the cap",
        ),
    ],
)
def test_schema_violations_are_refused(body: dict, match: str):
    with pytest.raises(RecordRejected, match=match):
        read_score_record(_signed_body(body), RUN, TRUSTED)


def test_truncated_record_is_refused():
    data = _signed_body({"window": 7, "peers": {}})
    with pytest.raises(RecordRejected, match="length"):
        read_score_record(data[:-1], RUN, TRUSTED)


def test_combine_without_a_majority_of_all_trusted_validators_is_unusable():
    assert combine([], TRUSTED) is None
    assert combine([record(0)], TRUSTED) is None  # one of three published: a fast minority decides nothing
    assert combine([record(0), record(1)], TRUSTED) is not None


def test_combine_takes_median_weight_and_majority_of_all_trusted_inclusion():
    out = combine([record(0), record(1, p1=(0.4, False)), record(2, p1=(0.6, True))], TRUSTED)
    assert out.allowed == {P[0]: 0.9, P[1]: 0.6}


def test_one_dishonest_validator_among_three_cannot_admit_or_exclude():
    # The dishonest validator excludes honest P0 and admits bad P2 with full weight.
    evil = record(2, p0=(0.0, False), p2=(1.0, True), p3=(1.0, True))
    out = combine([record(0), record(1), evil], TRUSTED)
    assert set(out.allowed) == {P[0], P[1]}
    assert out.allowed[P[0]] == 0.9 and out.allowed[P[1]] == 0.8


def test_a_peer_needs_more_than_half_of_all_trusted_validators_not_of_those_who_published():
    rec0 = record(0)
    rec1 = read_score_record(make_score_record(V[1], RUN, 7, {P[0]: PeerScore(0.7, True)}), RUN, TRUSTED)
    out = combine([rec0, rec1], TRUSTED)
    # P1 is included by one of the three trusted validators: not more than half of all.
    assert out.allowed == {P[0]: pytest.approx(0.7)}  # median of 0.9, 0.7 and 0 for the silent one


def test_standing_needs_a_majority_too():
    standing = {p: PeerScore(0.9, True, standing=True) for p in P[:2]}
    records = [read_score_record(make_score_record(V[i], RUN, 7, standing), RUN, TRUSTED) for i in range(2)]
    assert combine(records, TRUSTED).standing == frozenset(P[:2])
    records[1] = record(1)  # standing=False from the second validator
    assert combine(records, TRUSTED).standing == frozenset()


def test_combine_refuses_a_record_of_an_untrusted_key():
    with pytest.raises(ValueError, match="trusted"):
        combine([record(0), record(1)], TRUSTED[:1])


def test_read_scores_reads_only_trusted_validators_keys_and_skips_bad_records():
    store = MemoryStore()
    assert read_scores(store, RUN, 7, TRUSTED) == []
    for i in range(3):
        store.put(score_key(7, V[i].peer_id), make_score_record(V[i], RUN, 7, scores()))
    # Junk, an untrusted signer, and a record under another validator's key are ignored.
    store.put("scores/000007/junk.lsr", b"garbage")
    mallory = Identity.from_seed(b"mallory")
    store.put(score_key(7, mallory.peer_id), make_score_record(mallory, RUN, 7, scores(p2=(1.0, True))))
    assert {r.validator for r in read_scores(store, RUN, 7, TRUSTED)} == {v.peer_id for v in V}
    assert set(combine(read_scores(store, RUN, 7, TRUSTED), TRUSTED).allowed) == {P[0], P[1]}


def test_record_under_another_validators_key_or_window_is_ignored():
    store = MemoryStore()
    store.put(score_key(7, V[1].peer_id), make_score_record(V[0], RUN, 7, scores()))
    store.put(score_key(7, V[2].peer_id), make_score_record(V[2], RUN, 6, scores()))
    assert read_scores(store, RUN, 7, TRUSTED) == []
