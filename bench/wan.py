"""``locoswarm bench wan --json``: SparseLoCo against dense DiLoCo over emulated consumer uplinks.

What runs (needs root; otherwise one ``{"skipped": true, "reason": ...}`` line):

1. ``bench.netns.Network``: a namespace for the object store and one per peer, joined by
   veth pairs to a bridge; each peer's link is tbf-shaped both ways at 10, 50 and
   100 Mbit/s (heterogeneous consumer links; bandwidth only, no added latency).
2. A moto S3 server process inside the store namespace, reached through the product's
   ``S3Store`` (the same code a peer uses against AWS S3 or R2).
3. Per method, three worker processes (``python -m bench.wan worker CONFIG``), each inside its
   peer's namespace, run ``--windows`` windows of the real window path on the "tiny" preset:
   H real AdamW inner steps on *random tokens* (the data pipeline is not what is measured),
   pseudo-gradient, then

   - ``sparseloco``: ``ErrorFeedback`` + chunked top-k + 2-bit codec, ``encode_payload``
     (signed wire bytes); decode with ``decode_payload`` and ``protocol.aggregate``;
   - ``diloco_dense``: the fp32 pseudo-gradient as safetensors; the mean of all peers.

   Each peer uploads its object, polls the store until every peer's object of the window is
   listed, downloads the others, aggregates and applies the outer step (all replicas end
   bit-identical; the bench checks their digests). Per window and peer it measures
   ``compute`` (inner steps, padded by sleeping to ``--compute-seconds`` when given),
   ``codec`` (compress + encode), ``upload``, ``wait``, ``download``, ``aggregate`` (decode +
   aggregate + apply) and ``wall``; compute utilization = compute / wall.
4. Projections: SparseLoCo payload bytes follow exactly from the codec layout (section sizes
   are a pure function of tensor shapes, ``protocol.indexcode``), computed for the real
   tensor shapes of the 150m and 1b presets and of a Llama-2-70B-shaped model (meta device,
   nothing allocated), plus the header overhead measured on the tiny payload. Per-round
   comm time = upload of one payload + download of (peers - 1) payloads, no overlap
   between them or with compute, for 20 peers, on 100 Mbit/s and 1 Gbit/s links.

Output: one JSON line per method, one of projections, and a last summary line with the goal
check (SparseLoCo utilization >= 0.97 while dense DiLoCo is communication-bound, i.e. spends
more of its window communicating than computing: utilization < 0.5).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from bench.netns import Network, cleanup_leftovers, netns_available
from node.replica import Replica
from protocol import paths
from protocol.aggregate import aggregate
from protocol.codec import ErrorFeedback
from protocol.codec_types import model_layout
from protocol.errors import LayoutMismatch, MalformedPayload, NonFinite, StoreError
from protocol.identity import Identity
from protocol.indexcode import code_section_bytes, index_section_bytes
from protocol.manifest import CodecConfig, Manifest, ModelConfig
from protocol.stores.s3 import S3Store
from protocol.wire import Expectation, decode_payload, encode_payload

# node.model / node.inner import transformers (~8 s on a busy 2-core machine): imported
# where a model is built, so the skip path and the coordinator's waits do not pay for it.

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
METHODS = ("sparseloco", "diloco_dense")
PEER_LINKS_MBIT = (10.0, 50.0, 100.0)
STORE_PORT = 9000
BUCKET = "wan-bench"
VOCAB = 2048
"""Random-token vocabulary: the tiny preset's reference vocabulary (~1.4M parameters)."""
SEQ_LEN = 64
BATCH = 8
INNER_STEPS = 20
"""H: the manifest's default number of inner steps per window."""
POLL_SECONDS = 0.05
"""How often a waiting peer lists the store for the window's other payloads."""
READY_TIMEOUT = 180.0
"""Seconds for all workers to import torch and build the model (2 shared CPU cores)."""
WINDOW_TIMEOUT = 120.0
"""Upper bound on one window (the dense payload at 10 Mbit/s takes ~15 s of transfers)."""
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "wanbench", "AWS_SECRET_ACCESS_KEY": "wanbench", "AWS_DEFAULT_REGION": "us-east-1"}
"""moto accepts any credentials; fixed dummies keep boto3 away from real ones."""

