"""End to end, as a person sees a run: a standalone ``locoswarm peer``'s output, then
``status --eval`` and ``export`` standing at the run's newest window (not at its checkpoint,
not at genesis). Real processes, so marked slow."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest

from node.progress import read_history
from tests.network import (
    REPO,
    create_run,
    last_json_line,
    peer_identity,
    peer_keys,
    small_manifest,
    wait_for,
)

pytestmark = pytest.mark.slow

WINDOWS = 3
CHECKPOINT_EVERY = 2
"""The newest checkpoint is at the start of window 2; window 2 is replayed after it."""


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "locoswarm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("people")
    run = create_run(root, small_manifest(run__peers=peer_keys("p0"), run__checkpoint_every=CHECKPOINT_EVERY,
                                          inner__steps=2, inner__warmup_steps=2))
    shutil.copytree(root / "store", root / "genesis-store")
    peer_identity("p0").save(root / "p0" / "peer.key")
    res = cli("peer", "--store", run.uri, "--workdir", str(root / "p0"), "--windows", str(WINDOWS), "--eval-every", "1",
              timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return run, root, res, read_history(root / "p0" / "history.jsonl")


def test_a_standalone_peer_logs_each_window_and_a_summary(finished):
    _, _, res, history = finished
    err = res.stderr
    assert "starting from genesis: held-out loss" in err
    for w in range(WINDOWS):
        line = next(x for x in err.splitlines() if f"locoswarm.peer: window {w}: train loss " in x)
        assert "held-out" in line and "1 payloads kept, ours counted" in line and " up " in line and " down " in line
    assert f"trained windows 0-{WINDOWS - 1} ({WINDOWS}); our payload counted in {WINDOWS} of {WINDOWS}" in err
    assert f"held-out loss {history[1]['heldout_loss']:.4f} -> {history[-1]['heldout_loss']:.4f}" in err
    assert f"digest {history[-1]['digest']}" in err


def test_status_eval_stands_at_the_newest_window(finished):
    run, _, _, history = finished
    res = cli("status", "--store", run.uri, "--json", "--eval")
    state = last_json_line(res.stdout)
    assert state["window"] == WINDOWS - 1
    model = state["model"]
    assert (model["after_window"], model["checkpoint"], model["replayed"]) == (WINDOWS - 1, CHECKPOINT_EVERY, 1)
    assert model["digest"] == history[-1]["digest"]
    assert model["heldout_loss"] == pytest.approx(history[-1]["heldout_loss"], rel=1e-4)
    (peer,) = state["peers"].values()
    assert peer["in_sync"] and peer["counted_windows"] == WINDOWS


def test_export_writes_the_newest_model_with_a_sample_and_says_where_it_stands(finished):
    run, root, _, history = finished
    res = cli("export", "--store", run.uri, "--out", str(root / "hf"), "--sample", "The ")
    exported = last_json_line(res.stdout)
    assert (exported["after_window"], exported["replayed"], exported["run_newest_window"]) == (WINDOWS - 1, 1, WINDOWS - 1)
    assert exported["digest"] == history[-1]["digest"]
    assert f"exported the model after window {WINDOWS - 1}" in res.stderr and "warning" not in res.stderr
    sample = (root / "hf" / "sample.txt").read_text()
    assert sample.startswith("The ") and len(sample) > 20
    assert json.loads((root / "hf" / "config.json").read_text())["model_type"] == "llama"

    res = cli("export", "--store", run.uri, "--out", str(root / "hf-checkpoint"), "--checkpoint-only")
    exported = last_json_line(res.stdout)
    assert (exported["after_window"], exported["replayed"]) == (CHECKPOINT_EVERY - 1, 0)
    assert f"warning: the run has decided windows up to {WINDOWS - 1}" in res.stderr


def test_exporting_a_run_with_no_decided_window_warns_it_is_the_genesis_model(finished):
    _, root, _, _ = finished
    res = cli("export", "--store", f"file://{root / 'genesis-store'}", "--out", str(root / "hf-genesis"))
    exported = last_json_line(res.stdout)
    assert exported["after_window"] is None and exported["windows_applied"] == 0
    assert "warning: no window was applied: this is the untrained genesis model" in res.stderr


def test_a_validator_outside_the_manifest_shows_the_truth_on_its_dashboard(finished):
    """A real validator process follows the finished run: its page and metrics say it is not
    trusted, that the peer is present and in sync by its payload's base digest, and how many
    bytes it downloaded (counters from its accounting)."""
    run, root, _, history = finished
    vdir = root / "validator"
    proc = subprocess.Popen([sys.executable, "-m", "locoswarm.cli", "validator", "--store", run.uri, "--workdir",
                             str(vdir), "--windows", str(WINDOWS + 1), "--threads", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = wait_for(lambda: (vdir / "dashboard.url").exists() and (vdir / "dashboard.url").read_text(), 300,
                       "the validator's dashboard")

        def scored_all() -> dict | None:
            snap = json.loads(urllib.request.urlopen(url + "api/state", timeout=10).read())
            return snap if snap["window"] == WINDOWS - 1 else None

        snap = wait_for(scored_all, 300, "the validator to score every window", interval=1.0)
        metrics = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert snap["trusted"] is False and (snap["present"], snap["in_sync"], snap["absent"]) == (1, 1, 0)
    (peer,) = snap["peers"]
    assert peer["peer"] == peer_identity("p0").peer_id and peer["last_window"] == WINDOWS - 1
    assert peer["base_digest"] == history[-2]["digest"][:12]  # the weights window 2 was trained from
    received = re.search(r'^locoswarm_received_bytes_total\{run="[^"]+"\} (\S+)$', metrics, re.MULTILINE)
    # It starts from the checkpoint at window 2 and scores window 2: at least that payload came down.
    assert received and float(received.group(1)) >= history[-1]["payload_bytes"] > 0
