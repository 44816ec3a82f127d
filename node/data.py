"""The offline data pipeline: build a run's corpus once, store it, and hand out sequences.

``prepare`` (run by ``locoswarm init``) reads the corpus named by ``manifest.data.source``,
trains a byte-level BPE tokenizer on it, cuts the token stream into sequences of
``seq_len + 1`` tokens and writes to the run's store::

    data/tokenizer.json       the tokenizer (HF ``tokenizers`` JSON)
    data/shard-00000.npy ...  uint16/uint32 arrays [rows, seq_len + 1], train rows first
    data/index.json           ``DataIndex``: every object's SHA-256, split sizes

The default source, "stdlib", is the .py files of Python's own standard library, so a run
needs no download (the bytes differ between CPython patch releases; the index records which
one built it, and peers load the store's copy, never their own). Held-out sequences are a
pseudo-random subset picked by the run seed and stored *after* the train rows: global
sequence ids ``[0, n_train)`` are train, ``[n_train, n_sequences)`` held out.

``TokenData.load`` fetches and verifies everything (SHA-256 against the index, npy headers
parsed by hand so a forged shape cannot make it allocate, token ids below the vocabulary)
and caches shards on disk by hash. ``assigned_batches`` is the pure function that says
which train sequences a peer trains on in a window; anyone can recompute it.

All randomness comes from SHA-256-seeded PCG64 *raw* output (its bit stream is stable across
platforms and numpy versions, unlike ``Generator`` methods), mapped to ranges with ``%``
(bias below n / 2**64, negligible).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from protocol.errors import IntegrityError, ManifestError, ObjectNotFound, StoreError
from protocol.manifest import Manifest
from protocol.stores.base import Store, check_key

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
"""Separates documents; every tokenizer ``prepare`` trains gives it id 0."""

INDEX_KEY = "data/index.json"
TOKENIZER_KEY = "data/tokenizer.json"
SHARD_TOKENS = 1 << 22
"""Target tokens per shard (8 MiB at uint16): small enough for one S3 request."""
TEXT_SUFFIXES = (".txt", ".md", ".py")
TOKEN_SUFFIXES = (".npy", ".bin")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
"""Left out of the stdlib corpus: third-party code, and tests (huge, repetitive fixtures)."""

MAX_INDEX_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 64 << 20
_NPY_HEADER_MAX = 1 << 16


def shard_key(i: int) -> str:
    return f"data/shard-{i:05d}.npy"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------------------


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
        return _sha256(self.to_json())

    @classmethod
    def from_json(cls, data: bytes) -> DataIndex:
        """Parse and check an index; anything off raises ``IntegrityError`` saying what."""

        def bad(why: str) -> IntegrityError:
            return IntegrityError(f"data index is invalid: {why}", key=INDEX_KEY)

        try:
            raw = json.loads(data.decode("utf-8"))
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
            raise bad(f"unknown format {raw['format']!r}")
        for k in ints:
            if type(raw[k]) is not int or raw[k] < 0:
                raise bad(f"{k} must be a non-negative integer, got {raw[k]!r}")
        for k in strs:
            if not isinstance(raw[k], str):
                raise bad(f"{k} must be a string")
        if raw["tokenizer_sha256"] and not _is_sha256(raw["tokenizer_sha256"]):
            raise bad("tokenizer_sha256 is not a SHA-256 hex digest")
        if not isinstance(raw["shards"], list) or not raw["shards"]:
            raise bad("shards must be a non-empty list")
        row = raw["seq_len"] + 1
        shards = []
        for s in raw["shards"]:
            ok = isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and isinstance(s[1], str)
            if not ok or type(s[2]) is not int or not s[0].startswith("data/") or not _is_sha256(s[1]):
                raise bad(f"shard entry {s!r} is not [data/ key, sha256, n_tokens]")
            try:
                check_key(s[0])
            except StoreError as exc:
                raise bad(f"shard key {s[0]!r} is not a valid store key") from exc
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


def _is_sha256(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


# ---------------------------------------------------------------------------------------
# Deterministic sampling
# ---------------------------------------------------------------------------------------


def _bit_generator(*parts: object) -> np.random.PCG64:
    """PCG64 seeded from SHA-256 of the '|'-joined parts (a domain tag comes first)."""
    material = b"|".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
    return np.random.PCG64(int.from_bytes(hashlib.sha256(material).digest(), "little"))


def _sample_distinct(bits: np.random.PCG64, n: int, k: int) -> list[int]:
    """k distinct integers in [0, n) in random order: Floyd's sampler, then Fisher-Yates.

    O(k) whatever n is, so a validator can recompute many peers' assignments cheaply.
    """
    raw = bits.random_raw(2 * k).tolist()
    chosen: set[int] = set()
    out: list[int] = []
    for i, j in enumerate(range(n - k, n)):
        t = raw[i] % (j + 1)
        pick = j if t in chosen else t
        chosen.add(pick)
        out.append(pick)
    for i in range(k - 1, 0, -1):
        s = raw[k + i] % (i + 1)
        out[i], out[s] = out[s], out[i]
    return out


def _draw(bits: np.random.PCG64, n: int, count: int) -> np.ndarray:
    """``count`` ids in [0, n): distinct while count <= n, else in rounds of n distinct ids."""
    out: list[int] = []
    while len(out) < count:
        out.extend(_sample_distinct(bits, n, min(n, count - len(out))))
    return np.asarray(out, dtype=np.int64)


def assigned_batches(seed: int, window: int, peer_id: str, steps: int, batch_size: int, n_train: int) -> np.ndarray:
    """Train-sequence ids a peer trains on in a window: int64 [steps, batch_size] in [0, n_train).

    A pure function of its arguments, so validators recompute it exactly. Ids are distinct
    within a window unless the window needs more than n_train sequences.
    """
    if n_train < 1 or steps < 0 or batch_size < 1:
        raise ValueError(f"need n_train >= 1, steps >= 0, batch_size >= 1 (got {n_train}, {steps}, {batch_size})")
    bits = _bit_generator("locoswarm/assign/v1", seed, window, peer_id)
    return _draw(bits, n_train, steps * batch_size).reshape(steps, batch_size)


class _Split(Protocol):
    n_train: int
    n_heldout: int


def heldout_ids(n_eval: int, data: _Split) -> np.ndarray:
    """The fixed held-out evaluation set: the first ``n_eval`` held-out sequences (fewer if
    the split is smaller). Held-out rows were stored in random order, so this is a random sample."""
    return data.n_train + np.arange(min(n_eval, data.n_heldout), dtype=np.int64)


def unassigned_batches(seed_material: bytes, steps: int, batch_size: int, data: _Split) -> np.ndarray:
    """Held-out sequence ids int64 [steps, batch_size], chosen by material peers could not know
    in advance (e.g. a later window's close record); for validators."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1 (got {steps}, {batch_size})")
    bits = _bit_generator(b"locoswarm/unassigned/v1", seed_material)
    ids = _draw(bits, data.n_heldout, steps * batch_size) + data.n_train
    return ids.reshape(steps, batch_size)


# ---------------------------------------------------------------------------------------
# prepare: source -> tokens -> sequences -> store
# ---------------------------------------------------------------------------------------


def prepare(manifest: Manifest, store: Store) -> DataIndex:
    """Build the run's corpus from ``manifest.data.source`` and write it to ``store``.

    Deterministic: the same source and manifest give byte-identical objects and index.
    """
    cfg = manifest.data
    tokens, tokenizer_json, source = _corpus_tokens(manifest, store)
    vocab_size = manifest.tokenizer.vocab_size
    if tokenizer_json:
        try:
            vocab_size = _tokenizer_vocab(tokenizer_json, TOKENIZER_KEY)
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
    held = np.asarray(_sample_distinct(_bit_generator("locoswarm/heldout/v1", manifest.run.seed), n_seq, n_heldout))
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
        shards.append((shard_key(i), _sha256(data), int(part.size)))
    if tokenizer_json:
        store.put(TOKENIZER_KEY, tokenizer_json)
    index = DataIndex(
        tokenizer_sha256=_sha256(tokenizer_json) if tokenizer_json else "",
        shards=tuple(shards),
        n_sequences=n_seq,
        n_train=n_seq - n_heldout,
        n_heldout=n_heldout,
        seq_len=cfg.seq_len,
        vocab_size=vocab_size,
        seed=manifest.run.seed,
        source=source,
    )
    store.put(INDEX_KEY, index.to_json())  # written last: its presence means the data is complete
    log.info(
        "prepared %s: %d tokens, %d sequences (%d train, %d held out), vocab %d, %d shards, index %s",
        source, tokens.size, n_seq, index.n_train, n_heldout, vocab_size, len(shards), index.digest[:16],
    )
    return index


def _corpus_tokens(manifest: Manifest, store: Store) -> tuple[np.ndarray, bytes, str]:
    """(flat token ids, tokenizer JSON or b"", description of the source) for the manifest's source."""
    source = manifest.data.source
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        texts = _read_texts(_stdlib_files(root), root, manifest.data.max_chars)
        return (*_tokenize(texts, manifest.tokenizer.vocab_size), f"stdlib (CPython {sys.version.split()[0]})")
    if source.startswith("store:"):
        return (*_store_tokens(store, source.removeprefix("store:"), manifest.tokenizer.vocab_size), source)
    path = Path(source)
    if not path.exists():
        raise ManifestError(f"data.source {source!r}: no such file or folder (or use 'stdlib' or 'store:<key>')")
    if path.is_file():
        if path.suffix in TOKEN_SUFFIXES:
            return (*_local_tokens([path], manifest.tokenizer.vocab_size), source)
        texts = _read_texts([path], path.parent, manifest.data.max_chars)
        return (*_tokenize(texts, manifest.tokenizer.vocab_size), source)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        texts = _hf_dataset_texts(path, manifest.data.max_chars)
        return (*_tokenize(texts, manifest.tokenizer.vocab_size), source)
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    text_files = [p for p in files if p.suffix in TEXT_SUFFIXES]
    token_files = [p for p in files if p.suffix in TOKEN_SUFFIXES]
    if text_files and token_files:
        raise ManifestError(f"data.source {source!r} mixes text and token files; point it at one kind")
    if token_files:
        return (*_local_tokens(token_files, manifest.tokenizer.vocab_size), source)
    if not text_files:
        raise ManifestError(f"data.source {source!r} holds no {'/'.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} files")
    texts = _read_texts(text_files, path, manifest.data.max_chars)
    return (*_tokenize(texts, manifest.tokenizer.vocab_size), source)


def _stdlib_files(root: Path) -> list[Path]:
    """The stdlib's .py files, sorted by relative path, skipping ``STDLIB_SKIP_DIRS``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_texts(files: Iterable[Path], root: Path, max_chars: int) -> list[str]:
    """File contents in the given order, stopping at ``max_chars`` characters in total."""
    texts, total = [], 0
    for f in files:
        if total >= max_chars:
            break
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ManifestError(f"cannot read corpus file {f}: {exc}") from exc
        text = text[: max_chars - total]
        texts.append(text)
        total += len(text)
    log.info("read %d characters from %d files under %s", total, len(texts), root)
    return texts


def _hf_dataset_texts(path: Path, max_chars: int) -> list[str]:
    """Rows of the text column of a dataset saved with HF ``datasets.save_to_disk``."""
    try:
        import datasets
    except ImportError as exc:
        raise ManifestError(f"data.source {path} is an HF dataset; install the `datasets` package") from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    columns = [n for n, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not columns:
        raise ManifestError(f"HF dataset {path} has no text column")
    column = "text" if "text" in columns else columns[0]
    texts, total = [], 0
    for batch in ds.iter(batch_size=1000):
        for text in batch[column]:
            if total >= max_chars:
                return texts
            text = (text or "")[: max_chars - total]
            texts.append(text)
            total += len(text)
    return texts


def _tokenize(texts: list[str], vocab_size: int) -> tuple[np.ndarray, bytes]:
    """Train a byte-level BPE tokenizer on ``texts`` and encode them, EOT after each document."""
    if vocab_size < 257:
        raise ManifestError("tokenizer.vocab_size must be >= 257 (256 bytes + the end-of-text token)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    ids: list[int] = []
    for enc in tokenizer.encode_batch_fast(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint32), tokenizer.to_str().encode()


def _local_tokens(files: list[Path], vocab_size: int) -> tuple[np.ndarray, bytes]:
    """Concatenated ids of local .npy/.bin shards, plus a tokenizer.json found beside them."""
    parts = []
    for f in files:
        try:
            if f.suffix == ".npy":
                parts.append(_token_array(np.load(f, allow_pickle=False), str(f)))
            else:
                parts.append(np.fromfile(f, dtype=_bin_dtype(vocab_size)))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"cannot read token shard {f}: {exc}") from exc
    beside = files[0].parent / "tokenizer.json"
    return np.concatenate(parts), beside.read_bytes() if beside.is_file() else b""


def _store_tokens(store: Store, key: str, vocab_size: int) -> tuple[np.ndarray, bytes]:
    """Token shards already in the store: one key, or every .npy/.bin under a prefix."""
    under = store.list(key) if key.endswith("/") else [o for o in store.list(key) if o.key == key]
    keys = [o.key for o in under if o.key.endswith(TOKEN_SUFFIXES)]
    if not keys:
        raise ManifestError(f"data.source 'store:{key}': no .npy/.bin objects under that key")
    parts = []
    for k in keys:
        data = store.get(k)
        if k.endswith(".npy"):
            array = _parse_npy(data, k)
            parts.append(_token_array(array, k))
        else:
            parts.append(np.frombuffer(data, dtype=_bin_dtype(vocab_size)))
    tok_key = key.rpartition("/")[0] + "/tokenizer.json" if "/" in key else "tokenizer.json"
    try:
        tokenizer_json = store.get(tok_key, max_bytes=MAX_TOKENIZER_BYTES)
    except ObjectNotFound:
        tokenizer_json = b""
    return np.concatenate(parts), tokenizer_json


def _bin_dtype(vocab_size: int) -> type:
    """Raw .bin shards carry no header: uint16 (nanoGPT's layout) unless the vocab needs 32 bits."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _token_array(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype.kind != "u" or array.dtype.itemsize not in (2, 4):
        raise ManifestError(f"token shard {where} has dtype {array.dtype}; use uint16 or uint32")
    return array.reshape(-1)


# ---------------------------------------------------------------------------------------
# Loading and verifying
# ---------------------------------------------------------------------------------------


def _parse_npy(data: bytes, key: str) -> np.ndarray:
    """An array view of npy bytes, checking header and length before touching the payload.

    Never ``np.load`` of untrusted bytes: no pickle, and no allocation sized by a forged header.
    """
    fp = io.BytesIO(data[: 10 + _NPY_HEADER_MAX])
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
            index_bytes = store.get(INDEX_KEY, max_bytes=MAX_INDEX_BYTES)
        except ObjectNotFound as exc:
            hint = "the run's data is not in the store; run `locoswarm init` first"
            raise ObjectNotFound(hint, key=INDEX_KEY) from exc
        index_sha256 = index_sha256 or manifest.data.index_sha256 or None
        if index_sha256 is not None and _sha256(index_bytes) != index_sha256:
            got = _sha256(index_bytes)
            raise IntegrityError(f"data index hash {got} is not the expected {index_sha256}", key=INDEX_KEY)
        index = DataIndex.from_json(index_bytes)
        _check_matches_manifest(index, manifest)
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)

        tokenizer_json = b""
        if index.tokenizer_sha256:
            tokenizer_json = _fetch(store, TOKENIZER_KEY, index.tokenizer_sha256, MAX_TOKENIZER_BYTES, cache, ".json")
            tokenizer_vocab = _tokenizer_vocab(tokenizer_json, TOKENIZER_KEY)
            if tokenizer_vocab != index.vocab_size:
                why = f"tokenizer has {tokenizer_vocab} ids, index says {index.vocab_size}"
                raise IntegrityError(why, key=TOKENIZER_KEY)

        row = index.seq_len + 1
        shards = []
        for key, sha, n_tokens in index.shards:
            cap = n_tokens * 4 + 10 + _NPY_HEADER_MAX
            array = _parse_npy(_fetch(store, key, sha, cap, cache, ".npy"), key)
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


def _tokenizer_vocab(tokenizer_json: bytes, key: str) -> int:
    """Vocabulary size of a tokenizer JSON; ``IntegrityError`` when it does not parse."""
    try:
        return Tokenizer.from_str(tokenizer_json.decode()).get_vocab_size()
    except Exception as exc:  # the Rust parser raises plain Exception (or UnicodeDecodeError)
        raise IntegrityError(f"tokenizer does not parse: {exc}", key=key) from exc


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
            if _sha256(data) == sha:
                return data
            log.warning("cached %s does not match its hash; fetching it again", cached)
    data = store.get(key, max_bytes=max_bytes)
    if _sha256(data) != sha:
        raise IntegrityError(f"SHA-256 {_sha256(data)} does not match the index's {sha}", key=key)
    if cache is not None:
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cache / f"{sha}{suffix}")
    return data
