"""``locoswarm bench wan --json``: the product's window loop over emulated consumer uplinks.

What runs (needs root; otherwise one ``{"skipped": true, "reason": ...}`` line; needs the
``[bench]`` extra for moto's S3 server, otherwise one ``{"error": ...}`` line naming it):

1. ``bench.netns.Network``: a namespace for the object store and one per peer, joined by
   veth pairs to a bridge; each peer's link is tbf-shaped both ways at 10, 50 and
   100 Mbit/s (bandwidth only, no added latency).
2. A moto S3 server process inside the store namespace.
3. Per SparseLoCo method, ``locoswarm init`` (in the store namespace) creates a run of the
   tiny preset vouching for 3 peers, and 3 real ``locoswarm peer`` processes, one per peer
   namespace, train it for ``--windows`` windows with real compute (nothing padded):
   ``sparseloco_serial`` (``inner.overlap = false``: train, publish, close, gather,
   aggregate, then train again) and ``sparseloco_overlap`` (``inner.overlap = true``: window
   w+1 trains while window w is exchanged on a helper thread). Seconds per phase come from
   each peer's own accounting (``bench.wan_peers``); utilization = compute / wall per peer
   and window, median over the peers and the steady windows (the first ``--skip``
   windows are startup). Replicas must end bit-identical: every window's digest in every
   peer's ``history.jsonl`` equal.
4. One peer falls behind: in the overlapped run, after the steady windows, the 10 Mbit/s
   peer's link is throttled to ``--slow-mbit`` (2) Mbit/s for one window (``tc qdisc
   change``) and restored; the bench reports the other peers' walls of that window against
   their median and whether the slow peer ended at the same digest.
5. ``diloco_dense``: the BASELINE, not the product (locoswarm has no dense mode): the
   bench's own worker (``bench.wan_dense``) with fp32 pseudo-gradients on the same links,
   model, H, sequence length and batch.
6. Projections to 1b / 7b / 70b parameters on 100 Mbit/s and 1 Gbit/s links from the
   overlapped timeline (``bench.wan_projection``).

Output: one JSON line per method, one for the slow peer, one of projections, and a summary
line with the goal check (overlapped SparseLoCo utilization >= 0.97).
"""

from __future__ import annotations

import argparse
import importlib.util
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from bench.netns import Network, cleanup_leftovers, netns_available
from bench.procs import Processes, bench_env
from bench.wan_peers import PeerRun, SlowLink, init_run, run_peers
from node.accounting import PHASES
from protocol.manifest import Manifest

log = logging.getLogger(__name__)

PEER_LINKS_MBIT = (10.0, 50.0, 100.0)
STORE_PORT = 9000
BUCKET = "wan-bench"
INNER_STEPS = 40
"""H of the bench's runs: ~25 s of compute per window for 3 tiny-model peers on 2 shared CPU
cores (a consumer-link setting: tens of seconds to minutes of compute per exchange)."""
WINDOWS = 7
SKIP_WINDOWS = 2
"""Startup windows left out of the medians (imports, data, the first close)."""
DENSE_WINDOWS = 4
SLOW_MBIT = 2.0
SLOW_HOST = "peer0"
STALL_RATIO = 1.25
"""Another peer counts as stalled by the slow one when its window took this many times its median."""
WINDOW_SECONDS = 120.0
"""run.window_seconds: the longest a window may stay open (adaptive deadlines shorten it)."""
UTILIZATION_GOAL = 0.97
METHODS = ("sparseloco_serial", "sparseloco_overlap", "diloco_dense")
INSTALL = "pip install -e '.[bench]'"
NEEDED_MODULES = {"moto": "moto[server]", "flask": "moto[server]", "flask_cors": "moto[server]"}
"""Modules the S3 server needs, and the package that brings them."""


def missing_dependency() -> str | None:
    """None when everything the bench needs is importable; otherwise what to install."""
    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    packages = sorted({NEEDED_MODULES[m] for m in missing})
    return (f"bench wan needs {', '.join(packages)} (the S3 server the peers use; missing module(s): "
            f"{', '.join(missing)}); install the bench extra: {INSTALL}")


def bench_manifest(method: str, inner_steps: int) -> Manifest:
    """The run every method's peers train: the tiny preset on defaults, a small corpus (so
    init takes seconds), H inner steps, overlap for the overlapped method."""
    return Manifest().replace(run__id=f"wan-{method.replace('_', '-')}", data__max_chars=400_000,
                              inner__steps=inner_steps, inner__overlap=method == "sparseloco_overlap",
                              run__window_seconds=WINDOW_SECONDS)


