"""Identity keys and signed records."""

import os

import pytest

from protocol.errors import IdentityError, RecordRejected
from protocol.identity import Identity, peer_id_of
from protocol.records import sign_record, verify_record


def test_key_file_is_created_once_private_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    a = Identity.load_or_create(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    b = Identity.load_or_create(path)
    assert a.peer_id == b.peer_id == peer_id_of(b.public_key)


def test_garbage_key_file_raises_identity_error(tmp_path):
    path = tmp_path / "peer.key"
    path.write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="cannot read ed25519 key"):
        Identity.load(path)


def test_record_round_trip_and_signer():
    ident = Identity.from_seed(b"a")
    blob = sign_record(ident, "note", "run@1", {"x": 1})
    rec = verify_record(blob, kind="note", run="run@1")
    assert rec.peer_id == ident.peer_id and rec.body["x"] == 1


@pytest.mark.parametrize("where", [0, 5, 10, -70, -1])
def test_any_flipped_byte_breaks_a_record(where):
    blob = bytearray(sign_record(Identity.from_seed(b"a"), "note", "run@1", {"x": 1}))
    blob[where] ^= 0x01
    with pytest.raises(RecordRejected):
        verify_record(bytes(blob), kind="note", run="run@1")


def test_record_for_other_run_or_kind_or_signer_is_refused():
    ident = Identity.from_seed(b"a")
    blob = sign_record(ident, "note", "run@1", {})
    with pytest.raises(RecordRejected, match="belongs to run"):
        verify_record(blob, kind="note", run="run@2")
    with pytest.raises(RecordRejected, match="of kind"):
        verify_record(blob, kind="close", run="run@1")
    with pytest.raises(RecordRejected, match="signed by"):
        verify_record(blob, kind="note", run="run@1", signer=Identity.from_seed(b"b").peer_id)


def test_oversized_record_is_refused_before_verifying():
    blob = sign_record(Identity.from_seed(b"a"), "note", "r", {"pad": b"x" * 2000})
    with pytest.raises(RecordRejected, match="over the cap"):
        verify_record(blob, kind="note", run="r", max_bytes=1000)


def test_a_record_with_a_repeated_map_key_is_refused():
    """msgpack keeps the last of two equal keys, another decoder may keep the first: the same
    signed bytes must not mean two things, so a repeated key is refused outright."""
    import struct

    import msgpack

    from protocol.records import MAGIC

    ident = Identity.from_seed(b"a")
    body = msgpack.packb({"kind": "note", "run": "r", "window": 1}, use_bin_type=True)
    body = body[:1].replace(b"\x83", b"\x84") + body[1:] + msgpack.packb("window") + msgpack.packb(2)
    head = MAGIC + struct.pack(">I", len(body)) + body
    blob = head + ident.public_key + ident.sign(head)
    with pytest.raises(RecordRejected, match="repeats a key"):
        verify_record(blob, kind="note", run="r")
