"""The dense DiLoCo **baseline** of the WAN bench: not the product (locoswarm has no dense mode).

Three worker processes (``python -m bench.wan_dense CONFIG``), one per peer namespace, run
windows of a bench-only re-implementation of the window path with dense payloads: H real
AdamW inner steps on random tokens (same model, H, sequence length and batch as the
product's peers in the same bench), the fp32 pseudo-gradient as safetensors, upload, poll
the store until every peer's object of the window is listed, download the others, mean,
outer step. Replicas end bit-identical (the bench checks their digests). Per window and
peer it measures ``compute``, ``codec`` (serialisation), ``upload``, ``wait``,
``download``, ``aggregate`` (decode + mean + apply) and ``wall``: this worker has no
accounting of its own, so it times itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from bench.netns import Network
from bench.procs import Processes, bench_env, tail
from node.replica import Replica
from protocol import paths
from protocol.errors import LayoutMismatch, MalformedPayload, NonFinite, StoreError
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.retry import RetryPolicy
from protocol.stores.s3 import S3Store

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
"""How often a waiting worker lists the store for the window's other payloads."""
READY_TIMEOUT = 180.0
"""Seconds for all workers to import torch and build the model (2 shared CPU cores)."""
WINDOW_TIMEOUT = 180.0
"""Upper bound on one window (the dense payload at 10 Mbit/s takes ~15 s of transfers)."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs; written as JSON by the coordinator."""

    peer: int
    n_peers: int
    windows: int
    endpoint: str
    bucket: str
    inner_steps: int
    vocab: int
    seq_len: int
    batch: int
    ready_path: str
    go_path: str
    result_path: str


def _identity(peer: int) -> Identity:
    """Deterministic identities, so every worker knows every peer id without talking."""
    return Identity.from_seed(f"locoswarm-wan-dense-{peer}".encode())


