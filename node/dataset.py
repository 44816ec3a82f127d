"""The run's token data: written once by ``init`` (``prepare``), then fetched and verified by
every peer and validator (``TokenData.load``), which hand out batches by sequence id.

``prepare`` cuts the corpus's token stream (``node.corpus``) into sequences of
``seq_len + 1`` tokens and writes them to the store::

    data/tokenizer.json       the tokenizer (HF ``tokenizers`` JSON)
    data/shard-00000.npy ...  uint16/uint32 arrays [rows, seq_len + 1], train rows first
    data/index.json           ``protocol.dataindex.DataIndex``: every object's SHA-256

Held-out sequences are a seed-chosen subset (``protocol.assignment.heldout_rows``) stored
*after* the train rows: global sequence ids ``[0, n_train)`` are train, ``[n_train,
n_sequences)`` held out. ``TokenData.load`` verifies every SHA-256, parses npy headers by
hand and checks token ids against the vocabulary; shards are cached on disk by hash.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from node.corpus import MAX_TOKENIZER_BYTES, corpus_tokens, tokenizer_vocab
from protocol.assignment import heldout_rows
from protocol.dataindex import NPY_HEADER_MAX, DataIndex, parse_npy, sha256_hex
from protocol.errors import IntegrityError, ManifestError, ObjectNotFound
from protocol.manifest import Manifest
from protocol.paths import DATA_INDEX, DATA_TOKENIZER, shard_key
from protocol.stores.base import Store

log = logging.getLogger(__name__)

SHARD_TOKENS = 1 << 22
"""Target tokens per shard (8 MiB at uint16): small enough for one S3 request."""
MAX_INDEX_BYTES = 16 << 20


def prepare(manifest: Manifest, store: Store) -> DataIndex:
    """Build the run's corpus from ``manifest.data.source`` and write it to ``store``.

    Deterministic: the same source and manifest give byte-identical objects and index.
    """
    cfg = manifest.data
    tokens, tokenizer_json, source = corpus_tokens(manifest, store)
    vocab_size = manifest.tokenizer.vocab_size
    if tokenizer_json:
        try:
            vocab_size = tokenizer_vocab(tokenizer_json, DATA_TOKENIZER)
        except IntegrityError as exc:
            raise ManifestError(f"the tokenizer.json beside data.source {cfg.source!r} does not parse: {exc}") from exc
        if vocab_size > manifest.tokenizer.vocab_size:
            raise ManifestError(
                f"the tokenizer.json beside data.source {cfg.source!r} has {vocab_size} ids; set"
                f" tokenizer.vocab_size to at least that (it is {manifest.tokenizer.vocab_size})"
            )
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ManifestError(
            f"data.source {cfg.source!r} holds token id {int(tokens.max())}, but the vocabulary has {vocab_size}"
            " ids; raise tokenizer.vocab_size or put the matching tokenizer.json beside the shards"
        )
    row = cfg.seq_len + 1
    n_seq = tokens.size // row
    if n_seq < 2:
        raise ManifestError(
            f"data.source {cfg.source!r} gives {tokens.size} tokens, fewer than two sequences of"
            f" data.seq_len + 1 = {row}; add text or lower data.seq_len"
        )
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    sequences = tokens[: n_seq * row].astype(dtype, copy=False).reshape(n_seq, row)

    # Held-out rows: a seed-chosen random subset, stored after the train rows in random order.
    n_heldout = min(n_seq - 1, max(1, round(n_seq * cfg.heldout_fraction)))
    held = heldout_rows(manifest.run.seed, n_seq, n_heldout)
    is_train = np.ones(n_seq, dtype=bool)
    is_train[held] = False
    ordered = np.concatenate([sequences[is_train], sequences[held]])

    shards = []
    rows_per_shard = max(1, SHARD_TOKENS // row)
    for i, start in enumerate(range(0, n_seq, rows_per_shard)):
        part = np.ascontiguousarray(ordered[start : start + rows_per_shard])
        buf = io.BytesIO()
        np.save(buf, part, allow_pickle=False)
        data = buf.getvalue()
        store.put(shard_key(i), data)
        shards.append((shard_key(i), sha256_hex(data), int(part.size)))
    if tokenizer_json:
        store.put(DATA_TOKENIZER, tokenizer_json)
    index = DataIndex(
        tokenizer_sha256=sha256_hex(tokenizer_json) if tokenizer_json else "",
        shards=tuple(shards),
        n_sequences=n_seq,
        n_train=n_seq - n_heldout,
        n_heldout=n_heldout,
        seq_len=cfg.seq_len,
        vocab_size=vocab_size,
        seed=manifest.run.seed,
        source=source,
    )
    store.put(DATA_INDEX, index.to_json())  # written last: its presence means the data is complete
    log.info(
        "prepared %s: %d tokens, %d sequences (%d train, %d held out), vocab %d, %d shards, index %s",
        source, tokens.size, n_seq, index.n_train, n_heldout, vocab_size, len(shards), index.digest[:16],
    )
    return index


class TokenData:
    """A run's verified token sequences: global ids [0, n_train) train, then held out."""

    def __init__(self, index: DataIndex, shards: Sequence[np.ndarray], tokenizer_json: bytes):
        self.index = index
        self.seq_len = index.seq_len
        self.vocab_size = index.vocab_size
        self.n_train = index.n_train
        self.n_heldout = index.n_heldout
        self.n_sequences = index.n_sequences
        self.tokenizer_json = tokenizer_json
        self._shards = list(shards)  # each [rows, seq_len + 1]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])[:-1]

    @classmethod
    def load(
        cls,
        manifest: Manifest,
        store: Store,
        cache_dir: str | Path | None = None,
        *,
        index_sha256: str | None = None,
    ) -> TokenData:
        """Fetch index, tokenizer and shards from ``store``, verifying every SHA-256.

        ``index_sha256`` (default: the manifest's ``data.index_sha256``) pins the index
        itself; without either the index is trusted as found. Shards are cached under ``cache_dir`` by hash.
        """
        try:
            index_bytes = store.get(DATA_INDEX, max_bytes=MAX_INDEX_BYTES)
        except ObjectNotFound as exc:
            hint = "the run's data is not in the store; run `locoswarm init` first"
            raise ObjectNotFound(hint, key=DATA_INDEX) from exc
        index_sha256 = index_sha256 or manifest.data.index_sha256 or None
        if index_sha256 is not None and sha256_hex(index_bytes) != index_sha256:
            got = sha256_hex(index_bytes)
            raise IntegrityError(f"data index hash {got} is not the expected {index_sha256}", key=DATA_INDEX)
        index = DataIndex.from_json(index_bytes)
        _check_matches_manifest(index, manifest)
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)

        tokenizer_json = b""
        if index.tokenizer_sha256:
            tokenizer_json = _fetch(store, DATA_TOKENIZER, index.tokenizer_sha256, MAX_TOKENIZER_BYTES, cache, ".json")
            n_ids = tokenizer_vocab(tokenizer_json, DATA_TOKENIZER)
            if n_ids != index.vocab_size:
                why = f"tokenizer has {n_ids} ids, index says {index.vocab_size}"
                raise IntegrityError(why, key=DATA_TOKENIZER)

        row = index.seq_len + 1
        shards = []
        for key, sha, n_tokens in index.shards:
            cap = n_tokens * 4 + 10 + NPY_HEADER_MAX
            array = parse_npy(_fetch(store, key, sha, cap, cache, ".npy"), key)
            if array.shape != (n_tokens // row, row):
                raise IntegrityError(f"shard shape {array.shape} is not ({n_tokens // row}, {row})", key=key)
            if array.size and int(array.max()) >= index.vocab_size:
                why = f"token id {int(array.max())} is outside the vocabulary of {index.vocab_size}"
                raise IntegrityError(why, key=key)
            shards.append(array)
        log.info("loaded data %s: %d sequences of %d tokens", index.digest[:16], index.n_sequences, row)
        return cls(index, shards, tokenizer_json)

    def batch(self, seq_ids: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Rows for global sequence ids (1-D): int64 [B, seq_len + 1]."""
        ids = np.asarray(seq_ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"seq_ids must be 1-D, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_sequences):
            raise ValueError(f"sequence ids must be in [0, {self.n_sequences})")
        out = np.empty((ids.size, self.seq_len + 1), dtype=np.int64)
        which = np.searchsorted(self._starts, ids, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            out[mask] = self._shards[s][ids[mask] - self._starts[s]]
        return torch.from_numpy(out)

    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (for decoding samples); ``ValueError`` when the data has none."""
        if not self.tokenizer_json:
            raise ValueError("this run's data was pre-tokenized without a tokenizer.json")
        return Tokenizer.from_str(self.tokenizer_json.decode())


def _check_matches_manifest(index: DataIndex, manifest: Manifest) -> None:
    """The stored data must have been prepared for this run's sequence length, seed and vocab."""
    if index.seq_len != manifest.data.seq_len:
        raise ManifestError(f"stored data has seq_len {index.seq_len}, the manifest says {manifest.data.seq_len}")
    if index.seed != manifest.run.seed:
        raise ManifestError(
            f"stored data was split with seed {index.seed}, the manifest's run.seed is {manifest.run.seed}"
        )
    if index.tokenizer_sha256 and index.vocab_size > manifest.tokenizer.vocab_size:
        raise ManifestError(
            f"stored tokenizer has {index.vocab_size} ids, over the manifest's tokenizer.vocab_size"
            f" {manifest.tokenizer.vocab_size}"
        )


def _fetch(store: Store, key: str, sha: str, max_bytes: int, cache: Path | None, suffix: str) -> bytes:
    """Bytes of ``key`` whose SHA-256 must be ``sha``: from the cache when a good copy is there."""
    if cache is not None:
        cached = cache / f"{sha}{suffix}"
        try:
            data = cached.read_bytes()
        except FileNotFoundError:
            pass
        else:
            if sha256_hex(data) == sha:
                return data
            log.warning("cached %s does not match its hash; fetching it again", cached)
    data = store.get(key, max_bytes=max_bytes)
    if sha256_hex(data) != sha:
        raise IntegrityError(f"SHA-256 {sha256_hex(data)} does not match the index's {sha}", key=key)
    if cache is not None:
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cache / f"{sha}{suffix}")
    return data
