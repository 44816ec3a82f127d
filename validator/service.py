"""The validator's main loop: follow the run bit-identically, score every window, publish.

Per window w, after the window's close record exists:

    list every payload published for w -> decode each (typed rejections become verdicts)
    -> cheap checks (on time, empty, norms, copies) -> evaluate a sample of the passing
    peers alone on assigned and unassigned data -> ratings -> signed score record
    -> apply the window exactly as peers do -> held-out loss -> dashboard

Unpredictable but auditable randomness: the unassigned batches and the evaluation sample
are seeded from the SHA-256 of the window's included payload hashes, which nobody knows
before every payload is uploaded; anyone can recompute them afterwards. The copy-check
sample is seeded from the validator's own signature over (run, window), so copiers cannot
aim at it either.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from node.accounting import Accounting
from node.checkpoint import publish_due
from node.closing import Closing
from node.dataset import TokenData
from node.exchange import Exchange, address_policy
from node.follow import Follower, check_base
from node.model import build_model, heldout_loss, param_shapes
from node.replica import Replica
from node.state import LocalState, load_local_state, save_local_state
from protocol.assignment import assigned_batches, unassigned_batches
from protocol.codec import compress
from protocol.codec_types import CompressedTensor, model_layout
from protocol.consensus import Decision, proposer
from protocol.errors import RETRYABLE, PayloadRejected, PayloadUnavailable
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.paths import score_key
from protocol.scores import make_score_record
from protocol.stores.base import Store
from protocol.wire import Payload
from validator.checks import Submission, Verdict, check_window, verdict_from_rejection
from validator.dashboard import Dashboard, DashboardState
from validator.evaluate import evaluate_payload, mean_loss
from validator.ratings import Ratings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidatorConfig:
    """A validator's local policy (not part of the protocol)."""

    workdir: Path
    max_windows: int = 0
    """Stop after scoring this window; 0 runs until interrupted."""
    max_evaluations: int = 16
    """Peers evaluated per window (a sample, chosen unpredictably, when more published)."""
    assigned_batches: int = 8
    """Of a peer's H assigned batches, how many to evaluate it on (more = less noisy evidence)."""
    unassigned_batches: int = 8
    poll_seconds: float = 0.3


