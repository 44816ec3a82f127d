"""A peer: trains on its assigned data, publishes its compressed pseudo-gradient, applies the
window's aggregate. ``Peer.run_window`` is the whole protocol for one window, in order:

    inner loop -> pseudo-gradient -> error feedback + codec -> publish -> close -> gather
    -> aggregate -> outer step -> digest -> save state

Under ``torchrun`` rank 0 speaks to the store; every rank trains a slice of each batch
(DDP) and receives the new global weights from rank 0 by broadcast.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from node.accounting import Accounting
from node.checkpoint import publish_checkpoint
from node.closing import Closing
from node.config import NodeConfig
from node.dataset import TokenData
from node.ddp import wrap_ddp
from node.exchange import Exchange, Gathered, address_policy
from node.follow import Follower, check_run_manifest
from node.inner import InnerLoop, InnerResult
from node.metrics import SwarmMetrics, start_metrics_server
from node.model import build_model, heldout_loss, param_shapes
from node.progress import History, write_progress
from node.replica import Replica
from node.state import LocalState, load_local_state, save_local_state
from protocol.assignment import assigned_batches
from protocol.codec import ErrorFeedback
from protocol.codec_types import CompressedTensor, model_layout
from protocol.consensus import Decision, proposer
from protocol.errors import RETRYABLE, PayloadUnavailable, StoreError
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.retention import gc_windows, retention_floor
from protocol.stores.base import Store
from protocol.stores.s3 import S3Store
from protocol.wire import Expectation, encode_payload

log = logging.getLogger(__name__)



@dataclass
class WindowReport:
    window: int
    train_loss: float | None
    heldout_loss: float | None
    included: list[str]
    payload_bytes: int
    digest: str


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
        self.comm = node.comm or manifest.inner.comm
        if self.world > 1:
            ddp, _ = wrap_ddp(self.model, comm=self.comm, device=torch.device(node.device))
            log.info("one peer on %d ranks, gradient communication %s", self.world, self.comm)
        self.inner = InnerLoop(self.model, manifest.inner, ddp_model=ddp)
        self.ef = ErrorFeedback(self.layouts, manifest.codec, node.device)
        self.exchange = Exchange(store, self.identity, manifest.run_key, self.acct, policy=node.policy,
                                 own_store=own_store, addresses=address_policy(manifest))
        self.history = History(node.workdir / "history.jsonl")
        self.last: dict = {}
        """The newest history entry (the live display and ``up`` show it)."""
        self.origin: dict = {}
        """Where this replica's weights came from: local state, a checkpoint, or genesis."""
        self.follower = Follower(manifest, store, self.exchange, self._restore(), self.layouts)
        self.closing = (Closing(store, manifest, self.identity, self.exchange, self.acct)
                        if self.identity.public_key.hex() in manifest.closers and self.leader else None)
        """Set when our key is one of the run's closers: we take part in deciding windows."""
        self.metrics = SwarmMetrics(CollectorRegistry())
        self.replayed = 0

    @property
    def replica(self) -> Replica:
        """The global weights every honest replica agrees on (owned by the follower)."""
        return self.follower.replica

    # ------------------------------------------------------------------ start
    def _restore(self) -> Replica:
        """Resume from local state, else start from genesis (recomputed here: the genesis
        weights are a pure function of the manifest); ``run`` then jumps to the newest
        checkpoint the run's decisions certify, if there is one."""
        state = load_local_state(self.node.state_file) if self.leader else None
        if state is not None:
            replica = Replica(state.weights, state.window)
            self.inner.load_optimizer_tensors(state.optimizer)
            self.ef.load_state_dict(state.error_feedback)
            self.acct.restore(state.meta["accounting"])
            kept = self.history.truncate(before_window=replica.window)  # later entries are replayed
            self.last = kept[-1] if kept else {}
            self.origin = {"from": "state", "window": replica.window}
            log.info("resumed at window %d from %s", replica.window, self.node.state_file)
        else:
            replica = Replica(dict(self.model.named_parameters()), 0)
            self.origin = {"from": "genesis", "window": 0}
        if self.world > 1:
            replica.broadcast()
        replica.load_into(self.model)
        return replica

    def start_from_checkpoint(self) -> None:
        """A fresh peer starts from the newest verified checkpoint instead of replaying from
        genesis (it would have to replay collected windows)."""
        if self.origin.get("from") == "genesis" and self.follower.jump_to_checkpoint():
            self.replica.load_into(self.model)
            self.origin = {"from": "checkpoint", "window": self.replica.window}
            log.info("starting from the verified checkpoint of window %d", self.replica.window)

    # ------------------------------------------------------------------ the window
    def run_window(self) -> WindowReport:
        """Train, publish, decide, gather, aggregate and step one window."""
        w = self.replica.window
        deadline = self.follower.deadline(w)
        result = self.train(w)                                                             # inner loop
        if not self.leader:
            return self.receive_window(w, result)
        expect = self.follower.expectation(w)
        with self.acct.phase("compute"):
            sent = self.ef.compress(self.replica.pseudo_gradient(self.model))              # pseudo-gradient, EF, codec
            blob = self.sign_payload(w, sent, result.tokens)
        self.progress("publish", w, train_loss=result.mean_loss)
        published = self.exchange.publish(w, blob, deadline)                               # publish
        decision = self.wait_for_decision(w, expect, deadline)                             # close
        gathered = self.wait_for_payloads(decision)                                        # gather
        if not published or self.peer_id not in gathered.accepted:
            self.ef.restore(sent)  # the network did not take it: keep it for a later window
        self.progress("aggregate", w, train_loss=result.mean_loss)
        with self.acct.phase("aggregate"):
            self.follower.advance(decision, gathered)                                      # aggregate, outer step
            self.replica.load_into(self.model)
        report = self.record(decision, gathered, train_loss=result.mean_loss, payload_bytes=len(blob))  # digest
        self.save()                                                                        # resumable state
        self.housekeeping(decision)                                                        # checkpoint, gc
        if self.world > 1:
            self.replica.broadcast()
        return report

    def train(self, window: int) -> InnerResult:
        """H inner steps on the batches assigned to us for ``window``."""
        self.progress("train", window)
        ids = assigned_batches(self.manifest.run.seed, window, self.peer_id, self.manifest.inner.steps,
                               self.manifest.data.batch_size, self.data.n_train)
        batches = [self.data.batch(row).to(self.node.device) for row in ids]
        with self.acct.phase("compute"):
            result = self.inner.train(batches, window)
        self.acct.tokens += result.tokens
        return result

    def wait_for_decision(self, window: int, expect: Expectation, deadline: float) -> Decision:
        """Poll until the window is decided: as one of the run's closers by taking part in
        its rounds, otherwise by reading the decision the closers wrote."""
        with self.acct.phase("wait"):
            while True:
                self.progress("wait", window)
                try:
                    if self.closing is not None:
                        decision = self.closing.poll(window, expect, deadline=deadline,
                                                     expected=self.follower.expected(window))
                    else:
                        decision = self.follower.decisions.read(window)
                    if decision is not None:
                        return decision
                except RETRYABLE as exc:  # nobody can decide a window while the store is down
                    log.warning("window %d: store unavailable while waiting: %s", window, exc)
                    self.acct.store_errors += 1
                time.sleep(self.node.poll_seconds)

    def wait_for_payloads(self, decision: Decision) -> Gathered:
        """Every payload the decision counts, verified by hash. One that no source can give
        right now is waited for, never skipped: applying the window without it would fork."""
        while True:
            try:
                return self.follower.gather(decision)
            except PayloadUnavailable as exc:
                log.warning("window %d: waiting for a counted payload: %s", decision.window, exc)
                self.acct.store_errors += 1
                self.progress("gather", decision.window, waiting_for=exc.peer)
                time.sleep(max(1.0, self.node.poll_seconds * 5))

    def sign_payload(self, window: int, sent: dict[str, CompressedTensor], tokens: int) -> bytes:
        return encode_payload(run=self.manifest.run_key, window=window, base_digest=self.replica.digest, tokens=tokens,
                              tensors=sent, codec=self.manifest.codec, identity=self.identity)

    def receive_window(self, window: int, result: InnerResult) -> WindowReport:
        """A non-leader rank: take the window's new global weights from rank 0."""
        self.replica.broadcast()
        self.replica.load_into(self.model)
        return WindowReport(window, result.mean_loss, None, [], 0, "")

    def heldout_loss(self) -> float:
        return heldout_loss(self.model, self.data, self.manifest.data.eval_sequences, self.manifest.data.batch_size)

    # ------------------------------------------------------------------ after a window
    def record(self, decision: Decision, gathered: Gathered, *, train_loss: float | None,
               payload_bytes: int) -> WindowReport:
        """History, metrics and progress for an applied window (evaluated every ``eval_every``)."""
        w = decision.window
        heldout = self.heldout_loss() if self.node.eval_every and self.replica.window % self.node.eval_every == 0 else None
        entry = {
            "window": w, "train_loss": train_loss, "heldout_loss": heldout, "included": len(gathered.accepted),
            "payload_bytes": payload_bytes, "bytes_up": self.acct.bytes_up, "bytes_down": self.acct.bytes_down,
            "digest": self.replica.digest.hex(), "time": time.time(),
        }
        self.history.append(entry)
        self.last = entry
        self._export_metrics(entry, decision)
        self.progress("done", w, train_loss=train_loss)
        return WindowReport(w, train_loss, heldout, sorted(gathered.accepted), payload_bytes, self.replica.digest.hex())

    def _export_metrics(self, entry: dict, decision: Decision) -> None:
        m = self.metrics
        m.window.set(entry["window"])
        if entry["heldout_loss"] is not None:
            m.heldout_loss.set(entry["heldout_loss"])
        m.peers_included.set(entry["included"])
        m.window_bytes.set(sum(i.size for i in decision.included))
        m.payload_bytes.keep(i.peer_id for i in decision.included)  # series for this window's counted peers
        for inc in decision.included:
            m.payload_bytes.set(inc.peer_id, inc.size)
        m.bytes_sent.set(self.acct.bytes_up)
        m.bytes_received.set(self.acct.bytes_down)

    def save(self) -> None:
        """Write the resumable state (atomically: a kill leaves the old or the new one)."""
        meta = {"accounting": self.acct.to_dict(), "peer_id": self.peer_id}
        state = LocalState(self.replica.window, self.replica.params, self.inner.optimizer_tensors(),
                           self.ef.state_dict(), meta)
        save_local_state(self.node.state_file, state)

    def housekeeping(self, decision: Decision) -> None:
        """The proposer of the decided round publishes the checkpoint when one is due and
        collects windows no joiner needs any more: one replica, not all of them."""
        if proposer(decision.window, decision.round, self.manifest.closers) != self.identity.public_key.hex():
            return
        every = self.manifest.run.checkpoint_every
        try:
            if self.node.publish_checkpoints and self.replica.window % every == 0:
                publish_checkpoint(self.store, self.replica.window, self.replica.params)
                log.info("published the checkpoint of window %d", self.replica.window)
            newest = self.replica.window - self.replica.window % every
            gc_windows(self.store, retention_floor(self.replica.window, newest, self.manifest.run.keep_windows))
        except StoreError as exc:  # the next proposer publishes and collects
            log.warning("window %d: checkpoint or garbage collection skipped: %s", decision.window, exc)

    # ------------------------------------------------------------------ catching up, running
    @property
    def stopping(self) -> bool:
        """Asked to stop between windows (``NodeConfig.stop``; single-process peers only)."""
        return self.world == 1 and self.node.stop is not None and self.node.stop.is_set()

    def catch_up(self) -> int:
        """Apply every window that is already decided; returns how many were replayed."""
        n, jumps = 0, self.follower.jumps
        while not self.stopping and (decision := self.follower.next_decided()) is not None:
            self.progress("catch-up", decision.window)
            self.follower.advance(decision, self.wait_for_payloads(decision))
            n += 1
        if n or self.follower.jumps != jumps:
            self.replica.load_into(self.model)
            if n:
                self.last = {"window": self.replica.window - 1, "heldout_loss": self.heldout_loss(),
                             "bytes_up": self.acct.bytes_up, "bytes_down": self.acct.bytes_down,
                             "digest": self.replica.digest.hex(), "time": time.time(), "replayed": n}
                self.history.append(self.last)
                self.save()
        self.replayed += n
        return n

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
            self.start_from_checkpoint()
            if not self.last:  # the model we start from: the first point of every loss curve
                self.last = {"window": self.replica.window - 1, "heldout_loss": self.heldout_loss(), "bytes_up": 0,
                             "bytes_down": 0, "digest": self.replica.digest.hex(), "time": time.time()}
                self.history.append(self.last)
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
            if self.stopping:
                break
            self.run_window()
        self.progress("finished", self.replica.window)

    def progress(self, phase: str, window: int, **extra: object) -> None:
        """Replace the progress file: what this peer is doing now (rank 0 only)."""
        if not self.leader:
            return
        write_progress(self.node.progress_file, {
            "peer": self.peer_id, "pid": os.getpid(), "phase": phase, "window": window,
            "params": sum(layout.numel for layout in self.layouts.values()),
            "digest": self.replica.digest.hex(),
            "origin": self.origin, "replayed": self.replayed, "ranks": self.world, "comm": self.comm,
            "accounting": self.acct.to_dict(), "last": self.last, **extra,
        })
