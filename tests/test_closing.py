"""Deciding windows through a real file store, in-process: two closers and a peer that
serves its payload from its own server, which answers the first GET only.

The closers A and B are the run's two validators; X is a peer the run lists, and it
publishes only an announcement whose URL a local HTTP server serves once. A proposes (fetching X's payload
through the URL, the one time it is served, and keeping a content-addressed copy); B checks
the proposal by hash from that copy; a reader that comes later gathers every counted
payload although X's server is gone. Without the copy, B could not check the proposal and a
late reader could not apply the window: it would wait, never skip.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time

import pytest
import torch

from node.accounting import Accounting
from node.closing import Closing
from node.exchange import Exchange, address_policy
from node.follow import DecisionReader
from node.replica import Replica
from protocol import paths
from protocol.announce import make_announcement
from protocol.codec import ErrorFeedback
from protocol.codec_types import model_layout
from protocol.errors import PayloadUnavailable
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores.file import FileStore
from protocol.wire import Expectation, encode_payload

SHAPES = {"block.weight": (64, 128), "head.bias": (300,)}
WINDOW = 0


class ServeOnce(http.server.BaseHTTPRequestHandler):
    """Answers the first GET with the payload and every later one with 404."""

    def do_GET(self):
        server = self.server
        server.gets += 1
        if server.gets > 1:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.payload)))
        self.end_headers()
        self.wfile.write(server.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def network(tmp_path):
    a, b, x = (Identity.from_seed(s) for s in (b"closer a", b"closer b", b"bucket peer x"))
    manifest = Manifest().replace(run__peers=tuple(i.public_key.hex() for i in (a, b, x)), run__announce_private=True,
                                  run__announce_hosts=("127.0.0.1",), run__window_seconds=30.0,
                                  validators__keys=(a.public_key.hex(), b.public_key.hex()))
    layouts = model_layout(SHAPES, manifest.codec)
    weights = {n: torch.randn(s, generator=torch.Generator().manual_seed(0)) for n, s in SHAPES.items()}
    base = Replica(weights, WINDOW).digest
    expect = Expectation.of_run(manifest.run_key, WINDOW, layouts, manifest.codec, cap=1 << 20, base_digest=base)

    def payload(identity: Identity, seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        sent = ErrorFeedback(layouts, manifest.codec).compress({n: 1e-2 * torch.randn(s, generator=g)
                                                                for n, s in SHAPES.items()})
        return encode_payload(run=manifest.run_key, window=WINDOW, base_digest=base, tokens=64, tensors=sent,
                              codec=manifest.codec, identity=identity)

    store = FileStore(tmp_path / "store")
    for identity, seed in ((a, 1), (b, 2)):
        store.put(paths.payload_key(WINDOW, identity.peer_id), payload(identity, seed))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ServeOnce)
    server.gets, server.payload = 0, payload(x, 3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x.lsp"
    store.put(paths.announce_key(WINDOW, x.peer_id), make_announcement(
        x, manifest.run_key, WINDOW, paths.payload_key(WINDOW, x.peer_id), url,
        hashlib.sha256(server.payload).hexdigest(), len(server.payload)))
    yield manifest, store, expect, (a, b, x), server
    server.shutdown()
    server.server_close()


def _closing(manifest, store, identity):
    acct = Accounting()
    exchange = Exchange(store, identity, manifest.run_key, acct, addresses=address_policy(manifest))
    return Closing(store, manifest, identity, exchange, acct), exchange


def test_a_payload_served_once_is_decided_on_and_fetched_by_everyone_from_its_content_copy(network):
    manifest, store, expect, (a, b, x), server = network
    everyone = {a.peer_id, b.peer_id, x.peer_id}
    closings = [_closing(manifest, store, identity)[0] for identity in (a, b)]
    decided = {}
    give_up = time.time() + 60
    while len(decided) < 2 and time.time() < give_up:
        for name, closing in zip("ab", closings):
            if name not in decided:
                found = closing.poll(WINDOW, expect, deadline=time.time() + 30, expected=everyone)
                if found is not None:
                    decided[name] = found
        time.sleep(0.05)
    assert set(decided) == {"a", "b"}, "the window was not decided"
    assert decided["a"].value == decided["b"].value
    assert set(decided["a"].peers) == everyone
    assert server.gets == 1, "the payload was fetched from its server more than once"
    x_sha = next(i.sha256 for i in decided["a"].included if i.peer_id == x.peer_id)
    assert store.exists(paths.blob_key(WINDOW, x_sha))

    late = Identity.from_seed(b"late reader")
    exchange = Exchange(store, late, manifest.run_key, Accounting(), addresses=address_policy(manifest))
    decision = DecisionReader(store, manifest, Accounting()).read(WINDOW)
    gathered = exchange.gather(decision.included, expect)
    assert set(gathered.accepted) == everyone


def test_a_counted_payload_that_no_source_serves_is_waited_for_never_skipped(network):
    manifest, store, expect, (a, b, x), server = network
    closing, _ = _closing(manifest, store, a)
    everyone = {a.peer_id, b.peer_id, x.peer_id}
    value = None
    give_up = time.time() + 30
    while value is None and time.time() < give_up:
        st = closing._state(WINDOW, time.time() + 30, time.time())
        value = closing.propose(st, WINDOW, expect, deadline=time.time() + 30, expected=everyone)
        time.sleep(0.05)
    assert value is not None and set(value.peers) == everyone
    x_inc = next(i for i in value.included if i.peer_id == x.peer_id)
    store.put(paths.blob_key(WINDOW, x_inc.sha256), b"poisoned copy")  # a writer replaces the copy
    reader = Exchange(store, Identity.from_seed(b"r"), manifest.run_key, Accounting(),
                      addresses=address_policy(manifest))
    with pytest.raises(PayloadUnavailable) as info:
        reader.gather(value.included, expect)
    assert info.value.peer == x.peer_id and "hash" in info.value.reason


def test_junk_never_closes_an_empty_window_and_nobody_expected_closes_nothing_early(tmp_path):
    """A stranger's junk under a payload key is not a payload: the window waits one more
    ``window_seconds`` for a real one. And when no peer is expected (the windows before
    counted nobody), a window closes at its deadline, not at once with whatever is there."""
    a, h, stranger = (Identity.from_seed(s) for s in (b"closer a", b"listed h", b"stranger"))
    manifest = Manifest().replace(run__peers=(h.public_key.hex(),), run__window_seconds=30.0,
                                  validators__keys=(a.public_key.hex(),))
    layouts = model_layout(SHAPES, manifest.codec)
    weights = {n: torch.randn(s, generator=torch.Generator().manual_seed(0)) for n, s in SHAPES.items()}
    base = Replica(weights, 0).digest
    store = FileStore(tmp_path / "store")
    now = [1000.0]
    acct = Accounting()
    closing = Closing(store, manifest, a, Exchange(store, a, manifest.run_key, acct), acct, clock=lambda: now[0])

    def decide(window: int, deadline: float, expected: set[str]):
        expect = Expectation.of_run(manifest.run_key, window, layouts, manifest.codec, cap=1 << 20, base_digest=base)
        for _ in range(6):
            decision = closing.poll(window, expect, deadline=deadline, expected=expected)
            now[0] += 1.0  # the store's records are re-read as time goes on
            if decision is not None:
                return decision
        return None

    store.put(paths.payload_key(0, stranger.peer_id), b"junk" * 100)
    assert decide(0, 990.0, {h.peer_id}) is None  # past the deadline, but nothing valid came
    now[0] = 990.0 + 30.0 + 1
    assert decide(0, 990.0, {h.peer_id}).value.peers == ()  # an outage's grace is over

    sent = ErrorFeedback(layouts, manifest.codec).compress({n: 1e-2 * torch.ones(s) for n, s in SHAPES.items()})
    store.put(paths.payload_key(1, h.peer_id), encode_payload(run=manifest.run_key, window=1, base_digest=base,
                                                              tokens=64, tensors=sent, codec=manifest.codec, identity=h))
    deadline = now[0] + 20.0
    assert decide(1, deadline, set()) is None  # nobody expected: no early close
    now[0] = deadline + 0.5
    assert decide(1, deadline, set()).value.peers == (h.peer_id,)
