"""In-process store: a dict behind a lock. For tests of the logic above stores."""

from __future__ import annotations

import threading
import time

from protocol.errors import ObjectNotFound, ObjectTooLarge
from protocol.stores.base import ObjectInfo, Store, check_key


class MemoryStore(Store):
    def __init__(self) -> None:
        self.uri = "memory://"
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[check_key(key)] = (bytes(data), time.time())

    def put_if_absent(self, key: str, data: bytes) -> bool:
        with self._lock:
            if check_key(key) in self._objects:
                return False
            self._objects[key] = (bytes(data), time.time())
            return True

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        with self._lock:
            item = self._objects.get(check_key(key))
        if item is None:
            raise ObjectNotFound("no such object", key=key)
        if max_bytes is not None and len(item[0]) > max_bytes:
            raise ObjectTooLarge(f"object is {len(item[0])} bytes, over the cap of {max_bytes}", key=key)
        return item[0]

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        with self._lock:
            items = [(k, len(v), t) for k, (v, t) in self._objects.items() if k.startswith(prefix)]
        return [ObjectInfo(k, n, t) for k, n, t in sorted(items)]

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)
