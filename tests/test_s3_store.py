"""s3:// against real servers on 127.0.0.1: moto for S3 behaviour, and a scripted HTTP server
for the failures moto cannot produce (403, 5xx, a server that never answers)."""

from __future__ import annotations

import hashlib
import http.server
import inspect
import string
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
import urllib3.exceptions

from protocol.announce import make_announcement, read_announcement
from protocol.errors import (
    AccessDenied,
    BucketNotFound,
    IntegrityError,
    ObjectNotFound,
    ObjectTooLarge,
    RecordRejected,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from protocol.identity import Identity
from protocol.retention import gc_windows
from protocol.retry import RetryPolicy
from protocol.stores import StoreSettings, open_store
from protocol.stores.s3 import S3Store, _translate
from protocol.urlfetch import AddressPolicy, UrlReader
from tests.conftest import MotoServer, free_port

RUN = "demo@0123456789abcdef"
LOCAL = AddressPolicy(allow_private=True)
"""moto listens on 127.0.0.1: only a local run lets announcements point there."""


# ---- a scripted S3 lookalike --------------------------------------------------------------


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``server.status``/``server.code``, or never (``hang``)."""

    def _answer(self) -> None:
        if self.server.hang:  # type: ignore[attr-defined]
            time.sleep(3)
            return
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.server.code}</Code>"  # type: ignore[attr-defined]
            "<Message>scripted</Message></Error>"
        ).encode()
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def make(status: int = 500, code: str = "InternalError", hang: bool = False) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
        server.daemon_threads = True
        server.status, server.code, server.hang = status, code, hang  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _fast_store(endpoint_url: str, **options: Any) -> S3Store:
    settings = {"region": "us-east-1", "policy": RetryPolicy(request_timeout=0.5, attempts=1)}
    settings.update(options)
    return S3Store("bucket", "run", endpoint_url=endpoint_url, **settings)


# ---- error translation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "NoSuchKey", ObjectNotFound),
        (403, "AccessDenied", AccessDenied),
        (500, "InternalError", StoreUnavailable),
        (503, "SlowDown", StoreUnavailable),
        (400, "InvalidArgument", StoreError),
    ],
)
def test_http_errors_from_the_server_map_to_store_errors(
    aws_test_credentials: None, scripted_server: Callable[..., str], status: int, code: str, expected: type
) -> None:
    store = _fast_store(scripted_server(status, code))
    for call in (lambda: store.get("d/k.bin"), lambda: store.put("d/k.bin", b"x"), lambda: store.list("d/")):
        with pytest.raises(expected) as info:
            call()
        assert type(info.value) is expected
        assert isinstance(info.value.__cause__, (botocore.exceptions.ClientError, boto3.exceptions.Boto3Error))
    store.close()


def test_connection_refused_maps_to_store_unavailable(aws_test_credentials: None) -> None:
    store = _fast_store(f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.get("d/k.bin")
    assert isinstance(info.value.__cause__, botocore.exceptions.EndpointConnectionError)
    assert time.monotonic() - t0 < 5


def test_server_that_never_answers_maps_to_store_timeout(
    aws_test_credentials: None, scripted_server: Callable[..., str]
) -> None:
    store = _fast_store(scripted_server(hang=True))
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout) as info:
        store.get("d/k.bin")
    assert isinstance(info.value.__cause__, botocore.exceptions.ReadTimeoutError)
    assert time.monotonic() - t0 < 5


def _instances_of_every_botocore_error() -> list[Exception]:
    """One instance of each ``BotoCoreError`` subclass, built from the fields of its message
    and the named parameters of its constructor."""
    out = []
    for cls in vars(botocore.exceptions).values():
        if inspect.isclass(cls) and issubclass(cls, botocore.exceptions.BotoCoreError):
            fields = {f for _, f, _, _ in string.Formatter().parse(cls.fmt) if f}
            params = inspect.signature(cls.__init__).parameters.values()
            fields |= {p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
            out.append(cls(**{f: "x" for f in fields}))
    return out


@pytest.mark.parametrize(
    "error",
    _instances_of_every_botocore_error()
    + [
        botocore.exceptions.ClientError({"Error": {"Code": "Teapot"}, "ResponseMetadata": {"HTTPStatusCode": 418}}, "Op"),
        boto3.exceptions.S3UploadFailedError("upload failed"),
        urllib3.exceptions.ProtocolError("connection broken"),
        urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"),
        ConnectionResetError("reset"),
        TimeoutError("timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_library_error_becomes_a_chained_store_error(error: Exception) -> None:
    with pytest.raises(StoreError) as info, _translate("get", "d/k.bin"):
        raise error
    assert info.value.__cause__ is error
    assert info.value.key == "d/k.bin"


def test_timeouts_are_told_apart_from_unavailability() -> None:
    timeout = botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x")
    refused = botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")
    with pytest.raises(StoreTimeout), _translate("get", "k"):
        raise timeout
    with pytest.raises(StoreUnavailable), _translate("get", "k"):
        raise refused


# ---- a real server that dies and comes back -----------------------------------------------


def test_killed_server_gives_store_errors_quickly_and_restart_recovers(
    moto_server_factory: Callable[[], MotoServer], s3_store_factory: Callable[..., S3Store]
) -> None:
    server = moto_server_factory()
    store = s3_store_factory(server, policy=RetryPolicy(request_timeout=1.0, attempts=2))
    store.put("d/k.bin", b"before")
    server.kill()
    t0 = time.monotonic()
    for call in (lambda: store.get("d/k.bin"), lambda: store.put("d/k.bin", b"during"), lambda: store.list("d/")):
        with pytest.raises((StoreUnavailable, StoreTimeout)):
            call()
    assert time.monotonic() - t0 < 10
    server.restart()  # moto keeps state in memory: the bucket is gone, the endpoint is back
    s3_store_factory(server, bucket=store.bucket)
    store.put("d/k.bin", b"after")
    assert store.get("d/k.bin") == b"after"


# ---- behaviour on moto --------------------------------------------------------------------


def test_moto_honours_conditional_writes(s3_store_factory: Callable[..., S3Store]) -> None:
    store = s3_store_factory()
    assert store.put_if_absent("d/once.bin", b"1") is True
    assert store.put_if_absent("d/once.bin", b"2") is False
    assert store.get("d/once.bin") == b"1"


def test_missing_bucket_is_named_and_not_retried(
    aws_test_credentials: None, moto_server: MotoServer
) -> None:
    store = S3Store("no-such-bucket", "run", endpoint_url=moto_server.endpoint_url, region="us-east-1",
                    policy=RetryPolicy(attempts=5, backoff_base=1.0, backoff_cap=5.0))
    t0 = time.monotonic()
    with pytest.raises(BucketNotFound, match="no-such-bucket"):
        store.list("d/")
    assert time.monotonic() - t0 < 1.0  # five tries with 1 s backoffs would take longer
    store.close()


def test_keys_live_under_the_uri_prefix(moto_server: MotoServer, s3_store_factory: Callable[..., S3Store]) -> None:
    bucket = s3_store_factory().bucket
    store = open_store(StoreSettings.parse(f"s3://{bucket}/runs/demo?endpoint={moto_server.endpoint_url}&region=us-east-1"))
    assert isinstance(store, S3Store)
    store.put("windows/000001/x.bin", b"1")
    raw = boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"]] == ["runs/demo/windows/000001/x.bin"]
    assert [o.key for o in store.list()] == ["windows/000001/x.bin"]
    store.close()


def test_unknown_uri_parameters_are_refused_with_the_known_ones_named() -> None:
    with pytest.raises(StoreError, match="'colour'.*known: endpoint, region"):
        StoreSettings.parse("s3://bucket/prefix?colour=red")


def test_store_settings_round_trip_through_a_uri() -> None:
    s = StoreSettings.parse("s3://b/p?endpoint=https://acct.r2.example&region=auto&addressing=path")
    assert (s.uri, s.endpoint_url, s.region, s.addressing_style) == ("s3://b/p", "https://acct.r2.example", "auto", "path")
    assert StoreSettings.parse(s.to_uri()) == s
    assert StoreSettings.parse(s.to_uri(), region="eu-west-1").region == "eu-west-1"  # flags win


def test_oversized_object_is_refused_before_its_body_is_downloaded(s3_store_factory: Callable[..., S3Store]) -> None:
    store = s3_store_factory()
    store.put("d/big.bin", b"\0" * (4 << 20))
    before = store.stats.bytes_down
    with pytest.raises(ObjectTooLarge, match="over the cap"):
        store.get("d/big.bin", max_bytes=1024)
    assert store.stats.bytes_down == before


def test_large_objects_are_uploaded_in_parts(s3_store_factory: Callable[..., S3Store]) -> None:
    store = s3_store_factory(multipart_threshold=5 << 20)
    data = bytes(range(256)) * ((11 << 20) // 256)
    store.put("checkpoints/000010/model.safetensors", data)
    head = store._client.head_object(Bucket=store.bucket, Key=store.prefix + "checkpoints/000010/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of 5, 5 and 1 MiB
    assert store.get("checkpoints/000010/model.safetensors") == data
    assert store.stats.bytes_up == len(data) and store.stats.bytes_down == len(data)
    assert store.stats.seconds_up > 0 and store.stats.seconds_down > 0


def test_gc_deletes_old_windows_but_never_checkpoints(s3_store_factory: Callable[..., S3Store]) -> None:
    store = s3_store_factory()
    keys = [
        "windows/000001/payloads/a.lsp", "windows/000001/close.lsr", "windows/000002/payloads/keep-me.lsp",
        "windows/000003/payloads/a.lsp", "checkpoints/000001/model.safetensors", "windows/notawindow/x.bin",
    ]
    for key in keys:
        store.put(key, b"x")
    deleted = gc_windows(store, keep_from_window=3, protect=lambda key: key.endswith("keep-me.lsp"))
    assert sorted(deleted) == ["windows/000001/close.lsr", "windows/000001/payloads/a.lsp"]
    assert [o.key for o in store.list()] == sorted(set(keys) - set(deleted))


# ---- presigned reads with signed announcements --------------------------------------------


def test_presigned_read_of_an_announced_object_checks_the_hash(s3_store_factory: Callable[..., S3Store]) -> None:
    owner = s3_store_factory()
    data = b"payload bytes" * 1000
    owner.put("windows/000007/payloads/peer.lsp", data)
    url = owner.presigned_get_url("windows/000007/payloads/peer.lsp", expires=60)
    identity = Identity.from_seed(b"peer")
    blob = make_announcement(identity, RUN, 7, "windows/000007/payloads/peer.lsp", url,
                             hashlib.sha256(data).hexdigest(), len(data))
    ann = read_announcement(blob, RUN, signer=identity.peer_id)
    reader = UrlReader(RetryPolicy(request_timeout=5), LOCAL)
    assert reader.fetch(ann.url, sha256=ann.sha256, size=ann.size) == data
    assert reader.stats.bytes_down == len(data)

    owner.put("windows/000007/payloads/peer.lsp", b"tampered bytes" * 1000)
    with pytest.raises(IntegrityError):
        reader.fetch(ann.url, sha256=ann.sha256, size=len(b"tampered bytes" * 1000))
    with pytest.raises(IntegrityError):
        reader.fetch(ann.url, sha256=ann.sha256, size=ann.size)


def test_presigned_read_refuses_oversize_before_downloading(s3_store_factory: Callable[..., S3Store]) -> None:
    owner = s3_store_factory()
    data = b"y" * (2 << 20)
    owner.put("d/big.bin", data)
    reader = UrlReader(RetryPolicy(request_timeout=5), LOCAL)
    with pytest.raises(ObjectTooLarge, match="over the cap"):
        reader.fetch(owner.presigned_get_url("d/big.bin"), sha256=hashlib.sha256(data).hexdigest(), max_bytes=1024)
    assert reader.stats.bytes_down == 0
    with pytest.raises(StoreError):
        reader.fetch("file:///etc/passwd", sha256="0" * 64)


def test_presigned_read_of_a_missing_object_is_not_found(s3_store_factory: Callable[..., S3Store]) -> None:
    owner = s3_store_factory()
    with pytest.raises(ObjectNotFound):
        UrlReader(RetryPolicy(request_timeout=5, attempts=1), LOCAL).fetch(owner.presigned_get_url("d/none.bin"), sha256="0" * 64)


def test_announcement_with_a_bad_signature_is_rejected() -> None:
    identity = Identity.from_seed(b"peer")
    blob = bytearray(make_announcement(identity, RUN, 3, "d/k.bin", "https://example.org/x", "a" * 64, 10))
    blob[-1] ^= 1
    with pytest.raises(RecordRejected, match="signature"):
        read_announcement(bytes(blob), RUN)


def test_announcement_for_another_run_or_signer_is_rejected() -> None:
    identity = Identity.from_seed(b"peer")
    blob = make_announcement(identity, RUN, 3, "d/k.bin", "https://example.org/x", "a" * 64, 10)
    with pytest.raises(RecordRejected, match="run"):
        read_announcement(blob, "other@0000000000000000")
    with pytest.raises(RecordRejected, match="signed by"):
        read_announcement(blob, RUN, signer=Identity.from_seed(b"someone else").peer_id)


@pytest.mark.parametrize(
    ("field", "value"),
    [("url", "file:///etc/passwd"), ("sha256", "XYZ"), ("size", -1), ("window", -2), ("key", "../x")],
)
def test_announcement_fields_out_of_range_are_refused(field: str, value: object) -> None:
    args: dict[str, Any] = {"window": 1, "key": "d/k.bin", "url": "https://e.org/x", "sha256": "b" * 64, "size": 3}
    args[field] = value
    with pytest.raises(RecordRejected):
        make_announcement(Identity.from_seed(b"p"), RUN, **args)
