"""``p2p://<run>`` store: no bucket at all. The DHT says who holds what; bytes move over libp2p.

Transport: hivemind 1.1.12's ``DHTNode`` (Kademlia) on top of hivemind's ``P2P``, which
drives the go-libp2p daemon (``p2pd``) that hivemind bundles. We use ``DHTNode`` directly,
not the ``hivemind.DHT`` process wrapper (it hangs on values over ~64 KiB and adds a
process), on an asyncio loop in a background thread that this store owns; the sync methods
submit coroutines to that loop and wait with a timeout.

Layout of one object ``a/b/name``:

- **DHT record** (small): DHT key ``locoswarm/<run>/a/b/``, subkey ``name``, value a signed
  record (``records.py`` kind ``p2p_object``: key, sha256, size, holder's libp2p peer id and
  addresses, created_at, deleted). Records expire after ``record_ttl`` seconds; the holder
  re-announces every ``record_ttl / 3`` seconds while it keeps the object, so a late
  joiner can still fetch a checkpoint, and a peer that leaves takes its objects with it.
- **Bytes**: kept by the writer in a bounded local table (memory, then an optional spill
  directory) and served on the libp2p stream protocol ``/locoswarm/get/1``:
  request ``u16 key length | key``; answer ``u8 status`` then, when found,
  ``u64 length | bytes``. The reader refuses a length over the record's size or its
  ``max_bytes`` before reading, reads in chunks with a per-chunk timeout, and checks sha256.

Trust: every record is verified (signature, run, schema, and that it sits under the DHT
key and subkey its ``key`` names) when another peer asks us to store it (a DHT record
validator) and again when we read it. Keys that name a peer (``protocol.paths.owner``:
payloads, announcements, consensus records, decisions, scores) are bound to that peer: a
record for them is valid only when that peer signed it, so nobody can re-point another
peer's key. Other keys (checkpoints, data, blobs) are verified by their content. The
records' ``created_at`` is the writer's claim, so ``trusted_clock`` is False: nothing may
order uploads by it.

Limits, by design of a DHT: ``put_if_absent`` is get-then-store, best-effort and not
atomic; ``list(prefix)`` answers one directory level (``windows/000012/payloads/`` lists
the objects directly in it, not in subdirectories); ``delete`` stores a signed tombstone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import struct
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from protocol import paths
from protocol.errors import (
    IntegrityError,
    ObjectNotFound,
    ObjectTooLarge,
    RecordRejected,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from protocol.identity import Identity
from protocol.records import require, sign_record, verify_record
from protocol.retry import RetryPolicy
from protocol.stores.base import (
    MAX_KEY_CHARS,
    ObjectInfo,
    Store,
    check_directory,
    check_key,
)

try:
    from hivemind.dht.node import DHTNode
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord, RecordValidatorBase
    from hivemind.p2p import PeerID
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
    from hivemind.utils.multiaddr import Multiaddr
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time
except ImportError as _exc:  # hivemind is the optional extra ``locoswarm[p2p]``
    HIVEMIND_IMPORT_ERROR: ImportError | None = _exc
    RecordValidatorBase = object  # type: ignore[misc,assignment]
else:
    HIVEMIND_IMPORT_ERROR = None

log = logging.getLogger(__name__)

T = TypeVar("T")

KIND = "p2p_object"
PROTOCOL = "/locoswarm/get/1"
STREAM_CHUNK = 1 << 16
MAX_RECORD_BYTES = 4 << 10
MAX_ADDRS = 16
_OK, _MISSING = 0, 1


@dataclass(frozen=True)
class ObjectRecord:
    """A verified ``p2p_object`` record: where to fetch ``key`` and what it must hash to."""

    key: str
    sha256: str
    size: int
    holder: str
    addrs: tuple[str, ...]
    created_at: float
    deleted: bool
    signer: str


def _directory(key: str) -> tuple[str, str]:
    """``a/b/name`` -> (``a/b/``, ``name``); a top-level key lives in directory ``''``."""
    head, sep, name = key.rpartition("/")
    return head + sep, name


def parse_record(data: bytes, run: str) -> ObjectRecord:
    """Verify signature and run, then every field, strictly; raise ``RecordRejected``."""
    record = verify_record(data, kind=KIND, run=run, max_bytes=MAX_RECORD_BYTES,
                           fields=("key", "sha256", "size", "holder", "addrs", "created_at", "deleted"))
    body = record.body
    key = require(body, "key", str, KIND)
    try:
        check_key(key)
    except StoreError as exc:
        raise RecordRejected(f"{KIND} record names an invalid key {key[:80]!r}") from exc
    sha256 = require(body, "sha256", str, KIND)
    size = require(body, "size", int, KIND)
    holder = require(body, "holder", str, KIND)
    addrs = require(body, "addrs", list, KIND)
    created_at = require(body, "created_at", (int, float), KIND)
    deleted = require(body, "deleted", bool, KIND)
    if not deleted and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
        raise RecordRejected(f"{KIND} record sha256 must be 64 lowercase hex characters")
    if size < 0:
        raise RecordRejected(f"{KIND} record size must not be negative")
    if not 0 < len(holder) <= 128 or len(addrs) > MAX_ADDRS:
        raise RecordRejected(f"{KIND} record holder or address list has an invalid length")
    bound = paths.owner(key)
    if bound is not None and bound != record.peer_id:
        raise RecordRejected(f"{KIND} record for {key[:80]!r} is signed by {record.peer_id}, not by its owner {bound}")
    if not all(isinstance(a, str) and len(a) <= 256 for a in addrs):
        raise RecordRejected(f"{KIND} record addresses must be strings of at most 256 characters")
    return ObjectRecord(key, sha256, size, holder, tuple(addrs), float(created_at), deleted, record.peer_id)


class _RecordValidator(RecordValidatorBase):  # type: ignore[misc,valid-type]
    """Refuses DHT records that are not valid ``p2p_object`` records of this run, or that sit
    under another DHT key/subkey than the object key they name (hivemind calls ``validate``
    when a peer asks us to store a record and when a peer returns one to our search)."""

    def __init__(self, run: str, namespace: str):
        self.run = run
        self.namespace = namespace

    def validate(self, record: DHTRecord) -> bool:
        try:
            value = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            log.warning("refused a DHT record that is not msgpack: %s", exc)
            return False
        if not isinstance(value, bytes):
            log.warning("refused a DHT record whose value is a %s, not a signed record", type(value).__name__)
            return False
        try:
            parsed = parse_record(value, self.run)
        except RecordRejected as exc:
            log.warning("refused a DHT record: %s", exc)
            return False
        directory, name = _directory(parsed.key)
        if DHTID.generate(source=self.namespace + directory).to_bytes() != record.key or subkey != name:
            log.warning("refused a DHT record for %r stored under another DHT key or subkey", parsed.key)
            return False
        return True


@dataclass
class _Held:
    """One object this peer serves: its signed record and its bytes (in memory or spilled)."""

    record: bytes
    size: int
    data: bytes | None
    path: Path | None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def _translate(op: str, key: str | None) -> Iterator[None]:
    """The one place where hivemind, p2pd, asyncio and OS errors become ``StoreError``s."""
    try:
        yield
    except StoreError:
        raise
    except (TimeoutError, concurrent.futures.TimeoutError) as exc:
        raise StoreTimeout(f"{op}: no answer in time", key=key) from exc
    except (P2PDaemonError, P2PHandlerError) as exc:
        raise StoreUnavailable(f"{op}: libp2p failed: {exc}", key=key) from exc
    except asyncio.IncompleteReadError as exc:
        raise StoreUnavailable(f"{op}: the peer closed the stream after {len(exc.partial)} bytes", key=key) from exc
    except (ConnectionError, OSError, EOFError) as exc:
        raise StoreUnavailable(f"{op}: connection failed: {exc}", key=key) from exc
    except concurrent.futures.CancelledError as exc:
        raise StoreUnavailable(f"{op}: cancelled because the store is closing", key=key) from exc


class P2PStore(Store):
    """Objects announced in hivemind's DHT and served from the writer over libp2p streams."""

    trusted_clock = False

    def __init__(
        self,
        run: str,
        *,
        identity: Identity | None = None,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        policy: RetryPolicy | None = None,
        dht_wait_timeout: float = 3.0,
        record_ttl: float = 600.0,
        max_memory_bytes: int = 1 << 30,
        spill_dir: str | None = None,
        startup_timeout: float = 30.0,
    ):
        """``policy.object_seconds`` bounds one whole operation, ``policy.request_timeout`` one
        read of a stream (and ``get`` is retried by the policy), ``dht_wait_timeout`` one DHT
        RPC. Objects over ``max_memory_bytes`` of held data go to ``spill_dir`` (a temp dir is
        made when needed if it is None)."""
        policy = policy or RetryPolicy()
        if HIVEMIND_IMPORT_ERROR is not None:
            raise StoreUnavailable(f"p2p:// needs hivemind==1.1.12 (pip install 'locoswarm[p2p]'): {HIVEMIND_IMPORT_ERROR}")
        if not run or "/" in run:
            raise StoreError(f"p2p run name must be non-empty without '/', got {run!r}")
        if dht_wait_timeout > policy.object_seconds or record_ttl < 3:
            raise StoreError("need dht_wait_timeout <= policy.object_seconds, and record_ttl >= 3 s")
        self.run = run
        self.uri = f"p2p://{run}"
        self.identity = identity or Identity.generate()
        self.policy = policy
        self.request_timeout = policy.object_seconds
        self.chunk_timeout = policy.request_timeout
        self.record_ttl = record_ttl
        self.max_memory_bytes = max_memory_bytes
        self._namespace = f"locoswarm/{run}/"
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._spill_tmp: tempfile.TemporaryDirectory[str] | None = None
        self._held: dict[str, _Held] = {}
        self._held_lock = threading.Lock()
        self._memory_used = 0
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"p2p-store-{run}", daemon=True)
        self._thread.start()
        try:
            self._call(
                "start",
                None,
                self._start(list(initial_peers), list(host_maddrs), list(announce_maddrs), dht_wait_timeout),
                startup_timeout,
            )
        except BaseException:
            self._stop_loop()
            raise

    # ---- event-loop side -------------------------------------------------------------

    async def _start(
        self, initial_peers: list[str], host_maddrs: list[str], announce_maddrs: list[str], wait_timeout: float
    ) -> None:
        kwargs: dict[str, Any] = {"host_maddrs": host_maddrs}
        if announce_maddrs:
            kwargs["announce_maddrs"] = announce_maddrs
        self._node = await DHTNode.create(
            initial_peers=initial_peers or None,
            record_validator=_RecordValidator(self.run, self._namespace),
            wait_timeout=wait_timeout,
            **kwargs,
        )
        self.peer_id: str = self._node.peer_id.to_base58()
        self.visible_maddrs: list[str] = [str(m) for m in await self._node.p2p.get_visible_maddrs()]
        await self._node.p2p.add_binary_stream_handler(PROTOCOL, self._serve)
        self._refresher = asyncio.create_task(self._refresh_forever())
        log.info("p2p store %s up as %s at %s", self.uri, self.peer_id, self.visible_maddrs)

    async def _serve(self, _info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one ``/locoswarm/get/1`` request from another peer."""
        try:
            (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), self.chunk_timeout))
            if n > MAX_KEY_CHARS:
                return
            key = (await asyncio.wait_for(reader.readexactly(n), self.chunk_timeout)).decode("utf-8", "replace")
            with self._held_lock:
                held = self._held.get(key)
            if held is None:
                writer.write(bytes([_MISSING]))
            else:
                data = await asyncio.to_thread(held.read)
                writer.write(bytes([_OK]) + struct.pack(">Q", len(data)))
                view = memoryview(data)
                for offset in range(0, len(data), STREAM_CHUNK):
                    writer.write(view[offset : offset + STREAM_CHUNK])
                    await asyncio.wait_for(writer.drain(), self.chunk_timeout)
            await asyncio.wait_for(writer.drain(), self.chunk_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.info("p2p serve: a reader went away: %s", exc)
        finally:
            writer.close()

    async def _refresh_forever(self) -> None:
        """Re-announce every held object so its record outlives ``record_ttl`` while we hold it."""
        while True:
            await asyncio.sleep(self.record_ttl / 3)
            with self._held_lock:
                items = [(k, h.record) for k, h in self._held.items()]
            for key, record in items:
                try:
                    await self._announce(key, record)
                except (TimeoutError, StoreError, P2PDaemonError, OSError) as exc:
                    log.warning("p2p: re-announcing %r failed: %s", key, exc)

    async def _announce(self, key: str, record: bytes) -> bool:
        directory, name = _directory(key)
        return await self._node.store(
            self._namespace + directory, record, get_dht_time() + self.record_ttl, subkey=name
        )

    async def _lookup_dir(self, directory: str) -> dict[str, ObjectRecord]:
        """Verified records of one directory, by name; invalid ones are logged and skipped."""
        found = await self._node.get(self._namespace + directory, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        out = {}
        for name, item in found.value.items():
            value = getattr(item, "value", None)
            try:
                if not isinstance(value, bytes) or not isinstance(name, str):
                    raise RecordRejected(f"{KIND} record value is not bytes or its subkey is not a string")
                record = parse_record(value, self.run)
                if record.key != directory + name:
                    raise RecordRejected(f"{KIND} record for {record.key!r} sits under {directory + name!r}")
            except RecordRejected as exc:
                log.warning("p2p: skipping a record in %r: %s", directory, exc)
                continue
            out[name] = record
        return out

    async def _lookup(self, key: str) -> ObjectRecord | None:
        directory, name = _directory(key)
        record = (await self._lookup_dir(directory)).get(name)
        return None if record is None or record.deleted else record

    async def _fetch(self, record: ObjectRecord, max_bytes: int | None) -> bytes:
        """Stream ``record.key`` from its holder, refusing more bytes than the record or cap allow."""
        peer = PeerID.from_base58(record.holder)
        if record.addrs:
            with contextlib.suppress(P2PDaemonError, ValueError):
                await asyncio.wait_for(
                    self._node.p2p._client.connect(peer, [Multiaddr(a) for a in record.addrs]), self.chunk_timeout
                )
        _, reader, writer = await asyncio.wait_for(
            self._node.p2p.call_binary_stream_handler(peer, PROTOCOL), self.chunk_timeout
        )
        try:
            encoded = record.key.encode()
            writer.write(struct.pack(">H", len(encoded)) + encoded)
            await asyncio.wait_for(writer.drain(), self.chunk_timeout)
            status = (await asyncio.wait_for(reader.readexactly(1), self.chunk_timeout))[0]
            if status != _OK:
                raise ObjectNotFound(f"holder {record.holder} no longer has the object", key=record.key)
            (length,) = struct.unpack(">Q", await asyncio.wait_for(reader.readexactly(8), self.chunk_timeout))
            if max_bytes is not None and length > max_bytes:
                raise ObjectTooLarge(f"holder offers {length} bytes, over the cap of {max_bytes}", key=record.key)
            if length != record.size:
                raise IntegrityError(f"holder offers {length} bytes, the record says {record.size}", key=record.key)
            data = bytearray()
            while len(data) < length:
                chunk = await asyncio.wait_for(reader.read(min(STREAM_CHUNK, length - len(data))), self.chunk_timeout)
                if not chunk:
                    raise StoreUnavailable(f"holder closed the stream after {len(data)} of {length} bytes", key=record.key)
                data += chunk
        finally:
            writer.close()
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.sha256:
            raise IntegrityError(f"holder served bytes with sha256 {digest}, the record says {record.sha256}", key=record.key)
        return bytes(data)

    async def _get(self, key: str, max_bytes: int | None) -> bytes:
        with self._held_lock:
            held = self._held.get(key)
        if held is not None:
            if max_bytes is not None and held.size > max_bytes:
                raise ObjectTooLarge(f"object is {held.size} bytes, over the cap of {max_bytes}", key=key)
            return await asyncio.to_thread(held.read)
        record = await self._lookup(key)
        if record is None:
            raise ObjectNotFound("no such object in the DHT", key=key)
        if max_bytes is not None and record.size > max_bytes:
            raise ObjectTooLarge(f"object is {record.size} bytes, over the cap of {max_bytes}", key=key)
        return await self._fetch(record, max_bytes)

    # ---- sync side -------------------------------------------------------------------

    def _call(self, op: str, key: str | None, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the store's loop; translate its errors; give up after ``timeout``."""
        if self._closed:
            coro.close()
            raise StoreUnavailable(f"{op}: the p2p store is closed", key=key)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with _translate(op, key):
            try:
                return future.result(timeout if timeout is not None else self.request_timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise

    def _sign(self, key: str, *, sha256: str, size: int, deleted: bool) -> bytes:
        body = {
            "key": key, "sha256": sha256, "size": size, "holder": self.peer_id,
            "addrs": self.visible_maddrs[:MAX_ADDRS], "created_at": time.time(), "deleted": deleted,
        }
        return sign_record(self.identity, KIND, self.run, body)

    def _hold(self, key: str, data: bytes, record: bytes) -> None:
        """Keep ``data`` to serve it: in memory while under budget, else in the spill directory."""
        size = len(data)
        with self._held_lock:
            old = self._held.pop(key, None)
            if old is not None and old.data is not None:
                self._memory_used -= old.size
            if self._memory_used + size <= self.max_memory_bytes:
                self._held[key] = _Held(record, size, bytes(data), None)
                self._memory_used += size
                return
        spill = self._spill_path(hashlib.sha256(data).hexdigest())
        try:
            spill.write_bytes(data)
        except OSError as exc:
            raise StoreUnavailable(f"cannot spill the object to {spill}: {exc}", key=key) from exc
        with self._held_lock:
            self._held[key] = _Held(record, size, None, spill)

    def _spill_path(self, name: str) -> Path:
        if self._spill_dir is None:
            self._spill_tmp = tempfile.TemporaryDirectory(prefix="locoswarm-p2p-")
            self._spill_dir = Path(self._spill_tmp.name)
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir / name

    def _release(self, key: str) -> None:
        with self._held_lock:
            old = self._held.pop(key, None)
            if old is not None and old.data is not None:
                self._memory_used -= old.size

    def put(self, key: str, data: bytes) -> None:
        check_key(key)
        record = self._sign(key, sha256=hashlib.sha256(data).hexdigest(), size=len(data), deleted=False)
        self._hold(key, data, record)
        if not self._call("put", key, self._announce(key, record)):
            self._release(key)
            raise StoreUnavailable("no DHT node accepted the record", key=key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Best-effort on a DHT: two peers racing may both see the key absent and both write."""
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        check_key(key)
        return self.policy.call(lambda: self._call("get", key, self._get(key, max_bytes)), what=f"p2p get of {key!r}")

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._held_lock:
            if key in self._held:
                return True
        return self._call("exists", key, self._lookup(key)) is not None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects directly in the directory ``prefix`` names (up to its last '/') whose
        names start with the rest of ``prefix``; subdirectories are not walked."""
        directory, partial = _directory(prefix)
        check_directory(directory)
        records = self._call("list", prefix, self._lookup_dir(directory))
        out = [
            ObjectInfo(r.key, r.size, r.created_at)
            for name, r in records.items()
            if not r.deleted and name.startswith(partial)
        ]
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        check_key(key)
        self._release(key)
        tombstone = self._sign(key, sha256="", size=0, deleted=True)
        if not self._call("delete", key, self._announce(key, tombstone)):
            raise StoreUnavailable("no DHT node accepted the tombstone", key=key)

    def close(self) -> None:
        """Stop re-announcing, shut the DHT node and its p2pd daemon down, stop the loop."""
        if self._closed:
            return
        try:
            self._call("close", None, self._shutdown(), timeout=15.0)
        except StoreError as exc:
            log.warning("p2p store did not shut down cleanly: %s", exc)
        finally:
            self._closed = True
            self._stop_loop()
            if self._spill_tmp is not None:
                self._spill_tmp.cleanup()

    async def _shutdown(self) -> None:
        self._refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._refresher
        await self._node.shutdown()

    def _stop_loop(self) -> None:
        """Cancel what hivemind left running on the loop, then stop and close it."""
        if self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop)
            with contextlib.suppress(concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                future.result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
