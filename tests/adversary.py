"""A process of attackers for the adversarial test: ``python -m tests.adversary ...``.

One ``Peer`` follows the run like anyone (so it always knows the current base digest) and
is itself the ``wrong_data`` attacker: it trains on batches assigned to somebody else.
After it publishes, every other attacker publishes under its own key:

    noise      random positions and signs, the norm of a real update
    copy       another peer's payload of this window, re-signed as its own
    zeros      an update of all zeros
    nan        a NaN scale (bypassing the encoder's own refusal)
    huge       a real update scaled by 1e6
    replay     its own payload of the previous window, uploaded again
    forge      a payload whose header claims an honest peer's id
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from node.config import NodeConfig
from node.exchange import Exchange
from node.peer import Peer
from protocol import paths
from protocol.codec_types import SCALE_ZERO_CODE, CompressedTensor
from protocol.errors import ObjectNotFound
from protocol.identity import Identity, peer_id_of
from protocol.manifest import Manifest
from protocol.stores import open_store
from protocol.wire import Expectation, decode_payload, encode_payload

FAULTS = ("noise", "copy", "zeros", "nan", "huge", "replay", "forge")
log = logging.getLogger("adversary")


class Impostor(Identity):
    """Signs with its own key but claims another peer's id."""

    claimed: str = ""

    @property
    def peer_id(self) -> str:
        return self.claimed


class WrongDataPeer(Peer):
    """Trains on the batches of a peer id that is not its own."""

    def train(self, window: int, after_step=None):
        real, self.peer_id = self.peer_id, "0" * 24
        try:
            return super().train(window, after_step)
        finally:
            self.peer_id = real


class AttackExchange(Exchange):
    """Publishes the follower's payload, then every attacker's, then behaves normally."""

    def __init__(self, *args, attackers: dict[str, Identity], peer: Peer, **kwargs):
        super().__init__(*args, **kwargs)
        self.attackers = attackers
        self.peer = peer
        self.previous: dict[str, bytes] = {}

    def publish(self, window: int, data: bytes, deadline: float) -> bool:
        ok = super().publish(window, data, deadline)
        own = decode_payload(data, self._expect(window, self.identity.peer_id)).tensors
        for fault, ident in self.attackers.items():
            blob = self._attack(fault, ident, window, own)
            if blob is not None:
                # Each attacker writes under its real id (a per-peer bucket in a real run).
                self.store.put_if_absent(paths.payload_key(window, peer_id_of(ident.public_key)), blob)
                self.previous[fault] = blob
        return ok

    def _expect(self, window: int, peer: str) -> Expectation:
        return dataclasses.replace(self.peer.follower.expectation(window), peer_id=peer)

    def _encode(self, ident: Identity, window: int, tensors: dict[str, CompressedTensor]) -> bytes:
        return encode_payload(run=self.run_key, window=window, base_digest=self.peer.replica.digest, tokens=1000,
                              tensors=tensors, codec=self.peer.manifest.codec, identity=ident)

    def _attack(self, fault: str, ident: Identity, window: int, own: dict[str, CompressedTensor]) -> bytes | None:
        g = torch.Generator().manual_seed(window * 101 + len(fault))
        if fault == "noise":
            return self._encode(ident, window, {
                n: dataclasses.replace(c, codes=torch.randint(0, 4, c.codes.shape, generator=g, dtype=torch.uint8))
                for n, c in own.items()})
        if fault == "copy":
            victim = self._someone_elses_payload(window)
            if victim is None:
                return None
            tensors = decode_payload(victim, self._expect(window, peer_id_of(victim[-96:-64]))).tensors
            return self._encode(ident, window, tensors)
        if fault == "zeros":
            zero = {n: dataclasses.replace(c, scale_q=torch.full_like(c.scale_q, SCALE_ZERO_CODE), scale_ref=0.0)
                    for n, c in own.items()}
            return self._encode(ident, window, zero)
        if fault == "nan":
            bad = {n: dataclasses.replace(c, scale_ref=math.nan) for n, c in own.items()}
            with mock.patch("protocol.wire._check_compressed"):
                return self._encode(ident, window, bad)
        if fault == "huge":
            big = {n: dataclasses.replace(c, scale_ref=float(torch.tensor(c.scale_ref * 1e6, dtype=torch.float32)))
                   for n, c in own.items()}
            return self._encode(ident, window, big)
        if fault == "replay":
            return self.previous.get("replay") or self._encode(ident, window, own)
        if fault == "forge":
            return self._encode(ident, window, own)
        raise ValueError(fault)

    def _someone_elses_payload(self, window: int) -> bytes | None:
        ours = {peer_id_of(i.public_key) for i in self.attackers.values()} | {self.identity.peer_id}
        for _ in range(50):
            for info in self.store.list(paths.payloads_prefix(window)):
                peer = paths.peer_of_payload_key(info.key)
                if peer not in ours:
                    try:
                        return self.store.get(info.key)
                    except ObjectNotFound:
                        continue
            time.sleep(0.2)
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--windows", type=int, required=True)
    ap.add_argument("--victim", required=True, help="peer id the forger claims to be")
    ap.add_argument("--faults", default=",".join(FAULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    manifest = Manifest.load(args.manifest)
    store = open_store(args.store)
    peer = WrongDataPeer(manifest, store, NodeConfig(workdir=workdir / "wrong_data", max_windows=args.windows,
                                                     eval_every=0, publish_checkpoints=False))
    attackers: dict[str, Identity] = {}
    for fault in args.faults.split(","):
        ident = Identity.load_or_create(workdir / f"{fault}.key")
        if fault == "forge":
            ident = Impostor(ident.private_key)
            object.__setattr__(ident, "claimed", args.victim)  # Identity is a frozen dataclass
        attackers[fault] = ident
    # A test harness, not a pattern: every part of the peer that talks to the store uses the attack exchange.
    attack = AttackExchange(store, peer.identity, manifest.run_key, peer.acct, attackers=attackers, peer=peer)
    peer.exchange = peer.follower.exchange = attack
    if peer.closing is not None:
        peer.closing.exchange = attack
    ids = {fault: peer_id_of(ident.public_key) for fault, ident in attackers.items()} | {"wrong_data": peer.peer_id}
    (workdir / "ids.json").write_text(json.dumps(ids))
    peer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

