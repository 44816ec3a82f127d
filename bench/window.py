"""``locoswarm bench window``: what one window of the real peer costs besides training.

It runs the product's own window (``node.peer.Peer.run_window``) on a file store in a temp
directory, for one preset: the peer under test is the run's only closer, and ``--peers - 1``
simulated peers (fresh keys, listed by the run) publish a valid signed payload of the run's
exact layout every window before it starts, so the peer proposes, checks, gathers,
aggregates and applies as many payloads as a real window of that size has. Their updates
are small random sparse tensors: the bench measures cost, not learning.

One JSON line per preset:

- ``seconds_per_phase``: median over the measured windows (the first is a warm-up) of the
  peer's own accounting (``node/accounting.py``: every second in exactly one phase);
- ``overhead_ratio``: everything but ``compute`` (the inner steps), over ``compute``;
- ``held_payload_bytes``: bytes of every decoded payload held while aggregating (5 bytes
  per kept value: int32 position, uint8 code) plus the largest tensor's accumulator and
  count buffer, and ``aggregate_memory_over_model``: that over one dense float32 model;
- ``aggregate_rss_bytes``: resident memory growth measured while gathering and aggregating
  the last window again (a lower bound: the allocator reuses freed pages);
- ``peak_rss_bytes``: the process's high-water mark; ``state_bytes``: the resumable state;
  ``included_last_window``: payloads the last window counted (every one of ``--peers``).

    locoswarm bench window --preset 150m --steps 20 --peers 64 --windows 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from node.accounting import PHASES, Accounting
from node.config import NodeConfig
from node.exchange import Exchange
from node.genesis import init_run
from node.peer import Peer
from protocol import paths
from protocol.aggregate import iter_aggregate
from protocol.codec_types import CompressedTensor, TensorLayout
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores.file import FileStore
from protocol.wire import encode_payload

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", action="append", default=None,
                   help="model preset: tiny, 25m, 150m, 1b; repeat for several (default tiny)")
    p.add_argument("--peers", type=int, default=1, help="payloads per window, ours included (default 1)")
    p.add_argument("--steps", type=int, default=20, help="inner steps per window, H (default 20)")
    p.add_argument("--windows", type=int, default=3, help="windows measured after one warm-up (default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per inner step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--eval", action="store_true", help="evaluate the held-out loss every window (default off)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workdir", default=None, help="keep the run here instead of a temp directory")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    for preset in args.preset or ["tiny"]:
        with tempfile.TemporaryDirectory(prefix="locoswarm-bench-window-") as tmp:
            root = Path(args.workdir or tmp) / preset
            print(json.dumps(measure(root, preset, args)), flush=True)
    return 0


def measure(root: Path, preset: str, args: argparse.Namespace) -> dict:
    """Run 1 + ``args.windows`` windows of ``preset`` and return the figures line."""
    me = Identity.from_seed(f"bench window {preset}".encode())
    sims = [Identity.from_seed(f"bench window sim {i}".encode()) for i in range(args.peers - 1)]
    manifest = Manifest().replace(
        run__id=f"bench-{preset}", run__peers=tuple(i.public_key.hex() for i in [me, *sims]),
        run__window_seconds=3600.0, run__keep_windows=1000, run__checkpoint_every=1000, run__genesis=time.time(),
        validators__keys=(me.public_key.hex(),), validators__max_newcomers=0,
        model__preset=preset, inner__steps=args.steps, data__batch_size=args.batch_size, data__seq_len=args.seq_len,
        data__max_chars=1_000_000,
    )
    store = FileStore(root / "store")
    manifest = init_run(manifest, store)
    workdir = root / "peer"
    me.save(workdir / "peer.key")
    node = NodeConfig(workdir=workdir, device=args.device, eval_every=1 if args.eval else 0,
                      publish_checkpoints=False, poll_seconds=0.02)
    peer = Peer(manifest, store, node)
    params = sum(lay.numel for lay in peer.layouts.values())
    gen = torch.Generator().manual_seed(0)
    update = {name: sparse_tensor(lay, gen) for name, lay in peer.layouts.items()}  # one update, drawn once
    per_window: list[dict[str, float]] = []
    try:
        for w in range(1 + args.windows):
            for sim in sims:  # published before the window starts: the closer never waits for them
                store.put(paths.payload_key(w, sim.peer_id), encode_payload(
                    run=manifest.run_key, window=w, base_digest=peer.replica.digest, tokens=1, tensors=update,
                    codec=manifest.codec, identity=sim))
            before = dict(peer.acct.seconds)
            t0 = time.perf_counter()
            peer.run_window()
            wall = time.perf_counter() - t0
            if w > 0:
                spent = {k: peer.acct.seconds[k] - before[k] for k in PHASES}
                per_window.append(spent | {"wall": wall})
        peer.writer.wait()
        aggregate_rss = _aggregate_rss(peer)
    finally:
        peer.writer.close()
    phases = {k: round(statistics.median(p[k] for p in per_window), 4) for k in (*PHASES, "wall")}
    overhead = sum(v for k, v in phases.items() if k not in ("compute", "wall"))
    held = _held_bytes(peer, args.peers)
    return {
        "bench": "window", "preset": preset, "params": params, "peers": args.peers, "steps": args.steps,
        "batch": [args.batch_size, args.seq_len], "device": str(peer.plan.device), "plan": peer.plan.describe(),
        "windows": args.windows, "eval": args.eval, "seconds_per_phase": phases,
        "overhead_seconds": round(overhead, 4), "overhead_ratio": round(overhead / max(phases["compute"], 1e-9), 4),
        "held_payload_bytes": held, "aggregate_memory_over_model": round(held / (4 * params), 3),
        "aggregate_rss_bytes": aggregate_rss, "peak_rss_bytes": _peak_rss(),
        "peak_device_bytes": torch.cuda.max_memory_allocated(peer.plan.device) if peer.plan.device.type == "cuda" else None,
        "state_bytes": node.state_file.stat().st_size, "digest": peer.replica.digest.hex()[:16],
        "included_last_window": peer.history.read()[-1]["included"],
    }


def sparse_tensor(lay: TensorLayout, gen: torch.Generator) -> CompressedTensor:
    """Random valid positions (one per stride of each chunk), codes and small scales."""
    step = max(1, _valid(lay) // lay.k)
    idx = torch.arange(lay.k, dtype=torch.int32) * step + torch.randint(0, step, (lay.n_chunks, lay.k), generator=gen,
                                                                         dtype=torch.int32)
    codes = torch.randint(0, 4, (lay.n_chunks, lay.k), dtype=torch.uint8, generator=gen)
    scale_q = torch.randint(0, 64, (lay.n_chunks,), dtype=torch.uint8, generator=gen)
    return CompressedTensor(lay, idx, codes, scale_q, 2.0**-13)  # a float32 value


def _valid(lay: TensorLayout) -> int:
    """Positions of the last chunk that hold data: every chunk's first ``_valid`` are safe."""
    return lay.chunk_len if lay.tiled else lay.numel - (lay.n_chunks - 1) * lay.chunk_len


