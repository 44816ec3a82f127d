"""Validator score records, and the rule peers use to turn them into whose payloads count.

A validator publishes one signed record (``protocol.records``, kind ``"scores"``) per window
under ``scores/<window:06d>/<validator_peer_id>.lsr``. The body is, exactly::

    {"kind": "scores", "run": <run key>, "window": <int >= 0>,
     "peers": {<peer id>: {"weight": <float in [0, 1]>, "included": <bool>,
                           "components": {<name>: <finite float>, ...}}, ...}}

Only records signed by one of the run's trusted validator keys (manifest
``validators.keys``, hex) are read, and the schema is strict: exact key sets, exact types
(an int is not a float, a bool is not an int), bounded counts and lengths.

Combining several validators (``combine``): a peer's weight is the median, over the
validators that published for the window, of the weight each gave it (0 when a validator
published and did not list it); the peer counts iff more than half of those validators
include it. One dishonest validator among three or more can therefore neither admit nor
exclude a peer alone, nor move its median weight outside the honest ones' range.
Before any trusted record exists for the lagged window, every valid payload counts
(``None``), so a run can start before its validators do.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from protocol.errors import ObjectNotFound, RecordRejected
from protocol.identity import PEER_ID_HEX_CHARS, Identity
from protocol.paths import scores_prefix
from protocol.records import MAX_RECORD_BYTES, require, sign_record, verify_record
from protocol.stores.base import Store

log = logging.getLogger(__name__)

KIND = "scores"
MAX_PEERS = 2048
"""Peers one record may list: at ~250 bytes per peer a full record stays under ``MAX_RECORD_BYTES``."""
MAX_COMPONENTS = 16
"""Score components per peer."""
MAX_COMPONENT_NAME = 32
"""Characters in a component name."""

_PEER_ID = re.compile(rf"^[0-9a-f]{{{PEER_ID_HEX_CHARS}}}$")
_COMPONENT = re.compile(rf"^[a-z0-9_]{{1,{MAX_COMPONENT_NAME}}}$")
_BODY_KEYS = frozenset({"kind", "run", "window", "peers"})
_PEER_KEYS = frozenset({"weight", "included", "components"})


@dataclass(frozen=True)
class PeerScore:
    """One validator's verdict on one peer for one window."""

    weight: float
    """In [0, 1]: the validator's trust in the peer (from its rating)."""
    included: bool
    """Whether this validator says the peer's payload should count."""
    components: Mapping[str, float] = field(default_factory=dict)
    """What the weight came from, for people and dashboards (e.g. ``gain_unassigned``)."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.weight <= 1.0):
            raise ValueError(f"weight must be in [0, 1], got {self.weight}")


@dataclass(frozen=True)
class ScoreRecord:
    """A verified score record."""

    validator: str
    """Peer id of the signing validator."""
    public_key: str
    """Hex of the signer's raw ed25519 public key (one of the trusted keys)."""
    run: str
    window: int
    peers: Mapping[str, PeerScore]

    @property
    def included(self) -> frozenset[str]:
        """Peers this validator says count."""
        return frozenset(p for p, s in self.peers.items() if s.included)


def score_key(window: int, validator_id: str) -> str:
    """Store key of a validator's record for ``window``."""
    return f"{scores_prefix(window)}{validator_id}.lsr"


def make_score_record(identity: Identity, run: str, window: int, scores: Mapping[str, PeerScore]) -> bytes:
    """Sign the scores of ``window`` as a record other peers can verify."""
    peers = {
        peer: {
            "weight": float(s.weight),
            "included": bool(s.included),
            "components": {str(k): float(v) for k, v in sorted(s.components.items())},
        }
        for peer, s in sorted(scores.items())
    }
    data = sign_record(identity, KIND, run, {"window": int(window), "peers": peers})
    # Refuse here what every reader would refuse, so a validator learns at once.
    read_score_record(data, run, [identity.public_key.hex()])
    return data


