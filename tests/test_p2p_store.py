"""p2p:// with real hivemind DHT nodes and p2pd daemons on 127.0.0.1: churn, hostile records,
hostile holders, caps, re-announcement and late joiners."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest

from protocol.errors import (
    IntegrityError,
    ObjectNotFound,
    RecordRejected,
    StoreError,
    StoreUnavailable,
)
from protocol.identity import Identity
from protocol.records import sign_record
from protocol.stores import StoreSettings, open_store
from protocol.stores.p2p import KIND, P2PStore, parse_record

Factory = Callable[..., P2PStore]


def _tamper(store: P2PStore, key: str, data: bytes) -> None:
    """Make ``store`` serve ``data`` for ``key`` while its DHT record still names the old hash."""
    with store._held_lock:
        store._held[key].data = data
        store._held[key].size = len(data)


def _store_raw_record(store: P2PStore, directory: str, name: str, record: bytes) -> bool:
    """Ask the DHT to store a record exactly as given, bypassing ``put``."""
    from hivemind.utils.timed_storage import get_dht_time

    coro = store._node.store(store._namespace + directory, record, get_dht_time() + 60, subkey=name)
    return store._call("raw store", None, coro)


def test_peers_keep_working_when_one_of_three_leaves(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    b = p2p_store_factory(initial_peers=a.visible_maddrs)
    c = p2p_store_factory(initial_peers=a.visible_maddrs + b.visible_maddrs)
    a.put("w/a.bin", b"from a")
    b.put("w/b.bin", b"from b")
    assert c.get("w/a.bin") == b"from a"
    a.close()

    c.put("w/c.bin", b"from c")
    assert b.get("w/c.bin") == b"from c"
    assert c.get("w/b.bin") == b"from b"
    assert [o.key for o in b.list("w/")] in (["w/a.bin", "w/b.bin", "w/c.bin"], ["w/b.bin", "w/c.bin"])
    t0 = time.monotonic()
    with pytest.raises((ObjectNotFound, StoreUnavailable)):
        b.get("w/a.bin")
    assert time.monotonic() - t0 < 10


def test_a_late_joiner_fetches_objects_from_the_peers_that_hold_them(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    data = b"checkpoint" * 50_000
    a.put("checkpoints/000004/model.safetensors", data)
    late = p2p_store_factory(initial_peers=a.visible_maddrs)
    assert late.get("checkpoints/000004/model.safetensors") == data


def test_held_objects_are_reannounced_past_their_ttl(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory(record_ttl=3.0)
    b = p2p_store_factory(initial_peers=a.visible_maddrs, record_ttl=3.0)
    a.put("w/kept.bin", b"still here")
    time.sleep(4.5)  # records expire after 3 s; the holder re-announces every 1 s
    assert b.get("w/kept.bin") == b"still here"


def test_a_record_with_a_bad_signature_is_refused(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    b = p2p_store_factory(initial_peers=a.visible_maddrs)
    good = sign_record(Identity.from_seed(b"x"), KIND, a.run, {
        "key": "w/forged.bin", "sha256": "0" * 64, "size": 1, "holder": a.peer_id, "addrs": [],
        "created_at": time.time(), "deleted": False,
    })
    forged = bytearray(good)
    forged[-1] ^= 1
    with pytest.raises(RecordRejected, match="signature"):
        parse_record(bytes(forged), a.run)
    assert _store_raw_record(a, "w/", "forged", bytes(forged)) is False
    assert _store_raw_record(a, "w/", "elsewhere", good) is False  # valid, but under the wrong subkey
    assert _store_raw_record(a, "w/", "forged", b"not a record") is False
    with pytest.raises(ObjectNotFound):
        b.get("w/forged.bin")
    assert b.list("w/") == []


def test_a_record_of_another_run_is_refused(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    other = sign_record(Identity.from_seed(b"x"), KIND, "another-run", {
        "key": "w/k.bin", "sha256": "0" * 64, "size": 1, "holder": a.peer_id, "addrs": [],
        "created_at": time.time(), "deleted": False,
    })
    assert _store_raw_record(a, "w/", "k", other) is False


def test_a_holder_serving_wrong_bytes_raises_integrity_error(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    b = p2p_store_factory(initial_peers=a.visible_maddrs)
    a.put("w/x.bin", b"honest bytes")
    _tamper(a, "w/x.bin", b"HONEST BYTES")
    with pytest.raises(IntegrityError, match="sha256"):
        b.get("w/x.bin")


def test_a_holder_offering_more_than_its_record_is_cut_off(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    b = p2p_store_factory(initial_peers=a.visible_maddrs)
    a.put("w/small.bin", b"ten bytes!")
    _tamper(a, "w/small.bin", b"\0" * (8 << 20))
    t0 = time.monotonic()
    with pytest.raises(IntegrityError, match="record says 10"):
        b.get("w/small.bin", max_bytes=1 << 30)
    assert time.monotonic() - t0 < 5


def test_the_cap_is_checked_against_the_stream_length(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    b = p2p_store_factory(initial_peers=a.visible_maddrs)
    a.put("w/small.bin", b"ten bytes!")
    _tamper(a, "w/small.bin", b"\0" * (8 << 20))
    with pytest.raises(StoreError, match="over the cap of 1024"):
        b.get("w/small.bin", max_bytes=1024)


def test_objects_over_the_memory_budget_spill_to_disk(p2p_store_factory: Factory, tmp_path: Any) -> None:
    a = p2p_store_factory(max_memory_bytes=100, spill_dir=str(tmp_path))
    b = p2p_store_factory(initial_peers=a.visible_maddrs)
    a.put("w/tiny.bin", b"t" * 50)
    a.put("w/spilled.bin", b"s" * 1000)
    assert len(list(tmp_path.iterdir())) == 1
    assert b.get("w/spilled.bin") == b"s" * 1000
    assert b.get("w/tiny.bin") == b"t" * 50


def test_open_store_builds_a_p2p_store_and_close_is_idempotent(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    b = open_store(StoreSettings(f"p2p://{a.run}", initial_peers=tuple(a.visible_maddrs)))
    try:
        assert isinstance(b, P2PStore) and b.visible_maddrs[0].startswith("/ip4/127.0.0.1/")
        b.put("w/k.bin", b"v")
        assert a.get("w/k.bin") == b"v"
    finally:
        b.close()
        b.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        b.get("w/k.bin")


def test_bootstrap_peers_travel_in_the_uri() -> None:
    s = StoreSettings.parse("p2p://run?peers=/ip4/127.0.0.1/tcp/1/p2p/QmA,/ip4/127.0.0.1/tcp/2/p2p/QmB")
    assert s.initial_peers == ("/ip4/127.0.0.1/tcp/1/p2p/QmA", "/ip4/127.0.0.1/tcp/2/p2p/QmB")
    assert StoreSettings.parse(s.to_uri()) == s


def test_joining_through_a_dead_peer_fails_with_a_store_error(p2p_store_factory: Factory) -> None:
    a = p2p_store_factory()
    maddrs = a.visible_maddrs
    a.close()
    with pytest.raises(StoreError):
        p2p_store_factory(initial_peers=maddrs, startup_timeout=15.0)


def test_a_key_naming_a_peer_cannot_be_repointed_by_anyone_else(p2p_store_factory: Factory) -> None:
    """Re-pointing another peer's payload key (and back-dating it) is refused by every node:
    a key that names a peer is bound to that peer's signature."""
    owner, thief = Identity.from_seed(b"owner"), Identity.from_seed(b"thief")
    a = p2p_store_factory(identity=owner)
    b = p2p_store_factory(initial_peers=a.visible_maddrs, identity=thief)
    c = p2p_store_factory(initial_peers=a.visible_maddrs)
    key = f"windows/000001/payloads/{owner.peer_id}.lsp"
    a.put(key, b"the owner's bytes")
    with pytest.raises(StoreError):
        b.put(key, b"the thief's bytes")
    assert c.get(key) == b"the owner's bytes"
    assert not P2PStore.trusted_clock  # created_at is the writer's claim: nothing orders uploads by it
    forged = sign_record(thief, KIND, a.run, {
        "key": key, "sha256": hashlib.sha256(b"x").hexdigest(), "size": 1, "holder": b.peer_id, "addrs": [],
        "created_at": 0.0, "deleted": False,
    })
    with pytest.raises(RecordRejected, match="not by its owner"):
        parse_record(forged, a.run)
