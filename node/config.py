"""Node-local settings: what differs between machines of one run and never goes on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ManifestError


@dataclass(frozen=True)
class NodeConfig:
    workdir: Path
    """This peer's directory: key file, resumable state, data cache, progress file."""
    key_path: Path | None = None
    """ed25519 key file; default ``workdir/peer.key`` (created on first start)."""
    device: str = "cpu"
    threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    min_peers: int = 1
    """Window 0 closes early only once this many peers have published (a local network sets N)."""
    max_windows: int = 0
    """Stop after the window with this index has been applied; 0 runs until interrupted."""
    poll_seconds: float = 0.2
    """How often a waiting peer lists the store."""
    eval_every: int = 1
    """Evaluate the shared model's held-out loss every this many windows; 0 never."""
    publish_checkpoints: bool = True
    comm: str | None = None
    """Gradient communication between this peer's ranks ("none" or "loco"); None = the
    manifest's ``inner.comm``. Local to the peer: it never changes what goes on the wire."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on 127.0.0.1 at this port (0 = any free port); None = off."""

    def __post_init__(self) -> None:
        if self.min_peers < 1:
            raise ManifestError("min_peers must be >= 1")
        if self.comm not in (None, "none", "loco"):
            raise ManifestError(f"comm must be 'none' or 'loco', not {self.comm!r}")
        if self.poll_seconds <= 0:
            raise ManifestError("poll_seconds must be > 0")

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
