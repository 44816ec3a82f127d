"""A run's corpus: read the source the manifest names, and train its tokenizer.

The default source, "stdlib", is the .py files of Python's own standard library, so a run
needs no download (the bytes differ between CPython patch releases; the data index records
which one built it, and peers load the store's copy, never their own). Other sources: a text
file or folder, token shards (.npy/.bin, with a tokenizer.json beside them), shards already
in the store ("store:<key>"), or a saved HF ``datasets`` directory. Text is tokenized by a
byte-level BPE trained here with ``tokenizers``; ``EOT_TOKEN`` (id 0) separates documents.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from protocol.dataindex import parse_npy
from protocol.errors import IntegrityError, ManifestError, ObjectNotFound
from protocol.manifest import Manifest
from protocol.stores.base import Store

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
"""Separates documents; every tokenizer this module trains gives it id 0."""

TEXT_SUFFIXES = (".txt", ".md", ".py")
TOKEN_SUFFIXES = (".npy", ".bin")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
"""Left out of the stdlib corpus: third-party code, and tests (huge, repetitive fixtures)."""
MAX_TOKENIZER_BYTES = 64 << 20


def corpus_tokens(manifest: Manifest, store: Store) -> tuple[np.ndarray, bytes, str]:
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
            array = parse_npy(data, k)
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


def tokenizer_vocab(tokenizer_json: bytes, key: str) -> int:
    """Vocabulary size of a tokenizer JSON; ``IntegrityError`` when it does not parse."""
    try:
        return Tokenizer.from_str(tokenizer_json.decode()).get_vocab_size()
    except Exception as exc:  # the Rust parser raises plain Exception (or UnicodeDecodeError)
        raise IntegrityError(f"tokenizer does not parse: {exc}", key=key) from exc
