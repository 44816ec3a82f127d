"""Tendermint rounds between a run's closers (protocol/consensus.py), simulated.

A simulator plays the store: every record a closer publishes becomes visible to each other
closer after its own random delay, and a hostile closer can equivocate (two versions of one
record: each reader sees whichever it read first). Properties checked over many seeds:

- agreement: honest closers never decide different values (with at most f hostile closers
  for a two-thirds quorum, none for a majority quorum);
- validity: a decided value was proposed, and is valid by every honest closer's checks;
- termination: with at least ``quorum`` honest closers online and bounded delays, everyone
  decides, also when the first proposers are dead or propose invalid values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from protocol.consensus import (
    NIL,
    PRECOMMIT,
    PREVOTE,
    PROPOSAL,
    CloseValue,
    Decision,
    Included,
    Participant,
    Proposal,
    Seen,
    Timeouts,
    Vote,
    default_quorum,
    proposer,
    read_decision,
    read_proposal,
    read_vote,
    sign_decision,
    sign_proposal,
    sign_vote,
)
from protocol.errors import RecordRejected
from protocol.identity import Identity

WINDOW = 7
RUN = "consensus-test"


def _value(tag: float) -> CloseValue:
    return CloseValue(b"\x01" * 32, 1000.0 + tag, -1, (), (Included("a" * 24, "0" * 64, 10, True),))


@dataclass
class Message:
    item: Proposal | Vote
    arrives: dict[str, float]
    """Receiver -> simulated time it becomes visible."""


@dataclass
class Sim:
    n: int
    quorum: int
    crashed: set[int] = field(default_factory=set)
    equivocators: set[int] = field(default_factory=set)
    invalid_from: set[int] = field(default_factory=set)
    """Closers whose proposals honest closers find invalid."""
    delay: tuple[float, float] = (0.05, 0.5)
    """Range of the time a record takes to become visible to another closer."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    seed: int = 0

    def run(self, until: float = 300.0, dt: float = 0.1) -> dict[str, bytes]:
        rng = random.Random(self.seed)
        names = [f"{i:02d}" for i in range(self.n)]
        honest = [names[i] for i in range(self.n) if i not in self.crashed | self.equivocators]
        hostile = [names[i] for i in sorted(self.equivocators)]
        parts = {name: Participant(WINDOW, name, names, self.quorum, deadline=5.0, timeouts=self.timeouts, now=0.0)
                 for name in honest}
        seen = {name: Seen(WINDOW, names) for name in honest + hostile}
        pending: dict[str, list[tuple[float, int, Proposal | Vote]]] = {name: [] for name in names}
        sent: set[tuple] = set()
        validity: dict[bytes, bool] = {}
        counter = 0
        now = 0.0

        def deliver(item: Proposal | Vote | Decision, sender: str | None = None) -> None:
            nonlocal counter
            for receiver in names:
                counter += 1
                late = 0.0 if receiver == (sender or item.signer) else rng.uniform(*self.delay)
                pending[receiver].append((now + late, counter, item))

        while now < until and not all(p.decision for p in parts.values()):
            # (sorting pending items compares times and counters only: counters are unique)
            for name, view in seen.items():
                ready = sorted(x for x in pending[name] if x[0] <= now)
                pending[name] = [x for x in pending[name] if x[0] > now]
                for _, _, item in ready:  # first version seen wins, as with an overwritten object
                    if isinstance(item, Decision):
                        view.add_decision(item)
                    else:
                        (view.add_proposal if isinstance(item, Proposal) else view.add_vote)(item)
            for me in hostile:  # proposes two values, then votes for every value in every round
                for r in range(12):
                    if proposer(WINDOW, r, names) == me and ("p", me, r) not in sent:
                        sent.add(("p", me, r))
                        for tag in (100 + r, 200 + r):
                            validity[_value(tag).id] = True
                            deliver(Proposal(WINDOW, r, _value(tag), -1, me))
                    for p in (v for versions in seen[me].proposals.values() for v in versions.values()):
                        for kind in (PREVOTE, PRECOMMIT):
                            if (kind, me, p.round, p.value_id) not in sent:
                                sent.add((kind, me, p.round, p.value_id))
                                deliver(Vote(kind, WINDOW, p.round, p.value_id, me))
            for name, p in parts.items():
                if p.decision is not None:
                    continue
                mine = _value(int(name) + 10 * p.round)
                validity[mine.id] = int(name) not in self.invalid_from
                for action in p.step(seen[name], validity, mine if now >= 1.0 else None, now):
                    if action.kind == PROPOSAL:
                        deliver(Proposal(WINDOW, action.round, action.value, action.valid_round, name))
                    else:
                        deliver(Vote(action.kind, WINDOW, action.round, action.value_id, name))
                if p.decision is not None:  # what node/closing.py writes: the decision record
                    deliver(p.decision, name)
            now += dt
        return {name: p.decision.value.id for name, p in parts.items() if p.decision}


