"""The CLI verbs that act on one run: init, peer, status, export, validator."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from protocol import paths
from protocol.errors import ManifestError, ObjectNotFound
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores import open_store
from protocol.stores.base import Store

log = logging.getLogger(__name__)


def store_options(manifest: Manifest | None, args: argparse.Namespace) -> dict:
    """Backend options: the manifest's [store] table, overridden by command-line flags."""
    opts: dict = {}
    if manifest is not None:
        cfg = manifest.store
        opts.update(
            endpoint_url=cfg.endpoint_url or None,
            region=cfg.region or None,
            addressing_style=cfg.addressing_style,
            profile=cfg.profile or None,
            initial_peers=cfg.initial_peers,
            request_timeout=cfg.request_timeout,
            retries=cfg.retries,
        )
    if getattr(args, "endpoint_url", None):
        opts["endpoint_url"] = args.endpoint_url
    if getattr(args, "initial_peers", None):
        opts["initial_peers"] = tuple(args.initial_peers)
    if not args.store.startswith("s3://"):
        for key in ("endpoint_url", "region", "addressing_style", "profile"):
            opts.pop(key, None)
    if args.store.startswith("p2p://"):
        opts.pop("retries", None)  # libp2p streams time out per chunk instead
    else:
        opts.pop("initial_peers", None)
    if args.store.startswith("file://") or args.store.startswith("memory://"):
        opts = {}
    return opts


def open_run(args: argparse.Namespace, identity: Identity | None = None) -> tuple[Manifest, Store]:
    """The run's manifest and its store; a --manifest must match the store's own.

    ``identity`` signs what a p2p store announces on our behalf (other stores ignore it).
    """
    local = Manifest.load(args.manifest) if args.manifest else None
    opts = store_options(local, args)
    if identity is not None and args.store.startswith("p2p://"):
        opts["identity"] = identity
    store = open_store(args.store, **opts)
    try:
        theirs = Manifest.from_bytes(store.get(paths.MANIFEST, max_bytes=1 << 20))
    except ObjectNotFound:
        if local is None:
            raise ManifestError(f"no run in {args.store}: create one with `locoswarm init`") from None
        return local, store
    if local is not None and local.digest != theirs.digest:
        raise ManifestError(f"--manifest ({local.run_key}) differs from the run in {args.store} ({theirs.run_key})")
    return theirs, store


def run_command(args: argparse.Namespace) -> int:
    if args.command == "init":
        from node.genesis import init_run

        manifest = Manifest.load(args.manifest) if args.manifest else Manifest()
        opts = store_options(manifest, args)
        if args.create_bucket and args.store.startswith("s3://"):
            opts["create_bucket"] = True
        store = open_store(args.store, **opts)
        try:
            final = init_run(manifest.replace(store__uri=args.store), store)
            if args.out_manifest:
                _write_atomically(Path(args.out_manifest), final.to_toml())
            print(f"run {final.run_key} ready in {args.store}", flush=True)
            if args.serve:
                _serve(store, args.addrs_file)
        finally:
            store.close()
        return 0
    if args.command == "peer":
        import torch.distributed

        from node.config import NodeConfig
        from node.peer import Peer

        device = args.device
        key = Path(args.key) if args.key else Path(args.workdir) / "peer.key"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one peer, many ranks
            from node.ddp import init_from_env

            env = init_from_env()
            device = str(env.device) if env.device.type == "cuda" else device
            if env.rank == 0:
                Identity.load_or_create(key)
            torch.distributed.barrier()  # rank 0 creates the key; the others only read it
        identity = Identity.load_or_create(key)
        manifest, store = open_run(args, identity)
        node = NodeConfig(
            workdir=Path(args.workdir),
            key_path=Path(args.key) if args.key else None,
            device=device,
            threads=args.threads,
            min_peers=args.min_peers,
            max_windows=args.windows,
            eval_every=args.eval_every,
            metrics_port=args.metrics_port,
            comm=args.comm,
        )
        own = None
        if args.publish_store:
            if not args.publish_store.startswith("s3://"):
                raise ManifestError("--publish-store must be an s3:// URI (presigned URLs need S3)")
            own_args = argparse.Namespace(store=args.publish_store,
                                          endpoint_url=args.publish_endpoint_url or args.endpoint_url)
            own = open_store(args.publish_store, **store_options(manifest, own_args))
        with store:
            Peer(manifest, store, node, own_store=own).run()
            if args.store.startswith("p2p://"):
                # Our last payload and close record live only in this process: keep serving
                # them while slower peers finish the window.
                log.info("serving our objects for %.0fs more", manifest.run.window_seconds)
                time.sleep(manifest.run.window_seconds)
        return 0
    if args.command == "status":
        from node.status import print_status

        manifest, store = open_run(args)
        with store:
            return print_status(manifest, store, as_json=args.json)
    if args.command == "export":
        from node.export import export_latest

        manifest, store = open_run(args)
        with store:
            window = export_latest(manifest, store, Path(args.out))
        print(json.dumps({"exported_window": window, "out": args.out}))
        return 0
    if args.command == "validator":
        from validator.service import run_validator

        manifest, store = open_run(args)
        with store:
            return run_validator(manifest, store, args)
    raise SystemExit(f"unknown command {args.command}")


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
