"""bench/convergence.py at smoke size: the sweep runs every method and seed, reports means,
spreads and bytes, judges SparseLoCo against the best DiLoCo, and data does not depend on H."""

from __future__ import annotations

import argparse
import json
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import convergence
from bench.convergence import Sweep, check_scale, plot, run_all, summarize
from bench.convergence_train import (
    Corpus,
    Result,
    Scale,
    Variant,
    link_site_packages,
    run_variant,
)
from node.loco import LocoConfig
from protocol.manifest import CodecConfig

FIELDS = {
    "bench", "label", "method", "h", "seed", "topk", "options", "replicas", "steps", "tokens_per_replica", "heldout_loss",
    "payload_bytes", "sent_bytes_per_round", "received_bytes_per_round", "wall_s", "curve",
}
SMOKE_SWEEP = Sweep(hs=(2, 4), diloco=((1.0, 0.0), (0.7, 0.9)), topks=(64,), lookahead=0.0, lands=(), seeds=(1, 2))


@pytest.fixture(scope="module")
def scale(tmp_path_factory: pytest.TempPathFactory) -> Scale:
    """One prepared corpus (micro model, seq_len 16, 100k chars) shared by every test here."""
    return Scale(name="smoke", model="micro", corpus="stdlib", vocab_size=512, max_chars=100_000, replicas=2,
                 steps=4, batch_size=2, seq_len=16, eval_sequences=4, block=2, eval_every=2,
                 data_dir=str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def smoke(scale: Scale) -> tuple[list[Result], dict, list[dict]]:
    torch.set_num_threads(1)
    records: list[dict] = []
    results, summary = run_all(scale, SMOKE_SWEEP, emit=records.append)
    return results, summary, records


def test_every_job_emits_one_json_record_with_all_fields(smoke) -> None:
    _, _, records = smoke
    jobs = SMOKE_SWEEP.jobs()
    assert [(r["label"], r["seed"]) for r in records[:-1]] == [(v.label, s) for v, s in jobs]
    for rec in records[:-1]:
        assert FIELDS <= set(rec), FIELDS - set(rec)
        json.dumps(rec)
        every = rec["h"] if rec["method"] in ("diloco", "sparseloco", "single") else 2
        assert [s for s, _ in rec["curve"]] == list(range(0, rec["steps"] + 1, every))
        assert rec["tokens_per_replica"] == 4 * 2 * 16


def test_sweep_has_plain_averaging_nesterov_and_every_topk_per_h() -> None:
    labels = {v.label for v in Sweep().variants()}
    for h in (15, 30):
        assert f"diloco H={h} avg" in labels and f"diloco H={h} lr=0.7 nesterov=0.9" in labels
        assert {f"sparseloco H={h} k={k}" for k in (64, 128, 256)} <= labels
        assert {f"sparseloco H={h} k={k} ef_lookahead={64 / k}" for k in (64, 128, 256)} <= labels
    assert {"ddp", "ddp_loco", "single"} <= labels
    assert len(Sweep().seeds) >= 2


def test_cpu_long_sweep_runs_the_paper_rule_only_where_asked() -> None:
    """cpu-long: the DiLoCo grid and one lower outer lr, the look-ahead at every top-k, the paper's rule at k=64 only."""
    scale = check_scale(convergence.SCALES["cpu-long"], convergence.SWEEPS["cpu-long"])
    assert (scale.steps // 15, scale.steps // 30) == (80, 40)
    labels = [v.label for v in convergence.SWEEPS["cpu-long"].variants()]
    for h in (15, 30):
        assert {f"diloco H={h} avg", f"diloco H={h} lr=0.7 nesterov=0.9", f"diloco H={h} lr=0.4 nesterov=0.9",
                f"diloco H={h} lr=0.2 nesterov=0.9"} <= set(labels)
        assert [lb for lb in labels if lb.startswith(f"sparseloco H={h} ")] == [
            f"sparseloco H={h} k=64", f"sparseloco H={h} k=64 ef_lookahead=1.0",
            f"sparseloco H={h} k=128 ef_lookahead=0.5", f"sparseloco H={h} k=192 ef_lookahead={64 / 192}"]
    assert len(labels) == 16


def test_summary_judges_each_sparseloco_against_the_best_diloco(smoke) -> None:
    _, summary, records = smoke
    assert records[-1] == summary and summary["seeds"] == [1, 2]
    for h in ("2", "4"):
        row = summary["by_h"][h]
        best = row["best_diloco"]["loss_mean"]
        assert best == min(d["loss_mean"] for d in row["diloco"])
        (sl,) = row["sparseloco"]
        assert sl["gap_pct"] == pytest.approx(100 * (sl["loss_mean"] - best) / best, abs=0.02)
        assert sl["verdict"] in ("wins", "loses", "mixed (seeds disagree)")
        assert set(sl["seed_gaps"]) == {"1", "2"}
        assert isinstance(summary["checks"][f"h{h}_sparseloco_within_1pct_at_50x_fewer_bytes"], bool)
    assert any(s.startswith("H=2: sparseloco H=2 k=64 ") for s in summary["statements"])
    assert isinstance(summary["checks"]["ddp_loco_within_1pct_of_ddp"], bool)


def test_bytes_follow_each_methods_topology(smoke) -> None:
    by = {(r.label, r.seed): r for r in smoke[0]}
    dl = by[("diloco H=2 avg", 1)]
    sl = by[("sparseloco H=2 k=64", 1)]
    numel = dl.payload_bytes // 4
    assert dl.sent_bytes_per_round == dl.received_bytes_per_round == 2 * (2 - 1) / 2 * 4 * numel  # ring all-reduce
    assert sl.sent_bytes_per_round == sl.payload_bytes and sl.received_bytes_per_round == (2 - 1) * sl.payload_bytes
    assert sl.payload_bytes < dl.payload_bytes / 10
    loco = by[("ddp_loco", 1)]
    assert loco.payload_bytes == LocoConfig().payload_bytes(numel)
    assert loco.received_bytes_per_round == 2 * (2 - 1) * loco.payload_bytes  # all-gather, H=2 steps
    assert by[("single", 1)].bytes_per_round == 0


def test_seeds_differ_and_ddp_learns(smoke) -> None:
    by = {(r.label, r.seed): r for r in smoke[0]}
    assert by[("ddp", 1)].heldout_loss != by[("ddp", 2)].heldout_loss
    assert by[("ddp", 1)].heldout_loss < by[("ddp", 1)].curve[0][1]
    assert all(torch.isfinite(torch.tensor([loss for _, loss in r.curve])).all() for r in smoke[0])


def test_every_h_sees_the_same_sequences(scale: Scale) -> None:
    corpus = Corpus.load(scale)
    seq = [corpus.train_batch(1, 0, step) for step in range(scale.steps)]
    again = Corpus(scale, corpus.data)  # a fresh assignment cache
    assert all(torch.equal(a, again.train_batch(1, 0, s)) for s, a in enumerate(seq))
    assert not torch.equal(corpus.train_batch(1, 0, 0), corpus.train_batch(2, 0, 0))


def test_an_h_the_data_block_does_not_divide_is_refused(scale: Scale) -> None:
    with pytest.raises(ValueError, match="data block"):
        check_scale(scale, Sweep(hs=(3,)))
    assert check_scale(scale, Sweep(hs=(2, 4))).steps == 4


def test_summary_flags_a_win_a_loss_and_the_bytes_goal() -> None:
    def result(label: str, method: str, seed: int, loss: float, payload: int, options: dict | None = None) -> Result:
        recv = 3 * payload if method == "sparseloco" else 1.5 * payload
        sent = payload if method == "sparseloco" else 1.5 * payload
        topk = 64 if method == "sparseloco" else None
        return Result(label, method, 15, seed, topk, options or {}, 4, 30, 1, loss, payload, sent, recv, 0.0,
                      [(0, 9.0), (30, loss)])

    rs = [result("d", "diloco", s, 5.0 + 0.01 * s, 400_000) for s in (1, 2)]
    rs += [result("good", "sparseloco", s, 4.9, 1_000, {"ef_lookahead": 1.0}) for s in (1, 2)]
    rs += [result("bad", "sparseloco", s, 5.3, 1_000) for s in (1, 2)]
    rs += [result("mixed", "sparseloco", s, 5.0 + 0.1 * (s - 1.5), 100_000) for s in (1, 2)]  # 3x fewer bytes
    summary = summarize(rs)
    rows = {r["label"]: r for r in summary["by_h"]["15"]["sparseloco"]}
    verdicts = {label: r["verdict"] for label, r in rows.items()}
    assert verdicts == {"good": "wins", "bad": "loses", "mixed": "mixed (seeds disagree)"}
    assert rows["mixed"]["seed_gaps"] == {"1": -0.06, "2": 0.03}
    assert rows["good"]["vs_paper_rule_pct"] == pytest.approx(100 * (4.9 - 5.3) / 5.3, abs=0.01)
    assert "vs_paper_rule_pct" not in rows["bad"]
    assert summary["checks"]["h15_sparseloco_within_1pct_at_50x_fewer_bytes"] is True
    assert summary["by_h"]["15"]["sparseloco"][0]["bytes_ratio"] == pytest.approx(3 * 400_000 / 4_000, rel=1e-3)
    rs = [r for r in rs if r.label != "good"]
    assert summarize(rs)["checks"]["h15_sparseloco_within_1pct_at_50x_fewer_bytes"] is False


def test_variant_labels_name_codec_options_that_differ_from_the_manifest() -> None:
    assert Variant("sparseloco", 15, codec=CodecConfig(topk=128, ef_beta=0.9)).label == "sparseloco H=15 k=128 ef_beta=0.9"
    with pytest.raises(ValueError, match="unknown method"):
        Variant("adam", 15)


def test_site_packages_corpus_links_sorted_python_files(tmp_path: Path) -> None:
    dest = tmp_path / "text"
    link_site_packages(dest, 200_000)
    links = sorted(dest.iterdir())
    assert links and all(p.is_symlink() and p.suffix == ".py" for p in links)
    assert all("/tests/" not in str(p.resolve()) for p in links)
    assert sum(p.stat().st_size for p in links[:-1]) < 200_000


def test_plot_writes_a_png(smoke, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    plot(smoke[0], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_jsonl_summary_and_png_into_out_dir(scale: Scale, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(convergence.SCALES, "cpu", scale)
    monkeypatch.setitem(convergence.SWEEPS, "cpu", Sweep(hs=(2,), diloco=((1.0, 0.0),), topks=(64,), lookahead=0.0, lands=(),
                                                         baselines=()))
    args = argparse.Namespace(scale="cpu", json=True, seeds=2, workers=1, budget_s=None, device=None,
                              out_dir=str(tmp_path / "out"), out="unused.png", from_jsonl=None)
    assert convergence.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line).get("label") for line in lines] == ["diloco H=2 avg"] * 2 + ["sparseloco H=2 k=64"] * 2 + [None]
    saved = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in saved] == [json.loads(x) for x in lines]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["summary"] is True
    assert (tmp_path / "out" / "convergence.png").exists()

    # --from-jsonl summarizes saved runs again, training nothing
    again = argparse.Namespace(**{**vars(args), "from_jsonl": str(tmp_path / "out" / "results.jsonl"),
                                  "out": str(tmp_path / "again.png")})
    assert convergence.run(again) == 0
    resummarized = json.loads(capsys.readouterr().out)
    assert resummarized["by_h"] == summary["by_h"] and resummarized["checks"] == summary["checks"]
    assert (tmp_path / "again.png").exists()


def test_a_spent_budget_starts_no_more_jobs(scale: Scale) -> None:
    sweep = Sweep(hs=(2,), diloco=((1.0, 0.0),), topks=(), lookahead=0.0, lands=(), seeds=(1,), baselines=("single",))
    results, summary = run_all(scale, sweep, budget_s=0.0)
    assert results == []
    assert summary["skipped"] == ["diloco H=2 avg seed 1", "single seed 1"]


def test_gpu_scale_runs_at_a_tiny_size_on_cpu(tmp_path: Path) -> None:
    """The GPU scale's own path (25m preset, vocabulary 4096, site-packages corpus), shrunk."""
    gpu = convergence.SCALES["gpu"]
    assert (gpu.model, gpu.vocab_size, gpu.corpus, gpu.replicas, gpu.batch_size, gpu.seq_len) == (
        "25m", 4096, "site-packages", 4, 16, 256)
    assert gpu.steps // 15 in range(40, 81) and gpu.steps // 30 in range(40, 81)
    small = replace(gpu, max_chars=400_000, replicas=2, steps=2, block=2, batch_size=1, seq_len=16,
                    eval_sequences=2, eval_every=2, device="cpu", data_dir=str(tmp_path))
    sweep = Sweep(hs=(2,), diloco=((1.0, 0.0),), topks=(64,), lookahead=1.0, lands=(), seeds=(1,),
                  baselines=("ddp",))
    results, summary = run_all(small, sweep)
    assert [r.label for r in results] == ["diloco H=2 avg", "sparseloco H=2 k=64",
                                          "sparseloco H=2 k=64 ef_lookahead=1.0", "ddp"]
    corpus = Corpus.load(small)
    assert corpus.data.vocab_size == 4096
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(next(Path(corpus.data.index.source).iterdir()).resolve()).is_relative_to(purelib)
    assert {r["label"] for r in summary["by_h"]["2"]["sparseloco"]} == {"sparseloco H=2 k=64",
                                                                      "sparseloco H=2 k=64 ef_lookahead=1.0"}


def test_overlap_landing_before_the_first_step_is_the_serial_run_bit_for_bit(scale: Scale) -> None:
    """The overlapped variant differs from serial only in where local steps start: when the
    aggregate lands before any of them, the run is the serial one exactly; later, it is not."""
    torch.set_num_threads(1)
    corpus = Corpus.load(scale)
    serial = run_variant(scale, corpus, Variant("sparseloco", 2), 1)
    at_once = run_variant(scale, corpus, Variant("sparseloco", 2, land=0.0), 1)
    late = run_variant(scale, corpus, Variant("sparseloco", 2, land=1.0), 1)
    assert at_once.curve == serial.curve
    assert late.curve[1] == serial.curve[1]  # the first window has nothing to land
    assert late.curve[-1] != serial.curve[-1]
    assert late.label == "sparseloco H=2 k=64 overlap@1" and late.options == {"overlap_land": 1.0}
    assert {"sparseloco H=15 k=64 overlap@0.5 eager", "sparseloco H=30 k=64 overlap@1 eager"} <= {
        v.label for v in Sweep().variants()}
    eager = run_variant(scale, corpus, Variant("sparseloco", 2, land=1.0, eager=True), 1)
    assert eager.curve[1] == serial.curve[1] and eager.curve[-1] not in (serial.curve[-1], late.curve[-1])
    with pytest.raises(ValueError, match="land"):
        Variant("diloco", 2, land=0.5)
    with pytest.raises(ValueError, match="eager"):
        Variant("sparseloco", 2, eager=True)
