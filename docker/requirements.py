"""Print what installing the project needs, one requirement a line, from pyproject.toml alone.

``python3 docker/requirements.py [PYPROJECT] [EXTRA ...]``: the build system's requirements,
the dependencies, then each named optional group (commas work too: ``p2p,s3server``).
The Dockerfile installs these in a layer before it copies the source, so a code change does
not reinstall torch; ``pip download -r`` of the same list fills docker/wheels/ for offline builds.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The build requirements, dependencies and the ``extras`` groups of a parsed pyproject.toml."""
    optional = pyproject["project"].get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return [
        *pyproject["build-system"]["requires"],
        *pyproject["project"]["dependencies"],
        *(req for extra in extras for req in optional[extra]),
    ]


if __name__ == "__main__":
    path, *names = sys.argv[1:] or ["pyproject.toml"]
    with open(path, "rb") as f:
        print("\n".join(requirements(tomllib.load(f), [e for n in names for e in n.split(",") if e])))
