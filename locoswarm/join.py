"""``locoswarm join RUN``: from a manifest URL (or a store URI) to a training peer, in one command.

In order:

1. **Find the run.** RUN is a manifest (``https://``, ``s3://``, a path; it ends in
   ``.toml``) whose ``run.store`` says where the store is, or a store URI itself. Store
   flags (``--store``, ``--endpoint-url``, ...) win over what the manifest says.
2. **Hold the workdir and load the identity.** ``WORKDIR/peer.key`` is loaded or made
   (``locoswarm.lock`` keeps a second process out of the workdir from here on).
3. **Verify the run.** The manifest must parse, trust someone to close windows, pin its
   data, equal the store's own (same digest) and, with ``--run-key``, be the run the person
   expects. Then the run, the peer id and where the key is (back it up) are printed.
4. **Check the machine** (``locoswarm.machine``): device, memory for the model, disk, and
   a timed download of one data shard against what a window moves. What is short is
   said plainly with the flag to change, and stops the join unless ``--skip-checks``.
5. **Train**, through the same ``serve_peer`` as ``locoswarm peer``: it downloads the
   tokenizer and shards (cached by hash), starts from the newest verified checkpoint,
   replays every decided window since, then trains. ``locoswarm.joinview`` draws it.

Ctrl-C (or SIGTERM) once: the peer stops after the window it is in, with its state saved;
twice: it stops at once (its state file is replaced atomically, so nothing breaks; the
window is replayed). Running the same command again resumes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.logging import RichHandler

from locoswarm.commands import (
    load_identity,
    open_publish_store,
    open_run_store,
    peer_node,
    serve_peer,
)
from locoswarm.joinview import JoinView, ObservedStore
from locoswarm.lock import hold_workdir
from locoswarm.machine import (
    Check,
    check_machine,
    check_port_free,
    measure_link,
    needs,
    newest_window_bytes,
    pick_device,
    refuse_if_short,
)
from locoswarm.reach import check_same_run, read_run_manifest, store_hint
from node.runinfo import MAX_MANIFEST_BYTES
from protocol import paths
from protocol.dataindex import NPY_HEADER_MAX, DataIndex, sha256_hex
from protocol.errors import IntegrityError, ManifestError, StoreError
from protocol.manifest import Manifest
from protocol.retry import RetryPolicy
from protocol.stores import SCHEMES, StoreSettings
from protocol.stores.base import Store

"""The manifest is a page of TOML; anything larger is not one (as ``node.follow`` reads it)."""


@dataclass(frozen=True)
class Target:
    """The run RUN names: its manifest when RUN is one, and how to reach its store."""

    manifest: Manifest | None
    """The manifest RUN points at; None when RUN is a store URI (the store's is used)."""
    settings: StoreSettings
    """How this machine reaches the run's store."""
    source: str
    """Where the manifest came from, for messages."""


def run_join(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)  # one line per event, however narrow: logs are read by grep too
    _log_to(console, args.verbose)
    view = JoinView(console)
    stopper = _Stopper(threading.Event(), view)
    previous = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _join(args, view, stopper)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _join(args: argparse.Namespace, view: JoinView, stopper: _Stopper) -> int:
    target = resolve(args)
    workdir = Path(args.workdir).expanduser() if args.workdir else Path.home() / ".locoswarm" / _run_id(target)
    args.workdir = str(workdir)
    with hold_workdir(workdir, "join"):
        check_port_free("127.0.0.1", args.metrics_port, "--metrics-port")
        key = Path(args.key) if args.key else workdir / "peer.key"
        identity, created = load_identity(key, "peer")  # a p2p store signs what it announces with it
        store = open_run_store(target.settings, identity)
        with store:
            manifest = read_run_manifest(store, target.settings)
            if target.manifest is not None:
                check_same_run(target.manifest, manifest, target.source, target.settings)
            verify(manifest, args.run_key)
            view.say(f"run       [bold]{manifest.run_key}[/] ({manifest.model.preset} model, {manifest.inner.steps} "
                     f"inner steps, {manifest.run.window_seconds:g} s windows), store {target.settings.to_uri()}")
            view.say(f"identity  peer [bold]{identity.peer_id}[/] (public key {identity.public_key.hex()})")
            view.say(f"          key {key.resolve()}" + (
                " [bold yellow]new: back it up[/] (it is this peer, and its standing with the run's validators)"
                if created else " (back it up: it is this peer)"))
            glance = look(store, manifest)
            device = pick_device(args.device)
            checks = machine_checks(manifest, glance, device, args.device != "auto", workdir, store, target.settings)
            for c in checks:
                view.say(f"{'[green]ok[/]  ' if c.ok else '[red]SHORT[/]'} {c.what:<18} {c.detail}"
                         + ("" if c.ok else f" [dim]({c.fix})[/]"))
            if not args.skip_checks:
                refuse_if_short([c for c in checks if c.what != "link"])
            _tell_about_gpus(view, device)
            return _train(args, manifest, store, target.settings, device, glance, view, stopper)


# ------------------------------------------------------------------------------ step 1: RUN

def _run_id(target: Target) -> str:
    """The run's id, for the default workdir: from the manifest given, else the store's."""
    if target.manifest is not None:
        return target.manifest.run.id
    with open_run_store(target.settings) as store:
        return read_run_manifest(store, target.settings).run.id


def resolve(args: argparse.Namespace) -> Target:
    """The run ``args.run`` names, with the store flags applied."""
    run = args.run
    base = run.partition("?")[0]
    scheme = base.partition("://")[0] if "://" in base else ""
    if base.endswith(".toml"):
        data = _fetch_manifest(run, args)
        try:
            manifest = Manifest.from_bytes(data)
        except ManifestError as exc:
            raise ManifestError(f"{run} is not a usable run manifest: {exc}") from exc
        uri = args.store or manifest.run.store
        if not uri:
            raise ManifestError(f"the manifest {run} does not say where the run's store is (run.store is empty); "
                                "pass --store URI (ask the run's operator)")
        return Target(manifest, _settings(args, uri), run)
    if scheme in SCHEMES:
        return Target(None, _settings(args, args.store or run), run)
    raise ManifestError(
        f"RUN {run!r} is neither a manifest (https://.../manifest.toml, s3://bucket/.../manifest.toml, a path "
        "ending in .toml) nor a store URI (s3://bucket/prefix, file:///dir, p2p://run)")


def _settings(args: argparse.Namespace, uri: str) -> StoreSettings:
    """Settings for ``uri`` with the store flags winning over its query parameters."""
    policy = RetryPolicy(request_timeout=args.request_timeout, attempts=args.retries,
                         object_seconds=max(RetryPolicy.object_seconds, args.request_timeout))
    try:
        return StoreSettings.parse(uri, endpoint_url=args.endpoint_url, region=args.region,
                                   addressing_style=args.addressing_style, profile=args.profile,
                                   initial_peers=tuple(args.initial_peers or ()), policy=policy)
    except ValueError as exc:
        raise StoreError(f"bad store settings: {exc}") from exc


def _fetch_manifest(run: str, args: argparse.Namespace) -> bytes:
    """The manifest's bytes from an https:// URL, an s3:// object or a local path."""
    base = run.partition("?")[0]
    if base.startswith(("https://", "http://")):
        try:
            with urllib.request.urlopen(run, timeout=args.request_timeout) as response:
                data = response.read(MAX_MANIFEST_BYTES + 1)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ManifestError(f"cannot fetch the manifest {run}: {getattr(exc, 'reason', exc)}; check the URL "
                                "the run's operator gave you") from exc
    elif base.startswith("s3://"):
        folder, _, name = base.rpartition("/")
        settings = _settings(args, folder + run[len(base):])
        with open_run_store(settings) as store:
            try:
                data = store.get(name, max_bytes=MAX_MANIFEST_BYTES + 1)
            except StoreError as exc:
                raise type(exc)(f"{exc}\n  fix: {store_hint(exc, settings)}") from exc
    else:
        path = Path(base.removeprefix("file://")).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"cannot read the manifest {path}: {exc.strerror}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{run} is over {MAX_MANIFEST_BYTES} bytes: not a run manifest")
    return data


