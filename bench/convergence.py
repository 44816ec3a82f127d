"""`locoswarm bench convergence`: SparseLoCo against tuned baselines, at equal tokens, >= 2 seeds.

The bench runs one sweep per scale (``SCALES``) and reports every figure as a mean over
seeds with its spread (max - min):

    diloco      per H, outer SGD (lr, Nesterov momentum) over ``DILOCO_GRID``, plain model
                averaging (lr 1, momentum 0) included; the best setting by mean loss is the
                baseline SparseLoCo is judged against
    sparseloco  per H, top-k over ``TOPK_GRID`` (the density knob: bytes grow with k), plus the
                codec options under test (``EXTRA_SPARSELOCO``)
    ddp         every step, fp32 gradient averaged: the no-compression upper bound
    ddp_loco    the same with LoCo 4-bit error-compensated gradients
    single      one replica alone (R times fewer tokens)

Every method takes the same inner steps on the same sequences (``bench.convergence_train``)
with one inner learning rate. Bytes per round are per replica and per H steps, sent plus
received, by each method's own topology (see ``bench.convergence_train``); the summary states,
per H, where SparseLoCo wins and where it loses against the best DiLoCo, and at how many
times fewer bytes.

Scales: ``cpu`` (the default, about 20 minutes on 2 cores: a 0.24 M-parameter model, 12 and
6 rounds), ``cpu-long`` (the same model for 80 and 40 rounds, a focused sweep: about 45
minutes on 2 cores), ``tiny`` (the `tiny` preset at batch 8 x 64, 24 and 12 rounds: about an
hour on 2 cores), ``gpu`` (the `25m` preset at vocabulary 4096 on ~20 M tokens of
site-packages source, batch 16 x 256, 80 and 40 rounds: sized for one H100/H200 in under 8 minutes;
``bench/gpu_convergence.sh`` is the prepared device command).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from itertools import zip_longest
from pathlib import Path

import torch

from bench.convergence_train import Corpus, Result, Scale, Variant, run_variant
from protocol.manifest import CodecConfig

log = logging.getLogger(__name__)

DATA_DIR = str(Path(tempfile.gettempdir()) / "locoswarm-bench-convergence")

SCALES = {
    "cpu": Scale(name="cpu", model="micro", corpus="stdlib", vocab_size=1024, max_chars=2_000_000, replicas=4,
                 steps=180, batch_size=4, seq_len=32, eval_sequences=64, data_dir=DATA_DIR),
    "cpu-long": Scale(name="cpu-long", model="micro", corpus="stdlib", vocab_size=1024, max_chars=4_000_000,
                      replicas=4, steps=1200, batch_size=4, seq_len=32, eval_sequences=64, data_dir=DATA_DIR),
    "tiny": Scale(name="tiny", model="tiny", corpus="stdlib", vocab_size=2048, max_chars=6_000_000, replicas=4,
                  steps=360, batch_size=8, seq_len=64, eval_sequences=64, data_dir=DATA_DIR),
    "gpu": Scale(name="gpu", model="25m", corpus="site-packages", vocab_size=4096, max_chars=80_000_000,
                 replicas=4, steps=1200, batch_size=16, seq_len=256, eval_sequences=128, lr=1e-3,
                 eval_every=30, data_dir=DATA_DIR),
}
"""cpu: 12 / 6 rounds at H = 15 / 30 on a micro model; cpu-long: the same model for 80 / 40
rounds (the many-round regime SparseLoCo's error feedback is made for); tiny: 24 / 12 rounds of the `tiny`
preset; gpu: 80 / 40 rounds, 19.7 M tokens per replica (the corpus holds about 20 M)."""

HS = (15, 30)
DILOCO_GRID = ((1.0, 0.0), (0.7, 0.9), (0.4, 0.9))
"""(outer lr, Nesterov momentum): plain averaging, the DiLoCo paper's setting, a smaller lr."""
TOPK_GRID = (64, 128, 256)
"""Top-k of 4096: densities 1.56 %, 3.1 %, 6.25 %."""
LOOKAHEAD_AT_K64 = 1.0
"""``codec.ef_lookahead`` under test, run at every H and top-k next to the paper's rule and
scaled as 64 / k: a coordinate waits about chunk / k windows between selections, so denser
payloads lag less and need less look-ahead (measured: 1 at k=64, 0.5 at 128, 0.25 at 256
were each the best of the values tried; docs/convergence.md)."""
OVERLAP_LANDS = (0.5, 1.0)
"""When the window-w aggregate lands in window w+1's training, as a fraction of its H steps:
0.5 when the exchange takes half the compute, 1.0 the worst case that still hides it (the
local steps never see theta(w+1): a one-window-delayed outer step)."""
SEEDS = (1, 2)
BYTES_GOAL = 50.0
"""SparseLoCo must use at least this many times fewer bytes per round than the best DiLoCo."""
LOSS_GOAL = 0.01
"""... and end within this fraction of its held-out loss (or below it)."""


@dataclass(frozen=True)
class Sweep:
    hs: tuple[int, ...] = HS
    diloco: tuple[tuple[float, float], ...] = DILOCO_GRID
    topks: tuple[int, ...] = TOPK_GRID
    lookahead: float = LOOKAHEAD_AT_K64
    """0: the paper's rule only."""
    plain_topks: tuple[int, ...] | None = None
    """With a look-ahead: the top-k values also run with the paper's rule (None: every one)."""
    lands: tuple[float, ...] = OVERLAP_LANDS
    """Overlapped SparseLoCo as the peer runs it (``inner.overlap``: eager) at the smallest
    top-k, by when the aggregate lands."""
    seeds: tuple[int, ...] = SEEDS
    baselines: tuple[str, ...] = ("ddp", "ddp_loco", "single")

    def variants(self) -> list[Variant]:
        """Every (method, settings) the sweep runs, most informative first, so that a budget
        that runs out cuts the least: DiLoCo and SparseLoCo settings alternate, H by H."""
        per_h = []
        for h in self.hs:
            dl = [[Variant("diloco", h, lr, m)] for lr, m in self.diloco]
            sl = [[Variant("sparseloco", h, codec=c) for c in self.codecs(k)] for k in self.topks]
            if sl:
                sl[0] += [Variant("sparseloco", h, codec=CodecConfig(topk=self.topks[0]), land=f, eager=True)
                          for f in self.lands]
            per_h.append([v for pair in zip_longest(dl, sl, fillvalue=[]) for group in pair for v in group])
        out = [v for rank in zip_longest(*per_h) for v in rank if v is not None]
        return out + [Variant(m, min(self.hs)) for m in self.baselines]

    def codecs(self, topk: int) -> list[CodecConfig]:
        """The paper's rule at ``topk``, then the look-ahead scaled to it."""
        plain = CodecConfig(topk=topk)
        if not self.lookahead:
            return [plain]
        ahead = replace(plain, ef_lookahead=self.lookahead * 64 / topk)
        return [plain, ahead] if self.plain_topks is None or topk in self.plain_topks else [ahead]

    def jobs(self) -> list[tuple[Variant, int]]:
        """(variant, seed) pairs, every seed of a variant together: a cut budget leaves whole means."""
        return [(v, s) for v in self.variants() for s in self.seeds]


SWEEPS = {"cpu": Sweep(),
          "cpu-long": Sweep(diloco=DILOCO_GRID + ((0.2, 0.9),), topks=(64, 128, 192), plain_topks=(64,), lands=(),
                            baselines=()),
          "tiny": Sweep(), "gpu": Sweep(baselines=("ddp",))}
"""The GPU sweep leaves out ddp_loco and single (not part of the claim under test) to fit 8
minutes; the cpu-long sweep keeps the DiLoCo grid, one step further down in outer lr (0.4 is
its best over 80 rounds at H = 15: the grid's edge), and the densities around the 50x bytes
goal (k = 192 is 4.7 %, about 54x fewer bytes than DiLoCo), the paper's rule at its 1.56 %."""


def check_scale(scale: Scale, sweep: Sweep) -> Scale:
    """``scale`` with steps a multiple of every H (rounded up), refusing an H the data block does not divide."""
    for h in sweep.hs:
        if h % scale.block:
            raise ValueError(f"H={h} is not a multiple of the data block {scale.block}: methods would see different data")
    period = math.lcm(*sweep.hs)
    return replace(scale, steps=-(-scale.steps // period) * period)


# ---------------------------------------------------------------------------------------
# Running jobs: in this process, or in a pool of worker processes (one thread each)
# ---------------------------------------------------------------------------------------

_corpora: dict[Scale, Corpus] = {}


def _job(scale: Scale, variant: Variant, seed: int, threads: int) -> Result:
    torch.set_num_threads(threads)
    if scale.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, the same for every method
    if scale not in _corpora:
        _corpora[scale] = Corpus.load(scale)
    return run_variant(scale, _corpora[scale], variant, seed)


def run_jobs(scale: Scale, jobs: list[tuple[Variant, int]], *, workers: int = 1, threads: int = 1,
             budget_s: float | None = None, emit: Callable[[Result], None] = lambda r: None) -> tuple[list[Result], list[str]]:
    """Run ``jobs`` (``workers`` processes, ``threads`` torch threads each); no new job starts
    after ``budget_s`` seconds. Returns the results and the labels of the jobs left out."""
    t0 = time.perf_counter()
    results: list[Result] = []
    skipped: list[str] = []

    def over() -> bool:
        return budget_s is not None and time.perf_counter() - t0 > budget_s

    corpus = Corpus.load(scale)  # tokenizes the corpus once, before any worker starts
    if workers <= 1:
        _corpora[scale] = corpus
        for v, seed in jobs:
            if over():
                skipped.append(f"{v.label} seed {seed}")
                continue
            results.append(_job(scale, v, seed, threads))
            emit(results[-1])
        return results, skipped
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Future, tuple[Variant, int]] = {}
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < workers and not over():
                v, seed = queue.pop(0)
                pending[pool.submit(_job, scale, v, seed, threads)] = (v, seed)
            if over():
                skipped.extend(f"{v.label} seed {s}" for v, s in queue)
                queue.clear()
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                pending.pop(fut)
                results.append(fut.result())
                emit(results[-1])
    return results, skipped


# ---------------------------------------------------------------------------------------
# Summary: means and spreads over seeds; SparseLoCo against the best DiLoCo per H
# ---------------------------------------------------------------------------------------


@dataclass
class Stat:
    label: str
    method: str
    h: int
    topk: int | None
    options: dict[str, float]
    seeds: int
    loss_mean: float
    loss_min: float
    loss_max: float
    by_seed: dict[int, float]
    bytes_per_round: float
    payload_bytes: int
    curve_mean: list[tuple[int, float]] = field(repr=False)

    @property
    def spread(self) -> float:
        return self.loss_max - self.loss_min


def stats(results: list[Result]) -> list[Stat]:
    """One ``Stat`` per label, in first-seen order: mean, min and max of the final loss over seeds."""
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.label, []).append(r)
    out = []
    for label, rs in by.items():
        losses = [r.heldout_loss for r in rs]
        curve = [(s, statistics.fmean(r.curve[i][1] for r in rs)) for i, (s, _) in enumerate(rs[0].curve)]
        out.append(Stat(label, rs[0].method, rs[0].h, rs[0].topk, rs[0].options, len(rs), statistics.fmean(losses), min(losses),
                        max(losses), {r.seed: r.heldout_loss for r in rs}, statistics.fmean(r.bytes_per_round for r in rs),
                        round(statistics.fmean(r.payload_bytes for r in rs)), curve))
    return out


def paired_verdict(seed_gaps: list[float]) -> str:
    """Seeds share model init and data across methods, so compare seed by seed: a method
    wins (loses) only when it ends lower (higher) on every seed."""
    if seed_gaps and all(g < 0 for g in seed_gaps):
        return "wins"
    if seed_gaps and all(g > 0 for g in seed_gaps):
        return "loses"
    return "mixed (seeds disagree)"


def summarize(results: list[Result], *, skipped: list[str] = (), wall_s: float = 0.0, scale: str = "") -> dict:
    """Per H: the best DiLoCo, every SparseLoCo variant's gap to it and bytes ratio; the goal checks."""
    st = stats(results)
    by_h: dict[str, dict] = {}
    statements: list[str] = []
    checks: dict[str, bool | None] = {}
    for h in sorted({s.h for s in st if s.method in ("diloco", "sparseloco")}):
        dl = [s for s in st if s.method == "diloco" and s.h == h]
        sl = [s for s in st if s.method == "sparseloco" and s.h == h]
        if not dl:
            continue
        best = min(dl, key=lambda s: s.loss_mean)
        rows = []
        for s in sl:
            gap = (s.loss_mean - best.loss_mean) / best.loss_mean
            ratio = best.bytes_per_round / s.bytes_per_round
            seed_gaps = {seed: s.by_seed[seed] - best.by_seed[seed] for seed in s.by_seed if seed in best.by_seed}
            verdict = paired_verdict(list(seed_gaps.values()))
            row = {"label": s.label, "loss_mean": round(s.loss_mean, 4), "spread": round(s.spread, 4),
                   "gap_pct": round(100 * gap, 2),
                   "seed_gaps": {str(k): round(g, 4) for k, g in sorted(seed_gaps.items())},
                   "bytes_ratio": round(ratio, 1), "verdict": verdict}
            plain = next((p for p in sl if p.topk == s.topk and not p.options), None)
            if s.options and plain:  # the option against the paper's rule at the same H and top-k
                row["vs_paper_rule_pct"] = round(100 * (s.loss_mean - plain.loss_mean) / plain.loss_mean, 2)
            rows.append(row)
            statements.append(f"H={h}: {s.label} {verdict} against {best.label}: {s.loss_mean:.4f} vs "
                              f"{best.loss_mean:.4f} ({100 * gap:+.2f} %; per seed "
                              f"{', '.join(f'{g:+.3f}' for g in seed_gaps.values())}) at {ratio:.0f}x fewer bytes per round")
        within = [r for r in rows if r["gap_pct"] <= 100 * LOSS_GOAL and r["bytes_ratio"] >= BYTES_GOAL]
        checks[f"h{h}_sparseloco_within_1pct_at_50x_fewer_bytes"] = bool(within) if rows else None
        by_h[str(h)] = {
            "best_diloco": {"label": best.label, "loss_mean": round(best.loss_mean, 4), "spread": round(best.spread, 4),
                            "bytes_per_round": best.bytes_per_round},
            "diloco": [{"label": s.label, "loss_mean": round(s.loss_mean, 4), "spread": round(s.spread, 4)} for s in dl],
            "sparseloco": rows,
        }
    base = {s.method: s for s in st if s.method in ("ddp", "ddp_loco", "single")}
    if "ddp" in base and "ddp_loco" in base:
        rel = (base["ddp_loco"].loss_mean - base["ddp"].loss_mean) / base["ddp"].loss_mean
        checks["ddp_loco_within_1pct_of_ddp"] = abs(rel) <= 0.01
        statements.append(f"ddp_loco {base['ddp_loco'].loss_mean:.4f} vs ddp {base['ddp'].loss_mean:.4f} "
                          f"({100 * rel:+.2f} %) at {base['ddp'].bytes_per_round / base['ddp_loco'].bytes_per_round:.1f}x "
                          f"fewer bytes (R={results[0].replicas}: all-gather vs ring all-reduce)")
    return {
        "bench": "convergence", "summary": True, "scale": scale,
        "seeds": sorted({r.seed for r in results}), "tokens_per_replica": results[0].tokens_per_replica if results else 0,
        "baselines": {m: {"loss_mean": round(s.loss_mean, 4), "spread": round(s.spread, 4),
                          "bytes_per_round": s.bytes_per_round} for m, s in base.items()},
        "by_h": by_h, "checks": checks, "statements": statements, "skipped": list(skipped), "wall_s": round(wall_s, 1),
    }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def plot(results: list[Result], out: str) -> None:
    """Mean held-out loss over seeds vs inner steps, one panel per H (baselines in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = stats(results)
    hs = sorted({s.h for s in st if s.method in ("diloco", "sparseloco")}) or [0]
    fig, axes = plt.subplots(1, len(hs), figsize=(7 * len(hs), 5), squeeze=False)
    for ax, h in zip(axes[0], hs):
        for s in st:
            if s.h == h or s.method in ("ddp", "ddp_loco", "single"):
                steps, loss = zip(*s.curve_mean)
                ax.plot(steps, loss, label=f"{s.label} ({s.bytes_per_round:,.0f} B/round)",
                        linestyle="-" if s.method == "sparseloco" else "--")
        ax.set(xlabel="inner steps per replica", ylabel="held-out loss (mean over seeds)", title=f"H = {h}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def record(r: Result) -> dict:
    rec = {"bench": "convergence", **asdict(r)}
    rec["heldout_loss"] = round(r.heldout_loss, 5)
    rec["curve"] = [[s, round(loss, 5)] for s, loss in r.curve]
    return rec


def read_records(path: str | Path) -> list[Result]:
    """The runs of a results.jsonl written by ``--out-dir`` (summary lines skipped)."""
    fields = set(Result.__dataclass_fields__)
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if not rec.get("summary"):
            rec["curve"] = [tuple(point) for point in rec["curve"]]
            out.append(Result(**{k: v for k, v in rec.items() if k in fields}))
    return out


def run_all(scale: Scale, sweep: Sweep, *, workers: int = 1, threads: int = 1, budget_s: float | None = None,
            emit: Callable[[dict], None] = lambda rec: None) -> tuple[list[Result], dict]:
    """The whole sweep at ``scale``; ``emit`` receives each JSON record as it is made, the summary last."""
    t0 = time.perf_counter()
    scale = check_scale(scale, sweep)
    results, skipped = run_jobs(scale, sweep.jobs(), workers=workers, threads=threads, budget_s=budget_s,
                                emit=lambda r: emit(record(r)))
    summary = summarize(results, skipped=skipped, wall_s=time.perf_counter() - t0, scale=scale.name)
    emit(summary)
    return results, summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``locoswarm bench convergence``."""
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="model and token budget (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help=f"seeds per variant (default {len(SEEDS)})")
    p.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    p.add_argument("--budget-s", type=float, default=None, help="start no job after this many seconds")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --scale gpu, else cpu)")
    p.add_argument("--out-dir", default=None, help="also write results.jsonl, summary.json and convergence.png here")
    p.add_argument("--out", default="convergence.png", help="where to write the plot (default convergence.png)")
    p.add_argument("--from-jsonl", default=None, metavar="PATH",
                   help="train nothing: summarize and plot the runs of a results.jsonl (e.g. merged GPU runs)")


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``locoswarm bench convergence [--scale S] [--json] [--seeds N] [--workers W] ...``."""
    if args.from_jsonl:
        results = read_records(args.from_jsonl)
        summary = summarize(results, scale=args.scale)
        print(json.dumps(summary) if args.json else "\n".join(summary["statements"]), flush=True)
        plot(results, args.out)
        return 0
    scale = SCALES[args.scale]
    scale = replace(scale, device=args.device or ("cuda" if args.scale == "gpu" else "cpu"))
    sweep = replace(SWEEPS[args.scale], seeds=tuple(range(1, args.seeds + 1)))
    out_dir = Path(args.out_dir) if args.out_dir else None
    lines = None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = (out_dir / "results.jsonl").open("w")

    def emit(rec: dict) -> None:
        if lines:
            lines.write(json.dumps(rec) + "\n")
            lines.flush()
        if args.json:
            print(json.dumps(rec), flush=True)
        elif rec.get("summary"):
            print("\n".join(rec["statements"]), f"\nchecks: {rec['checks']}  wall {rec['wall_s']} s", flush=True)
        else:
            print(f"{rec['label']:48s} seed {rec['seed']}  held-out {rec['heldout_loss']:.4f}  "
                  f"bytes/replica/round {rec['sent_bytes_per_round'] + rec['received_bytes_per_round']:>14,.0f}  "
                  f"{rec['wall_s']:7.1f} s", flush=True)

    threads = 1 if scale.device == "cpu" else 2
    results, summary = run_all(scale, sweep, workers=args.workers, threads=threads, budget_s=args.budget_s, emit=emit)
    plot(results, str(out_dir / "convergence.png") if out_dir else args.out)
    if out_dir:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        lines.close()
    return 0
