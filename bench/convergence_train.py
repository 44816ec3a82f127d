"""Training loops of the convergence bench: one method variant, one seed, at equal tokens.

R replicas of the run's model train one after another in this process (no networking) on
the bench's corpus, every replica taking the batches ``assigned_batches`` gives peer
``replica-r``. Batches are assigned per data block of ``cfg.block`` steps, a divisor of
every H the bench runs, so every method and every H sees the same sequences in the same
order: only how often and what replicas communicate differs.

    sparseloco  H local AdamW steps, pseudo-gradient -> ``protocol.codec.ErrorFeedback``
                (chunked top-k, 2-bit) -> ``protocol.aggregate`` (mean_selected, median clip)
                -> outer SGD; bytes are the real signed payload (``protocol.wire``)
    diloco      H local AdamW steps, dense fp32 pseudo-gradients averaged, outer SGD with
                Nesterov momentum (momentum 0 and lr 1: plain model averaging)
    ddp         AdamW on the gradient averaged over the R replicas every step
    ddp_loco    the same with LoCo 4-bit error-compensated gradients (``node.loco``)
    single      one replica alone, same steps (R times fewer tokens)

Bytes per replica per round, by each method's own topology: sparseloco publishes one payload
to the store and fetches the R-1 others; diloco and ddp use a ring all-reduce (each replica
sends and receives 2(R-1)/R of the fp32 vector per all-reduce, the cheapest dense scheme);
ddp_loco all-gathers its codes (sends and receives R-1 payloads: codes cannot be summed).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sysconfig
import time
from dataclasses import dataclass, field
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
    TokenizerConfig,
)
from protocol.stores import open_store
from protocol.wire import DIGEST_BYTES, encode_payload

log = logging.getLogger(__name__)

METHODS = ("sparseloco", "diloco", "ddp", "ddp_loco", "single")
LOCAL_METHODS = ("sparseloco", "diloco", "single")

MICRO_MODEL = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 192,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
    "bos_token_id": 0, "eos_token_id": 0, "use_cache": False,
}
"""model = "micro": a 2-layer Llama of width 64 (0.24 M parameters at vocabulary 1024), built by
``node.model`` from an HF config like any "hf" run; on 2 CPU cores a step costs what Python
overhead costs, so the whole default sweep fits in minutes."""

SKIP_DIRS = frozenset({"test", "tests", "testing", "__pycache__"})


@dataclass(frozen=True)
class Scale:
    """Model, data and token budget of one bench size (the sweep lives in ``bench.convergence``)."""

    name: str
    model: str
    """A ``node.model`` preset, or "micro" (``MICRO_MODEL``)."""
    corpus: str
    """"stdlib" (the run's default source) or "site-packages" (this interpreter's, .py files)."""
    vocab_size: int
    max_chars: int
    """Characters of the corpus to tokenize."""
    replicas: int
    steps: int
    """Inner steps per replica (= optimizer steps of the DDP variants); a multiple of every H."""
    batch_size: int
    """Sequences per replica per step."""
    seq_len: int
    eval_sequences: int
    lr: float = 2e-3
    """Inner AdamW peak lr, shared by every method (warmup steps/15, cosine to 10 %)."""
    block: int = 15
    """Steps per data-assignment block; divides every H, so all methods see the same data."""
    eval_every: int = 15
    """ddp / ddp_loco: held-out loss every this many steps (local methods: every round)."""
    device: str = "cpu"
    data_dir: str = ""
    """A file store + shard cache for the prepared corpus; reused between runs."""

    def __post_init__(self) -> None:
        if self.steps % self.block or self.replicas < 1:
            raise ValueError(f"steps={self.steps} must be a multiple of block={self.block}, replicas >= 1")

    @property
    def tokens_per_replica(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def manifest(self, h: int, codec: CodecConfig | None = None) -> Manifest:
        """The run description data, model and optimizers are built from (inner.steps = H)."""
        model = ModelConfig(preset=self.model) if self.model != "micro" else ModelConfig(preset="hf", hf_config=self._micro_json())
        return Manifest(
            model=model,
            tokenizer=TokenizerConfig(vocab_size=self.vocab_size),
            data=DataConfig(source=self._source(), max_chars=self.max_chars, seq_len=self.seq_len,
                            batch_size=self.batch_size, eval_sequences=self.eval_sequences),
            inner=InnerConfig(steps=h, lr=self.lr, warmup_steps=max(1, self.steps // 15), total_steps=self.steps),
            codec=codec or CodecConfig(),
        )

    def _root(self) -> Path:
        return Path(self.data_dir) / f"{self.corpus}-v{self.vocab_size}-s{self.seq_len}-c{self.max_chars}"

    def _micro_json(self) -> str:
        path = Path(self.data_dir) / "micro-model.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(MICRO_MODEL, sort_keys=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return str(path)

    def _source(self) -> str:
        if self.corpus == "stdlib":
            return "stdlib"
        if self.corpus == "site-packages":
            return str(self._root() / "text")
        raise ValueError(f"unknown corpus {self.corpus!r}: use 'stdlib' or 'site-packages'")


def link_site_packages(dest: Path, max_chars: int) -> None:
    """Fill ``dest`` with numbered links to this interpreter's site-packages .py files (sorted,
    tests left out) until ``max_chars`` bytes: a text source ``node.corpus`` reads in order."""
    if dest.exists():
        return
    root = Path(sysconfig.get_paths()["purelib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, f in enumerate(sorted(files, key=lambda p: p.relative_to(root).as_posix())):
        if total >= max_chars:
            break
        (tmp / f"{i:07d}.py").symlink_to(f)
        total += f.stat().st_size
    tmp.rename(dest)
    log.info("linked %d site-packages files (%d bytes) under %s", i, total, dest)


class Corpus:
    """The bench's token data: per-replica train batches by data block, a held-out set."""

    def __init__(self, scale: Scale, data: TokenData):
        self.scale = scale
        self.data = data
        self.device = torch.device(scale.device)
        ids = heldout_ids(scale.eval_sequences, data)
        bs = scale.batch_size
        self.heldout = [data.batch(ids[i : i + bs]).to(self.device) for i in range(0, len(ids), bs)]
        self._assigned: dict[tuple[int, int, int], np.ndarray] = {}

    @classmethod
    def load(cls, scale: Scale) -> Corpus:
        """Prepare (once, cached under ``scale.data_dir``) and load the scale's corpus."""
        manifest = scale.manifest(scale.block)
        root = scale._root()
        if scale.corpus == "site-packages":
            link_site_packages(root / "text", scale.max_chars)
        store = open_store(f"file://{root / 'store'}")
        t0 = time.perf_counter()
        try:
            data = TokenData.load(manifest, store, root / "cache")
        except LocoError as exc:  # not prepared yet, or prepared for another manifest
            log.info("preparing corpus in %s (%s)", root, type(exc).__name__)
            prepare(manifest, store)
            data = TokenData.load(manifest, store, root / "cache")
        log.info("corpus ready in %.1f s: %d train / %d held-out sequences, vocab %d",
                 time.perf_counter() - t0, data.n_train, data.n_heldout, data.vocab_size)
        return cls(scale, data)

    def train_batch(self, seed: int, replica: int, step: int) -> torch.Tensor:
        """int64 [B, T+1]: what replica ``replica`` trains on at inner step ``step``, whatever H."""
        block, i = divmod(step, self.scale.block)
        key = (seed, replica, block)
        if key not in self._assigned:
            self._assigned[key] = assigned_batches(
                seed, block, f"replica-{replica}", self.scale.block, self.scale.batch_size, self.data.n_train
            )
        return self.data.batch(self._assigned[key][i]).to(self.device)

    @torch.no_grad()
    def heldout_loss(self, model: torch.nn.Module) -> float:
        model.eval()
        total = sum(float(lm_loss(model, b)) * len(b) for b in self.heldout)
        model.train()
        return total / sum(len(b) for b in self.heldout)