class _Worker:
    """One peer's replica, inner loop and store, running dense windows back to back."""

    def __init__(self, cfg: WorkerConfig):
        from node.inner import InnerLoop
        from node.model import build_model, param_shapes

        self.cfg = cfg
        self.manifest = Manifest().replace(run__id="wan-dense", inner__steps=cfg.inner_steps)
        self.model = build_model(self.manifest.model, cfg.vocab, cfg.seq_len, self.manifest.run.seed)
        self.replica = Replica(dict(self.model.named_parameters()), 0)
        self.inner = InnerLoop(self.model, self.manifest.inner)
        self.shapes = param_shapes(self.model)
        self.ids = [_identity(p).peer_id for p in range(cfg.n_peers)]
        self.peer_id = _identity(cfg.peer).peer_id
        self.max_bytes = 4 * sum(torch.Size(s).numel() for s in self.shapes.values()) + (1 << 20)
        self.store = S3Store(cfg.bucket, "diloco_dense", endpoint_url=cfg.endpoint, create_bucket=True,
                             policy=RetryPolicy(request_timeout=60.0, attempts=3))

    def window(self, w: int) -> dict:
        """Train, serialise, upload, wait, download, mean, apply; seconds per phase."""
        t: dict[str, float] = {}
        start = time.perf_counter()
        seed = int.from_bytes(hashlib.sha256(f"{w}/{self.cfg.peer}".encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        batches = [torch.randint(0, self.cfg.vocab, (self.cfg.batch, self.cfg.seq_len + 1), generator=gen)
                   for _ in range(self.cfg.inner_steps)]
        self.inner.train(batches, w)
        t["compute"] = time.perf_counter() - start

        mark = time.perf_counter()
        delta = self.replica.pseudo_gradient(self.model)
        blob = save_safetensors({name: d.contiguous() for name, d in delta.items()})
        t["codec"] = time.perf_counter() - mark

        mark = time.perf_counter()
        self.store.put(paths.payload_key(w, self.peer_id), blob)
        t["upload"] = time.perf_counter() - mark

        mark = time.perf_counter()
        want = {paths.payload_key(w, p) for p in self.ids}
        while not want <= {o.key for o in self.store.list(paths.payloads_prefix(w))}:
            if time.perf_counter() - mark > WINDOW_TIMEOUT:
                raise TimeoutError(f"window {w}: not every peer published within {WINDOW_TIMEOUT:.0f}s")
            time.sleep(POLL_SECONDS)
        t["wait"] = time.perf_counter() - mark

        mark = time.perf_counter()
        blobs = {p: blob if p == self.peer_id else self.store.get(paths.payload_key(w, p), max_bytes=self.max_bytes)
                 for p in self.ids}
        t["download"] = time.perf_counter() - mark

        mark = time.perf_counter()
        deltas = [load_dense_payload(peer, data, self.shapes) for peer, data in sorted(blobs.items())]
        self.replica.apply({name: torch.stack([d[name] for d in deltas]).mean(0) for name in self.shapes},
                           self.manifest.outer.lr)
        self.replica.load_into(self.model)
        t["aggregate"] = time.perf_counter() - mark
        t["wall"] = time.perf_counter() - start
        return {"window": w, "peer": self.cfg.peer, "payload_bytes": len(blob), "digest": self.replica.digest.hex(), **t}


def load_dense_payload(peer: str, data: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A dense fp32 pseudo-gradient from safetensors bytes (no pickle), checked against the model."""
    try:
        tensors = load_safetensors(data)
    except SafetensorError as exc:
        raise MalformedPayload(f"dense payload is not valid safetensors: {exc}", peer=peer) from exc
    if set(tensors) != set(shapes):
        raise LayoutMismatch(f"dense payload tensors differ from the model's: {sorted(set(tensors) ^ set(shapes))[:4]}",
                             peer=peer)
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shapes[name]) or t.dtype != torch.float32:
            raise LayoutMismatch(f"dense tensor {name!r} is {t.dtype} {tuple(t.shape)}, want float32 {shapes[name]}",
                                 peer=peer)
        if not torch.isfinite(t).all():
            raise NonFinite(f"dense tensor {name!r} holds NaN or infinite values", peer=peer)
    return tensors


def worker_main(config_path: str) -> None:
    """One worker process: build, report ready, wait for "go", run, write results."""
    torch.set_num_threads(1)
    cfg = WorkerConfig(**json.loads(Path(config_path).read_text()))
    deadline = time.time() + 60.0
    while True:  # the S3 server in the store namespace may still be starting
        try:
            worker = _Worker(cfg)
            break
        except StoreError as exc:
            if time.time() > deadline:
                raise
            log.info("store not ready yet (%s); retrying", exc)
            time.sleep(0.5)
    Path(cfg.ready_path).write_text("ready")
    deadline = time.time() + READY_TIMEOUT
    while not Path(cfg.go_path).exists():
        if time.time() > deadline:
            raise TimeoutError("the coordinator never said go")
        time.sleep(0.02)
    rows = [worker.window(w) for w in range(cfg.windows)]
    worker.store.close()
    tmp = cfg.result_path + ".tmp"
    Path(tmp).write_text(json.dumps(rows))
    os.replace(tmp, cfg.result_path)


def run_dense(net: Network, procs: Processes, endpoint: str, bucket: str, workdir: Path, *, windows: int,
              inner_steps: int, vocab: int, seq_len: int, batch: int) -> list[dict]:
    """Start one worker per peer namespace, release them together, collect their rows."""
    d = workdir / "diloco_dense"
    d.mkdir(parents=True)
    go = d / "go"
    peers = [name for name in net.hosts if name.startswith("peer")]
    started = []
    for i, host in enumerate(peers):
        cfg = WorkerConfig(i, len(peers), windows, endpoint, bucket, inner_steps, vocab, seq_len, batch,
                           str(d / f"ready{i}"), str(go), str(d / f"result{i}.json"))
        (d / f"config{i}.json").write_text(json.dumps(asdict(cfg)))
        argv = net.exec_argv(host, [sys.executable, "-m", "bench.wan_dense", str(d / f"config{i}.json")])
        started.append((procs.start(argv, d / f"log{i}.txt", bench_env()), d / f"log{i}.txt", cfg))
    deadline = time.time() + READY_TIMEOUT
    while not all(Path(c.ready_path).exists() for _, _, c in started):
        for proc, log_path, _ in started:
            if proc.poll() is not None:
                raise RuntimeError(f"dense worker exited {proc.returncode} before it was ready; log:\n{tail(log_path)}")
        if time.time() > deadline:
            raise RuntimeError(f"dense workers not ready after {READY_TIMEOUT:.0f}s")
        time.sleep(0.1)
    go.write_text(str(time.time()))
    deadline = time.time() + windows * WINDOW_TIMEOUT
    for proc, log_path, _ in started:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"a dense worker did not finish in time; log:\n{tail(log_path)}") from None
        if rc != 0:
            raise RuntimeError(f"dense worker exited {rc}; log:\n{tail(log_path)}")
    return [row for _, _, c in started for row in json.loads(Path(c.result_path).read_text())]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dense worker %(message)s")
    worker_main(sys.argv[1])
