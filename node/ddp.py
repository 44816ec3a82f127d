"""Running a peer's inner loop on several GPUs/machines: DDP setup and LoCo wiring.

Under ``torchrun`` each process calls ``init_from_env`` and wraps its model with
``wrap_ddp(model, comm=manifest.inner.comm)``; "loco" installs the error-compensated 4-bit
hook of ``node/loco.py``, "none" keeps DDP's fp32 all-reduce. ``run_local_ranks`` starts N
ranks on this machine over gloo on 127.0.0.1 with a hard time limit (tests, benchmarks).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from node.loco import LocoConfig, LocoState, register_loco
from protocol.manifest import COMM_CHOICES, check_choice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_from_env(backend: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL with one GPU per local rank when CUDA is available, gloo on CPU otherwise.
    """
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device)


def wrap_ddp(
    model: torch.nn.Module,
    *,
    comm: str = "none",
    loco: LocoConfig | None = None,
    device: torch.device | None = None,
    **ddp_kwargs: Any,
) -> tuple[torch.nn.parallel.DistributedDataParallel, LocoState | None]:
    """DDP-wrap ``model``; ``comm`` is the manifest's ``inner.comm`` ("none" or "loco")."""
    check_choice("inner.comm", comm, COMM_CHOICES)
    ids = [device.index] if device is not None and device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)
    state = register_loco(ddp, loco) if comm == "loco" else None
    return ddp, state


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, results: mp.Queue
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            results.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- any failure goes to the parent, which raises it with the traceback
        results.put((rank, False, traceback.format_exc()))


def run_local_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo ranks on 127.0.0.1.

    ``fn`` must be importable (module level) and return plain Python data (no tensors: their
    shared-memory handles die with the rank process). Returns the
    results in rank order; raises RuntimeError with the rank's traceback if one failed, and
    TimeoutError (after killing every rank) if they do not all finish within ``timeout_s``.
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{world_size} local ranks did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank process exited with code {dead[0].exitcode} before reporting")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]
