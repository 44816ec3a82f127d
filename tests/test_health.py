"""``locoswarm health``: the container healthcheck judges a workdir by how fresh its files are."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from locoswarm.cli import main
from locoswarm.health import check

NOW = 1_800_000_000.0
"""The checks below pass this clock; files get mtimes relative to it."""


def _write(path: Path, text: str, *, age: float, now: float = NOW) -> None:
    path.write_text(text)
    os.utime(path, (now - age, now - age))


def _progress(window: int, phase: str) -> str:
    return json.dumps({"peer": "abc", "pid": 1, "phase": phase, "window": window, "digest": "00"})


def test_empty_workdir_is_unhealthy_and_says_nothing_started(tmp_path):
    healthy, reason = check(tmp_path, 900, now=NOW)
    assert not healthy
    assert "nothing has started" in reason and str(tmp_path) in reason


def test_peer_that_wrote_progress_recently_is_healthy_and_reports_its_phase(tmp_path):
    _write(tmp_path / "progress.json", _progress(7, "wait"), age=5)
    healthy, reason = check(tmp_path, 60, now=NOW)
    assert healthy
    assert "progress.json" in reason and "window 7" in reason and "phase wait" in reason


def test_peer_silent_for_longer_than_max_age_is_unhealthy(tmp_path):
    _write(tmp_path / "progress.json", _progress(7, "train"), age=120)
    healthy, reason = check(tmp_path, 60, now=NOW)
    assert not healthy
    assert "120s ago" in reason and "--max-age 60s" in reason


def test_validator_is_judged_by_its_newest_file(tmp_path):
    # The dashboard URL is written once at start; the state after every scored window.
    _write(tmp_path / "dashboard.url", "http://127.0.0.1:8080/", age=3600)
    _write(tmp_path / "state.safetensors", "x", age=10)
    healthy, reason = check(tmp_path, 60, now=NOW)
    assert healthy and "state.safetensors" in reason
    _write(tmp_path / "state.safetensors", "x", age=600)
    assert not check(tmp_path, 60, now=NOW)[0]


def test_validator_that_just_started_is_healthy_before_its_first_window(tmp_path):
    _write(tmp_path / "dashboard.url", "http://127.0.0.1:8080/", age=1)
    assert check(tmp_path, 60, now=NOW) == (True, f"{tmp_path}: dashboard.url written 1s ago")


def test_a_clock_step_backwards_does_not_read_as_stale(tmp_path):
    _write(tmp_path / "progress.json", _progress(0, "train"), age=-300)
    assert check(tmp_path, 60, now=NOW)[0]


def test_unreadable_progress_still_counts_by_its_age(tmp_path):
    _write(tmp_path / "progress.json", "{not json", age=2)
    assert check(tmp_path, 60, now=NOW) == (True, f"{tmp_path}: progress.json written 2s ago")


def test_cli_exit_status_and_one_line_verdict(tmp_path, capsys):
    _write(tmp_path / "progress.json", _progress(3, "aggregate"), age=1, now=time.time())
    assert main(["health", "--workdir", str(tmp_path), "--max-age", "30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and out.count("\n") == 1
    assert main(["health", "--workdir", str(tmp_path), "--max-age", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("unhealthy: ") and err.count("\n") == 1
