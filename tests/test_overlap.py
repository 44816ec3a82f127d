"""Overlap (``inner.overlap``): window w+1 trains while window w is exchanged on a helper
thread; the replicas stay bit-identical and the run still learns."""

from __future__ import annotations

import pytest
import torch

from node.config import NodeConfig
from node.peer import Peer
from protocol.identity import Identity
from protocol.stores import open_store
from tests.network import create_run, run_in_threads, small_manifest

pytestmark = pytest.mark.slow  # two in-process networks of three peers

WINDOWS = 4


def _run(tmp_path, overlap: bool, eval_every: int = 1) -> list[Peer]:
    torch.set_num_threads(1)
    keys = [Identity.from_seed(f"overlap-{i}".encode()) for i in range(3)]
    manifest = small_manifest(run__peers=tuple(k.public_key.hex() for k in keys), inner__overlap=overlap)
    run = create_run(tmp_path, manifest)
    peers = []
    for i, key in enumerate(keys):
        workdir = tmp_path / f"p{i}"
        key.save(workdir / "peer.key")
        peers.append(Peer(run.manifest, open_store(run.uri),
                          NodeConfig(workdir=workdir, max_windows=WINDOWS, poll_seconds=0.05, eval_every=eval_every)))
    run_in_threads(peers, timeout=300)
    return peers


def test_overlapped_replicas_stay_bit_identical_and_learn(tmp_path):
    peers = _run(tmp_path / "overlap", overlap=True)
    assert len({p.replica.digest for p in peers}) == 1 and all(p.replica.window == WINDOWS for p in peers)
    for p in peers:
        applied = [h for h in p.history.read() if "included" in h]
        assert [h["window"] for h in applied] == list(range(WINDOWS))
        assert all(h["included"] == 3 for h in applied)  # every payload was on time and counted
        assert p.acct.background > 0  # the exchanges ran beside training
    losses = [h["heldout_loss"] for h in peers[0].history.read()]
    assert losses[-1] < losses[0]
    # The same run without overlap ends elsewhere (the local steps started elsewhere), not far.
    serial = _run(tmp_path / "serial", overlap=False)
    assert serial[0].replica.digest != peers[0].replica.digest
    assert abs(serial[0].history.read()[-1]["heldout_loss"] - losses[-1]) < 0.05 * losses[-1]


def test_windows_without_an_evaluation_train_on_from_the_peers_own_weights_and_stay_identical(tmp_path):
    """With an evaluation only every third window, most windows never load theta(w) into the
    model: training goes straight on from the peer's own end of window."""
    peers = _run(tmp_path, overlap=True, eval_every=3)
    assert len({p.replica.digest for p in peers}) == 1 and all(p.replica.window == WINDOWS for p in peers)
    history = peers[0].history.read()
    assert all(h["included"] == 3 for h in history if "included" in h)
    assert [h["window"] for h in history if h.get("heldout_loss") is not None and "included" in h] == [2]
