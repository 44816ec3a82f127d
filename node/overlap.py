"""The exchange of one window, run on a helper thread while the next window trains.

With ``inner.overlap`` a peer signs window w's payload and goes straight on to train
window w+1 from where its own window w ended: its own pseudo-gradient delta_w stands in
for the run's aggregate, which has not been decided yet (eager updates). Meanwhile
``Background`` runs the rest of window w (upload, decide, gather, aggregate, step the
replica to theta(w+1)) and keeps the aggregate; as soon as it lands, the training thread
swaps the stand-in for it between two inner steps (``apply_landed``: local += delta_w -
lr * aggregate(w)), so from then on the local weights are theta(w+1) plus window w+1's own
progress, and the pseudo-gradient is taken against theta(w+1) exactly as without overlap.
Replicas stay bit-identical: the global weights are stepped by the same function, from the
same decision, whatever thread runs it; only the starting point of the local steps differs,
and local steps are nobody else's business.

Nothing is shared while the helper runs: it owns the replica and the exchange; the training
thread owns the model, the optimizer and the stand-in, and reads the replica only after
``join``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class Background(Generic[T]):
    """Window ``window``'s exchange on a helper thread; its aggregate, for the model."""

    def __init__(self, window: int, job: Callable[[Callable[[str, torch.Tensor], None]], T], *, lr: float,
                 stand_in: dict[str, torch.Tensor], context: object = None):
        """``job(on_tensor)`` decides, gathers and advances the replica, handing each
        aggregate tensor to ``on_tensor``; ``stand_in`` is our own pseudo-gradient of the
        window, which the model holds in place of the aggregate until it lands; ``context``
        is whatever the caller needs back. The helper is a daemon thread: a peer stopped
        mid-window does not wait for it."""
        self.window = window
        self.context = context
        self.lr = lr
        self.stand_in = stand_in
        self._updates: dict[str, torch.Tensor] = {}
        self._applied = False
        self._started = time.perf_counter()
        self.seconds = 0.0
        """How long the job ran (set when it is done)."""
        self._future: Future[T] = Future()
        threading.Thread(target=self._run, args=(job,), name=f"locoswarm-exchange-{window}", daemon=True).start()

    def _run(self, job: Callable[[Callable[[str, torch.Tensor], None]], T]) -> None:
        try:
            result = job(self._updates.__setitem__)
        except BaseException as exc:  # noqa: BLE001 (handed to join(), which raises it on the training thread)
            self.seconds = time.perf_counter() - self._started
            self._future.set_exception(exc)
        else:
            self.seconds = time.perf_counter() - self._started
            self._future.set_result(result)

    def apply_landed(self, model: torch.nn.Module) -> bool:
        """If the aggregate has landed and is not in ``model`` yet, swap our stand-in for it:
        add ``stand_in - lr * update`` to the parameters (call between inner steps); True
        when it was applied now."""
        if self._applied or not self._future.done() or self._future.exception() is not None:
            return False
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(self.stand_in[name].to(p.device))
                update = self._updates.get(name)
                if update is not None:
                    p.sub_(update.to(p.device) * self.lr)
        self._applied = True
        self._updates.clear()
        self.stand_in = {}
        return True

    def join(self, model: torch.nn.Module) -> T:
        """Wait for the job (re-raising its error), make sure ``model`` has the aggregate."""
        result = self._future.result()
        self.apply_landed(model)
        return result