PROJECTION_PEERS = 20
"""Peers per round in the projection (the reference system's order of magnitude)."""
PROJECTION_LINKS_MBIT = (100.0, 1000.0)
REFERENCE_70B_ROUND_SECONDS = 70.0
"""The reference system's published communication time per round at 70B parameters."""
UTILIZATION_GOAL = 0.97
COMM_BOUND_BELOW = 0.5
"""Dense DiLoCo counts as communication-bound when under half its window is compute."""


# ============================================================================ worker


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs; written as JSON by the coordinator."""

    method: str
    peer: int
    n_peers: int
    windows: int
    endpoint: str
    inner_steps: int
    compute_seconds: float | None
    ready_path: str
    go_path: str
    result_path: str


def _identity(peer: int) -> Identity:
    """Deterministic identities, so every worker knows every peer id without talking."""
    return Identity.from_seed(f"locoswarm-wan-bench-{peer}".encode())


class _Worker:
    """One peer's replica, inner loop, codec and store, running windows back to back."""

    def __init__(self, cfg: WorkerConfig):
        from node.inner import InnerLoop
        from node.model import build_model, param_shapes

        self.cfg = cfg
        self.manifest = Manifest().replace(run__id="wan-bench", model__preset="tiny", inner__steps=cfg.inner_steps)
        self.model = build_model(self.manifest.model, VOCAB, SEQ_LEN, self.manifest.run.seed)
        self.replica = Replica(dict(self.model.named_parameters()), 0)
        self.inner = InnerLoop(self.model, self.manifest.inner)
        self.shapes = param_shapes(self.model)
        self.layouts = model_layout(self.shapes, self.manifest.codec)
        self.ef = ErrorFeedback(self.layouts, self.manifest.codec)
        self.ids = [_identity(p).peer_id for p in range(cfg.n_peers)]
        self.identity = _identity(cfg.peer)
        self.max_bytes = 4 * sum(lay.numel for lay in self.layouts.values()) + (1 << 20)
        self.store = S3Store.from_uri(
            f"s3://{BUCKET}/{cfg.method}", endpoint_url=cfg.endpoint, request_timeout=60.0, retries=3,
            create_bucket=True,
        )

    # ---------------------------------------------------------------- one window
    def window(self, w: int) -> dict:
        """Train, encode, upload, wait, download, aggregate, apply; seconds per phase."""
        t: dict[str, float] = {}
        start = time.perf_counter()
        self._train(w)
        if self.cfg.compute_seconds is not None:
            time.sleep(max(0.0, self.cfg.compute_seconds - (time.perf_counter() - start)))
        t["compute"] = time.perf_counter() - start

        mark = time.perf_counter()
        blob = self._encode(w)
        t["codec"] = time.perf_counter() - mark

        mark = time.perf_counter()
        self.store.put(paths.payload_key(w, self.identity.peer_id), blob)
        t["upload"] = time.perf_counter() - mark

        mark = time.perf_counter()
        want = {paths.payload_key(w, p) for p in self.ids}
        while not want <= {o.key for o in self.store.list(paths.payloads_prefix(w))}:
            if time.perf_counter() - mark > WINDOW_TIMEOUT:
                raise TimeoutError(f"window {w}: not every peer published within {WINDOW_TIMEOUT:.0f}s")
            time.sleep(POLL_SECONDS)
        t["wait"] = time.perf_counter() - mark

        mark = time.perf_counter()
        blobs = {p: blob if p == self.identity.peer_id else self.store.get(paths.payload_key(w, p), max_bytes=self.max_bytes)
                 for p in self.ids}
        t["download"] = time.perf_counter() - mark

        mark = time.perf_counter()
        self._apply(w, blobs)
        t["aggregate"] = time.perf_counter() - mark
        t["wall"] = time.perf_counter() - start
        return {"window": w, "peer": self.cfg.peer, "payload_bytes": len(blob), "digest": self.replica.digest.hex(), **t}

    def _train(self, w: int) -> None:
        seed = int.from_bytes(hashlib.sha256(f"{w}/{self.cfg.peer}".encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        batches = [torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=gen) for _ in range(self.cfg.inner_steps)]
        self.inner.train(batches, w)

    def _encode(self, w: int) -> bytes:
        delta = self.replica.pseudo_gradient(self.model)
        if self.cfg.method == "sparseloco":
            return encode_payload(run=self.manifest.run_key, window=w, base_digest=self.replica.digest, tokens=0,
                                  tensors=self.ef.compress(delta), codec=self.manifest.codec, identity=self.identity)
        return save_safetensors({name: t.contiguous() for name, t in delta.items()})

    def _apply(self, w: int, blobs: Mapping[str, bytes]) -> None:
        if self.cfg.method == "sparseloco":
            tensors = {}
            for peer, data in blobs.items():
                expect = Expectation(run=self.manifest.run_key, window=w, layouts=self.layouts, codec=self.manifest.codec,
                                     max_bytes=self.max_bytes, peer_id=peer, base_digest=self.replica.digest)
                tensors[peer] = decode_payload(data, expect).tensors
            agg = aggregate(sorted(tensors.items()), self.layouts, rule=self.manifest.outer.rule,
                            clip=self.manifest.outer.clip)
        else:
            deltas = [load_dense_payload(peer, data, self.shapes) for peer, data in sorted(blobs.items())]
            agg = {name: torch.stack([d[name] for d in deltas]).mean(0) for name in self.shapes}
        self.replica.apply(agg, self.manifest.outer.lr)
        self.replica.load_into(self.model)


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
    """Entry point of one peer process: build, report ready, wait for "go", run, write results."""
    torch.set_num_threads(1)
    cfg = WorkerConfig(**json.loads(Path(config_path).read_text()))
    worker = _open_worker(cfg)
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


def _open_worker(cfg: WorkerConfig) -> _Worker:
    """Build the worker, retrying while the S3 server in the store namespace is starting."""
    deadline = time.time() + 60.0
    while True:
        try:
            return _Worker(cfg)
        except StoreError as exc:
            if time.time() > deadline:
                raise
            log.info("store not ready yet (%s); retrying", exc)
            time.sleep(0.5)


# ============================================================================ coordinator


class _Processes:
    """Processes started in namespaces; each runs in its own session so it can be killed whole."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=dict(env),
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self.procs.clear()


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **DUMMY_AWS)


def _wait_for_s3(net: Network, endpoint: str) -> None:
    """Block until the moto server answers inside its namespace (bounded)."""
    probe = ("import sys, time, urllib.request\n"
             "for _ in range(300):\n"
             "    try:\n"
             f"        urllib.request.urlopen({endpoint!r}, timeout=2); sys.exit(0)\n"
             "    except Exception:\n"
             "        time.sleep(0.1)\n"
             "sys.exit(1)\n")
    proc = subprocess.run(net.exec_argv("store", [sys.executable, "-c", probe]), check=False, timeout=60,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the S3 server at {endpoint} did not come up")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _run_method(net: Network, procs: _Processes, method: str, endpoint: str, workdir: Path, *, windows: int,
                inner_steps: int, compute_seconds: float | None) -> list[dict]:
    """Start one worker per peer in its namespace, release them together, collect their rows."""
    d = workdir / method
    d.mkdir()
    go = d / "go"
    peers = [name for name in net.hosts if name.startswith("peer")]
    started = []
    for i, host in enumerate(peers):
        cfg = WorkerConfig(method, i, len(peers), windows, endpoint, inner_steps, compute_seconds,
                           str(d / f"ready{i}"), str(go), str(d / f"result{i}.json"))
        (d / f"config{i}.json").write_text(json.dumps(asdict(cfg)))
        argv = net.exec_argv(host, [sys.executable, "-m", "bench.wan", "worker", str(d / f"config{i}.json")])
        started.append((procs.start(argv, d / f"log{i}.txt", _env()), d / f"log{i}.txt", cfg))
    deadline = time.time() + READY_TIMEOUT
    while not all(Path(c.ready_path).exists() for _, _, c in started):
        _check_alive(started)
        if time.time() > deadline:
            raise RuntimeError(f"{method}: workers not ready after {READY_TIMEOUT:.0f}s")
        time.sleep(0.1)
    go.write_text(str(time.time()))
    deadline = time.time() + windows * WINDOW_TIMEOUT
    for proc, log_path, _ in started:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{method}: a worker did not finish in time; log:\n{_tail(log_path)}") from None
        if rc != 0:
            raise RuntimeError(f"{method}: worker exited {rc}; log:\n{_tail(log_path)}")
    return [row for _, _, c in started for row in json.loads(Path(c.result_path).read_text())]


def _check_alive(started: list) -> None:
    for proc, log_path, _ in started:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited {proc.returncode} before it was ready; log:\n{_tail(log_path)}")


def summarize(method: str, rows: list[dict], links: list[float]) -> dict:
    """One method's line: medians over peers and windows, and whether the replicas agree."""
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 4)

    windows = sorted({r["window"] for r in rows})
    identical = all(len({r["digest"] for r in rows if r["window"] == w}) == 1 for w in windows)
    per_peer = {}
    for peer in sorted({r["peer"] for r in rows}):
        mine = [r for r in rows if r["peer"] == peer]
        per_peer[f"{links[peer]:g}"] = {
            k: round(statistics.median(r[k] for r in mine), 4) for k in ("wall", "upload", "wait", "download")
        }
    return {
        "method": method,
        "windows": len(windows),
        "peers": len(links),
        "link_mbit": links,
        "payload_bytes": int(statistics.median(r["payload_bytes"] for r in rows)),
        "wall_s": med("wall"),
        "compute_s": med("compute"),
        "codec_s": med("codec"),
        "upload_s": med("upload"),
        "wait_s": med("wait"),
        "download_s": med("download"),
        "aggregate_s": med("aggregate"),
        "compute_utilization": round(statistics.median(r["compute"] / r["wall"] for r in rows), 4),
        "network_fraction": round(statistics.median((r["upload"] + r["wait"] + r["download"]) / r["wall"] for r in rows), 4),
        "replicas_identical": identical,
        "per_link_mbit": per_peer,
    }


