"""The CLI verbs that act on one run: init, peer, status, export, validator (``join`` is
``locoswarm.join``, which runs a peer through ``serve_peer`` here)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from locoswarm.lock import hold_workdir
from locoswarm.machine import check_port_free
from locoswarm.reach import check_same_run, read_run_manifest, store_hint
from protocol.errors import ManifestError, StoreError
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores import StoreSettings, open_store
from protocol.stores.base import Store

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.peer import Peer
    from protocol.stores.s3 import S3Store

log = logging.getLogger(__name__)


def open_run(args: argparse.Namespace, settings: StoreSettings,
             identity: Identity | None = None) -> tuple[Manifest, Store]:
    """The run's manifest and its store; a ``--manifest`` must match the store's own.

    ``identity`` signs what a p2p store announces on our behalf (other stores ignore it).
    """
    store = open_run_store(settings, identity)
    try:
        manifest = read_run_manifest(store, settings)
        if args.manifest:
            check_same_run(Manifest.load(args.manifest), manifest, args.manifest, settings)
    except BaseException:
        store.close()
        raise
    return manifest, store


def open_run_store(settings: StoreSettings, identity: Identity | None = None) -> Store:
    """``open_store``, whose errors name the flag to change."""
    try:
        return open_store(settings, identity=identity)
    except StoreError as exc:
        raise type(exc)(f"{exc}\n  fix: {store_hint(exc, settings)}") from exc


def load_identity(path: Path, role: str) -> tuple[Identity, bool]:
    """This machine's key for ``role`` at ``path`` (made when missing); logs the id that
    every record, the dashboard and the status table show. Returns (identity, created)."""
    created = not path.exists()
    identity = Identity.load_or_create(path)
    log.info("%s id %s (public key %s), key %s%s", role, identity.peer_id, identity.public_key.hex(),
             path.resolve(), " (new: back it up)" if created else "")
    return identity, created


def run_command(args: argparse.Namespace, settings: StoreSettings) -> int:
    if args.command == "init":
        from node.genesis import init_run

        manifest = _init_manifest(args, settings)
        store = open_run_store(settings)
        try:
            final = init_run(manifest, store)
            if args.out_manifest:
                _write_atomically(Path(args.out_manifest), final.to_toml())
            print(f"run {final.run_key} ready in {settings.to_uri()}", flush=True)
            print(f"join it with: locoswarm join '{final.run.store or settings.to_uri()}' (or the URL where you "
                  "publish the manifest)", flush=True)
            if args.serve:
                _serve(store, args.addrs_file)
        finally:
            store.close()
        return 0
    if args.command == "peer":
        return _run_peer(args, settings)
    if args.command == "status":
        from locoswarm.status import print_status, run_state

        manifest, store = open_run(args, settings)
        with store:
            state = run_state(manifest, store, recent=args.windows)
            if args.eval:  # only now: torch and the model cost seconds
                from locoswarm.export import evaluate, newest_model

                newest = newest_model(manifest, store, checkpoint_only=args.checkpoint_only)
                state["model"] = newest.facts() | {"heldout_loss": evaluate(newest, manifest),
                                                   "origin": newest.origin()}
        print_status(state, as_json=args.json)
        return 0
    if args.command == "export":
        from locoswarm.export import export_latest
        from node.runinfo import DecisionRecords

        manifest, store = open_run(args, settings)
        with store:
            exported = export_latest(manifest, store, Path(args.out), checkpoint_only=args.checkpoint_only,
                                     sample=args.sample)
            decided = DecisionRecords(store, manifest).newest()
        exported["run_newest_window"] = decided.window if decided else None
        _tell_export(exported)
        print(json.dumps(exported))
        return 0
    if args.command == "validator":
        with hold_workdir(args.workdir, "validator"):
            check_port_free(args.dashboard_host, args.dashboard_port, "--dashboard-port")
            from validator.service import run_validator

            key = Path(args.key) if args.key else Path(args.workdir) / "validator.key"
            identity, _ = load_identity(key, "validator")
            manifest, store = open_run(args, settings, identity)
            with store:
                return run_validator(manifest, store, args, identity)
    raise SystemExit(f"unknown command {args.command}")


def _run_peer(args: argparse.Namespace, settings: StoreSettings) -> int:
    """``locoswarm peer``, shown on rank 0 by a ``PeerView``: a live table in a terminal, log
    lines otherwise, and a summary however the peer stops."""
    from locoswarm.peerview import PeerView

    view = PeerView(Path(args.workdir)).start() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return _peer(args, settings)
    finally:
        if view is not None:
            view.stop()


def _peer(args: argparse.Namespace, settings: StoreSettings) -> int:
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: one peer, many ranks
    rank = int(os.environ.get("RANK", "0")) if ranks > 1 else 0
    key = Path(args.key) if args.key else Path(args.workdir) / "peer.key"
    # Rank 0 holds the workdir, creates the key and speaks to the store; the others share them.
    with hold_workdir(args.workdir, "peer") if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            check_port_free("127.0.0.1", args.metrics_port, "--metrics-port")
            load_identity(key, "peer")
        device = args.device
        if ranks > 1:
            import torch.distributed

            from node.ddp import init_from_env

            env = init_from_env()
            device = str(env.device) if env.device.type == "cuda" else device
            torch.distributed.barrier()  # rank 0 has made the key
        identity = Identity.load(key)
        manifest, store = open_run(args, settings, identity)
        with store:
            serve_peer(manifest, store, peer_node(args, device, settings), settings,
                       own_store=open_publish_store(args, settings))
    return 0


def peer_node(args: argparse.Namespace, device: str, settings: StoreSettings, **extra: object) -> NodeConfig:
    """The node-local settings the peer flags describe (``peer`` and ``join`` share them)."""
    from node.config import NodeConfig

    return NodeConfig(
        workdir=Path(args.workdir),
        key_path=Path(args.key) if args.key else None,
        device=device,
        threads=args.threads,
        max_windows=args.windows,
        eval_every=args.eval_every,
        micro_batch=args.micro_batch,
        metrics_port=args.metrics_port,
        comm=args.comm,
        policy=settings.policy,
        **extra,  # type: ignore[arg-type]
    )


def open_publish_store(args: argparse.Namespace, settings: StoreSettings) -> S3Store | None:
    """The peer's own bucket (``--publish-store``), or None."""
    if not args.publish_store:
        return None
    own_settings = StoreSettings.parse(args.publish_store, policy=settings.policy,
                                       endpoint_url=args.publish_endpoint_url or settings.endpoint_url,
                                       region=settings.region, addressing_style=settings.addressing_style,
                                       profile=settings.profile)
    if own_settings.scheme != "s3":
        raise ManifestError("--publish-store must be an s3:// URI (presigned URLs need S3)")
    return open_run_store(replace(own_settings, create_bucket=False))  # type: ignore[return-value]


