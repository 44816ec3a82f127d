"""`locoswarm bench convergence`: SparseLoCo vs DiLoCo vs DDP (+LoCo) vs one replica, at equal tokens.

R replicas of the run's model train one after another in this process (no networking) on
the run's own data (``node.dataset``, the stdlib corpus), every replica taking the batches
``assigned_batches`` gives peer ``replica-r``. Every method takes the same number of inner
steps per replica, so every method but ``single`` sees the same tokens:

    sparseloco  H local AdamW steps, pseudo-gradient -> ErrorFeedback (beta 0.95, top-64/4096,
                2-bit) -> aggregate(mean_selected, median clip) -> outer SGD lr 1; bytes per
                round are the real signed payload (``protocol.wire.encode_payload``)
    diloco      H local AdamW steps, dense fp32 pseudo-gradients averaged, outer Nesterov SGD
                lr 0.7 momentum 0.9 (DiLoCo paper, Douillard et al. 2023)
    ddp         AdamW on the gradient averaged over the R replicas every step: one model with
                R x batch, the no-compression upper bound
    ddp_loco    the same with LoCo 4-bit error-compensated gradients (``node.loco``), R workers
                simulated with one ``LocoCompressor`` each
    single      one replica alone, same steps (R times fewer tokens)

Held-out loss is measured every H steps. Output: one JSON object per method (and per sweep
configuration), then a summary line with the goal checks; a PNG of loss vs steps and vs
bytes communicated per replica. ``--sweep`` varies H and top-k density for sparseloco vs
diloco and compares the two error-feedback rules.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from node.dataset import TokenData, prepare
from node.inner import InnerLoop, lr_at
from node.loco import LocoCompressor, LocoConfig, average_quantized
from node.model import build_model, lm_loss
from protocol.aggregate import aggregate
from protocol.assignment import assigned_batches, heldout_ids
from protocol.codec import ErrorFeedback
from protocol.codec_types import model_layout
from protocol.errors import LocoError
from protocol.identity import Identity
from protocol.manifest import (
    CodecConfig,
    DataConfig,
    InnerConfig,
    Manifest,
    ModelConfig,
)
from protocol.stores import open_store
from protocol.wire import DIGEST_BYTES, encode_payload

log = logging.getLogger(__name__)

METHODS = ("sparseloco", "diloco", "ddp", "ddp_loco", "single")
SWEEP_H = (15, 30, 50)
SWEEP_TOPK = (32, 64, 128)
"""Top-k of 4096: densities 0.78%, 1.56%, 3.1% (SparseLoCo paper, Table 3 range)."""
DILOCO_LR, DILOCO_MOMENTUM = 0.7, 0.9
SPARSELOCO_LR = 1.0


@dataclass(frozen=True)
class BenchConfig:
    replicas: int = 4
    steps: int = 600
    """Inner steps per replica (= optimizer steps of the DDP variants); a multiple of every H."""
    h: int = 30
    """Local steps per round for sparseloco/diloco; eval and byte points for every method."""
    batch_size: int = 8
    """Sequences per replica per step."""
    seq_len: int = 128
    eval_sequences: int = 64
    preset: str = "tiny"
    lr: float = 2e-3
    """Inner AdamW peak lr (warmup then cosine over ``steps``; node.inner.lr_at)."""
    topk: int = 64
    ef_rule: str = "sparseloco"
    max_chars: int = 6_000_000
    """Characters of the stdlib corpus to tokenize."""
    seed: int = 1234
    device: str = "cpu"
    data_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "locoswarm-bench-convergence"))
    """A file store + shard cache for the prepared corpus; reused between runs."""

    def __post_init__(self) -> None:
        if self.steps % self.h:
            raise ValueError(f"steps={self.steps} is not a multiple of h={self.h}: methods would see unequal steps")
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")

    def manifest(self) -> Manifest:
        """The run description the data, model and optimizers are built from."""
        return Manifest(
            model=ModelConfig(preset=self.preset),
            data=DataConfig(
                max_chars=self.max_chars,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
                eval_sequences=self.eval_sequences,
            ),
            inner=InnerConfig(
                steps=self.h, lr=self.lr, warmup_steps=max(1, self.steps // 15), total_steps=self.steps
            ),
            codec=CodecConfig(topk=self.topk, ef_rule=self.ef_rule),
        )


QUICK = BenchConfig(steps=180, h=15, batch_size=4, seq_len=32, eval_sequences=32, max_chars=2_000_000)
"""--quick: under 10 minutes on 2 CPU cores (measured figures in docs/convergence.md)."""
DEFAULT = BenchConfig(steps=360, h=30, batch_size=8, seq_len=64)
"""The default run: 12 rounds at H=30, 4x the tokens per step of --quick (about 20 minutes on
2 CPU cores); larger models and the paper's H=50 need a GPU."""


