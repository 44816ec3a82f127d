"""``locoswarm bench window`` at the smallest size: the window it measures is a real one."""

from __future__ import annotations

import argparse

import torch

from bench.window import measure


def test_every_simulated_peer_is_counted_and_every_phase_is_reported(tmp_path):
    torch.set_num_threads(1)
    args = argparse.Namespace(peers=4, steps=1, windows=1, batch_size=2, seq_len=16, eval=False, device="cpu")
    out = measure(tmp_path, "tiny", args)
    assert out["included_last_window"] == 4  # simulated payloads are valid, each signed by its own key
    phases = out["seconds_per_phase"]
    assert phases["compute"] > 0 and phases["aggregate"] > 0 and phases["eval"] == 0
    assert out["overhead_seconds"] == round(sum(v for k, v in phases.items() if k not in ("compute", "wall")), 4)
    assert 0 < out["aggregate_memory_over_model"] < 2
