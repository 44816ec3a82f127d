"""End to end over ``p2p://``: no bucket, real hivemind DHT nodes and libp2p streams.

A p2p store keeps each object in the memory of the process that wrote it (the DHT only
says who holds what), so the run's manifest, data and genesis checkpoint need a process
that keeps serving them: the *seed*, ``locoswarm init --serve``. It writes the final
manifest and its visible multiaddrs to files and serves until stopped. Its DHT node is the
network's bootstrap: every peer gets ``--initial-peers`` from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.network import (
    REPO,
    PeerProcess,
    final_digest,
    heldout_curve,
    small_manifest,
    wait_for,
)

pytestmark = pytest.mark.slow  # real multi-process networks: run with `pytest -m slow`

SEED_START_TIMEOUT = 120.0


class Seed:
    """The seed process (``locoswarm init --serve``), stopped and reaped at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_path = workdir / "seed.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "locoswarm.cli", "init", "--store", "p2p://p2p-test", "--manifest",
                 str(workdir / "small.toml"), "--out-manifest", str(workdir / "manifest.toml"), "--serve",
                 "--addrs-file", str(workdir / "maddrs.json")],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)

    def wait_ready(self) -> list[str]:
        def ready() -> list[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the seed exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            path = self.workdir / "maddrs.json"
            return json.loads(path.read_text()) if path.exists() else None

        return wait_for(ready, SEED_START_TIMEOUT, "the seed to create and serve the run")

    def stop(self) -> None:
        """SIGTERM the seed (it closes its store), then SIGKILL whatever is left of its group (p2pd)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def seed(tmp_path):
    pytest.importorskip("hivemind")
    (tmp_path / "small.toml").write_text(small_manifest(run__id="p2p-test", run__window_seconds=20.0).to_toml())
    process = Seed(tmp_path)
    yield process
    PeerProcess.kill_all()
    process.stop()


def test_three_p2p_peers_survive_a_killed_peer_and_stay_bit_identical(seed, tmp_path):
    maddrs = seed.wait_ready()
    uri = "p2p://p2p-test"
    peers = [
        PeerProcess(tmp_path, f"p{i}", tmp_path / "manifest.toml", uri, windows=4,
                    extra=["--initial-peers", *maddrs])
        for i in range(3)
    ]
    victim = peers[2]
    # Once the victim trains window 1, window 0 was decided with its payload and it has not
    # published window 1. Waiting for all three to be in that short phase at once was a race.
    wait_for(lambda: (victim.progress or {}).get("window") == 1 and victim.progress["phase"] == "train",
             150, "the victim to have applied window 0 and be training window 1", interval=0.05)
    victim.kill(signal.SIGKILL)

    for p in peers[:2]:
        assert p.wait(timeout=240) == 0, p.log()
    assert final_digest(peers[0]) == final_digest(peers[1])
    history = peers[0].history
    assert [h["included"] for h in history[1:]] == [3, 2, 2, 2], history  # the victim only counted in window 0
    curve = heldout_curve(peers[0])
    assert curve[-1] < curve[0] - 0.2, curve

