"""Deciding what closes a window: Tendermint rounds between the run's closers, through the store.

Who may decide. Only keys the manifest trusts: its validators (a public run), or, in a run
without validators, its listed peers (``Manifest.closers``). A decision needs ``quorum``
signatures of those keys (``Manifest.quorum``) on the same value in the same round; nothing
anyone else writes can decide, move or split a window.

What is decided, per window, is a ``CloseValue``: the base digest every replica must be at,
the time the proposer closed the window (the next window's deadline counts from it), the
window of validator scores the admission followed, and the payloads that count, each by
peer, SHA-256 and size, with a flag for peers with standing (robust statistics reference
only those).

How. The algorithm is Tendermint's (Buchman, Kwon, Milosevic, "The latest gossip on BFT
consensus", 2018, Algorithm 1): rounds of propose, prevote, precommit, with locks that keep
a value once a quorum prevoted it. Messages are small signed records
(``protocol/records.py``) in the store; every participant lists and reads them each poll,
so no message is ever lost, and the rules are evaluated level-triggered on everything seen
so far (``Participant.step``). This module is pure: it decides what to publish and when;
``node/closing.py`` does the I/O and judges whether a proposed value is valid.

Safety: two different values can be decided in one window only if at least
``2 * quorum - n`` closers signed both, i.e. broke the protocol. With ``n = 3f + 1`` closers
and ``quorum = 2f + 1`` that is more than ``f`` hostile closers (BFT); with a majority
quorum it holds as long as no closer equivocates (crash faults only). Liveness: a window is
decided once ``quorum`` honest closers are online and see each other's records.

Readers that are not closers need only one object: a ``decision`` record bundles the value
with the ``quorum`` precommit records that decided it (``read_decision`` checks them all).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import msgpack

from protocol.errors import RecordRejected
from protocol.identity import Identity
from protocol.paths import is_peer_id
from protocol.records import require, short, sign_record, verify_record

PROPOSAL, PREVOTE, PRECOMMIT, DECISION = "proposal", "prevote", "precommit", "decision"
KINDS = (PROPOSAL, PREVOTE, PRECOMMIT, DECISION)
NIL = b""
"""The value id of a vote for nothing (Tendermint's nil)."""
MAX_INCLUDED = 4096
"""Payloads one window may count; a proposal listing more is invalid."""
MAX_ROUND = 1 << 16
MAX_VALIDATORS = 64
MAX_VOTE_BYTES = 2048
MAX_PROPOSAL_BYTES = 1 << 20
MAX_DECISION_BYTES = MAX_PROPOSAL_BYTES + 64 * MAX_VOTE_BYTES
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class Included:
    """One payload a window counts."""

    peer_id: str
    sha256: str
    size: int
    standing: bool = False
    """The peer has standing (listed by the manifest, or rated by a majority of validators):
    median clipping is referenced to these peers' norms only."""


@dataclass(frozen=True)
class CloseValue:
    """What a window's decision fixes."""

    base_digest: bytes
    """Digest of the global weights at the start of the window (every payload's base)."""
    closed_at: float
    """Unix seconds at which the proposer closed the window; checked by every closer against
    its own clock before it votes. The next window's deadline counts from it."""
    scores_window: int
    """Window of the validator scores the admission followed; -1 when none were used."""
    scores_from: tuple[str, ...]
    """Peer ids of the validators whose records of ``scores_window`` the admission combined
    (a majority of all trusted validators), sorted: every closer checks the same records."""
    included: tuple[Included, ...]
    """Sorted by peer id, unique."""

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(i.peer_id for i in self.included)

    @property
    def standing(self) -> frozenset[str]:
        """Counted peers with standing: the reference of median clipping."""
        return frozenset(i.peer_id for i in self.included if i.standing)

    def to_wire(self) -> dict:
        return {
            "base": self.base_digest,
            "closed_at": float(self.closed_at),
            "scores": int(self.scores_window),
            "scores_from": list(self.scores_from),
            "included": [[i.peer_id, i.sha256, i.size, i.standing] for i in self.included],
        }

    @property
    def id(self) -> bytes:
        """SHA-256 of the value's canonical msgpack form: what votes name."""
        return hashlib.sha256(msgpack.packb(self.to_wire(), use_bin_type=True)).digest()

    @classmethod
    def from_wire(cls, raw: object) -> CloseValue:
        """Parse strictly: exact keys and types, bounded sizes, sorted unique peers."""
        keys = {"base", "closed_at", "scores", "scores_from", "included"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise RecordRejected(f"close value must have exactly {sorted(keys)}, got {_keys(raw)}")
        base = require(raw, "base", bytes, "close value")
        closed_at = require(raw, "closed_at", float, "close value")
        scores = require(raw, "scores", int, "close value")
        scores_from = require(raw, "scores_from", list, "close value")
        rows = require(raw, "included", list, "close value")
        if len(base) != 32 or not math.isfinite(closed_at) or closed_at < 0 or scores < -1:
            raise RecordRejected("close value has a malformed base digest, closed_at or scores window")
        if (len(scores_from) > MAX_VALIDATORS or not all(is_peer_id(v) for v in scores_from)
                or scores_from != sorted(set(scores_from)) or (scores == -1) != (not scores_from)):
            raise RecordRejected("close value's scores_from must be sorted unique validator ids, empty iff scores is -1")
        if len(rows) > MAX_INCLUDED:
            raise RecordRejected(f"close value lists {len(rows)} payloads, over the cap of {MAX_INCLUDED}")
        included = []
        for row in rows:
            if (
                not isinstance(row, list) or len(row) != 4 or not is_peer_id(row[0]) or not isinstance(row[1], str)
                or len(row[1]) != 64 or not set(row[1]) <= _HEX or type(row[2]) is not int or row[2] < 0
                or type(row[3]) is not bool
            ):
                raise RecordRejected(f"close value has a malformed included row: {short(row)}")
            included.append(Included(row[0], row[1], row[2], row[3]))
        peers = [i.peer_id for i in included]
        if peers != sorted(set(peers)):
            raise RecordRejected("close value's payloads are not sorted by peer and unique")
        return cls(base, closed_at, scores, tuple(scores_from), tuple(included))


def _keys(raw: object) -> object:
    return sorted(map(str, raw))[:8] if isinstance(raw, dict) else type(raw).__name__


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Proposal:
    window: int
    round: int
    value: CloseValue
    valid_round: int
    """-1, or the round in which a quorum prevoted this value (Tendermint's validRound)."""
    signer: str
    """Hex public key of the proposer."""

    @property
    def value_id(self) -> bytes:
        return self.value.id


@dataclass(frozen=True)
class Vote:
    kind: str
    """PREVOTE or PRECOMMIT."""
    window: int
    round: int
    value_id: bytes
    """``CloseValue.id``, or ``NIL``."""
    signer: str
    """Hex public key of the voter."""
    raw: bytes = field(default=b"", compare=False, repr=False)
    """The signed record, kept so a decision can carry it."""


@dataclass(frozen=True)
class Decision:
    window: int
    value: CloseValue
    round: int
    signers: frozenset[str]
    """Hex public keys whose precommits decided it."""

    @property
    def peers(self) -> tuple[str, ...]:
        return self.value.peers

    @property
    def included(self) -> tuple[Included, ...]:
        return self.value.included

    @property
    def closed_at(self) -> float:
        return self.value.closed_at

    @property
    def base_digest(self) -> bytes:
        return self.value.base_digest


def sign_proposal(identity: Identity, run: str, window: int, round_: int, value: CloseValue, valid_round: int) -> bytes:
    return sign_record(identity, PROPOSAL, run,
                       {"window": window, "round": round_, "value": value.to_wire(), "valid_round": valid_round})


def sign_vote(identity: Identity, run: str, kind: str, window: int, round_: int, value_id: bytes) -> bytes:
    if kind not in (PREVOTE, PRECOMMIT):
        raise ValueError(f"not a vote kind: {kind!r}")
    return sign_record(identity, kind, run, {"window": window, "round": round_, "value": value_id})


def sign_decision(identity: Identity, run: str, window: int, value: CloseValue, precommits: Iterable[bytes]) -> bytes:
    return sign_record(identity, DECISION, run, {"window": window, "value": value.to_wire(),
                                                 "precommits": list(precommits)})


def _trusted(public_key: bytes, closers: Collection[str], kind: str) -> str:
    key = public_key.hex()
    if key not in closers:
        raise RecordRejected(f"{kind} record is signed by a key the run does not trust to close windows")
    return key


def _window_round(body: dict, kind: str, window: int) -> int:
    got = require(body, "window", int, kind)
    if got != window:
        raise RecordRejected(f"{kind} record is for window {got}, expected {window}")
    round_ = require(body, "round", int, kind)
    if not 0 <= round_ < MAX_ROUND:
        raise RecordRejected(f"{kind} record round {round_} is out of range")
    return round_


def read_proposal(data: bytes, *, run: str, window: int, closers: Collection[str]) -> Proposal:
    """Verify a proposal record: signature, run, window, a trusted signer, a strict value."""
    rec = verify_record(data, kind=PROPOSAL, run=run, max_bytes=MAX_PROPOSAL_BYTES)
    signer = _trusted(rec.public_key, closers, PROPOSAL)
    if set(rec.body) != {"kind", "run", "window", "round", "value", "valid_round"}:
        raise RecordRejected(f"proposal record has fields {_keys(rec.body)}")
    round_ = _window_round(rec.body, PROPOSAL, window)
    valid_round = require(rec.body, "valid_round", int, PROPOSAL)
    if not -1 <= valid_round < round_:
        raise RecordRejected(f"proposal valid_round {valid_round} is not in [-1, {round_})")
    return Proposal(window, round_, CloseValue.from_wire(rec.body["value"]), valid_round, signer)


def read_vote(data: bytes, *, run: str, kind: str, window: int, closers: Collection[str]) -> Vote:
    """Verify a prevote or precommit record."""
    rec = verify_record(data, kind=kind, run=run, max_bytes=MAX_VOTE_BYTES)
    signer = _trusted(rec.public_key, closers, kind)
    if set(rec.body) != {"kind", "run", "window", "round", "value"}:
        raise RecordRejected(f"{kind} record has fields {_keys(rec.body)}")
    round_ = _window_round(rec.body, kind, window)
    value_id = require(rec.body, "value", bytes, kind)
    if len(value_id) not in (0, 32):
        raise RecordRejected(f"{kind} record names a value id of {len(value_id)} bytes")
    return Vote(kind, window, round_, value_id, signer, data)


def read_decision(data: bytes, *, run: str, window: int, closers: Collection[str], quorum: int) -> Decision:
    """Verify a decision record: ``quorum`` distinct trusted precommits of one round for its value.

    The record's own signer only carried it; every precommit inside is verified on its own.
    """
    rec = verify_record(data, kind=DECISION, run=run, max_bytes=MAX_DECISION_BYTES)
    if set(rec.body) != {"kind", "run", "window", "value", "precommits"}:
        raise RecordRejected(f"decision record has fields {_keys(rec.body)}")
    got = require(rec.body, "window", int, DECISION)
    if got != window:
        raise RecordRejected(f"decision record is for window {got}, expected {window}")
    value = CloseValue.from_wire(rec.body["value"])
    raws = require(rec.body, "precommits", list, DECISION)
    if len(raws) > len(closers) or not all(isinstance(r, bytes) for r in raws):
        raise RecordRejected("decision record carries more precommits than there are closers, or non-records")
    votes = [read_vote(r, run=run, kind=PRECOMMIT, window=window, closers=closers) for r in raws]
    rounds = {v.round for v in votes}
    signers = frozenset(v.signer for v in votes)
    if len(rounds) != 1 or any(v.value_id != value.id for v in votes) or len(signers) < quorum:
        raise RecordRejected(
            f"decision record does not carry {quorum} precommits of one round for its value "
            f"({len(signers)} signers, rounds {sorted(rounds)[:4]})"
        )
    return Decision(window, value, rounds.pop(), signers)


# ---------------------------------------------------------------------------- what was seen


def proposer(window: int, round_: int, closers: Collection[str]) -> str:
    """Who proposes in a round: round-robin over the sorted closers, shifted by the window."""
    ordered = sorted(closers)
    return ordered[(window + round_) % len(ordered)]


@dataclass
class Seen:
    """Every valid consensus record of one window seen so far. First vote per
    (kind, round, signer) wins: a closer that overwrites its own vote does not change ours.
    Every version of a round's proposal is kept (a hostile proposer may write two); the
    first one seen is the one we vote on, any one may be decided by a quorum."""

    window: int
    closers: Collection[str]
    proposals: dict[int, dict[bytes, Proposal]] = field(default_factory=dict)
    """Round -> value id -> proposal, in the order seen; only from that round's proposer."""
    votes: dict[tuple[str, int], dict[str, Vote]] = field(default_factory=dict)
    """(kind, round) -> signer -> vote."""
    certified: Decision | None = None
    """A verified decision record (``read_decision``): decided, whatever votes we kept."""

    def add_decision(self, d: Decision) -> None:
        if d.window == self.window and self.certified is None:
            self.certified = d

    def add_proposal(self, p: Proposal) -> bool:
        """Keep ``p`` if it is a new proposal of its round by that round's proposer."""
        if p.window != self.window or p.signer != proposer(self.window, p.round, self.closers):
            return False
        return self.proposals.setdefault(p.round, {}).setdefault(p.value_id, p) is p

    def first_proposal(self, round_: int) -> Proposal | None:
        """The first proposal seen in ``round_``: the one we vote on."""
        versions = self.proposals.get(round_)
        return next(iter(versions.values())) if versions else None

    def add_vote(self, v: Vote) -> bool:
        """Keep ``v`` if it is the signer's first vote of its kind in its round."""
        if v.window != self.window:
            return False
        return self.votes.setdefault((v.kind, v.round), {}).setdefault(v.signer, v) is v

    def count(self, kind: str, round_: int, value_id: bytes | None = None) -> int:
        """Votes of ``kind`` in ``round_`` for ``value_id`` (any value when None)."""
        votes = self.votes.get((kind, round_), {})
        return len(votes) if value_id is None else sum(1 for v in votes.values() if v.value_id == value_id)

    def signers_in(self, round_: int) -> set[str]:
        out = {v.signer for (_, r), votes in self.votes.items() if r == round_ for v in votes.values()}
        out.update(p.signer for p in self.proposals.get(round_, {}).values())
        return out

    def rounds(self) -> list[int]:
        return sorted({r for _, r in self.votes} | set(self.proposals))

    def decided(self, quorum: int, validity: Mapping[bytes, bool] | None) -> Decision | None:
        """A verified decision record, or a value with a proposal and ``quorum`` precommits in
        one round that we find valid (``validity`` None: a reader that is no closer trusts
        the quorum's checks); None while neither exists.

        A decision record settles the window even if our own copy of a hostile closer's vote
        differs from the one the deciders counted (it carries the precommits it counted).
        """
        if self.certified is not None:
            return self.certified
        for r, versions in sorted(self.proposals.items()):
            for vid, p in versions.items():
                votes = [v for v in self.votes.get((PRECOMMIT, r), {}).values() if v.value_id == vid]
                if len(votes) >= quorum and (validity is None or validity.get(vid, False)):
                    return Decision(p.window, p.value, r, frozenset(v.signer for v in votes))
        return None

    def prevoted(self, round_: int, quorum: int) -> Proposal | None:
        """A proposal of ``round_`` that ``quorum`` prevoted, if any (Tendermint's polka)."""
        for vid, p in self.proposals.get(round_, {}).items():
            if self.count(PREVOTE, round_, vid) >= quorum:
                return p
        return None

    def precommit_records(self, decision: Decision) -> list[bytes]:
        votes = self.votes.get((PRECOMMIT, decision.round), {})
        return [v.raw for v in votes.values() if v.value_id == decision.value.id]


# ---------------------------------------------------------------------------- the state machine


@dataclass(frozen=True)
class Timeouts:
    """Seconds each step waits before giving up on the round (growing by ``delta`` per round,
    so that rounds eventually last long enough for honest closers to hear each other)."""

    base: float = 3.0
    delta: float = 2.0
    propose_grace: float = 5.0
    """How long after the window's deadline closers wait for the proposer of round 0."""

    def step(self, round_: int) -> float:
        return self.base + self.delta * round_


@dataclass(frozen=True)
class Publish:
    """An action: sign and publish this record."""

    kind: str
    round: int
    value: CloseValue | None = None
    """The proposed value (PROPOSAL)."""
    value_id: bytes = NIL
    """What a vote names (PREVOTE, PRECOMMIT)."""
    valid_round: int = -1


class Participant:
    """One closer's Tendermint state for one window (Algorithm 1, level-triggered).

    Each poll the caller passes everything it has seen (``Seen``), whether each proposed
    value is valid by its own checks (a value id missing from ``validity`` is not judged
    yet: the participant waits for it until the step times out), and, when it is this
    round's proposer and the window may be closed, the value it would propose. ``step`` returns the records to publish, in
    order; ``decision`` is set once a value is decided.
    """

    PROPOSE, PREVOTE_STEP, PRECOMMIT_STEP = 0, 1, 2

    def __init__(self, window: int, me: str, closers: Collection[str], quorum: int, *, deadline: float,
                 timeouts: Timeouts, now: float):
        if me not in closers:
            raise ValueError("a participant must be one of the closers")
        if not 1 <= quorum <= len(closers):
            raise ValueError(f"quorum {quorum} must be between 1 and the {len(closers)} closers")
        self.window = window
        self.me = me
        self.closers = sorted(closers)
        self.quorum = quorum
        self.deadline = deadline
        self.timeouts = timeouts
        self.round = -1
        self.step_ = self.PROPOSE
        self.round_started = now
        self.locked: tuple[int, bytes] = (-1, NIL)
        self.valid: tuple[int, CloseValue | None] = (-1, None)
        self.decision: Decision | None = None
        self.sent: dict[tuple[str, int], Publish] = {}
        self._timers: dict[tuple[str, int], float] = {}
        self._valid_set_in: set[int] = set()
        self._start_round(0, now)

    def proposer(self, round_: int) -> str:
        return proposer(self.window, round_, self.closers)

    def restore(self, seen: Seen) -> None:
        """Take our own records found in the store as sent (a restarted closer never votes
        twice in one round), and re-derive our lock from our latest precommit."""
        for (kind, r), votes in seen.votes.items():
            if self.me in votes:
                v = votes[self.me]
                self.sent.setdefault((kind, r), Publish(kind, r, value_id=v.value_id))
                if kind == PRECOMMIT and v.value_id != NIL and r > self.locked[0]:
                    self.locked = (r, v.value_id)
        for r, versions in seen.proposals.items():
            for p in versions.values():
                if p.signer == self.me:
                    self.sent.setdefault((PROPOSAL, r), Publish(PROPOSAL, r, p.value, valid_round=p.valid_round))

    # -- the rules -------------------------------------------------------------------------

    def step(self, seen: Seen, validity: Mapping[bytes, bool], proposal: CloseValue | None, now: float) -> list[Publish]:
        """Apply every rule that holds on what was seen; the records to publish now."""
        out: list[Publish] = []
        while self.decision is None and self._once(seen, validity, proposal, now, out):
            pass
        return out

    def _once(self, seen: Seen, validity: Mapping[bytes, bool], proposal: CloseValue | None, now: float,
              out: list[Publish]) -> bool:
        """One pass over the rules; True if the state changed (so another pass may apply)."""
        decided = seen.decided(self.quorum, None)  # a quorum's precommits: at least one honest closer checked it
        if decided is not None:
            self.decision = decided
            return True
        # Skip ahead when enough others are in a later round (n - q + 1: at least one honest).
        later = [r for r in seen.rounds() if r > self.round
                 and len(seen.signers_in(r)) >= len(self.closers) - self.quorum + 1]
        if later:
            self._start_round(max(later), now)
            return True
        r = self.round
        q = self.quorum
        p = seen.first_proposal(r)
        if self.step_ == self.PROPOSE:
            if self.proposer(r) == self.me and (PROPOSAL, r) not in self.sent:
                valid_round, valid_value = self.valid
                if valid_value is not None:
                    self._send(out, Publish(PROPOSAL, r, valid_value, valid_round=valid_round))
                elif proposal is not None:
                    self._send(out, Publish(PROPOSAL, r, proposal, valid_round=-1))
            if p is not None and (valid := validity.get(p.value_id)) is not None:
                vid = p.value_id
                if p.valid_round == -1:
                    ok = valid and (self.locked[0] == -1 or self.locked[1] == vid)
                    return self._prevote(out, vid if ok else NIL)
                if seen.count(PREVOTE, p.valid_round, vid) >= q:
                    ok = valid and (self.locked[0] <= p.valid_round or self.locked[1] == vid)
                    return self._prevote(out, vid if ok else NIL)
            if now >= self._propose_timeout(r):
                return self._prevote(out, NIL)
            return False
        polka = seen.prevoted(r, q) if self.step_ >= self.PREVOTE_STEP and r not in self._valid_set_in else None
        if polka is not None and validity.get(polka.value_id, False):
            self._valid_set_in.add(r)
            self.valid = (r, polka.value)
            if self.step_ == self.PREVOTE_STEP:
                self.locked = (r, polka.value_id)
                return self._precommit(out, polka.value_id)
            return True
        if self.step_ == self.PREVOTE_STEP:
            if seen.count(PREVOTE, r, NIL) >= q:
                return self._precommit(out, NIL)
            if seen.count(PREVOTE, r) >= q and self._timer(PREVOTE, r, now) <= now:
                return self._precommit(out, NIL)
            return False
        if seen.count(PRECOMMIT, r) >= q and self._timer(PRECOMMIT, r, now) <= now:
            self._start_round(r + 1, now)
            return True
        return False

    def _propose_timeout(self, round_: int) -> float:
        """Round 0 waits for its proposer until the window's deadline and a grace (the proposer
        legitimately waits for the window to complete); later rounds wait a growing step."""
        floor = self.deadline + self.timeouts.propose_grace
        return max(floor, self.round_started + self.timeouts.step(round_))

    def _timer(self, kind: str, round_: int, now: float) -> float:
        return self._timers.setdefault((kind, round_), now + self.timeouts.step(round_))

    def _start_round(self, round_: int, now: float) -> None:
        self.round, self.step_, self.round_started = round_, self.PROPOSE, now

    def _send(self, out: list[Publish], action: Publish) -> None:
        key = (action.kind, action.round)
        if key not in self.sent:  # one record per kind and round, ever
            self.sent[key] = action
            out.append(action)

    def _prevote(self, out: list[Publish], value_id: bytes) -> bool:
        self._send(out, Publish(PREVOTE, self.round, value_id=value_id))
        self.step_ = self.PREVOTE_STEP
        return True

    def _precommit(self, out: list[Publish], value_id: bytes) -> bool:
        self._send(out, Publish(PRECOMMIT, self.round, value_id=value_id))
        self.step_ = self.PRECOMMIT_STEP
        return True


def default_quorum(closers: int, byzantine: bool) -> int:
    """More than two thirds of the closers (tolerates f < n/3 hostile ones), or a majority
    (tolerates crashes, not equivocation)."""
    return (2 * closers) // 3 + 1 if byzantine else closers // 2 + 1
