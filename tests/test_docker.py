"""The container image and docker/compose.yml, really built and run with podman.

``docker/podman-test-setup.sh`` prepares the machine and caches what it makes (a podman
config, a Debian base image from debootstrap, docker/wheels/). The image is then built with
no network at all (``--network none``, local wheels only), checked to run as its non-root user
with writable volumes, and docker/compose.yml runs a whole network (an S3 store, the init job,
two peers, a validator) for two windows: the peers must end bit-identical, and
``podman healthcheck run`` must call a live peer and validator healthy and the validator
unhealthy once it has been idle for longer than its ``--max-age``. The store is moto, built on
the locoswarm image, because no registry can be reached to pull MinIO. Everything the test
starts (containers, volumes, networks) is removed at the end; the images stay as build cache.

Needs root, podman, podman-compose, runc and debootstrap; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.network import REPO, small_manifest, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(1800)]
log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("LOCOSWARM_DOCKER_TEST_CACHE", "/var/tmp/locoswarm-docker-test"))
"""Where the podman config lives between runs (images stay in podman's own storage)."""
BASE_IMAGE = "localhost/locoswarm-base:bookworm"
IMAGE = "localhost/locoswarm:test-cpu"
S3_IMAGE = "localhost/locoswarm-s3:test"
WINDOWS = 2
HEALTH_MAX_AGE = small_manifest().run.window_seconds + 15
"""Seconds: short, so that the test can watch an idle validator turn unhealthy, yet longer
than a window, during which a peer waiting for the deadline rightly writes nothing."""
TOOLS = ("podman", "podman-compose", "runc", "debootstrap")


def _run(cmd: list[str], env: dict[str, str], *, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root; with ``check``, fail with its output when it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    """The environment for podman commands, once the machine is set up; skips where it cannot be."""
    if os.geteuid() != 0:
        pytest.skip("needs root: rootful podman (rootless needs subuid ranges this test does not set up)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install -y podman runc podman-compose debootstrap")
    env = dict(os.environ, CONTAINERS_CONF=str(CACHE / "containers.conf"), BASE_IMAGE=BASE_IMAGE, PYTHON=sys.executable)
    t0 = time.monotonic()
    setup = _run([str(REPO / "docker" / "podman-test-setup.sh")], env, timeout=2400, check=False)
    if setup.returncode != 0:
        pytest.skip(f"docker/podman-test-setup.sh failed (no apt mirror or package index?): {setup.stderr[-1500:]}")
    log.info("setup: %.0fs", time.monotonic() - t0)
    smoke = _run(["podman", "run", "--rm", BASE_IMAGE, "python3", "-c", "print('ok')"], env, timeout=120, check=False)
    if smoke.returncode != 0 or smoke.stdout.strip() != "ok":
        pytest.skip(f"podman cannot run a container on this machine: {smoke.stderr[-1500:]}")
    return env


@pytest.fixture(scope="module")
def images(podman_env: dict[str, str]) -> None:
    """The runtime image and the test's S3 server image, built with no network."""
    offline = ["--format", "docker", "--network", "none", "--build-arg", "PIP_NO_INDEX=1"]  # docker: keeps HEALTHCHECK
    t0 = time.monotonic()
    _run(["podman", "build", *offline, "-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
          "-t", IMAGE, "."], podman_env, timeout=1500)
    t1 = time.monotonic()
    _run(["podman", "build", *offline, "-f", "docker/s3-moto.Dockerfile", "--build-arg", f"LOCOSWARM_IMAGE={IMAGE}",
          "-t", S3_IMAGE, "."], podman_env, timeout=600)
    log.info("build: image %.0fs, S3 server image %.0fs", t1 - t0, time.monotonic() - t1)


def test_image_runs_as_its_non_root_user_with_writable_volumes(images, podman_env):
    env = podman_env
    inspect = _run(["podman", "image", "inspect", IMAGE, "--format", "{{json .HealthCheck}}"], env, timeout=60)
    assert "locoswarm health --workdir /data" in inspect.stdout
    assert "usage: locoswarm" in _run(["podman", "run", "--rm", IMAGE, "--help"], env, timeout=120).stdout
    volume = f"locoswarm-test-{uuid.uuid4().hex[:8]}"
    try:
        probe = _run(["podman", "run", "--rm", "-v", f"{volume}:/data", "--entrypoint", "sh", IMAGE, "-c",
                      "id -u && touch /data/peer.key /cache/probe && stat -c %u /data/peer.key"], env, timeout=120)
        assert probe.stdout.split() == ["10001", "10001"]
    finally:
        _run(["podman", "volume", "rm", "-f", volume], env, timeout=60, check=False)
    no_moto = _run(["podman", "run", "--rm", "--entrypoint", "python", IMAGE, "-c",
                    "import importlib.util; print(importlib.util.find_spec('moto') is None)"], env, timeout=120)
    assert no_moto.stdout.strip() == "True", "the test-only S3 server leaked into the runtime image"


def test_compose_network_trains_to_equal_digests_and_reports_health(images, podman_env, tmp_path):
    project = f"locoswarm-test-{uuid.uuid4().hex[:8]}"
    manifest = tmp_path / "run.toml"
    manifest.write_text(small_manifest().to_toml())
    port = free_port()
    env = dict(podman_env, LOCOSWARM_IMAGE=IMAGE, S3_IMAGE=S3_IMAGE, S3_COMMAND="-H 0.0.0.0 -p 9000",
               RUN_MANIFEST=str(manifest), WINDOWS=str(WINDOWS), DASHBOARD_PORT=str(port),
               HEALTH_MAX_AGE=f"{HEALTH_MAX_AGE:.0f}")
    compose = ["podman-compose", "-p", project, "-f", "docker/compose.yml"]

    def container(service: str) -> str:
        return f"{project}_{service}_1"

    def volume(name: str) -> Path:
        path = _run(["podman", "volume", "inspect", "--format", "{{.Mountpoint}}", f"{project}_{name}"], env, timeout=60)
        return Path(path.stdout.strip())

    def healthcheck(service: str) -> subprocess.CompletedProcess:
        return _run(["podman", "healthcheck", "run", container(service)], env, timeout=120, check=False)

    t0 = time.monotonic()
    try:
        _run([*compose, "up", "-d"], env, timeout=600)
        for service in ("store", "init", "peer-1", "peer-2", "validator"):
            ports = _run(["podman", "inspect", "--format", "{{json .NetworkSettings.Ports}}", container(service)],
                         env, timeout=60)
            bindings = [b for spec in json.loads(ports.stdout or "{}").values() for b in spec or []]
            assert all(b["HostIp"] == "127.0.0.1" for b in bindings), f"{service} publishes beyond loopback: {bindings}"

        # A peer that writes progress is past its restarts (the run exists) and still running.
        wait_for((volume("peer-1") / "progress.json").exists, 600, "peer-1 to write progress.json")
        check = healthcheck("peer-1")
        assert check.returncode == 0, f"a running peer is not healthy: {check.stdout} {check.stderr}"

        wait_for((volume("peer-2") / "progress.json").exists, 600, "peer-2 to write progress.json")
        for peer in ("peer-1", "peer-2"):
            waited = _run(["podman", "wait", container(peer)], env, timeout=600)
            assert waited.stdout.strip() == "0", f"{peer} exited {waited.stdout.strip()}"
        finals = [json.loads((volume(peer) / "progress.json").read_text()) for peer in ("peer-1", "peer-2")]
        assert [(f["phase"], f["window"]) for f in finals] == [("finished", WINDOWS)] * 2
        assert finals[0]["digest"] == finals[1]["digest"], "the peers' replicas differ"
        assert all((volume(peer) / "peer.key").is_file() for peer in ("peer-1", "peer-2"))
        log.info("network: %d windows in %.0fs", WINDOWS, time.monotonic() - t0)

        def dashboard_window() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as resp:
                    return json.load(resp)["window"] == WINDOWS - 1
            except OSError:  # not serving yet
                return False

        wait_for(dashboard_window, 300, f"the validator's dashboard to show window {WINDOWS - 1}", interval=2)
        check = healthcheck("validator")
        assert check.returncode == 0, f"a validator that just scored is not healthy: {check.stdout} {check.stderr}"
        # Nothing more to score: the validator stops writing and must turn unhealthy.
        state = volume("validator") / "state.safetensors"
        time.sleep(max(0.0, state.stat().st_mtime + HEALTH_MAX_AGE + 2 - time.time()))
        check = healthcheck("validator")
        assert check.returncode == 1 and "unhealthy" in check.stdout, f"{check.stdout} {check.stderr}"
        inspect = _run(["podman", "inspect", "--format", "{{json .State.Health}}", container("validator")],
                       env, timeout=60)
        assert "stuck or gone" in json.loads(inspect.stdout)["Log"][-1]["Output"]
    except BaseException:
        for service in ("store", "init", "peer-1", "peer-2", "validator"):
            tail = "10" if service == "store" else "40"  # the store logs every request
            logs = _run(["podman", "logs", "--tail", tail, container(service)], env, timeout=60, check=False)
            log.error("%s:\n%s%s", service, logs.stdout, logs.stderr)
        raise
    finally:
        _teardown(project, env)


def _teardown(project: str, env: dict[str, str]) -> None:
    """Remove the project's containers with their anonymous volumes, its volumes and network.

    Done with podman itself: podman-compose 1.0's ``down -v`` leaves the anonymous volumes
    (the images declare /data and /cache) and the network behind.
    """
    label = f"label=io.podman.compose.project={project}"
    ids = _run(["podman", "ps", "-aq", "--filter", label], env, timeout=60, check=False).stdout.split()
    if ids:
        _run(["podman", "rm", "-f", "-v", "-t", "2", *ids], env, timeout=180, check=False)
    volumes = _run(["podman", "volume", "ls", "-q", "--filter", label], env, timeout=60, check=False).stdout.split()
    if volumes:
        _run(["podman", "volume", "rm", "-f", *volumes], env, timeout=120, check=False)
    _run(["podman", "network", "rm", "-f", f"{project}_default"], env, timeout=60, check=False)
