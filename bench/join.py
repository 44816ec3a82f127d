"""What ``locoswarm join`` estimates a peer needs, next to what a real one takes.

For each preset: a private run on a small corpus whose only listed peer is the joiner, then
``locoswarm join`` for a few windows in a subprocess. Printed per preset, one JSON object:
the estimate the machine check compares with free memory (``locoswarm.machine.needs``, on
the CPU), the peak resident memory of the join process (``wait4``'s ``ru_maxrss``), their
ratio (above 1: the check is on the safe side), and the seconds from start to the last
window. The estimate must stay above the measurement, or joiners run out of memory after
passing the check.

    locoswarm bench join --presets tiny,25m,150m --windows 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", default="tiny,25m", help="comma-separated model presets (default tiny,25m)")
    p.add_argument("--windows", type=int, default=2, help="windows the joiner trains (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the joiner (default 2)")
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary (default 2048)")


def run(args: argparse.Namespace) -> int:
    from locoswarm.machine import needs
    from node.genesis import init_run
    from protocol.dataindex import DataIndex
    from protocol.identity import Identity
    from protocol.manifest import Manifest
    from protocol.paths import DATA_INDEX
    from protocol.stores import open_store

    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-join-{preset}-") as tmp:
            root = Path(tmp)
            key = Identity.from_seed(b"bench join")
            key.save(root / "peer.key")
            manifest = Manifest().replace(
                run__id=f"bench-{preset}", run__peers=(key.public_key.hex(),), run__window_seconds=600.0,
                model__preset=preset, tokenizer__vocab_size=args.vocab, data__max_chars=400_000,
                data__seq_len=128, data__batch_size=8, inner__steps=4, data__eval_sequences=16,
            )
            with open_store(f"file://{root / 'store'}") as store:
                manifest = init_run(manifest, store)
                index = DataIndex.from_json(store.get(DATA_INDEX))
                data_bytes = sum(o.size for o in store.list("data/"))
            (root / "run.toml").write_text(manifest.to_toml())
            estimate = needs(manifest, index.vocab_size, data_bytes, "cpu")
            cmd = [sys.executable, "-m", "locoswarm.cli", "join", str(root / "run.toml"), "--store",
                   f"file://{root / 'store'}", "--workdir", str(root / "w"), "--key", str(root / "peer.key"),
                   "--device", "cpu", "--windows", str(args.windows), "--threads", str(args.threads)]
            t0 = time.time()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.time() - t0
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if os.waitstatus_to_exitcode(status) != 0:
                print(err[-3000:], file=sys.stderr)
                return 1
            peak = usage.ru_maxrss * 1024  # Linux reports kilobytes
            total = estimate.device_bytes + estimate.host_bytes
            print(json.dumps({
                "bench": "join", "preset": preset, "params": estimate.params, "windows": args.windows,
                "estimated_bytes": total, "peak_rss_bytes": peak, "estimate_over_peak": round(total / peak, 2),
                "estimated_disk_bytes": estimate.disk_bytes,
                "workdir_bytes": sum(f.stat().st_size for f in (root / "w").rglob("*") if f.is_file()),
                "seconds": round(seconds, 1),
            }), flush=True)
    return 0
