"""``file://`` store: a directory. The embedded default, so a whole network runs on one machine."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from protocol.errors import ObjectNotFound, ObjectTooLarge, StoreUnavailable
from protocol.stores.base import ObjectInfo, Store, check_key, is_valid_key

log = logging.getLogger(__name__)


class FileStore(Store):
    """Objects are files under ``root``; writes go through a temp file and a rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.uri = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {self.root}: {exc}") from exc

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_tmp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            # A valid key names a file and no valid key lies under it (directories carry no
            # dot, keys do), so a directory here was planted by another writer to block us.
            log.warning("removing the directory squatting on %r", path.name)
            shutil.rmtree(path, ignore_errors=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            os.replace(self._write_tmp(path, data), path)
        except OSError as exc:
            raise StoreUnavailable(f"write failed: {exc}", key=key) from exc

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            os.close(fd)
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise StoreUnavailable(f"write failed: {exc}", key=key) from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_tmp(path, data)
            try:
                os.link(tmp, path)  # atomic: fails if the name exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise StoreUnavailable(f"write failed: {exc}", key=key) from exc

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            # O_NONBLOCK: a planted FIFO must not block the open; only regular files are objects.
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ObjectNotFound("not a regular file", key=key)
                if max_bytes is not None and st.st_size > max_bytes:
                    raise ObjectTooLarge(f"object is {st.st_size} bytes, over the cap of {max_bytes}", key=key)
                data = f.read(st.st_size if max_bytes is None else max_bytes + 1)
                if max_bytes is not None and len(data) > max_bytes:  # grew while we read
                    raise ObjectTooLarge(f"object grew past the cap of {max_bytes}", key=key)
                return data
        except FileNotFoundError as exc:
            raise ObjectNotFound("no such object", key=key) from exc
        except IsADirectoryError as exc:
            raise ObjectNotFound("no such object", key=key) from exc
        except OSError as exc:
            raise StoreUnavailable(f"read failed: {exc}", key=key) from exc

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        # Walk only the deepest directory the prefix names, not the whole store.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        out = []
        try:
            for dirpath, _, files in os.walk(base):
                for name in files:
                    if name.startswith(".tmp-"):
                        continue
                    full = Path(dirpath) / name
                    key = full.relative_to(self.root).as_posix()
                    if key.startswith(prefix) and is_valid_key(key):
                        try:
                            st = full.stat()
                        except FileNotFoundError:
                            continue
                        out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        except OSError as exc:
            raise StoreUnavailable(f"list failed: {exc}", key=prefix) from exc
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"delete failed: {exc}", key=key) from exc
        for parent in path.parents:  # empty directories go too (collected windows leave none behind)
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or a writer just made something there)
                break
