"""The docs tell the truth: generated parts are current, and every command block marked
runnable runs.

A block is runnable when its fence says so: ```` ```bash runnable ```` (default suite,
seconds) or ```` ```bash runnable slow ```` (``pytest -m slow``). Each runs on its own with
``bash -euo pipefail`` in an empty temporary directory that is also ``$HOME``, with a
``locoswarm`` on ``PATH`` that runs this checkout, bounded in time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from locoswarm import docgen
from tests.network import REPO

DOCS = sorted([*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "docker" / "README.md"])
BLOCK = re.compile(r"^```(?:bash|sh) runnable( slow)?[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TIMEOUT = {False: 120, True: 900}
"""Seconds a block may take: fast blocks, slow blocks."""


def _blocks() -> list:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            slow = bool(m.group(1))
            found.append(pytest.param(m.group(2), slow, id=f"{path.relative_to(REPO)}:{line}",
                                      marks=[pytest.mark.slow] if slow else []))
    return found


@pytest.mark.parametrize("rel", sorted(docgen.GENERATED))
def test_generated_parts_of_the_docs_are_current(rel):
    text = (REPO / rel).read_text()
    assert docgen.refresh(text, docgen.GENERATED[rel]) == text, f"{rel} is stale: run python -m locoswarm.docgen"


def test_the_peer_and_operator_guides_have_runnable_blocks():
    ids = [p.id for p in _blocks()]
    assert any(i.startswith("docs/peer.md") for i in ids) and any(i.startswith("docs/run-operator.md") for i in ids)


@pytest.mark.parametrize(("script", "slow"), _blocks())
def test_a_runnable_block_runs(script, slow, tmp_path):
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "locoswarm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m locoswarm.cli "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(tmp_path), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", COLUMNS="160")
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False, cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT[slow])
    assert res.returncode == 0, f"exit {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"


def test_blocks_are_found_by_the_fence_and_nothing_else():
    text = "```bash\necho plain\n```\n```bash runnable\necho one\n```\n```sh runnable slow\necho two\n```\n"
    assert [(m.group(2), bool(m.group(1))) for m in BLOCK.finditer(text)] == [("echo one\n", False),
                                                                             ("echo two\n", True)]


def test_a_stale_generated_block_is_rewritten():
    stale = "before\n<!-- generated: manifest (x) -->\nold text\n<!-- end generated: manifest -->\nafter\n"
    fresh = docgen.refresh(stale, {"manifest": docgen.manifest_reference})
    assert fresh != stale and "old text" not in fresh and fresh.startswith("before\n") and fresh.endswith("after\n")
    assert "- **`store`** (string" in fresh
    assert docgen.refresh(fresh, {"manifest": docgen.manifest_reference}) == fresh
