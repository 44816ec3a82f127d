"""What ``locoswarm peer`` shows, fed by the files a peer writes (progress.json, history.jsonl)."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from rich.console import Console

from locoswarm.peerview import HistoryTail, PeerView
from node.progress import History, write_progress

PEER = "0123456789abcdef01234567"


def progress(workdir: Path, window: int, phase: str, *, up: int, down: int) -> None:
    write_progress(workdir / "progress.json", {
        "peer": PEER, "phase": phase, "window": window, "digest": "ab" * 32,
        "origin": {"from": "checkpoint", "window": 4}, "replayed": 2,
        "accounting": {"bytes_up": up, "bytes_down": down, "seconds": {"compute": 3.0, "wait": 1.5}},
    })


def window_entry(window: int, *, counted: bool, up: int, down: int) -> dict:
    return {"window": window, "train_loss": 5.0 - 0.1 * window, "heldout_loss": 5.5 - 0.1 * window, "included": 3,
            "counted": counted, "payload_bytes": 23_000, "bytes_up": up, "bytes_down": down,
            "digest": f"{window:02d}" * 32, "time": time.time()}


def test_history_tail_reads_only_new_entries_of_this_session_and_survives_a_rewrite(tmp_path):
    history = History(tmp_path / "history.jsonl")
    history.append(window_entry(0, counted=True, up=1, down=1) | {"time": time.time() - 100})  # before we started
    tail = HistoryTail(tmp_path / "history.jsonl", since=time.time() - 1)
    assert tail.poll() == []
    history.append(window_entry(1, counted=True, up=2, down=2))
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"window": 2, "torn')  # a line being written
    assert [e["window"] for e in tail.poll()] == [1]
    history.truncate(before_window=2)  # a resumed peer rewrites its history
    history.append(window_entry(2, counted=False, up=3, down=3))
    tail.poll()
    assert [e["window"] for e in tail.entries] == [1, 2]


def test_plain_mode_logs_one_line_per_window_and_a_summary(tmp_path, caplog):
    out = io.StringIO()
    view = PeerView(tmp_path, console=Console(file=out, width=200), interval=0.05).start()
    assert not view.live
    history = History(tmp_path / "history.jsonl")
    with caplog.at_level(logging.INFO, logger="locoswarm.peer"):
        progress(tmp_path, 5, "train", up=40_000, down=80_000)
        history.append(window_entry(4, counted=True, up=20_000, down=40_000))
        history.append(window_entry(5, counted=False, up=40_000, down=80_000))
        logging.getLogger("node.closing").warning("window 5: voting against the proposal of round 0: %s", "late")
        deadline = time.time() + 10
        while len([r for r in caplog.records if r.name == "locoswarm.peer"]) < 2 and time.time() < deadline:
            time.sleep(0.05)
        view.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "locoswarm.peer"]
    assert lines[0].startswith("window 4: train loss 4.6000, held-out 5.1000, 3 payloads kept, ours counted")
    assert "window 5:" in lines[1] and "ours NOT counted" in lines[1] and "up 19.5 KiB, down 39.1 KiB" in lines[1]
    summary = out.getvalue()
    assert "trained windows 4-5 (2); our payload counted in 1 of 2" in summary
    assert "held-out loss 5.1000 -> 5.0000" in summary and "sent 39.1 KiB, received 78.1 KiB" in summary
    assert "1 warnings" in summary and "seconds per phase: compute 3.0, wait 1.5" in summary


def test_terminal_mode_shows_a_live_table_with_phase_losses_bytes_and_warnings(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    view = PeerView(tmp_path, console=console).start()
    try:
        assert view.live
        progress(tmp_path, 7, "wait", up=60_000, down=120_000)
        history = History(tmp_path / "history.jsonl")
        history.append(window_entry(6, counted=False, up=60_000, down=120_000))
        logging.getLogger("node.exchange").warning("window 6: waiting for a counted payload: %s", "run store: none")
        rendered = Console(file=io.StringIO(), width=120, record=True)
        rendered.print(view.render())
        text = rendered.export_text()
    finally:
        view.stop()
    assert "7: waiting for the window's decision" in text
    assert "train 4.4000   held-out 4.9000 (after window 6)" in text
    assert "up 58.6 KiB, down 117.2 KiB in total" in text
    assert "3 kept in window 6; ours NOT counted" in text
    assert "waiting for a counted payload: run store: none" in text
    assert "started from a checkpoint at window 4, 2 windows replayed" in text
    assert "trained window 6; our payload counted in 0 of 1" in out.getvalue()
    assert "held-out loss 4.9000\n" in out.getvalue()
    assert json.loads((tmp_path / "progress.json").read_text())["phase"] == "wait"


def test_before_the_peer_writes_anything_the_view_says_it_is_starting(tmp_path):
    view = PeerView(tmp_path / "not-yet", console=Console(file=io.StringIO()))
    rendered = Console(file=io.StringIO(), width=120, record=True)
    rendered.print(view.render())
    assert "starting: loading data and building the model" in rendered.export_text()
    assert view.summary()[-1] == "no window was trained in this session"
