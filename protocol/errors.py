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
    ├── PayloadUnavailable       a payload a decision counts cannot be fetched (by hash) right now
    ├── RecordRejected           a signed record (announcement, score, consensus) is invalid
    ├── StoreError               a store operation failed (carries key)
    │   ├── ObjectNotFound       no such object
    │   ├── ObjectTooLarge       over the reader's cap (checked before the body is read)
    │   ├── AccessDenied         credentials missing, refused or expired; presigned URL invalid
    │   ├── BucketNotFound       the bucket (or store root) does not exist
    │   ├── InvalidKey           a key that no store may hold (escapes the prefix, nests objects)
    │   ├── StoreTimeout         the store did not answer in time          } retried: RETRYABLE
    │   ├── StoreUnavailable     connection refused, server error, DHT    }
    │   └── IntegrityError       downloaded bytes do not match the announced hash or size
    ├── CheckpointError          a checkpoint is missing, corrupt, or from another run
    ├── ReplicaDiverged          our global weights are not the ones the network agreed on
    └── MachineError             this machine cannot do what was asked (names the flag to change)
        ├── WorkdirInUse         another process holds the workdir's lock
        ├── PortInUse            a port to serve on is taken
        └── NotEnoughResources   too little memory or disk, or no GPU, for the run's model

Only ``RETRYABLE`` errors are worth another attempt: a timeout or an outage may pass; an
object over its cap, a refused credential or a missing bucket will not, and retrying them
would hide the problem (``protocol.retry`` is the one place that retries).

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


class PayloadUnavailable(LocoError):
    """A payload a window's decision counts cannot be fetched, from any source, with the
    decided SHA-256. Replicas wait and try again: they never apply a window without it."""

    def __init__(self, peer: str, reason: str):
        self.peer = peer
        self.reason = reason
        super().__init__(f"payload of {peer} is unavailable: {reason}")


class RecordRejected(LocoError):
    """A small signed record (announcement, score, window close) is invalid."""


class StoreError(LocoError):
    """A store operation failed."""

    def __init__(self, message: str, *, key: str | None = None):
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key is not None else message)


class ObjectNotFound(StoreError):
    """No object under that key."""


class ObjectTooLarge(StoreError):
    """The object is over the reader's cap; refused before (or while) reading its body."""


class AccessDenied(StoreError):
    """The store refused our credentials, or has none to use; retrying will not help."""


class BucketNotFound(StoreError):
    """The bucket or store root does not exist; ``--create-bucket`` at ``init`` makes it."""


class InvalidKey(StoreError):
    """A key no store may hold: outside the run prefix, malformed, or nesting another object."""


class StoreTimeout(StoreError):
    """The store did not answer in time."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or answered with a server error."""


class IntegrityError(StoreError):
    """Bytes do not match the announced hash or size."""


class CheckpointError(LocoError):
    """A checkpoint is missing, corrupt or belongs to another run."""


class ReplicaDiverged(LocoError):
    """This replica's global weights differ from the ones the network agreed on.

    Raised when a window's agreed base digest is not ours: applying it would fork the run.
    """


class MachineError(LocoError):
    """This machine cannot do what was asked; the message names the flag to change."""


class WorkdirInUse(MachineError):
    """Another process (peer, validator, join) is using the same workdir."""


class PortInUse(MachineError):
    """A port this process must listen on is already taken."""


class NotEnoughResources(MachineError):
    """Memory, disk or a GPU the run's model needs is missing on this machine."""


RETRYABLE: tuple[type[StoreError], ...] = (StoreTimeout, StoreUnavailable)
"""Store errors that may pass by themselves; every other ``StoreError`` is final."""
