"""Identity keys, signed records and window close records."""

import os

import pytest

from protocol.close import CloseRecord, Included, make_close_record, read_close_record
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


def _close(window=3, rows=None):
    rows = rows if rows is not None else (Included("bb", "1" * 64, 10), Included("aa", "2" * 64, 20))
    return CloseRecord(window, b"\x07" * 32, 123.5, tuple(rows))


def test_close_record_round_trip_sorts_peers():
    ident = Identity.from_seed(b"closer")
    rec = read_close_record(make_close_record(ident, "r", _close()), run="r", window=3)
    assert rec.peers == ("aa", "bb")
    assert rec.closer == ident.peer_id
    assert rec.base_digest == b"\x07" * 32


def test_close_record_of_other_window_is_refused():
    blob = make_close_record(Identity.from_seed(b"c"), "r", _close(window=3))
    with pytest.raises(RecordRejected, match="window 3, expected 4"):
        read_close_record(blob, run="r", window=4)


def test_close_record_with_malformed_rows_is_refused():
    ident = Identity.from_seed(b"c")
    blob = sign_record(ident, "close", "r", {"window": 1, "base_digest": b"\0" * 32, "closed_at": 1.0,
                                             "included": [["aa", "short", 1]]})
    with pytest.raises(RecordRejected, match="malformed included row"):
        read_close_record(blob, run="r", window=1)
    blob = sign_record(ident, "close", "r", {"window": 1, "base_digest": b"\0" * 32, "closed_at": 1.0,
                                             "included": [["bb", "1" * 64, 1], ["aa", "1" * 64, 1]]})
    with pytest.raises(RecordRejected, match="not sorted"):
        read_close_record(blob, run="r", window=1)