@dataclass(frozen=True)
class Variant:
    """One method with its settings; ``label`` names it in every report."""

    method: str
    h: int
    outer_lr: float = 1.0
    """sparseloco / diloco: alpha in theta <- theta - alpha * update."""
    momentum: float = 0.0
    """diloco: Nesterov momentum of the outer SGD (0 = none)."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """sparseloco: the run's codec options (top-k, error feedback), as a manifest holds them."""
    land: float | None = None
    """sparseloco with ``inner.overlap``: window w+1 trains from theta(w) while window w is
    exchanged, and the window-w aggregate lands (is subtracted from every replica's local
    weights) after this fraction of its H steps, as ``node.overlap`` does; None = serial."""
    eager: bool = False
    """With ``land``: window w+1 trains on from each replica's own end of window w (its own
    pseudo-gradient standing in for the aggregate, as in eager updates), and the landing
    swaps that stand-in for the real aggregate; else it trains from theta(w)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {METHODS}")
        if self.land is not None and (self.method != "sparseloco" or not 0.0 <= self.land <= 1.0):
            raise ValueError("land: a fraction in [0, 1], for sparseloco only")
        if self.eager and self.land is None:
            raise ValueError("eager: only with land (an overlapped variant)")

    @property
    def label(self) -> str:
        if self.method == "sparseloco":
            extra = "".join(f" {k}={v}" for k, v in codec_options(self.codec).items() if k != "topk")
            lr = f" lr={self.outer_lr:g}" if self.outer_lr != 1.0 else ""
            overlap = f" overlap@{self.land:g}{' eager' if self.eager else ''}" if self.land is not None else ""
            return f"sparseloco H={self.h} k={self.codec.topk}{lr}{extra}{overlap}"
        if self.method == "diloco":
            if self.momentum == 0.0 and self.outer_lr == 1.0:
                return f"diloco H={self.h} avg"
            return f"diloco H={self.h} lr={self.outer_lr:g} nesterov={self.momentum:g}"
        return self.method


def codec_options(codec: CodecConfig) -> dict[str, object]:
    """The codec fields that differ from the manifest's defaults."""
    default = CodecConfig()
    return {k: v for k, v in vars(codec).items() if v != getattr(default, k)}


