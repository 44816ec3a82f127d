"""``locoswarm join`` and what it relies on: the workdir lock, errors that name the flag to
change (against a real moto S3 server on 127.0.0.1), the store location in the manifest, the
machine check, and a join that catches up, trains, stops on Ctrl-C and resumes (slow)."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from locoswarm import machine
from locoswarm.cli import main
from locoswarm.commands import _init_manifest
from locoswarm.join import verify
from locoswarm.lock import hold_workdir
from locoswarm.reach import store_hint
from protocol.errors import (
    ManifestError,
    NotEnoughResources,
    PortInUse,
    StoreUnavailable,
    WorkdirInUse,
)
from protocol.manifest import Manifest
from protocol.stores import StoreSettings
from tests.conftest import free_port
from tests.network import (
    REPO,
    PeerProcess,
    create_run,
    peer_identity,
    peer_keys,
    small_manifest,
    wait_for,
)

CLI = [sys.executable, "-m", "locoswarm.cli"]


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


# ----------------------------------------------------------------------------- one process per workdir

def test_a_held_workdir_is_refused_with_who_holds_it(tmp_path):
    with hold_workdir(tmp_path / "w", "peer"), pytest.raises(WorkdirInUse) as info, \
            hold_workdir(tmp_path / "w", "validator"):
        pass
    assert f"a peer (pid {os.getpid()}" in str(info.value) and "--workdir" in str(info.value)
    with hold_workdir(tmp_path / "w", "validator"):  # released when the holder left
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import time; from locoswarm.lock import hold_workdir\n"
                                f"with hold_workdir({str(tmp_path / 'w')!r}, 'join'):\n"
                                "    print('held', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirInUse, match=rf"a join \(pid {holder.pid}"), hold_workdir(tmp_path / "w", "peer"):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=10)
    with hold_workdir(tmp_path / "w", "peer"):
        pass


def test_a_second_peer_in_one_workdir_exits_with_a_clear_message(tmp_path):
    with hold_workdir(tmp_path / "w", "peer"):
        res = _cli("peer", "--store", f"file://{tmp_path / 'store'}", "--workdir", str(tmp_path / "w"))
    assert res.returncode == 2
    assert "WorkdirInUse" in res.stderr and f"pid {os.getpid()}" in res.stderr and "--workdir" in res.stderr


# ----------------------------------------------------------------------------- ports

def test_a_busy_port_names_the_flag_to_change():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} .*--metrics-port 0"):
            machine.check_port_free("127.0.0.1", port, "--metrics-port")
    machine.check_port_free("127.0.0.1", port, "--metrics-port")  # free again
    machine.check_port_free("127.0.0.1", 0, "--metrics-port")  # 0: any port, nothing to check


def test_a_validator_on_a_busy_dashboard_port_exits_naming_the_flag(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        rc = main(["validator", "--store", f"file://{tmp_path / 'store'}", "--workdir", str(tmp_path / "v"),
                   "--dashboard-port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and "PortInUse" in err and "--dashboard-port" in err


# ----------------------------------------------------------------------------- S3 errors that say what to change

def _status(uri: str, *flags: str) -> int:
    return main(["status", "--store", uri, "--request-timeout", "2", "--retries", "1", *flags])


def test_a_missing_bucket_is_named_with_the_flags_to_check(moto_server, capsys):
    assert _status("s3://no-such-bucket-here/run", "--endpoint-url", moto_server.endpoint_url) == 2
    err = capsys.readouterr().err
    assert "BucketNotFound" in err and "'no-such-bucket-here'" in err
    assert "--endpoint-url" in err and "--store" in err and "init --create-bucket" in err
    assert "create_bucket=True" not in err


def test_nothing_at_the_endpoint_names_endpoint_url(aws_test_credentials, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"
    assert _status("s3://bucket/run", "--endpoint-url", endpoint) == 2
    err = capsys.readouterr().err
    assert "StoreUnavailable" in err and f"nothing answered at --endpoint-url {endpoint}" in err


def test_an_s3_uri_without_endpoint_goes_to_aws_and_the_hint_says_so():
    hint = store_hint(StoreUnavailable("get: connection failed: Could not connect to "
                                       "https://swarm.s3.amazonaws.com/run/manifest.toml"),
                      StoreSettings.parse("s3://swarm/run"))
    assert "no --endpoint-url was given, so this went to AWS S3" in hint and "?endpoint=" in hint


def test_no_credentials_names_the_variables_and_profile(moto_server, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert _status("s3://bucket/run", "--endpoint-url", moto_server.endpoint_url) == 2
    err = capsys.readouterr().err
    assert "AccessDenied" in err and "AWS_ACCESS_KEY_ID" in err and "--profile" in err


def test_a_manifest_that_differs_from_the_stores_names_what_to_change(tmp_path, capsys):
    run = create_run(tmp_path / "run")
    other = tmp_path / "other.toml"
    other.write_text(run.manifest.replace(inner__lr=run.manifest.inner.lr * 2).to_toml())
    assert main(["status", "--store", run.uri, "--manifest", str(other)]) == 2
    err = capsys.readouterr().err
    assert "ManifestError" in err and run.manifest.run_key in err and "refusing to mix" in err
    assert "--manifest" in err and "--store" in err


# ----------------------------------------------------------------------------- the store in the manifest

def test_manifests_without_a_store_keep_their_identity():
    # The digest of the defaults before run.store existed: existing runs must not change identity.
    assert Manifest().digest == "cc9b644e0c38897e1179d2030921c7ca1d0e0262bb7ccbefe2ab463a49826755"
    with_store = Manifest().replace(run__store="s3://bucket/run?endpoint=https://s3.example.org")
    assert with_store.digest != Manifest().digest
    assert Manifest.from_bytes(with_store.to_toml().encode()) == with_store
    for later in ({"inner__overlap": True}, {"codec__ef_lookahead": 1.0}, {"run__deadline_factor": 3.0}, {"run__min_window_seconds": 2.0}):
        assert Manifest().replace(**later).digest != Manifest().digest, later


@pytest.mark.parametrize("uri", ["s3://AKIA:secret@bucket/run", "s3://bucket/run?endpoint=https://AKIA:secret@host",
                                 "s3://bucket/run?endpoint=https://host/?X-Amz-Signature=abc", "ftp://bucket"])
def test_a_store_in_the_manifest_never_carries_a_secret(uri):
    with pytest.raises(ManifestError, match="run.store"):
        Manifest().replace(run__store=uri)


def test_a_store_uri_round_trips_with_a_readable_endpoint():
    settings = StoreSettings.parse("s3://bucket/run", endpoint_url="http://127.0.0.1:9000", region="auto",
                                   addressing_style="path")
    assert settings.to_uri() == "s3://bucket/run?endpoint=http://127.0.0.1:9000&region=auto&addressing=path"
    assert StoreSettings.parse(settings.to_uri()) == settings


def test_init_records_where_joiners_reach_the_store_unless_the_manifest_says(tmp_path):
    args = argparse.Namespace(manifest=None, name=None, genesis=None, peer_key=[], validator_key=[])
    settings = StoreSettings.parse("s3://bucket/run", endpoint_url="https://acct.r2.cloudflarestorage.com",
                                   region="auto", profile="mine", create_bucket=True)
    recorded = _init_manifest(args, settings).run.store
    assert recorded == "s3://bucket/run?endpoint=https://acct.r2.cloudflarestorage.com&region=auto"
    assert "mine" not in recorded  # a profile is this machine's, not the run's
    own = tmp_path / "run.toml"
    own.write_text(Manifest().replace(run__store="s3://public/run").to_toml())
    args.manifest = str(own)
    assert _init_manifest(args, settings).run.store == "s3://public/run"


# ----------------------------------------------------------------------------- resolve, verify, machine

def _join_args(run: str, **flags: object) -> argparse.Namespace:
    defaults = {"run": run, "store": None, "endpoint_url": None, "region": None, "addressing_style": None,
                "profile": None, "initial_peers": None, "request_timeout": 5.0, "retries": 1}
    return argparse.Namespace(**{**defaults, **flags})


def test_run_must_be_a_manifest_or_a_store_uri():
    from locoswarm.join import resolve

    with pytest.raises(ManifestError, match="neither a manifest"):
        resolve(_join_args("example.org/run1"))
    assert resolve(_join_args("s3://bucket/run?endpoint=http://127.0.0.1:9", region="eu")).settings == \
        StoreSettings.parse("s3://bucket/run", endpoint_url="http://127.0.0.1:9", region="eu",
                            policy=resolve(_join_args("s3://b/r")).settings.policy)


def test_a_manifest_that_does_not_say_where_its_store_is_asks_for_store(tmp_path):
    from locoswarm.join import resolve

    path = tmp_path / "run.toml"
    path.write_text(Manifest().to_toml())
    with pytest.raises(ManifestError, match="run.store is empty.*--store"):
        resolve(_join_args(str(path)))
    assert resolve(_join_args(str(path), store="file:///x")).settings.uri == "file:///x"


def test_an_unexpected_run_key_is_refused():
    manifest = small_manifest(data__index_sha256="0" * 64)
    verify(manifest, manifest.run_key)
    verify(manifest, manifest.digest[:20])
    with pytest.raises(ManifestError, match="not the --run-key"):
        verify(manifest, "test@0123456789abcdef")
    with pytest.raises(ManifestError, match="pins no data"):
        verify(small_manifest(), None)


def test_the_machine_check_says_what_is_short_and_how_to_fix_it(tmp_path):
    short = machine.Needs(params=2_000_000_000, device_bytes=1 << 50, host_bytes=1 << 30, disk_bytes=1 << 55,
                          gpu_advised=True)
    checks = machine.check_machine(short, "cpu", False, tmp_path)
    failed = {c.what: c for c in checks if not c.ok}
    assert set(failed) == {"GPU", "memory", "disk"}
    assert "--device cpu" in failed["GPU"].fix and "--workdir" in failed["disk"].fix
    with pytest.raises(NotEnoughResources) as info:
        machine.refuse_if_short(checks)
    assert "memory: needs about" in str(info.value) and "--skip-checks" in str(info.value)
    enough = machine.Needs(params=1000, device_bytes=1 << 20, host_bytes=1 << 20, disk_bytes=1 << 20,
                           gpu_advised=False)
    assert all(c.ok for c in machine.check_machine(enough, "cpu", False, tmp_path))


def test_the_estimate_grows_with_the_model():
    manifest = small_manifest()
    small = machine.needs(manifest, 512, 10**6, "cpu")
    big = machine.needs(manifest.replace(model__preset="150m"), 32768, 10**6, "cpu")
    assert 500_000 < small.params < big.params and not small.gpu_advised and big.gpu_advised
    assert big.device_bytes > machine.STATE_COPIES * 4 * big.params  # plus the activations
    assert big.disk_bytes > 8 * 4 * big.params  # the state, twice while it is replaced


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_a_gpu_where_there_is_none_names_device_cpu():
    assert machine.pick_device("auto") == "cpu"
    with pytest.raises(NotEnoughResources, match="--device cpu"):
        machine.pick_device("cuda")


# ----------------------------------------------------------------------------- join end to end, short of memory

def _huge_model(tmp_path: Path) -> Path:
    """An HF config far beyond any machine's memory (~70B parameters), for a run that never trains."""
    config = tmp_path / "huge.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
                                  "num_attention_heads": 64, "num_key_value_heads": 8,
                                  "intermediate_size": 28672, "tie_word_embeddings": False}))
    return config


