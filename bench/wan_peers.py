"""Real ``locoswarm peer`` processes in the WAN bench's namespaces, and what each window cost
them by their own accounting.

A peer keeps cumulative seconds per phase (``node/accounting.py``) and rewrites
``progress.json`` at every phase change of its training loop; the snapshot written when it
starts training window w stays on disk for the whole of that window's compute. ``Timeline``
keeps the first such snapshot of every window (and when the peer wrote it: the file's
mtime), so one window's seconds per phase are the difference of two snapshots and its wall
time the difference of their write times. Nothing here times the peer itself; time the
peer spent outside every phase (building batches, writing progress) is reported as
``other``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.netns import Network
from bench.procs import Processes, bench_env, tail
from node.accounting import PHASES
from node.progress import read_history
from protocol.identity import Identity
from protocol.manifest import Manifest

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
"""How often the coordinator reads every peer's progress file (a window trains for seconds)."""
INIT_TIMEOUT = 180.0
"""Seconds ``locoswarm init`` may take in the store namespace (corpus, tokenizer, upload)."""


@dataclass(frozen=True)
class Mark:
    """A peer's cumulative accounting when it started training ``window``."""

    window: int
    at: float
    """When the peer wrote the snapshot (the progress file's mtime)."""
    seconds: dict[str, float]
    background: float


def read_snapshot(path: Path) -> tuple[dict, float] | None:
    """A progress file's content and its write time, from one open file (the peer replaces
    the file atomically, so both belong to the same snapshot); None while there is none."""
    try:
        with open(path) as f:
            mtime = os.fstat(f.fileno()).st_mtime
            return json.loads(f.read()), mtime
    except (OSError, ValueError):
        return None


def window_rows(marks: dict[int, Mark]) -> list[dict]:
    """One row per window whose start and the next window's start were both seen: wall
    seconds, seconds per phase, ``background`` (exchange work done beside training) and
    ``other`` (wall time in no phase)."""
    rows = []
    for w in sorted(marks):
        nxt = marks.get(w + 1)
        if nxt is None:
            continue
        cur = marks[w]
        row: dict = {"window": w, "wall": nxt.at - cur.at}
        for phase in PHASES:
            row[phase] = nxt.seconds.get(phase, 0.0) - cur.seconds.get(phase, 0.0)
        row["background"] = nxt.background - cur.background
        row["other"] = row["wall"] - sum(row[p] for p in PHASES)
        rows.append(row)
    return rows


@dataclass
class Timeline:
    """One peer's window starts, from its progress file."""

    workdir: Path
    marks: dict[int, Mark] = field(default_factory=dict)
    last: dict | None = None

    def poll(self) -> None:
        snap = read_snapshot(self.workdir / "progress.json")
        if snap is None:
            return
        info, mtime = snap
        self.last = info
        if info.get("phase") == "train" and info["window"] not in self.marks:
            acct = info["accounting"]
            self.marks[info["window"]] = Mark(info["window"], mtime, dict(acct["seconds"]),
                                              float(acct.get("background", 0.0)))

    def rows(self) -> list[dict]:
        return window_rows(self.marks)

    @property
    def history(self) -> list[dict]:
        return read_history(self.workdir / "history.jsonl")


@dataclass(frozen=True)
class SlowLink:
    """Throttle ``host``'s link to ``mbit`` while it trains ``window`` (from the start of that
    window's training to the start of the next one's), then restore it."""

    host: str
    window: int
    mbit: float


@dataclass
class PeerRun:
    """What one method's peers left: their timelines, histories and the throttle's times."""

    hosts: list[str]
    timelines: list[Timeline]
    throttled: tuple[float, float] | None = None
    """(start, end) wall-clock times of the throttle, when there was one."""

    def histories(self) -> list[list[dict]]:
        return [t.history for t in self.timelines]


def peer_identity(i: int) -> Identity:
    """The fixed key of bench peer ``i`` (its data assignment follows from it)."""
    return Identity.from_seed(f"locoswarm-wan-bench-peer-{i}".encode())


def init_run(net: Network, procs: Processes, manifest: Manifest, store_uri: str, endpoint: str, workdir: Path,
             n_peers: int) -> Path:
    """``locoswarm init`` inside the store's namespace (unshaped link), vouching for the bench's
    peers; returns the final manifest's path."""
    base = workdir / "base.toml"
    base.write_text(manifest.to_toml())
    out = workdir / "manifest.toml"
    argv = [sys.executable, "-m", "locoswarm.cli", "init", "--store", store_uri, "--endpoint-url", endpoint,
            "--create-bucket", "--manifest", str(base), "--out-manifest", str(out)]
    for i in range(n_peers):
        argv += ["--peer-key", peer_identity(i).public_key.hex()]
    log_path = workdir / "init.txt"
    proc = procs.start(net.exec_argv("store", argv), log_path, bench_env())
    try:
        rc = proc.wait(timeout=INIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"locoswarm init took over {INIT_TIMEOUT:.0f}s; log:\n{tail(log_path)}") from None
    if rc != 0 or not out.exists():
        raise RuntimeError(f"locoswarm init exited {rc}; log:\n{tail(log_path)}")
    return out


def run_peers(net: Network, procs: Processes, manifest_path: Path, store_uri: str, endpoint: str, workdir: Path, *,
              windows: int, timeout: float, slow: SlowLink | None = None) -> PeerRun:
    """One ``locoswarm peer`` per peer namespace until each has applied ``windows`` windows;
    the progress files are read all along (and the slow link set and restored)."""
    hosts = [name for name in net.hosts if name.startswith("peer")]
    started = []
    timelines = []
    for i, host in enumerate(hosts):
        d = workdir / host
        d.mkdir(parents=True)
        peer_identity(i).save(d / "peer.key")
        argv = [sys.executable, "-m", "locoswarm.cli", "peer", "--store", store_uri, "--endpoint-url", endpoint,
                "--manifest", str(manifest_path), "--workdir", str(d), "--windows", str(windows), "--threads", "1"]
        started.append((procs.start(net.exec_argv(host, argv), d / "log.txt", bench_env()), d / "log.txt"))
        timelines.append(Timeline(d))
    run = PeerRun(hosts, timelines)
    deadline = time.time() + timeout
    throttle_start = None
    slow_timeline = timelines[hosts.index(slow.host)] if slow is not None else None
    slow_proc = started[hosts.index(slow.host)][0] if slow is not None else None
    rate = net.hosts[slow.host].rate_mbit if slow is not None else None
    while any(proc.poll() is None for proc, _ in started):
        for t in timelines:
            t.poll()
        for proc, log_path in started:
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"a peer exited {proc.returncode}; log:\n{tail(log_path)}")
        if slow is not None and slow_timeline is not None and slow_proc is not None and rate is not None:
            if throttle_start is None and slow.window in slow_timeline.marks:
                net.set_rate(slow.host, slow.mbit)
                throttle_start = time.time()
            elif throttle_start is not None and run.throttled is None and (
                    slow.window + 1 in slow_timeline.marks or slow_proc.poll() is not None):
                net.set_rate(slow.host, rate)
                run.throttled = (throttle_start, time.time())
        if time.time() > deadline:
            raise RuntimeError(f"peers did not finish {windows} windows in {timeout:.0f}s; log of {hosts[0]}:\n"
                               f"{tail(started[0][1])}")
        time.sleep(POLL_SECONDS)
    for t in timelines:
        t.poll()
    for proc, log_path in started:
        if proc.returncode != 0:
            raise RuntimeError(f"a peer exited {proc.returncode}; log:\n{tail(log_path)}")
    return run
