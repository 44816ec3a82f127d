"""The ``locoswarm`` command: one entry point, one subcommand per thing a person does.

Heavy libraries (torch, transformers) are imported only by the subcommand that needs them,
after every argument, the store URI included, has been checked: a typo costs milliseconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

from protocol.errors import IdentityError, LocoError, StoreError
from protocol.manifest import COMM_CHOICES
from protocol.retry import RetryPolicy
from protocol.stores import StoreSettings

STORE_HELP = (
    "the run's store: file:///dir, s3://bucket/prefix or p2p://run; an s3/p2p URI may carry "
    "?endpoint=URL&region=R&addressing=path|virtual|auto (s3) or ?peers=MULTIADDR,... (p2p)"
)


def _version() -> str:
    try:
        return importlib.metadata.version("locoswarm")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _common() -> argparse.ArgumentParser:
    """Flags every subcommand takes, before or after its name."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return p


def _add_store_args(p: argparse.ArgumentParser, *, required: bool = True, manifest: bool = True) -> None:
    g = p.add_argument_group("store (how this machine reaches the run; nothing here is secret)")
    g.add_argument("--store", required=required,
                   help=STORE_HELP if required else "the run's store, instead of the manifest's run.store")
    if manifest:
        g.add_argument("--manifest", help="run manifest TOML; must equal the store's (default: the store's own)")
    g.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (R2, MinIO, a local server)")
    g.add_argument("--region", default=None, help="S3 region (default: boto3's choice)")
    g.add_argument("--addressing-style", choices=("auto", "path", "virtual"), default=None,
                   help="S3 bucket addressing (default auto)")
    g.add_argument("--profile", default=None, help="named AWS profile to take S3 credentials from")
    g.add_argument("--initial-peers", nargs="*", default=None, help="p2p: multiaddrs to bootstrap the DHT from")
    g.add_argument("--request-timeout", type=float, default=RetryPolicy.request_timeout,
                   help=f"seconds one store request may wait (default {RetryPolicy.request_timeout:g})")
    g.add_argument("--retries", type=int, default=RetryPolicy.attempts,
                   help=f"tries of a store request after a timeout or outage (default {RetryPolicy.attempts})")


