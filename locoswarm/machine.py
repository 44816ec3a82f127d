"""Can this machine take part in a run? Memory, disk, GPU, ports and the link to the store.

``locoswarm join`` checks all of it before downloading anything, and says what is missing
in plain words with the flag that changes it. The estimates are deliberately simple
arithmetic over the model's parameter count P (float32, 4 bytes each), so anyone can check
them by hand:

- **training device**: ``STATE_COPIES`` float32 copies of the weights live at the peak of a
  window (the model, its gradients, AdamW's two moments, the global replica, the error
  feedback buffer, the pseudo-gradient, the aggregate's accumulator and count), plus the
  activations of one batch (``activation_bytes``);
- **host memory**: the run's token shards (held in memory), a baseline for Python and torch,
  and, when training on a GPU, ``HOST_COPIES_GPU`` copies of the weights that pass through
  the host (the resumable state on save, a checkpoint on load);
- **disk**: the token shards, the resumable state (weights, two moments, error feedback)
  and a second copy of it while it is replaced atomically.

``bench/join.py`` prints these estimates next to the measured peak memory of a real peer.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import NotEnoughResources, PortInUse
from protocol.manifest import Manifest, ModelConfig
from protocol.stores.base import Store

log = logging.getLogger(__name__)

GiB = 1 << 30
STATE_COPIES = 9
"""float32 copies of the weights alive on the training device at a window's peak."""
HOST_COPIES_GPU = 6
"""float32 copies of the weights that pass through host memory when training on a GPU."""
BASELINE_BYTES = {"cpu": 1 * GiB, "cuda": 3 * GiB}
"""Host memory of the process before any weights: interpreter, torch, (CUDA context)."""
GPU_ADVISED_PARAMS = 100_000_000
"""Above this many parameters a CPU cannot train a window's H steps in useful time."""


@dataclass(frozen=True)
class Needs:
    """What one peer of a run needs from this machine, in bytes."""

    params: int
    device_bytes: int
    """On the training device (host memory when training on the CPU)."""
    host_bytes: int
    """Host memory besides ``device_bytes`` (all of it when training on the CPU)."""
    disk_bytes: int
    """In the workdir: data cache, resumable state and its replacement."""
    gpu_advised: bool
    """Whether the model is too large to train usefully on a CPU."""


