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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from node.accounting import Accounting
from node.checkpoint import publish_due
from node.closing import Closing
from node.config import NodeConfig
from node.dataset import TokenData
from node.ddp import wrap_ddp
from node.exchange import Exchange, Gathered, address_policy
from node.follow import Follower
from node.inner import InnerLoop, InnerResult
from node.memory import ModelShape, plan_memory
from node.metrics import SwarmMetrics, start_metrics_server
from node.model import build_model, heldout_loss, param_shapes
from node.overlap import Background
from node.progress import History, write_progress
from node.replica import Replica
from node.runinfo import check_run_manifest
from node.state import (
    BackgroundWriter,
    LocalState,
    load_local_state,
    save_local_state,
    snapshot,
)
from protocol.assignment import assigned_batches
from protocol.codec import ErrorFeedback
from protocol.codec_types import CompressedTensor, model_layout
from protocol.consensus import Decision, proposer
from protocol.errors import RETRYABLE, PayloadUnavailable
from protocol.identity import Identity
from protocol.manifest import Manifest
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
        shape = ModelShape.of(self.model, manifest.data.seq_len, -(-manifest.data.batch_size // self.world))
        self.plan = plan_memory(node.device, shape, micro_batch=node.micro_batch, overlap=manifest.inner.overlap)
        """Where every tensor of the window lives (node/memory.py)."""
        log.info("memory plan: %s", self.plan.describe())
        self.model.to(self.plan.device)
        self.shapes = param_shapes(self.model)
        self.layouts = model_layout(self.shapes, manifest.codec)
        ddp = None
        self.comm = node.comm or manifest.inner.comm
        if self.world > 1:
            ddp, _ = wrap_ddp(self.model, comm=self.comm, device=torch.device(node.device))
            log.info("one peer on %d ranks, gradient communication %s", self.world, self.comm)
        self.inner = InnerLoop(self.model, manifest.inner, ddp_model=ddp, autocast=self.plan.autocast,
                               micro_batch=self.plan.micro_batch)
        self.ef = ErrorFeedback(self.layouts, manifest.codec, self.plan.state_device, compute=self.plan.device)
        self.exchange = Exchange(store, self.identity, manifest.run_key, self.acct, policy=node.policy,
                                 own_store=own_store, addresses=address_policy(manifest), device=self.plan.device)
        self.writer = BackgroundWriter()
        """Writes the resumable state (and checkpoints we publish) off the window's path."""
        self.history = History(node.workdir / "history.jsonl")
        self.last: dict = {}
        """The newest history entry (the live display and ``up`` show it)."""
        self.origin: dict = {}
        """Where this replica's weights came from: local state, a checkpoint, or genesis."""
        self.follower = Follower(manifest, store, self.exchange, self._restore(), self.layouts)
        self.closing = (Closing(store, manifest, self.identity, self.exchange, self.acct)
                        if self.identity.public_key.hex() in manifest.closers and self.leader else None)
        """Set when our key is one of the run's closers: we take part in deciding windows."""
        self.metrics = SwarmMetrics(CollectorRegistry(), run=manifest.run_key, role="peer", accounting=self.acct)
        self.replayed = 0
        self.overlap = manifest.inner.overlap and self.world == 1
        """Train the next window while this one is exchanged (``inner.overlap``; one rank only)."""
        if manifest.inner.overlap and self.world > 1:
            log.warning("inner.overlap is not available to a peer on several ranks; windows run one after another")
        self.pending: Background | None = None
        """The exchange of the window before, running on a helper thread (overlap only)."""
        self.shown_digest = self.replica.digest.hex()
        """The replica's digest as the progress file shows it (read only where the replica is ours)."""
        self._main = threading.get_ident()

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
            replica = Replica(state.weights, state.window, device=self.plan.state_device)
            self.inner.load_optimizer_tensors(state.optimizer)
            self.ef.load_state_dict(state.error_feedback)
            self.acct.restore(state.meta["accounting"])
            kept = self.history.truncate(before_window=replica.window)  # later entries are replayed
            self.last = kept[-1] if kept else {}
            self.origin = {"from": "state", "window": replica.window}
            log.info("resumed at window %d from %s", replica.window, self.node.state_file)
        else:
            replica = Replica(dict(self.model.named_parameters()), 0, device=self.plan.state_device)
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
            self.shown_digest = self.replica.digest.hex()
            self.origin = {"from": "checkpoint", "window": self.replica.window}
            log.info("starting from the verified checkpoint of window %d", self.replica.window)

    # ------------------------------------------------------------------ the window
    @property
    def position(self) -> int:
        """The window this peer trains next (one past an exchange still running)."""
        return self.pending.window + 1 if self.pending is not None else self.replica.window

    def run_window(self) -> WindowReport | None:
        """Train, publish, decide, gather, aggregate and step one window (with overlap: train
        one while the one before is exchanged; the report is of the window applied)."""
        if self.overlap:
            return self.overlapped_window()
        w = self.replica.window
        deadline = self.follower.deadline(w)
        result = self.train(w)                                                             # inner loop
        if not self.leader:
            return self.receive_window(w, result)
        expect = self.follower.expectation(w)
        with self.acct.phase("encode"):
            sent = self.ef.compress(self.replica.pseudo_gradient(self.model))              # pseudo-gradient, EF, codec
            blob = self.sign_payload(w, sent, result.tokens)
        self.progress("publish", w, train_loss=result.mean_loss)
        published = self.exchange.publish(w, blob, self.publish_until(deadline))            # publish
        if published:
            self.exchange.remember(w, blob, expect)  # gathering never downloads our own back
        decision = self.wait_for_decision(w, expect, deadline)                             # close
        gathered = self.wait_for_payloads(decision)                                        # gather
        if not published or self.peer_id not in gathered.accepted:
            self.ef.restore(sent)  # the network did not take it: keep it for a later window
        self.progress("aggregate", w, train_loss=result.mean_loss)
        with self.acct.phase("aggregate"):
            self.follower.advance(decision, gathered)                                      # aggregate, outer step
            self.replica.load_into(self.model)
        report = self.record(decision, gathered, train_loss=result.mean_loss, payload_bytes=len(blob))  # digest
        self.persist(publishes=self._publishes(decision))                                 # state, checkpoint, gc
        if self.world > 1:
            self.replica.broadcast()
        return report

    def overlapped_window(self) -> WindowReport | None:
        """Train window w while window w-1 is decided, gathered and applied on a helper thread
        (``node/overlap.py``); then publish w and hand its exchange to the helper. Returns the
        report of window w-1 (None for the first window)."""
        pending, w = self.pending, self.position
        result = self.train(w, after_step=(lambda: pending.apply_landed(self.model)) if pending else None)
        applied = self._land(pending) if pending is not None else None  # the replica is now theta(w)
        if applied is not None and self.follower.decisions.read(w) is not None:
            log.warning("window %d was decided without us (we fell behind); catching up", w)
            self.replica.load_into(self.model)
            return self._applied(*applied)
        expect, deadline = self.follower.expectation(w), self.follower.deadline(w)
        with self.acct.phase("encode"):
            delta = self.replica.pseudo_gradient(self.model)  # formed once, kept as the stand-in
            stand_in = {n: delta[n].to(self.plan.state_device) for n in self.replica.params}  # fresh tensors
            sent = self.ef.compress(stand_in)
            blob = self.sign_payload(w, sent, result.tokens)
        self.progress("publish", w, train_loss=result.mean_loss)
        # Window w+1 trains on from here, our own update standing in for the run's until it lands.
        report = None
        if applied is not None and self.eval_due():  # the evaluation of window w-1 reads theta(w)
            self.replica.load_into(self.model)
            report = self._applied(*applied)
            with torch.no_grad():  # back to our own end of window w: theta(w) - delta
                for n, p in self.model.named_parameters():
                    p.sub_(stand_in[n].to(p.device))
        elif applied is not None:
            report = self._applied(*applied)
        self.pending = Background(w, lambda on_tensor: self._exchange(w, blob, expect, deadline, on_tensor),
                                  lr=self.manifest.outer.lr, stand_in=stand_in,
                                  context=(sent, len(blob), result.mean_loss))
        return report

    def _exchange(self, window: int, blob: bytes, expect: Expectation, deadline: float,
                  on_tensor: Callable[[str, torch.Tensor], None]) -> tuple[Decision, Gathered, bool]:
        """The helper thread's part of an overlapped window: publish (the upload is off the
        training path too), decide, gather, step the replica; and whether we published."""
        published = self.exchange.publish(window, blob, self.publish_until(deadline))
        if published:
            self.exchange.remember(window, blob, expect)
        decision = self.wait_for_decision(window, expect, deadline)
        gathered = self.wait_for_payloads(decision)
        self.follower.advance(decision, gathered, on_tensor=on_tensor)
        return decision, gathered, published

    def _land(self, pending: Background) -> tuple[Decision, Gathered, float, int]:
        """Wait for the helper (the part of its exchange training did not hide counts as
        wait) and settle its window: error feedback gets back what the window did not take."""
        with self.acct.phase("wait"):
            decision, gathered, published = pending.join(self.model)
        self.pending = None
        self.acct.background += pending.seconds
        sent, size, train_loss = pending.context
        if not published or self.peer_id not in gathered.accepted:
            self.ef.restore(sent)
        return decision, gathered, train_loss, size

    def _applied(self, decision: Decision, gathered: Gathered, train_loss: float, size: int) -> WindowReport:
        """History, evaluation (the model holds theta(w) now) and state of an overlapped window."""
        report = self.record(decision, gathered, train_loss=train_loss, payload_bytes=size)
        self.persist(publishes=self._publishes(decision))
        return report

    def drain(self) -> WindowReport | None:
        """Finish the exchange still running (the last window before a stop)."""
        if self.pending is None:
            return None
        applied = self._land(self.pending)
        self.replica.load_into(self.model)
        return self._applied(*applied)

    def publish_until(self, deadline: float) -> float:
        """How long a failing upload is retried: past the deadline, as long as a window
        nobody could publish in stays open (``node/closing.py``), so a store outage that
        ends by then costs no payload."""
        return deadline + self.manifest.run.window_seconds

    def train(self, window: int, after_step: Callable[[], object] | None = None) -> InnerResult:
        """H inner steps on the batches assigned to us for ``window``."""
        self.progress("train", window)
        ids = assigned_batches(self.manifest.run.seed, window, self.peer_id, self.manifest.inner.steps,
                               self.manifest.data.batch_size, self.data.n_train)
        batches = [self.data.batch(row).to(self.node.device) for row in ids]
        with self.acct.phase("compute"):
            result = self.inner.train(batches, window, after_step)
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

    def eval_due(self) -> bool:
        """The held-out loss is measured at this window (every ``eval_every`` windows)."""
        return bool(self.node.eval_every) and self.replica.window % self.node.eval_every == 0

    def heldout_loss(self) -> float:
        return heldout_loss(self.model, self.data, self.manifest.data.eval_sequences, self.manifest.data.batch_size)

    # ------------------------------------------------------------------ after a window
    def record(self, decision: Decision, gathered: Gathered, *, train_loss: float | None,
               payload_bytes: int) -> WindowReport:
        """History, metrics and progress for an applied window (evaluated every ``eval_every``)."""
        w = decision.window
        with self.acct.phase("digest"):
            digest = self.shown_digest = self.replica.digest.hex()
        heldout = None
        if self.eval_due():
            with self.acct.phase("eval"):
                heldout = self.heldout_loss()
        entry = {
            "window": w, "train_loss": train_loss, "heldout_loss": heldout, "included": len(gathered.accepted),
            "counted": self.peer_id in gathered.accepted,
            "payload_bytes": payload_bytes, "bytes_up": self.acct.bytes_up, "bytes_down": self.acct.bytes_down,
            "digest": digest, "time": time.time(),
        }
        self.history.append(entry)
        self.last = entry
        self._export_metrics(entry, decision)
        self.progress("done", w, train_loss=train_loss)
        return WindowReport(w, train_loss, heldout, sorted(gathered.accepted), payload_bytes, digest)

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

    def persist(self, *, publishes: bool = False) -> None:
        """Snapshot the resumable state; a background thread writes it (atomically: a kill
        leaves the old or the new one) and, when ``publishes``, the checkpoint that is due
        and the garbage collection, from the same snapshot."""
        with self.acct.phase("save"):
            self.writer.wait()  # one snapshot in host memory at a time; a failed write is raised here
            meta = {"accounting": self.acct.to_dict(), "peer_id": self.peer_id}
            state = LocalState(self.replica.window, snapshot(self.replica.params),
                               snapshot(self.inner.optimizer_tensors()), snapshot(self.ef.state_dict()), meta)
            self.writer.submit(self._write, state, publishes)

    def _publishes(self, decision: Decision) -> bool:
        """The proposer of the decided round publishes checkpoints and collects old windows:
        one replica, not all of them."""
        return proposer(decision.window, decision.round, self.manifest.closers) == self.identity.public_key.hex()

    def _write(self, state: LocalState, publishes: bool) -> None:
        save_local_state(self.node.state_file, state)
        if not publishes:
            return
        publish_due(self.store, self.manifest.run, state.window, state.weights, self.node.cache_dir,
                    checkpoints=self.node.publish_checkpoints)

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
            self.shown_digest = self.replica.digest.hex()
            if n:  # no evaluation while catching up: the next evaluated window shows the loss
                self.last = {"window": self.replica.window - 1, "heldout_loss": None,
                             "bytes_up": self.acct.bytes_up, "bytes_down": self.acct.bytes_down,
                             "digest": self.replica.digest.hex(), "time": time.time(), "replayed": n}
                self.history.append(self.last)
                self.persist()
        self.replayed += n
        return n

    def run(self) -> None:
        """Catch up, then run windows until ``max_windows`` (or forever)."""
        server = None
        if self.leader and self.node.metrics_port is not None:
            server = start_metrics_server(self.node.metrics_port, self.metrics.registry)
            (self.node.workdir / "metrics.url").write_text(server.url)
        self.acct.claim()
        try:
            self._run()
        finally:
            self.writer.close()  # the last state is on disk before we return
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
        while not self.node.max_windows or self.position < self.node.max_windows:
            if self.world == 1 and self.pending is None:
                self.catch_up()  # fell behind (slow or suspended): skip straight to the open window
                if self.node.max_windows and self.replica.window >= self.node.max_windows:
                    break
            if self.stopping:
                break
            self.run_window()
        self.drain()
        self.progress("finished", self.replica.window)

    def progress(self, phase: str, window: int, **extra: object) -> None:
        """Replace the progress file: what this peer is doing now (rank 0's loop only: the
        helper that exchanges an overlapped window does not speak for the peer)."""
        if not self.leader or threading.get_ident() != self._main:
            return
        write_progress(self.node.progress_file, {
            "peer": self.peer_id, "pid": os.getpid(), "phase": phase, "window": window,
            "params": sum(layout.numel for layout in self.layouts.values()),
            "digest": self.shown_digest,
            "origin": self.origin, "replayed": self.replayed, "ranks": self.world, "comm": self.comm,
            "accounting": self.acct.to_dict(), "last": self.last, **extra,
        })
