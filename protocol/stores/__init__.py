"""Stores: one small interface (``base.Store``) and its backends.

- ``base.py``   the interface, key rules, ``ObjectInfo``
- ``file.py``   ``file://`` a directory (the embedded default)
- ``memory.py`` in-process, for tests of logic above the store
- ``s3.py``     ``s3://`` any S3-compatible object store through boto3
- ``p2p.py``    ``p2p://`` hivemind DHT records + libp2p streams, no bucket

``StoreSettings`` says how *this machine* reaches a run's store. It is local, never part
of the hashed manifest: copying a run to another bucket changes no run identity (the
manifest's ``run.store`` only names where joiners look first; these settings win over it).
A store URI may carry the non-secret settings a joiner needs as query parameters, so one
string is all a run operator hands out::

    s3://bucket/prefix?endpoint=https://acct.r2.cloudflarestorage.com&region=auto&addressing=path
    p2p://run-name?peers=/ip4/203.0.113.5/tcp/31337/p2p/Qm...,/ip4/...

Credentials never go in a URI: S3 takes them from the standard AWS chain (environment,
``~/.aws``, instance role) or a named ``profile``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field, replace

from protocol.errors import StoreError
from protocol.identity import Identity
from protocol.retry import RetryPolicy
from protocol.stores.base import ObjectInfo, Store

SCHEMES = ("file", "s3", "p2p", "memory")
_QUERY_KEYS = {"endpoint": "endpoint_url", "region": "region", "addressing": "addressing_style", "peers": "initial_peers"}


@dataclass(frozen=True)
class StoreSettings:
    """Where a run's store is and how to reach it from this machine."""

    uri: str
    """``file:///dir``, ``s3://bucket/prefix`` or ``p2p://run`` (without query parameters)."""
    endpoint_url: str = ""
    """S3: endpoint of an S3-compatible service (R2, MinIO, a local server); "" for AWS."""
    region: str = ""
    """S3: region name; "" lets boto3 decide."""
    addressing_style: str = "auto"
    """S3: "auto", "path" or "virtual" bucket addressing."""
    profile: str = ""
    """S3: named AWS profile to take credentials from; "" = the standard credential chain."""
    initial_peers: tuple[str, ...] = ()
    """p2p: multiaddrs of peers to bootstrap the DHT from."""
    create_bucket: bool = False
    """S3: create the bucket when it does not exist (run operators, at ``init``)."""
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    """Timeouts and retries of every request to this store."""

    def __post_init__(self) -> None:
        scheme, sep, rest = self.uri.partition("://")
        if not sep:
            raise StoreError(f"store URI {self.uri!r} has no scheme; use file://, s3:// or p2p://")
        if scheme not in SCHEMES:
            raise StoreError(f"unknown store scheme {scheme!r} in {self.uri!r}; use file://, s3:// or p2p://")
        if "?" in self.uri:
            raise StoreError(f"store URI {self.uri!r}: parse query parameters with StoreSettings.parse")
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise StoreError(f"addressing style must be auto, path or virtual, got {self.addressing_style!r}")
        # What a run operator hands out must never carry a secret: refuse the URL forms that can.
        if scheme in ("s3", "p2p") and "@" in rest.partition("/")[0]:
            raise StoreError(f"store URI {self.uri!r} looks like it carries credentials (user@); credentials "
                             "never go in a URI: S3 reads them from the AWS environment variables or --profile")
        if self.endpoint_url:
            endpoint = urllib.parse.urlsplit(self.endpoint_url)
            if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
                raise StoreError(f"endpoint {self.endpoint_url!r} must be an http:// or https:// URL")
            if endpoint.username or endpoint.password or endpoint.query:
                raise StoreError(f"endpoint {endpoint.hostname!r} carries credentials or a query; credentials "
                                 "never go in a URL: S3 reads them from the AWS environment variables or --profile")

    @property
    def scheme(self) -> str:
        return self.uri.partition("://")[0]

    @classmethod
    def parse(cls, uri: str, **overrides: object) -> StoreSettings:
        """Settings from a URI that may carry ``?endpoint=&region=&addressing=&peers=``;
        ``overrides`` (e.g. command-line flags) win over the URI's values when not empty."""
        base, _, query = uri.partition("?")
        values: dict[str, object] = {}
        for key, items in urllib.parse.parse_qs(query, keep_blank_values=False, strict_parsing=bool(query)).items():
            if key not in _QUERY_KEYS or len(items) != 1:
                raise StoreError(f"store URI {uri!r}: unknown or repeated parameter {key!r}; "
                                 f"known: {', '.join(_QUERY_KEYS)}")
            name = _QUERY_KEYS[key]
            values[name] = tuple(p for p in items[0].split(",") if p) if name == "initial_peers" else items[0]
        values.update({k: v for k, v in overrides.items() if v not in (None, "", ())})
        return cls(base, **values)  # type: ignore[arg-type]

    def to_uri(self) -> str:
        """The URI with its non-secret settings as query parameters (what a joiner is given)."""
        defaults = StoreSettings(self.uri)
        query = {k: getattr(self, v) for k, v in _QUERY_KEYS.items() if getattr(self, v) != getattr(defaults, v)}
        if "peers" in query:
            query["peers"] = ",".join(query["peers"])  # type: ignore[arg-type]
        return self.uri + ("?" + urllib.parse.urlencode(query, safe=":/,") if query else "")

    def with_policy(self, policy: RetryPolicy) -> StoreSettings:
        return replace(self, policy=policy)


def open_store(settings: StoreSettings | str, *, identity: Identity | None = None) -> Store:
    """Open the store the settings (or a plain URI) name.

    ``identity`` signs what a p2p store announces on our behalf (other backends ignore it).
    """
    if isinstance(settings, str):
        settings = StoreSettings.parse(settings)
    scheme, _, rest = settings.uri.partition("://")
    if scheme == "file":
        from protocol.stores.file import FileStore

        return FileStore(rest)
    if scheme == "memory":
        from protocol.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "s3":
        from protocol.stores.s3 import S3Store

        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"not an s3 URI: {settings.uri!r}; expected s3://bucket/prefix")
        return S3Store(
            bucket, prefix, endpoint_url=settings.endpoint_url or None, region=settings.region or None,
            addressing_style=settings.addressing_style, profile=settings.profile or None, policy=settings.policy,
            create_bucket=settings.create_bucket,
        )
    from protocol.stores.p2p import P2PStore

    return P2PStore(rest.strip("/"), identity=identity, initial_peers=settings.initial_peers, policy=settings.policy)


__all__ = ["ObjectInfo", "Store", "StoreSettings", "open_store"]
