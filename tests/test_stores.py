"""One conformance suite for every store backend: file, memory, s3 (moto server) and p2p.

Each test gets a ``(writer, reader)`` pair. For file, memory and s3 both are the same store;
for p2p they are two real DHT nodes, so every read goes through the DHT and a libp2p stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import ObjectNotFound, StoreError
from protocol.stores import Store
from protocol.stores.file import FileStore
from protocol.stores.memory import MemoryStore

BACKENDS = ["file", "memory", "s3", "p2p"]


@pytest.fixture(params=BACKENDS)
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    if request.param == "file":
        store: Store = FileStore(tmp_path / "store")
        yield store, store
    elif request.param == "memory":
        store = MemoryStore()
        yield store, store
    elif request.param == "s3":
        make_s3: Callable[..., Any] = request.getfixturevalue("s3_store_factory")
        store = make_s3()
        yield store, store
    else:
        make_p2p: Callable[..., Any] = request.getfixturevalue("p2p_store_factory")
        writer = make_p2p()
        reader = make_p2p(initial_peers=writer.visible_maddrs)
        yield writer, reader


def test_put_then_get_returns_the_same_bytes(pair: tuple[Store, Store]) -> None:
    writer, reader = pair
    data = bytes(range(256)) * 300
    writer.put("windows/000001/payloads/peer-a.lsp", data)
    assert reader.get("windows/000001/payloads/peer-a.lsp") == data
    assert reader.exists("windows/000001/payloads/peer-a.lsp")


def test_put_overwrites_an_existing_object(pair: tuple[Store, Store]) -> None:
    writer, reader = pair
    writer.put("d/obj.bin", b"first")
    writer.put("d/obj.bin", b"second version")
    assert reader.get("d/obj.bin") == b"second version"


def test_put_if_absent_writes_only_once(pair: tuple[Store, Store]) -> None:
    writer, reader = pair
    assert writer.put_if_absent("windows/000002/once.lsr", b"winner") is True
    assert writer.put_if_absent("windows/000002/once.lsr", b"loser") is False
    assert reader.put_if_absent("windows/000002/once.lsr", b"late loser") is False
    assert reader.get("windows/000002/once.lsr") == b"winner"


def test_list_is_sorted_and_limited_to_the_prefix(pair: tuple[Store, Store]) -> None:
    writer, reader = pair
    for key, data in [("d/c.bin", b"333"), ("d/a.bin", b"1"), ("d/b.bin", b"22"), ("e/a.bin", b"x"), ("dd/a.bin", b"y")]:
        writer.put(key, data)
    listed = reader.list("d/")
    assert [(o.key, o.size) for o in listed] == [("d/a.bin", 1), ("d/b.bin", 2), ("d/c.bin", 3)]
    assert all(o.modified > 0 for o in listed)
    assert [o.key for o in reader.list("d/b.bin")] == ["d/b.bin"]
    assert reader.list("nothing/") == []


def test_delete_removes_and_is_idempotent(pair: tuple[Store, Store]) -> None:
    writer, reader = pair
    writer.put("d/gone.bin", b"bye")
    writer.delete("d/gone.bin")
    writer.delete("d/gone.bin")
    writer.delete("d/never-existed.bin")
    with pytest.raises(ObjectNotFound):
        reader.get("d/gone.bin")
    assert not reader.exists("d/gone.bin")
    assert reader.list("d/") == []


def test_missing_key_raises_object_not_found(pair: tuple[Store, Store]) -> None:
    _, reader = pair
    with pytest.raises(ObjectNotFound) as info:
        reader.get("d/missing.bin")
    assert info.value.key == "d/missing.bin"


def test_get_over_max_bytes_is_refused(pair: tuple[Store, Store]) -> None:
    writer, reader = pair
    writer.put("d/big.bin", b"x" * 1000)
    with pytest.raises(StoreError) as info:
        reader.get("d/big.bin", max_bytes=999)
    assert not isinstance(info.value, ObjectNotFound)
    assert "cap" in str(info.value)
    assert reader.get("d/big.bin", max_bytes=1000) == b"x" * 1000


INVALID_KEYS = ["../escape.bin", "/absolute.bin", "a//b.bin", "a/./b.bin", "a/../b.bin", "", "sp ace.bin", "a/", "é.bin",
                "k" * 513 + ".bin", "no-extension", "windows/000001/payloads", "a/x.lsp/nested.bin"]


def test_invalid_keys_are_refused(pair: tuple[Store, Store]) -> None:
    writer, reader = pair
    for key in INVALID_KEYS:
        with pytest.raises(StoreError):
            writer.put(key, b"x")
        with pytest.raises(StoreError):
            reader.get(key)
    assert reader.list("") == []


def test_file_store_survives_what_other_writers_plant(tmp_path: Path) -> None:
    """Whoever shares a file store's directory can plant a directory under a key (to block its
    owner's next write), a FIFO (to hang a reader) or a link to a device (to feed it forever)."""
    import os

    store = FileStore(tmp_path / "store")
    squatted = tmp_path / "store" / "w" / "mine.lsp"
    (squatted / "x").mkdir(parents=True)
    store.put("w/mine.lsp", b"payload")
    assert store.get("w/mine.lsp") == b"payload"
    os.mkfifo(tmp_path / "store" / "w" / "fifo.lsp")
    (tmp_path / "store" / "w" / "zero.lsp").symlink_to("/dev/zero")
    for key in ("w/fifo.lsp", "w/zero.lsp"):
        with pytest.raises(ObjectNotFound, match="regular file"):
            store.get(key, max_bytes=1 << 20)