# ============================================================================ summaries


def _mean(rows: Sequence[Mapping[str, float]], key: str) -> float:
    return round(statistics.fmean(r[key] for r in rows), 3)


def summarize_peers(method: str, rows_by_peer: Sequence[Sequence[dict]], histories: Sequence[Sequence[dict]],
                    steady: Sequence[int], *, inner_steps: int, manifest: Manifest) -> dict:
    """One SparseLoCo method's line: utilization (median of compute / wall over peers and
    steady windows), mean seconds per phase (they add up to the mean wall), digests."""
    want = set(steady)
    rows = [r | {"peer": i} for i, peer_rows in enumerate(rows_by_peer) for r in peer_rows if r["window"] in want]
    if not rows:
        raise RuntimeError(f"{method}: no steady window was seen (windows {sorted(want)})")
    util = [r["compute"] / r["wall"] for r in rows]
    applied = [{h["window"]: h["digest"] for h in hist if "included" in h} for hist in histories]
    windows = sorted(set.intersection(*(set(a) for a in applied))) if applied else []
    identical = bool(windows) and all(len({a[w] for a in applied}) == 1 for w in windows)
    final = max(windows) if windows else None
    payloads = [h["payload_bytes"] for hist in histories for h in hist if h.get("payload_bytes")]
    seconds = {k: _mean(rows, k) for k in ("wall", *PHASES, "other", "background")}
    off_path = {k: v for k, v in seconds.items() if k not in ("wall", "compute", "background") and v > 0}
    return {
        "bench": "wan",
        "method": method,
        "product": True,
        "runs": "locoswarm peer (node/peer.py), one process per namespace; seconds from each peer's accounting",
        "overlap": manifest.inner.overlap,
        "peers": len(rows_by_peer),
        "link_mbit": list(PEER_LINKS_MBIT),
        "preset": manifest.model.preset,
        "inner_steps": inner_steps,
        "seq_len": manifest.data.seq_len,
        "batch": manifest.data.batch_size,
        "steady_windows": sorted(want),
        "samples": len(rows),
        "compute_utilization": round(statistics.median(util), 4),
        "compute_utilization_min": round(min(util), 4),
        "compute_utilization_per_link": {
            f"{PEER_LINKS_MBIT[i]:g}": round(statistics.median(r["compute"] / r["wall"] for r in rows if r["peer"] == i), 4)
            for i in sorted({r["peer"] for r in rows})},
        "seconds_per_window_mean": seconds,
        "where_the_rest_goes": dict(sorted(off_path.items(), key=lambda kv: -kv[1])),
        "payload_bytes": int(statistics.median(payloads)) if payloads else None,
        "windows_applied": len(windows),
        "replicas_identical": identical,
        "final_window": final,
        "final_digest": applied[0][final][:16] if final is not None else None,
        "included_median": statistics.median(h["included"] for hist in histories for h in hist if "included" in h),
    }


def summarize_slow(run: PeerRun, rows_by_peer: Sequence[Sequence[dict]], steady: Sequence[int], window: int,
                   mbit: float) -> dict:
    """Did the others stall while one peer's link was throttled, and did that peer catch up?"""
    slow = run.hosts.index(SLOW_HOST)
    watched = (window, window + 1)
    peers = {}
    for i, rows in enumerate(rows_by_peer):
        by_w = {r["window"]: r for r in rows}
        median = statistics.median(by_w[w]["wall"] for w in steady if w in by_w)
        walls = {str(w): round(by_w[w]["wall"], 3) for w in watched if w in by_w}
        peers[f"{PEER_LINKS_MBIT[i]:g}"] = {
            "median_wall_s": round(median, 3), "walls_s": walls,
            "max_ratio": round(max(walls_s / median for walls_s in walls.values()), 3) if walls else None,
            "phases_in_window": {k: round(v, 3) for k, v in by_w.get(window, {}).items()
                                 if k not in ("window",) and abs(v) >= 0.005},
        }
    others = [p for i, p in enumerate(peers.values()) if i != slow]
    histories = run.histories()
    applied = [{h["window"]: h for h in hist if "included" in h} for hist in histories]
    final = max(applied[slow]) if applied[slow] else None
    same_digest = final is not None and all(final in a and a[final]["digest"] == applied[slow][final]["digest"]
                                            for a in applied)
    counted = applied[slow].get(window, {}).get("counted")
    return {
        "bench": "wan",
        "slow_peer": True,
        "method": "sparseloco_overlap",
        "peer_link_mbit": PEER_LINKS_MBIT[slow],
        "throttled_to_mbit": mbit,
        "window": window,
        "throttled_seconds": round(run.throttled[1] - run.throttled[0], 2) if run.throttled else None,
        "per_link": peers,
        "others_max_ratio": max((p["max_ratio"] or 0) for p in others),
        "others_stalled": any((p["max_ratio"] or 0) > STALL_RATIO for p in others),
        "stall_ratio_threshold": STALL_RATIO,
        "slow_payload_counted": counted,
        "slow_peer_final_window": final,
        "caught_up": same_digest and all(w in applied[slow] for w in range(final + 1)) if final is not None else False,
    }


