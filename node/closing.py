"""Closing windows: the node side of ``protocol/consensus.py``.

Replicas stay bit-identical only if every one of them aggregates exactly the same payloads,
and payloads reach different peers at different times. So what a window counts is decided
once, by the keys the manifest trusts (its closers), and everyone else reads the decision:

- ``DecisionReader`` (every node): a window's decision record, or, failing that, a quorum of
  precommits in its consensus records. Nothing signed by any other key decides anything.
- ``Closing`` (a node that is one of the closers): plays the Tendermint rounds through the
  store. As proposer it waits until the window may close (every expected peer published,
  or the deadline passed; with nobody expected, the deadline), then proposes the admitted
  payloads it verified, keeping a content-addressed copy of those served from peers' own
  buckets (a window without one valid admitted payload stays open for one more
  ``window_seconds``, for payloads an outage held up: strangers' junk does not close it).
  As voter it checks every proposal before voting for it (``judge``): our base digest; a
  close time that agrees with our clock, and not before the deadline unless every expected
  peer (at least one) is in; admission by
  the rules every closer recomputes (``node/admission.py``); every listed payload fetched
  by hash and decoded; and nothing valid and on time left out, where the store's own clock
  says what was on time. Once decided it writes a decision record for readers.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from node import admission
from node.accounting import Accounting
from node.exchange import FETCH_WORKERS, Exchange
from node.follow import ConsensusLog, DecisionReader, Once
from protocol import paths
from protocol.consensus import (
    MAX_INCLUDED,
    MAX_PROPOSAL_BYTES,
    MAX_VOTE_BYTES,
    PROPOSAL,
    CloseValue,
    Decision,
    Included,
    Participant,
    Publish,
    Timeouts,
    sign_decision,
    sign_proposal,
    sign_vote,
)
from protocol.errors import PayloadRejected, PayloadUnavailable
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores.base import ObjectInfo, Store
from protocol.wire import Expectation

log = logging.getLogger(__name__)

KEEP_WINDOWS = 2
"""Windows after a decision during which we keep our records of it in place."""
KEEP_SECONDS = 2.0

_CAPS = {PROPOSAL: MAX_PROPOSAL_BYTES, "prevote": MAX_VOTE_BYTES, "precommit": MAX_VOTE_BYTES}


def clock_skew(manifest: Manifest) -> float:
    """Seconds two honest clocks (and a store's) may disagree by."""
    return max(2.0, manifest.run.window_seconds / 10)


def timeouts(manifest: Manifest) -> Timeouts:
    """Round timeouts, scaled to the window length."""
    ws = manifest.run.window_seconds
    return Timeouts(base=max(2.0, ws / 20), delta=max(1.0, ws / 40), propose_grace=max(3.0, ws / 10))


@dataclass
class _Candidate:
    """A present payload, verified once per listing of it."""

    listed: tuple[int, float]
    included: Included | None
    reason: str
    mirror: bytes | None = None
    """Its bytes, when only the peer's own bucket serves them (the proposer keeps a copy)."""


@dataclass
class _Window:
    participant: Participant
    log: ConsensusLog
    validity: dict[bytes, bool] = field(default_factory=dict)
    proposal: CloseValue | None = None
    candidates: dict[str, _Candidate] = field(default_factory=dict)
    mine: dict[str, bytes] = field(default_factory=dict)
    """Our records of this window, by key: kept in place for a few windows."""
    kept_at: float = 0.0


class Closing:
    """This node's part in deciding windows, when its key is one of the run's closers."""

    def __init__(self, store: Store, manifest: Manifest, identity: Identity, exchange: Exchange,
                 accounting: Accounting, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.manifest = manifest
        self.identity = identity
        self.me = identity.public_key.hex()
        if self.me not in manifest.closers:
            raise ValueError("this node's key is not one of the run's closers")
        self.exchange = exchange
        self.acct = accounting
        self.clock = clock
        self.skew = clock_skew(manifest)
        self.once = Once()
        self.reader = DecisionReader(store, manifest, accounting)
        self._windows: dict[int, _Window] = {}

    def poll(self, window: int, expect: Expectation, *, deadline: float, expected: set[str]) -> Decision | None:
        """One step of the window's rounds: read what is new, judge new proposals, propose
        when it is our turn and the window may close, vote, and return the decision once
        there is one (after writing our decision record)."""
        now = self.clock()
        st = self._state(window, deadline, now)
        for kept in self._windows.values():
            self._keep_mine(kept, now)
        previous_poll = st.log.previous_poll
        seen = st.log.refresh(now)
        if seen.certified is None and (record := self.reader.read_record(window)) is not None:
            seen.add_decision(record)  # decided by others while our copies of their votes were lost
        for versions in seen.proposals.values():
            for vid, proposal in versions.items():
                if vid in st.validity:
                    continue
                reason = self.judge(st, proposal.value, expect, deadline=deadline, expected=expected,
                                    first_seen=st.log.first_seen.get(vid, now), previous_poll=previous_poll)
                if reason is None:
                    st.validity[vid] = True
                elif reason:
                    st.validity[vid] = False
                    log.warning("window %d: voting against the proposal of round %d: %s", window, proposal.round, reason)
        part = st.participant
        value = st.proposal
        if value is None and part.proposer(part.round) == self.me and (PROPOSAL, part.round) not in part.sent:
            value = st.proposal = self.propose(st, window, expect, deadline=deadline, expected=expected)
            if value is not None:
                st.validity[value.id] = True
        for action in part.step(seen, st.validity, value, self.clock()):
            self._publish(st, action)
        if part.decision is None:
            return None
        raws = seen.precommit_records(part.decision)
        if len(raws) >= self.manifest.quorum:  # decided from votes we hold (not only from a record)
            st.mine[paths.decision_key(window, self.identity.peer_id)] = sign_decision(
                self.identity, self.manifest.run_key, window, part.decision.value, raws)
            st.kept_at = 0.0
            self._keep_mine(st, now)
        self._windows = {w: s for w, s in self._windows.items() if w >= window - KEEP_WINDOWS}
        return part.decision

    def _keep_mine(self, st: _Window, now: float) -> None:
        """Put our records back where someone overwrote or deleted them (only we can sign
        them; readers that missed them would otherwise wait on a quorum that is gone).
        Checked every ``KEEP_SECONDS`` for the last ``KEEP_WINDOWS`` windows."""
        if not st.mine or now < st.kept_at + KEEP_SECONDS:
            return
        st.kept_at = now
        window = st.log.window
        listed = {o.key: o.size for o in self.store.list(paths.consensus_prefix(window))}
        listed.update({o.key: o.size for o in self.store.list(paths.decisions_prefix(window))})
        for key, blob in st.mine.items():
            if listed.get(key) != len(blob):
                self.store.put(key, blob)

    def _state(self, window: int, deadline: float, now: float) -> _Window:
        if window not in self._windows:
            part = Participant(window, self.me, self.manifest.closers, self.manifest.quorum, deadline=deadline,
                               timeouts=timeouts(self.manifest), now=now)
            clog = ConsensusLog(self.store, self.manifest, window, self.acct, self.once)
            part.restore(clog.refresh(now))  # a restarted closer never votes twice in a round
            self._windows[window] = _Window(part, clog)
        return self._windows[window]

    def _publish(self, st: _Window, action: Publish) -> None:
        run, window = self.manifest.run_key, st.log.window
        if action.kind == PROPOSAL:
            assert action.value is not None
            blob = sign_proposal(self.identity, run, window, action.round, action.value, action.valid_round)
            log.info("window %d: proposing %d payloads in round %d", window, len(action.value.included), action.round)
        else:
            blob = sign_vote(self.identity, run, action.kind, window, action.round, action.value_id)
        # Our own key: a plain put replaces whatever anyone else wrote there first.
        key = paths.consensus_key(window, action.round, action.kind, self.identity.peer_id)
        self.store.put(key, blob)
        st.mine[key] = blob
        self.acct.bytes_up += len(blob)

    # ------------------------------------------------------------------ proposing
    def _verify_present(self, st: _Window, window: int, expect: Expectation, allowed: frozenset[str],
                        standing: frozenset[str], known: frozenset[str] = frozenset()) -> dict[str, ObjectInfo]:
        """Fetch and verify every admitted present payload not verified in its current form;
        the admitted ones present."""
        listing = self.exchange.present(window, expect)
        present = {p: o for p, o in listing.items() if p in allowed}
        todo = [p for p, o in present.items() if p not in known
                and (p not in st.candidates or st.candidates[p].listed != (o.size, o.modified))]

        def check(peer: str) -> _Candidate:
            info = present[peer]
            try:
                _, data = self.exchange.verify(peer, expect)
            except (PayloadUnavailable, PayloadRejected) as exc:
                return _Candidate((info.size, info.modified), None, str(exc))
            assert data is not None
            inc = Included(peer, hashlib.sha256(data).hexdigest(), len(data), peer in standing)
            from_bucket = paths.peer_of_announce_key(info.key) is not None
            return _Candidate((info.size, info.modified), inc, "", data if from_bucket else None)

        with ThreadPoolExecutor(max_workers=max(1, min(FETCH_WORKERS, len(todo)))) as pool:
            for peer, cand in zip(todo, pool.map(check, todo)):
                st.candidates[peer] = cand
        return present

    def propose(self, st: _Window, window: int, expect: Expectation, *, deadline: float,
                expected: set[str]) -> CloseValue | None:
        """Our value for the window once it may close; None while we wait for expected peers."""
        adm = admission.choose(self.manifest, self.store, window)
        present = self._verify_present(st, window, expect, adm.allowed, adm.standing)
        good = {p: st.candidates[p] for p in present if st.candidates[p].included is not None}
        complete = bool(expected) and expected <= good.keys()  # nobody expected: nothing to close early on
        if not complete and self.clock() < deadline:
            return None
        if not good and self.clock() < deadline + self.manifest.run.window_seconds:
            return None  # an empty window would only move the clock: give late payloads (an outage) a while
        chosen = _cap(self.manifest, {p: c.included for p, c in good.items()}, present, self.store.trusted_clock)
        for peer in chosen:
            cand = good[peer]
            if cand.mirror is not None:  # served from the peer's own bucket: keep a copy readers can fetch by hash
                self.store.put_if_absent(paths.blob_key(window, cand.included.sha256), cand.mirror)
        assert expect.base_digest is not None
        return CloseValue(expect.base_digest, round(self.clock(), 3), adm.scores_window, adm.scores_from,
                          tuple(sorted((good[p].included for p in chosen), key=lambda i: i.peer_id)))

    # ------------------------------------------------------------------ voting
    def judge(self, st: _Window, value: CloseValue, expect: Expectation, *, deadline: float, expected: set[str],
              first_seen: float, previous_poll: float) -> str | None:
        """Why we vote against ``value`` ("" = cannot tell yet: ask again next poll), or None."""
        if value.base_digest != expect.base_digest:
            return f"its base digest {value.base_digest.hex()[:12]} is not ours {expect.base_digest.hex()[:12]}"
        if value.closed_at > first_seen + self.skew:
            return f"it claims to close {value.closed_at - first_seen:.1f} s in the future"
        if previous_poll and value.closed_at < previous_poll - self.skew:
            return f"it claims to have closed {previous_poll - value.closed_at:.1f} s before it appeared"
        if value.closed_at < deadline - self.skew and not (expected and expected <= set(value.peers)):
            missing = sorted(expected - set(value.peers))
            return (f"it closes {deadline - value.closed_at:.1f} s early without the expected peers {missing[:4]}"
                    if missing else f"it closes {deadline - value.closed_at:.1f} s early though no peer is expected")
        reason = admission.check(self.manifest, self.store, st.log.window, value)
        if reason is not None:
            return reason
        for inc in value.included:
            try:
                self.exchange.verify(inc.peer_id, expect, inc.sha256)
            except PayloadUnavailable as exc:
                log.info("window %d: cannot judge the proposal yet: %s", st.log.window, exc)
                return ""
            except PayloadRejected as exc:
                return f"it counts a payload that fails our checks: {exc}"
        return self._left_out(st, value, expect, deadline)

    def _left_out(self, st: _Window, value: CloseValue, expect: Expectation, deadline: float) -> str | None:
        """A valid admitted payload, on time by the store's own clock, that the value leaves
        out although it had room for it (only where the store's clock is trusted)."""
        if not self.store.trusted_clock:
            return None
        adm = admission.choose(self.manifest, self.store, st.log.window)
        listed = frozenset(value.peers)  # verified by hash already
        present = self._verify_present(st, st.log.window, expect, adm.allowed, adm.standing, known=listed)
        on_time = {p: st.candidates[p].included for p, o in present.items()
                   if p not in listed and o.modified <= deadline - self.skew and st.candidates[p].included}
        if not on_time:
            return None
        everyone = {i.peer_id: i for i in value.included} | on_time
        fits = set(_cap(self.manifest, everyone, present, True))
        left = sorted(p for p in on_time if p in fits)
        return f"it leaves out the on-time payloads of {left[:4]}" if left else None


def _cap(manifest: Manifest, included: dict[str, Included], present: dict[str, ObjectInfo],
         trusted_clock: bool) -> list[str]:
    """Which peers a window counts when there are more than it may: every peer with standing,
    then newcomers (up to ``max_newcomers`` in a run with validators) in upload order by the
    store's clock (by peer id where the clock is the writer's), up to ``MAX_INCLUDED``."""

    def order(peer: str) -> tuple:
        info = present.get(peer)
        return (info.modified if (trusted_clock and info) else 0.0, peer)

    standing = sorted((p for p, i in included.items() if i.standing), key=order)
    newcomers = sorted((p for p, i in included.items() if not i.standing), key=order)
    if manifest.validators.keys:
        newcomers = newcomers[: manifest.validators.max_newcomers]
    return (standing + newcomers)[:MAX_INCLUDED]

