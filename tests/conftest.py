"""Shared fixtures for tests against real servers on 127.0.0.1.

- ``moto_server``: one moto S3 server subprocess for the whole session, on a free port.
- ``moto_server_factory``: extra moto servers a test may kill and restart.
- ``s3_store_factory``: ``S3Store``s on fresh buckets of a given server, short timeouts.
- ``p2p_store_factory``: real hivemind DHT nodes (``P2PStore``), each with its own p2pd.

Every process and node started here is stopped at teardown.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MOTO_START_TIMEOUT = 30.0
_runs = itertools.count()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A ``python -m moto.server`` subprocess bound to 127.0.0.1 that can be killed and restarted."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + MOTO_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._process.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"moto server did not listen on port {self.port} within {MOTO_START_TIMEOUT} s")

    def kill(self) -> None:
        if self._process is None:
            return
        self._process.kill()
        self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def aws_test_credentials() -> Iterator[None]:
    """Fake credentials for moto, isolated from any real AWS config on the machine."""
    patch = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        patch.delenv(name, raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def moto_server(aws_test_credentials: None) -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def moto_server_factory(aws_test_credentials: None) -> Iterator[Callable[[], MotoServer]]:
    servers: list[MotoServer] = []

    def make() -> MotoServer:
        server = MotoServer()
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def s3_store_factory(moto_server: MotoServer) -> Iterator[Callable[..., Any]]:
    """``make(server=None, **options)``: an ``S3Store`` on a new bucket (short timeouts)."""
    from protocol.retry import RetryPolicy
    from protocol.stores.s3 import S3Store

    stores = []

    def make(server: MotoServer | None = None, **options: Any) -> S3Store:
        server = server or moto_server
        settings: dict[str, Any] = {
            "endpoint_url": server.endpoint_url, "region": "us-east-1",
            "policy": RetryPolicy(request_timeout=5.0, attempts=2), "create_bucket": True,
        }
        settings.update(options)
        bucket = settings.pop("bucket", f"t-{uuid.uuid4().hex[:16]}")
        store = S3Store(bucket, settings.pop("prefix", "run"), **settings)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def p2p_store_factory() -> Iterator[Callable[..., Any]]:
    """``make(initial_peers=(), **options)``: a ``P2PStore`` of run ``test-<n>`` on 127.0.0.1."""
    from protocol.retry import RetryPolicy
    from protocol.stores import p2p

    if p2p.HIVEMIND_IMPORT_ERROR is not None:
        pytest.skip(f"hivemind is not importable: {p2p.HIVEMIND_IMPORT_ERROR}")
    run = f"test-{next(_runs)}"
    stores: list[p2p.P2PStore] = []

    def make(initial_peers: tuple[str, ...] | list[str] = (), **options: Any) -> p2p.P2PStore:
        settings: dict[str, Any] = {"policy": RetryPolicy(request_timeout=3.0, object_seconds=10.0),
                                    "dht_wait_timeout": 1.0}
        settings.update(options)
        store = p2p.P2PStore(settings.pop("run", run), initial_peers=initial_peers, **settings)
        stores.append(store)
        return store

    yield make
    for store in reversed(stores):
        store.close()
