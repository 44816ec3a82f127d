"""Every failure locoswarm expects is one of these; anything else is a bug and may crash.

    LocoError
    ├── ManifestError            the run manifest is invalid, or two manifests differ
    ├── IdentityError            a key file is unreadable or malformed
    ├── PayloadRejected          a peer's payload is refused (carries peer, window, reason)
    │   ├── PayloadTooLarge      size over a cap, checked before anything is allocated
    │   ├── MalformedPayload     bad magic/version, truncated, header or section malformed
    │   ├── BadSignature         ed25519 check failed, or signer does not match the peer id
    │   ├── WrongRun             header names another run (replay across runs)
    │   ├── WrongWindow          header names another window (replay across windows)
    │   ├── LayoutMismatch       tensor names/shapes/codec parameters differ from the run's
    │   ├── NonFinite            NaN/inf in scales or values
    │   └── OutOfSync            base weights digest differs from the current global digest
    ├── RecordRejected           a signed record (announcement, score, close) is invalid
    ├── StoreError               a store operation failed (carries key)
    │   ├── ObjectNotFound       no such object
    │   ├── StoreTimeout         the store did not answer in time
    │   ├── StoreUnavailable     connection refused, server error, DHT unreachable
    │   └── IntegrityError       downloaded bytes do not match the announced hash or size
    └── CheckpointError          a checkpoint is missing, corrupt, or from another run

Foreign errors (botocore, OSError, hivemind) are translated into these at the store
boundary, with the original chained as ``__cause__``.
"""

from __future__ import annotations


class LocoError(Exception):
    """Base of every error locoswarm raises on purpose."""


class ManifestError(LocoError):
    """The run manifest is invalid or does not match the run's identity."""


class IdentityError(LocoError):
    """A key file is missing, unreadable or malformed."""


class PayloadRejected(LocoError):
    """A payload is refused. ``reason`` is written for a person to read."""

    def __init__(self, reason: str, *, peer: str | None = None, window: int | None = None):
        self.reason = reason
        self.peer = peer
        self.window = window
        where = []
        if peer is not None:
            where.append(f"peer {peer}")
        if window is not None:
            where.append(f"window {window}")
        super().__init__(f"{reason} ({', '.join(where)})" if where else reason)


class PayloadTooLarge(PayloadRejected):
    """A size is over a cap; raised before allocating."""


class MalformedPayload(PayloadRejected):
    """The bytes do not follow the wire format."""


class BadSignature(PayloadRejected):
    """The signature does not verify, or the signer is not the claimed peer."""


class WrongRun(PayloadRejected):
    """The payload belongs to another run."""


class WrongWindow(PayloadRejected):
    """The payload belongs to another window."""


class LayoutMismatch(PayloadRejected):
    """Tensor names, shapes or codec parameters differ from the run's model."""


class NonFinite(PayloadRejected):
    """NaN or infinity where a finite number is required."""


class OutOfSync(PayloadRejected):
    """The payload was computed from other base weights than the current global ones."""


class RecordRejected(LocoError):
    """A small signed record (announcement, score, window close) is invalid."""


class StoreError(LocoError):
    """A store operation failed."""

    def __init__(self, message: str, *, key: str | None = None):
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key is not None else message)


class ObjectNotFound(StoreError):
    """No object under that key."""


class StoreTimeout(StoreError):
    """The store did not answer in time."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or answered with a server error."""


class IntegrityError(StoreError):
    """Bytes do not match the announced hash or size."""


class CheckpointError(LocoError):
    """A checkpoint is missing, corrupt or belongs to another run."""
