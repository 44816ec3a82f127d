"""First contact with a run's store: read its manifest, and when that fails say which flag to change.

Every command that follows a run (peer, validator, status, export, join) reads the
manifest first, so this is where a wrong endpoint, a missing bucket or missing credentials
show up. A store error only says what happened ("connection failed", "no such bucket");
here it gets the fix for the settings this machine used, e.g. that without
``--endpoint-url`` an ``s3://`` URI goes to AWS. Errors keep their type, so scripts can tell
them apart, and chain the original.
"""

from __future__ import annotations

from protocol.errors import (
    AccessDenied,
    BucketNotFound,
    ManifestError,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from protocol.manifest import Manifest
from protocol.stores import StoreSettings
from protocol.stores.base import Store

CREDENTIALS = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the credentials the run's operator gave you, "
               "or your own), or pass --profile NAME for a profile in ~/.aws/credentials")


def read_run_manifest(store: Store, settings: StoreSettings) -> Manifest:
    """The manifest of the run in ``store``; its errors name the flag to change."""
    from node.runinfo import find_manifest

    try:
        manifest = find_manifest(store)
    except StoreError as exc:
        raise type(exc)(f"{exc}\n  fix: {store_hint(exc, settings)}") from exc
    if manifest is None:
        raise ManifestError(f"no run in {settings.uri}: check --store (a run's operator creates one with "
                            "`locoswarm init`)")
    return manifest


def check_same_run(given: Manifest, theirs: Manifest, given_from: str, settings: StoreSettings) -> Manifest:
    """Refuse to mix two runs: the manifest ``given_from`` somewhere must be the store's."""
    if given.digest != theirs.digest:
        raise ManifestError(
            f"the manifest from {given_from} (run {given.run_key}) differs from the run in {settings.uri} "
            f"({theirs.run_key}); refusing to mix two runs.\n  fix: the run was re-created or the store is "
            "another run's: get the current manifest from the run's operator, point --store at the run's "
            "own store, or leave out --manifest to use the store's"
        )
    return theirs


def store_hint(exc: StoreError, settings: StoreSettings) -> str:
    """What to change when the first request to the store fails with ``exc``."""
    where = f"--endpoint-url {settings.endpoint_url}" if settings.endpoint_url else "AWS S3 (no --endpoint-url)"
    if isinstance(exc, BucketNotFound):
        bucket = settings.uri.removeprefix("s3://").partition("/")[0]
        return (f"the bucket {bucket!r} does not exist at {where}: check the bucket in --store, and "
                "--endpoint-url (a bucket on R2 or MinIO does not exist on AWS); a run's operator creates it "
                "with `locoswarm init --create-bucket`")
    if isinstance(exc, AccessDenied):
        if "credentials" in str(exc):
            return CREDENTIALS
        return (f"{where} refused these credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                "--profile; a wrong --endpoint-url or --region refuses good credentials too")
    if isinstance(exc, (StoreUnavailable, StoreTimeout)):
        if settings.scheme == "p2p":
            return "no peer of the run answered: check --initial-peers (or ?peers= in the store URI)"
        if settings.scheme == "s3" and not settings.endpoint_url:
            return ("no --endpoint-url was given, so this went to AWS S3; a bucket on R2, MinIO or another "
                    "service needs --endpoint-url URL (or ?endpoint=URL in the store URI)")
        if settings.scheme == "s3":
            return (f"nothing answered at --endpoint-url {settings.endpoint_url}: check the address and that "
                    "the server is up (behind a proxy: HTTPS_PROXY); --request-timeout waits longer")
        return f"the store at {settings.uri} cannot be read: check --store and the directory's permissions"
    return f"check --store {settings.uri}"