class _Served:
    """A directory over HTTP on 127.0.0.1, like a run's manifest on its operator's web site."""

    def __init__(self, root: Path):
        handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_join_reaches_an_s3_run_from_its_manifest_url_alone_and_refuses_a_model_too_big(
        tmp_path, moto_server, s3_store_factory):
    bucket = s3_store_factory().bucket  # creates the bucket
    uri = f"s3://{bucket}/run?endpoint={moto_server.endpoint_url}&region=us-east-1"
    manifest = small_manifest(model__preset="hf", model__hf_config=str(_huge_model(tmp_path)), run__store=uri)
    run = create_run(tmp_path / "op", manifest, uri)
    site = _Served(run.root)
    try:
        res = _cli("join", f"{site.url}/manifest.toml", "--workdir", str(tmp_path / "w"), "--device", "cpu",
                   "--request-timeout", "5")
    finally:
        site.close()
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert run.manifest.run_key in res.stdout  # verified against the store's own manifest
    assert "new: back it up" in res.stdout and str(tmp_path / "w" / "peer.key") in res.stdout
    assert (tmp_path / "w" / "peer.key").exists()
    assert "from the store" in res.stdout  # the link was measured on the S3 server
    assert "NotEnoughResources" in res.stderr and "memory: needs about" in res.stderr
    assert "smaller model.preset" in res.stderr and "--skip-checks" in res.stderr
    assert not (tmp_path / "w" / "state.safetensors").exists()


