"""A red team in one process: it attacks a run the ways ``docs/security.md`` lists, so the
attack suite (``tests/test_attacks.py``) and ``locoswarm up --attack KIND`` can show each
defence holding against real peer processes.

    python -m locoswarm.attack --store URI --workdir DIR --windows N --faults a,b   (or: all)
    locoswarm up --attack a,b                    (a local network with the attacker beside it)

It holds fresh keys only (never one the run trusts) and write access to the store, as a
stranger on a public run would. It follows the run by reading its decisions, and in every
new window does each of its faults once; ``report.json`` in its workdir says how many
objects each fault wrote (the tests check that every attack really happened).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import http.server
import json
import logging
import math
import os
import random
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

from node.accounting import Accounting
from node.checkpoint import meta_key, weights_key
from node.follow import DecisionReader
from node.runinfo import read_manifest
from protocol import paths
from protocol.aggregate import aggregate
from protocol.announce import make_announcement
from protocol.codec import compress
from protocol.codec_types import CompressedTensor
from protocol.consensus import (
    PRECOMMIT,
    PREVOTE,
    CloseValue,
    Included,
    sign_decision,
    sign_proposal,
    sign_vote,
)
from protocol.errors import LocoError
from protocol.identity import Identity, peer_id_of
from protocol.manifest import Manifest
from protocol.scores import PeerScore, make_score_record
from protocol.stores import StoreSettings, open_store
from protocol.stores.base import Store, check_key
from protocol.wire import (
    MAGIC,
    VERSION,
    Expectation,
    Payload,
    decode_payload,
    encode_payload,
    read_header,
)

log = logging.getLogger("attack")


class Fault(enum.Enum):
    """Every attack this process knows, by the name ``--faults`` takes."""

    FORGED_DECISIONS = "decision, proposal and votes signed by a stranger, counting only its noise payload"
    EMPTY_DECISIONS = "decisions that count nothing, signed by a stranger"
    RANDOM_BASE = "a decision on a random base digest"
    FUTURE_CLOSE = "a decision closing far in the future, counting a peer that does not exist"
    BACKDATED_CLOSE = "a decision counting every honest payload but closing 120 s early"
    FLIP_RECORDS = "honest decision and vote records overwritten with garbage, back and forth"
    VOTE_SQUAT = "garbage written first under the keys honest closers will vote under"
    FORGED_CHECKPOINT = "a checkpoint of a later window with other weights"
    JUNK_CHECKPOINTS = "junk under checkpoints/999999/ and beside real checkpoints"
    NESTED_KEY = "an object under <payload key>/x, to make the payload key a directory"
    JUNK_PAYLOAD_KEYS = "payloads/junk.lsp, 2049 empty payloads with hex names, keys with HTML in them"
    JUNK_SCORES = "2 MiB of junk under scores/, and score records signed by a stranger"
    HUGE_OBJECTS = "two 20 MiB junk payload objects per window"
    HUGE_HEADER = "a signed payload whose header is 16 MiB"
    DUPLICATE_KEYS = "a signed payload whose header repeats a key with another value"
    SYBIL_FLOOD = "200 fresh keys, each publishing a valid payload every window"
    DECISION_REPLAY = "the previous window's decision record, put under this window"
    BLOB_POISON = "garbage under the content-addressed key of every honest payload"
    LISTING_FLOOD = "2000 junk keys among the consensus records"
    ANNOUNCE_HIJACK = "an announcement for an honest peer, signed by a stranger"
    SYBIL_NORM = "4 fresh keys sending an honest update at 25 times its norm"
    SYBIL_COPIES = "20 fresh keys copying an honest update with 7% of its signs flipped, one replaying the last aggregate"
    TRICKLE_URL = "an announcement whose URL sends one byte every 10 s"
    REDIRECT_URL = "an announcement whose URL redirects to an address inside the reader's network"


FLOOD_SYBILS = 200
NORM_SYBILS = 4
COPY_SYBILS = 20


class _Hostile(http.server.BaseHTTPRequestHandler):
    """The attacker's web server: trickles, redirects, and records who came to the 'internal' page."""

    def do_GET(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        if self.path.startswith("/trickle"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(10)
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{server.server_address[1]}/internal")
            self.end_headers()
        else:
            server.internal_hits += 1
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"secret")

    def log_message(self, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    internal_hits = 0


class Attacker:
    def __init__(self, manifest: Manifest, store: Store, workdir: Path, faults: list[Fault], *, file_root: Path | None):
        self.manifest = manifest
        self.store = store
        self.workdir = workdir
        self.faults = faults
        self.file_root = file_root
        self.me = Identity.load_or_create(workdir / "attacker.key")
        self.sybils = [Identity.from_seed(f"sybil {i} {self.me.peer_id}".encode()) for i in range(FLOOD_SYBILS)]
        self.decisions = DecisionReader(store, manifest, Accounting())
        self.report: dict[str, int] = {f.name: 0 for f in faults}
        self.turns: dict[Fault, int] = dict.fromkeys(faults, 0)
        self.decided = -1
        self.previous_decision_blob: bytes | None = None
        self._stop = threading.Event()
        self.server: _Server | None = None
        if {Fault.TRICKLE_URL, Fault.REDIRECT_URL} & set(faults):
            self.server = _Server(("127.0.0.1", 0), _Hostile)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # ------------------------------------------------------------------ following the run
    def open_window(self) -> int:
        """The window being trained now: the one after the newest decided window."""
        while self.decisions.read(self.decided + 1) is not None:
            self.decided += 1
        return self.decided + 1

    def honest_payload(self, window: int, wait: float = 20.0) -> tuple[bytes, Payload] | None:
        """A payload an honest peer published for ``window`` (the first that decodes)."""
        mine = {s.peer_id for s in self.sybils} | {self.me.peer_id}
        deadline = time.time() + wait
        while time.time() < deadline:
            for info in self.store.list(paths.payloads_prefix(window)):
                peer = paths.peer_of_payload_key(info.key)
                if peer is None or peer in mine or info.size < 100 or info.size > 64 << 20:
                    continue
                try:
                    data = self.store.get(info.key, max_bytes=64 << 20)
                    header, _ = read_header(data, max_bytes=len(data))
                    expect = Expectation(run=self.manifest.run_key, window=window, layouts=header.layouts,
                                         codec=self.manifest.codec, max_bytes=len(data))
                    return data, decode_payload(data, expect)
                except LocoError:
                    continue
            time.sleep(0.3)
        return None

    def sign(self, identity: Identity, window: int, honest: Payload, tensors: dict[str, CompressedTensor]) -> bytes:
        return encode_payload(run=self.manifest.run_key, window=window, base_digest=honest.header.base_digest,
                              tokens=1, tensors=tensors, codec=self.manifest.codec, identity=identity)

    def noise(self, honest: Payload, seed: int) -> dict[str, CompressedTensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: dataclasses.replace(c, codes=torch.randint(0, 4, c.codes.shape, generator=g, dtype=torch.uint8))
                for n, c in honest.tensors.items()}

    def put(self, fault: Fault, key: str, data: bytes) -> None:
        """Write as any writer of the store can (a file store's files directly: thousands of
        junk objects a window must not wait for fsync); counts what was refused."""
        try:
            if self.file_root is None:
                self.store.put(key, data)
            else:
                check_key(key)
                path = self.file_root / key
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".tmp-{path.name}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            self.report[fault.name] += 1
        except (LocoError, OSError) as exc:
            self.report[f"{fault.name}_refused"] = self.report.get(f"{fault.name}_refused", 0) + 1
            log.info("%s: refused %r: %s", fault.name, key, exc)

    def raw_file(self, fault: Fault, relative: str, data: bytes) -> None:
        """Write a file straight into a file store, as an S3 writer could name any key."""
        if self.file_root is None:
            return
        path = self.file_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.report[fault.name] += 1

    # ------------------------------------------------------------------ the faults
    def attack(self, window: int) -> None:
        """Each fault once while ``window`` is open, least-done first: on short windows the
        faults a closed window cut off lead the next one, so every fault gets its turn."""
        found = self.honest_payload(window)
        for fault in sorted(self.faults, key=lambda f: self.turns[f]):
            if self.open_window() > window:
                return  # the window closed under us: on to the next one
            self.turns[fault] += 1
            try:
                getattr(self, f"_{fault.name.lower()}")(window, found)
            except Exception as exc:  # noqa: BLE001 (the attacker itself must not stop: log and go on)
                log.warning("%s in window %d failed: %r", fault.name, window, exc)
            self.save_report()

    def _forged_value(self, fault: Fault, window: int, found: tuple[bytes, Payload] | None, *,
                      base: bytes | None = None, closed_at: float | None = None,
                      included: tuple[Included, ...] | None = None) -> CloseValue:
        if included is None:
            included = ()
            if found is not None:
                blob = self.sign(self.me, window, found[1], self.noise(found[1], window))
                self.put(fault, paths.payload_key(window, self.me.peer_id), blob)
                included = (Included(self.me.peer_id, hashlib.sha256(blob).hexdigest(), len(blob), True),)
        digest = base if base is not None else (found[1].header.base_digest if found else b"\0" * 32)
        return CloseValue(digest, time.time() if closed_at is None else closed_at, -1, (), included)

    def _forge_decision(self, fault: Fault, window: int, value: CloseValue) -> None:
        run = self.manifest.run_key
        votes = [sign_vote(s, run, PRECOMMIT, window, 0, value.id) for s in self.sybils[:3]]
        self.put(fault, paths.decision_key(window, self.me.peer_id), sign_decision(self.me, run, window, value, votes))

    def _forged_decisions(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        run = self.manifest.run_key
        value = self._forged_value(Fault.FORGED_DECISIONS, window, found)
        self._forge_decision(Fault.FORGED_DECISIONS, window, value)
        self.put(Fault.FORGED_DECISIONS, paths.consensus_key(window, 0, "proposal", self.me.peer_id),
                 sign_proposal(self.me, run, window, 0, value, -1))
        for kind in (PREVOTE, PRECOMMIT):
            self.put(Fault.FORGED_DECISIONS, paths.consensus_key(window, 0, kind, self.me.peer_id),
                     sign_vote(self.me, run, kind, window, 0, value.id))

    def _empty_decisions(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        self._forge_decision(Fault.EMPTY_DECISIONS, window, self._forged_value(Fault.EMPTY_DECISIONS, window, found, included=()))

    def _random_base(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        self._forge_decision(Fault.RANDOM_BASE, window, self._forged_value(Fault.RANDOM_BASE, window, found, base=os.urandom(32)))

    def _future_close(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        ghost = (Included("f" * 24, "0" * 64, 1, True),)
        self._forge_decision(Fault.FUTURE_CLOSE, window,
                             self._forged_value(Fault.FUTURE_CLOSE, window, found, closed_at=1e12, included=ghost))

    def _backdated_close(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        listed = tuple(sorted(
            (Included(p, hashlib.sha256(self.store.get(paths.payload_key(window, p))).hexdigest(), o.size, True)
             for o in self.store.list(paths.payloads_prefix(window)) if (p := paths.peer_of_payload_key(o.key))
             and o.size < 64 << 20), key=lambda i: i.peer_id))
        self._forge_decision(Fault.BACKDATED_CLOSE, window,
                             self._forged_value(Fault.BACKDATED_CLOSE, window, found, closed_at=time.time() - 120, included=listed))

    def _vote_squat(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        for closer in self.manifest.closers:
            cid = _pid(closer)
            for future in (window + 1, window + 2):
                for kind in ("proposal", PREVOTE, PRECOMMIT):
                    for round_ in range(3):
                        self.put(Fault.VOTE_SQUAT, paths.consensus_key(future, round_, kind, cid), b"squatted")
                self.put(Fault.VOTE_SQUAT, paths.decision_key(future, cid), b"squatted")

    def _flip_records(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        """Starts (once) a thread that keeps overwriting the newest honest records."""
        if getattr(self, "_flipper", None) is None:
            self._flipper = threading.Thread(target=self._flip_forever, daemon=True)
            self._flipper.start()
        self.report[Fault.FLIP_RECORDS.name] += 0

    def _flip_forever(self) -> None:
        originals: dict[str, bytes] = {}
        garbage = True
        while not self._stop.wait(1.5):
            window = self.decided + 1
            for prefix in (paths.decisions_prefix(window - 1), paths.consensus_prefix(window)):
                for info in self.store.list(prefix):
                    if self.me.peer_id in info.key:
                        continue
                    try:
                        if info.key not in originals:
                            originals[info.key] = self.store.get(info.key, max_bytes=1 << 20)
                        self.store.put(info.key, b"flipped" if garbage else originals[info.key])
                        self.report[Fault.FLIP_RECORDS.name] += 1
                    except LocoError:
                        continue
            garbage = not garbage

    def _forged_checkpoint(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        if found is None:
            return
        from safetensors.torch import save

        from protocol.digest import weights_digest

        g = torch.Generator().manual_seed(window)
        weights = {n: torch.randn(lay.shape, generator=g) for n, lay in found[1].header.layouts.items()}
        blob = save({n: t.contiguous() for n, t in sorted(weights.items())})
        digest = weights_digest(weights)
        target = window + 2
        self.put(Fault.FORGED_CHECKPOINT, weights_key(target, digest), blob)
        meta = {"window": target, "digest": digest.hex(), "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        self.put(Fault.FORGED_CHECKPOINT, meta_key(target, digest), json.dumps(meta).encode())

    def _junk_checkpoints(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        self.put(Fault.JUNK_CHECKPOINTS, "checkpoints/999999/meta.json", b"{not json")
        self.put(Fault.JUNK_CHECKPOINTS, f"checkpoints/999999/{'ab' * 32}.json", b'{"window": 999999}')
        self.put(Fault.JUNK_CHECKPOINTS, f"checkpoints/{window:06d}/{'cd' * 32}.json", b"\0" * 100)

    def _nested_key(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        for closer in self.manifest.run.peers:
            key = paths.payload_key(window + 1, _pid(closer)) + "/x.bin"
            if self.file_root is not None:  # the store refuses this key; a neighbour on its disk need not ask
                self.raw_file(Fault.NESTED_KEY, key, b"x")
            else:
                self.put(Fault.NESTED_KEY, key, b"x")

    def _junk_payload_keys(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        prefix = paths.payloads_prefix(window)
        self.put(Fault.JUNK_PAYLOAD_KEYS, prefix + "junk.lsp", b"junk" * 100)
        rng = random.Random(window)
        for _ in range(2049):
            self.put(Fault.JUNK_PAYLOAD_KEYS, prefix + f"{rng.getrandbits(96):024x}.lsp", b"")
        self.raw_file(Fault.JUNK_PAYLOAD_KEYS, prefix + "<script>alert(1)<%2Fscript>.lsp", b"<b>html</b>")
        self.raw_file(Fault.JUNK_PAYLOAD_KEYS, prefix + "line\\nbreak.lsp", b"\n\n")

    def _junk_scores(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        self.put(Fault.JUNK_SCORES, paths.scores_prefix(window) + "junk.lsr", os.urandom(2 << 20))
        table = {f"{i:024x}": PeerScore(1.0, True, standing=True) for i in range(50)}
        record = make_score_record(self.me, self.manifest.run_key, window, table)
        for key in self.manifest.validators.keys:  # under every trusted validator's name
            self.put(Fault.JUNK_SCORES, paths.score_key(window, _pid(key)), record)
        self.put(Fault.JUNK_SCORES, paths.score_key(window, self.me.peer_id), record)

    def _huge_objects(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        for s in self.sybils[:2]:
            self.put(Fault.HUGE_OBJECTS, paths.payload_key(window, s.peer_id), os.urandom(20 << 20))

    def _huge_header(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        header = msgpack.packb({"run": self.manifest.run_key, "window": window, "pad": b"\0" * (16 << 20)},
                               use_bin_type=True)
        ident = self.sybils[2]
        head = MAGIC + struct.pack(">HI", VERSION, len(header)) + header + ident.public_key
        self.put(Fault.HUGE_HEADER, paths.payload_key(window, ident.peer_id), head + ident.sign(head))

    def _duplicate_keys(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        if found is None:
            return
        ident = self.sybils[3]
        blob = self.sign(ident, window, found[1], self.noise(found[1], window + 7))
        # Append a second "window" entry to the header map: same signature scheme, two meanings.
        (n,) = struct.unpack(">I", blob[6:10])
        header = blob[10:10 + n]
        count = header[0] & 0x0F
        extended = bytes([0x80 | (count + 1)]) + header[1:] + msgpack.packb("window") + msgpack.packb(window + 1)
        head = blob[:6] + struct.pack(">I", len(extended)) + extended + blob[10 + n: -64]
        self.put(Fault.DUPLICATE_KEYS, paths.payload_key(window, ident.peer_id), head + ident.sign(head))

    def _sybil_flood(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        if found is None:
            return
        for i, s in enumerate(self.sybils):
            self.put(Fault.SYBIL_FLOOD, paths.payload_key(window, s.peer_id), self.sign(s, window, found[1],
                                                                                           self.noise(found[1], i)))

    def _decision_replay(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        previous = self.store.list(paths.decisions_prefix(window - 1)) if window > 0 else []
        for info in previous[:1]:
            self.put(Fault.DECISION_REPLAY, paths.decision_key(window, self.me.peer_id),
                     self.store.get(info.key, max_bytes=1 << 20))

    def _blob_poison(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        for info in self.store.list(paths.payloads_prefix(window)):
            if paths.peer_of_payload_key(info.key) and 100 < info.size < 64 << 20:
                data = self.store.get(info.key, max_bytes=64 << 20)
                self.put(Fault.BLOB_POISON, paths.blob_key(window, hashlib.sha256(data).hexdigest()), b"poison")

    def _listing_flood(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        rng = random.Random(window)
        closers = [_pid(k) for k in self.manifest.closers]
        for i in range(2000):
            signer = closers[i % len(closers)] if i % 2 else f"{rng.getrandbits(96):024x}"
            self.put(Fault.LISTING_FLOOD, paths.consensus_key(window, 100 + i % 50, "prevote", signer), b"x" * 64)

    def _announce_hijack(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        for key in self.manifest.run.peers:
            victim = _pid(key)
            record = make_announcement(self.me, self.manifest.run_key, window, paths.payload_key(window, victim),
                                       "http://127.0.0.1:9/nothing", "0" * 64, 10)
            self.put(Fault.ANNOUNCE_HIJACK, paths.announce_key(window, victim), record)

    def _sybil_norm(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        if found is None:
            return
        big = {n: dataclasses.replace(c, scale_ref=_f32(c.scale_ref * 25.0)) for n, c in found[1].tensors.items()}
        for s in self.sybils[10:10 + NORM_SYBILS]:
            self.put(Fault.SYBIL_NORM, paths.payload_key(window, s.peer_id), self.sign(s, window, found[1], big))

    def _sybil_copies(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        if found is None:
            return
        g = torch.Generator().manual_seed(window)
        for s in self.sybils[20:20 + COPY_SYBILS]:
            flipped = {}
            for n, c in found[1].tensors.items():
                flip = (torch.rand(c.codes.shape, generator=g) < 0.07).to(torch.uint8) << 1
                flipped[n] = dataclasses.replace(c, codes=c.codes ^ flip)
            self.put(Fault.SYBIL_COPIES, paths.payload_key(window, s.peer_id), self.sign(s, window, found[1], flipped))
        replay = self._previous_aggregate(window, found[1])
        if replay is not None:
            s = self.sybils[20 + COPY_SYBILS]
            self.put(Fault.SYBIL_COPIES, paths.payload_key(window, s.peer_id), self.sign(s, window, found[1], replay))

    def _previous_aggregate(self, window: int, honest: Payload) -> dict[str, CompressedTensor] | None:
        decision = self.decisions.read(window - 1) if window > 0 else None
        if decision is None:
            return None
        contributions = []
        for inc in decision.included:
            try:
                data = self.store.get(paths.payload_key(window - 1, inc.peer_id), max_bytes=64 << 20)
                header, _ = read_header(data, max_bytes=len(data))
                expect = Expectation(run=self.manifest.run_key, window=window - 1, layouts=header.layouts,
                                     codec=self.manifest.codec, max_bytes=len(data))
                contributions.append((inc.peer_id, decode_payload(data, expect).tensors))
            except LocoError:
                continue
        if not contributions:
            return None
        layouts = honest.header.layouts
        dense = aggregate(contributions, layouts)
        return {n: compress(dense[n], lay) for n, lay in layouts.items()}

    def _announced(self, fault: Fault, window: int, identity: Identity, path: str) -> None:
        assert self.server is not None
        url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        key = paths.payload_key(window, identity.peer_id)
        record = make_announcement(identity, self.manifest.run_key, window, key, url, "ab" * 32, 100000)
        self.put(fault, paths.announce_key(window, identity.peer_id), record)

    def _trickle_url(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        self._announced(Fault.TRICKLE_URL, window, self.sybils[50], "/trickle")

    def _redirect_url(self, window: int, found: tuple[bytes, Payload] | None) -> None:
        self._announced(Fault.REDIRECT_URL, window, self.sybils[51], "/redirect")

    # ------------------------------------------------------------------ running
    def run(self, windows: int) -> None:
        done = -1
        try:
            while (window := self.open_window()) < windows:
                if window > done:
                    self.attack(window)
                    done = window
                    self.save_report()
                time.sleep(0.3)
        finally:
            self._stop.set()
            self.save_report()

    def save_report(self) -> None:
        report = dict(self.report)
        if self.server is not None:
            report["internal_hits"] = self.server.internal_hits
        report["ids"] = {"attacker": self.me.peer_id, "sybils": [s.peer_id for s in self.sybils]}
        tmp = self.workdir / "report.json.tmp"
        tmp.write_text(json.dumps(report))
        os.replace(tmp, self.workdir / "report.json")


def _pid(public_key_hex: str) -> str:
    return peer_id_of(bytes.fromhex(public_key_hex))


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32)) if math.isfinite(x) else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m locoswarm.attack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="the run's store URI")
    ap.add_argument("--workdir", required=True, help="the attacker's directory (its keys, report.json)")
    ap.add_argument("--windows", type=int, required=True, help="attack until this window is decided")
    ap.add_argument("--faults", required=True,
                    help=f"comma-separated, or all: {', '.join(f.name.lower() for f in Fault)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s attack %(levelname)s %(message)s")
    torch.set_num_threads(1)
    settings = StoreSettings.parse(args.store)
    store = open_store(settings)
    names = [name.strip().upper() for name in args.faults.split(",") if name.strip()]
    unknown = [n for n in names if n != "ALL" and n not in Fault.__members__]
    if unknown or not names:
        ap.error(f"unknown faults {unknown}; choose from: all, {', '.join(f.name.lower() for f in Fault)}")
    faults = list(Fault) if "ALL" in names else [Fault[n] for n in names]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    file_root = Path(settings.uri.removeprefix("file://")) if settings.scheme == "file" else None
    Attacker(read_manifest(store), store, workdir, faults, file_root=file_root).run(args.windows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
