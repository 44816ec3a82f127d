"""Following a run from its store: the read side that peers, validators, ``status`` and
``export`` share.

Every role needs the same facts and must read them the same way, or replicas drift:

- the run's manifest (``node/runinfo.py``: ``read_manifest``; ``check_run_manifest`` refuses a different one);
- each window's decision (``DecisionReader``): a decision record, or a quorum of precommits
  among its consensus records, signed by the keys the manifest trusts and nobody else;
- the schedule (``Follower.deadline`` and ``Follower.expected``): window 0 closes at most
  ``run.window_seconds`` after ``run.genesis``; every later window at most
  ``Follower.window_length`` after the agreed close time of the window before (adaptive:
  ``run.deadline_factor`` times the median of the last ``ADAPT_WINDOWS`` windows' lengths,
  bounded by the manifest), and early once every peer counted in the last
  ``EXPECTED_WINDOWS`` windows published; no writer's own clock is trusted for it;
- checkpoints, adopted only when a decision certifies their digest
  (``Follower.verified_checkpoint``): a forged or corrupt one is skipped with a reason;
- the global weights after replaying decided windows (``Follower``): gather exactly the
  payloads a decision counts, by hash, aggregate and step. When a window's objects were
  collected while we were away, restart from the newest verified checkpoint.

``Follower.next_decided`` is a pull API (no callbacks): the caller decides what to do with
each decided window before ``advance`` applies it (a validator scores it first).
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable

import torch

from node.accounting import Accounting
from node.checkpoint import checkpoint_windows, fetch_checkpoint
from node.exchange import Exchange, Gathered, address_policy
from node.replica import Replica
from node.runinfo import DecisionRecords
from protocol import paths
from protocol.aggregate import iter_aggregate
from protocol.codec_types import TensorLayout
from protocol.consensus import (
    MAX_PROPOSAL_BYTES,
    MAX_VOTE_BYTES,
    PROPOSAL,
    Decision,
    Seen,
    read_proposal,
    read_vote,
)
from protocol.errors import (
    CheckpointError,
    ObjectNotFound,
    ObjectTooLarge,
    RecordRejected,
    ReplicaDiverged,
)
from protocol.identity import Identity, peer_id_of
from protocol.manifest import Manifest
from protocol.stores.base import ObjectInfo, Store
from protocol.wire import Expectation

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20
JUMP_CHECK_SECONDS = 10.0
EXPECTED_WINDOWS = 2
ADAPT_WINDOWS = 5
"""Windows whose lengths set the adaptive deadline (at least 3 must be known)."""
"""A window closes early once every peer counted in the last this many windows published."""
_CAPS = {PROPOSAL: MAX_PROPOSAL_BYTES, "prevote": MAX_VOTE_BYTES, "precommit": MAX_VOTE_BYTES}


class Once:
    """Logs each (key, reason) once: hostile objects must not flood the log."""

    def __init__(self) -> None:
        self._said: set[tuple[str, str]] = set()

    def warn(self, key: str, reason: str) -> None:
        if (key, reason) not in self._said:
            self._said.add((key, reason))
            log.warning("ignoring %r: %s", key, reason)


class ConsensusLog:
    """The consensus records of one window, read incrementally from the store.

    Only keys of the form the protocol writes, signed by the closer the key names and under
    the size cap of their kind, are read; everything else is never fetched.
    """

    def __init__(self, store: Store, manifest: Manifest, window: int, accounting: Accounting, once: Once):
        self.store = store
        self.manifest = manifest
        self.window = window
        self.acct = accounting
        self.once = once
        self.closers = manifest.closers
        self.ids = {peer_id_of(bytes.fromhex(k)): k for k in self.closers}
        self.seen = Seen(window, self.closers)
        self.first_seen: dict[bytes, float] = {}
        """Value id -> our clock when its proposal first appeared."""
        self.previous_poll = 0.0
        """Our clock at the poll before the latest one (a proposal first seen now was not
        there then)."""
        self._read: dict[str, tuple[int, float]] = {}

    def refresh(self, now: float) -> Seen:
        for info in self.store.list(paths.consensus_prefix(self.window)):
            parsed = paths.parse_consensus_key(info.key)
            if parsed is None or parsed[2] not in self.ids or info.size > _CAPS[parsed[1]]:
                continue
            if self._read.get(info.key) == (info.size, info.modified):
                continue
            self._read[info.key] = (info.size, info.modified)
            self._read_one(info, *parsed, now=now)
        self.previous_poll = now
        return self.seen

    def _read_one(self, info: ObjectInfo, round_: int, kind: str, signer_id: str, *, now: float) -> None:
        try:
            data = self.store.get(info.key, max_bytes=_CAPS[kind])
        except (ObjectNotFound, ObjectTooLarge):
            return
        self.acct.bytes_down += len(data)
        try:
            if kind == PROPOSAL:
                record = read_proposal(data, run=self.manifest.run_key, window=self.window, closers=self.closers)
            else:
                record = read_vote(data, run=self.manifest.run_key, kind=kind, window=self.window, closers=self.closers)
            if record.signer != self.ids[signer_id] or record.round != round_:
                raise RecordRejected("the record does not belong under this key")
        except RecordRejected as exc:
            self.once.warn(info.key, str(exc))
            return
        if kind == PROPOSAL:
            if self.seen.add_proposal(record):
                self.first_seen.setdefault(record.value_id, now)
        else:
            self.seen.add_vote(record)


class DecisionReader:
    """Finds the decision of a window, for any node."""

    def __init__(self, store: Store, manifest: Manifest, accounting: Accounting):
        self.store = store
        self.manifest = manifest
        self.acct = accounting
        self.once = Once()
        self.records = DecisionRecords(store, manifest, warn=self.once.warn)
        self._logs: dict[int, ConsensusLog] = {}

    def read(self, window: int) -> Decision | None:
        """The window's decision, or None while it is undecided (or unreadable)."""
        record = self.read_record(window)
        if record is not None:
            return record
        # No readable decision record (not written yet, or overwritten): count precommits.
        clog = self._logs.setdefault(window, ConsensusLog(self.store, self.manifest, window, self.acct, self.once))
        self._logs = {w: v for w, v in self._logs.items() if w >= window - 1}
        return clog.refresh(time.time()).decided(self.manifest.quorum, None)

    def read_record(self, window: int) -> Decision | None:
        """The first valid decision record of the window, if any."""
        before = self.records.bytes_read
        decision = self.records.read(window)
        self.acct.bytes_down += self.records.bytes_read - before
        return decision