# ----------------------------------------------------------------------------- join end to end, training

@pytest.mark.slow
def test_join_catches_up_from_a_checkpoint_trains_stops_on_ctrl_c_and_resumes(tmp_path):
    """Two listed peers run; a third listed key joins late with one command: it starts from the
    verified checkpoint, replays, trains in step with them; Ctrl-C stops it cleanly between
    windows; the same command resumes it and it ends on the others' digest."""
    windows = 9
    # Adaptive deadlines close a window at twice what recent windows took, 5 s at the least:
    # a joiner on a loaded machine (its first windows load data and warm up) can miss that and
    # replay the window instead of training it. 15 s keeps this test about the join.
    manifest = small_manifest(run__peers=peer_keys("p0", "p1", "joiner"), run__store=f"file://{tmp_path / 'store'}",
                              run__min_window_seconds=15.0)
    run = create_run(tmp_path, manifest, f"file://{tmp_path / 'store'}")
    peer_identity("joiner").save(tmp_path / "joiner.key")
    peers = [PeerProcess(tmp_path, name, run.manifest_path, run.uri, windows=windows) for name in ("p0", "p1")]
    workdir = tmp_path / "joiner"
    join = [*CLI, "join", str(run.manifest_path), "--workdir", str(workdir), "--key", str(tmp_path / "joiner.key"),
            "--threads", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COLUMNS="200")
    try:
        wait_for(lambda: (peers[0].progress or {}).get("window", 0) >= 3, 300, "the peers to pass window 3")
        first = subprocess.Popen(join, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        wait_for(lambda: any(line.startswith("window") for line in lines), 300, "the joiner to apply a window")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 0, "".join(lines)
        reader.join(timeout=10)
        out = "".join(lines)
        assert "start     from the verified checkpoint of window" in out, out
        assert "stopping after the window in progress" in out and "stopped cleanly at window" in out, out
        stopped_at = json.loads((workdir / "progress.json").read_text())["window"]

        second = subprocess.run([*join, "--windows", str(windows)], check=False, cwd=REPO, capture_output=True, text=True,
                                timeout=600, env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"resumed   from the saved state at window {stopped_at}" in second.stdout, second.stdout
        assert "data ready" in second.stdout and "from the cache" in second.stdout
        for p in peers:
            assert p.wait(timeout=300) == 0, p.log()
        digests = {json.loads((workdir / "progress.json").read_text())["digest"]} | {p.progress["digest"] for p in peers}
        assert len(digests) == 1, (digests, second.stdout)
        history = [h for h in (json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines())
                   if h.get("train_loss") is not None]
        assert history and history[-1]["window"] == windows - 1 and history[-1]["included"] == 3
    finally:
        PeerProcess.kill_all()



@pytest.mark.slow
def test_a_validator_logs_the_id_its_dashboard_shows(tmp_path):
    key = peer_identity("validator")
    key.save(tmp_path / "v" / "validator.key")
    run = create_run(tmp_path, small_manifest(validators__keys=(key.public_key.hex(),)))
    log = tmp_path / "validator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, "validator", "--store", run.uri, "--workdir", str(tmp_path / "v"),
                                 "--threads", "1"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = wait_for(lambda: (tmp_path / "v" / "dashboard.url").exists()
                       and (tmp_path / "v" / "dashboard.url").read_text(), 180, "the dashboard")
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/state", timeout=10) as response:
            shown = json.loads(response.read())["validator"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    logged = re.search(r"validator id ([0-9a-f]{24}) \(public key ([0-9a-f]{64})\)", log.read_text())
    assert logged, log.read_text()[-3000:]
    assert logged.group(1) == shown == key.peer_id and logged.group(2) == key.public_key.hex()
