"""Benchmarks that print figures, one JSON object per line (``locoswarm bench NAME``).

- ``codec.py``        payload bits per parameter, error and speed vs the reference format
- ``convergence.py``  SparseLoCo vs tuned DiLoCo (+ DDP, LoCo, training alone): sweep, seeds, summary
- ``convergence_train.py`` the bench's training loops, one method variant and seed at a time
- ``gpu_convergence.sh`` the prepared device command for ``convergence --scale gpu``
- ``wan.py``          real peers in network namespaces behind tc-limited links (needs root):
                      ``wan_peers.py`` (the product's peers and their accounting),
                      ``wan_dense.py`` (the dense DiLoCo baseline), ``wan_projection.py``
- ``window.py``       one window of the real peer: seconds per phase, overhead, memory
- ``netns.py``        the namespaces, veth pairs and tbf links ``wan.py`` runs in
- ``join.py``         ``locoswarm join``'s memory and disk estimates vs a real joiner's peak
- ``reference.py``    the reference SparseLoCo wire format the codec bench compares against
- ``procs.py``        processes a benchmark starts, killed whole when it ends

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``; ``main``
builds the command line from them. Nothing here imports the CLI.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "codec": "payload size, error and speed vs the reference format",
    "convergence": "SparseLoCo vs tuned DiLoCo (+ DDP, LoCo, single) at equal tokens, >= 2 seeds",
    "wan": "peers in network namespaces behind tc-limited links (root)",
    "window": "one window of the real peer: seconds per phase, overhead over training, memory",
    "join": "join's memory and disk estimates vs the peak of a real joining peer",
}


def main(argv: list[str]) -> int:
    """``locoswarm bench NAME [ARGS]``: parse NAME's arguments and run it."""
    parser = argparse.ArgumentParser(prog="locoswarm bench", description="benchmarks; one JSON object per line")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    name = argv[0] if argv and argv[0] in BENCHES else None
    for bench, help in BENCHES.items():
        p = sub.add_parser(bench, help=help, description=help)
        if bench == name:  # import only the one that runs: each pulls in torch
            importlib.import_module(f"bench.{bench}").add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(f"bench.{args.bench}").run(args)
