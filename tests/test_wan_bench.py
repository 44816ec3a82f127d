"""bench.wan and its parts: the skip and missing-dependency lines, per-window seconds read
from a peer's own progress snapshots, the summaries, the projection arithmetic, the dense
baseline's decoding; and (slow, root) a short real run of overlapped peers with a slow link.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import wan, wan_projection
from bench.netns import netns_available
from bench.wan_dense import load_dense_payload
from bench.wan_peers import Mark, Timeline, window_rows
from node.accounting import PHASES
from node.progress import write_progress
from tests.network import REPO


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    wan.add_arguments(parser)
    return parser.parse_args(["--json", *argv])


def _last_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_prints_a_skip_line_when_namespaces_are_unavailable(monkeypatch, capsys):
    monkeypatch.setattr(wan, "netns_available", lambda: "needs root")
    assert wan.run(_args("--windows", "4")) == 0
    line = _last_line(capsys)
    assert line["skipped"] is True and line["reason"] == "needs root"


def test_too_few_windows_for_a_steady_one_is_refused_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setattr(wan, "netns_available", lambda: pytest.fail("went on with too few windows"))
    assert wan.run(_args("--windows", "3", "--skip", "2")) == 1  # windows 0..2; 2 has no next one to end it
    assert "--windows >= --skip + 2" in _last_line(capsys)["error"]
    assert wan.run(_args("--methods", "sparseloco,bogus")) == 1
    assert "unknown methods ['bogus', 'sparseloco']" in _last_line(capsys)["error"]


def test_without_moto_the_bench_names_the_package_and_the_install_command_before_starting(monkeypatch, capsys):
    real = wan.importlib.util.find_spec
    monkeypatch.setattr(wan.importlib.util, "find_spec", lambda name, *a: None if name == "moto" else real(name, *a))

    def must_not_run() -> str:
        raise AssertionError("the bench went on to build namespaces without its S3 server")

    monkeypatch.setattr(wan, "netns_available", must_not_run)
    assert wan.run(_args()) == 1
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    for needed in ("moto[server]", "pip install -e '.[bench]'", "missing module(s): moto"):
        assert needed in line["error"] and needed in captured.err


def test_the_bench_extra_declares_moto():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("moto[server]") for dep in extras["bench"])


def _snapshot(workdir, phase: str, window: int, seconds: dict[str, float], background: float = 0.0) -> None:
    acct = {"seconds": dict.fromkeys(PHASES, 0.0) | seconds, "background": background}
    write_progress(workdir / "progress.json", {"phase": phase, "window": window, "accounting": acct})


def test_a_window_is_the_difference_of_two_snapshots_taken_when_training_starts(tmp_path):
    timeline = Timeline(tmp_path)
    timeline.poll()  # no progress file yet
    assert timeline.marks == {}
    _snapshot(tmp_path, "train", 0, {"compute": 0.0})
    timeline.poll()
    _snapshot(tmp_path, "publish", 0, {"compute": 9.0})  # not a window start
    timeline.poll()
    time.sleep(0.05)
    _snapshot(tmp_path, "train", 1, {"compute": 10.0, "encode": 0.5, "wait": 1.0}, background=3.0)
    timeline.poll()
    timeline.poll()  # the same snapshot twice: the first one counts
    assert sorted(timeline.marks) == [0, 1]
    (row,) = timeline.rows()
    assert row["window"] == 0 and row["compute"] == 10.0 and row["encode"] == 0.5 and row["background"] == 3.0
    assert row["wall"] == pytest.approx(timeline.marks[1].at - timeline.marks[0].at)
    assert row["other"] == pytest.approx(row["wall"] - 11.5)


def test_window_rows_skip_a_window_whose_end_was_not_seen():
    zero = dict.fromkeys(PHASES, 0.0)
    marks = {0: Mark(0, 100.0, zero, 0.0), 1: Mark(1, 110.0, zero | {"compute": 9.0}, 2.0),
             3: Mark(3, 140.0, zero | {"compute": 30.0}, 5.0)}
    rows = window_rows(marks)
    assert [r["window"] for r in rows] == [0]
    assert rows[0]["wall"] == 10.0 and rows[0]["other"] == 1.0


def _peer_rows(walls: dict[int, float], compute: float) -> list[dict]:
    return [{"window": w, "wall": wall, "compute": compute, **dict.fromkeys([p for p in PHASES if p != "compute"], 0.0),
             "background": 0.0, "other": wall - compute} for w, wall in walls.items()]


def test_summaries_use_only_steady_windows_and_catch_a_forked_replica():
    manifest = wan.bench_manifest("sparseloco_overlap", 40)
    rows = [_peer_rows({0: 50.0, 1: 10.0, 2: 10.0}, 9.0) for _ in range(3)]
    same = [[{"window": w, "included": 3, "digest": f"d{w}", "payload_bytes": 100} for w in range(3)]] * 3
    line = wan.summarize_peers("sparseloco_overlap", rows, same, [1, 2], inner_steps=40, manifest=manifest)
    assert line["compute_utilization"] == 0.9 and line["samples"] == 6 and line["replicas_identical"] is True
    assert line["product"] is True and line["overlap"] is True
    assert line["seconds_per_window_mean"]["other"] == 1.0 and line["where_the_rest_goes"] == {"other": 1.0}
    forked = [same[0], same[1], [*same[2][:2], {"window": 2, "included": 3, "digest": "other", "payload_bytes": 100}]]
    assert wan.summarize_peers("x", rows, forked, [1, 2], inner_steps=40, manifest=manifest)["replicas_identical"] is False


def test_the_dense_line_says_it_is_the_baseline_not_the_product():
    rows = [{"window": w, "peer": p, "payload_bytes": 8, "digest": f"d{w}", "wall": 20.0, "compute": 5.0,
             "codec": 0.0, "upload": 1.0, "wait": 10.0, "download": 4.0, "aggregate": 0.0}
            for w in range(3) for p in range(3)]
    line = wan.summarize_dense(rows, [1, 2], inner_steps=40, seq_len=128, batch=8)
    assert line["baseline"] is True and line["product"] is False and "BASELINE" in line["runs"]
    assert line["compute_utilization"] == 0.25 and line["replicas_identical"] is True


def test_overlapped_utilization_hides_the_exchange_but_not_the_upload():
    u = wan_projection.overlapped_utilization
    assert u(100.0, 0.0, 50.0) == 1.0  # everything hidden
    assert u(100.0, 5.0, 50.0) == pytest.approx(100 / 105)  # the upload is on the training path
    assert u(10.0, 0.0, 40.0) == 0.25  # the exchange outlasts the compute
    assert wan_projection.serial_utilization(30.0, 10.0) == 0.75
    for upload, hidden in ((1.0, 10.0), (0.1, 10.0), (0.0, 10.0), (3.0, 0.0)):
        c = wan_projection.compute_for_goal(0.97, upload, hidden)
        assert u(c, upload, hidden) == pytest.approx(0.97)
        assert u(c * 0.99, upload, hidden) < 0.97  # and no less compute would do


def test_a_projection_row_by_hand():
    # 1e9 parameters, 1e8-byte payloads, 100 Mbit/s = 12.5e6 B/s, 20 peers:
    # upload 8 s, download 19 x 8 = 152 s, aggregate (assumed) 1 s.
    r = wan_projection.row("x", 10**9, 1e8, 100.0, peers=20)
    assert (r["upload_s"], r["download_s"], r["aggregate_s_assumed"]) == (8.0, 152.0, 1.0)
    assert r["sparseloco_bits_per_param"] == 0.8 and r["compression_vs_fp32"] == 40.0
    assert r["overlap_compute_s_for_goal"] == round(0.97 * 161, 1)  # the whole exchange hidden
    assert "all_hidden_compute_s_for_goal" not in r
    assert r["serial_compute_s_for_goal"] == round(0.97 / 0.03 * 161, 1)
    assert r["overlap_utilization_at_reference_compute"] == 1.0  # 161 s of exchange under 1200 s of compute
    assert r["serial_utilization_at_reference_compute"] == round(1200 / 1361, 4)
    assert r["dense_serial_utilization_at_reference_compute"] == round(1200 / (1200 + 20 * 4e9 / 12.5e6 + 1), 4)


def test_projected_section_bytes_equal_those_of_a_real_encoded_payload():
    from node.model import build_model, param_shapes
    from protocol.codec import ErrorFeedback
    from protocol.codec_types import model_layout
    from protocol.identity import Identity
    from protocol.manifest import CodecConfig, ModelConfig
    from protocol.wire import encode_payload, read_header

    shapes = param_shapes(build_model(ModelConfig(preset="tiny"), wan_projection.TINY_VOCAB,
                                      wan_projection.TINY_SEQ_LEN, 0))
    layouts = model_layout(shapes, CodecConfig())
    gen = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    blob = encode_payload(run="r", window=0, base_digest=bytes(32), tokens=0,
                          tensors=ErrorFeedback(layouts, CodecConfig()).compress(delta), codec=CodecConfig(),
                          identity=Identity.from_seed(b"t"))
    header, _ = read_header(blob, max_bytes=len(blob))
    assert wan_projection.sparseloco_section_bytes(shapes) == sum(e.section_bytes for e in header.tensors)
    assert 0 < wan_projection.tiny_overhead_per_tensor(len(blob)) < 200


def test_dense_payload_of_wrong_shape_or_garbage_is_rejected():
    from safetensors.torch import save

    from protocol.errors import LayoutMismatch, MalformedPayload, NonFinite

    shapes = {"w": (2, 3)}
    assert load_dense_payload("p", save({"w": torch.ones(2, 3)}), shapes)["w"].sum() == 6
    with pytest.raises(LayoutMismatch, match="want float32"):
        load_dense_payload("p", save({"w": torch.ones(3, 2)}), shapes)
    with pytest.raises(LayoutMismatch, match="differ"):
        load_dense_payload("p", save({"v": torch.ones(2, 3)}), shapes)
    with pytest.raises(NonFinite):
        load_dense_payload("p", save({"w": torch.full((2, 3), float("nan"))}), shapes)
    with pytest.raises(MalformedPayload):
        load_dense_payload("p", b"\xff" * 64, shapes)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_short_real_run_of_overlapped_peers_with_a_slow_link():
    reason = netns_available()
    if reason is not None:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    res = subprocess.run(
        [sys.executable, "-m", "locoswarm.cli", "bench", "wan", "--json", "--methods", "sparseloco_overlap",
         "--inner-steps", "4", "--windows", "3", "--skip", "1"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=400,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    method = next(line for line in lines if line.get("method") == "sparseloco_overlap")
    slow = next(line for line in lines if line.get("slow_peer"))
    summary = lines[-1]
    assert method["replicas_identical"] is True and method["windows_applied"] == 6  # 3 + 3 for the slow peer
    assert method["steady_windows"] == [1, 2] and method["samples"] == 6
    assert 0 < method["compute_utilization"] <= 1 and method["seconds_per_window_mean"]["compute"] > 0
    assert method["seconds_per_window_mean"]["background"] > 0  # the exchange ran beside training
    assert slow["window"] == 3 and slow["throttled_seconds"] > 0 and slow["caught_up"] is True
    assert summary["summary"] is True and "goal_met" in summary
    assert not math.isnan(summary["sparseloco_overlap_utilization"])
    assert any("projections" in line for line in lines)
