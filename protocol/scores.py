"""Validator score records, and the rule that turns them into who may count in a window.

A validator publishes one signed record (``protocol.records``, kind ``"scores"``) per window
under ``scores/<window:06d>/<validator_peer_id>.lsr``. The body is, exactly::

    {"kind": "scores", "run": <run key>, "window": <int >= 0>,
     "peers": {<peer id>: {"weight": <float in [0, 1]>, "included": <bool>, "standing": <bool>,
                           "components": {<name>: <finite float>, ...}}, ...}}

Only records signed by one of the run's trusted validator keys (manifest
``validators.keys``, hex) are read, and the schema is strict: exact key sets, exact types
(an int is not a float, a bool is not an int), bounded counts and lengths, well-formed ids.

Combining (``combine``) counts *all* trusted validators, not those that happened to publish:
a window's scores are usable only once more than half of all trusted validators published
(so one fast validator cannot decide alone while the others are slow); a peer may count
iff more than half of all trusted validators include it, has standing iff more than half
give it standing (rated for a while and trusted: robust statistics reference these), and
its weight is the median over all trusted validators (0 for one that did not list it).
A hostile minority can therefore neither admit nor exclude a peer, nor move its weight
outside the honest validators' range.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from protocol.errors import ObjectNotFound, ObjectTooLarge, RecordRejected
from protocol.identity import Identity, peer_id_of
from protocol.paths import RECORD_SUFFIX, is_peer_id, score_key, scores_prefix
from protocol.records import (
    MAX_RECORD_BYTES,
    require,
    short,
    sign_record,
    verify_record,
)
from protocol.stores.base import Store

log = logging.getLogger(__name__)

KIND = "scores"
MAX_PEERS = 2048
"""Peers one record may list: at ~250 bytes per peer a full record stays under ``MAX_RECORD_BYTES``."""
MAX_COMPONENTS = 16
"""Score components per peer."""
MAX_COMPONENT_NAME = 32
"""Characters in a component name."""

_COMPONENT = re.compile(rf"^[a-z0-9_]{{1,{MAX_COMPONENT_NAME}}}$")
_PEER_KEYS = frozenset({"weight", "included", "standing", "components"})


@dataclass(frozen=True)
class PeerScore:
    """One validator's verdict on one peer for one window."""

    weight: float
    """In [0, 1]: the validator's trust in the peer (from its rating)."""
    included: bool
    """Whether this validator says the peer's payload should count."""
    standing: bool = False
    """Whether this validator has rated the peer long enough to trust its norm as a
    reference (robust statistics are taken over peers with standing only)."""
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


def make_score_record(identity: Identity, run: str, window: int, scores: Mapping[str, PeerScore]) -> bytes:
    """Sign the scores of ``window`` as a record other peers can verify."""
    peers = {
        peer: {
            "weight": float(s.weight),
            "included": bool(s.included),
            "standing": bool(s.standing),
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
    rec = verify_record(data, kind=KIND, run=run, max_bytes=MAX_RECORD_BYTES, fields=("window", "peers"))
    key_hex = rec.public_key.hex()
    if key_hex not in {k.lower() for k in trusted_keys}:
        raise RecordRejected(f"score record is signed by {rec.peer_id}, which is not a trusted validator of this run")
    body = rec.body
    window = require(body, "window", int, KIND)
    if window < 0:
        raise RecordRejected(f"score record window must be >= 0, got {window}")
    raw_peers = require(body, "peers", dict, KIND)
    if len(raw_peers) > MAX_PEERS:
        raise RecordRejected(f"score record lists {len(raw_peers)} peers, over the cap of {MAX_PEERS}")
    peers = {}
    for peer, entry in raw_peers.items():
        if not is_peer_id(peer):
            raise RecordRejected(f"score record names an invalid peer id {short(peer)}")
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
    standing = require(entry, "standing", bool, KIND)
    components = require(entry, "components", dict, KIND)
    if len(components) > MAX_COMPONENTS:
        raise RecordRejected(f"peer {peer} has {len(components)} score components, over the cap of {MAX_COMPONENTS}")
    for name, value in components.items():
        if not isinstance(name, str) or not _COMPONENT.fullmatch(name):
            raise RecordRejected(f"score component name {short(name)} of peer {peer} is not [a-z0-9_]{{1,32}}")
        if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
            raise RecordRejected(f"score component {name!r} of peer {peer} must be a finite float, got {short(value)}")
    return PeerScore(weight, included, standing, dict(components))


@dataclass(frozen=True)
class Combined:
    """What a majority of all trusted validators say about one window's peers."""

    window: int
    allowed: dict[str, float]
    """Peers that may count, each with its median weight."""
    standing: frozenset[str]
    """Peers a majority gives standing."""


def combine(records: Sequence[ScoreRecord], trusted: Collection[str]) -> Combined | None:
    """The majority view of one window's records; None unless more than half of all
    ``trusted`` validators (hex keys) published one. A second record of the same validator
    is ignored; a record of an untrusted key is a caller bug."""
    trusted = {k.lower() for k in trusted}
    by_validator: dict[str, ScoreRecord] = {}
    for rec in records:
        if rec.public_key not in trusted:
            raise ValueError(f"record of validator {rec.validator} is not signed by a trusted key")
        by_validator.setdefault(rec.public_key, rec)
    n = len(trusted)
    if not records or 2 * len(by_validator) <= n:
        return None
    peers = sorted({p for rec in by_validator.values() for p in rec.peers})
    allowed, standing = {}, set()
    for peer in peers:
        scores = [rec.peers[peer] for rec in by_validator.values() if peer in rec.peers]
        if 2 * sum(s.included for s in scores) > n:
            weights = [s.weight for s in scores] + [0.0] * (n - len(scores))
            allowed[peer] = statistics.median(weights)
        if 2 * sum(s.standing for s in scores) > n:
            standing.add(peer)
    return Combined(records[0].window, allowed, frozenset(standing))


def read_scores(store: Store, run: str, window: int, trusted_keys: Collection[str]) -> list[ScoreRecord]:
    """The valid records of trusted validators for ``window``, one per validator.

    Only keys of the form ``scores/<window>/<peer id>.lsr`` are read, each under the size cap;
    a record that fails verification, names another window, or sits under another
    validator's key is skipped with a logged reason (never fatal, never retried).
    """
    trusted = {k.lower() for k in trusted_keys}
    wanted = {peer_id_of(bytes.fromhex(k)): k for k in trusted}
    records = []
    for info in store.list(scores_prefix(window)):
        validator = info.key.rsplit("/", 1)[-1].removesuffix(RECORD_SUFFIX)
        if info.key != score_key(window, validator) or validator not in wanted or info.size > MAX_RECORD_BYTES:
            continue  # not a key a trusted validator writes: never read
        try:
            rec = read_score_record(store.get(info.key, max_bytes=MAX_RECORD_BYTES), run, trusted)
        except ObjectNotFound:
            continue
        except (RecordRejected, ObjectTooLarge) as exc:
            log.warning("ignoring score record %r: %s", info.key, exc)
            continue
        if rec.window != window or rec.validator != validator:
            log.warning("ignoring score record %r: it is validator %s's record for window %d", info.key,
                        rec.validator, rec.window)
            continue
        records.append(rec)
    return records
