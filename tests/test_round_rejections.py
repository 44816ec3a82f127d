"""A window with a hostile participant: bad objects cost only themselves, never the round.

Three parties share one real ``file://`` store in-process: two honest peers A and B, each
with its own ``Exchange``, ``Closer`` and ``Replica`` (as ``node/peer.py`` uses them), and a
hostile writer X who can put any bytes anywhere in the store. Each fault below must show up
as a readable reason (``Closer.refused`` or ``Gathered.rejected``) while A and B still close
the window, apply the same aggregate and end bit-identical.
"""

from __future__ import annotations

import enum
import hashlib
import http.server
import threading

import pytest
import torch

from node.accounting import Accounting
from node.closing import Closer
from node.exchange import Exchange, Gathered
from node.follow import CloseReader
from node.replica import Replica
from protocol.aggregate import aggregate
from protocol import paths
from protocol.announce import make_announcement
from protocol.close import CloseRecord, make_close_record
from protocol.codec import ErrorFeedback
from protocol.codec_types import model_layout
from protocol.errors import RecordRejected
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.paths import CLOSE_SLOTS, close_slot_key
from protocol.stores.file import FileStore
from protocol.wire import Expectation, encode_payload

RUN = "rejections-test"
WINDOW = 0
SHAPES = {"block.weight": (64, 128), "head.bias": (300,)}
MAX_PAYLOAD_BYTES = 1 << 20
FAR = 1e12  # a deadline nobody reaches: windows close because every expected peer published


class Fault(enum.Enum):
    """What the hostile writer X does to the window."""

    PAYLOAD_REPLACED_AFTER_CLOSE = "payload replaced after the close record listed it"
    PAYLOAD_OVERSIZED = "payload object over the size cap"
    PAYLOAD_BAD_SIGNATURE = "payload with a bad signature"
    CLOSE_BAD_SIGNATURE = "close record with a bad signature"
    CLOSE_GARBAGE = "close record that is not a record"
    CLOSE_OTHER_RUN = "validly signed close record of another run"


class Party:
    """One participant: identity, an exchange on its own handle of the shared store, a replica."""

    def __init__(self, root, seed: int, manifest: Manifest):
        self.identity = Identity.from_seed(bytes([seed]) * 32)
        self.peer_id = self.identity.peer_id
        self.store = FileStore(root)
        self.exchange = Exchange(self.store, self.identity, RUN, Accounting())
        self.closes = CloseReader(self.store, RUN)
        self.closer = Closer(self.store, self.identity, RUN, self.exchange, self.closes, Accounting())
        self.manifest = manifest
        self.layouts = model_layout(SHAPES, manifest.codec)
        generator = torch.Generator().manual_seed(0)  # every replica starts from the same weights
        self.replica = Replica({n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}, WINDOW)
        self.seed = seed

    def payload(self, scale: float = 1e-2) -> bytes:
        """A real signed SparseLoCo payload of a random pseudo-gradient."""
        generator = torch.Generator().manual_seed(1000 + self.seed)
        delta = {n: scale * torch.randn(s, generator=generator) for n, s in SHAPES.items()}
        sent = ErrorFeedback(self.layouts, self.manifest.codec).compress(delta)
        return encode_payload(run=RUN, window=WINDOW, base_digest=self.replica.digest, tokens=512, tensors=sent,
                              codec=self.manifest.codec, identity=self.identity)

    def expect(self) -> Expectation:
        return Expectation(run=RUN, window=WINDOW, layouts=self.layouts, codec=self.manifest.codec,
                           max_bytes=MAX_PAYLOAD_BYTES, base_digest=self.replica.digest)

    def close(self, expected: set[str]) -> CloseRecord:
        record = self.closes.first_valid(WINDOW)
        if record is not None:
            return record
        present = self.closer.ready(WINDOW, expected=expected, min_peers=len(expected), deadline=FAR)
        assert present is not None, "every expected peer published: the window must close at once"
        return self.closer.write(WINDOW, self.expect(), present, allowed=None)

    def close_and_apply(self, expected: set[str]) -> tuple[CloseRecord, Gathered]:
        """What ``Peer.run_window`` does after publishing: close or read the close, gather, aggregate, step."""
        record = self.close(expected)
        gathered = self.exchange.gather(record, self.expect())
        outer = self.manifest.outer
        self.replica.apply(aggregate(gathered.contributions(), self.layouts, rule=outer.rule, clip=outer.clip), outer.lr)
        return record, gathered


@pytest.fixture
def parties(tmp_path):
    manifest = Manifest()
    a, b, x = (Party(tmp_path / "store", seed, manifest) for seed in (1, 2, 3))
    for honest in (a, b):
        assert honest.exchange.publish(WINDOW, honest.payload(), FAR)
    return a, b, x


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


def _assert_honest_replicas_agree(a: Party, b: Party, ga: Gathered, gb: Gathered) -> None:
    assert set(ga.accepted) == set(gb.accepted) == {a.peer_id, b.peer_id}
    assert a.replica.window == b.replica.window == WINDOW + 1
    assert a.replica.digest == b.replica.digest