# ------------------------------------------------------------------------------ step 2: verify

def verify(manifest: Manifest, run_key: str | None) -> None:
    """Refuse a run nobody can close, one without pinned data, or not the one expected."""
    manifest.check_authority()
    if not manifest.data.index_sha256:
        raise ManifestError("the run's manifest pins no data (data.index_sha256 is empty): it was not made by "
                            "`locoswarm init`; ask the run's operator")
    if run_key:
        want = run_key.lower()
        if want != manifest.run_key.lower() and not (len(want) >= 16 and manifest.digest.startswith(want)):
            raise ManifestError(f"this run is {manifest.run_key} (digest {manifest.digest}), not the --run-key "
                                f"{run_key} you expected: the manifest changed; ask the run's operator")


# ------------------------------------------------------------------------------ step 4: check

@dataclass(frozen=True)
class Glance:
    """What one look at the store says, before the peer starts."""

    index: DataIndex
    data_sizes: dict[str, int]
    """Bytes of the tokenizer and of each shard, by key."""
    newest_window: int
    """The newest window with objects (0 for a fresh run)."""
    window_bytes: int
    """What one peer moves in the newest window with payloads (0: none yet)."""


def look(store: Store, manifest: Manifest) -> Glance:
    """The run's data index (checked against the manifest) and its newest window."""
    from node.dataset import MAX_INDEX_BYTES

    raw = store.get(paths.DATA_INDEX, max_bytes=MAX_INDEX_BYTES)
    if sha256_hex(raw) != manifest.data.index_sha256:
        raise IntegrityError("the store's data index is not the one the manifest pins", key=paths.DATA_INDEX)
    index = DataIndex.from_json(raw)
    listed = {o.key: o.size for o in store.list("data/")}
    keys = [k for k, _, _ in index.shards] + ([paths.DATA_TOKENIZER] if index.tokenizer_sha256 else [])
    sizes = {k: listed.get(k, 0) for k in keys}
    windows = [w for o in store.list("windows/") if (w := paths.window_of_key(o.key)) is not None]
    return Glance(index, sizes, max(windows, default=0), newest_window_bytes(store))