def break_even(sparse: Mapping[str, float], dense: Mapping[str, float]) -> dict[str, float]:
    """Compute seconds per window at which each half of the goal holds, from the measured
    non-compute time per window (wall - compute): SparseLoCo reaches the utilization goal
    once compute >= goal/(1-goal) x its overhead; dense stays communication-bound while
    compute <= its overhead. Both overheads grow with model size; only dense's with links."""
    sparse_overhead = sparse["wall_s"] - sparse["compute_s"]
    dense_overhead = dense["wall_s"] - dense["compute_s"]
    return {
        "sparseloco_overhead_s": round(sparse_overhead, 3),
        "diloco_dense_overhead_s": round(dense_overhead, 3),
        "sparseloco_meets_goal_from_compute_s": round(UTILIZATION_GOAL / (1 - UTILIZATION_GOAL) * sparse_overhead, 1),
        "diloco_dense_comm_bound_up_to_compute_s": round(dense_overhead * COMM_BOUND_BELOW / (1 - COMM_BOUND_BELOW), 1),
    }


# ============================================================================ projections


def _preset_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter shapes of the 150m and 1b presets (vocab 32768) and a Llama-2-70B shape,
    built on the meta device (no memory allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from node.model import model_config

    configs = {p: model_config(ModelConfig(preset=p), 32768, 2048) for p in ("150m", "1b")}
    configs["70b"] = LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                 intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False)
    out = {}
    for name, config in configs.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        out[name] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return out


