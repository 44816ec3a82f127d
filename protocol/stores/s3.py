"""``s3://bucket/prefix`` store: any S3-compatible object store (AWS S3, Cloudflare R2, MinIO).

What this module adds on top of boto3, and why:

- **One error boundary.** ``_translate`` turns every botocore/boto3/urllib3/OS error into
  ``ObjectNotFound`` / ``StoreTimeout`` / ``StoreUnavailable`` / ``StoreError`` (chained with
  ``from``), so code above the store never sees a library exception.
- **One retry layer.** botocore makes one attempt per request (its own retries are off);
  every operation, request *and* body download, goes through ``RetryPolicy.call``
  (``protocol/retry.py``), which retries timeouts and outages only.
- **Caps before bytes.** ``get`` reads ``ContentLength`` from the response headers and
  refuses an object over ``max_bytes`` before reading its body; the body is then read in
  chunks and the cap is enforced again while reading, in case the server lies.
- **Atomic close records.** ``put_if_absent`` is a conditional write (``If-None-Match: *``),
  honoured by AWS S3 (since 2024), R2, MinIO and moto's server.
- **Read access without sharing secrets.** A peer that owns its bucket hands out
  ``presigned_get_url`` links inside a signed announcement (``protocol/announce.py``);
  ``protocol/urlfetch.py`` fetches them, bounded, and checks the announced sha256.
- **Accounting.** ``stats`` counts bytes and seconds spent uploading and downloading.

"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import boto3.exceptions
import botocore.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from protocol.errors import (
    AccessDenied,
    BucketNotFound,
    ObjectNotFound,
    ObjectTooLarge,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from protocol.retry import RetryPolicy
from protocol.stores.base import ObjectInfo, Store, check_key, is_valid_key

log = logging.getLogger(__name__)

T = TypeVar("T")

MULTIPART_THRESHOLD = 8 << 20
"""Uploads at or above this many bytes go through multipart (parallel parts of this size)."""
READ_CHUNK = 1 << 20
"""Bytes read from a response body at a time."""

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}


@dataclass
class TransferStats:
    """Bytes moved and seconds spent moving them, since the store was opened."""

    bytes_up: int = 0
    bytes_down: int = 0
    seconds_up: float = 0.0
    seconds_down: float = 0.0


class _Accounting:
    """Thread-safe counters behind ``TransferStats`` snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = TransferStats()

    def add(self, *, up: int = 0, down: int = 0, seconds_up: float = 0.0, seconds_down: float = 0.0) -> None:
        with self._lock:
            self._stats.bytes_up += up
            self._stats.bytes_down += down
            self._stats.seconds_up += seconds_up
            self._stats.seconds_down += seconds_down

    def snapshot(self) -> TransferStats:
        with self._lock:
            return TransferStats(**vars(self._stats))


def _error_code(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(err.get("Code", "")), int(status or 0)


@contextlib.contextmanager
def _translate(op: str, key: str | None) -> Iterator[None]:
    """The one place where foreign errors become locoswarm ``StoreError`` subclasses."""
    try:
        yield
    except StoreError:
        raise
    except botocore.exceptions.ClientError as exc:
        code, status = _error_code(exc)
        if code in _NOT_FOUND_CODES:
            raise ObjectNotFound("no such object", key=key) from exc
        if code == "NoSuchBucket":
            bucket = exc.response.get("Error", {}).get("BucketName", "")
            raise BucketNotFound(f"{op}: the bucket {bucket!r} does not exist", key=key) from exc
        if code in _DENIED_CODES or status == 403:
            raise AccessDenied(f"{op}: access denied ({code}); check the credentials", key=key) from exc
        if status >= 500 or code in {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}:
            raise StoreUnavailable(f"{op}: server error {status} {code}", key=key) from exc
        raise StoreError(f"{op}: request refused with {status} {code}", key=key) from exc
    except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as exc:
        raise StoreTimeout(f"{op}: no answer in time: {exc}", key=key) from exc
    except (
        botocore.exceptions.ConnectionError,
        botocore.exceptions.HTTPClientError,
        botocore.exceptions.IncompleteReadError,
    ) as exc:
        raise StoreUnavailable(f"{op}: connection failed: {exc}", key=key) from exc
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.ProfileNotFound) as exc:
        raise AccessDenied(f"{op}: no usable AWS credentials: {exc}", key=key) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise StoreError(f"{op}: {exc}", key=key) from exc
    except boto3.exceptions.S3UploadFailedError as exc:
        raise StoreUnavailable(f"{op}: upload failed: {exc}", key=key) from exc
    except boto3.exceptions.Boto3Error as exc:
        raise StoreError(f"{op}: {exc}", key=key) from exc
    except urllib3.exceptions.TimeoutError as exc:
        raise StoreTimeout(f"{op}: no answer in time: {exc}", key=key) from exc
    except urllib3.exceptions.HTTPError as exc:
        raise StoreUnavailable(f"{op}: connection failed: {exc}", key=key) from exc
    except TimeoutError as exc:
        raise StoreTimeout(f"{op}: no answer in time: {exc}", key=key) from exc
    except OSError as exc:
        raise StoreUnavailable(f"{op}: connection failed: {exc}", key=key) from exc


