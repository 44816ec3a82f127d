"""Where each object of a run lives in its store. Every backend and every role uses these.

    manifest.toml                                   the run manifest (its hash is the run's identity)
    data/index.json, data/tokenizer.json, data/shard-NNNNN.npy
    windows/WWWWWW/payloads/<peer>.lsp              one signed payload per peer and window
    windows/WWWWWW/announce/<peer>.lsr              or, for a peer serving from its own bucket,
                                                    a signed record of where to GET its payload
    windows/WWWWWW/blobs/<sha256>.lsp               a copy of a counted payload, by content
    windows/WWWWWW/consensus/rRRRR.<kind>.<peer>.lsr  a closer's proposal / prevote / precommit
    windows/WWWWWW/decisions/<peer>.lsr             a decision record (value + quorum of precommits)
    checkpoints/WWWWWW/<digest>.safetensors         global weights at the start of window W
    checkpoints/WWWWWW/<digest>.json                its commit marker (node/checkpoint.py)
    scores/WWWWWW/<validator>.lsr                   a validator's signed scores for window W

Every ``<peer>`` is a peer id (24 lowercase hex characters) and the object under it must be
signed by that peer (``owner``): a p2p store refuses anyone else's record for such a key,
and every reader checks the signer anyway. Keys nothing here produces are never parsed
into rows: ``window_of_key`` and the ``*_of_key`` parsers return None for them.
"""

from __future__ import annotations

import re

MANIFEST = "manifest.toml"
PAYLOAD_SUFFIX = ".lsp"
RECORD_SUFFIX = ".lsr"

_PEER = r"[0-9a-f]{24}"
_WINDOW = r"\d{6}"
_PAYLOAD = re.compile(rf"^windows/({_WINDOW})/payloads/({_PEER})\.lsp$")
_ANNOUNCE = re.compile(rf"^windows/({_WINDOW})/announce/({_PEER})\.lsr$")
_BLOB = re.compile(rf"^windows/({_WINDOW})/blobs/([0-9a-f]{{64}})\.lsp$")
_CONSENSUS = re.compile(rf"^windows/({_WINDOW})/consensus/r(\d{{4}})\.(proposal|prevote|precommit)\.({_PEER})\.lsr$")
_DECISION = re.compile(rf"^windows/({_WINDOW})/decisions/({_PEER})\.lsr$")
_SCORES = re.compile(rf"^scores/({_WINDOW})/({_PEER})\.lsr$")
MAX_ROUND_IN_KEY = 9999
_PEER_ID = re.compile(_PEER)


def is_peer_id(value: object) -> bool:
    """A well-formed peer id: 24 lowercase hex characters (and nothing after them)."""
    return isinstance(value, str) and _PEER_ID.fullmatch(value) is not None


def window_dir(window: int) -> str:
    return f"windows/{window:06d}/"


def payload_key(window: int, peer_id: str) -> str:
    return f"{window_dir(window)}payloads/{peer_id}{PAYLOAD_SUFFIX}"


def payloads_prefix(window: int) -> str:
    return f"{window_dir(window)}payloads/"


def peer_of_payload_key(key: str) -> str | None:
    """The peer id a payload key names, or None when the key is not a well-formed one."""
    m = _PAYLOAD.fullmatch(key)
    return m.group(2) if m else None


def announce_key(window: int, peer_id: str) -> str:
    return f"{window_dir(window)}announce/{peer_id}{RECORD_SUFFIX}"


def announce_prefix(window: int) -> str:
    return f"{window_dir(window)}announce/"


def peer_of_announce_key(key: str) -> str | None:
    m = _ANNOUNCE.fullmatch(key)
    return m.group(2) if m else None


def blob_key(window: int, sha256: str) -> str:
    """Where a counted payload is kept by its content (any reader may fetch it by hash)."""
    return f"{window_dir(window)}blobs/{sha256}{PAYLOAD_SUFFIX}"


def consensus_prefix(window: int) -> str:
    return f"{window_dir(window)}consensus/"


def consensus_key(window: int, round_: int, kind: str, peer_id: str) -> str:
    if not 0 <= round_ <= MAX_ROUND_IN_KEY:
        raise ValueError(f"round {round_} does not fit a key")
    return f"{consensus_prefix(window)}r{round_:04d}.{kind}.{peer_id}{RECORD_SUFFIX}"


def parse_consensus_key(key: str) -> tuple[int, str, str] | None:
    """(round, kind, signer peer id) of a consensus key, or None when malformed."""
    m = _CONSENSUS.fullmatch(key)
    return (int(m.group(2)), m.group(3), m.group(4)) if m else None


def decisions_prefix(window: int) -> str:
    return f"{window_dir(window)}decisions/"


def decision_key(window: int, peer_id: str) -> str:
    return f"{decisions_prefix(window)}{peer_id}{RECORD_SUFFIX}"


def checkpoint_dir(window: int) -> str:
    return f"checkpoints/{window:06d}/"


def scores_prefix(window: int) -> str:
    return f"scores/{window:06d}/"


def score_key(window: int, validator_id: str) -> str:
    """Key of a validator's score record for ``window``."""
    return f"{scores_prefix(window)}{validator_id}{RECORD_SUFFIX}"


def window_of_key(key: str) -> int | None:
    """The window number a ``windows/``, ``checkpoints/`` or ``scores/`` key belongs to."""
    parts = key.split("/")
    if len(parts) >= 2 and parts[0] in ("windows", "checkpoints", "scores") and re.fullmatch(_WINDOW, parts[1]):
        return int(parts[1])
    return None


def owner(key: str) -> str | None:
    """The peer id that alone may sign the object under ``key``; None when anyone may write
    it (content-addressed or content-verified objects: blobs, checkpoints, data)."""
    for pattern, group in ((_PAYLOAD, 2), (_ANNOUNCE, 2), (_DECISION, 2), (_SCORES, 2), (_CONSENSUS, 4)):
        m = pattern.fullmatch(key)
        if m:
            return m.group(group)
    return None


DATA_INDEX = "data/index.json"
"""The data index (``protocol.dataindex.DataIndex``): every data object's SHA-256."""
DATA_TOKENIZER = "data/tokenizer.json"


def shard_key(i: int) -> str:
    """Key of token shard ``i`` (``.npy``, rows of seq_len + 1 tokens)."""
    return f"data/shard-{i:05d}.npy"