@dataclass
class Result:
    label: str
    method: str
    h: int
    seed: int
    topk: int | None
    options: dict[str, float]
    """sparseloco: codec options other than top-k that differ from the manifest's defaults, and
    ``overlap_land`` when overlapped."""
    replicas: int
    steps: int
    tokens_per_replica: int
    heldout_loss: float
    payload_bytes: int
    """What one replica publishes per round (sparseloco: mean signed payload; else fp32 / LoCo codes)."""
    sent_bytes_per_round: float
    """Per replica per H steps, by the method's topology (module docstring)."""
    received_bytes_per_round: float
    wall_s: float
    curve: list[tuple[int, float]]
    """(inner step, held-out loss)."""

    @property
    def bytes_per_round(self) -> float:
        """Sent + received per replica per round: what a replica's link carries."""
        return self.sent_bytes_per_round + self.received_bytes_per_round


def _ring_allreduce(numel: int, replicas: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``numel`` fp32 values."""
    return 2 * (replicas - 1) / replicas * 4 * numel


def _build(scale: Scale, manifest: Manifest, corpus: Corpus, seed: int) -> torch.nn.Module:
    return build_model(manifest.model, corpus.data.vocab_size, scale.seq_len, seed).to(scale.device)


def _run_local(scale: Scale, corpus: Corpus, v: Variant, seed: int) -> Result:
    """sparseloco / diloco (R replicas, outer step every H) or single (one replica, no outer step)."""
    t0 = time.perf_counter()
    manifest = scale.manifest(v.h, v.codec)
    global_model = _build(scale, manifest, corpus, seed)
    n_rep = 1 if v.method == "single" else scale.replicas
    models = [copy.deepcopy(global_model) for _ in range(n_rep)]
    inners = [InnerLoop(m, manifest.inner) for m in models]
    params = dict(global_model.named_parameters())
    numel = sum(p.numel() for p in params.values())

    if v.method == "sparseloco":
        layouts = model_layout({n: tuple(p.shape) for n, p in params.items()}, manifest.codec)
        feedback = [ErrorFeedback(layouts, manifest.codec, scale.device) for _ in range(n_rep)]
        identity = Identity.from_seed(b"bench-convergence")
    elif v.method == "diloco":
        outer = torch.optim.SGD(global_model.parameters(), lr=v.outer_lr, momentum=v.momentum, nesterov=v.momentum > 0)

    curve = [(0, corpus.heldout_loss(global_model))]
    payloads = []
    rounds = scale.steps // v.h
    start = global_model  # where every replica's window begins: theta(w), or theta(w-1) when overlapped
    shifts: list[dict[str, torch.Tensor]] | None = None  # overlapped: what lands in each replica mid-window
    land = round(v.land * v.h) if v.land is not None else 0
    for window in range(rounds):
        deltas = []
        for r, (model, inner) in enumerate(zip(models, inners)):
            if v.method != "single" and not (v.eager and shifts is not None):
                with torch.no_grad():
                    for p, g in zip(model.parameters(), start.parameters()):
                        p.copy_(g)
            batches = [corpus.train_batch(seed, r, window * v.h + i) for i in range(v.h)]
            if shifts is not None:
                _land_after(inner, model, batches, window, land, shifts[r])
            else:
                inner.train(batches, window)
            if v.method != "single":
                with torch.no_grad():
                    deltas.append({n: params[n] - p for n, p in model.named_parameters()})

        with torch.no_grad():
            if v.method == "sparseloco":
                sent = [(f"replica-{r}", feedback[r].compress(d)) for r, d in enumerate(deltas)]
                payloads.append(len(encode_payload(
                    run="bench-convergence", window=window, base_digest=bytes(DIGEST_BYTES),
                    tokens=v.h * scale.batch_size * scale.seq_len, tensors=sent[0][1], codec=manifest.codec,
                    identity=identity,
                )))
                update = aggregate(sent, layouts, rule=manifest.outer.rule, clip=manifest.outer.clip)
                if v.land is not None:  # the next window trains from theta(w) (or on); this update lands in it
                    start = copy.deepcopy(global_model)
                    shifts = [{n: v.outer_lr * update[n].to(params[n].device) - (d[n] if v.eager else 0.0) for n in params}
                              for d in deltas]
                for n, p in params.items():
                    p.sub_(update[n].to(p.device), alpha=v.outer_lr)
            elif v.method == "diloco":
                for n, p in params.items():
                    p.grad = torch.stack([d[n] for d in deltas]).mean(dim=0)
                outer.step()
        eval_model = models[0] if v.method == "single" else global_model
        curve.append(((window + 1) * v.h, corpus.heldout_loss(eval_model)))
        log.debug("%s seed %d round %d: held-out %.4f", v.label, seed, window, curve[-1][1])

    if v.method == "sparseloco":
        payload = round(sum(payloads) / len(payloads))
        sent_b, recv_b = float(payload), float((n_rep - 1) * payload)
    elif v.method == "diloco":
        payload = 4 * numel
        sent_b = recv_b = _ring_allreduce(numel, n_rep)
    else:
        payload, sent_b, recv_b = 0, 0.0, 0.0
    return _result(scale, v, seed, n_rep, payload, sent_b, recv_b, curve, t0)


def _land_after(inner: InnerLoop, model: torch.nn.Module, batches: list[torch.Tensor], window: int, land: int,
                shift: dict[str, torch.Tensor]) -> None:
    """Train ``batches`` and subtract ``shift`` (``lr * update``, less the stand-in when eager)
    from the local weights after ``land`` of them, between two steps (at the start when 0),
    as an overlapped peer's ``apply_landed``."""
    def apply() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.sub_(shift[n])

    done = 0

    def after_step() -> None:
        nonlocal done
        done += 1
        if done == land:
            apply()

    if land == 0:
        apply()
    inner.train(batches, window, after_step=after_step)


def _run_ddp(scale: Scale, corpus: Corpus, v: Variant, seed: int) -> Result:
    """One model; each step every replica's gradient on its own batch, averaged (fp32 or LoCo)."""
    t0 = time.perf_counter()
    manifest = scale.manifest(v.h)
    model = _build(scale, manifest, corpus, seed)
    inner = InnerLoop(model, manifest.inner)  # owns the AdamW optimizer and its param groups
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    loco = LocoConfig()
    workers = [LocoCompressor(loco, numel, scale.device) for _ in range(scale.replicas)] if v.method == "ddp_loco" else []

    curve = [(0, corpus.heldout_loss(model))]
    for step in range(scale.steps):
        grads = []
        for r in range(scale.replicas):
            model.zero_grad(set_to_none=True)
            lm_loss(model, corpus.train_batch(seed, r, step)).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))  # [numel]
        if v.method == "ddp_loco":
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
        if (step + 1) % scale.eval_every == 0:
            curve.append((step + 1, corpus.heldout_loss(model)))

    if v.method == "ddp_loco":
        payload = loco.payload_bytes(numel)
        sent_b = recv_b = float(v.h * (scale.replicas - 1) * payload)
    else:
        payload = 4 * numel
        sent_b = recv_b = v.h * _ring_allreduce(numel, scale.replicas)
    return _result(scale, v, seed, scale.replicas, payload, sent_b, recv_b, curve, t0)


