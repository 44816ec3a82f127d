"""The run's data index and the one safe reader of its token shards.

``locoswarm init`` writes ``data/index.json`` (``protocol.paths.DATA_INDEX``): every data
object's SHA-256 and the split sizes. The index's own SHA-256 is pinned in the manifest
(``data.index_sha256``), so whoever can write to the store cannot swap the data under a
running run. Shards are ``.npy`` arrays ``[rows, seq_len + 1]`` of uint16/uint32 token ids;
``parse_npy`` reads one without ``np.load`` (no pickle, no allocation sized by a forged
header).
"""

from __future__ import annotations

import hashlib
import io
import json
import tokenize
from dataclasses import dataclass

import numpy as np

from protocol.errors import IntegrityError, StoreError
from protocol.paths import DATA_INDEX
from protocol.records import json_strict, short
from protocol.stores.base import check_key

NPY_HEADER_MAX = 1 << 16
"""Bytes of an npy header at most (magic and length prefix excluded)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256(s: str) -> bool:
    """True for 64 lowercase hex characters."""
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


@dataclass(frozen=True)
class DataIndex:
    """What ``prepare`` wrote: hashes of every object and the split sizes."""

    tokenizer_sha256: str
    """SHA-256 of data/tokenizer.json; "" when pre-tokenized data came without a tokenizer."""
    shards: tuple[tuple[str, str, int], ...]
    """(store key, SHA-256 of the npy bytes, tokens in the shard), in sequence order."""
    n_sequences: int
    n_train: int
    """Sequences [0, n_train) are train; the rest are held out."""
    n_heldout: int
    seq_len: int
    """Model context; each stored row has seq_len + 1 tokens (inputs and shifted labels)."""
    vocab_size: int
    """Every token id is below this; size the model's embedding with it."""
    seed: int = 0
    """Run seed that chose the held-out split."""
    source: str = ""
    """Where the corpus came from, for people (e.g. "stdlib (CPython 3.11.7)")."""

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces), so equal indexes hash equally."""
        raw = {
            "format": "locoswarm-data/1",
            "tokenizer_sha256": self.tokenizer_sha256,
            "shards": [list(s) for s in self.shards],
            "n_sequences": self.n_sequences,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "seed": self.seed,
            "source": self.source,
        }
        return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        """SHA-256 of ``to_json()``: pins the whole data set (tokenizer and shards included)."""
        return sha256_hex(self.to_json())

    @classmethod
    def from_json(cls, data: bytes) -> DataIndex:
        """Parse and check an index; anything off raises ``IntegrityError`` saying what."""

        def bad(why: str) -> IntegrityError:
            return IntegrityError(f"data index is invalid: {why}", key=DATA_INDEX)

        try:
            raw = json_strict(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise bad("not a JSON object")
        ints = ("n_sequences", "n_train", "n_heldout", "seq_len", "vocab_size", "seed")
        strs = ("tokenizer_sha256", "source", "format")
        expected = set(ints) | set(strs) | {"shards"}
        if set(raw) != expected:
            raise bad(f"keys {sorted(raw)} differ from {sorted(expected)}")
        if raw["format"] != "locoswarm-data/1":
            raise bad(f"unknown format {short(raw['format'])}")
        for k in ints:
            if type(raw[k]) is not int or raw[k] < 0:
                raise bad(f"{k} must be a non-negative integer, got {short(raw[k])}")
        for k in strs:
            if not isinstance(raw[k], str):
                raise bad(f"{k} must be a string")
        if raw["tokenizer_sha256"] and not is_sha256(raw["tokenizer_sha256"]):
            raise bad("tokenizer_sha256 is not a SHA-256 hex digest")
        if not isinstance(raw["shards"], list) or not raw["shards"]:
            raise bad("shards must be a non-empty list")
        row = raw["seq_len"] + 1
        shards = []
        for s in raw["shards"]:
            ok = isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and isinstance(s[1], str)
            if not ok or type(s[2]) is not int or not s[0].startswith("data/") or not is_sha256(s[1]):
                raise bad(f"shard entry {short(s)} is not [data/ key, sha256, n_tokens]")
            try:
                check_key(s[0])
            except StoreError as exc:
                raise bad(f"shard key {short(s[0])} is not a valid store key") from exc
            if s[2] <= 0 or s[2] % row:
                raise bad(f"shard {s[0]} holds {s[2]} tokens, not a positive multiple of seq_len + 1 = {row}")
            shards.append((s[0], s[1], s[2]))
        if raw["seq_len"] < 1 or raw["vocab_size"] < 1:
            raise bad("seq_len and vocab_size must be >= 1")
        if sum(s[2] for s in shards) != raw["n_sequences"] * row:
            raise bad("shard token counts do not add up to n_sequences * (seq_len + 1)")
        if raw["n_train"] < 1 or raw["n_heldout"] < 1 or raw["n_train"] + raw["n_heldout"] != raw["n_sequences"]:
            raise bad("n_train and n_heldout must be >= 1 and sum to n_sequences")
        del raw["format"]
        raw["shards"] = tuple(shards)
        return cls(**raw)


def parse_npy(data: bytes, key: str) -> np.ndarray:
    """An array view of npy bytes, checking header and length before touching the payload.

    Never ``np.load`` of untrusted bytes: no pickle, and no allocation sized by a forged header.
    """
    fp = io.BytesIO(data[: 10 + NPY_HEADER_MAX])
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy version {version} is not supported")
    except (ValueError, SyntaxError, tokenize.TokenError) as exc:  # numpy parses the header as a literal
        raise IntegrityError(f"not a valid .npy object: {exc}", key=key) from exc
    if fortran or dtype.kind != "u" or dtype.itemsize not in (2, 4) or dtype.byteorder == ">":
        raise IntegrityError(f"npy holds {dtype} (fortran order {fortran}); want C-order uint16/uint32", key=key)
    if any(d < 0 for d in shape):
        raise IntegrityError(f"npy header has a negative dimension in {shape}", key=key)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - fp.tell() != count * dtype.itemsize:
        payload = len(data) - fp.tell()
        raise IntegrityError(f"npy header says {shape} {dtype} but {payload} payload bytes follow", key=key)
    return np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell()).reshape(shape)