def sparseloco_section_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Exact bytes of a SparseLoCo payload's packed sections (indices, codes, scales)."""
    total = 0
    for lay in model_layout(shapes, CodecConfig()).values():
        total += index_section_bytes(lay.n_chunks, lay.chunk_len, lay.k) + code_section_bytes(lay.n_chunks, lay.k)
        total += lay.n_chunks  # one scale code byte per chunk
    return total


def tiny_overhead_per_tensor(payload_bytes: int) -> float:
    """Header + key + signature bytes of the measured tiny payload, per tensor (an upper
    bound for big models, where the fixed part is spread over more tensors)."""
    from node.model import build_model, param_shapes

    shapes = param_shapes(build_model(ModelConfig(preset="tiny"), VOCAB, SEQ_LEN, 0))
    return (payload_bytes - sparseloco_section_bytes(shapes)) / len(shapes)


def projections(sparse_payload_bytes: int, peers: int = PROJECTION_PEERS) -> dict:
    """Per-round communication seconds for each preset and link, SparseLoCo vs dense fp32."""
    per_tensor = tiny_overhead_per_tensor(sparse_payload_bytes)
    rows = []
    for preset, shapes in _preset_shapes().items():
        params = sum(int(torch.Size(s).numel()) for s in shapes.values())
        sparse = sparseloco_section_bytes(shapes) + per_tensor * len(shapes)
        dense = 4 * params
        for mbit in PROJECTION_LINKS_MBIT:
            bps = mbit * 1e6 / 8
            row = {"preset": preset, "params": params, "link_mbit": mbit,
                   "sparseloco_bytes": int(sparse), "sparseloco_bits_per_param": round(8 * sparse / params, 4),
                   "dense_bytes": dense, "compression_vs_fp32": round(dense / sparse, 1)}
            for name, size in (("sparseloco", sparse), ("diloco_dense", dense)):
                row[f"{name}_upload_s"] = round(size / bps, 2)
                row[f"{name}_download_s"] = round((peers - 1) * size / bps, 2)
                row[f"{name}_round_s"] = round(peers * size / bps, 2)
            rows.append(row)
    return {
        "projections": rows,
        "peers_assumed": peers,
        "assumptions": "per round: upload own payload + download (peers-1) payloads, sequential, no overlap with "
                       "each other or with compute; SparseLoCo sizes exact from codec layouts (chunk 4096, top-64, "
                       "2-bit, Elias-Fano indices) + header overhead measured on the tiny payload; dense = fp32",
        "reference_70b_round_seconds": REFERENCE_70B_ROUND_SECONDS,
    }


