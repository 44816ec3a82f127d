"""Per-peer ratings across windows, and the weight and inclusion each rating implies.

Each window the evaluated peers are ranked by their ``Evaluation.score`` (peers that
failed a check, whose score is not positive or not finite, or whose evidence of training
on their own data is too low, tie for last) and that
ranking updates an OpenSkill Plackett-Luce rating (mu, sigma) per peer: a Bayesian skill estimate that
needs no absolute score scale, copes with a different subset of peers each window and
gets more certain as evidence accumulates. Alongside, an exponential moving average of
the evidence (``Evaluation.evidence``: assigned gain minus unassigned gain) tracks whether
the peer keeps training on the data it was assigned.

Weight of a peer, in [0, 1]:

    provisional (fewer than ``provisional_windows`` rated windows)   provisional_weight
    otherwise                               sigmoid(ordinal / temperature),  ordinal = mu - 3 sigma
    times absent_decay ** (windows absent beyond absent_grace)

The prior's ordinal is 0 (weight 0.5); a peer that keeps ranking near the top climbs to
~1, one near the bottom falls towards 0. While a peer is absent, its sigma also grows by
``absent_sigma`` per window (capped at the prior), so on return it is re-learned quickly.

A peer is *included* in a window iff its checks passed, its weight is above ``threshold``,
its evidence average (once it has one) is at least ``min_evidence`` and at least
``min_relative_evidence`` of the typical peer's, and its last score was
at least ``min_relative_score`` of the window's median positive score.

State is saved as JSON (atomic replace), so a restarted validator resumes its ratings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from openskill.models import PlackettLuce

from protocol.errors import CheckpointError
from protocol.scores import PeerScore

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class PeerRating:
    """What a validator remembers about one peer."""

    mu: float
    sigma: float
    rated_windows: int = 0
    """Windows in which the peer was ranked (evaluated, or failed a check)."""
    evidence_ema: float | None = None
    """Moving average of ``Evaluation.evidence``; None until the first evaluation."""
    last_seen: int = -1
    """Last window in which the peer published anything."""
    inflated_through: int = -1
    """Absence sigma growth has been applied up to this window."""
    relative_evidence: float | None = None
    """``evidence_ema`` divided by the median positive ``evidence_ema`` of the peers evaluated
    in the last window: how much it fits its own data compared with a typical peer."""
    last_score: float | None = None
    """``Evaluation.score`` in the last window the peer was evaluated, divided by the median
    positive score of that window (1.0 = a typical useful update); None before."""

    @property
    def ordinal(self) -> float:
        """Conservative skill estimate mu - 3 sigma (0 for the prior)."""
        return self.mu - 3.0 * self.sigma


@dataclass(frozen=True)
class RatingParams:
    """How ratings turn into weights; a validator's local policy, not part of the protocol."""

    threshold: float = 0.3
    """Include a peer only if its weight is above this."""
    temperature: float = 5.0
    """Ordinal points per unit of logit: ordinal +-5 gives weight 0.73 / 0.27."""
    provisional_windows: int = 3
    """Rated windows before the rating, rather than ``provisional_weight``, decides."""
    provisional_weight: float = 0.5
    """Weight of a new peer (above ``threshold``: new honest peers count at once)."""
    evidence_alpha: float = 0.2
    """EMA factor: ema <- (1 - alpha) * ema + alpha * evidence."""
    min_evidence: float = 0.0
    """Evidence average below which a peer is not included."""
    min_relative_evidence: float = 0.4
    """Evidence average needed, as a fraction of the typical peer's: a peer that trains on
    data it was not assigned helps everyone's data alike and falls below this."""
    min_relative_score: float = 0.25
    """A peer's last score must be at least this fraction of the window's median positive
    score: an update that barely helps (noise on the right coordinates) is not included."""
    absent_grace: int = 2
    """Windows a peer may miss before its weight decays."""
    absent_decay: float = 0.7
    """Weight factor per window missed beyond the grace."""
    absent_sigma: float = 1.0
    """Sigma added (in quadrature) per window missed beyond the grace."""
    forget_after: int = 1000
    """Windows of absence after which a peer's state is dropped."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0 or not 0.0 <= self.provisional_weight <= 1.0:
            raise ValueError("threshold must be in [0, 1) and provisional_weight in [0, 1]")
        if self.temperature <= 0 or not 0.0 < self.evidence_alpha <= 1.0 or not 0.0 <= self.absent_decay <= 1.0:
            raise ValueError("temperature must be > 0, evidence_alpha in (0, 1], absent_decay in [0, 1]")


class Ratings:
    """All peers' ratings as seen by one validator; ``update`` once per window, in order."""

    def __init__(self, params: RatingParams | None = None) -> None:
        self.params = params or RatingParams()
        self.model = PlackettLuce()
        self.peers: dict[str, PeerRating] = {}
        self.window: int | None = None
        """The last window passed to ``update``."""

    def _get(self, peer: str) -> PeerRating:
        if peer not in self.peers:
            self.peers[peer] = PeerRating(self.model.mu, self.model.sigma)
        return self.peers[peer]

    def update(
        self,
        window: int,
        scores: Mapping[str, float],
        *,
        evidence: Mapping[str, float] | None = None,
        failed: Collection[str] = (),
        present: Collection[str] = (),
        reference: Collection[str] | None = None,
    ) -> None:
        """Rate one window: ``scores`` of evaluated peers; ``failed`` peers and scores <= 0 rank last.

        ``present`` lists peers that published but were not evaluated (not sampled this
        window): they are not rated, but neither are they absent. Windows must increase.
        The typical score and evidence that relative floors compare with are those of the
        ``reference`` peers (the ones with standing) when any of them was evaluated, so that
        a swarm of fresh keys cannot lower the bar; of every evaluated peer otherwise.
        """
        if self.window is not None and window <= self.window:
            raise ValueError(f"window {window} is not after the last rated window {self.window}")
        # Evidence first: a peer whose updates do not fit its own assigned data (it trained
        # on something else) must not climb the ranking on its generalization gain alone.
        for p, ev in (evidence or {}).items():
            if math.isfinite(ev):
                st = self._get(p)
                a = self.params.evidence_alpha
                st.evidence_ema = ev if st.evidence_ema is None else (1 - a) * st.evidence_ema + a * ev
        typical_evidence = _typical({p: self.peers[p].evidence_ema for p in evidence or {}}, reference)
        if typical_evidence is not None:
            for p in evidence or {}:
                if self.peers[p].evidence_ema is not None:
                    self.peers[p].relative_evidence = self.peers[p].evidence_ema / typical_evidence
        # Only an update that lowers the loss, from a peer that trains on its own data, earns
        # a place; the rest tie for last with the failures, so a harmful peer cannot climb by
        # being less harmful than another.
        ranked = {p: s for p, s in scores.items()
                  if math.isfinite(s) and s > 0 and p not in failed and self._evidence_ok(p)}
        last = sorted((set(scores) | set(failed)) - set(ranked))
        order = sorted(ranked, key=lambda p: (-ranked[p], p)) + last
        if len(order) >= 2:
            # Rank 1 is best; equal scores share a rank; every loser ties for last.
            ranks = [1 + sum(1 for q in ranked.values() if q > ranked[p]) for p in order[: len(ranked)]]
            ranks += [len(ranked) + 1] * len(last)
            teams = [[self.model.create_rating([self._get(p).mu, self._get(p).sigma], name=p)] for p in order]
            for p, (new,) in zip(order, self.model.rate(teams, ranks=ranks)):
                self.peers[p].mu, self.peers[p].sigma = new.mu, new.sigma
        elif order:
            self._rate_alone(order[0], helped=order[0] in ranked)
        for p in order:
            self._get(p).rated_windows += 1
        typical = _typical(scores, reference) or 1.0
        for p, value in scores.items():
            self._get(p).last_score = value / typical if math.isfinite(value) else -math.inf
        for p in set(order) | set(present) | set(evidence or {}):
            self._get(p).last_seen = window
        self.window = window
        self._age_absent(window)

    def _rate_alone(self, peer: str, *, helped: bool) -> None:
        """A peer rated alone in a window plays a stand-in for "no update" at the prior
        rating, which never changes: a useful update beats it, a failed one loses to it. So a
        lone peer's rating keeps moving with its evidence instead of freezing."""
        st = self._get(peer)
        me = self.model.create_rating([st.mu, st.sigma], name=peer)
        stand_in = self.model.create_rating([self.model.mu, self.model.sigma], name="no update")
        (new,), _ = self.model.rate([[me], [stand_in]], ranks=[1, 2] if helped else [2, 1])
        st.mu, st.sigma = new.mu, new.sigma

    def _age_absent(self, window: int) -> None:
        p = self.params
        for peer in list(self.peers):
            st = self.peers[peer]
            missed = window - st.last_seen
            if missed > p.forget_after:
                log.info("forgetting peer %s: absent for %d windows", peer, missed)
                del self.peers[peer]
                continue
            start = max(st.last_seen + p.absent_grace, st.inflated_through)
            if window > start:
                st.sigma = min(self.model.sigma, math.sqrt(st.sigma**2 + (window - start) * p.absent_sigma**2))
                st.inflated_through = window

    def weight(self, peer: str) -> float:
        """The peer's weight in [0, 1] (see the module docstring); new peers are provisional."""
        p = self.params
        st = self.peers.get(peer)
        if st is None or st.rated_windows < p.provisional_windows:
            base = p.provisional_weight
        else:
            base = 1.0 / (1.0 + math.exp(-st.ordinal / p.temperature))
        if st is not None and self.window is not None:
            base *= p.absent_decay ** max(0, self.window - st.last_seen - p.absent_grace)
        return base

    def _evidence_ok(self, peer: str) -> bool:
        """The peer's evidence average (once it has one) is not too low, absolutely and
        relative to the typical peer's."""
        st = self.peers.get(peer)
        return st is None or st.evidence_ema is None or (
            st.evidence_ema >= self.params.min_evidence
            and (st.relative_evidence is None or st.relative_evidence >= self.params.min_relative_evidence)
        )

    def included(self, peer: str, checks_passed: bool) -> bool:
        """Include iff checks passed, weight > threshold, the evidence average is not too low,
        and the last evaluated update helped about as much as a typical one (a provisional
        weight alone must not let a harmful or useless newcomer in)."""
        return not self.why_excluded(peer, checks_passed)

    def why_excluded(self, peer: str, checks_passed: bool) -> str:
        """Why ``included`` says no, for a person ("" when it says yes)."""
        p = self.params
        st = self.peers.get(peer)
        if not checks_passed:
            return "its payload failed a check"
        if not self._evidence_ok(peer):
            assert st is not None and st.evidence_ema is not None
            if st.evidence_ema < p.min_evidence:
                return f"evidence average {st.evidence_ema:.3g} is below {p.min_evidence:g}"
            return (f"evidence average is {st.relative_evidence:.0%} of the typical peer's "
                    f"(needs {p.min_relative_evidence:.0%})")
        if st is not None and st.last_score is not None and st.last_score < p.min_relative_score:
            return f"last score was {st.last_score:.0%} of the window's median (needs {p.min_relative_score:.0%})"
        if self.weight(peer) <= p.threshold:
            return f"weight {self.weight(peer):.3f} is not above {p.threshold:g}"
        return ""

    def score_table(
        self, checks_passed: Mapping[str, bool], components: Mapping[str, Mapping[str, float]]
    ) -> dict[str, PeerScore]:
        """The ``PeerScore`` of each peer in ``checks_passed``, for ``protocol.scores``."""
        out = {}
        for peer, ok in checks_passed.items():
            st = self.peers.get(peer)
            comp = {k: float(v) for k, v in components.get(peer, {}).items() if math.isfinite(v)}
            if st is not None:
                comp.update(mu=st.mu, sigma=st.sigma)
                if st.evidence_ema is not None:
                    comp["evidence_ema"] = st.evidence_ema
            included = self.included(peer, ok)
            standing = included and st is not None and st.rated_windows >= self.params.provisional_windows
            out[peer] = PeerScore(self.weight(peer), included, standing, comp)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as JSON through a temp file and an atomic rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"version": STATE_VERSION, "window": self.window, "peers": {p: asdict(s) for p, s in self.peers.items()}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-ratings-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, params: RatingParams | None = None) -> Ratings:
        """Read state written by ``save``; ``CheckpointError`` when it is unreadable."""
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read validator ratings from {path}: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path} is not a version-{STATE_VERSION} ratings file")
        ratings = cls(params)
        window = state.get("window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
            raise CheckpointError(f"{path}: window must be an integer or null")
        ratings.window = window
        peers = state.get("peers")
        if not isinstance(peers, dict):
            raise CheckpointError(f"{path}: peers must be a map")
        for peer, raw in peers.items():
            try:
                st = PeerRating(**raw)
            except TypeError as exc:
                raise CheckpointError(f"{path}: peer {peer} has bad fields: {exc}") from exc
            if not (math.isfinite(st.mu) and math.isfinite(st.sigma) and st.sigma > 0):
                raise CheckpointError(f"{path}: peer {peer} has a non-finite or non-positive rating")
            ratings.peers[peer] = st
        return ratings


def _typical(values: Mapping[str, float | None], reference: Collection[str] | None) -> float | None:
    """Median of the positive finite values, over the ``reference`` peers when any has one."""
    positive = {p: v for p, v in values.items() if v is not None and math.isfinite(v) and v > 0}
    pool = [v for p, v in positive.items() if reference is not None and p in reference] or list(positive.values())
    return statistics.median(pool) if pool else None
