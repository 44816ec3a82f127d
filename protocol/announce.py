"""Signed "where to read my object" records for peers that serve from their own bucket.

A peer that writes to a bucket only it can write to publishes, next to (or instead of) the
object, an announcement: run, window, object key, a URL anyone can GET (usually an S3
presigned URL, so no credentials are shared), the object's sha256 and size. Readers verify
the signature first (``records.verify_record``), then the fields, strictly (no coercion),
then fetch with ``protocol.urlfetch.UrlReader`` (no redirects, public hosts only unless the
run allows private ones, bounded size and time) and compare the hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import RecordRejected, StoreError
from protocol.identity import Identity
from protocol.records import require, short, sign_record, verify_record
from protocol.stores.base import check_key

KIND = "announce"
MAX_ANNOUNCEMENT_BYTES = 8 << 10
MAX_URL_CHARS = 4096
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Announcement:
    """A verified announcement. ``peer_id`` is the signer."""

    peer_id: str
    run: str
    window: int
    key: str
    url: str
    sha256: str
    size: int


def _check_fields(window: object, key: object, url: object, sha256: object, size: object) -> None:
    """Raise ``RecordRejected`` naming the first field that is out of range."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise RecordRejected(f"announce record window must be a non-negative int, got {short(window)}")
    if not isinstance(key, str):
        raise RecordRejected("announce record key must be a string")
    try:
        check_key(key)
    except StoreError as exc:
        raise RecordRejected(f"announce record names an invalid object key {key[:80]!r}") from exc
    if not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > MAX_URL_CHARS:
        raise RecordRejected("announce record url must be an http(s) URL of at most 4096 characters")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise RecordRejected("announce record sha256 must be 64 lowercase hex characters")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RecordRejected(f"announce record size must be a non-negative int, got {short(size)}")


def make_announcement(
    identity: Identity, run: str, window: int, key: str, url: str, sha256: str, size: int
) -> bytes:
    """Sign an announcement that object ``key`` of ``window`` can be read at ``url``."""
    _check_fields(window, key, url, sha256, size)
    body = {"window": window, "key": key, "url": url, "sha256": sha256, "size": size}
    return sign_record(identity, KIND, run, body)


def read_announcement(data: bytes, run: str, *, signer: str | None = None) -> Announcement:
    """Verify signature, run (and ``signer`` when given), then every field; raise ``RecordRejected``."""
    record = verify_record(data, kind=KIND, run=run, max_bytes=MAX_ANNOUNCEMENT_BYTES, signer=signer,
                           fields=("window", "key", "url", "sha256", "size"))
    body = record.body
    window = require(body, "window", int, KIND)
    key = require(body, "key", str, KIND)
    url = require(body, "url", str, KIND)
    sha256 = require(body, "sha256", str, KIND)
    size = require(body, "size", int, KIND)
    _check_fields(window, key, url, sha256, size)
    return Announcement(record.peer_id, run, window, key, url, sha256, size)
