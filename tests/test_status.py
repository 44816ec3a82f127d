"""``locoswarm status`` on a run whose records are written here: what it says, and that it
answers without torch (no model is built unless --eval asks)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locoswarm.cli import main
from locoswarm.status import run_state
from protocol import paths
from protocol.consensus import PRECOMMIT, CloseValue, Included, sign_decision, sign_vote
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.scores import PeerScore, make_score_record
from protocol.stores import open_store
from tests.network import REPO

VALIDATOR = Identity.from_seed(b"status validator")
STRANGER = Identity.from_seed(b"status stranger")
A, B, C, D = (Identity.from_seed(f"status peer {n}".encode()).peer_id for n in "abcd")
NEWEST = 9
B_LAST = 6
"""B publishes and counts up to window 6, then leaves."""
PAYLOAD = 23_456


def decide(store, manifest: Manifest, window: int, peers: list[str], closed_at: float, signer: Identity = VALIDATOR,
           *, publish: bool = True):
    included = tuple(Included(p, hashlib.sha256(f"{window}{p}".encode()).hexdigest(), PAYLOAD + i, p == A)
                     for i, p in enumerate(sorted(peers)))
    value = CloseValue(bytes(32), closed_at, -1, (), included)
    vote = sign_vote(signer, manifest.run_key, PRECOMMIT, window, 0, value.id)
    store.put(paths.decision_key(window, signer.peer_id), sign_decision(signer, manifest.run_key, window, value, [vote]))
    for p in peers if publish else ():
        store.put(paths.payload_key(window, p), b"x" * 100)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, Manifest]:
    root: Path = tmp_path_factory.mktemp("status")
    uri = f"file://{root / 'store'}"
    manifest = Manifest().replace(run__id="status", validators__keys=(VALIDATOR.public_key.hex(),))
    store = open_store(uri)
    store.put(paths.MANIFEST, manifest.to_toml().encode())
    now = time.time()
    for w in range(NEWEST + 1):
        decide(store, manifest, w, [A, B] if w <= B_LAST else [A], closed_at=now - 30 * (NEWEST + 1 - w))
    store.put(paths.payload_key(NEWEST, C), b"late")  # published, not counted
    store.put(paths.payload_key(NEWEST + 1, D), b"new")  # the open window
    table = {A: PeerScore(0.8, True, True), B: PeerScore(0.2, False), C: PeerScore(0.5, False)}
    store.put(paths.score_key(NEWEST, VALIDATOR.peer_id), make_score_record(VALIDATOR, manifest.run_key, NEWEST, table))
    # Junk a reader must not believe: a far-future "decision" under the closer's key, and one
    # signed by a stranger under its own key.
    store.put(paths.decision_key(999_999, VALIDATOR.peer_id), b"junk")
    decide(store, manifest, NEWEST + 1, [STRANGER.peer_id], closed_at=now, signer=STRANGER, publish=False)
    store.close()
    return uri, manifest


def test_status_reports_the_newest_window_and_every_peer_seen_recently(run):
    uri, manifest = run
    with open_store(uri) as store:
        state = run_state(manifest, store, recent=8)
    assert state["window"] == NEWEST and state["open_window"] == NEWEST + 1
    assert [w["window"] for w in state["windows"]] == list(range(NEWEST, NEWEST - 8, -1))
    peers = state["peers"]
    assert set(peers) == {A, B, C, D}
    want = {"last_window": NEWEST, "counted_windows": 8, "in_sync": True, "standing": True, "payload_bytes": PAYLOAD,
            "admitted": True, "weight": 0.8}
    assert {k: peers[A][k] for k in want} == want
    assert (peers[B]["last_window"], peers[B]["in_sync"], peers[B]["admitted"]) == (B_LAST, None, False)
    assert peers[B]["counted_windows"] == B_LAST - (NEWEST - 8)  # windows 2..6 of the 8 read
    assert (peers[C]["last_window"], peers[C]["counted_windows"], peers[C]["included_last"]) == (NEWEST, 0, False)
    assert peers[D]["publishing_open"] and peers[D]["last_window"] is None
    assert state["scores_window"] == NEWEST


def test_status_prints_human_units_and_absences(run, capsys):
    uri, _ = run
    assert main(["status", "--store", uri, "--windows", "5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"newest decided window {NEWEST}" in out and f"window {NEWEST + 1} is open: 1 peer published" in out
    assert "peers seen in the last 5 windows" in out
    assert "absent 3 windows" in out and "published, not counted" in out and "new: publishing now" in out
    assert "22.9 KiB" in out and "held-out loss: add --eval" in out


@pytest.fixture
def status_in_a_fresh_process(run):
    uri, _ = run
    code = ("import sys, time; t = time.perf_counter(); from locoswarm.cli import main; "
            "rc = main(['status', '--store', sys.argv[1], '--json']); "
            "print('RESULT', rc, 'torch' in sys.modules, round(time.perf_counter() - t, 2), file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", code, uri], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)


def test_status_in_a_fresh_process_never_imports_torch(status_in_a_fresh_process):
    res = status_in_a_fresh_process
    rc, torch_loaded, seconds = res.stderr.split("RESULT", 1)[1].split()
    print(f"status answered in {seconds} s")
    assert (rc, torch_loaded) == ("0", "False"), res.stderr
    assert json.loads(res.stdout)["window"] == NEWEST
