"""The global weights every honest replica agrees on, and the outer step that advances them.

Kept apart from the model being trained: during the inner loop the model drifts locally,
while ``Replica`` still holds theta(w) to form the pseudo-gradient and to reset to.

The weights live where the memory plan puts them (``node/memory.py``): on the training
device, or in pinned host memory and streamed through the device one tensor at a time.
Their bits never depend on it: the outer step is two separate elementwise float32 ops
(``lr * update`` rounded, then a subtraction), never a fused multiply-add, which CPUs use
in their vector units but not in their scalar tails and GPUs use at will.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from protocol.digest import weights_digest


class Replica:
    def __init__(self, params: Mapping[str, torch.Tensor], window: int, *, device: torch.device | str | None = None):
        """Copy ``params`` as float32 onto ``device`` (default: where they are); host copies
        for a GPU peer are pinned, so they stream to and from the device asynchronously."""
        self.device = torch.device(device) if device is not None else None
        self.params = {n: self._own(p) for n, p in sorted(params.items())}
        self.window = window
        self._digest: bytes | None = None

    def _own(self, p: torch.Tensor) -> torch.Tensor:
        t = p.detach().to(dtype=torch.float32, device=self.device if self.device is not None else p.device)
        t = t.clone() if t.data_ptr() == p.data_ptr() else t
        if t.device.type == "cpu" and torch.cuda.is_available() and self.device is not None:
            t = t.pin_memory()
        return t

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = weights_digest(self.params)
        return self._digest

    def pseudo_gradient(self, model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
        """Delta = theta(w) - theta_local, the direction the local steps moved, negated: a
        mapping that forms each tensor on the model's device when it is read, so a streamed
        replica costs one tensor of device memory at a time."""
        return _PseudoGradient(self.params, dict(model.named_parameters()))

    def load_into(self, model: torch.nn.Module) -> None:
        """Set the model's trainable parameters to the global weights."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.params[n], non_blocking=True)

    def step(self, name: str, update: torch.Tensor, lr: float) -> None:
        """theta[name] -= lr * update, on the update's device: ``lr * update`` rounded to
        float32 first, then subtracted (no fused multiply-add), so every device agrees."""
        p = self.params[name]
        scaled = update if lr == 1.0 else update * torch.tensor(lr, dtype=torch.float32, device=update.device)
        with torch.no_grad():
            if p.device == scaled.device:
                p.sub_(scaled)
            else:
                p.copy_(p.to(scaled.device, non_blocking=True).sub_(scaled), non_blocking=False)
        self._digest = None

    def finish_window(self) -> None:
        """The outer step of the window is complete: we are at the next window."""
        self.window += 1
        self._digest = None

    def apply(self, aggregate: Mapping[str, torch.Tensor], lr: float) -> None:
        """theta(w+1) = theta(w) - lr * aggregate, tensor by tensor (see ``step``)."""
        for name, update in aggregate.items():
            self.step(name, update, lr)
        self.finish_window()

    def broadcast(self, src: int = 0) -> None:
        """Under torchrun: every rank takes rank ``src``'s window and global weights."""
        head = torch.tensor([self.window], dtype=torch.int64)
        dist.broadcast(head, src)
        self.window = int(head[0])
        for name in sorted(self.params):
            dist.broadcast(self.params[name], src)
        self._digest = None


class _PseudoGradient(Mapping[str, torch.Tensor]):
    def __init__(self, replica: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor]):
        self._replica, self._local = replica, local

    def __getitem__(self, name: str) -> torch.Tensor:
        local = self._local[name].detach()
        return self._replica[name].to(local.device, non_blocking=True) - local.to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._replica)

    def __len__(self) -> int:
        return len(self._replica)
