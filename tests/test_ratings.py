"""Ratings: ranking over windows, provisional and absent peers, inclusion, persistence."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from protocol.errors import CheckpointError
from protocol.scores import PeerScore
from validator.ratings import RatingParams, Ratings

GOOD, BAD = ["good0", "good1", "good2"], ["bad0", "bad1", "bad2"]


def noisy_windows(ratings: Ratings, n: int, start: int = 0, seed: int = 0) -> None:
    rng = random.Random(seed)
    for w in range(start, start + n):
        # Good updates lower the loss by varying amounts; bad ones (noise) raise it a little.
        scores = {p: (0.5 + rng.gauss(0, 0.2) if p in GOOD else rng.gauss(-0.02, 0.02)) for p in GOOD + BAD}
        evidence = {p: 0.05 + rng.gauss(0, 0.02) for p in GOOD + BAD}
        ratings.update(w, scores, evidence=evidence)


def test_consistently_good_peers_rank_above_bad_after_a_few_windows():
    ratings = Ratings()
    noisy_windows(ratings, 12)
    assert min(ratings.weight(p) for p in GOOD) > max(ratings.weight(p) for p in BAD)
    assert all(ratings.included(p, True) for p in GOOD)
    assert not any(ratings.included(p, True) for p in BAD)


def test_new_peer_starts_provisional_and_is_included():
    ratings = Ratings()
    noisy_windows(ratings, 5)
    assert ratings.weight("newcomer") == RatingParams().provisional_weight
    assert ratings.included("newcomer", True)
    assert not ratings.included("newcomer", False)


def test_failed_peer_ranks_last_and_loses_weight():
    ratings = Ratings()
    for w in range(10):
        ratings.update(w, {p: 1.0 for p in GOOD}, failed=["cheat"])
    assert ratings.weight("cheat") < RatingParams().threshold < ratings.weight("good0")


def test_non_finite_score_ranks_last():
    ratings = Ratings()
    for w in range(6):
        ratings.update(w, {"a": 0.1, "b": 0.2, "nan": float("nan"), "inf": float("-inf"), "harm": -0.1})
    assert ratings.peers["nan"].mu < ratings.peers["a"].mu < ratings.peers["b"].mu
    assert ratings.peers["inf"].mu < ratings.peers["a"].mu
    assert ratings.peers["harm"].mu == ratings.peers["nan"].mu  # non-positive ties with non-finite


def test_peer_without_evidence_of_own_training_is_excluded():
    ratings = Ratings()
    for w in range(6):
        ratings.update(w, {"honest": 0.1, "lazy": 0.1, "x": 0.0}, evidence={"honest": 0.05, "lazy": -0.05})
    assert ratings.included("honest", True)
    assert not ratings.included("lazy", True)


def test_long_absent_peer_decays_and_its_sigma_grows():
    ratings = Ratings()
    noisy_windows(ratings, 8)
    before_w, before_sigma = ratings.weight("good0"), ratings.peers["good0"].sigma
    others = [p for p in GOOD + BAD if p != "good0"]
    for w in range(8, 14):
        ratings.update(w, {p: 1.0 if p in GOOD else 0.0 for p in others})
    assert ratings.peers["good0"].sigma > before_sigma
    assert ratings.weight("good0") < 0.5 * before_w
    assert ratings.weight("good0") < ratings.weight("good1")


def test_present_but_unsampled_peer_is_not_absent():
    ratings = Ratings()
    noisy_windows(ratings, 8)
    before = ratings.weight("good0")
    others = [p for p in GOOD + BAD if p != "good0"]
    for w in range(8, 14):
        ratings.update(w, {p: 1.0 if p in GOOD else 0.0 for p in others}, present=["good0"])
    assert ratings.weight("good0") == pytest.approx(before)


def test_windows_must_increase():
    ratings = Ratings()
    ratings.update(3, {"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="not after"):
        ratings.update(3, {"a": 1.0, "b": 0.0})


def test_save_load_round_trip_resumes_identically(tmp_path):
    a = Ratings()
    noisy_windows(a, 5)
    a.save(tmp_path / "r.json")
    b = Ratings.load(tmp_path / "r.json")
    assert b.window == a.window and b.peers == a.peers
    noisy_windows(a, 3, start=5, seed=9)
    noisy_windows(b, 3, start=5, seed=9)
    assert b.peers == a.peers
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps({"version": 99}), json.dumps({"version": 1, "window": 1, "peers": {"a": {"mu": 1.0}}}),
     json.dumps({"version": 1, "window": "7", "peers": {}}),
     json.dumps({"version": 1, "window": 1, "peers": {"a": {"mu": 1.0, "sigma": -1.0}}})],
)
def test_corrupt_state_file_is_a_checkpoint_error(tmp_path, content):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(CheckpointError):
        Ratings.load(tmp_path / "r.json")


def test_score_table_carries_weight_inclusion_and_components():
    ratings = Ratings()
    noisy_windows(ratings, 8)
    table = ratings.score_table({"good0": True, "bad0": True, "good1": False}, {"good0": {"score": 0.5, "x": float("nan")}})
    assert isinstance(table["good0"], PeerScore)
    assert table["good0"].included and not table["bad0"].included and not table["good1"].included
    assert table["good0"].components["score"] == 0.5 and "x" not in table["good0"].components
    assert {"mu", "sigma", "evidence_ema"} <= set(table["good0"].components)
    assert table["good0"].weight == ratings.weight("good0")


@pytest.mark.parametrize("reference", [None, {"good0", "good1", "good2"}])
def test_a_swarm_of_weak_keys_lowers_the_bar_only_without_a_reference(reference):
    """20 fresh keys whose updates barely help make a weak newcomer look typical, unless the
    relative floors are referenced to the peers with standing."""
    swarm = [f"sybil{i}" for i in range(20)]
    ratings = Ratings()
    scores = {**dict.fromkeys(GOOD, 1.0), **dict.fromkeys(swarm, 0.01), "weak": 0.1}
    evidence = {**dict.fromkeys(GOOD, 1.0), **dict.fromkeys(swarm, 0.01), "weak": 0.1}
    ratings.update(0, scores, evidence=evidence, reference=reference)
    assert ratings.included("good0", True)
    assert ratings.included("weak", True) is (reference is None)


def test_a_lone_peer_keeps_being_rated():
    """Alone in its windows, a helpful peer still climbs and a failing one still falls."""
    helpful, failing = Ratings(), Ratings()
    mus = []
    for w in range(7):
        helpful.update(w, {"solo": 0.3}, evidence={"solo": 0.05})
        failing.update(w, {}, failed=["solo"])
        mus.append(helpful.peers["solo"].mu)
    assert all(b > a for a, b in itertools.pairwise(mus)), mus
    assert helpful.weight("solo") > 0.5 > failing.weight("solo")
    assert helpful.peers["solo"].rated_windows == 7


def test_why_a_peer_is_not_included_is_said_in_words():
    ratings = Ratings()
    ratings.update(0, {"good": 0.3, "lazy": 0.3}, evidence={"good": 0.05, "lazy": -0.01})
    assert ratings.why_excluded("good", True) == "" and ratings.included("good", True)
    assert ratings.why_excluded("good", False) == "its payload failed a check"
    assert ratings.why_excluded("lazy", True).startswith("evidence average -0.01 is below 0")
    assert not ratings.included("lazy", True)