@dataclass
class Result:
    method: str
    h: int
    topk: int | None
    ef_rule: str | None
    replicas: int
    steps: int
    tokens_per_replica: int
    heldout_loss: float
    bytes_per_replica_per_round: int
    bytes_per_replica_per_step: int | None
    bytes_per_replica_total: int
    wall_s: float
    curve: list[tuple[int, int, float]]
    """(inner step, cumulative bytes sent per replica, held-out loss), every H steps."""

    @property
    def label(self) -> str:
        if self.method == "sparseloco":
            return f"sparseloco H={self.h} k={self.topk} ef={self.ef_rule}"
        if self.method == "diloco":
            return f"diloco H={self.h}"
        return self.method


# ---------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------


class Corpus:
    """The run's token data as the benchmark needs it: per-replica train batches, a held-out set."""

    def __init__(self, cfg: BenchConfig, data: TokenData):
        self.cfg = cfg
        self.data = data
        self.device = torch.device(cfg.device)
        ids = heldout_ids(cfg.eval_sequences, data)
        self.heldout = [data.batch(ids[i : i + cfg.batch_size]).to(self.device) for i in range(0, len(ids), cfg.batch_size)]
        self._assigned: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def load(cls, cfg: BenchConfig) -> Corpus:
        """Prepare (once, cached in ``cfg.data_dir``) and load the stdlib corpus."""
        manifest = cfg.manifest()
        root = Path(cfg.data_dir) / f"{manifest.data.seq_len}-{manifest.data.max_chars}"
        store = open_store(f"file://{root / 'store'}")
        t0 = time.perf_counter()
        try:
            data = TokenData.load(manifest, store, root / "cache")
        except LocoError as exc:  # not prepared yet, or prepared for another manifest
            log.info("preparing corpus in %s (%s)", root, type(exc).__name__)
            prepare(manifest, store)
            data = TokenData.load(manifest, store, root / "cache")
        log.info("corpus ready in %.1f s: %d train / %d held-out sequences", time.perf_counter() - t0, data.n_train, data.n_heldout)
        return cls(cfg, data)

    @property
    def vocab_size(self) -> int:
        return self.data.vocab_size

    def train_batch(self, replica: int, step: int) -> torch.Tensor:
        """int64 [B, T+1]: what replica ``replica`` trains on at inner step ``step``.

        Windows are always cut at ``cfg.h`` steps, so every method and every sweep H
        consumes the same sequences in the same order."""
        window, i = divmod(step, self.cfg.h)
        key = (replica, window)
        if key not in self._assigned:
            self._assigned[key] = assigned_batches(
                self.cfg.seed, window, f"replica-{replica}", self.cfg.h, self.cfg.batch_size, self.data.n_train
            )
        return self.data.batch(self._assigned[key][i]).to(self.device)

    @torch.no_grad()
    def heldout_loss(self, model: torch.nn.Module) -> float:
        model.eval()
        total = sum(float(lm_loss(model, b)) * len(b) for b in self.heldout)
        model.train()
        return total / sum(len(b) for b in self.heldout)


def _build(cfg: BenchConfig, corpus: Corpus) -> torch.nn.Module:
    return build_model(ModelConfig(preset=cfg.preset), corpus.vocab_size, cfg.seq_len, cfg.seed).to(cfg.device)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Methods with local steps: sparseloco, diloco, single