def read_score_record(data: bytes, run: str, trusted_keys: Collection[str]) -> ScoreRecord:
    """Verify and parse a score record; ``RecordRejected`` unless signed by a trusted key."""
    rec = verify_record(data, kind=KIND, run=run, max_bytes=MAX_RECORD_BYTES)
    key_hex = rec.public_key.hex()
    if key_hex not in {k.lower() for k in trusted_keys}:
        raise RecordRejected(f"score record is signed by {rec.peer_id}, which is not a trusted validator of this run")
    body = rec.body
    extra = set(body) - _BODY_KEYS
    if extra:
        raise RecordRejected(f"score record has unknown fields {sorted(extra)}")
    window = require(body, "window", int, KIND)
    if window < 0:
        raise RecordRejected(f"score record window must be >= 0, got {window}")
    raw_peers = require(body, "peers", dict, KIND)
    if len(raw_peers) > MAX_PEERS:
        raise RecordRejected(f"score record lists {len(raw_peers)} peers, over the cap of {MAX_PEERS}")
    peers = {}
    for peer, entry in raw_peers.items():
        if not isinstance(peer, str) or not _PEER_ID.match(peer):
            raise RecordRejected(f"score record names an invalid peer id {peer!r}")
        peers[peer] = _parse_peer(peer, entry)
    return ScoreRecord(rec.peer_id, key_hex, run, window, peers)


def _parse_peer(peer: str, entry: object) -> PeerScore:
    if not isinstance(entry, dict) or set(entry) != _PEER_KEYS:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise RecordRejected(f"score of peer {peer} must have exactly {sorted(_PEER_KEYS)}, got {got}")
    weight = require(entry, "weight", float, KIND)
    if not 0.0 <= weight <= 1.0:  # also refuses NaN
        raise RecordRejected(f"weight of peer {peer} must be in [0, 1], got {weight}")
    included = require(entry, "included", bool, KIND)
    components = require(entry, "components", dict, KIND)
    if len(components) > MAX_COMPONENTS:
        raise RecordRejected(f"peer {peer} has {len(components)} score components, over the cap of {MAX_COMPONENTS}")
    for name, value in components.items():
        if not isinstance(name, str) or not _COMPONENT.match(name):
            raise RecordRejected(f"score component name {name!r} of peer {peer} is not [a-z0-9_]{{1,32}}")
        if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
            raise RecordRejected(f"score component {name!r} of peer {peer} must be a finite float, got {value!r}")
    return PeerScore(weight, included, dict(components))


def combine(records: Sequence[ScoreRecord], n_trusted: int) -> dict[str, float] | None:
    """Peers that count, each mapped to its median weight; ``None`` when there is no record.

    ``records`` come from distinct trusted validators for one window (one per validator;
    a second record of the same validator is ignored). ``n_trusted`` is how many
    validators the run trusts: more distinct signers than that is a caller bug, and fewer
    than a majority publishing is logged, since the rule then rests on fewer opinions.
    """
    if not records:
        return None
    by_validator: dict[str, ScoreRecord] = {}
    for rec in records:
        by_validator.setdefault(rec.validator, rec)
    n = len(by_validator)
    if n > n_trusted:
        raise ValueError(f"{n} distinct validators signed records, but only {n_trusted} are trusted")
    if 2 * n <= n_trusted:
        log.warning("only %d of %d trusted validators published scores for window %d", n, n_trusted, records[0].window)
    peers = sorted({p for rec in by_validator.values() for p in rec.peers})
    out = {}
    for peer in peers:
        votes = sum(1 for rec in by_validator.values() if peer in rec.peers and rec.peers[peer].included)
        if 2 * votes > n:
            out[peer] = statistics.median(
                rec.peers[peer].weight if peer in rec.peers else 0.0 for rec in by_validator.values()
            )
    return out


def allowed_peers(
    store: Store, run: str, window: int, lag: int, trusted_keys: Collection[str], *, min_weight: float = 0.0
) -> set[str] | None:
    """Peers whose payloads count in ``window``, from the scores of ``window - lag``.

    ``None`` means no trusted scores exist yet for that window: every valid payload counts.
    Records that fail verification, name another window, or sit under another validator's
    key are skipped with a warning; a peer counts iff ``combine`` keeps it and its median
    weight is above ``min_weight`` (manifest ``validators.min_weight``).
    """
    scored = window - lag
    if scored < 0:
        return None
    records = []
    for info in store.list(scores_prefix(scored)):
        if not info.key.endswith(".lsr"):
            continue
        try:
            rec = read_score_record(store.get(info.key, max_bytes=MAX_RECORD_BYTES), run, trusted_keys)
        except ObjectNotFound:
            continue
        except RecordRejected as exc:
            log.warning("ignoring score record %s: %s", info.key, exc)
            continue
        if rec.window != scored or info.key != score_key(scored, rec.validator):
            log.warning("ignoring score record %s: it is validator %s's record for window %d", info.key, rec.validator, rec.window)
            continue
        records.append(rec)
    combined = combine(records, len({k.lower() for k in trusted_keys}))
    if combined is None:
        return None
    return {peer for peer, weight in combined.items() if weight > min_weight}
