#!/usr/bin/env bash
# Make this machine ready to build and run docker/ with podman and no registry, offline.
# Used by tests/test_docker.py; safe to rerun (each step is skipped when already done):
#   1. a containers.conf for podman (used through CONTAINERS_CONF, the system's is untouched)
#      that fits a machine without systemd: runc, cgroupfs, file events, and nofile/nproc
#      limits the host allows (podman's default nofile of 1048576 is refused in some VMs);
#   2. the base image $BASE_IMAGE: Debian bookworm (python3.11) from debootstrap and the apt
#      mirror this machine already uses, since no registry can be reached to pull python:3.11;
#   3. docker/wheels/: every wheel the image and the test's S3 server need, fetched by
#      `pip download` from pip's configured indexes (here: the local mirror), so the build
#      runs with PIP_NO_INDEX=1; fetched again only when pyproject.toml's list changes.
# Needs root with podman, runc and debootstrap:
#   apt-get install -y podman runc podman-compose debootstrap
# Environment: CONTAINERS_CONF (where to write the config), BASE_IMAGE, PYTHON (a python with
# pip, default python3), DEBIAN_MIRROR (default: the first Debian archive in apt's sources).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${CONTAINERS_CONF:?set CONTAINERS_CONF to the containers.conf path to write}"
: "${BASE_IMAGE:=localhost/locoswarm-base:bookworm}"
: "${PYTHON:=python3}"
log() { echo "podman-test-setup: $*" >&2; }

# 1. containers.conf
if [ ! -s "$CONTAINERS_CONF" ]; then
    mkdir -p "$(dirname "$CONTAINERS_CONF")"
    cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    log "wrote $CONTAINERS_CONF"
fi
export CONTAINERS_CONF

# 2. the base image
if podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE is cached"
else
    mirror="${DEBIAN_MIRROR:-$(
        { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
          grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              | sed -E 's/^deb +(\[[^]]*\] +)?([^ ]+).*/\2/'; } \
        | grep -E '/debian/?$' | head -n 1 || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    root="$(mktemp -d /var/tmp/locoswarm-rootfs.XXXXXX)"
    trap 'rm -rf "$root"' EXIT
    log "debootstrap bookworm from $mirror (a few minutes)"
    timeout 1200 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | timeout 600 podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
    log "imported $BASE_IMAGE"
fi

# 3. wheels for an offline build; docker/wheels/.requirements records the list they satisfy
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "${root:-}"' EXIT
"$PYTHON" docker/requirements.py pyproject.toml s3server >"$tmp/requirements.txt"
if cmp -s "$tmp/requirements.txt" docker/wheels/.requirements; then
    log "docker/wheels/ is complete"
    exit 0
fi
if ! timeout 1200 "$PYTHON" -m pip download --quiet --dest docker/wheels --find-links docker/wheels \
        --only-binary :all: -r "$tmp/requirements.txt" >"$tmp/pip.log" 2>&1; then
    grep -v 'is ignored: it is neither' "$tmp/pip.log" | tail -n 20 >&2
    log "pip download failed"
    exit 1
fi
cp "$tmp/requirements.txt" docker/wheels/.requirements
log "docker/wheels/ holds $(find docker/wheels -name '*.whl' | wc -l) wheels"