def _add_peer_args(p: argparse.ArgumentParser, *, device_default: str) -> None:
    """How this machine trains as a peer (``peer`` and ``join``)."""
    g = p.add_argument_group("this peer")
    g.add_argument("--key", default=None, help="ed25519 key file of this peer (default WORKDIR/peer.key)")
    g.add_argument("--device", default=device_default,
                   help=f"where to train: cpu, cuda or cuda:N{', or auto (a GPU if there is one)' if device_default == 'auto' else ''} "
                        f"(default {device_default})")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    g.add_argument("--windows", type=int, default=0, help="stop after this window (default 0: run forever)")
    g.add_argument("--eval-every", type=int, default=5,
                   help="held-out evaluation every N windows (default 5; 0 = never): it costs as much as a few "
                        "inner steps and is not needed to train")
    g.add_argument("--micro-batch", type=int, default=0,
                   help="sequences per forward/backward (default 0: the memory plan's choice; the whole batch on CPU)")
    g.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics on 127.0.0.1:PORT (0 = any)")
    g.add_argument("--publish-store", default=None,
                   help="s3://bucket/prefix only this peer writes to; others read it through presigned URLs")
    g.add_argument("--publish-endpoint-url", default=None, help="endpoint of --publish-store (default --endpoint-url)")
    g.add_argument("--comm", choices=COMM_CHOICES, default=None,
                   help="under torchrun: fp32 all-reduce or LoCo 4-bit between ranks (default: the manifest's)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="locoswarm", parents=[common],
        description="Pre-train one language model together over ordinary internet links (SparseLoCo).",
    )
    parser.add_argument("--version", action="version", version=f"locoswarm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = command("up", "run a whole local network of peers on this machine and watch it learn")
    p.add_argument("--peers", type=int, default=3, help="peer processes to start (default 3)")
    p.add_argument("--windows", type=int, default=12, help="windows to run (default 12)")
    p.add_argument("--validators", type=int, default=0, help="validator processes to add (default 0)")
    p.add_argument("--workdir", default="runs/local", help="where the run's store and peers live (default runs/local)")
    p.add_argument("--store", default=None, help="store URI (default: file://WORKDIR/store); " + STORE_HELP)
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// store")
    p.add_argument("--manifest", default=None, help="a run manifest TOML instead of the embedded defaults")
    p.add_argument("--preset", default=None, help="model preset: tiny, 25m, 150m or 1b (default: the manifest's)")
    p.add_argument("--steps", type=int, default=None, help="inner steps per window, H (default: the manifest's)")
    p.add_argument("--window-seconds", type=float, default=None, help="window deadline in seconds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per peer (default 1)")
    p.add_argument("--keep", action="store_true", help="reuse an existing WORKDIR instead of starting fresh")
    p.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds (default 3600)")
    p.add_argument("--attack", default=None, metavar="FAULTS",
                   help="also start a red-team process with fresh keys and write access to the store, doing "
                        "these faults every window (comma-separated, or 'all'; see docs/security.md and "
                        "'python -m locoswarm.attack --help'); its log and report.json go to WORKDIR/attacker")

    p = command("init", "create a run in a store: manifest, tokenizer, data")
    _add_store_args(p)
    p.add_argument("--name", help="the run's name, run.id (default: the manifest's)")
    p.add_argument("--genesis", help="when window 0 closes at the latest minus run.window_seconds: unix seconds, "
                   "an ISO 8601 time, or +MINUTES from now (default: now)")
    p.add_argument("--peer-key", action="append", default=[], metavar="KEY",
                   help="a peer the run vouches for (hex public key, or a key file); repeat for each. Without "
                        "validators these peers are the only ones whose payloads count, and they decide windows")
    p.add_argument("--validator-key", action="append", default=[], metavar="KEY",
                   help="a validator the run trusts (hex public key, or a key file); repeat for each. "
                        "Validators score peers and decide windows")
    p.add_argument("--out-manifest", help="also write the final manifest (genesis time set) here")
    p.add_argument("--create-bucket", action="store_true", help="s3: create the bucket if it does not exist")
    p.add_argument("--serve", action="store_true",
                   help="keep serving the store's objects until stopped (a p2p run's seed)")
    p.add_argument("--addrs-file", help="with --serve: write the multiaddrs peers bootstrap from here (JSON)")

    p = command("join", "join a run from its manifest URL or store URI: verify it, check this machine, "
                        "download, catch up and train (Ctrl-C stops after the window; run again to resume)")
    p.add_argument("run", metavar="RUN",
                   help="the run's manifest (https://.../manifest.toml, s3://bucket/.../manifest.toml or a path) "
                        "or its store URI (s3://bucket/prefix?endpoint=..., file:///dir, p2p://run?peers=...)")
    p.add_argument("--workdir", default=None,
                   help="this peer's directory: key, resumable state, data cache (default ~/.locoswarm/RUN_ID)")
    p.add_argument("--run-key", default=None, metavar="ID@HASH",
                   help="refuse the run unless it is this one (the run key or digest its operator published)")
    p.add_argument("--skip-checks", action="store_true",
                   help="start even when this machine looks short of memory, disk or a GPU for the run's model")
    _add_peer_args(p, device_default="auto")
    _add_store_args(p, required=False, manifest=False)

    p = command("peer", "run one peer of a run")
    _add_store_args(p)
    p.add_argument("--workdir", required=True, help="this peer's directory: key, resumable state, data cache")
    _add_peer_args(p, device_default="cpu")

    p = command("keygen", "make an ed25519 identity for a peer or a validator and print its public key")
    p.add_argument("--out", required=True, action="append",
                   help="where to write the private key (mode 0600; back it up); repeat for several identities")
    p.add_argument("--exist-ok", action="store_true",
                   help="keep a key file that exists (print its public key) instead of refusing")

    p = command("inspect", "show what a payload file holds, or why it is rejected (exit 2)")
    p.add_argument("file", help="a payload object (.lsp)")

    p = command("status", "print the run's state: window, loss, peers, scores, sync")
    _add_store_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--windows", type=int, default=8, metavar="N",
                   help="list every peer seen in the newest N decided windows (default 8)")
    p.add_argument("--eval", action="store_true",
                   help="also replay the run to its newest state and report its held-out loss (builds the model)")
    p.add_argument("--checkpoint-only", action="store_true",
                   help="with --eval: evaluate the newest verified checkpoint as it is, without replaying the "
                        "windows after it")

    p = command("export", "export the run's newest model (newest checkpoint + the decided windows after it) "
                          "as a Hugging Face model")
    _add_store_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint-only", action="store_true",
                   help="export the newest verified checkpoint as it is, without replaying the windows after it")
    p.add_argument("--sample", default=None, metavar="PROMPT",
                   help="also write OUT/sample.txt: text the model generates after PROMPT")

    p = command("validator", "run a validator: check, score and publish scores")
    _add_store_args(p)
    p.add_argument("--workdir", required=True, help="this validator's directory: key, ratings, state, cache")
    p.add_argument("--key", default=None, help="ed25519 key file (default WORKDIR/validator.key)")
    p.add_argument("--windows", type=int, default=0, help="stop after scoring this window (default 0: forever)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--dashboard-port", type=int, default=0, help="dashboard port (default 0: any free port)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="dashboard address (default 127.0.0.1; expose it only behind a proxy you control)")

    p = command("health", "exit 0 if the peer or validator using WORKDIR wrote progress recently, "
                          "else 1 with the reason (a container healthcheck)")
    p.add_argument("--workdir", required=True, help="the --workdir of the peer or validator to check")
    p.add_argument("--max-age", type=float, default=900.0,
                   help="seconds since its last write before it counts as stuck (default 900; "
                        "use a few window lengths)")

    p = command("bench", "benchmarks that print one JSON object per line (locoswarm bench NAME --help)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="NAME and its arguments: codec, convergence, wan")
    return parser


def store_settings(args: argparse.Namespace) -> StoreSettings:
    """The store settings the flags describe; checked before anything heavy is imported."""
    policy = RetryPolicy(request_timeout=args.request_timeout, attempts=args.retries,
                         object_seconds=max(RetryPolicy.object_seconds, args.request_timeout))
    return StoreSettings.parse(
        args.store, endpoint_url=args.endpoint_url, region=args.region, addressing_style=args.addressing_style,
        profile=args.profile, initial_peers=tuple(args.initial_peers or ()),
        create_bucket=bool(getattr(args, "create_bucket", False)), policy=policy,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)  # -v may come before or after the subcommand
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except LocoError as exc:
        print(f"locoswarm: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("locoswarm: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        if args.store:
            StoreSettings.parse(args.store)
        from locoswarm.up import run_up

        return run_up(args)
    if args.command == "inspect":
        from locoswarm.inspect import run

        return run(args.file)
    if args.command == "keygen":
        return _keygen(args.out, exist_ok=args.exist_ok)
    if args.command == "health":
        from locoswarm.health import run as health

        return health(args.workdir, args.max_age)
    if args.command == "join":
        from locoswarm.join import run_join

        return run_join(args)
    if args.command == "bench":
        from bench import main as bench_main

        return bench_main(args.bench_args)
    try:
        settings = store_settings(args)
        if getattr(args, "publish_store", None):
            StoreSettings.parse(args.publish_store)
    except ValueError as exc:
        raise StoreError(f"bad store settings: {exc}") from exc
    from locoswarm.commands import run_command

    return run_command(args, settings)


def _keygen(outs: list[str], *, exist_ok: bool) -> int:
    """Create key files (never overwriting one) and print what a run operator needs."""
    from pathlib import Path

    from protocol.identity import Identity

    for out in outs:
        path = Path(out)
        if path.exists() and not exist_ok:
            raise IdentityError(f"{path} exists; refusing to overwrite an identity (move it away, or --exist-ok)")
        identity = Identity.load(path) if path.exists() else Identity.generate()
        identity.save(path)
        print(f"public key  {identity.public_key.hex()}")
        print(f"peer id     {identity.peer_id}")
        print(f"private key {path.resolve()} (back it up: whoever holds it is this peer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