@pytest.mark.parametrize("seed", range(8))
def test_four_closers_with_one_equivocator_agree_and_terminate(seed):
    sim = Sim(n=4, quorum=default_quorum(4, byzantine=True), equivocators={seed % 4}, seed=seed)
    decided = sim.run()
    assert len(decided) == 3, f"only {len(decided)} of 3 honest closers decided"
    assert len(set(decided.values())) == 1, "honest closers decided different values"


@pytest.mark.parametrize("seed", range(24))
def test_seven_closers_with_two_equivocators_never_disagree_under_chaotic_timing(seed):
    """Records take up to 4 s to arrive while steps time out after 1 s: rounds fail often,
    locks and valid rounds are what keep honest closers from deciding two values."""
    sim = Sim(n=7, quorum=default_quorum(7, byzantine=True), equivocators={seed % 7, (seed + 3) % 7},
              delay=(0.0, 4.0), timeouts=Timeouts(base=1.0, delta=0.3, propose_grace=0.5), seed=seed)
    decided = sim.run(until=200.0)
    assert len(set(decided.values())) <= 1, "honest closers decided different values"
    assert len(decided) == 5, f"only {len(decided)} of 5 honest closers decided"


@pytest.mark.parametrize("seed", range(8))
def test_three_closers_with_a_majority_quorum_survive_one_crash(seed):
    decided = Sim(n=3, quorum=default_quorum(3, byzantine=False), crashed={seed % 3}, seed=seed).run()
    assert len(decided) == 2 and len(set(decided.values())) == 1


@pytest.mark.parametrize("seed", range(6))
def test_invalid_proposals_are_voted_down_and_a_later_round_decides(seed):
    sim = Sim(n=4, quorum=3, invalid_from={WINDOW % 4, (WINDOW + 1) % 4}, seed=seed)
    decided = sim.run()
    assert len(decided) == 4 and len(set(decided.values())) == 1
    winner = next(iter(decided.values()))
    assert winner not in {_value(i + 10 * r).id for i in sim.invalid_from for r in range(10)}


def test_without_a_quorum_online_nothing_is_decided():
    assert Sim(n=4, quorum=3, crashed={0, 1}, seed=1).run(until=60.0) == {}


def test_a_closer_locked_on_a_value_prevotes_nil_for_a_fresh_other_value():
    names = ["00", "01", "02", "03"]
    v, other = _value(1), _value(2)
    seen = Seen(WINDOW, names)
    p = Participant(WINDOW, "02", names, 3, deadline=0.0, timeouts=Timeouts(), now=0.0)
    seen.add_proposal(Proposal(WINDOW, 0, v, -1, proposer(WINDOW, 0, names)))
    for signer in ("00", "01", "03"):
        seen.add_vote(Vote(PREVOTE, WINDOW, 0, v.id, signer))
    actions = p.step(seen, {v.id: True, other.id: True}, None, now=0.1)
    assert [(a.kind, a.value_id) for a in actions] == [(PREVOTE, v.id), (PRECOMMIT, v.id)]
    assert p.locked == (0, v.id) and p.valid == (0, v)
    for signer in ("00", "01", "03"):  # round 0 fails to decide: everyone moves on
        seen.add_vote(Vote(PRECOMMIT, WINDOW, 0, NIL, signer))
    p.step(seen, {v.id: True, other.id: True}, None, now=100.0)  # starts the precommit timeout
    p.step(seen, {v.id: True, other.id: True}, None, now=110.0)
    assert p.round == 1
    seen.add_proposal(Proposal(WINDOW, 1, other, -1, proposer(WINDOW, 1, names)))
    actions = p.step(seen, {v.id: True, other.id: True}, None, now=100.1)
    assert [(a.kind, a.value_id) for a in actions] == [(PREVOTE, NIL)]  # locked on v


def test_the_next_proposer_proposes_the_value_a_quorum_prevoted_before():
    names = ["00", "01", "02", "03"]
    v = _value(1)
    me = proposer(WINDOW, 1, names)
    seen = Seen(WINDOW, names)
    p = Participant(WINDOW, me, names, 3, deadline=0.0, timeouts=Timeouts(), now=0.0)
    seen.add_proposal(Proposal(WINDOW, 0, v, -1, proposer(WINDOW, 0, names)))
    for signer in names:
        seen.add_vote(Vote(PREVOTE, WINDOW, 0, v.id, signer))
    p.step(seen, {v.id: True}, None, now=0.1)
    for signer in names:
        seen.add_vote(Vote(PRECOMMIT, WINDOW, 0, NIL, signer))
    p.step(seen, {v.id: True}, _value(9), now=100.0)  # starts the precommit timeout
    actions = p.step(seen, {v.id: True}, _value(9), now=110.0)  # its own fresh value must not win
    proposals = [a for a in actions if a.kind == PROPOSAL]
    assert len(proposals) == 1 and proposals[0].value == v and proposals[0].valid_round == 0


