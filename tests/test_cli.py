"""The command line, in-process: argument checks that must answer before anything heavy loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from locoswarm.cli import main
from tests.network import REPO, create_run


def test_version_and_verbose_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("locoswarm ")
    assert main(["status", "--store", "file:///nonexistent-locoswarm-run", "-v"]) == 2
    assert "no run in" in capsys.readouterr().err


def test_a_mistyped_store_uri_is_refused_before_torch_is_imported():
    code = ("import sys, time; t = time.perf_counter(); from locoswarm.cli import main; "
            "rc = main(['status', '--store', 's3://bucket/run?endpiont=http://x']); "
            "print(rc, 'torch' in sys.modules, round(time.perf_counter() - t, 2))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
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
