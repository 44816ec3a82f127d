"""The prepared GPU check: everything the GPU issue needs measured, in one run of a few minutes.

    python -m bench.device_check OUTDIR            # on a machine with a CUDA GPU
    python -m bench.device_check OUTDIR --cpu      # the same steps on the CPU, tiny sizes (CI)

Writes one JSON file per step into OUTDIR (and prints each as a line), then ``summary.json``:

1. ``replicas.json``: a CPU peer and a GPU peer of one run (separate processes, real
   ``locoswarm peer``), a few windows; their digests must be equal every window.
2. ``window-<preset>.json``: ``bench window`` on the device for the 150m and 1b presets
   (seconds per phase, overhead over training, peak device memory, the memory plan).
3. ``aggregate-1b.json``: the aggregate of 20 simulated 1b payloads on the device, decode
   included (goal: under 1 s), and the same on the CPU for comparison.

Every step has its own time limit; a step that fails writes its error and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", help="where the JSON files go")
    ap.add_argument("--cpu", action="store_true", help="no GPU: run every step on the CPU at tiny sizes")
    ap.add_argument("--windows", type=int, default=3, help="windows of the replica check (default 3)")
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": True, "reason": "no CUDA device; use --cpu to exercise the steps"}))
        return 2
    env = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
           "torch": torch.__version__, "started": time.time()}
    results = {"env": env}
    steps = [
        ("replicas", lambda: replicas(out, device, args.windows, quick=args.cpu), 150),
        ("aggregate-1b", lambda: aggregate_bench(device, quick=args.cpu), 60),
        *[(f"window-{p}", lambda p=p, t=t: window(p, device, quick=args.cpu, limit=t), t) for p, t in
          ((("tiny", 200),) if args.cpu else (("150m", 100), ("1b", 130)))],
    ]
    for name, step, limit in steps:
        t0 = time.time()
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 (one failed step must not cost the others their figures)
            result = {"error": repr(exc), "traceback": traceback.format_exc()[-3000:]}
        result = {"step": name, "seconds": round(time.time() - t0, 1), "limit_seconds": limit, **result}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
        results[name] = result
    summary = {
        "env": env,
        "replicas_bit_identical": results["replicas"].get("bit_identical"),
        "aggregate_1b_20_peers_seconds": results["aggregate-1b"].get("device_seconds"),
        "aggregate_goal_met": (results["aggregate-1b"].get("device_seconds") or 1e9) < 1.0,
        "windows": {k: {f: v.get(f) for f in ("overhead_ratio", "peak_device_bytes", "peak_rss_bytes", "plan", "error")}
                    for k, v in results.items() if k.startswith("window-")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return 0 if summary["replicas_bit_identical"] else 1


# ---------------------------------------------------------------------------- 1. replicas


def replicas(out: Path, device: str, windows: int, *, quick: bool) -> dict:
    """A CPU peer and a ``device`` peer of one run; their per-window digests."""
    from node.genesis import init_run
    from protocol.identity import Identity
    from protocol.manifest import Manifest
    from protocol.stores.file import FileStore

    root = Path(tempfile.mkdtemp(prefix="device-check-", dir=out))
    keys = {name: Identity.from_seed(f"device check {name}".encode()) for name in ("cpu", "gpu")}
    manifest = Manifest().replace(
        run__id="device-check", run__peers=tuple(k.public_key.hex() for k in keys.values()),
        run__window_seconds=60.0, run__genesis=time.time() + 40, outer__lr=0.7,  # lr != 1: the FMA case
        model__preset="tiny" if quick else "25m", data__max_chars=1_000_000, inner__steps=4 if quick else 10,
        data__seq_len=64 if quick else 256, data__batch_size=8,
    )
    manifest = init_run(manifest, FileStore(root / "store"))
    (root / "manifest.toml").write_text(manifest.to_toml())
    procs = {}
    for name, key in keys.items():
        workdir = root / name
        key.save(workdir / "peer.key")
        cmd = [sys.executable, "-m", "locoswarm.cli", "peer", "--store", f"file://{root / 'store'}", "--manifest",
               str(root / "manifest.toml"), "--workdir", str(workdir), "--windows", str(windows), "--eval-every", "0",
               "--device", "cpu" if name == "cpu" else device]
        log = open(workdir / "log.txt", "ab")  # noqa: SIM115 (the process owns it)
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.time() + 140
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = "timeout"
    digests = {name: [json.loads(line)["digest"] for line in (root / name / "history.jsonl").read_text().splitlines()
                      if line.strip()] if (root / name / "history.jsonl").exists() else [] for name in keys}
    phases = {name: json.loads((root / name / "progress.json").read_text())["accounting"]["seconds"]
              for name in keys if (root / name / "progress.json").exists()}
    return {"exit_codes": codes, "digests": digests, "seconds_per_phase": phases,
            "bit_identical": bool(digests["cpu"]) and digests["cpu"] == digests["gpu"] and len(digests["cpu"]) > windows,
            "logs_tail": {n: (root / n / "log.txt").read_text()[-1500:] for n in keys if codes[n] != 0}}


# ---------------------------------------------------------------------------- 2. one window


def window(preset: str, device: str, *, quick: bool, limit: float) -> dict:
    """``bench window`` for ``preset`` on ``device`` (8 payloads per window)."""
    cmd = [sys.executable, "-m", "locoswarm.cli", "bench", "window", "--preset", preset, "--device", device,
           "--peers", "8", "--windows", "2", "--steps", "4" if quick else "20",
           "--seq-len", "128" if quick else "1024", "--batch-size", "8"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=limit)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": f"exit {res.returncode}", "stderr": res.stderr[-3000:]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- 3. aggregation


def aggregate_bench(device: str, *, quick: bool, peers: int = 20) -> dict:
    """Decode and aggregate ``peers`` simulated payloads of the 1b preset (tiny with
    ``quick``) on ``device`` and on the CPU; the device's result must equal the CPU's."""
    from transformers import LlamaForCausalLM

    from bench.window import sparse_tensor
    from node.model import model_config
    from protocol.aggregate import iter_aggregate
    from protocol.codec_types import model_layout
    from protocol.identity import Identity
    from protocol.manifest import CodecConfig, ModelConfig
    from protocol.wire import Expectation, decode_payload, encode_payload

    preset = "tiny" if quick else "1b"
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config(ModelConfig(preset=preset), 32768 if not quick else 2048, 2048))
    codec = CodecConfig()
    layouts = model_layout({n: tuple(p.shape) for n, p in model.named_parameters()}, codec)
    gen = torch.Generator().manual_seed(0)
    tensors = {n: sparse_tensor(lay, gen) for n, lay in layouts.items()}
    idents = [Identity.from_seed(f"agg {i}".encode()) for i in range(peers)]
    blobs = {ident.peer_id: encode_payload(run="bench@0", window=0, base_digest=b"\0" * 32, tokens=1, tensors=tensors,
                                           codec=codec, identity=ident) for ident in idents}
    expect = Expectation(run="bench@0", window=0, layouts=layouts, codec=codec, max_bytes=max(map(len, blobs.values())),
                         base_digest=b"\0" * 32)
    out = {"preset": preset, "peers": peers, "params": sum(lay.numel for lay in layouts.values()),
           "payload_bytes": len(next(iter(blobs.values())))}
    sums = {}
    for where in ([device, "cpu"] if device != "cpu" else ["cpu"]):
        sync = torch.cuda.synchronize if where == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        decoded = [(p, decode_payload(b, expect, device=where).tensors) for p, b in blobs.items()]
        sync()
        t1 = time.perf_counter()
        checksum = torch.zeros((), dtype=torch.float64, device=where)
        digest_parts = []
        for _name, t in iter_aggregate(decoded, layouts):
            checksum += t.double().sum()
            digest_parts.append(t.cpu() if where != "cpu" else t)
        sync()
        t2 = time.perf_counter()
        key = "device" if where == device and device != "cpu" else "cpu"
        out[f"{key}_decode_seconds"] = round(t1 - t0, 3)
        out[f"{key}_aggregate_seconds"] = round(t2 - t1, 3)
        out[f"{key}_seconds"] = round(t2 - t0, 3)
        if where == "cuda":
            out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        sums[where] = digest_parts
        del decoded
    if device != "cpu":
        out["device_equals_cpu"] = all(torch.equal(a, b) for a, b in zip(sums[device], sums["cpu"]))
    else:
        out["device_seconds"] = out["cpu_seconds"]
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
