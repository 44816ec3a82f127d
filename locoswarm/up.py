"""``locoswarm up``: a whole local network on one machine, on embedded defaults.

Creates a run in a ``file://`` store (or the one given), starts N peer processes (and
optional validators), shows a live table while they train, then writes a PNG (held-out
loss vs window and vs bytes communicated) and a summary; with ``--json`` the last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from locoswarm.machine import human_bytes
from node.accounting import PHASES
from node.genesis import init_run
from node.progress import read_history, read_progress
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores import StoreSettings, open_store

MARKER = ".locoswarm-up"
STARTUP_SECONDS = 60.0
"""Time the peers of a local network get to start before window 0's deadline starts counting."""


def _prepare_workdir(workdir: Path, keep: bool) -> None:
    if workdir.exists() and not keep:
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise SystemExit(f"{workdir} exists and was not made by `locoswarm up`; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by locoswarm up\n")


def _manifest(args: argparse.Namespace) -> Manifest:
    manifest = Manifest.load(args.manifest) if args.manifest else Manifest()
    updates: dict[str, object] = {}
    if args.preset:
        updates["model__preset"] = args.preset
    if args.steps:
        updates["inner__steps"] = args.steps
    if args.window_seconds:
        updates["run__window_seconds"] = args.window_seconds
    return manifest.replace(**updates)


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _table(rows: list[dict | None], names: list[str], elapsed: float, windows: int) -> Table:
    table = Table(title=f"locoswarm local network: {elapsed:5.0f}s, {windows} windows", expand=False)
    for col in ("peer", "id", "window", "phase", "train loss", "held-out", "sent", "received", "kept", "digest"):
        table.add_column(col, justify="right" if col not in ("peer", "id", "phase", "digest") else "left")
    for name, info in zip(names, rows):
        if info is None:
            table.add_row(name, "", "", "starting", "", "", "", "", "", "")
            continue
        last = info.get("last") or {}
        acct = info["accounting"]
        table.add_row(
            name,
            info["peer"][:8],
            str(info["window"]),
            info["phase"],
            f"{last['train_loss']:.3f}" if last.get("train_loss") is not None else "",
            f"{last['heldout_loss']:.3f}" if last.get("heldout_loss") is not None else "",
            human_bytes(acct["bytes_up"]),
            human_bytes(acct["bytes_down"]),
            str(last.get("included", "")),
            info["digest"][:8],
        )
    return table


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _plot(histories: list[list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, hist in enumerate(histories):
        pts = [h for h in hist if h.get("heldout_loss") is not None]
        xs = [h["window"] + 1 for h in pts]
        mb = [(h["bytes_up"] + h["bytes_down"]) / 1e6 for h in pts]
        ys = [h["heldout_loss"] for h in pts]
        a.plot(xs, ys, marker="o", ms=3, label=f"peer {i}")
        b.plot(mb, ys, marker="o", ms=3, label=f"peer {i}")
    a.set_xlabel("windows applied")
    a.set_ylabel("held-out loss (shared model)")
    b.set_xlabel("MB communicated by the peer (up + down)")
    b.set_ylabel("held-out loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("locoswarm: SparseLoCo local network")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_up(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json)
    if not args.verbose:  # the live table is the progress display; peers log to their own files
        logging.getLogger().setLevel(logging.WARNING)
    workdir = Path(args.workdir).resolve()
    _prepare_workdir(workdir, args.keep)
    settings = StoreSettings.parse(args.store or f"file://{workdir / 'store'}", endpoint_url=args.endpoint_url)
    store_uri = settings.to_uri()
    names = [f"peer-{i}" for i in range(args.peers)]
    # Fixed peer keys: the data a peer is assigned follows from its id, so a local network is
    # reproducible run after run (tests/test_golden.py pins its digest and losses). The run
    # vouches for exactly these peers and trusts exactly the validators it starts.
    peer_keys = []
    for i, name in enumerate(names):
        identity = Identity.from_seed(f"locoswarm up peer {i}".encode())
        identity.save(workdir / "peers" / name / "peer.key")
        peer_keys.append(identity.public_key.hex())
    validator_dirs = [workdir / "validators" / f"validator-{i}" for i in range(args.validators)]
    validator_keys = tuple(Identity.load_or_create(d / "validator.key").public_key.hex() for d in validator_dirs)
    # Window 0 may close a minute after the peers had time to start (earlier once all published).
    manifest = _manifest(args).replace(run__peers=tuple(peer_keys), validators__keys=validator_keys,
                                       run__genesis=round(time.time() + STARTUP_SECONDS, 3))
    t0 = time.time()
    with console.status("creating the run: corpus, tokenizer, genesis weights ..."):
        store = open_store(dataclasses.replace(settings, create_bucket=settings.scheme == "s3"))
        manifest = init_run(manifest, store)
        store.close()
    manifest_path = workdir / "manifest.toml"
    manifest_path.write_text(manifest.to_toml())
    console.print(f"run [bold]{manifest.run_key}[/] in {store_uri} ready in {time.time() - t0:.1f}s")

    base = [sys.executable, "-m", "locoswarm.cli", "peer", "--store", store_uri, "--manifest", str(manifest_path)]
    procs = []
    for name in names:
        cmd = base + ["--workdir", str(workdir / "peers" / name), "--windows", str(args.windows),
                      "--threads", str(args.threads), "--eval-every", "1"]  # the demo draws every window
        procs.append(_spawn(cmd, workdir / "peers" / name / "log.txt"))
    validators = []
    for vdir in validator_dirs:
        cmd = [sys.executable, "-m", "locoswarm.cli", "validator", "--store", store_uri, "--manifest",
               str(manifest_path), "--workdir", str(vdir), "--windows", str(args.windows),
               "--threads", str(args.threads)]
        validators.append(_spawn(cmd, vdir / "log.txt"))
    attackers = []
    if args.attack:  # the red team: watch every defence hold (docs/security.md)
        cmd = [sys.executable, "-m", "locoswarm.attack", "--store", store_uri, "--workdir", str(workdir / "attacker"),
               "--windows", str(args.windows), "--faults", args.attack]
        attackers.append(_spawn(cmd, workdir / "attacker" / "log.txt"))
        console.print(f"attacker started ({args.attack}); its log: {workdir / 'attacker' / 'log.txt'}")

    progress_files = [workdir / "peers" / n / "progress.json" for n in names]
    history_files = [workdir / "peers" / n / "history.jsonl" for n in names]
    started = time.time()
    seen: dict[tuple[int, int], bool] = {}
    try:
        live = Live(console=console, refresh_per_second=2, transient=False) if console.is_terminal else None
        if live:
            live.start()
        while any(p.poll() is None for p in procs):
            rows = [read_progress(f) for f in progress_files]
            if live:
                live.update(_table(rows, names, time.time() - started, args.windows))
            else:
                for i, path in enumerate(history_files):
                    for h in read_history(path):
                        if h.get("heldout_loss") is not None and (i, h["window"]) not in seen:
                            seen[(i, h["window"])] = True
                            console.print(f"{names[i]} window {h['window']:>3}  held-out loss {h['heldout_loss']:.4f}  "
                                          f"sent {human_bytes(h['bytes_up'])}  digest {h['digest'][:8]}")
            if time.time() - started > args.timeout:
                console.print(f"[red]timeout after {args.timeout:.0f}s; stopping peers[/]")
                break
            time.sleep(0.5)
        rows = [read_progress(f) for f in progress_files]
        if live:
            live.update(_table(rows, names, time.time() - started, args.windows))
            live.stop()
    finally:
        for p in procs + validators + attackers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs + validators + attackers:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    histories = [read_history(path) for path in history_files]
    return _summarize(console, args, workdir, rows, histories, procs, validators, time.time() - t0)


def _summarize(console: Console, args, workdir: Path, rows, histories, procs, validators, wall: float) -> int:
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    failed_validators = [i for i, p in enumerate(validators) if p.returncode not in (0, -signal.SIGTERM)]
    digests = [r["digest"] if r else None for r in rows]
    heldout = [h for h in (histories[0] if histories else []) if h.get("heldout_loss") is not None]
    payloads = [h["payload_bytes"] for hist in histories for h in hist if h.get("payload_bytes")]
    n_params = next((r["params"] for r in rows if r), None)
    applied = max((r["window"] for r in rows if r), default=0)
    summary = {
        "windows": applied,
        "peers": args.peers,
        "loss_first": heldout[0]["heldout_loss"] if heldout else None,
        "loss_last": heldout[-1]["heldout_loss"] if heldout else None,
        "digests_equal": bool(digests) and None not in digests and len(set(digests)) == 1,
        "digest": digests[0] if digests else None,
        "bytes_up_per_peer_per_window": statistics.median(
            [r["accounting"]["bytes_up"] / max(1, len([h for h in hist if h.get("payload_bytes")]))
             for r, hist in zip(rows, histories) if r]
        ) if any(rows) else None,
        "payload_bytes_median": statistics.median(payloads) if payloads else None,
        "params": n_params,
        "bits_per_param": (8 * statistics.median(payloads) / n_params) if payloads and n_params else None,
        "wall_seconds": round(wall, 1),
        "seconds_per_phase": {
            k: round(statistics.mean(r["accounting"]["seconds"][k] for r in rows if r), 2)
            for k in PHASES
        } if any(rows) else {},
        "failed_peers": failed,
        "failed_validators": failed_validators,
        "workdir": str(workdir),
    }
    if not args.no_plot and heldout:
        plot = workdir / "loss.png"
        _plot(histories, plot)
        summary["plot"] = str(plot)
    ok = not failed and not failed_validators and summary["digests_equal"] and applied >= args.windows
    console.print(
        f"\n[bold]{'done' if ok else 'FAILED'}[/]: {applied} windows, {args.peers} peers, held-out loss "
        f"{_fmt(summary['loss_first'])} -> {_fmt(summary['loss_last'])}, "
        f"replicas bit-identical: {summary['digests_equal']}, "
        f"payload {human_bytes(summary['payload_bytes_median'] or 0)} per peer per window"
        + (f" ({summary['bits_per_param']:.3f} bits/param)" if summary["bits_per_param"] else "")
        + (f"\nplot: {summary.get('plot')}" if summary.get("plot") else "")
        + (f"\nlogs: {workdir}/peers/*/log.txt" if failed else "")
        + (f"\nvalidator logs: {workdir}/validators/*/log.txt" if failed_validators else "")
    )
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0 if ok else 1