def _held_bytes(peer: Peer, peers: int) -> int:
    """What aggregating ``peers`` payloads holds: every decoded payload, plus the largest
    tensor's float32 accumulator and int32 count buffer."""
    per_peer = sum(lay.n_chunks * lay.k * 5 + lay.n_chunks for lay in peer.layouts.values())
    largest = max(lay.numel for lay in peer.layouts.values())
    return peers * per_peer + largest * 8


def _aggregate_rss(peer: Peer) -> int:
    """RSS growth while the last decided window is gathered (no cache) and aggregated into a
    copy of the replica, sampled every 5 ms."""
    decision = peer.follower.decisions.read(peer.replica.window - 1)
    if decision is None:
        return 0
    exchange = Exchange(peer.store, peer.identity, peer.manifest.run_key, Accounting(), device=peer.plan.device)
    expect = dataclasses.replace(peer.follower.expectation(decision.window), base_digest=decision.base_digest)
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        gathered = exchange.gather(decision.included, expect)  # a fresh exchange: everything decoded again
        outer = peer.manifest.outer
        for _name, _update in iter_aggregate(gathered.contributions(), peer.layouts, rule=outer.rule, clip=outer.clip):
            peak[0] = max(peak[0], _rss())
        del gathered
    finally:
        stop.set()
        sampler.join()
    return peak[0] - base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
