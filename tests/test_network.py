"""End to end on a file store with real peer processes (tiny preset)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest

from node.state import load_local_state
from protocol.digest import weights_digest
from tests.network import (
    REPO,
    PeerProcess,
    copy_run,
    create_run,
    final_digest,
    heldout_curve,
    last_json_line,
    small_manifest,
    wait_for,
)

pytestmark = pytest.mark.slow  # real multi-process networks: run with `pytest -m slow`

@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    PeerProcess.kill_all()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One initialized run (data, tokenizer, genesis weights), copied by every test."""
    root = tmp_path_factory.mktemp("template")
    create_run(root)
    return root


@pytest.fixture
def run(template, tmp_path):
    return copy_run(template, tmp_path / "run")


def test_three_peers_learn_together_and_stay_bit_identical(run):
    root, mpath, uri = run.root, run.manifest_path, run.uri
    peers = [PeerProcess(root, f"p{i}", mpath, uri, windows=4,
                         extra=["--metrics-port", "0"] if i == 0 else None) for i in range(3)]
    url = wait_for(lambda: (peers[0].workdir / "metrics.url").exists() and len(peers[0].history) >= 2
                   and (peers[0].workdir / "metrics.url").read_text(),
                   180, "peer 0 to finish a window and serve metrics")
    metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "locoswarm_window{" in metrics and "locoswarm_sent_bytes_total{" in metrics
    for p in peers:
        assert p.wait(timeout=240) == 0, p.log()
    digests = {final_digest(p) for p in peers}
    assert len(digests) == 1
    curve = heldout_curve(peers[0])
    assert len(curve) == 5  # genesis + 4 windows
    assert curve[-1] < curve[0] - 0.3, curve
    hist = peers[0].history
    assert all(h["included"] == 3 for h in hist[1:]), hist

    res = subprocess.run([sys.executable, "-m", "locoswarm.cli", "status", "--store", uri, "--json", "--eval"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    status = last_json_line(res.stdout)
    assert status["window"] == 3 and len(status["peers"]) == 3
    assert all(info["included_last"] and info["standing"] for info in status["peers"].values())
    assert status["model"]["after_window"] == 3 and status["model"]["heldout_loss"] == pytest.approx(curve[-1], rel=1e-4)

    out = root / "hf"
    res = subprocess.run([sys.executable, "-m", "locoswarm.cli", "export", "--store", uri, "--out",
                          str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    exported_info = last_json_line(res.stdout)
    assert (exported_info["after_window"], exported_info["checkpoint"], exported_info["replayed"]) == (3, 2, 2), \
        res.stderr[-2000:]  # the checkpoint of window 2, windows 2 and 3 replayed
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out)
    assert weights_digest(dict(exported.named_parameters())).hex() == final_digest(peers[0])


def test_killed_peer_does_not_stop_others_and_resumes(run):
    root, mpath, uri = run.root, run.manifest_path, run.uri
    peers = [PeerProcess(root, f"p{i}", mpath, uri, windows=5) for i in range(3)]
    victim = peers[2]
    # The state is written off the window's path: wait until one exists, or the kill may land
    # before the first write is done and the victim rightly restarts from a checkpoint.
    wait_for(lambda: (victim.progress or {}).get("window", 0) >= 1 and victim.progress["phase"] == "train"
             and (victim.workdir / "state.safetensors").exists(), 120,
             "the victim to be training window 1 or later with its state saved", interval=0.05)
    victim.kill(signal.SIGKILL)
    for p in peers[:2]:
        assert p.wait(timeout=300) == 0, p.log()
    victim.start()
    assert victim.wait(timeout=240) == 0, victim.log()
    assert final_digest(victim) == final_digest(peers[0]) == final_digest(peers[1])
    assert victim.progress["origin"]["from"] == "state"


def test_late_joiner_catches_up_bit_identically(template, tmp_path):
    run = copy_run(template, tmp_path / "run", peers=("p0", "p1"))  # the late one only follows
    root, mpath, uri = run.root, run.manifest_path, run.uri
    early = [PeerProcess(root, f"p{i}", mpath, uri, windows=3) for i in range(2)]
    for p in early:
        assert p.wait(timeout=240) == 0, p.log()
    late = PeerProcess(root, "late", mpath, uri, windows=3)
    assert late.wait(timeout=120) == 0, late.log()
    assert final_digest(late) == final_digest(early[0])
    assert late.progress["origin"] == {"from": "checkpoint", "window": 2}
    assert late.progress["replayed"] == 1


@pytest.mark.skipif(shutil.which("torchrun") is None and not (REPO / ".venv/bin/torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_peer_with_two_gloo_ranks_and_loco_trains_with_a_plain_peer(template, tmp_path):
    run = copy_run(template, tmp_path / "run", peers=("ddp", "plain"))
    root, mpath, uri = run.root, run.manifest_path, run.uri
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "locoswarm.cli"]
    multi = PeerProcess(root, "ddp", mpath, uri, windows=3, launcher=torchrun,
                        extra=["--comm", "loco"])
    plain = PeerProcess(root, "plain", mpath, uri, windows=3)
    assert plain.wait(timeout=300) == 0, plain.log()
    assert multi.wait(timeout=300) == 0, multi.log()
    assert final_digest(multi) == final_digest(plain)
    assert (multi.progress["ranks"], multi.progress["comm"]) == (2, "loco")
    curve = heldout_curve(plain)
    assert curve[-1] < curve[0]
    assert all(h["included"] == 2 for h in plain.history[1:])


def test_up_runs_a_local_network_and_prints_a_json_summary(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "locoswarm.cli", "up", "--peers", "2", "--windows", "2", "--workdir",
         str(tmp_path / "up"), "--steps", "4", "--json", "--manifest", str(_small_manifest_file(tmp_path))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    summary = last_json_line(res.stdout)
    assert summary["windows"] == 2 and summary["peers"] == 2
    assert summary["digests_equal"] is True
    assert summary["loss_last"] < summary["loss_first"]
    assert 0 < summary["bytes_up_per_peer_per_window"] < 4 * summary["params"] / 100
    assert (tmp_path / "up" / "loss.png").stat().st_size > 10_000


def _small_manifest_file(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(small_manifest().to_toml())
    return path


def test_a_validator_away_while_its_windows_were_collected_catches_up_from_a_checkpoint(template, tmp_path):
    run = copy_run(template, tmp_path / "run", peers=("p0", "p1"))  # keeps 4 windows, a checkpoint every 2
    peers = [PeerProcess(run.root, name, run.manifest_path, run.uri, windows=8) for name in ("p0", "p1")]
    for p in peers:
        assert p.wait(timeout=600) == 0, p.log()
    assert not (run.root / "store" / "windows" / "000000").exists(), "window 0 should have been collected"
    vdir = run.root / "validator"
    res = subprocess.run(
        [sys.executable, "-m", "locoswarm.cli", "validator", "--store", run.uri, "--manifest", str(run.manifest_path),
         "--workdir", str(vdir), "--windows", "8", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    state = load_local_state(vdir / "state.safetensors")
    assert state.window == 8
    assert weights_digest(state.weights).hex() == final_digest(peers[0])
