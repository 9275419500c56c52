#!/usr/bin/env bash
# Start a private Docker daemon for the integration tests (no iptables, no bridge: builds and runs use the host network).
# Usage: eval "$(bash tests/docker/dockerd.sh start DIR)"   -> exports DOCKER_HOST and SAMEBOX_DOCKERD_PID
#        bash tests/docker/dockerd.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:-/tmp/samebox-dockerd}
case "$cmd" in
start)
    mkdir -p "$dir/data" "$dir/exec"
    sock="$dir/docker.sock"
    if DOCKER_HOST="unix://$sock" /usr/bin/docker version >/dev/null 2>&1; then
        echo "export DOCKER_HOST=unix://$sock"
        exit 0
    fi
    setsid /usr/sbin/dockerd --storage-driver overlay2 --iptables=false --ip6tables=false --bridge=none \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
        -H "unix://$sock" >"$dir/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 1 60); do
        if DOCKER_HOST="unix://$sock" /usr/bin/docker version >/dev/null 2>&1; then
            echo "export DOCKER_HOST=unix://$sock"
            exit 0
        fi
        sleep 1
    done
    echo "dockerd did not start; log: $dir/dockerd.log" >&2
    tail -20 "$dir/dockerd.log" >&2
    exit 1
    ;;
stop)
    if [ -f "$dir/dockerd.pid" ]; then
        kill "$(cat "$dir/dockerd.pid")" 2>/dev/null || true
    fi
    ;;
*)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