def count_params(model: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Parameters of the run's model, counted on torch's meta device (nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from node.model import model_config

    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(model_config(model, vocab_size, seq_len))
    return sum(p.numel() for p in built.parameters())


def activation_bytes(model: ModelConfig, vocab_size: int, batch_size: int, seq_len: int) -> int:
    """Activations kept for the backward pass of one batch: per layer about 16 hidden-sized
    and 3 MLP-sized float32 tensors per token, plus logits and their gradient and softmax."""
    from node.model import model_config

    cfg = model_config(model, vocab_size, seq_len)
    hidden, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    mlp = int(getattr(cfg, "intermediate_size", 4 * hidden))
    per_token = layers * (16 * hidden + 3 * mlp) + 3 * vocab_size
    return 4 * batch_size * seq_len * per_token


def needs(manifest: Manifest, vocab_size: int, data_bytes: int, device: str) -> Needs:
    """What a peer of ``manifest`` needs when its token data is ``data_bytes`` and it trains
    on ``device`` ("cpu", "cuda" or "cuda:N")."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    p = count_params(manifest.model, vocab_size, manifest.data.seq_len)
    weights = 4 * p
    device_bytes = STATE_COPIES * weights + activation_bytes(
        manifest.model, vocab_size, manifest.data.batch_size, manifest.data.seq_len)
    host = data_bytes + BASELINE_BYTES[kind] + (HOST_COPIES_GPU * weights if kind == "cuda" else 0)
    disk = data_bytes + 2 * 4 * weights + (64 << 20)  # state = weights + 2 moments + EF; twice while replaced
    return Needs(p, device_bytes, host, disk, p > GPU_ADVISED_PARAMS)


# --------------------------------------------------------------------------- what is there

def host_memory_available() -> int:
    """Bytes of memory this process can still take: the kernel's MemAvailable, lowered by a
    cgroup limit (a container's ``--memory``) when there is one."""
    available = _meminfo_available()
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gpu_memory_free(device: str) -> int:
    """Free bytes on the CUDA device ``device``."""
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def disk_available(workdir: Path) -> int:
    """Free bytes where ``workdir`` lives, plus what the workdir already holds (a resumed
    peer reuses its data cache and replaces its state in place)."""
    workdir.mkdir(parents=True, exist_ok=True)
    held = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())
    return shutil.disk_usage(workdir).free + held


def pick_device(requested: str) -> str:
    """``requested``, or for "auto" the first CUDA device when there is one, else "cpu";
    ``NotEnoughResources`` when a CUDA device is asked for and none is visible."""
    import torch

    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise NotEnoughResources(f"--device {requested}: no CUDA GPU is visible (torch {torch.__version__} is "
                                     f"{built}); pass --device cpu, or check the driver and CUDA_VISIBLE_DEVICES")
        index = torch.device(requested).index or 0
        if index >= torch.cuda.device_count():
            raise NotEnoughResources(f"--device {requested}: only {torch.cuda.device_count()} CUDA devices are "
                                     f"visible; pass --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return requested if ":" in requested else "cuda:0"
    return requested


def check_port_free(host: str, port: int | None, flag: str) -> None:
    """Refuse a port someone already listens on, naming ``flag`` (0 and None need no check)."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"port {port} on {host} is taken ({exc.strerror}); pass {flag} with another port, "
                            f"or {flag} 0 for any free one") from exc


# --------------------------------------------------------------------------- the verdict

@dataclass(frozen=True)
class Check:
    """One line of the machine check: what was compared and whether it is enough."""

    what: str
    ok: bool
    detail: str
    fix: str = ""
    """What to change (a flag, another machine) when not ``ok``."""


def check_machine(needs: Needs, device: str, device_was_chosen: bool, workdir: Path) -> list[Check]:
    """Compare ``needs`` with what this machine has. ``device_was_chosen``: the person passed
    ``--device`` (we then train on a CPU even when a GPU is advised)."""
    checks = []
    on_gpu = device.startswith("cuda")
    if needs.gpu_advised and not on_gpu:
        checks.append(Check(
            "GPU", device_was_chosen,
            f"the model has {needs.params / 1e6:.0f}M parameters; a CPU trains it too slowly to finish a window",
            "use a machine with a CUDA GPU, or pass --device cpu to train on this CPU anyway"))
    else:
        checks.append(Check("device", True, f"training on {device}"))
    if on_gpu:
        free = gpu_memory_free(device)
        checks.append(Check(
            f"GPU memory ({device})", free >= needs.device_bytes,
            f"needs about {_gib(needs.device_bytes)}, {_gib(free)} free",
            "pick a GPU with more free memory (--device cuda:N), or join a run with a smaller model.preset"))
    host_need = needs.host_bytes + (0 if on_gpu else needs.device_bytes)
    host = host_memory_available()
    checks.append(Check(
        "memory", host >= host_need, f"needs about {_gib(host_need)}, {_gib(host)} available",
        "free memory (or raise the container's --memory limit), train on a GPU (--device cuda), "
        "or join a run with a smaller model.preset"))
    disk = disk_available(workdir)
    checks.append(Check(
        "disk", disk >= needs.disk_bytes, f"needs about {_gib(needs.disk_bytes)} in {workdir}, {_gib(disk)} free",
        "free disk space, or pass --workdir on a disk with more room"))
    return checks


def refuse_if_short(checks: list[Check]) -> None:
    """``NotEnoughResources`` naming every check that failed and its fix."""
    short = [c for c in checks if not c.ok]
    if short:
        lines = [f"{c.what}: {c.detail}; {c.fix}" for c in short]
        raise NotEnoughResources("this machine is short of what the run needs:\n  " + "\n  ".join(lines)
                                 + "\n  (--skip-checks starts anyway)")


@dataclass(frozen=True)
class Link:
    """A measured download from the run's store, and what a window moves."""

    bytes: int
    seconds: float
    window_bytes: int
    """Bytes a peer moves in one window (every counted payload down, its own up), from the
    newest window in the store; 0 when no window has payloads yet."""
    window_seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.bytes / max(self.seconds, 1e-6)

    def check(self) -> Check:
        if not self.window_bytes:
            return Check("link", True, f"{human_bytes(self.rate)}/s from the store (no window to size yet)")
        need = self.window_bytes / self.rate
        return Check(
            "link", need <= self.window_seconds / 2,
            f"{human_bytes(self.rate)}/s from the store; a window moves about {human_bytes(self.window_bytes)}, "
            f"{need:.0f} s of the run's {self.window_seconds:.0f} s window",
            "a faster link; until then your payloads may miss windows (they count when they arrive in time)")


def measure_link(store: Store, key: str, max_bytes: int, window_bytes: int, window_seconds: float) -> Link:
    """Time one download of ``key`` (a data shard: it is needed anyway) from ``store``."""
    t0 = time.perf_counter()
    data = store.get(key, max_bytes=max_bytes)
    return Link(len(data), time.perf_counter() - t0, window_bytes, window_seconds)


def newest_window_bytes(store: Store) -> int:
    """Bytes one peer moves in the newest window with payloads: all of them down, one up."""
    from protocol import paths

    sizes: dict[int, list[int]] = {}
    for info in store.list("windows/"):
        window = paths.window_of_key(info.key)
        if window is not None and paths.peer_of_payload_key(info.key) is not None:
            sizes.setdefault(window, []).append(info.size)
    if not sizes:
        return 0
    newest = sizes[max(sizes)]
    return sum(newest) + max(newest)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def human_bytes(n: float) -> str:
    """Bytes in decimal units, e.g. 46.1 KB, 12.0 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
