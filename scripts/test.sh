#!/usr/bin/env bash
# Runs every test of portable-sessions in both modes: async (default) and blocking
# (`sync`). maybe-async's mode is global to a build, so the modes are two builds.
#
# The Redis and PostgreSQL stores' tests talk to real servers. Where one is missing
# this script installs it from Debian's packages (as root), and where nothing
# answers it starts one:
# - Redis on 127.0.0.1:6379, without persistence;
# - PostgreSQL on 127.0.0.1:5432: a cluster of its own in /tmp (user `postgres`,
#   trust authentication for local connections, database `test`), made with the
#   installed server's initdb, so that no system configuration is changed.
# Tests that restart or freeze a server start their own, on Unix sockets, and so do
# the tests through PgBouncer (installed from Debian's packages where missing); the
# Redis Cluster and Sentinel tests start theirs on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

have_port() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
    if is_root && command -v apt-get >/dev/null 2>&1; then
        echo "installing $* from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "$@" >/dev/null
    else
        echo "missing: $* (Debian: apt-get install $*)" >&2
        exit 1
    fi
}

# redis-server, and redis-cli, with which the Cluster tests create their clusters.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server redis-tools
fi
if ! have_port 6379; then
    echo "starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do have_port 6379 && break; sleep 0.1; done
fi

pg_bindir() { find /usr/lib/postgresql -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(pg_bindir)" ] || ! command -v psql >/dev/null 2>&1 || ! command -v pgrep >/dev/null 2>&1; then
    apt_install postgresql postgresql-client procps
fi
# PgBouncer: the PostgreSQL tests start their own, in transaction and statement mode.
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    apt_install pgbouncer
fi
# PostgreSQL refuses to run as root: as root, its programs run as `postgres`.
as_postgres() {
    if is_root; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi
}
if ! have_port 5432; then
    bin="$(pg_bindir)"
    data=/tmp/portable-sessions-postgres
    echo "starting PostgreSQL ($bin) on 127.0.0.1:5432, cluster in $data"
    if [ ! -f "$data/PG_VERSION" ]; then
        mkdir -p "$data"
        if is_root; then chown postgres: "$data"; fi
        chmod 700 "$data"
        as_postgres "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    as_postgres "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p 5432 -k $data" start >/dev/null
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -XAtc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -Xqc "CREATE DATABASE test"
fi

echo "=== async mode"
cargo test --features full
echo "=== blocking mode"
cargo test --features full,sync