def serve_peer(manifest: Manifest, store: Store, node: NodeConfig, settings: StoreSettings, *,
               own_store: S3Store | None = None, started: Callable[[Peer], None] | None = None) -> Peer:
    """Run one peer until ``node`` says stop: the one code path of ``peer`` and ``join``.

    ``started`` is called once the peer holds the run's data, before it catches up.
    """
    import torch.distributed

    from node.peer import Peer

    try:
        peer = Peer(manifest, store, node, own_store=own_store)
        if started is not None:
            started(peer)
        peer.run()
    finally:
        if torch.distributed.is_initialized():  # leave the group before exit, not in a destructor
            torch.distributed.destroy_process_group()
    if settings.scheme == "p2p":
        # Our last payload and close record live only in this process: keep serving
        # them while slower peers finish the window.
        log.info("serving our objects for %.0fs more", manifest.run.window_seconds)
        time.sleep(manifest.run.window_seconds)
    return peer


def _tell_export(exported: dict) -> None:
    """Say on stderr which window the exported model stands after, and warn when that is
    not the run's newest state (stdout keeps one JSON line for scripts)."""
    after, newest = exported["after_window"], exported["run_newest_window"]
    if after is None:
        print("locoswarm: warning: no window was applied: this is the untrained genesis model"
              + ("" if newest is None else f", although the run has decided windows up to {newest}"), file=sys.stderr)
    else:
        print(f"exported the model after window {after} ({exported['origin']}) to {exported['out']}", file=sys.stderr)
        if newest is not None and newest > after:
            print(f"locoswarm: warning: the run has decided windows up to {newest}; this model stands after "
                  f"window {after}", file=sys.stderr)
    if "sample_text" in exported:
        print(f"sample: {exported['sample_text']!r}", file=sys.stderr)


def _init_manifest(args: argparse.Namespace, settings: StoreSettings) -> Manifest:
    """The manifest ``init`` writes: the file given (or the defaults) with the flags applied,
    and where joiners reach the store (``run.store``) unless the file says so."""
    manifest = Manifest.load(args.manifest) if args.manifest else Manifest()
    updates: dict = {}
    if not manifest.run.store:
        updates["run__store"] = _public_uri(settings)
    if args.name:
        updates["run__id"] = args.name
    if args.genesis:
        updates["run__genesis"] = _parse_time(args.genesis)
    if args.peer_key:
        updates["run__peers"] = tuple(_public_key(k) for k in args.peer_key)
    if args.validator_key:
        updates["validators__keys"] = tuple(_public_key(k) for k in args.validator_key)
    return manifest.replace(**updates) if updates else manifest


def _public_uri(settings: StoreSettings) -> str:
    """The store URI with its non-secret settings, a file store's path made absolute."""
    if settings.scheme == "file":
        settings = replace(settings, uri="file://" + os.path.abspath(settings.uri.removeprefix("file://")))
    return replace(settings, create_bucket=False).to_uri()


def _public_key(value: str) -> str:
    """A hex public key, given as such or as the path of a key file."""
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower()):
        return value.lower()
    if Path(value).is_file():
        return Identity.load(value).public_key.hex()
    raise ManifestError(f"{value!r} is neither a hex ed25519 public key (64 characters) nor a key file")


def _parse_time(value: str) -> float:
    """Unix seconds, ``+MINUTES`` from now, or an ISO 8601 time (UTC unless it says otherwise)."""
    import datetime as dt

    try:
        if value.startswith("+"):
            return round(time.time() + 60 * float(value[1:]), 3)
        try:
            return float(value)
        except ValueError:
            when = dt.datetime.fromisoformat(value)
            return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    except ValueError as exc:
        raise ManifestError(f"--genesis {value!r}: use unix seconds, +MINUTES or an ISO 8601 time") from exc


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _serve(store: Store, addrs_file: str | None) -> None:
    """Keep the store open (a p2p store serves the run's objects from this process) until
    SIGTERM or Ctrl-C. Where others can reach it is printed, and written to ``addrs_file``."""
    addrs = list(getattr(store, "visible_maddrs", []))
    if addrs_file:
        _write_atomically(Path(addrs_file), json.dumps(addrs))
    print(json.dumps({"serving": store.uri, "initial_peers": addrs}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