def summarize_dense(rows: list[dict], steady: Sequence[int], *, inner_steps: int, seq_len: int, batch: int) -> dict:
    """The dense baseline's line: medians over peers and steady windows, digests."""
    want = set(steady)
    windows = sorted({r["window"] for r in rows})
    identical = all(len({r["digest"] for r in rows if r["window"] == w}) == 1 for w in windows)
    steady_rows = [r for r in rows if r["window"] in want]
    keys = ("wall", "compute", "codec", "upload", "wait", "download", "aggregate")
    return {
        "bench": "wan",
        "method": "diloco_dense",
        "product": False,
        "baseline": True,
        "runs": "BASELINE, not the product (locoswarm has no dense mode): bench/wan_dense.py workers re-implement "
                "the window path with fp32 payloads and time themselves",
        "peers": len(PEER_LINKS_MBIT),
        "link_mbit": list(PEER_LINKS_MBIT),
        "inner_steps": inner_steps,
        "seq_len": seq_len,
        "batch": batch,
        "steady_windows": sorted(want),
        "compute_utilization": round(statistics.median(r["compute"] / r["wall"] for r in steady_rows), 4),
        "seconds_per_window_mean": {k: _mean(steady_rows, k) for k in keys},
        "per_link_mbit": {
            f"{PEER_LINKS_MBIT[p]:g}": {k: round(statistics.median(r[k] for r in steady_rows if r["peer"] == p), 3)
                                        for k in ("wall", "upload", "wait", "download")}
            for p in sorted({r["peer"] for r in steady_rows})},
        "payload_bytes": int(statistics.median(r["payload_bytes"] for r in rows)),
        "replicas_identical": identical,
    }


# ============================================================================ the run


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
        raise RuntimeError(f"the S3 server at {endpoint} did not come up (see moto.txt in the bench's workdir)")


