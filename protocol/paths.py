"""Where each object of a run lives in its store. Every backend and every role uses these.

    manifest.toml                               the run manifest (its hash is the run's identity)
    data/index.json, data/tokenizer.json, data/shard-NNNNN.npy
    windows/WWWWWW/payloads/<peer>.lsp          one signed payload per peer and window
    windows/WWWWWW/announce/<peer>.lsr          or, for a peer serving from its own bucket, a
                                                signed record of where to GET its payload
    windows/WWWWWW/close.lsr                    the window's close record (who counts); slots
    windows/WWWWWW/close.N.lsr                  1..7 take it when earlier ones hold garbage
    checkpoints/WWWWWW/weights.safetensors      global weights at the start of window W
    checkpoints/WWWWWW/meta.json                window, digest, sha256 of the weights file
    scores/WWWWWW/<validator>.lsr               a validator's signed scores for window W
"""

from __future__ import annotations

MANIFEST = "manifest.toml"
PAYLOAD_SUFFIX = ".lsp"


def window_dir(window: int) -> str:
    return f"windows/{window:06d}/"


def payload_key(window: int, peer_id: str) -> str:
    return f"{window_dir(window)}payloads/{peer_id}{PAYLOAD_SUFFIX}"


def payloads_prefix(window: int) -> str:
    return f"{window_dir(window)}payloads/"


def peer_of_payload_key(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(PAYLOAD_SUFFIX)


def announce_key(window: int, peer_id: str) -> str:
    return f"{window_dir(window)}announce/{peer_id}.lsr"


def announce_prefix(window: int) -> str:
    return f"{window_dir(window)}announce/"


def close_key(window: int) -> str:
    return f"{window_dir(window)}close.lsr"


CLOSE_SLOTS = 8
"""Invalid close records one window tolerates before its peers give up on it."""


def close_slot_key(window: int, slot: int) -> str:
    """Key of close slot ``slot`` of ``window``: slot 0 is ``close_key``."""
    return close_key(window) if slot == 0 else f"{window_dir(window)}close.{slot}.lsr"


def checkpoint_dir(window: int) -> str:
    return f"checkpoints/{window:06d}/"


def checkpoint_weights_key(window: int) -> str:
    return f"{checkpoint_dir(window)}weights.safetensors"


def checkpoint_meta_key(window: int) -> str:
    return f"{checkpoint_dir(window)}meta.json"


def scores_prefix(window: int) -> str:
    return f"scores/{window:06d}/"


def window_of_key(key: str) -> int | None:
    """The window number a ``windows/``, ``checkpoints/`` or ``scores/`` key belongs to."""
    parts = key.split("/")
    if len(parts) >= 2 and parts[0] in ("windows", "checkpoints", "scores") and parts[1].isdigit():
        return int(parts[1])
    return None


DATA_INDEX = "data/index.json"
"""The data index (``protocol.dataindex.DataIndex``): every data object's SHA-256."""
DATA_TOKENIZER = "data/tokenizer.json"


def shard_key(i: int) -> str:
    """Key of token shard ``i`` (``.npy``, rows of seq_len + 1 tokens)."""
    return f"data/shard-{i:05d}.npy"
