"""Processes a benchmark starts (in network namespaces or not), each in its own session so
it can be killed whole, and the environment they run in."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "wanbench", "AWS_SECRET_ACCESS_KEY": "wanbench", "AWS_DEFAULT_REGION": "us-east-1"}
"""moto accepts any credentials; fixed dummies keep boto3 away from real ones."""


def bench_env() -> dict[str, str]:
    """This checkout first on the path, unbuffered logs, one torch thread, dummy S3 credentials."""
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **DUMMY_AWS)


def tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a log file ('' when there is none)."""
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


class Processes:
    """Every process a run started; ``stop`` kills what is still running (SIGKILL to its group)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=dict(env),
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self.procs.clear()
