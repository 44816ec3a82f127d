"""A peer: trains on its assigned data, publishes its compressed pseudo-gradient, applies
the window's aggregate. ``Peer.run_window`` is the whole protocol for one window, in order:

    inner loop -> pseudo-gradient -> error feedback + codec -> publish -> close/gather
    -> aggregate -> outer step -> digest -> save state

Under ``torchrun`` rank 0 speaks to the store; every rank trains a slice of each batch
(DDP) and receives the new global weights from rank 0 by broadcast.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from node.accounting import Accounting
from node.checkpoint import (
    LocalState,
    fetch_checkpoint,
    latest_checkpoint,
    load_local_state,
    publish_checkpoint,
    save_local_state,
)
from node.config import NodeConfig
from node.data import TokenData, assigned_batches
from node.ddp import wrap_ddp
from node.exchange import Exchange, Gathered
from node.inner import InnerLoop
from node.metrics import SwarmMetrics, start_metrics_server
from node.model import build_model, heldout_loss, param_shapes
from node.replica import Replica
from protocol import paths
from protocol.close import CloseRecord
from protocol.codec import ErrorFeedback
from protocol.codec_types import CompressedTensor, model_layout
from protocol.errors import CheckpointError, ManifestError, ObjectNotFound, StoreError
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.retention import gc_windows, retention_floor
from protocol.scores import allowed_peers
from protocol.stores.base import Store
from protocol.stores.s3 import S3Store
from protocol.wire import Expectation, encode_payload

log = logging.getLogger(__name__)

MAX_SCORE_LOOKBACK = 8
"""Windows a closer looks back for validator scores when the lagged ones are missing."""


def check_run_manifest(store: Store, manifest: Manifest) -> None:
    """Refuse to join a store whose run was created with another manifest."""
    try:
        theirs = Manifest.from_bytes(store.get(paths.MANIFEST, max_bytes=1 << 20))
    except ObjectNotFound as exc:
        raise ManifestError(f"no run in {store.uri}: run `locoswarm init` first") from exc
    if theirs.digest != manifest.digest:
        raise ManifestError(
            f"this peer's manifest ({manifest.run_key}) differs from the run's in {store.uri} "
            f"({theirs.run_key}); refusing to mix"
        )


@dataclass
class WindowReport:
    window: int
    train_loss: float | None
    heldout_loss: float | None
    included: list[str]
    rejected: list[tuple[str, str]]
    payload_bytes: int
    digest: str
    history: list[dict] = field(default_factory=list)


class Peer:
    def __init__(self, manifest: Manifest, store: Store, node: NodeConfig, *, own_store: S3Store | None = None):
        self.manifest = manifest
        self.store = store
        self.node = node
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.leader = self.rank == 0
        if node.threads:
            torch.set_num_threads(node.threads)
        node.workdir.mkdir(parents=True, exist_ok=True)
        check_run_manifest(store, manifest)
        self.identity = Identity.load_or_create(node.key_file)
        self.peer_id = self.identity.peer_id
        self.acct = Accounting()
        self.data = TokenData.load(manifest, store, node.cache_dir)
        self.model = build_model(manifest.model, self.data.vocab_size, manifest.data.seq_len, manifest.run.seed)
        self.model.to(node.device)
        self.shapes = param_shapes(self.model)
        self.layouts = model_layout(self.shapes, manifest.codec)
        ddp = None
        if self.world > 1:
            comm = node.comm or manifest.inner.comm
            ddp, _ = wrap_ddp(self.model, comm=comm, device=torch.device(node.device))
            log.info("one peer on %d ranks, gradient communication %s", self.world, comm)
        self.inner = InnerLoop(self.model, manifest.inner, ddp_model=ddp)
        self.ef = ErrorFeedback(self.layouts, manifest.codec, node.device)
        self.exchange = Exchange(
            store, self.identity, manifest.run_key, self.acct, poll_seconds=node.poll_seconds,
            allowed_peers=self._allowed_peers if manifest.validators.keys else None, own_store=own_store,
        )
        self.history: list[dict] = []
        self.metrics = SwarmMetrics(CollectorRegistry())
        self.last_close: CloseRecord | None = None
        self.replica = self._restore()

    # ------------------------------------------------------------------ start
    def _restore(self) -> Replica:
        """Resume from local state, else start from the latest published checkpoint."""
        state = load_local_state(self.node.state_file) if self.leader else None
        if state is not None:
            replica = Replica(state.weights, state.window)
            self.inner.load_optimizer_tensors(state.optimizer, state.inner_step)
            self.ef.load_state_dict(state.error_feedback)
            self.acct = Accounting.from_dict(state.meta["accounting"])
            self.exchange.acct = self.acct
            self.history = state.meta.get("history", [])
            log.info("resumed at window %d from %s", replica.window, self.node.state_file)
        elif self.leader:
            window = latest_checkpoint(self.store, self.manifest.run.checkpoint_every)
            if window is None:
                raise CheckpointError(f"no published checkpoint in {self.store.uri}; run `locoswarm init`")
            replica = self._checkpoint_replica(window)
            log.info("starting from the published checkpoint of window %d", replica.window)
        else:
            replica = Replica(dict(self.model.named_parameters()), 0)
        if self.world > 1:
            replica.broadcast()
        replica.load_into(self.model)
        return replica

    def _checkpoint_replica(self, window: int) -> Replica:
        """The global weights of a published checkpoint, verified (hash, layout, digest)."""
        weights, _ = fetch_checkpoint(self.store, window, self.shapes)
        return Replica(weights, window)

    # ------------------------------------------------------------------ helpers
    def _expect(self, window: int) -> Callable[[str], Expectation]:
        def expectation(peer: str) -> Expectation:
            return Expectation(
                run=self.manifest.run_key,
                window=window,
                layouts=self.layouts,
                codec=self.manifest.codec,
                max_bytes=self.manifest.outer.max_payload_bytes,
                peer_id=peer,
                base_digest=self.replica.digest,
            )

        return expectation

    def _allowed_peers(self, window: int) -> set[str] | None:
        """Whose payloads count in ``window``, from the trusted validators' lagged scores.

        Called by the closer only, so its answer is fixed in the close record. It waits a
        little for the scores of ``window - score_lag`` (validators work while peers train),
        then falls back to the newest earlier scores; None (all count) only before any.
        """
        v = self.manifest.validators
        lookup = lambda w: allowed_peers(self.store, self.manifest.run_key, w, v.score_lag, v.keys,  # noqa: E731
                                         min_weight=v.min_weight)
        give_up = min(self._deadline(), time.time() + self.manifest.run.window_seconds / 4)
        while (allowed := lookup(window)) is None and window - v.score_lag >= 0 and time.time() < give_up:
            time.sleep(self.node.poll_seconds)
        for earlier in range(window - 1, max(-1, window - 1 - MAX_SCORE_LOOKBACK), -1):
            if allowed is not None:
                break
            allowed = lookup(earlier)
        return allowed

    def _deadline(self) -> float:
        base = self.last_close.closed_at if self.last_close else time.time()
        return base + self.manifest.run.window_seconds

    def _expected_peers(self) -> tuple[set[str], int]:
        if self.last_close is not None and self.last_close.window == self.replica.window - 1:
            return set(self.last_close.peers) | {self.peer_id}, 1
        return {self.peer_id}, self.node.min_peers

    def heldout_loss(self) -> float:
        return heldout_loss(self.model, self.data, self.manifest.data.eval_sequences, self.manifest.data.batch_size)

    def _train(self, window: int):
        ids = assigned_batches(
            self.manifest.run.seed,
            window,
            self.peer_id,
            self.manifest.inner.steps,
            self.manifest.data.batch_size,
            self.data.n_train,
        )
        batches = [self.data.batch(row).to(self.node.device) for row in ids]
        with self.acct.phase("compute"):
            result = self.inner.train(batches)
        self.acct.tokens += result.tokens
        return result

    # ------------------------------------------------------------------ the window
    def run_window(self) -> WindowReport:
        """Train, publish, close, gather, aggregate and step one window."""
        w = self.replica.window
        self._progress("train", w)
        result = self._train(w)
        if not self.leader:
            self.replica.broadcast()
            self.replica.load_into(self.model)
            return WindowReport(w, result.mean_loss, None, [], [], 0, "")

        sent: dict[str, CompressedTensor] | None = None
        payload_bytes = 0
        close = self.exchange.read_close(w)
        if close is None:
            with self.acct.phase("compute"):
                delta = self.replica.pseudo_gradient(self.model)
                sent = self.ef.compress(delta)
                blob = encode_payload(
                    run=self.manifest.run_key,
                    window=w,
                    base_digest=self.replica.digest,
                    tokens=result.tokens,
                    tensors=sent,
                    codec=self.manifest.codec,
                    identity=self.identity,
                )
            payload_bytes = len(blob)
            self._progress("publish", w, train_loss=result.mean_loss)
            if not self.exchange.publish(w, blob, self._deadline()):
                self.ef.restore(sent)
                sent = None
            self._progress("wait", w, train_loss=result.mean_loss)
            expected, min_peers = self._expected_peers()
            close, gathered = self.exchange.close(
                w,
                base_digest=self.replica.digest,
                expected=expected,
                min_peers=min_peers,
                deadline=self._deadline(),
                expect=self._expect(w),
            )
        else:
            log.warning("window %d was closed before we published; applying it without our payload", w)
            gathered = self.exchange.gather(close, self._expect(w))
        if sent is not None and self.peer_id not in gathered.accepted:
            self.ef.restore(sent)  # the network did not take it: keep it for a later window
        report = self._apply(close, gathered, train_loss=result.mean_loss, payload_bytes=payload_bytes)
        if self.world > 1:
            self.replica.broadcast()
        return report

    def _apply(self, close: CloseRecord, gathered: Gathered, *, train_loss: float | None, payload_bytes: int) -> WindowReport:
        """Aggregate the close record's payloads and take the outer step."""
        w = close.window
        if close.base_digest != self.replica.digest:
            raise CheckpointError(
                f"window {w}: the network's base digest {close.base_digest.hex()[:12]} differs from ours "
                f"{self.replica.digest.hex()[:12]}; this replica is out of sync (remove {self.node.state_file} to resync)"
            )
        for peer, reason in gathered.rejected:
            log.warning("window %d: payload of %s not aggregated: %s", w, peer, reason)
        self._progress("aggregate", w, train_loss=train_loss)
        with self.acct.phase("aggregate"):
            self.replica.apply_window(
                {p: payload.tensors for p, payload in gathered.accepted.items()}, self.layouts, self.manifest.outer
            )
            self.replica.load_into(self.model)
        self.last_close = close
        heldout = None
        if self.node.eval_every and (self.replica.window % self.node.eval_every == 0):
            heldout = self.heldout_loss()
        entry = {
            "window": w,
            "train_loss": train_loss,
            "heldout_loss": heldout,
            "included": len(gathered.accepted),
            "rejected": len(gathered.rejected),
            "payload_bytes": payload_bytes,
            "bytes_up": self.acct.bytes_up,
            "bytes_down": self.acct.bytes_down,
            "digest": self.replica.digest.hex(),
            "time": time.time(),
        }
        self.history.append(entry)
        self._export_metrics(entry, close, gathered)
        self._save()
        try:
            if (
                self.node.publish_checkpoints
                and self.replica.window % self.manifest.run.checkpoint_every == 0
                and publish_checkpoint(self.store, self.replica.window, self.replica.params)
            ):
                log.info("published the checkpoint of window %d", self.replica.window)
            if close.closer == self.peer_id:  # one peer per window collects garbage: the closer
                self._collect_garbage()
        except StoreError as exc:  # any replica can publish it; the next closer collects
            log.warning("window %d: checkpoint or garbage collection skipped: %s", w, exc)
        self._progress("done", w, train_loss=train_loss)
        return WindowReport(
            w, train_loss, heldout, sorted(gathered.accepted), gathered.rejected, payload_bytes, self.replica.digest.hex()
        )

    def _export_metrics(self, entry: dict, close: CloseRecord, gathered: Gathered) -> None:
        m = self.metrics
        m.window.set(entry["window"])
        if entry["heldout_loss"] is not None:
            m.heldout_loss.set(entry["heldout_loss"])
        m.peers_included.set(entry["included"])
        m.window_bytes.set(sum(i.size for i in close.included))
        for inc in close.included:
            m.payload_bytes.labels(peer=inc.peer_id).set(inc.size)
        for _, reason in gathered.rejected:
            m.rejections.labels(reason=reason.split(":")[0][:40]).inc()
        m.bytes_sent.set(self.acct.bytes_up)
        m.bytes_received.set(self.acct.bytes_down)

    def catch_up(self) -> int:
        """Apply every window that others already closed; returns how many were replayed."""
        n = 0
        while True:
            close = self.exchange.read_close(self.replica.window)
            if close is None:
                if not self._jump_to_checkpoint():
                    return n
                continue
            self._progress("catch-up", self.replica.window)
            self._apply(close, self.exchange.gather(close, self._expect(close.window)), train_loss=None, payload_bytes=0)
            n += 1

    def _jump_to_checkpoint(self) -> bool:
        """If the run moved past a checkpoint newer than us, its old windows may be collected:
        restart from that checkpoint instead of waiting on a window nobody will close."""
        window = latest_checkpoint(self.store, self.manifest.run.checkpoint_every)
        if window is None or window <= self.replica.window:
            return False
        log.warning("window %d is gone from the store; jumping to the checkpoint of window %d",
                    self.replica.window, window)
        self.replica = self._checkpoint_replica(window)
        self.replica.load_into(self.model)
        self.last_close = None
        return True

    def run(self) -> None:
        """Catch up, then run windows until ``max_windows`` (or forever)."""
        server = None
        if self.leader and self.node.metrics_port is not None:
            server = start_metrics_server(self.node.metrics_port, self.metrics.registry)
            (self.node.workdir / "metrics.url").write_text(server.url)
        try:
            self._run()
        finally:
            if server is not None:
                server.close()

    def _run(self) -> None:
        if self.leader:
            if not self.history:
                self.history.append(
                    {"window": self.replica.window - 1, "heldout_loss": self.heldout_loss(), "bytes_up": 0,
                     "bytes_down": 0, "digest": self.replica.digest.hex(), "time": time.time()}
                )
            replayed = self.catch_up()
            if replayed:
                log.info("caught up %d windows; now at window %d", replayed, self.replica.window)
        if self.world > 1:
            self.replica.broadcast()
            self.replica.load_into(self.model)
        while not self.node.max_windows or self.replica.window < self.node.max_windows:
            if self.world == 1:
                self.catch_up()  # fell behind (slow or suspended): skip straight to the open window
                if self.node.max_windows and self.replica.window >= self.node.max_windows:
                    break
            self.run_window()
        self._progress("finished", self.replica.window)

    def _collect_garbage(self) -> None:
        window = latest_checkpoint(self.store, self.manifest.run.checkpoint_every)
        if window is not None:
            gc_windows(self.store, retention_floor(self.replica.window, window, self.manifest.run.keep_windows))

    # ------------------------------------------------------------------ persistence
    def _save(self) -> None:
        meta = {"accounting": self.acct.to_dict(), "history": self.history, "peer_id": self.peer_id}
        state = LocalState(
            self.replica.window, self.inner.step, self.replica.params, self.inner.optimizer_tensors(),
            self.ef.state_dict(), meta,
        )
        save_local_state(self.node.state_file, state)

    def _progress(self, phase: str, window: int, **extra: object) -> None:
        if not self.leader:
            return
        info = {
            "peer": self.peer_id,
            "pid": os.getpid(),
            "phase": phase,
            "window": window,
            "params": sum(layout.numel for layout in self.layouts.values()),
            "digest": self.replica.digest.hex() if hasattr(self, "replica") else "",
            "accounting": self.acct.to_dict(),
            "history": self.history,
            **extra,
        }
        path = self.node.progress_file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".progress-")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)


def read_progress(path: Path) -> dict | None:
    """A peer's last progress snapshot, or None if it has not written one yet."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
