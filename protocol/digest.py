"""Digest of model weights: the exact-sync check every payload and close record carries."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in name order.

    Two replicas have equal digests iff their weights are bit-identical.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()