def _read_capped(body: Any, limit: int | None, key: str) -> bytes:
    """Read a streaming body in chunks, refusing to go past ``limit`` bytes."""
    out = bytearray()
    while True:
        chunk = body.read(READ_CHUNK)
        if not chunk:
            return bytes(out)
        out += chunk
        if limit is not None and len(out) > limit:
            raise ObjectTooLarge(f"object body passed the cap of {limit} bytes while downloading", key=key)


class S3Store(Store):
    """Objects under ``s3://bucket/prefix/``; thread-safe (one boto3 client shared by threads)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        profile: str | None = None,
        policy: RetryPolicy | None = None,
        max_workers: int = 8,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        create_bucket: bool = False,
    ):
        """``policy`` sets the request timeout and the retries of every operation (one layer:
        botocore itself makes a single attempt); ``max_workers`` bounds multipart parallelism."""
        if addressing_style not in ("auto", "path", "virtual"):
            raise StoreError(f"addressing_style must be auto, path or virtual, got {addressing_style!r}")
        if max_workers < 1:
            raise StoreError("need max_workers >= 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.policy = policy or RetryPolicy()
        self.max_workers = max_workers
        self._accounting = _Accounting()
        config = Config(
            region_name=region or None,
            connect_timeout=self.policy.connect_timeout,
            read_timeout=self.policy.request_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": addressing_style},
            max_pool_connections=max(10, max_workers * 2),
        )
        with _translate("open", None):
            session = boto3.session.Session(profile_name=profile or None)
            self._client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_threshold,
            max_concurrency=max_workers,
            use_threads=True,
        )
        if create_bucket:
            self._create_bucket(region)

    def _create_bucket(self, region: str | None) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            with _translate("create bucket", None):
                self._client.create_bucket(**kwargs)
        except StoreError as exc:
            cause = exc.__cause__
            # Already ours is fine; BucketAlreadyExists means another account owns the name.
            if not (isinstance(cause, botocore.exceptions.ClientError)
                    and _error_code(cause)[0] == "BucketAlreadyOwnedByYou"):
                raise

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _attempt(self, op: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` under the error boundary, retried by the policy (timeouts and outages)."""

        def once() -> T:
            with _translate(op, key):
                return fn()

        return self.policy.call(once, what=f"s3 {op} of {key!r}")

    @property
    def stats(self) -> TransferStats:
        """A snapshot of bytes and seconds moved by this store."""
        return self._accounting.snapshot()

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)

        def upload() -> None:
            t0 = time.perf_counter()
            self._client.upload_fileobj(io.BytesIO(data), self.bucket, full, Config=self._transfer)
            self._accounting.add(up=len(data), seconds_up=time.perf_counter() - t0)

        self._attempt("put", key, upload)

    def put_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        size = Path(path).stat().st_size

        def upload() -> None:
            t0 = time.perf_counter()
            self._client.upload_file(str(path), self.bucket, full, Config=self._transfer)
            self._accounting.add(up=size, seconds_up=time.perf_counter() - t0)

        self._attempt("put", key, upload)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full = self._key(key)
        attempts = 0

        def conditional_put() -> bool:
            nonlocal attempts
            attempts += 1
            t0 = time.perf_counter()
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
            except botocore.exceptions.ClientError as exc:
                code, status = _error_code(exc)
                if status == 412 or code == "PreconditionFailed":
                    # On a retry an earlier attempt may have written before its answer was lost:
                    # the object holding exactly our bytes means we wrote it.
                    return attempts > 1 and self.head(key).size == len(data) and self.get(key) == data
                # 409 ConditionalRequestConflict: a concurrent conditional write is in flight;
                # the other writer wins or retries, either way this call did not write.
                if status == 409 or code == "ConditionalRequestConflict":
                    return False
                raise
            self._accounting.add(up=len(data), seconds_up=time.perf_counter() - t0)
            return True

        return self._attempt("put_if_absent", key, conditional_put)

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        full = self._key(key)

        def download() -> bytes:
            t0 = time.perf_counter()
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            body = response["Body"]
            try:
                size = int(response.get("ContentLength", -1))
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(f"object is {size} bytes, over the cap of {max_bytes}", key=key)
                data = _read_capped(body, max_bytes, key)
            finally:
                body.close()
            self._accounting.add(down=len(data), seconds_down=time.perf_counter() - t0)
            return data

        return self._attempt("get", key, download)

    def head(self, key: str) -> ObjectInfo:
        """Size and modification time of one object, without its body."""
        full = self._key(key)
        response = self._attempt("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
        return ObjectInfo(key, int(response["ContentLength"]), response["LastModified"].timestamp())

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        def list_all() -> list[ObjectInfo]:
            out = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix):]
                    if is_valid_key(key):
                        out.append(ObjectInfo(key, int(item["Size"]), item["LastModified"].timestamp()))
            return sorted(out, key=lambda o: o.key)

        return self._attempt("list", prefix, list_all)

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._attempt("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def presigned_get_url(self, key: str, expires: int = 3600) -> str:
        """A URL anyone can GET for ``expires`` seconds, signed with this store's credentials
        (which never leave this machine)."""
        full = self._key(key)
        return self._attempt(
            "presign", key,
            lambda: self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=int(expires)
            ),
        )

    def close(self) -> None:
        self._client.close()
