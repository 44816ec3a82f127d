"""node.corpus / node.dataset / protocol.assignment: deterministic corpus preparation,
verified loading, and batch assignment."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from node.corpus import EOT_TOKEN
from node.dataset import TokenData, prepare
from protocol.assignment import assigned_batches, heldout_ids, unassigned_batches
from protocol.dataindex import DataIndex, parse_npy
from protocol.errors import IntegrityError, ManifestError, ObjectNotFound
from protocol.manifest import Manifest
from protocol.paths import DATA_INDEX, DATA_TOKENIZER, shard_key
from protocol.stores.file import FileStore
from protocol.stores.memory import MemoryStore


def small_manifest(source: str = "stdlib", **changes: object) -> Manifest:
    base = Manifest().replace(
        data__source=source, data__max_chars=300_000, data__seq_len=64, tokenizer__vocab_size=512
    )
    return base.replace(**changes)


@pytest.fixture(scope="module")
def stdlib_store() -> tuple[Manifest, MemoryStore, DataIndex]:
    manifest = small_manifest()
    store = MemoryStore()
    return manifest, store, prepare(manifest, store)


def objects(store: FileStore | MemoryStore) -> dict[str, bytes]:
    return {o.key: store.get(o.key) for o in store.list("data/")}


# ---- prepare ---------------------------------------------------------------------------


def test_two_independent_prepares_write_identical_objects(tmp_path, stdlib_store):
    manifest, memory, index = stdlib_store
    file_store = FileStore(tmp_path / "store")
    again = prepare(manifest, file_store)
    assert again == index
    assert again.to_json() == memory.get(DATA_INDEX)
    assert objects(file_store) == objects(memory)


def test_index_hashes_every_object_it_names(stdlib_store):
    _, store, index = stdlib_store
    assert hashlib.sha256(store.get(DATA_TOKENIZER)).hexdigest() == index.tokenizer_sha256
    for key, sha, n_tokens in index.shards:
        data = store.get(key)
        assert hashlib.sha256(data).hexdigest() == sha
        assert np.load(io.BytesIO(data), allow_pickle=False).size == n_tokens


def test_stdlib_corpus_is_capped_and_split(stdlib_store):
    manifest, _, index = stdlib_store
    assert index.source.startswith("stdlib (CPython 3.")
    assert index.vocab_size == 512 and index.seq_len == 64
    # 300k characters of Python compress to roughly 2-4 characters per token at vocab 512.
    assert 300_000 / 5 < index.n_sequences * 65 < 300_000 / 1.5
    assert index.n_heldout == round(index.n_sequences * manifest.data.heldout_fraction)
    assert index.n_train + index.n_heldout == index.n_sequences


def test_eot_token_has_id_zero(stdlib_store):
    _, store, _ = stdlib_store
    tok = Tokenizer.from_str(store.get(DATA_TOKENIZER).decode())
    assert tok.token_to_id(EOT_TOKEN) == 0


def test_heldout_split_depends_on_run_seed_but_tokenizer_does_not(stdlib_store):
    manifest, store, index = stdlib_store
    other = MemoryStore()
    index2 = prepare(manifest.replace(run__seed=manifest.run.seed + 1), other)
    assert index2.tokenizer_sha256 == index.tokenizer_sha256
    assert index2.shards[0][1] != index.shards[0][1]
    assert index2.n_heldout == index.n_heldout


def test_text_folder_source_reads_sorted_text_files_only(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "b" / "two.md").write_text("# second document\n" + "beta gamma delta " * 400)
    (corpus / "a.txt").write_text("first document: " + "alpha beta " * 400)
    (corpus / "ignored.json").write_text('{"never": "read"}' * 100)
    manifest = small_manifest(str(corpus), data__seq_len=16, tokenizer__vocab_size=300)
    store = MemoryStore()
    index = prepare(manifest, store)
    data = TokenData.load(manifest, store)
    text = data.tokenizer().decode(data.batch(np.arange(data.n_train)).reshape(-1).tolist())
    assert "never" not in text
    assert index.vocab_size <= 300
    # The first train rows come from a.txt (sorted before b/two.md) unless held out.
    first = data.tokenizer().decode(data.batch([0])[0].tolist())
    assert "alpha" in first or "first" in first


def test_text_source_respects_max_chars(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 100_000)
    manifest = small_manifest(str(tmp_path / "big.txt"), data__max_chars=20_000, data__seq_len=8)
    index = prepare(manifest, MemoryStore())
    # 20_000 characters are 4_000 words; each is at least one token, and the whole file
    # would be 100_000 tokens.
    assert 3_900 <= index.n_sequences * 9 <= 4_001


def test_npy_token_folder_with_tokenizer_round_trips(tmp_path, stdlib_store):
    _, stdlib, _ = stdlib_store
    tokens = np.random.default_rng(0).integers(0, 512, size=5000).astype(np.uint16)
    folder = tmp_path / "tokens"
    folder.mkdir()
    np.save(folder / "part-0.npy", tokens[:3000])
    np.save(folder / "part-1.npy", tokens[3000:])
    (folder / "tokenizer.json").write_bytes(stdlib.get(DATA_TOKENIZER))
    manifest = small_manifest(str(folder), data__seq_len=49)
    store = MemoryStore()
    index = prepare(manifest, store)
    assert index.n_sequences == 5000 // 50
    data = TokenData.load(manifest, store)
    rows = data.batch(np.arange(data.n_sequences)).numpy()
    # Every stored row is one of the original 50-token windows, each exactly once.
    original = tokens.reshape(-1, 50)
    assert sorted(map(bytes, rows.astype(np.uint16))) == sorted(map(bytes, original))
    assert data.tokenizer_json == stdlib.get(DATA_TOKENIZER)


def test_bin_shard_and_store_key_sources_agree(tmp_path):
    tokens = np.arange(4000, dtype=np.uint16) % 700
    (tmp_path / "train.bin").write_bytes(tokens.tobytes())
    manifest = small_manifest(str(tmp_path / "train.bin"), tokenizer__vocab_size=700, data__seq_len=39)
    from_file = prepare(manifest, MemoryStore())
    store = MemoryStore()
    buf = io.BytesIO()
    np.save(buf, tokens)
    store.put("incoming/train.npy", buf.getvalue())
    from_store = prepare(manifest.replace(data__source="store:incoming/"), store)
    assert from_file.shards == from_store.shards
    assert from_store.tokenizer_sha256 == ""  # no tokenizer.json beside the shard


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    np.save(tmp_path / "t.npy", np.full(1000, 600, dtype=np.uint16))
    with pytest.raises(ManifestError, match="token id 600"):
        prepare(small_manifest(str(tmp_path / "t.npy"), tokenizer__vocab_size=512), MemoryStore())


def test_too_small_corpus_names_the_fix(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ManifestError, match="seq_len"):
        prepare(small_manifest(str(tmp_path / "tiny.txt")), MemoryStore())


def test_missing_source_path_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        prepare(small_manifest(str(tmp_path / "nowhere")), MemoryStore())


def test_hf_dataset_directory_source(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    datasets.Dataset.from_dict({"text": ["one doc " * 300, "two doc " * 300]}).save_to_disk(str(tmp_path / "ds"))
    index = prepare(small_manifest(str(tmp_path / "ds"), data__seq_len=16, tokenizer__vocab_size=300), MemoryStore())
    assert index.n_sequences > 10


# ---- load and verify -------------------------------------------------------------------


def copy_store(store: MemoryStore) -> MemoryStore:
    out = MemoryStore()
    for key, data in objects(store).items():
        out.put(key, data)
    return out


def test_tampered_shard_raises_integrity_error(stdlib_store):
    manifest, store, index = stdlib_store
    bad = copy_store(store)
    data = bytearray(bad.get(shard_key(0)))
    data[-1] ^= 1
    bad.put(shard_key(0), bytes(data))
    with pytest.raises(IntegrityError, match="does not match"):
        TokenData.load(manifest, bad)


def test_tampered_tokenizer_raises_integrity_error(stdlib_store):
    manifest, store, _ = stdlib_store
    bad = copy_store(store)
    bad.put(DATA_TOKENIZER, bad.get(DATA_TOKENIZER).replace(b"\"merges\"", b"\"merges\" "))
    with pytest.raises(IntegrityError):
        TokenData.load(manifest, bad)


def test_corrupt_cache_entry_is_fetched_again(tmp_path, stdlib_store):
    manifest, store, index = stdlib_store
    first = TokenData.load(manifest, store, tmp_path)
    cached = tmp_path / f"{index.shards[0][1]}.npy"
    cached.write_bytes(b"garbage")
    second = TokenData.load(manifest, store, tmp_path)
    assert np.array_equal(first.batch([0, 1]), second.batch([0, 1]))
    assert cached.read_bytes() == store.get(shard_key(0))


def test_pinned_index_hash_must_match(stdlib_store):
    manifest, store, index = stdlib_store
    assert TokenData.load(manifest, store, index_sha256=index.digest).n_sequences == index.n_sequences
    with pytest.raises(IntegrityError, match="not the expected"):
        TokenData.load(manifest, store, index_sha256="0" * 64)


def test_data_for_another_sequence_length_is_refused(stdlib_store):
    manifest, store, _ = stdlib_store
    with pytest.raises(ManifestError, match="seq_len"):
        TokenData.load(manifest.replace(data__seq_len=128), store)


def test_loading_before_prepare_says_what_to_do():
    with pytest.raises(ObjectNotFound, match="locoswarm init"):
        TokenData.load(small_manifest(), MemoryStore())


def test_index_json_round_trips_and_refuses_coercion(stdlib_store):
    _, _, index = stdlib_store
    assert DataIndex.from_json(index.to_json()) == index
    raw = json.loads(index.to_json())
    for key, value in [("n_train", float(raw["n_train"])), ("seq_len", "64"), ("extra", 1), ("shards", [])]:
        forged = dict(raw, **{key: value})
        with pytest.raises(IntegrityError):
            DataIndex.from_json(json.dumps(forged).encode())
    inconsistent = dict(raw, n_train=raw["n_train"] + 1)
    with pytest.raises(IntegrityError, match="sum to n_sequences"):
        DataIndex.from_json(json.dumps(inconsistent).encode())
    with pytest.raises(IntegrityError, match="not JSON"):
        DataIndex.from_json(b"\xff\xfe")


def test_npy_parser_refuses_forged_headers_and_pickles():
    header = b"{'descr': '<u2', 'fortran_order': False, 'shape': (1000000000000,), }"
    forged = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00\x00"
    with pytest.raises(IntegrityError, match="payload bytes"):
        parse_npy(forged, "data/x.npy")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(IntegrityError, match="uint16/uint32"):
        parse_npy(buf.getvalue(), "data/x.npy")
    with pytest.raises(IntegrityError, match="not a valid .npy"):
        parse_npy(b"PK\x03\x04 zip", "data/x.npy")
    negative = header.replace(b"(1000000000000,)", b"(-2, -4)       ")
    forged = b"\x93NUMPY\x01\x00" + len(negative).to_bytes(2, "little") + negative + bytes(16)
    with pytest.raises(IntegrityError, match="negative"):
        parse_npy(forged, "data/x.npy")


def _valid_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(130, dtype=np.uint16).reshape(2, 65))
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 140), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_npy_bytes_parse_or_raise_integrity_error(edits):
    data = bytearray(_valid_npy())
    for pos, value in edits:
        data[min(pos, len(data) - 1)] = value
    try:
        array = parse_npy(bytes(data), "data/x.npy")
    except IntegrityError:
        return
    assert array.size * array.itemsize <= len(data)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["n_train", "shards", "seq_len", "format", "seed"]), st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=6,
)))
def test_forged_index_fields_raise_integrity_error(stdlib_store, changes):
    raw = json.loads(stdlib_store[2].to_json())
    raw.update(changes)
    try:
        parsed = DataIndex.from_json(json.dumps(raw).encode())
    except IntegrityError:
        return
    assert parsed.to_json() == json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()


def test_batch_returns_int64_rows_of_seq_len_plus_one(stdlib_store):
    manifest, store, index = stdlib_store
    data = TokenData.load(manifest, store)
    ids = assigned_batches(1, 0, "p", 1, 8, data.n_train)[0]
    batch = data.batch(ids)
    assert batch.shape == (8, 65) and str(batch.dtype) == "torch.int64"
    assert int(batch.max()) < data.vocab_size
    with pytest.raises(ValueError):
        data.batch([data.n_sequences])


# ---- assignment ------------------------------------------------------------------------


def test_assignment_is_a_pure_function_of_its_inputs():
    a = assigned_batches(7, 3, "peer-a", 20, 8, 10_000)
    assert np.array_equal(a, assigned_batches(7, 3, "peer-a", 20, 8, 10_000))
    assert a.shape == (20, 8) and a.dtype == np.int64


def test_assignment_matches_golden_values():
    # Pins the wire-level rule: changing it silently would desynchronize validators.
    assert assigned_batches(1234, 0, "peer", 2, 3, 1000).tolist() == GOLDEN_ASSIGNMENT


GOLDEN_ASSIGNMENT = [[902, 68, 922], [799, 227, 241]]


def test_assignment_differs_across_peers_windows_and_seeds():
    base = assigned_batches(7, 3, "peer-a", 20, 8, 10_000)
    for other in (
        assigned_batches(7, 3, "peer-b", 20, 8, 10_000),
        assigned_batches(7, 4, "peer-a", 20, 8, 10_000),
        assigned_batches(8, 3, "peer-a", 20, 8, 10_000),
    ):
        assert not np.array_equal(base, other)


def test_assignment_stays_in_train_range_and_is_distinct_within_a_window():
    ids = assigned_batches(1, 0, "p", 50, 16, 1000)
    assert ids.min() >= 0 and ids.max() < 1000
    assert len(np.unique(ids)) == ids.size


def test_assignment_larger_than_the_train_split_cycles_through_it():
    ids = assigned_batches(1, 0, "p", 5, 10, 20)
    assert ids.min() >= 0 and ids.max() < 20
    first, second = ids.reshape(-1)[:20], ids.reshape(-1)[20:40]
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))


def test_assignment_never_includes_heldout_ids(stdlib_store):
    _, _, index = stdlib_store
    held = set(heldout_ids(index.n_heldout, index).tolist())
    for window in range(20):
        ids = assigned_batches(1234, window, f"peer{window % 3}", 20, 8, index.n_train)
        assert held.isdisjoint(ids.reshape(-1).tolist())


def test_heldout_and_unassigned_ids_come_from_the_heldout_split(stdlib_store):
    _, _, index = stdlib_store
    evals = heldout_ids(64, index)
    assert evals.tolist() == list(range(index.n_train, index.n_train + 64))
    assert len(heldout_ids(10**9, index)) == index.n_heldout
    u = unassigned_batches(b"close-record-of-window-9", 4, 8, index)
    assert u.shape == (4, 8)
    assert u.min() >= index.n_train and u.max() < index.n_sequences
    assert np.array_equal(u, unassigned_batches(b"close-record-of-window-9", 4, 8, index))
    assert not np.array_equal(u, unassigned_batches(b"close-record-of-window-10", 4, 8, index))


def test_tokenizer_beside_shards_larger_than_the_manifest_vocab_is_refused(tmp_path, stdlib_store):
    _, stdlib, _ = stdlib_store
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16) % 300)
    (tmp_path / "tokenizer.json").write_bytes(stdlib.get(DATA_TOKENIZER))  # 512 ids
    with pytest.raises(ManifestError, match="at least that"):
        prepare(small_manifest(str(tmp_path), tokenizer__vocab_size=400), MemoryStore())
