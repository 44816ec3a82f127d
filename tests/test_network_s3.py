"""End to end on S3: real peer processes against a moto S3 server process on 127.0.0.1.

The outage test freezes the server with SIGSTOP and thaws it with SIGCONT. moto keeps its
objects in memory, so killing and restarting it would bring back an *empty* bucket: that
tests a data-loss disaster, not an outage. A stopped process keeps its socket open, so
clients connect and then wait until their read timeout, exactly as they would behind a
dead link or a hung server, and the objects are all there when it comes back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from node.checkpoint import checkpoint_windows, fetch_checkpoint
from node.genesis import init_run
from node.state import load_local_state
from protocol.digest import weights_digest
from protocol.stores import StoreSettings, open_store
from protocol.stores.base import Store
from protocol.stores.s3 import S3Store
from tests.conftest import MotoServer
from tests.network import (
    REPO,
    PeerProcess,
    final_digest,
    heldout_curve,
    last_json_line,
    peer_keys,
    small_manifest,
    wait_for,
)

pytestmark = pytest.mark.slow  # real multi-process networks: run with `pytest -m slow`

# Short store timeouts so an outage is noticed within seconds (a store call gives up after
# 2 requests of 3 s), well inside the 30 s window deadline.
STORE_TIMEOUTS = ["--request-timeout", "3", "--retries", "2"]


class PausableMotoServer(MotoServer):
    """A moto server that can be frozen (SIGSTOP) and thawed (SIGCONT) with its objects intact."""

    def pause(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    PeerProcess.kill_all()


@pytest.fixture
def moto(aws_test_credentials) -> PausableMotoServer:
    """A fresh moto server of this test's own (the processes inherit the fake AWS credentials)."""
    server = PausableMotoServer()
    server.start()
    yield server
    server.resume()
    server.kill()


def _bucket(server: MotoServer) -> S3Store:
    """A new bucket on ``server``; peers never create buckets, the run's creator does."""
    return S3Store(f"run-{uuid.uuid4().hex[:12]}", "run", endpoint_url=server.endpoint_url, region="us-east-1",
                   create_bucket=True)


def _open(uri: str, server: MotoServer) -> Store:
    return open_store(StoreSettings.parse(uri, endpoint_url=server.endpoint_url))


def test_up_on_an_s3_server_learns_with_bit_identical_replicas(moto, tmp_path):
    with _bucket(moto) as store:
        uri = f"s3://{store.bucket}/run"
    manifest_path = tmp_path / "small.toml"
    manifest_path.write_text(small_manifest().to_toml())
    res = subprocess.run(
        [sys.executable, "-m", "locoswarm.cli", "up", "--store", uri, "--endpoint-url", moto.endpoint_url,
         "--peers", "2", "--windows", "3", "--json", "--no-plot", "--timeout", "240", "--manifest",
         str(manifest_path), "--workdir", str(tmp_path / "up")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    summary = last_json_line(res.stdout)
    assert summary["windows"] == 3 and summary["peers"] == 2 and summary["failed_peers"] == []
    assert summary["digests_equal"] is True
    assert summary["loss_last"] < summary["loss_first"]
    with _open(uri, moto) as store:
        assert len(store.list("windows/000002/payloads/")) == 2  # the objects really went through S3


def test_peers_outlive_an_s3_outage_and_keep_their_checkpoints(moto, tmp_path):
    with _bucket(moto) as store:
        uri = f"s3://{store.bucket}/run"
        manifest = init_run(small_manifest(), store)
    manifest_path = tmp_path / "manifest.toml"
    manifest_path.write_text(manifest.to_toml())
    peers = [PeerProcess(tmp_path, f"p{i}", manifest_path, uri, windows=4,
                         extra=["--endpoint-url", moto.endpoint_url, *STORE_TIMEOUTS]) for i in range(2)]

    # The outage starts while both are in window 1 and lasts until the node itself (not only
    # the store's inner retries) has run into it on each peer.
    wait_for(lambda: all((p.progress or {}).get("window") == 1 and p.progress["phase"] in ("train", "publish", "wait")
                         for p in peers), 150, "both peers to be in window 1", interval=0.05)
    moto.pause()
    try:
        wait_for(lambda: all((p.progress or {}).get("accounting", {}).get("store_errors", 0) >= 1 for p in peers), 90,
                 "both peers to give up a store call and carry on")
        assert all(p.proc.poll() is None for p in peers), "a peer died during the outage"
    finally:
        moto.resume()

    for p in peers:
        assert p.wait(timeout=240) == 0, p.log()
    assert final_digest(peers[0]) == final_digest(peers[1])
    history = peers[0].history
    assert [h["window"] for h in history] == [-1, 0, 1, 2, 3]
    assert sum(h["included"] == 2 for h in history[1:]) >= 3, [(h["window"], h.get("included")) for h in history]
    curve = heldout_curve(peers[0])
    assert curve[-1] < curve[0], curve

    for p in peers:  # no local state lost: each peer could resume from it
        state = load_local_state(p.workdir / "state.safetensors")
        assert state is not None and state.window == 4
    with _open(uri, moto) as store:
        assert next(checkpoint_windows(store, every=2)) == 4
        shapes = {k: tuple(v.shape) for k, v in state.weights.items()}
        weights = fetch_checkpoint(store, 4, bytes.fromhex(final_digest(peers[0])), shapes)
        assert weights_digest(weights).hex() == final_digest(peers[0])


def test_a_peer_serving_from_its_own_bucket_shares_presigned_urls_not_credentials(moto, tmp_path, monkeypatch):
    secret = "s3cr3t-that-must-never-leave-the-peer"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any; the peers inherit it
    with _bucket(moto) as store:
        uri = f"s3://{store.bucket}/run"
        # Both peers are the run's; presigned URLs point at the loopback S3 server.
        manifest = init_run(small_manifest(run__peers=peer_keys("own-bucket", "plain"), run__announce_private=True), store)
    with _bucket(moto) as own:
        own_uri = f"s3://{own.bucket}/mine"
    mpath = tmp_path / "manifest.toml"
    mpath.write_text(manifest.to_toml())
    common = ["--endpoint-url", moto.endpoint_url]
    solo = PeerProcess(tmp_path, "own-bucket", mpath, uri, windows=2,
                       extra=[*common, "--publish-store", own_uri])
    plain = PeerProcess(tmp_path, "plain", mpath, uri, windows=2, extra=common)
    for p in (solo, plain):
        assert p.wait(timeout=240) == 0, p.log()
    assert final_digest(solo) == final_digest(plain)
    assert all(h["included"] == 2 for h in plain.history[1:])
    solo_id = solo.progress["peer"]
    with _open(uri, moto) as run_store:
        keys = [o.key for o in run_store.list("windows/000001/")]
        assert f"windows/000001/announce/{solo_id}.lsr" in keys
        assert not any(solo_id in k for k in keys if "/payloads/" in k)  # its payload never entered the run bucket
        record = run_store.get(f"windows/000001/announce/{solo_id}.lsr")
    assert b"Signature=" in record and secret.encode() not in record
    with _open(own_uri, moto) as own_store:
        assert own_store.exists(f"windows/000001/payloads/{solo_id}.lsp")