def _run_sparseloco(net: Network, procs: Processes, method: str, endpoint: str, workdir: Path,
                    args: argparse.Namespace) -> list[dict]:
    """One SparseLoCo method: init its run, run the peers, summarise (and the slow peer)."""
    manifest = bench_manifest(method, args.inner_steps)
    d = workdir / method
    d.mkdir()
    uri = f"s3://{BUCKET}/{method}"
    n_peers = len(PEER_LINKS_MBIT)
    path = init_run(net, procs, manifest, uri, endpoint, d, n_peers)
    overlap = method == "sparseloco_overlap"
    slow = SlowLink(SLOW_HOST, args.windows, args.slow_mbit) if overlap and args.slow_mbit > 0 else None
    windows = args.windows + 3 if slow is not None else args.windows  # throttled window, recovery, its end
    run = run_peers(net, procs, path, uri, endpoint, d, windows=windows, slow=slow,
                    timeout=240.0 + windows * 2 * WINDOW_SECONDS)
    rows = [t.rows() for t in run.timelines]
    last = args.windows if slow is not None else args.windows - 1  # the last window with a next one to end it
    steady = list(range(args.skip, last))
    lines = [summarize_peers(method, rows, run.histories(), steady, inner_steps=args.inner_steps, manifest=manifest)]
    if slow is not None:
        lines.append(summarize_slow(run, rows, steady, slow.window, slow.mbit))
    return lines


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``locoswarm bench wan``."""
    p.add_argument("--json", action="store_true", help="print JSON lines only (no log output)")
    p.add_argument("--windows", type=int, default=WINDOWS,
                   help=f"windows per SparseLoCo method (default {WINDOWS}; the overlapped run adds 3 for the slow peer)")
    p.add_argument("--skip", type=int, default=SKIP_WINDOWS,
                   help=f"startup windows left out of the medians (default {SKIP_WINDOWS})")
    p.add_argument("--dense-windows", type=int, default=DENSE_WINDOWS,
                   help=f"windows of the dense baseline (default {DENSE_WINDOWS}; the first is left out)")
    p.add_argument("--inner-steps", type=int, default=INNER_STEPS, help=f"H per window (default {INNER_STEPS})")
    p.add_argument("--slow-mbit", type=float, default=SLOW_MBIT,
                   help=f"the slow peer's link for one window, Mbit/s (default {SLOW_MBIT:g}; 0 = no slow peer)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)} (default all)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its JSON lines; 0 on success or skip, 1 on failure."""
    if not args.json:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    missing = missing_dependency()
    if missing is not None:
        print(f"locoswarm bench wan: {missing}", file=sys.stderr)
        _emit({"bench": "wan", "error": missing})
        return 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or args.windows < args.skip + 2 or args.skip < 0 or args.dense_windows < 2:
        _emit({"bench": "wan", "error": f"unknown methods {unknown}" if unknown else
               "need --windows >= --skip + 2, --skip >= 0 and --dense-windows >= 2"})
        return 1
    reason = netns_available()
    if reason is not None:
        _emit({"bench": "wan", "skipped": True, "reason": reason})
        return 0
    cleanup_leftovers()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    hosts: dict[str, float | None] = {"store": None}
    hosts.update({f"peer{i}": rate for i, rate in enumerate(PEER_LINKS_MBIT)})
    workdir = Path(tempfile.mkdtemp(prefix="locoswarm-wan-"))
    procs = Processes()
    by: dict[str, dict] = {}
    started = time.time()
    try:
        with Network(hosts) as net:
            try:  # processes die before their namespaces are deleted
                endpoint = f"http://{net.ip('store')}:{STORE_PORT}"
                procs.start(net.exec_argv("store", [sys.executable, "-m", "moto.server", "-H", net.ip("store"), "-p",
                                                    str(STORE_PORT)]), workdir / "moto.txt", bench_env())
                _wait_for_s3(net, endpoint)
                for method in methods:
                    if method == "diloco_dense":
                        lines = [_run_dense(net, procs, endpoint, workdir, args)]
                    else:
                        lines = _run_sparseloco(net, procs, method, endpoint, workdir, args)
                    for line in lines:
                        _emit(line)
                    by[method] = lines[0]
                    if len(lines) > 1:
                        by["slow_peer"] = lines[1]
            finally:
                procs.stop()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log.error("wan bench failed: %s", exc)
        _emit({"bench": "wan", "error": str(exc)[-3000:]})
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    sparse = by.get("sparseloco_overlap") or by.get("sparseloco_serial")
    if sparse is not None and sparse["payload_bytes"]:
        from bench.wan_projection import projections

        _emit(projections(sparse["payload_bytes"]))
    _emit(summary(by, time.time() - started))
    return 0


def _run_dense(net: Network, procs: Processes, endpoint: str, workdir: Path, args: argparse.Namespace) -> dict:
    from bench.wan_dense import run_dense

    manifest = bench_manifest("diloco_dense", args.inner_steps)
    seq_len, batch = manifest.data.seq_len, manifest.data.batch_size
    rows = run_dense(net, procs, endpoint, BUCKET, workdir, windows=args.dense_windows, inner_steps=args.inner_steps,
                     vocab=manifest.tokenizer.vocab_size, seq_len=seq_len, batch=batch)
    return summarize_dense(rows, list(range(1, args.dense_windows)), inner_steps=args.inner_steps, seq_len=seq_len,
                           batch=batch)


def summary(by: Mapping[str, dict], wall: float) -> dict:
    """The last line: each method's utilization, and the goal check on the overlapped one."""
    out: dict = {"bench": "wan", "summary": True, "wall_s": round(wall, 1),
                 "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    for method in METHODS:
        if method in by:
            out[f"{method}_utilization"] = by[method]["compute_utilization"]
    if "sparseloco_serial" in by or "sparseloco_overlap" in by:
        out["replicas_identical"] = all(by[m]["replicas_identical"] for m in by if m.startswith("sparseloco_"))
    overlap = by.get("sparseloco_overlap")
    if overlap is not None:
        out["utilization_goal"] = UTILIZATION_GOAL
        out["goal_met"] = overlap["compute_utilization"] >= UTILIZATION_GOAL
        out["overlap_compute_s_mean"] = overlap["seconds_per_window_mean"]["compute"]
        out["overlap_where_the_rest_goes_s"] = overlap["where_the_rest_goes"]
    if "slow_peer" in by:
        out["slow_peer_others_stalled"] = by["slow_peer"]["others_stalled"]
        out["slow_peer_caught_up"] = by["slow_peer"]["caught_up"]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.wan ARGS`` is ``locoswarm bench wan ARGS``."""
    from bench import main as bench_main

    return bench_main(["wan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
