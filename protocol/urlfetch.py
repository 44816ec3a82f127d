"""Bounded GETs of the URLs peers announce (their own buckets' presigned URLs).

An announcement is written by an untrusted peer, so the URL it names is hostile input:

- **Where**: http(s) only, and the host must pass the run's ``AddressPolicy``: a listed host
  name, and (unless the run allows private addresses, as local test networks do) every
  address it resolves to must be public: no loopback, private, link-local (cloud metadata
  services live there), multicast or reserved ranges. The connection goes to the address
  that was checked, never to a second resolution (DNS rebinding).
- **No redirects**: a 3xx answer is refused, so a URL cannot bounce a reader elsewhere.
- **How much**: the size is checked against the announcement and the cap on
  Content-Length and again while reading.
- **How long**: each read waits at most ``policy.request_timeout``, and the whole object at
  most ``policy.download_seconds(size)`` (one request timeout plus the time its announced
  size takes at ``min_bytes_per_second``): a server that trickles a byte every few seconds
  costs its own download slot for about a request timeout, never a window.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from protocol.errors import (
    AccessDenied,
    IntegrityError,
    ObjectNotFound,
    ObjectTooLarge,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from protocol.retry import RetryPolicy

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class AddressPolicy:
    """Which hosts an announced URL may name (from the run's manifest)."""

    hosts: tuple[str, ...] = ()
    """Host names allowed (exact, or ``.example.com`` for any subdomain); empty = any host."""
    allow_private: bool = False
    """Also allow loopback, private and link-local addresses (local networks and tests)."""

    def resolve(self, host: str, port: int) -> str:
        """An address of ``host`` to connect to, after checking the policy; ``AccessDenied``
        names what is not allowed."""
        if self.hosts and not any(host == h or (h.startswith(".") and host.endswith(h)) for h in self.hosts):
            raise AccessDenied(f"host {host!r} is not one the run allows announcements from")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise StoreUnavailable(f"cannot resolve {host!r}: {exc}") from exc
        addresses = [info[4][0] for info in infos]
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not self.allow_private and not ip.is_global:
                raise AccessDenied(f"host {host!r} resolves to the non-public address {address}")
        return addresses[0]


class _Connection(http.client.HTTPConnection):
    """Connects to an address resolved and checked before, whatever DNS says now."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _TLSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _Accounting:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_down = 0
        self.seconds_down = 0.0

    def add(self, n: int, seconds: float) -> None:
        with self._lock:
            self.bytes_down += n
            self.seconds_down += seconds


class UrlReader:
    """GETs announced URLs within the run's address policy and the retry policy's bounds."""

    def __init__(self, policy: RetryPolicy | None = None, addresses: AddressPolicy | None = None):
        self.policy = policy or RetryPolicy()
        self.addresses = addresses or AddressPolicy()
        self.stats = _Accounting()

    def fetch(self, url: str, *, sha256: str, size: int | None = None, max_bytes: int | None = None) -> bytes:
        """The object at ``url``, whose SHA-256 must be ``sha256`` (``IntegrityError``)."""
        shown = url.split("?", 1)[0][:200]
        if size is not None and max_bytes is not None and size > max_bytes:
            raise ObjectTooLarge(f"announced size {size} is over the cap of {max_bytes}", key=shown)
        seconds = self.policy.download_seconds(size)
        deadline = time.monotonic() + seconds
        data = self.policy.call(lambda: self._get(url, shown, size, max_bytes, deadline),
                                what=f"GET of {shown!r}", deadline=time.time() + seconds)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise IntegrityError(f"sha256 is {digest}, the announcement says {sha256}", key=shown)
        return data

    def _get(self, url: str, shown: str, size: int | None, max_bytes: int | None, deadline: float) -> bytes:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AccessDenied(f"refusing to fetch a non-HTTP URL: {shown!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self.addresses.resolve(parts.hostname, port)
        kind = _TLSConnection if parts.scheme == "https" else _Connection
        conn = kind(parts.hostname, port, address, self.policy.request_timeout)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        t0 = time.perf_counter()
        try:
            conn.request("GET", target)
            response = conn.getresponse()
            self._check_status(response.status, shown)
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit():
                self._check_length(int(length), True, size, max_bytes, shown)
            out = bytearray()
            while chunk := response.read1(READ_CHUNK):
                out += chunk
                self._check_length(len(out), False, size, max_bytes, shown)
                if time.monotonic() > deadline:
                    raise StoreTimeout("the download is too slow for its size", key=shown)
            self._check_length(len(out), True, size, max_bytes, shown)
        except TimeoutError as exc:
            raise StoreTimeout(f"no answer in time: {exc}", key=shown) from exc
        except (http.client.HTTPException, ssl.SSLError, OSError) as exc:
            raise StoreUnavailable(f"connection failed: {exc}", key=shown) from exc
        finally:
            conn.close()
        self.stats.add(len(out), time.perf_counter() - t0)
        return bytes(out)

    @staticmethod
    def _check_status(status: int, shown: str) -> None:
        if status == 200:
            return
        if 300 <= status < 400:
            raise AccessDenied(f"refusing to follow a redirect ({status})", key=shown)
        if status == 404:
            raise ObjectNotFound("no such object behind the URL", key=shown)
        if status == 403:
            raise AccessDenied("access denied: the presigned URL is expired or invalid", key=shown)
        if status >= 500:
            raise StoreUnavailable(f"server error {status}", key=shown)
        raise StoreError(f"request refused with {status}", key=shown)

    @staticmethod
    def _check_length(length: int, done: bool, size: int | None, max_bytes: int | None, shown: str) -> None:
        if max_bytes is not None and length > max_bytes:
            raise ObjectTooLarge(f"object is at least {length} bytes, over the cap of {max_bytes}", key=shown)
        if size is not None and (length > size or (done and length != size)):
            raise IntegrityError(f"object is {'' if done else 'at least '}{length} bytes, the announcement says {size}",
                                 key=shown)
