"""The ``locoswarm`` command: one entry point, one subcommand per thing a person does."""

from __future__ import annotations

import argparse
import logging
import sys

from protocol.errors import LocoError


def _add_store_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, help="store URI: file:///dir, s3://bucket/prefix or p2p://run")
    p.add_argument("--manifest", help="run manifest TOML (default: the one in the store)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (R2, MinIO, a local server)")
    p.add_argument("--initial-peers", nargs="*", default=None, help="p2p: multiaddrs to bootstrap from")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locoswarm",
        description="Pre-train one language model together over ordinary internet links (SparseLoCo).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run a whole local network of peers on this machine and watch it learn")
    p.add_argument("--peers", type=int, default=3, help="peer processes to start (default 3)")
    p.add_argument("--windows", type=int, default=12, help="windows to run (default 12)")
    p.add_argument("--validators", type=int, default=0, help="validator processes to add (default 0)")
    p.add_argument("--workdir", default="runs/local", help="where the run's store and peers live")
    p.add_argument("--store", default=None, help="store URI (default: file://WORKDIR/store)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// store")
    p.add_argument("--manifest", default=None, help="a run manifest TOML instead of the embedded defaults")
    p.add_argument("--preset", default=None, help="model preset (tiny, 25m, 150m, 1b)")
    p.add_argument("--steps", type=int, default=None, help="inner steps per window (H)")
    p.add_argument("--window-seconds", type=float, default=None, help="window deadline in seconds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per peer (default 1)")
    p.add_argument("--keep", action="store_true", help="reuse an existing WORKDIR instead of starting fresh")
    p.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")

    p = sub.add_parser("init", help="create a run in a store: manifest, tokenizer, data, genesis weights")
    _add_store_args(p)
    p.add_argument("--out-manifest", help="also write the final manifest (genesis time set) here")
    p.add_argument("--create-bucket", action="store_true", help="s3: create the bucket if it does not exist")
    p.add_argument("--serve", action="store_true",
                   help="keep serving the store's objects until stopped (a p2p run's seed)")
    p.add_argument("--addrs-file", help="with --serve: write the multiaddrs peers bootstrap from here (JSON)")

    p = sub.add_parser("peer", help="run one peer of a run")
    _add_store_args(p)
    p.add_argument("--workdir", required=True, help="this peer's directory (key, state, cache)")
    p.add_argument("--key", default=None, help="ed25519 key file (default WORKDIR/peer.key)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--min-peers", type=int, default=1, help="window 0 waits for this many peers")
    p.add_argument("--windows", type=int, default=0, help="stop after this window (0 = run forever)")
    p.add_argument("--eval-every", type=int, default=1, help="held-out evaluation every N windows (0 = never)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics on 127.0.0.1:PORT (0 = any)")
    p.add_argument("--publish-store", default=None,
                   help="s3://bucket/prefix only this peer writes to; others read it through presigned URLs")
    p.add_argument("--publish-endpoint-url", default=None, help="endpoint of --publish-store (default --endpoint-url)")
    p.add_argument("--comm", choices=("none", "loco"), default=None,
                   help="under torchrun: fp32 all-reduce or LoCo 4-bit between ranks (default: the manifest's)")

    p = sub.add_parser("inspect", help="show what a payload file holds, or why it is rejected (exit 2)")
    p.add_argument("file")

    p = sub.add_parser("status", help="print the run's state: window, loss, peers, scores, sync")
    _add_store_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export the run's latest checkpoint as a Hugging Face model")
    _add_store_args(p)
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("validator", help="run a validator: check, score and publish scores")
    _add_store_args(p)
    p.add_argument("--workdir", required=True)
    p.add_argument("--key", default=None)
    p.add_argument("--windows", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--dashboard-port", type=int, default=0, help="dashboard port on 127.0.0.1 (0 = any free)")
    p.add_argument("--dashboard-host", default="127.0.0.1")

    p = sub.add_parser("health", help="exit 0 if the peer or validator using WORKDIR wrote progress recently, "
                                      "else 1 with the reason (a container healthcheck)")
    p.add_argument("--workdir", required=True, help="the --workdir of the peer or validator to check")
    p.add_argument("--max-age", type=float, default=900.0,
                   help="seconds since its last write before it counts as stuck (default 900; "
                        "use a few window lengths)")

    p = sub.add_parser("bench", help="benchmarks that print one JSON object per line")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser("codec", help="payload size, error and speed vs the reference format")
    b.add_argument("--json", action="store_true")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default="cpu")
    b.add_argument("--quick", action="store_true", help="a smaller model, for a fast look")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    b = bench.add_parser("convergence", help="SparseLoCo vs DiLoCo vs DDP (+LoCo) vs single at equal tokens")
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="finishes in under 10 minutes on 2 CPU cores")
    b.add_argument("--sweep", action="store_true", help="sweep H and top-k density; EF variants")
    b.add_argument("--replicas", type=int, default=4)
    b.add_argument("--out", default="convergence.png")
    b.add_argument("--device", default="cpu")
    b = bench.add_parser("wan", help="peers in network namespaces behind tc-limited links (root)")
    b.add_argument("--json", action="store_true", help="print JSON lines only (no log output)")
    b.add_argument("--windows", type=int, default=3, help="windows per method (default 3)")
    b.add_argument("--compute-seconds", type=float, default=None,
                   help="pad each window's compute to this many seconds (default: the real inner steps)")
    b.add_argument("--inner-steps", type=int, default=20, help="H per window (default 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        from node.up import run_up

        return run_up(args)
    if args.command == "inspect":
        from locoswarm.inspect import run

        return run(args.file)
    if args.command == "health":
        from locoswarm.health import run

        return run(args.workdir, args.max_age)
    if args.command == "bench":
        if args.bench == "codec":
            from bench.codec import run
        elif args.bench == "convergence":
            from bench.convergence import run
        else:
            from bench.wan import run
        return run(args)
    from locoswarm.commands import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
