"""The parts of the docs that code writes, so they cannot drift from it.

- ``docs/run-operator.md``, block ``manifest``: every manifest field, its type, default and
  docstring, read from ``protocol/manifest.py`` (the docstring under each field is the one
  source of truth);
- ``docs/peer.md``, block ``requirements``: what a peer of each model preset needs, from
  the same estimate ``locoswarm join`` checks a machine against (``locoswarm.machine``).

A generated block sits between ``<!-- generated: NAME ... -->`` and ``<!-- end generated:
NAME -->``. ``python -m locoswarm.docgen`` rewrites the blocks; ``--check`` exits 1 when one
is stale (``tests/test_docs.py`` does the same).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

from protocol import manifest as manifest_module
from protocol.manifest import Manifest

REPO = Path(__file__).resolve().parent.parent
_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "tuple[str, ...]": "list of strings"}


def field_docs() -> dict[str, dict[str, str]]:
    """``{class name: {field: docstring}}`` for every dataclass in ``protocol/manifest.py``: the
    string literal right after each annotated field."""
    tree = ast.parse(inspect.getsource(manifest_module))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def manifest_reference() -> str:
    """Markdown: one section per manifest table, one entry per field."""
    docs = field_docs()
    out = []
    for section in dataclasses.fields(Manifest):
        cls = section.default_factory  # type: ignore[misc]
        out.append(f"### `[{section.name}]`\n")
        for f in dataclasses.fields(cls):
            doc = docs.get(cls.__name__, {}).get(f.name)
            if doc is None:
                raise ValueError(f"{cls.__name__}.{f.name} has no docstring in protocol/manifest.py")
            text = " ".join(_markdown(doc).split())
            out.append(f"- **`{f.name}`** ({_TYPES.get(str(f.type), str(f.type))}, default "
                       f"`{_toml(f.default)}`): {text}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def requirements_table() -> str:
    """Markdown: per preset, parameters and the memory and disk ``join`` asks for."""
    from locoswarm.machine import GiB, needs
    from node.model import PRESET_REFERENCE_VOCAB, PRESETS

    data = Manifest().data
    rows = ["| preset | parameters | GPU | GPU memory | host memory with a GPU | host memory without | disk |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for preset in PRESETS:
        manifest = Manifest().replace(model__preset=preset)
        gpu = needs(manifest, PRESET_REFERENCE_VOCAB[preset], 0, "cuda")
        cpu = needs(manifest, PRESET_REFERENCE_VOCAB[preset], 0, "cpu")
        rows.append(f"| {preset} | {gpu.params / 1e6:,.0f}M | {'needed' if gpu.gpu_advised else 'optional'} | "
                    f"{gpu.device_bytes / GiB:.1f} GiB | {gpu.host_bytes / GiB:.1f} GiB | "
                    f"{(cpu.device_bytes + cpu.host_bytes) / GiB:.1f} GiB | {gpu.disk_bytes / GiB:.1f} GiB |")
    return (f"At the preset's reference vocabulary (tiny: {PRESET_REFERENCE_VOCAB['tiny']}, the others: "
            f"{PRESET_REFERENCE_VOCAB['1b']}), `data.batch_size = {data.batch_size}` and `data.seq_len = "
            f"{data.seq_len}`; add the run's token data to host memory and disk (`join` does).\n\n"
            + "\n".join(rows) + "\n")


GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "docs/run-operator.md": {"manifest": manifest_reference},
    "docs/peer.md": {"requirements": requirements_table},
}


def refresh(text: str, blocks: dict[str, Callable[[], str]]) -> str:
    """``text`` with every named generated block rewritten; ``ValueError`` if one is missing."""
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- generated: {name}\b[^>]*-->\n).*?(<!-- end generated: {name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"no generated block {name!r} (<!-- generated: {name} --> ... "
                             f"<!-- end generated: {name} -->)")
        body = make()
        text = pattern.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(2), text)  # noqa: B023
    return text


def _markdown(doc: str) -> str:
    return doc.replace("``", "`")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[]" if not value else "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return repr(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locoswarm.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated block is stale")
    args = parser.parse_args(argv)
    stale = []
    for rel, blocks in GENERATED.items():
        path = REPO / rel
        text = path.read_text()
        new = refresh(text, blocks)
        if new != text:
            stale.append(rel)
            if not args.check:
                path.write_text(new)
    if stale:
        print(("stale: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
