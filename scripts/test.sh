#!/usr/bin/env bash
# Runs every test of portable-sessions in both modes: async (default) and blocking
# (`sync`). maybe-async's mode is global to a build, so the modes are two builds.
#
# The Redis store's tests run real redis-server processes: this script installs
# redis-server from Debian's packages when it is missing (as root) and starts one on
# 127.0.0.1:6379 when nothing answers there.
set -euo pipefail
cd "$(dirname "$0")/.."

have_redis_port() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing redis-server from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is missing: install it (Debian: apt-get install redis-server)" >&2
        exit 1
    fi
fi
if ! have_redis_port; then
    echo "starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do have_redis_port && break; sleep 0.1; done
fi

echo "=== async mode"
cargo test --features full
echo "=== blocking mode"
cargo test --features full,sync
