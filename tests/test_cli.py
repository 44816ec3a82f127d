"""The command line, in-process: argument checks that must answer before anything heavy loads."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from locoswarm.cli import build_parser, main
from tests.network import REPO, create_run


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("locoswarm ")


@pytest.mark.parametrize("argv", [
    ["-v", "status", "--store", "file:///nonexistent-locoswarm-run"],
    ["status", "-v", "--store", "file:///nonexistent-locoswarm-run"],
    ["status", "--store", "file:///nonexistent-locoswarm-run", "--verbose"],
])
def test_verbose_anywhere_on_the_line(argv, capsys):
    assert build_parser().parse_args(argv).verbose is True
    assert main(argv) == 2
    assert "no run in" in capsys.readouterr().err


def _every_flag(parser: argparse.ArgumentParser, command: str = "locoswarm"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_flag(sub, name)
        else:
            yield command, action


def test_every_flag_of_every_command_says_what_it_does():
    flags = list(_every_flag(build_parser()))
    assert len(flags) > 60 and {c for c, _ in flags} >= {"peer", "validator", "status", "export", "inspect"}
    missing = [(c, a.option_strings or a.dest) for c, a in flags if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing


@pytest.mark.parametrize("argv", [
    ["status", "--store", "s3://bucket/run?endpiont=http://x"],
    ["peer", "--workdir", "/nonexistent-locoswarm-w", "--store", "s3://bucket/run?endpiont=http://x"],
    ["peer", "--workdir", "/nonexistent-locoswarm-w", "--store", "file:///tmp/x",
     "--publish-store", "s3://bucket/run?endpiont=http://x"],
    ["export", "--out", "/nonexistent-locoswarm-o", "--store", "s3://bucket/run?endpiont=http://x"],
])
def test_a_mistyped_store_uri_is_refused_before_torch_is_imported(argv):
    code = ("import sys, json, time; t = time.perf_counter(); from locoswarm.cli import main; "
            "rc = main(json.loads(sys.argv[1])); "
            "print(rc, 'torch' in sys.modules, round(time.perf_counter() - t, 2))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=False)
    rc, torch_loaded, _ = res.stdout.split()
    assert (rc, torch_loaded) == ("2", "False"), res.stderr
    assert "unknown or repeated parameter 'endpiont'" in res.stderr


def test_a_peer_with_a_different_manifest_refuses_to_join(tmp_path, capsys):
    run = create_run(tmp_path / "run")
    other = tmp_path / "other.toml"
    other.write_text(run.manifest.replace(inner__steps=run.manifest.inner.steps + 1).to_toml())
    rc = main(["peer", "--store", run.uri, "--manifest", str(other), "--workdir", str(tmp_path / "w"), "--windows", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "ManifestError" in err and "differs" in err
