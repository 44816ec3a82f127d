"""bench/convergence.py at smoke size: every method runs, reports its fields, and bytes add up."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench.convergence import (
    METHODS,
    BenchConfig,
    Result,
    plot,
    run_all,
    summarize,
    sweep_configs,
)
from node.loco import LocoConfig

FIELDS = {
    "bench", "method", "h", "topk", "ef_rule", "replicas", "steps", "tokens_per_replica", "heldout_loss",
    "bytes_per_replica_per_round", "bytes_per_replica_per_step", "bytes_per_replica_total", "wall_s", "curve",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One prepared corpus (seq_len 16, 100k chars) shared by every test here."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def smoke(data_dir: str) -> tuple[list[Result], dict, list[dict]]:
    torch.set_num_threads(2)
    cfg = BenchConfig(
        replicas=2, steps=2, h=2, batch_size=2, seq_len=16, eval_sequences=4, max_chars=100_000,
        data_dir=data_dir,
    )
    records: list[dict] = []
    results, summary = run_all(cfg, emit=records.append)
    return results, summary, records


def test_every_method_emits_one_json_record_with_all_fields(smoke) -> None:
    _, _, records = smoke
    assert [r["method"] for r in records[:-1]] == list(METHODS)
    for rec in records[:-1]:
        assert FIELDS <= set(rec), FIELDS - set(rec)
        json.dumps(rec)  # serializable as one JSON line
        assert len(rec["curve"]) == rec["steps"] // rec["h"] + 1


def test_summary_line_carries_the_goal_checks(smoke) -> None:
    _, summary, records = smoke
    assert records[-1] == summary and summary["summary"] is True
    assert set(summary["checks"]) == {"sparseloco_loss_le_diloco", "bytes_ratio_ge_150", "ddp_loco_within_1pct_of_ddp"}
    assert all(isinstance(v, bool) for v in summary["checks"].values())


def test_sparseloco_sends_far_fewer_bytes_than_diloco(smoke) -> None:
    by = {r.method: r for r in smoke[0]}
    numel = by["diloco"].bytes_per_replica_per_round // 4
    assert by["sparseloco"].bytes_per_replica_per_round < by["diloco"].bytes_per_replica_per_round / 50
    assert by["ddp"].bytes_per_replica_per_step == 4 * numel
    assert by["ddp_loco"].bytes_per_replica_per_step == LocoConfig().payload_bytes(numel)
    assert by["single"].bytes_per_replica_total == 0
    for r in smoke[0]:
        assert r.curve[-1][1] == r.bytes_per_replica_total


def test_losses_are_finite_and_ddp_learns(smoke) -> None:
    by = {r.method: r for r in smoke[0]}
    assert all(torch.isfinite(torch.tensor([loss for _, _, loss in r.curve])).all() for r in smoke[0])
    assert by["ddp"].heldout_loss < by["ddp"].curve[0][2]


def test_plot_writes_a_png(smoke, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    plot(smoke[0], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_flags_a_loco_gap_over_one_percent() -> None:
    def result(method: str, loss: float, step_bytes: int) -> Result:
        return Result(method, 1, None, None, 2, 1, 1, loss, step_bytes, step_bytes, step_bytes, 0.0, [(0, 0, 9.0), (1, step_bytes, loss)])

    checks = summarize([result("ddp", 5.0, 800), result("ddp_loco", 5.1, 106)], 0.0)["checks"]
    assert checks["ddp_loco_within_1pct_of_ddp"] is False
    assert checks["sparseloco_loss_le_diloco"] is None


def test_sweep_covers_h_density_and_both_feedback_rules() -> None:
    runs = sweep_configs(BenchConfig(steps=150, h=15))
    sparse = {(c.h, c.topk, c.ef_rule) for c, m in runs if m == "sparseloco"}
    assert {(h, k, "sparseloco") for h in (15, 30, 50) for k in (32, 64, 128)} <= sparse
    assert (15, 64, "loco") in sparse
    assert {c.h for c, m in runs if m == "diloco"} == {15, 30, 50}


def test_steps_that_do_not_divide_into_rounds_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of h"):
        BenchConfig(steps=100, h=30)


def test_cli_entry_prints_json_lines_and_writes_the_png(data_dir: str, tmp_path: Path, capsys, monkeypatch) -> None:
    from bench import convergence

    tiny = BenchConfig(replicas=1, steps=1, h=1, batch_size=2, seq_len=16, eval_sequences=2, max_chars=100_000,
                       data_dir=data_dir)
    monkeypatch.setattr(convergence, "QUICK", tiny)
    monkeypatch.setattr(convergence, "METHODS", ("diloco", "single"))
    args = argparse.Namespace(json=True, quick=True, sweep=False, replicas=1, out=str(tmp_path / "c.png"), device="cpu")
    assert convergence.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line).get("method") for line in lines] == ["diloco", "single", None]
    assert (tmp_path / "c.png").exists()
