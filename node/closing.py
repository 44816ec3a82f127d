"""Who counts in a window: wait until it is complete, then write its close record (or read
the one another participant wrote first).

Replicas stay bit-identical only if every one of them aggregates exactly the same payloads,
and payloads reach different peers at different times. So the first participant that sees
a window complete (every expected peer published, or the deadline passed) fetches and
verifies what is there, keeps what the validators allow, and writes a signed close record
into the window's first free close slot with ``put_if_absent``; everyone else reads that
record (``node.follow.CloseReader``). The peer's loop drives it: ``ready`` says when the
window may close, the peer then learns whose payloads the validators allow
(``validators_allow``) and passes that set to ``write`` as a value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from node.accounting import Accounting
from node.exchange import Exchange, Gathered
from node.follow import CloseReader
from protocol import paths
from protocol.close import CloseRecord, make_close_record
from protocol.errors import RecordRejected, StoreError
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.scores import allowed_peers
from protocol.stores.base import Store
from protocol.wire import Expectation

log = logging.getLogger(__name__)

MAX_SCORE_LOOKBACK = 8
"""Windows a closer looks back for validator scores when the lagged ones are missing."""


def validators_allow(
    store: Store, manifest: Manifest, window: int, *, give_up: float, poll_seconds: float,
    clock: Callable[[], float] = time.time,
) -> set[str] | None:
    """Whose payloads count in ``window``, from the trusted validators' lagged scores.

    Waits until ``give_up`` for the scores of ``window - score_lag`` (validators work while
    peers train), then falls back to the newest earlier scores; None (all count) when the
    run trusts no validator or none published yet.
    """
    v = manifest.validators
    if not v.keys:
        return None

    def lookup(w: int) -> set[str] | None:
        return allowed_peers(store, manifest.run_key, w, v.score_lag, v.keys, min_weight=v.min_weight)

    while (allowed := lookup(window)) is None and window - v.score_lag >= 0 and clock() < give_up:
        time.sleep(poll_seconds)
    for earlier in range(window - 1, max(-1, window - 1 - MAX_SCORE_LOOKBACK), -1):
        if allowed is not None:
            break
        allowed = lookup(earlier)
    return allowed


class Closer:
    """Closes windows for one participant: writes the close record, or reads the one written first."""

    def __init__(self, store: Store, identity: Identity, run_key: str, exchange: Exchange, closes: CloseReader,
                 accounting: Accounting, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.identity = identity
        self.run_key = run_key
        self.exchange = exchange
        self.closes = closes
        self.acct = accounting
        self.clock = clock
        self.refused: list[tuple[str, str]] = []
        """``(peer, reason)`` for each present payload the last record we wrote left out."""

    def ready(self, window: int, *, expected: set[str], min_peers: int, deadline: float) -> list[str] | None:
        """The peers present in ``window`` once it may be closed, else None.

        A window may be closed once every peer in ``expected`` and at least ``min_peers``
        peers have published, or once ``deadline`` passed.
        """
        present = self.exchange.present(window)
        complete = expected <= present.keys() and len(present) >= min_peers
        return sorted(present) if complete or self.clock() >= deadline else None

    def write(self, window: int, expect: Expectation, peers: list[str], allowed: set[str] | None) -> CloseRecord:
        """Verify what is present and try to be the one who closes the window; the record
        that closed it (ours, or the one another participant wrote first)."""
        assert expect.base_digest is not None
        checked = Gathered()
        included = []
        for peer in peers:
            if allowed is not None and peer not in allowed:
                checked.rejected.append((peer, "not in the validators' allowed set"))
                continue
            inc = self.exchange.verify(peer, expect, checked)
            if inc is not None:
                included.append(inc)
        self.refused = checked.rejected
        for peer, reason in checked.rejected:
            log.warning("window %d: payload of %s not listed: %s", window, peer, reason)
        record = CloseRecord(window, expect.base_digest, self.clock(), tuple(included))
        blob = make_close_record(self.identity, self.run_key, record)
        for slot in range(paths.CLOSE_SLOTS):
            if self.store.put_if_absent(paths.close_slot_key(window, slot), blob):
                self.acct.bytes_up += len(blob)
                log.info("window %d: closed with %d payloads", window, len(included))
                return CloseRecord(window, record.base_digest, record.closed_at, record.included, self.identity.peer_id)
            closed = self.closes.read_slot(window, slot)
            if isinstance(closed, CloseRecord):
                return closed
            if closed is None:  # pragma: no cover - a store that loses a put_if_absent winner
                raise StoreError("close record vanished after a lost put_if_absent", key=paths.close_slot_key(window, slot))
        raise RecordRejected(f"window {window}: all {paths.CLOSE_SLOTS} close slots hold invalid records")
