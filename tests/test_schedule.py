"""The schedule every replica computes alike from the run's decisions: deadlines that adapt."""

from __future__ import annotations

import pytest

from node.accounting import Accounting
from node.exchange import Exchange
from node.follow import Follower
from node.replica import Replica
from protocol.consensus import CloseValue, Decision
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores.memory import MemoryStore


def follower(closes: list[float], **run) -> Follower:
    manifest = Manifest().replace(run__genesis=1000.0, run__window_seconds=60.0,
                                  run__peers=(Identity.from_seed(b"s").public_key.hex(),), **run)
    store = MemoryStore()
    f = Follower(manifest, store, Exchange(store, Identity.from_seed(b"f"), manifest.run_key, Accounting()),
                 Replica({}, len(closes)), {})
    for w, t in enumerate(closes):
        f.applied(Decision(w, CloseValue(b"\0" * 32, t, -1, (), ()), 0, frozenset()))
    return f


def test_window_zero_closes_window_seconds_after_genesis():
    assert follower([]).deadline(0) == 1060.0


def test_the_deadline_follows_the_median_of_recent_windows():
    f = follower([1050.0, 1060.0, 1071.0, 1080.0, 1091.0, 1100.0])  # lengths 10, 11, 9, 11, 9
    assert f.window_length(6) == pytest.approx(2 * 10.0)
    assert f.deadline(6) == pytest.approx(1100.0 + 20.0)


def test_adaptation_is_bounded_by_the_manifest_and_can_be_turned_off():
    fast = [1000.0 + i for i in range(6)]  # 1 s windows
    assert follower(fast).window_length(6) == 5.0  # min_window_seconds
    slow = [1000.0 + 50 * i for i in range(6)]
    assert follower(slow).window_length(6) == 60.0  # window_seconds
    assert follower(fast, run__deadline_factor=0.0).window_length(6) == 60.0


def test_without_three_known_lengths_the_manifest_deadline_holds():
    assert follower([1050.0, 1060.0, 1070.0]).window_length(3) == 60.0