# ---------------------------------------------------------------------------------------


def _run_local(cfg: BenchConfig, corpus: Corpus, method: str) -> Result:
    """sparseloco / diloco (R replicas, outer step every H) or single (one replica, no outer step)."""
    t0 = time.perf_counter()
    manifest = cfg.manifest()
    global_model = _build(cfg, corpus)
    n_rep = 1 if method == "single" else cfg.replicas
    models = [copy.deepcopy(global_model) for _ in range(n_rep)]
    inners = [InnerLoop(m, manifest.inner) for m in models]
    params = dict(global_model.named_parameters())
    numel = _numel(global_model)

    if method == "sparseloco":
        layouts = model_layout({n: tuple(p.shape) for n, p in params.items()}, manifest.codec)
        feedback = [ErrorFeedback(layouts, manifest.codec, cfg.device) for _ in range(n_rep)]
        identity = Identity.from_seed(b"bench-convergence")
    elif method == "diloco":
        outer_opt = torch.optim.SGD(global_model.parameters(), lr=DILOCO_LR, momentum=DILOCO_MOMENTUM, nesterov=True)

    curve = [(0, 0, corpus.heldout_loss(global_model))]
    sent_total = 0
    round_bytes = 0
    for window in range(cfg.steps // cfg.h):
        deltas = []
        for r, (model, inner) in enumerate(zip(models, inners)):
            if method != "single":
                with torch.no_grad():
                    for p, g in zip(model.parameters(), global_model.parameters()):
                        p.copy_(g)
            inner.train([corpus.train_batch(r, window * cfg.h + i) for i in range(cfg.h)], window)
            if method != "single":
                with torch.no_grad():
                    deltas.append({n: params[n] - p for n, p in model.named_parameters()})

        with torch.no_grad():
            if method == "sparseloco":
                sent = [(f"replica-{r}", feedback[r].compress(d)) for r, d in enumerate(deltas)]
                payload = encode_payload(
                    run="bench-convergence",
                    window=window,
                    base_digest=bytes(DIGEST_BYTES),
                    tokens=cfg.h * cfg.batch_size * cfg.seq_len,
                    tensors=sent[0][1],
                    codec=manifest.codec,
                    identity=identity,
                )
                round_bytes = len(payload)
                agg = aggregate(sent, layouts, rule=manifest.outer.rule, clip=manifest.outer.clip)
                for n, p in params.items():
                    p.sub_(agg[n].to(p.device), alpha=SPARSELOCO_LR)
            elif method == "diloco":
                for n, p in params.items():
                    p.grad = torch.stack([d[n] for d in deltas]).mean(dim=0)
                outer_opt.step()
                round_bytes = 4 * numel
        sent_total += round_bytes
        eval_model = models[0] if method == "single" else global_model
        curve.append(((window + 1) * cfg.h, sent_total, corpus.heldout_loss(eval_model)))
        log.info("%s H=%d round %d: held-out %.4f", method, cfg.h, window, curve[-1][2])

    return Result(
        method=method,
        h=cfg.h,
        topk=cfg.topk if method == "sparseloco" else None,
        ef_rule=cfg.ef_rule if method == "sparseloco" else None,
        replicas=n_rep,
        steps=cfg.steps,
        tokens_per_replica=cfg.steps * cfg.batch_size * cfg.seq_len,
        heldout_loss=curve[-1][2],
        bytes_per_replica_per_round=round_bytes,
        bytes_per_replica_per_step=None,
        bytes_per_replica_total=sent_total,
        wall_s=round(time.perf_counter() - t0, 2),
        curve=curve,
    )


# ---------------------------------------------------------------------------------------
# Methods that communicate every step: ddp, ddp_loco
# ---------------------------------------------------------------------------------------


def _run_ddp(cfg: BenchConfig, corpus: Corpus, method: str) -> Result:
    """One model; each step every replica's gradient on its own batch, averaged (fp32 or LoCo)."""
    t0 = time.perf_counter()
    manifest = cfg.manifest()
    model = _build(cfg, corpus)
    inner = InnerLoop(model, manifest.inner)  # owns the AdamW optimizer and its param groups
    params = list(model.parameters())
    numel = _numel(model)
    loco = LocoConfig()
    workers = [LocoCompressor(loco, numel, cfg.device) for _ in range(cfg.replicas)] if method == "ddp_loco" else []
    step_bytes = loco.payload_bytes(numel) if method == "ddp_loco" else 4 * numel

    curve = [(0, 0, corpus.heldout_loss(model))]
    for step in range(cfg.steps):
        grads = []
        for r in range(cfg.replicas):
            model.zero_grad(set_to_none=True)
            lm_loss(model, corpus.train_batch(r, step)).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))  # [numel]
        if method == "ddp_loco":
            avg = average_quantized([w.encode(g) for w, g in zip(workers, grads)], loco)
        else:
            avg = torch.stack(grads).mean(dim=0)
        offset = 0
        for p in params:
            p.grad = avg[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for group in inner.optimizer.param_groups:
            group["lr"] = lr_at(step, manifest.inner)
        torch.nn.utils.clip_grad_norm_(params, manifest.inner.grad_clip)
        inner.optimizer.step()
        if (step + 1) % cfg.h == 0:
            curve.append((step + 1, (step + 1) * step_bytes, corpus.heldout_loss(model)))
            log.info("%s step %d: held-out %.4f", method, step + 1, curve[-1][2])

    return Result(
        method=method,
        h=cfg.h,
        topk=None,
        ef_rule=None,
        replicas=cfg.replicas,
        steps=cfg.steps,
        tokens_per_replica=cfg.steps * cfg.batch_size * cfg.seq_len,
        heldout_loss=curve[-1][2],
        bytes_per_replica_per_round=cfg.h * step_bytes,
        bytes_per_replica_per_step=step_bytes,
        bytes_per_replica_total=cfg.steps * step_bytes,
        wall_s=round(time.perf_counter() - t0, 2),
        curve=curve,
    )


def run_method(cfg: BenchConfig, corpus: Corpus, method: str) -> Result:
    """Train and evaluate one method under ``cfg``."""
    torch.manual_seed(cfg.seed)
    if method in ("ddp", "ddp_loco"):
        return _run_ddp(cfg, corpus, method)
    if method in ("sparseloco", "diloco", "single"):
        return _run_local(cfg, corpus, method)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


def sweep_configs(cfg: BenchConfig) -> list[tuple[BenchConfig, str]]:
    """--sweep: diloco per H, sparseloco per (H, top-k), and the "loco" error-feedback rule.

    Steps are rounded up to a multiple of every swept H, so all runs see equal tokens."""
    period = math.lcm(*SWEEP_H)
    cfg = replace(cfg, steps=-(-cfg.steps // period) * period)
    runs: list[tuple[BenchConfig, str]] = []
    for h in SWEEP_H:
        runs.append((replace(cfg, h=h), "diloco"))
        runs.extend((replace(cfg, h=h, topk=k), "sparseloco") for k in SWEEP_TOPK)
    runs.append((replace(cfg, ef_rule="loco"), "sparseloco"))
    return runs


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def summarize(results: list[Result], wall_s: float) -> dict:
    """The goal checks, on whichever of the default-configuration results are present."""
    by = {r.method: r for r in results if r.ef_rule in (None, "sparseloco")}
    main_h = results[0].h if results else 0
    sl = next((r for r in results if r.method == "sparseloco" and r.ef_rule == "sparseloco" and r.topk == 64 and r.h == main_h), None)
    dl = next((r for r in results if r.method == "diloco" and r.h == main_h), None)
    checks: dict[str, bool | None] = {"sparseloco_loss_le_diloco": None, "bytes_ratio_ge_150": None, "ddp_loco_within_1pct_of_ddp": None}
    figures: dict[str, float] = {}
    if sl and dl:
        figures["sparseloco_minus_diloco_loss"] = round(sl.heldout_loss - dl.heldout_loss, 4)
        figures["diloco_over_sparseloco_bytes"] = round(dl.bytes_per_replica_per_round / sl.bytes_per_replica_per_round, 1)
        checks["sparseloco_loss_le_diloco"] = sl.heldout_loss <= dl.heldout_loss
        checks["bytes_ratio_ge_150"] = figures["diloco_over_sparseloco_bytes"] >= 150
    if "ddp" in by and "ddp_loco" in by:
        rel = (by["ddp_loco"].heldout_loss - by["ddp"].heldout_loss) / by["ddp"].heldout_loss
        figures["ddp_loco_rel_loss_gap"] = round(rel, 5)
        figures["ddp_over_ddp_loco_bytes"] = round(by["ddp"].bytes_per_replica_per_step / by["ddp_loco"].bytes_per_replica_per_step, 2)
        checks["ddp_loco_within_1pct_of_ddp"] = abs(rel) <= 0.01
    return {"bench": "convergence", "summary": True, "checks": checks, "figures": figures, "wall_s": round(wall_s, 1)}


def plot(results: list[Result], out: str) -> None:
    """Held-out loss vs inner steps and vs bytes sent per replica (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_bytes) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        steps, sent, loss = zip(*r.curve)
        ax_steps.plot(steps, loss, label=r.label)
        if r.bytes_per_replica_total:
            ax_bytes.plot(sent[1:], loss[1:], marker=".", label=r.label)
    ax_steps.set(xlabel="inner steps per replica", ylabel="held-out loss", title="loss vs steps (equal tokens)")
    ax_bytes.set(xscale="log", xlabel="bytes sent per replica (cumulative)", ylabel="held-out loss", title="loss vs communication")
    for ax in (ax_steps, ax_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _record(r: Result) -> dict:
    rec = {"bench": "convergence", **asdict(r)}
    rec["heldout_loss"] = round(r.heldout_loss, 5)
    rec["curve"] = [[s, b, round(l, 5)] for s, b, l in r.curve]
    return rec


def run_all(cfg: BenchConfig, *, sweep: bool = False, emit: Callable[[dict], None] = lambda rec: None) -> tuple[list[Result], dict]:
    """Every method (or the sweep) under ``cfg``; ``emit`` receives each JSON record as it is made."""
    t0 = time.perf_counter()
    corpus = Corpus.load(cfg)
    runs = sweep_configs(cfg) if sweep else [(cfg, m) for m in METHODS]
    results = []
    for run_cfg, method in runs:
        result = run_method(run_cfg, corpus, method)
        results.append(result)
        emit(_record(result))
    summary = summarize(results, time.perf_counter() - t0)
    emit(summary)
    return results, summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``locoswarm bench convergence``."""
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.add_argument("--quick", action="store_true", help="finishes in under 10 minutes on 2 CPU cores")
    p.add_argument("--sweep", action="store_true", help="sweep H and top-k density; EF variants")
    p.add_argument("--replicas", type=int, default=4, help="replicas per method (default 4)")
    p.add_argument("--out", default="convergence.png", help="where to write the plot (default convergence.png)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``locoswarm bench convergence [--json] [--quick] [--sweep] [--replicas R] [--out PNG] [--device D]``."""
    torch.set_num_threads(2)
    cfg = replace(QUICK if args.quick else DEFAULT, replicas=args.replicas, device=args.device)

    def emit(rec: dict) -> None:
        if args.json:
            print(json.dumps(rec), flush=True)
        elif rec.get("summary"):
            print(f"checks: {rec['checks']}  figures: {rec['figures']}  wall {rec['wall_s']} s", flush=True)
        else:
            label = rec["method"] + (f" H={rec['h']} k={rec['topk']} ef={rec['ef_rule']}" if rec["topk"] else f" H={rec['h']}")
            print(
                f"{label:40s} held-out {rec['heldout_loss']:.4f}  bytes/replica/round {rec['bytes_per_replica_per_round']:>12,}"
                f"  total {rec['bytes_per_replica_total']:>14,}  {rec['wall_s']:7.1f} s",
                flush=True,
            )

    results, _ = run_all(cfg, sweep=args.sweep, emit=emit)
    plot(results, args.out)
    log.info("wrote %s", args.out)
    return 0