def _result(scale: Scale, v: Variant, seed: int, n_rep: int, payload: int, sent_b: float, recv_b: float,
            curve: list[tuple[int, float]], t0: float) -> Result:
    return Result(
        label=v.label, method=v.method, h=v.h, seed=seed,
        topk=v.codec.topk if v.method == "sparseloco" else None,
        options=_options(v),
        replicas=n_rep, steps=scale.steps, tokens_per_replica=scale.tokens_per_replica,
        heldout_loss=curve[-1][1], payload_bytes=payload,
        sent_bytes_per_round=sent_b, received_bytes_per_round=recv_b,
        wall_s=round(time.perf_counter() - t0, 2), curve=curve,
    )


def _options(v: Variant) -> dict[str, float]:
    if v.method != "sparseloco":
        return {}
    out = {k: o for k, o in codec_options(v.codec).items() if k != "topk"}
    return out | ({"overlap_land": v.land} if v.land is not None else {}) | ({"eager": 1.0} if v.eager else {})


def run_variant(scale: Scale, corpus: Corpus, v: Variant, seed: int) -> Result:
    """Train and evaluate one variant with one seed (model init and data assignment)."""
    torch.manual_seed(seed)
    if v.method in LOCAL_METHODS:
        return _run_local(scale, corpus, v, seed)
    return _run_ddp(scale, corpus, v, seed)