def test_payload_replaced_after_the_close_record_listed_it_is_rejected_by_every_honest_peer(parties):
    a, b, x = parties
    everyone = {a.peer_id, b.peer_id, x.peer_id}
    original = x.payload()
    assert x.exchange.publish(WINDOW, original, FAR)
    record = x.close(everyone)
    assert set(record.peers) == everyone
    x.store.put(paths.payload_key(WINDOW, x.peer_id), x.payload(scale=5.0))  # validly signed, other bytes

    ra, ga = a.close_and_apply(everyone)
    rb, gb = b.close_and_apply(everyone)
    assert ra.closer == rb.closer == x.peer_id
    for gathered in (ga, gb):
        assert [p for p, _ in gathered.rejected] == [x.peer_id]
        assert "differs from the close record" in gathered.rejected[0][1]
    _assert_honest_replicas_agree(a, b, ga, gb)


@pytest.mark.parametrize("fault", [Fault.PAYLOAD_OVERSIZED, Fault.PAYLOAD_BAD_SIGNATURE])
def test_bad_payload_object_is_left_out_of_the_close_record_and_the_window_applies(parties, fault):
    a, b, x = parties
    everyone = {a.peer_id, b.peer_id, x.peer_id}
    if fault is Fault.PAYLOAD_OVERSIZED:
        blob = x.payload() + b"\0" * MAX_PAYLOAD_BYTES
    else:
        blob = _flip_last_byte(x.payload())
    x.store.put(paths.payload_key(WINDOW, x.peer_id), blob)

    ra, ga = a.close_and_apply(everyone)  # A sees all three published and closes
    rb, gb = b.close_and_apply(everyone)  # B reads A's close record
    assert ra.closer == rb.closer == a.peer_id
    assert set(rb.peers) == {a.peer_id, b.peer_id}
    reasons = dict(a.closer.refused)
    assert list(reasons) == [x.peer_id]
    if fault is Fault.PAYLOAD_OVERSIZED:
        assert "over the cap" in reasons[x.peer_id]
    else:
        assert reasons[x.peer_id].startswith("BadSignature")
    assert ga.rejected == gb.rejected == []  # nobody downloads what the close record does not list
    _assert_honest_replicas_agree(a, b, ga, gb)


@pytest.mark.parametrize("fault", [Fault.CLOSE_BAD_SIGNATURE, Fault.CLOSE_GARBAGE, Fault.CLOSE_OTHER_RUN])
def test_invalid_close_record_is_ignored_and_honest_peers_close_in_the_next_slot(parties, fault):
    a, b, x = parties
    honest = {a.peer_id, b.peer_id}
    forged = CloseRecord(WINDOW, x.replica.digest, 0.0, ())
    if fault is Fault.CLOSE_BAD_SIGNATURE:
        blob = _flip_last_byte(make_close_record(x.identity, RUN, forged))
        why = "bad signature"
    elif fault is Fault.CLOSE_GARBAGE:
        blob = b"not a close record at all"
        why = "bad magic"
    else:
        blob = make_close_record(x.identity, "another-run", forged)
        why = "belongs to run 'another-run'"
    assert x.store.put_if_absent(paths.close_key(WINDOW), blob)  # X takes slot 0 before anyone closes

    ra, ga = a.close_and_apply(honest)
    rb, gb = b.close_and_apply(honest)
    assert ra.closer == rb.closer == a.peer_id
    assert a.store.exists(close_slot_key(WINDOW, 1))
    slot0 = b.closes.read_slot(WINDOW, 0)
    assert isinstance(slot0, RecordRejected) and why in str(slot0)
    _assert_honest_replicas_agree(a, b, ga, gb)


def test_window_whose_every_close_slot_is_invalid_fails_with_a_readable_error(parties):
    a, _, x = parties
    for slot in range(CLOSE_SLOTS):
        x.store.put(close_slot_key(WINDOW, slot), b"junk")
    with pytest.raises(RecordRejected, match=f"all {CLOSE_SLOTS} close slots hold invalid records"):
        a.closes.first_valid(WINDOW)


def test_announced_payload_whose_bytes_differ_from_the_announcement_is_rejected(parties):
    a, b, x = parties
    real = x.payload()
    served = _flip_last_byte(real)  # what X's "own bucket" really serves

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/payload"
        key = paths.payload_key(WINDOW, x.peer_id)
        record = make_announcement(x.identity, RUN, WINDOW, key, url, hashlib.sha256(real).hexdigest(), len(real))
        x.store.put(paths.announce_key(WINDOW, x.peer_id), record)
        everyone = {a.peer_id, b.peer_id, x.peer_id}
        _, ga = a.close_and_apply(everyone)
        _, gb = b.close_and_apply(everyone)
    finally:
        server.shutdown()
        server.server_close()
    reasons = dict(a.closer.refused)
    assert "sha256" in reasons[x.peer_id] or "hash" in reasons[x.peer_id], reasons
    _assert_honest_replicas_agree(a, b, ga, gb)
