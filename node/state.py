"""A node's own resumable state: ONE safetensors file, replaced atomically.

It holds the global weights, the inner AdamW moments and the error-feedback buffer; its
metadata holds the position (the window it is at) and a small JSON blob (accounting, ...).
It is written to a temp file, fsynced and renamed, so a SIGKILL at any moment leaves
either the old or the new state, never a torn one. safetensors never executes code.

``BackgroundWriter`` takes the write off the window's path: the caller snapshots the
tensors (a copy in host memory, the only part the window waits for) and one background
thread writes them, in order, one snapshot in flight at a time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from protocol.errors import CheckpointError

log = logging.getLogger(__name__)

STATE_TEMP_PREFIX = ".state-"


@dataclass
class LocalState:
    window: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    error_feedback: dict[str, torch.Tensor]
    meta: dict


def save_local_state(path: Path, state: LocalState) -> None:
    tensors = {f"w.{k}": v for k, v in state.weights.items()}
    tensors.update({f"o.{k}": v for k, v in state.optimizer.items()})
    tensors.update({f"e.{k}": v for k, v in state.error_feedback.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"window": str(state.window), "meta": json.dumps(state.meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=STATE_TEMP_PREFIX)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host copies of ``tensors`` that later in-place updates of the originals leave alone."""
    return {k: (v.detach().clone() if v.device.type == "cpu" else v.detach().to("cpu")) for k, v in tensors.items()}


class BackgroundWriter:
    """Runs writes on one background thread, in order, at most one in flight: ``submit``
    waits for the previous write first, and raises what a failed one raised."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="locoswarm-writer")
        self._pending: Future[None] | None = None

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Block until the write in flight is done (re-raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def remove_leftovers(directory: Path, prefix: str) -> None:
    """Delete the temp files (``prefix*``) of writes a kill interrupted in ``directory``: each
    can be as large as the model, and nothing else removes them. Only for the one process
    that holds the workdir (``locoswarm.lock``), before it writes there itself."""
    for leftover in directory.glob(f"{prefix}*"):
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", leftover)


def load_local_state(path: Path) -> LocalState | None:
    """The saved state, or None when this peer has none yet (or its first write was killed)."""
    if path.parent.is_dir():
        remove_leftovers(path.parent, STATE_TEMP_PREFIX)
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        groups: dict[str, dict[str, torch.Tensor]] = {"w": {}, "o": {}, "e": {}}
        for key, value in tensors.items():
            prefix, _, name = key.partition(".")
            groups[prefix][name] = value
        return LocalState(
            int(meta["window"]), groups["w"], groups["o"], groups["e"], json.loads(meta["meta"])
        )
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"local state {path} is unreadable: {exc}; move it away to start fresh") from exc
