#!/usr/bin/env bash
# Make the local base image the integration tests build on: Debian bookworm minbase + python3 (the `system` provider).
# No registry can be pulled in CI, so the base is made with debootstrap and imported. Idempotent: exits at once if present.
# Usage: bash tests/docker/base-image.sh [NAME]
set -euo pipefail
name=${1:-samebox-test/bookworm-python:latest}
docker=${DOCKER:-/usr/bin/docker}
if "$docker" image inspect "$name" >/dev/null 2>&1; then
    echo "base image $name already present"
    exit 0
fi
root=$(mktemp -d /tmp/samebox-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 || { tail -30 "$root.log" >&2; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$docker" import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' - "$name" >/dev/null
echo "made base image $name"