def test_a_restarted_closer_does_not_vote_twice_in_a_round():
    names = ["00", "01", "02"]
    seen = Seen(WINDOW, names)
    seen.add_vote(Vote(PREVOTE, WINDOW, 0, b"\x07" * 32, "01"))
    seen.add_vote(Vote(PRECOMMIT, WINDOW, 0, b"\x07" * 32, "01"))
    p = Participant(WINDOW, "01", names, 2, deadline=0.0, timeouts=Timeouts(), now=100.0)
    p.restore(seen)
    assert p.locked == (0, b"\x07" * 32)
    actions = p.step(seen, {}, None, now=1000.0)
    assert not any(a.round == 0 and a.kind in (PREVOTE, PRECOMMIT) for a in actions)


# ---------------------------------------------------------------------------- records


def _closers(*idents: Identity) -> set[str]:
    return {i.public_key.hex() for i in idents}


def test_decision_record_carries_a_quorum_of_precommits_and_is_checked_whole():
    a, b, c, x = (Identity.from_seed(s) for s in (b"a", b"b", b"c", b"x"))
    closers = _closers(a, b, c)
    value = _value(1)
    votes = [sign_vote(i, RUN, PRECOMMIT, WINDOW, 2, value.id) for i in (a, b)]
    blob = sign_decision(c, RUN, WINDOW, value, votes)
    decision = read_decision(blob, run=RUN, window=WINDOW, closers=closers, quorum=2)
    assert decision.value == value and decision.round == 2 and len(decision.signers) == 2
    with pytest.raises(RecordRejected, match="carry 3 precommits"):
        read_decision(blob, run=RUN, window=WINDOW, closers=closers, quorum=3)
    forged = sign_decision(x, RUN, WINDOW, value, votes[:1] + [sign_vote(x, RUN, PRECOMMIT, WINDOW, 2, value.id)])
    with pytest.raises(RecordRejected, match="does not trust"):
        read_decision(forged, run=RUN, window=WINDOW, closers=closers, quorum=2)
    mixed = sign_decision(c, RUN, WINDOW, value, [votes[0], sign_vote(b, RUN, PRECOMMIT, WINDOW, 3, value.id)])
    with pytest.raises(RecordRejected, match="one round"):
        read_decision(mixed, run=RUN, window=WINDOW, closers=closers, quorum=2)
    twice = sign_decision(c, RUN, WINDOW, value, [votes[0], votes[0]])
    with pytest.raises(RecordRejected):
        read_decision(twice, run=RUN, window=WINDOW, closers=closers, quorum=2)


def test_records_of_keys_the_run_does_not_trust_are_refused():
    a, x = Identity.from_seed(b"a"), Identity.from_seed(b"x")
    blob = sign_proposal(x, RUN, WINDOW, 0, _value(0), -1)
    with pytest.raises(RecordRejected, match="does not trust"):
        read_proposal(blob, run=RUN, window=WINDOW, closers=_closers(a))
    assert read_proposal(sign_proposal(a, RUN, WINDOW, 0, _value(0), -1), run=RUN, window=WINDOW,
                         closers=_closers(a)).value == _value(0)
    with pytest.raises(RecordRejected, match="window"):
        read_vote(sign_vote(a, RUN, PREVOTE, WINDOW + 1, 0, NIL), run=RUN, kind=PREVOTE, window=WINDOW,
                  closers=_closers(a))


@pytest.mark.parametrize("seed", range(200))
def test_mutated_consensus_records_only_ever_raise_record_rejected(seed):
    rng = random.Random(seed)
    a = Identity.from_seed(b"a")
    closers = _closers(a)
    blob = bytearray(rng.choice([
        sign_proposal(a, RUN, WINDOW, 1, _value(3), 0),
        sign_vote(a, RUN, PREVOTE, WINDOW, 1, _value(3).id),
        sign_decision(a, RUN, WINDOW, _value(3), [sign_vote(a, RUN, PRECOMMIT, WINDOW, 1, _value(3).id)]),
    ]))
    for _ in range(rng.randint(1, 4)):
        blob[rng.randrange(len(blob))] = rng.randrange(256)
    for reader in (
        lambda b: read_proposal(b, run=RUN, window=WINDOW, closers=closers),
        lambda b: read_vote(b, run=RUN, kind=PREVOTE, window=WINDOW, closers=closers),
        lambda b: read_decision(b, run=RUN, window=WINDOW, closers=closers, quorum=1),
    ):
        try:
            reader(bytes(blob))
        except RecordRejected:
            pass
