"""The one store interface every backend implements: immutable objects under a run prefix.

Keys are relative, '/'-separated paths such as ``windows/000012/payloads/<peer>.lsp``.
Objects are written once and never changed; ``put_if_absent`` is the single atomic
primitive (used for a window's close record). Every method raises only ``StoreError``
subclasses; each backend translates its own library's errors at this boundary.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import InvalidKey

_KEY = re.compile(r"^([A-Za-z0-9_-]+/)*[A-Za-z0-9_-][A-Za-z0-9._-]*\.[A-Za-z0-9_-]+$")
_DIRECTORY = re.compile(r"^([A-Za-z0-9_-]+/)*$")
MAX_KEY_CHARS = 512


def check_key(key: str) -> str:
    """Refuse keys that could escape the run prefix, that some backend cannot store, or that
    could nest one object inside another.

    Directory parts are letters, digits, '-' and '_'; the last part is a file name with an
    extension. So no object's key is ever a directory of another one: nobody can turn a
    payload key into a directory (``<key>/x``) and keep its owner from publishing.
    """
    if len(key) > MAX_KEY_CHARS or not _KEY.fullmatch(key):
        raise InvalidKey("invalid object key", key=key)
    return key


def is_valid_key(key: str) -> bool:
    """Whether ``check_key`` would accept ``key`` (listings leave out every other key: no
    store operation could address it, and nothing should read it)."""
    return len(key) <= MAX_KEY_CHARS and bool(_KEY.fullmatch(key))


def check_directory(directory: str) -> str:
    """Refuse a directory (``a/b/``, or ``""`` for the top) no key could live in."""
    if len(directory) > MAX_KEY_CHARS or not _DIRECTORY.fullmatch(directory):
        raise InvalidKey("invalid directory", key=directory)
    return directory


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says of one object. ``modified`` is the store's clock, unix seconds."""

    key: str
    size: int
    modified: float


class Store(ABC):
    """put/get/list/delete of immutable objects under one run prefix."""

    uri: str
    trusted_clock: bool = True
    """Whether ``ObjectInfo.modified`` comes from the store itself (a server or file system
    clock nobody else sets) rather than from the writer's claim."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` (replacing any object there, atomically)."""

    def put_file(self, key: str, path: Path) -> None:
        """Write the file at ``path`` under ``key``; stores that can stream it (S3: multipart
        uploads, past the 5 GB of one PUT) do not hold it in memory."""
        self.put(key, Path(path).read_bytes())

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only when nothing is under ``key`` yet; True when this call wrote it."""

    @abstractmethod
    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read the object; ``ObjectNotFound`` if absent, ``StoreError`` if over ``max_bytes``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key; keys that are not valid
        (``is_valid_key``), which another writer may have made, are left out."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""

    def exists(self, key: str) -> bool:
        return any(o.key == key for o in self.list(key))

    def close(self) -> None:
        """Release connections and background threads."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