# ============================================================================ entry points


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``locoswarm bench wan``."""
    p.add_argument("--json", action="store_true", help="print JSON lines only (no log output)")
    p.add_argument("--windows", type=int, default=3, help="windows per method (default 3)")
    p.add_argument("--compute-seconds", type=float, default=None,
                   help="pad each window's compute to this many seconds (default: the real inner steps)")
    p.add_argument("--inner-steps", type=int, default=INNER_STEPS, help=f"H per window (default {INNER_STEPS})")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its JSON lines; 0 on success or skip, 1 on failure."""
    windows, compute_seconds, inner_steps = args.windows, args.compute_seconds, args.inner_steps
    if not args.json:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    reason = netns_available()
    if reason is not None:
        _emit({"bench": "wan", "skipped": True, "reason": reason})
        return 0
    torch.set_num_threads(1)
    cleanup_leftovers()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    hosts: dict[str, float | None] = {"store": None}
    hosts.update({f"peer{i}": rate for i, rate in enumerate(PEER_LINKS_MBIT)})
    workdir = Path(tempfile.mkdtemp(prefix="locoswarm-wan-"))
    procs = _Processes()
    lines = []
    try:
        with Network(hosts) as net:
            try:  # processes die before their namespaces are deleted
                endpoint = f"http://{net.ip('store')}:{STORE_PORT}"
                procs.start(net.exec_argv("store", [sys.executable, "-m", "moto.server", "-H", net.ip("store"), "-p",
                                                    str(STORE_PORT)]), workdir / "moto.txt", _env())
                _wait_for_s3(net, endpoint)
                for method in METHODS:
                    rows = _run_method(net, procs, method, endpoint, workdir, windows=windows,
                                       inner_steps=inner_steps, compute_seconds=compute_seconds)
                    line = summarize(method, rows, list(PEER_LINKS_MBIT))
                    line["compute_seconds_padded_to"] = compute_seconds
                    line["inner_steps"] = inner_steps
                    _emit(line)
                    lines.append(line)
            finally:
                procs.stop()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log.error("wan bench failed: %s", exc)
        _emit({"bench": "wan", "error": str(exc)[-2000:]})
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    by = {line["method"]: line for line in lines}
    _emit(projections(by["sparseloco"]["payload_bytes"]))
    sparse_u, dense_u = by["sparseloco"]["compute_utilization"], by["diloco_dense"]["compute_utilization"]
    _emit({
        "bench": "wan",
        "summary": True,
        "sparseloco_utilization": sparse_u,
        "diloco_dense_utilization": dense_u,
        "sparseloco_network_fraction": by["sparseloco"]["network_fraction"],
        "diloco_dense_network_fraction": by["diloco_dense"]["network_fraction"],
        "sparseloco_utilization_ge_0_97": sparse_u >= UTILIZATION_GOAL,
        "diloco_dense_comm_bound": dense_u < COMM_BOUND_BELOW,
        "goal_met": sparse_u >= UTILIZATION_GOAL and dense_u < COMM_BOUND_BELOW,
        "wall_ratio_dense_over_sparseloco": round(by["diloco_dense"]["wall_s"] / by["sparseloco"]["wall_s"], 2),
        **break_even(by["sparseloco"], by["diloco_dense"]),
    })
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.wan worker CONFIG`` is one peer; anything else is ``locoswarm bench wan``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
        worker_main(argv[1])
        return 0
    from bench import main as bench_main

    return bench_main(["wan", *argv])


if __name__ == "__main__":
    sys.exit(main())
