"""Accounting: every second in exactly one phase, however phases nest or threads help."""

from __future__ import annotations

import threading
import time

import pytest

from node.accounting import PHASES, Accounting


def test_a_nested_phase_is_not_counted_twice():
    acct = Accounting()
    t0 = time.perf_counter()
    with acct.phase("wait"):
        time.sleep(0.05)
        with acct.phase("download"):
            time.sleep(0.1)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    assert acct.seconds["download"] == pytest.approx(0.1, abs=0.04)
    assert acct.seconds["wait"] == pytest.approx(0.1, abs=0.04)
    assert sum(acct.seconds.values()) == pytest.approx(wall, abs=1e-3)  # nothing twice, nothing lost


def test_helper_threads_run_inside_their_callers_phase():
    acct = Accounting()

    def helper() -> None:
        with acct.phase("download"):  # not the owner: charged to the caller's phase
            time.sleep(0.05)

    with acct.phase("aggregate"):
        threads = [threading.Thread(target=helper) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert acct.seconds["download"] == 0.0
    assert acct.seconds["aggregate"] >= 0.05


def test_totals_survive_a_restart_and_unknown_phases_are_refused():
    acct = Accounting(tokens=5, bytes_up=7)
    with acct.phase("save"):
        pass
    again = Accounting()
    again.restore(acct.to_dict() | {"seconds": acct.to_dict()["seconds"] | {"gone": 3.0}})
    assert again.tokens == 5 and again.bytes_up == 7 and set(again.seconds) == set(PHASES)
    with pytest.raises(ValueError, match="unknown phase"), again.phase("lunch"):
        pass
