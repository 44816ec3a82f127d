"""The window close record: the one list of payloads that count for a window.

Replicas stay bit-identical only if every one of them aggregates exactly the same
payloads. Payloads arrive at different times on different peers, so "whatever I saw by my
deadline" would drift. Instead the first participant that sees a window complete (every
expected peer published, or the deadline passed) writes a signed close record with
``put_if_absent``; everyone else reads that record and aggregates exactly the payloads it
lists, identified by SHA-256. The closer can only choose among signed, verifiable
payloads: each replica still decodes and checks every listed payload itself, and checks
are deterministic, so a listed payload that fails is skipped by everyone alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import RecordRejected
from protocol.identity import Identity
from protocol.records import require, sign_record, verify_record

KIND = "close"
MAX_PEERS = 4096


@dataclass(frozen=True)
class Included:
    peer_id: str
    sha256: str
    size: int


@dataclass(frozen=True)
class CloseRecord:
    window: int
    base_digest: bytes
    """Digest of the global weights at the start of this window (every payload's base)."""
    closed_at: float
    """Closer's clock, unix seconds; the next window's deadline counts from it."""
    included: tuple[Included, ...]
    """Sorted by peer id."""
    closer: str = ""
    """Peer id of the signer (set when read back)."""

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(i.peer_id for i in self.included)


def make_close_record(identity: Identity, run: str, record: CloseRecord) -> bytes:
    included = sorted(record.included, key=lambda i: i.peer_id)
    return sign_record(
        identity,
        KIND,
        run,
        {
            "window": record.window,
            "base_digest": record.base_digest,
            "closed_at": float(record.closed_at),
            "included": [[i.peer_id, i.sha256, i.size] for i in included],
        },
    )


def read_close_record(data: bytes, *, run: str, window: int) -> CloseRecord:
    """Verify and parse a close record; it must be for ``run`` and ``window``."""
    rec = verify_record(data, kind=KIND, run=run)
    body = rec.body
    got_window = require(body, "window", int, KIND)
    if got_window != window:
        raise RecordRejected(f"close record is for window {got_window}, expected {window}")
    base = require(body, "base_digest", bytes, KIND)
    if len(base) != 32:
        raise RecordRejected("close record base_digest must be 32 bytes")
    closed_at = require(body, "closed_at", float, KIND)
    rows = require(body, "included", list, KIND)
    if len(rows) > MAX_PEERS:
        raise RecordRejected(f"close record lists {len(rows)} peers, over the cap of {MAX_PEERS}")
    included = []
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) != 3
            or not isinstance(row[0], str)
            or not isinstance(row[1], str)
            or len(row[1]) != 64
            or not isinstance(row[2], int)
            or isinstance(row[2], bool)
            or row[2] < 0
        ):
            raise RecordRejected(f"close record has a malformed included row: {row!r}"[:200])
        included.append(Included(row[0], row[1], row[2]))
    peers = [i.peer_id for i in included]
    if peers != sorted(set(peers)):
        raise RecordRejected("close record's included peers are not sorted and unique")
    return CloseRecord(got_window, base, closed_at, tuple(included), closer=rec.peer_id)
