"""Honest peers, a validator and one attacker of each kind, all real processes on a file store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.accounting import Accounting
from node.checkpoint import checkpoint_windows
from node.follow import DecisionReader
from node.state import load_local_state
from protocol import paths
from protocol.identity import Identity
from protocol.scores import read_score_record
from protocol.stores import open_store
from tests.network import (
    REPO,
    PeerProcess,
    create_run,
    final_digest,
    heldout_curve,
    small_manifest,
)

pytestmark = pytest.mark.slow  # real multi-process networks: run with `pytest -m slow`

WINDOWS = 8
HONEST = 3


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    PeerProcess.kill_all()


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _network(root: Path, keys: Path, *, adversaries: bool) -> dict:
    """Run HONEST peers (fixed keys) + a validator (+ the attackers); return what happened."""
    vkey = Identity.load_or_create(keys / "validator.key")
    manifest = small_manifest(validators__keys=(vkey.public_key.hex(),), validators__score_lag=1)
    run = create_run(root, manifest)
    manifest, mpath, uri = run.manifest, run.manifest_path, run.uri
    vdir = root / "validator"
    vdir.mkdir(parents=True)
    shutil.copy(keys / "validator.key", vdir / "validator.key")
    validator = _spawn([sys.executable, "-m", "locoswarm.cli", "validator", "--store", uri, "--manifest", str(mpath),
                        "--workdir", str(vdir), "--windows", str(WINDOWS), "--threads", "1"], vdir / "log.txt")
    honest = []
    for i in range(HONEST):
        (root / "peers" / f"h{i}").mkdir(parents=True)
        shutil.copy(keys / f"h{i}.key", root / "peers" / f"h{i}" / "peer.key")
        honest.append(PeerProcess(root, f"h{i}", mpath, uri, windows=WINDOWS))
    attacker = None
    if adversaries:
        victim = Identity.load(keys / "h0.key").peer_id
        attacker = _spawn([sys.executable, "-m", "tests.adversary", "--store", uri, "--manifest", str(mpath),
                           "--workdir", str(root / "adversary"), "--windows", str(WINDOWS), "--victim", victim],
                          root / "adversary" / "log.txt")
    try:
        for p in honest:
            assert p.wait(timeout=600) == 0, p.log()
        if attacker is not None:
            assert attacker.wait(timeout=120) == 0, (root / "adversary" / "log.txt").read_text()[-5000:]
        validator.wait(timeout=180)
    finally:
        for proc in (validator, attacker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    store = open_store(uri)
    reader = DecisionReader(store, manifest, Accounting())
    closes = [d for w in range(WINDOWS) if (d := reader.read(w)) is not None]  # old windows are collected
    return {
        "honest": honest,
        "ids": [Identity.load(keys / f"h{i}.key").peer_id for i in range(HONEST)],
        "closes": closes,
        "store": store,
        "manifest": manifest,
        "validator_log": (vdir / "log.txt").read_text(),
        "validator_state": load_local_state(vdir / "state.safetensors"),
        "root": root,
    }


def test_attackers_are_rejected_outscored_and_left_out(tmp_path):
    keys = tmp_path / "keys"
    for name in [f"h{i}" for i in range(HONEST)] + ["validator"]:
        Identity.load_or_create(keys / f"{name}.key")
    attacked = _network(tmp_path / "attacked", keys, adversaries=True)
    clean = _network(tmp_path / "clean", keys, adversaries=False)

    # Honest replicas stay bit-identical, and so does the validator that follows them.
    digests = {final_digest(p) for p in attacked["honest"]}
    assert len(digests) == 1
    assert attacked["validator_state"].window == WINDOWS

    # Validators decide this run, so the validator (every round's proposer) publishes the
    # checkpoints and collects old windows: no peer ever does.
    for net in (attacked, clean):
        assert f"published the checkpoint of window {WINDOWS}" in net["validator_log"]
        assert next(checkpoint_windows(net["store"], net["manifest"].run.checkpoint_every)) == WINDOWS
        assert not (net["root"] / "store" / "windows" / "000000").exists(), "window 0 should have been collected"

    ids = json.loads((attacked["root"] / "adversary" / "ids.json").read_text())
    adversaries = set(ids.values())
    honest = set(attacked["ids"])

    # Malformed and forged payloads are refused with a reason naming the fault.
    log = attacked["validator_log"]
    assert f"{ids['nan']} rejected" in log and "finite" in log
    assert f"{ids['forge']} rejected" in log
    assert f"{ids['replay']} rejected" in log and "window" in log

    # After a few windows every attacker scores below every honest peer and is left out.
    vid = Identity.load(keys / "validator.key").peer_id
    last = WINDOWS - 1
    record = read_score_record(attacked["store"].get(paths.scores_prefix(last) + f"{vid}.lsr"),
                               attacked["manifest"].run_key, attacked["manifest"].validators.keys)
    honest_weights = [record.peers[p].weight for p in honest]
    assert all(record.peers[p].included for p in honest), record.peers
    for fault, peer in ids.items():
        if peer in record.peers:
            assert record.peers[peer].weight < min(honest_weights), (fault, record.peers[peer])
            assert not record.peers[peer].included, fault
    late = [c for c in attacked["closes"] if c.window >= 3]
    assert late
    for close in late:
        assert not (set(close.peers) & adversaries), (close.window, set(close.peers) & adversaries)
        assert honest <= set(close.peers)

    # The attacked network learns (almost) as well as the clean one.
    attacked_loss = heldout_curve(attacked["honest"][0])[-1]
    clean_loss = heldout_curve(clean["honest"][0])[-1]
    assert attacked_loss <= clean_loss * 1.02, (attacked_loss, clean_loss)