class Follower:
    """The global weights, advanced window by window exactly as every replica advances them."""

    def __init__(self, manifest: Manifest, store: Store, exchange: Exchange, replica: Replica,
                 layouts: dict[str, TensorLayout]):
        self.manifest = manifest
        self.store = store
        self.exchange = exchange
        self.replica = replica
        self.layouts = layouts
        self.decisions = DecisionReader(store, manifest, exchange.acct)
        self.recent: deque[Decision] = deque(maxlen=max(EXPECTED_WINDOWS, ADAPT_WINDOWS + 1))
        """The last decisions applied, newest last (the schedule follows from them)."""
        self.jumps = 0
        """How often the follower restarted from a newer checkpoint."""
        self._next_jump_check = 0.0
        self._once = Once()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: lay.shape for n, lay in self.layouts.items()}

    def expectation(self, window: int) -> Expectation:
        """What a payload of ``window`` must be to count (any peer; ``gather`` names each)."""
        return Expectation.of_run(self.manifest.run_key, window, self.layouts, self.manifest.codec,
                                  cap=self.manifest.outer.max_payload_bytes, base_digest=self.replica.digest)

    # ------------------------------------------------------------------ the schedule
    def _previous(self, window: int, back: int) -> Decision | None:
        want = window - back
        for d in self.recent:
            if d.window == want:
                return d
        return self.decisions.read(want) if want >= 0 else None

    def deadline(self, window: int) -> float:
        """When ``window`` closes at the latest: ``window_length`` after the agreed close of
        the window before (``window_seconds`` after genesis for window 0; from now when the
        close before is unknown)."""
        run = self.manifest.run
        if window == 0:
            return run.genesis + run.window_seconds
        previous = self._previous(window, 1)
        return (previous.closed_at if previous else time.time()) + self.window_length(window)

    def window_length(self, window: int) -> float:
        """Seconds ``window`` may stay open: ``run.deadline_factor`` x the median length of
        the last ``ADAPT_WINDOWS`` windows, from their decisions' close times, within
        [``run.min_window_seconds``, ``run.window_seconds``]; ``window_seconds`` until three
        lengths are known."""
        run = self.manifest.run
        if run.deadline_factor <= 0 or window < 4:
            return run.window_seconds
        closes = [self._previous(window, back) for back in range(1, ADAPT_WINDOWS + 2) if window - back >= 0]
        lengths = [a.closed_at - b.closed_at for a, b in itertools.pairwise(closes) if a is not None and b is not None]
        if len(lengths) < 3:
            return run.window_seconds
        return min(run.window_seconds, max(run.min_window_seconds, run.deadline_factor * statistics.median(lengths)))

    def expected(self, window: int) -> set[str]:
        """Peers whose payloads let ``window`` close before its deadline: those counted in the
        last ``EXPECTED_WINDOWS`` windows; for the first window of a run, its listed peers."""
        peers: set[str] = set()
        for back in range(1, EXPECTED_WINDOWS + 1):
            decision = self._previous(window, back)
            if decision is not None:
                peers |= set(decision.peers)
        if window == 0:
            peers |= {peer_id_of(bytes.fromhex(k)) for k in self.manifest.run.peers}
        return peers

    # ------------------------------------------------------------------ following
    def next_decided(self) -> Decision | None:
        """The decision of the window we are at; None while it is open.

        When it is not decided but a verified checkpoint newer than us exists, the run is past
        our window (a decision certifies that checkpoint) and the window's objects were
        collected while we were away: restart from that checkpoint and look again. A follower
        at the open window never finds one; it looks every ``JUMP_CHECK_SECONDS`` at most.
        """
        while True:
            decision = self.decisions.read(self.replica.window)
            if decision is not None or time.monotonic() < self._next_jump_check:
                return decision
            self._next_jump_check = time.monotonic() + JUMP_CHECK_SECONDS
            if not self.jump_to_checkpoint():
                return None

    def jump_to_checkpoint(self) -> bool:
        """Move to the newest verified checkpoint if it is ahead of us; True if we moved."""
        found = self.verified_checkpoint(newer_than=self.replica.window)
        if found is None:
            return False
        if self.replica.window == 0:  # a fresh joiner: the normal way in
            log.info("starting from the verified checkpoint of window %d", found.window)
        else:
            log.warning("window %d is gone from the store; jumping to the checkpoint of window %d",
                        self.replica.window, found.window)
        self.replica = found
        self.recent.clear()
        self.jumps += 1
        return True

    def verified_checkpoint(self, newer_than: int = -1) -> Replica | None:
        """The newest checkpoint (after ``newer_than``) with the digest the run's decision of
        that window certifies; missing, bad or uncertified ones are skipped (logged)."""
        for window in checkpoint_windows(self.store, self.manifest.run.checkpoint_every, after=newer_than):
            decision = self.decisions.read(window)
            if decision is None:
                self._once.warn(paths.checkpoint_dir(window), "no decision certifies a checkpoint of this window")
                continue
            try:
                weights = fetch_checkpoint(self.store, window, decision.base_digest, self.shapes)
            except CheckpointError as exc:
                log.warning("skipping the checkpoint of window %d: %s", window, exc)
                continue
            return Replica(weights, window, device=self.replica.device)
        return None

    def gather(self, decision: Decision) -> Gathered:
        return self.exchange.gather(decision.included, self.expectation(decision.window))

    def advance(self, decision: Decision, gathered: Gathered,
                on_tensor: Callable[[str, torch.Tensor], None] | None = None) -> None:
        """Aggregate the decision's payloads and take the outer step, one tensor at a time
        (``on_tensor`` sees each aggregate tensor after it was applied)."""
        check_base(self.replica, decision)
        outer = self.manifest.outer
        for name, update in iter_aggregate(gathered.contributions(), self.layouts, rule=outer.rule, clip=outer.clip,
                                           reference=decision.value.standing):
            self.replica.step(name, update, outer.lr)
            if on_tensor is not None:
                on_tensor(name, update)
        self.replica.finish_window()
        self.applied(decision)

    def applied(self, decision: Decision) -> None:
        """Note that ``decision`` was applied to ``replica`` (the schedule follows from it)."""
        self.recent.append(decision)


def check_base(replica: Replica, decision: Decision) -> None:
    """Refuse to apply a window the network decided on other base weights than ours."""
    if decision.base_digest != replica.digest:
        raise ReplicaDiverged(
            f"window {decision.window}: the network's base digest {decision.base_digest.hex()[:12]} differs from "
            f"ours {replica.digest.hex()[:12]}; this replica is out of sync (remove its state to resync)"
        )



def replay_to_newest(manifest: Manifest, store: Store, genesis: Replica, layouts: dict[str, TensorLayout], *,
                     checkpoint_only: bool = False) -> tuple[Replica, int]:
    """The run's newest global weights, as a late joiner gets them: the newest verified
    checkpoint (or ``genesis``), then every decided window after it, replayed; with
    ``checkpoint_only`` nothing is replayed. Returns the weights and the windows replayed."""
    follower = Follower(manifest, store, Exchange(store, Identity.generate(), manifest.run_key, Accounting(),
                                                  addresses=address_policy(manifest)), genesis, layouts)
    follower.jump_to_checkpoint()
    replayed = 0
    while not checkpoint_only and (decision := follower.next_decided()) is not None:
        follower.advance(decision, follower.gather(decision))
        replayed += 1
    return follower.replica, replayed
