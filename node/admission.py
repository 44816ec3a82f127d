"""Whose payloads may count in a window, and whose norms are the reference: from the manifest
and the validators' published scores, the same way for the proposer and every checker.

- A run without validators (private) counts only the peers its manifest lists; all of them
  have standing.
- A run with validators counts its listed peers from the first window, and any other peer
  once more than half of *all* trusted validators include it in the scores of window
  ``w - score_lag``. When too few validators scored that window (slow, offline), one of the
  ``lookback`` windows before it may be used instead; which one, and exactly which
  validators' records, is written into the decision (``CloseValue.scores_window`` and
  ``scores_from``), so every closer checks the same records. No peer counts before a
  majority of validators has evaluated it; at most ``max_newcomers`` peers without standing
  count in one window.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.consensus import CloseValue
from protocol.identity import peer_id_of
from protocol.manifest import Manifest
from protocol.scores import ScoreRecord, combine, read_scores
from protocol.stores.base import Store


@dataclass(frozen=True)
class Admission:
    scores_window: int
    """-1 when no scores were used."""
    scores_from: tuple[str, ...]
    """Validators (peer ids) whose records were combined, sorted."""
    allowed: frozenset[str]
    """Peers that may count."""
    standing: frozenset[str]
    """Peers whose norms robust statistics are referenced to."""


def listed_peers(manifest: Manifest) -> frozenset[str]:
    """Peer ids of the peers the manifest lists."""
    return frozenset(peer_id_of(bytes.fromhex(k)) for k in manifest.run.peers)


def _from_records(manifest: Manifest, window: int, records: list[ScoreRecord]) -> Admission | None:
    combined = combine(records, manifest.validators.keys)
    if combined is None:
        return None
    listed = listed_peers(manifest)
    allowed = {p for p, w in combined.allowed.items() if w > manifest.validators.min_weight}
    return Admission(window, tuple(sorted(r.validator for r in records)), frozenset(allowed | listed),
                     frozenset((combined.standing & allowed) | listed))


def choose(manifest: Manifest, store: Store, window: int) -> Admission:
    """The admission a proposer of ``window`` uses: the newest usable scores window."""
    listed = listed_peers(manifest)
    v = manifest.validators
    if v.keys:
        newest = window - v.score_lag
        for scored in range(newest, max(-1, newest - v.lookback - 1), -1):
            found = _from_records(manifest, scored, read_scores(store, manifest.run_key, scored, v.keys))
            if found is not None:
                return found
    return Admission(-1, (), listed, listed)


def check(manifest: Manifest, store: Store, window: int, value: CloseValue) -> str | None:
    """Why ``value``'s admission is wrong, or None when every closer should accept it."""
    v = manifest.validators
    if value.scores_window == -1:
        if v.keys and (usable := choose(manifest, store, window)).scores_window != -1:
            return f"it ignores the usable scores of window {usable.scores_window}"
        admission = Admission(-1, (), listed_peers(manifest), listed_peers(manifest))
    else:
        newest = window - v.score_lag
        if not v.keys or not newest - v.lookback <= value.scores_window <= newest:
            return f"scores window {value.scores_window} is outside [{newest - v.lookback}, {newest}]"
        records = [r for r in read_scores(store, manifest.run_key, value.scores_window, v.keys)
                   if r.validator in value.scores_from]
        if len(records) != len(value.scores_from):
            return f"the score records of {len(value.scores_from) - len(records)} named validators are missing or invalid"
        found = _from_records(manifest, value.scores_window, records)
        if found is None:
            return "the named score records are not a majority of the trusted validators"
        admission = found
    newcomers = 0
    for inc in value.included:
        if inc.peer_id not in admission.allowed:
            return f"peer {inc.peer_id} is not admitted by the scores it names"
        if inc.standing != (inc.peer_id in admission.standing):
            return f"peer {inc.peer_id} is flagged standing={inc.standing}, the scores say otherwise"
        newcomers += not inc.standing
    if newcomers > v.max_newcomers and v.keys:
        return f"{newcomers} peers without standing, over the cap of {v.max_newcomers}"
    return None
