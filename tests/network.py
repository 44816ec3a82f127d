"""Helpers for end-to-end tests: a small run created once, and real peer processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from node.genesis import init_run
from node.progress import read_history, read_progress
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores import open_store

REPO = Path(__file__).resolve().parent.parent


DEFAULT_PEERS = ("p0", "p1", "p2")


def peer_identity(name: str) -> Identity:
    """The fixed key of the test peer called ``name``."""
    return Identity.from_seed(f"locoswarm test peer {name}".encode())


def peer_keys(*names: str) -> tuple[str, ...]:
    return tuple(peer_identity(n).public_key.hex() for n in names)


def small_manifest(**overrides) -> Manifest:
    """The tiny preset on a small corpus, short windows: a whole network in seconds. A private
    run of the peers ``DEFAULT_PEERS`` unless ``overrides`` say otherwise."""
    m = Manifest().replace(
        run__peers=peer_keys(*DEFAULT_PEERS),
        run__id="test",
        run__window_seconds=30.0,
        run__checkpoint_every=2,
        run__keep_windows=4,
        tokenizer__vocab_size=512,
        data__max_chars=400_000,
        data__seq_len=64,
        data__batch_size=8,
        data__eval_sequences=32,
        inner__steps=6,
        inner__warmup_steps=6,
        inner__lr=3e-3,
    )
    return m.replace(**overrides) if overrides else m


@dataclass(frozen=True)
class Run:
    """An initialized run: where it lives, its manifest (and that manifest's file), its store."""

    root: Path
    manifest: Manifest
    manifest_path: Path
    uri: str


def create_run(root: Path, manifest: Manifest | None = None, store_uri: str | None = None) -> Run:
    """Init a run under ``root`` (a file store in ``root/store`` unless ``store_uri``)."""
    root.mkdir(parents=True, exist_ok=True)
    uri = store_uri or f"file://{root / 'store'}"
    with open_store(uri) as store:
        manifest = init_run(manifest or small_manifest(), store)
    path = root / "manifest.toml"
    path.write_text(manifest.to_toml())
    return Run(root, manifest, path, uri)


def copy_run(template: Path, dest: Path, peers: tuple[str, ...] | None = None) -> Run:
    """A fresh copy of an initialized run (file store), so tests do not share state. The
    manifest holds nothing about where the store is, so the copy is the same run; with
    ``peers`` it becomes a run of those peers (same data and genesis, another identity)."""
    shutil.copytree(template, dest)
    manifest = Manifest.load(dest / "manifest.toml")
    if peers is not None:
        manifest = manifest.replace(run__peers=peer_keys(*peers))
        for path in (dest / "manifest.toml", dest / "store" / "manifest.toml"):
            path.write_text(manifest.to_toml())
    return Run(dest, manifest, dest / "manifest.toml", f"file://{dest / 'store'}")


class PeerProcess:
    """One ``locoswarm peer`` process with its own workdir and log."""

    started: list[PeerProcess] = []

    def __init__(self, root: Path, name: str, manifest_path: Path, store_uri: str, *, windows: int,
                 extra: list[str] | None = None, launcher: list[str] | None = None):
        self.workdir = root / "peers" / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.workdir / "peer.key").exists():
            peer_identity(name).save(self.workdir / "peer.key")
        self.log_path = self.workdir / "log.txt"
        cmd = (launcher or [sys.executable, "-m", "locoswarm.cli"]) + [
            "peer", "--store", store_uri, "--manifest", str(manifest_path), "--workdir", str(self.workdir),
            "--windows", str(windows), "--threads", "1", "--eval-every", "1", *(extra or []),
        ]
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        # GLOO_SOCKET_IFNAME keeps torchrun ranks' collective traffic on loopback.
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     start_new_session=True)
        PeerProcess.started.append(self)

    @classmethod
    def kill_all(cls) -> None:
        """Test teardown: no peer outlives its test."""
        for peer in cls.started:
            peer.kill()
        cls.started.clear()

    @property
    def progress(self) -> dict | None:
        return read_progress(self.workdir / "progress.json")

    @property
    def history(self) -> list[dict]:
        return read_history(self.workdir / "history.jsonl")

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"peer did not finish in {timeout}s; log:\n{self.log()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def final_digest(peer: PeerProcess) -> str:
    info = peer.progress
    assert info is not None, peer.log()
    return info["digest"]


def heldout_curve(peer: PeerProcess) -> list[float]:
    return [h["heldout_loss"] for h in peer.history if h.get("heldout_loss") is not None]


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def run_in_threads(peers: list, timeout: float) -> None:
    """Run in-process ``Peer`` objects side by side until each returns; raise what one raised."""
    errors: list[BaseException] = []

    def run_peer(peer) -> None:
        try:
            peer.run()
        except BaseException as exc:  # surfaced below, with the peer that raised it
            errors.append(exc)

    threads = [threading.Thread(target=run_peer, args=(p,), daemon=True) for p in peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), f"a peer did not finish in {timeout} s"
