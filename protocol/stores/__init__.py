"""Stores: one small interface (``base.Store``) and its backends.

- ``base.py``   the interface, key rules, ``ObjectInfo``
- ``file.py``   ``file://`` a directory (the embedded default)
- ``memory.py`` in-process, for tests of logic above the store
- ``s3.py``     ``s3://`` any S3-compatible object store through boto3
- ``p2p.py``    ``p2p://`` hivemind DHT records + libp2p streams, no bucket

``open_store(uri)`` picks the backend from the URI scheme.
"""

from __future__ import annotations

from protocol.errors import StoreError
from protocol.stores.base import ObjectInfo, Store


def open_store(uri: str, **options: object) -> Store:
    """Open the store a URI names: ``file:///path``, ``s3://bucket/prefix``, ``p2p://run``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise StoreError(f"store URI {uri!r} has no scheme; use file://, s3:// or p2p://")
    if scheme == "file":
        from protocol.stores.file import FileStore

        return FileStore(rest)
    if scheme == "memory":
        from protocol.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "s3":
        from protocol.stores.s3 import S3Store

        return S3Store.from_uri(uri, **options)
    if scheme == "p2p":
        from protocol.stores.p2p import P2PStore

        return P2PStore.from_uri(uri, **options)
    raise StoreError(f"unknown store scheme {scheme!r} in {uri!r}; use file://, s3:// or p2p://")


__all__ = ["ObjectInfo", "Store", "open_store"]
