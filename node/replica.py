"""The global weights every honest replica agrees on, and the outer step that advances them.

Kept apart from the model being trained: during the inner loop the model drifts locally,
while ``Replica`` still holds theta(w) to form the pseudo-gradient and to reset to.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from protocol.digest import weights_digest


class Replica:
    def __init__(self, params: Mapping[str, torch.Tensor], window: int):
        self.params = {n: p.detach().to(torch.float32).clone() for n, p in sorted(params.items())}
        self.window = window
        self._digest: bytes | None = None

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = weights_digest(self.params)
        return self._digest

    def pseudo_gradient(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Delta = theta(w) - theta_local: the direction the local steps moved, negated."""
        local = dict(model.named_parameters())
        return {n: p - local[n].detach().to(p.dtype) for n, p in self.params.items()}

    def load_into(self, model: torch.nn.Module) -> None:
        """Set the model's trainable parameters to the global weights."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.params[n])

    def apply(self, aggregate: Mapping[str, torch.Tensor], lr: float) -> None:
        """theta(w+1) = theta(w) - lr * aggregate; elementwise, so bit-identical everywhere."""
        with torch.no_grad():
            for n, p in self.params.items():
                if n in aggregate:
                    p.sub_(aggregate[n].to(p.device), alpha=lr)
        self.window += 1
        self._digest = None

    def broadcast(self, src: int = 0) -> None:
        """Under torchrun: every rank takes rank ``src``'s window and global weights."""
        head = torch.tensor([self.window], dtype=torch.int64)
        dist.broadcast(head, src)
        self.window = int(head[0])
        for name in sorted(self.params):
            dist.broadcast(self.params[name], src)
        self._digest = None
