"""Node-local settings: what differs between machines of one run and never goes on the wire.

What peers must agree on lives in the hashed run manifest (``protocol.manifest``); how this
machine reaches the store lives in ``protocol.stores.StoreSettings``; timeouts and retries in
``protocol.retry.RetryPolicy``. This is everything else a peer process needs to know.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import ManifestError
from protocol.manifest import COMM_CHOICES, check_choice
from protocol.retry import RetryPolicy


@dataclass(frozen=True)
class NodeConfig:
    workdir: Path
    """This peer's directory: key file, resumable state, data cache, progress file."""
    key_path: Path | None = None
    """ed25519 key file; default ``workdir/peer.key`` (created on first start)."""
    device: str = "cpu"
    """Where the model trains: "cpu", "cuda" or "cuda:N". Default "cpu"."""
    threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    max_windows: int = 0
    """Stop after the window with this index has been applied; 0 runs until interrupted."""
    poll_seconds: float = 0.2
    """How often a waiting peer lists the store, in seconds."""
    eval_every: int = 5
    """Evaluate the shared model's held-out loss every this many windows (never while
    catching up); 0 never. It costs about as much as a few inner steps."""
    micro_batch: int = 0
    """Sequences per forward and backward (gradients accumulate over a batch); 0 lets the
    memory plan choose (``node/memory.py``: the whole batch on a CPU)."""
    publish_checkpoints: bool = True
    """Publish the global weights every ``run.checkpoint_every`` windows."""
    comm: str | None = None
    """Gradient communication between this peer's ranks ("none" or "loco"); None = the
    manifest's ``inner.comm``. Local to the peer: it never changes what goes on the wire."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on 127.0.0.1 at this port (0 = any free port); None = off."""
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    """Timeouts and retries of this node's network operations."""
    stop: threading.Event | None = field(default=None, compare=False)
    """Set from another thread (``locoswarm join`` on Ctrl-C) to stop between windows: the
    peer finishes the window it is in, saves its state and returns. None = run until done."""

    def __post_init__(self) -> None:
        if self.comm is not None:
            check_choice("--comm", self.comm, COMM_CHOICES)
        if self.poll_seconds <= 0:
            raise ManifestError("poll_seconds must be > 0")
        if self.micro_batch < 0 or self.eval_every < 0:
            raise ManifestError("--micro-batch and --eval-every must be >= 0")

    @property
    def key_file(self) -> Path:
        return self.key_path or self.workdir / "peer.key"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.safetensors"

    @property
    def progress_file(self) -> Path:
        return self.workdir / "progress.json"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"