class Validator:
    def __init__(self, manifest: Manifest, store: Store, cfg: ValidatorConfig, *, identity: Identity,
                 dashboard: DashboardState | None = None):
        self.manifest = manifest
        self.store = store
        self.cfg = cfg
        self.identity = identity
        self.run_key = manifest.run_key
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.data = TokenData.load(manifest, store, cfg.workdir / "cache")
        self.model = build_model(manifest.model, self.data.vocab_size, manifest.data.seq_len, manifest.run.seed)
        self.shapes = param_shapes(self.model)
        self.layouts = model_layout(self.shapes, manifest.codec)
        self.acct = Accounting()
        self.exchange = Exchange(store, identity, self.run_key, self.acct, addresses=address_policy(manifest))
        ratings_path = cfg.workdir / "ratings.json"
        self.ratings = Ratings.load(ratings_path) if ratings_path.exists() else Ratings()
        key = identity.public_key.hex()
        self.dashboard = dashboard or DashboardState(
            self.run_key, identity.peer_id, trusted=key in {k.lower() for k in manifest.validators.keys},
            closer=key in manifest.closers, accounting=self.acct)
        self.follower = Follower(manifest, store, self.exchange, self._restore(), self.layouts)
        if self.follower.replica.window == 0 and self.follower.jump_to_checkpoint():
            log.info("validator starting from the verified checkpoint of window %d", self.replica.window)
        self.replica.load_into(self.model)
        self.closing = (Closing(store, manifest, identity, self.exchange, self.acct)
                        if identity.public_key.hex() in manifest.closers else None)
        """Set when this validator is one of the run's closers: it takes part in deciding windows."""
        self.previous: dict[str, CompressedTensor] | None = None
        """The last applied aggregate, compressed: a payload that replays it is a copy."""

    @property
    def replica(self) -> Replica:
        return self.follower.replica

    @property
    def state_file(self) -> Path:
        return self.cfg.workdir / "state.safetensors"

    def _restore(self) -> Replica:
        """Resume from our state, else start from genesis (a pure function of the manifest)."""
        state = load_local_state(self.state_file)
        if state is not None:
            log.info("validator resumed at window %d", state.window)
            return Replica(state.weights, state.window)
        return Replica(dict(self.model.named_parameters()), 0)

    # ------------------------------------------------------------------ one window
    def _decode_all(self, window: int) -> tuple[dict[str, Payload], dict[str, Verdict], dict[str, float], dict[str, int]]:
        """Every payload published for the window, decoded; refusals become verdicts."""
        payloads, verdicts, modified, sizes = {}, {}, {}, {}
        expect = self.follower.expectation(window)
        for peer, info in self.exchange.present(window, expect).items():
            try:
                payload, _ = self.exchange.verify(peer, expect)
            except PayloadRejected as exc:
                verdicts[peer] = verdict_from_rejection(exc)
                log.info("window %d: %s rejected: %s", window, peer, exc.reason)
                continue
            except PayloadUnavailable as exc:
                verdicts[peer] = Verdict(False, "unavailable", f"payload could not be fetched: {exc.reason}")
                continue
            payloads[peer], sizes[peer] = payload, payload.size
            # Only a store's own clock says when an upload happened; a p2p record's is the writer's claim.
            modified[peer] = info.modified if self.store.trusted_clock else float("-inf")
        return payloads, verdicts, modified, sizes

    def _batches(self, ids: np.ndarray) -> torch.Tensor:
        return torch.stack([self.data.batch(row) for row in ids])

    def score_window(self, decision: Decision) -> dict[str, Verdict]:
        """Check, evaluate and rate every payload of ``decision.window``; publish the record.

        On time means stored before the window's deadline as the run's schedule has it (the
        agreed close of the window before + ``window_seconds``), never as a closer claims.
        """
        w = decision.window
        payloads, verdicts, modified, sizes = self._decode_all(w)
        material = hashlib.sha256(f"{self.run_key}|{w}|".encode() + "".join(i.sha256 for i in decision.included).encode()).digest()
        copy_seed = int.from_bytes(hashlib.sha256(self.identity.sign(f"copies|{self.run_key}|{w}".encode())).digest()[:8], "big")
        subs = [Submission.of(p, modified[peer]) for peer, p in payloads.items()]
        on_time_until = max(self.follower.deadline(w), decision.closed_at) + self.manifest.run.grace_seconds
        verdicts.update(check_window(subs, close_time=on_time_until, seed=copy_seed,
                                     reference=decision.value.standing, previous=self.previous))
        passing = sorted(p for p, v in verdicts.items() if v.ok)
        sample = passing if len(passing) <= self.cfg.max_evaluations else sorted(
            random.Random(material).sample(passing, self.cfg.max_evaluations))
        scores, evidence, components = {}, {}, {}
        if sample:
            unassigned = self._batches(
                unassigned_batches(material, self.cfg.unassigned_batches, self.manifest.data.batch_size, self.data))
            u0 = mean_loss(self.model, unassigned)
            for peer in sample:
                ids = assigned_batches(self.manifest.run.seed, w, peer, self.manifest.inner.steps,
                                       self.manifest.data.batch_size, self.data.n_train)
                pick = random.Random(material + peer.encode()).sample(range(len(ids)), min(self.cfg.assigned_batches, len(ids)))
                ev = evaluate_payload(self.model, payloads[peer].tensors, lr=self.manifest.outer.lr,
                                      scale=1.0 / max(1, len(passing)), assigned=self._batches(ids[sorted(pick)]),
                                      unassigned=unassigned, unassigned_before=u0)
                scores[peer], evidence[peer] = ev.score, ev.evidence
                components[peer] = ev.components()
        failed = [p for p, v in verdicts.items() if not v.ok]
        present = [p for p in passing if p not in scores]
        self.ratings.update(w, scores, evidence=evidence, failed=failed, present=present,
                            reference=decision.value.standing)
        table = self.ratings.score_table({p: v.ok for p, v in verdicts.items()}, components)
        record = make_score_record(self.identity, self.run_key, w, table)
        self.store.put(score_key(w, self.identity.peer_id), record)
        self.acct.bytes_up += len(record)
        self.ratings.save(self.cfg.workdir / "ratings.json")
        for peer, v in verdicts.items():
            if not v.ok:
                self.dashboard.record_rejection(peer, v.check, v.reason)
            else:
                self.dashboard.update_peer(peer, reason="")
            # In sync: the payload's base digest is ours (the decoder checked it); unknown
            # when the decoder refused it before it got that far.
            base = payloads[peer].header.base_digest.hex()[:12] if peer in payloads else None
            in_sync = True if base else (False if v.check == "out_of_sync" else None)
            self.dashboard.update_peer(peer, in_sync=in_sync, base_digest=base, payload_bytes=sizes.get(peer, 0),
                                       last_window=w, excluded_because=self.ratings.why_excluded(peer, v.ok))
        self.dashboard.record_scores(table)
        self.dashboard.record_ratings({p: (st.mu, st.sigma, self.ratings.weight(p))
                                       for p, st in self.ratings.peers.items() if p not in table})
        log.info("window %d: scored %d peers; included %s", w, len(table),
                 sorted(p for p, s in table.items() if s.included))
        return verdicts

    def step(self, decision: Decision) -> dict[str, Verdict]:
        """Score window ``decision.window``, then apply it exactly as the peers did."""
        check_base(self.replica, decision)
        verdicts = self.score_window(decision)
        while True:
            try:
                gathered = self.follower.gather(decision)
                break
            except PayloadUnavailable as exc:  # never apply a window without a counted payload
                log.warning("window %d: waiting for a counted payload: %s", decision.window, exc)
                time.sleep(max(1.0, self.cfg.poll_seconds * 5))
        # What a free rider would replay next window, fingerprinted as any payload is.
        previous: dict[str, CompressedTensor] = {}
        self.follower.advance(decision, gathered,
                              on_tensor=lambda name, t: previous.__setitem__(name, compress(t, self.layouts[name])))
        self.previous = previous
        self.replica.load_into(self.model)
        heldout = heldout_loss(self.model, self.data, self.manifest.data.eval_sequences, self.manifest.data.batch_size)
        self.dashboard.finish_window(decision.window, heldout_loss=heldout,
                                     payload_bytes={i.peer_id: i.size for i in decision.included})
        save_local_state(self.state_file, LocalState(self.replica.window, self.replica.params, {}, {},
                                                     {"heldout_loss": heldout}))
        if proposer(decision.window, decision.round, self.manifest.closers) == self.identity.public_key.hex():
            # Validators decide this run, so no peer is ever the proposer: we publish and collect.
            publish_due(self.store, self.manifest.run, self.replica.window, self.replica.params,
                        self.cfg.workdir / "cache")
        return verdicts

    def next_decision(self) -> Decision | None:
        """The decision of the window we are at: read it (jumping to a verified checkpoint
        when our window is gone), or, as one of the closers, take part in making it."""
        jumps = self.follower.jumps
        decision = self.follower.next_decided()
        if self.follower.jumps != jumps:
            self.replica.load_into(self.model)
        if decision is None and self.closing is not None:
            w = self.replica.window
            decision = self.closing.poll(w, self.follower.expectation(w), deadline=self.follower.deadline(w),
                                         expected=self.follower.expected(w))
        return decision

    def run(self) -> None:
        self.acct.claim()
        while not self.cfg.max_windows or self.replica.window < self.cfg.max_windows:
            try:
                decision = self.next_decision()
            except RETRYABLE as exc:
                log.warning("store unavailable: %s", exc)
                decision = None
            if decision is None:
                time.sleep(self.cfg.poll_seconds)
                continue
            self.step(decision)


def run_validator(manifest: Manifest, store: Store, args: argparse.Namespace, identity: Identity) -> int:
    """``locoswarm validator``: serve the dashboard and validate until done."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if identity.public_key.hex() not in {k.lower() for k in manifest.validators.keys}:
        log.warning("this validator's key %s is not trusted by the run's manifest: peers will ignore its scores",
                    identity.public_key.hex())
    validator = Validator(manifest, store, ValidatorConfig(workdir, max_windows=args.windows), identity=identity)
    with Dashboard(validator.dashboard, host=args.dashboard_host, port=args.dashboard_port) as dash:
        (workdir / "dashboard.url").write_text(dash.url)
        validator.run()
    return 0
