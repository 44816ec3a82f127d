"""Golden runs: a change that is not meant to alter learning leaves these bit-identical.

Like torchtitan's golden loss curves: the digest of the final global weights and every
held-out and training loss of two deterministic runs are pinned in ``assets/golden.json``.
A change that is meant to alter learning updates the asset in the same commit and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.config import NodeConfig
from node.peer import Peer
from node.progress import read_history
from protocol.identity import Identity
from protocol.stores import open_store
from tests.network import (
    REPO,
    create_run,
    last_json_line,
    run_in_threads,
    small_manifest,
)

GOLDEN = json.loads((Path(__file__).parent / "assets" / "golden.json").read_text())


def _curve(history: list[dict]) -> list[list]:
    return [[h["window"], h.get("heldout_loss"), h.get("train_loss")] for h in history]


def test_three_peers_in_threads_end_on_the_golden_digest(tmp_path):
    """The real ``Peer`` window loop, three replicas in one process (fast enough for every run)."""
    torch.set_num_threads(1)
    keys = [Identity.from_seed(f"golden-{i}".encode()) for i in range(3)]
    run = create_run(tmp_path, small_manifest(run__peers=tuple(k.public_key.hex() for k in keys)))
    peers = []
    for i, key in enumerate(keys):
        workdir = tmp_path / f"p{i}"
        key.save(workdir / "peer.key")
        node = NodeConfig(workdir=workdir, max_windows=3, poll_seconds=0.05, eval_every=1)
        peers.append(Peer(run.manifest, open_store(run.uri), node))
    run_in_threads(peers, timeout=240)
    golden = GOLDEN["small_threads"]
    assert [p.replica.digest.hex() for p in peers] == [golden["digest"]] * 3
    assert _curve(peers[0].history.read()) == golden["curve"]


@pytest.mark.slow
def test_default_local_network_ends_on_the_golden_digest_and_losses(tmp_path):
    """The README's first command, ``locoswarm up`` on embedded defaults (3 peers, 12 windows)."""
    res = subprocess.run([sys.executable, "-m", "locoswarm.cli", "up", "--json", "--no-plot", "--workdir",
                          str(tmp_path / "up")], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = last_json_line(res.stdout)
    golden = GOLDEN["default_up"]
    assert summary["digests_equal"] and summary["digest"] == golden["digest"]
    assert _curve(read_history(tmp_path / "up" / "peers" / "peer-0" / "history.jsonl")) == golden["curve"]