def machine_checks(manifest: Manifest, glance: Glance, device: str, chosen: bool, workdir: Path, store: Store,
                   settings: StoreSettings) -> list[Check]:
    """Device, memory, disk, and the link to the store (one shard, timed)."""
    data_bytes = sum(glance.data_sizes.values())
    checks = check_machine(needs(manifest, glance.index.vocab_size, data_bytes, device), device, chosen, workdir)
    key, _, n_tokens = glance.index.shards[0]
    try:
        link = measure_link(store, key, n_tokens * 4 + 10 + NPY_HEADER_MAX, glance.window_bytes,
                            manifest.run.window_seconds)
    except StoreError as exc:
        raise type(exc)(f"{exc}\n  fix: {store_hint(exc, settings)}") from exc
    return [*checks, link.check()]


def _tell_about_gpus(view: JoinView, device: str) -> None:
    import torch

    n = torch.cuda.device_count() if device.startswith("cuda") else 0
    if n > 1:
        view.say(f"note      {n} GPUs are visible and join trains on {device} only; to train one peer on all "
                 f"of them: torchrun --nproc-per-node {n} -m locoswarm.cli peer --device cuda ... (docs/peer.md)")


# ------------------------------------------------------------------------------ step 5: train

class _Stopper:
    """SIGINT/SIGTERM: until the peer holds its data, stop at once (downloads resume from the
    cache); from then on, the first signal stops between windows and the second at once."""

    def __init__(self, stop: threading.Event, view: JoinView):
        self.stop = stop
        self.view = view
        self.running = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.running or self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        self.view.say("[bold]stopping[/] after the window in progress, with its state saved "
                      "(Ctrl-C again stops at once; the next start replays that window)")


def _train(args: argparse.Namespace, manifest: Manifest, store: Store, settings: StoreSettings, device: str,
           glance: Glance, view: JoinView, stopper: _Stopper) -> int:
    from node.progress import read_progress

    stop, watching = stopper.stop, threading.Event()
    node = peer_node(args, device, settings, stop=stop)
    view.expect_data(glance.data_sizes)

    def started(_peer: object) -> None:
        view.data_ready()
        stopper.running = True
        view.watch(node.progress_file, glance.newest_window, watching)

    try:
        peer = serve_peer(manifest, ObservedStore(store, view), node, settings,
                          own_store=open_publish_store(args, settings), started=started)
    except KeyboardInterrupt:
        watching.set()
        view.close()
        if not stopper.running:
            view.say(f"stopped while downloading; what arrived is kept in {node.cache_dir}: run the same command "
                     "to go on")
        else:
            view.say(f"stopped at once; the state saved in {node.state_file} is from {_saved(node.state_file)}: "
                     "run the same command to resume (it replays what it missed)")
        return 130
    watching.set()
    view.update(read_progress(node.progress_file), glance.newest_window)  # the last window's line
    view.close()
    if stop.is_set():
        view.say(f"stopped cleanly at window {peer.replica.window}, state saved in {node.state_file}: run the same "
                 "command to resume")
    else:
        view.say(f"done: at window {peer.replica.window} (--windows {args.windows}); run again with a larger "
                 "--windows, or 0 to go on for good")
    return 0


def _saved(state_file: Path) -> str:
    """Which window the saved state is at, read from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(state_file), "pt") as f:
            return f"window {int(f.metadata()['window'])}"
    except (OSError, KeyError, ValueError, SafetensorError):
        return "no window yet"


def _log_to(console: Console, verbose: bool) -> None:
    """Log lines print above the bars; below WARNING only with -v (the display says the rest)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, force=True, format="%(name)s: %(message)s",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)])
