#!/usr/bin/env bash
# Builds the peer benchmark in both of our modes and prints one ratio table per store
# and mode, with the physical floors measured in the same run:
#   bash peers/run.sh [postgres] [sqlite] [redis] [--sessions N]
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q
CARGO_TARGET_DIR=target/sync cargo build --release -q --features sync

echo "# machine: $(nproc) cores, $(uname -sr); $(date -u +%Y-%m-%d)"
echo
echo "## floors (same run)"
sql="$(mktemp)"
echo "SELECT 1;" > "$sql"
if command -v pgbench >/dev/null && (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    echo "- PostgreSQL, one prepared SELECT 1 round trip (pgbench -M prepared -c 1):" \
        "$(pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 1 -T 5 -f "$sql" test 2>/dev/null | grep 'latency average')"
    psql -h 127.0.0.1 -U postgres -d test -Xqc "CREATE TABLE IF NOT EXISTS peers_floor (k int PRIMARY KEY, v bytea)"
    printf '%s\n' '\set k random(1, 1000000)' \
        "INSERT INTO peers_floor VALUES (:k, '\\x00') ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v;" > "$sql"
    echo "- PostgreSQL, one committed upsert (pgbench -M prepared -c 1):" \
        "$(pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 1 -T 5 -f "$sql" test 2>/dev/null | grep 'latency average')"
    psql -h 127.0.0.1 -U postgres -d test -Xqc "DROP TABLE peers_floor"
fi
if command -v sqlite3 >/dev/null; then
    # Where the benchmark's databases go, in the same journal mode and durability.
    dir="$(mktemp -d)"
    echo "PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB);" |
        sqlite3 "$dir/floor.db" >/dev/null
    {
        echo "PRAGMA synchronous = FULL;"
        for _ in $(seq 1 2000); do
            echo "INSERT INTO t VALUES ($RANDOM, randomblob(128)) ON CONFLICT (k) DO UPDATE SET v = excluded.v;"
        done
    } > "$dir/upserts.sql"
    started=$(date +%s%N)
    sqlite3 "$dir/floor.db" < "$dir/upserts.sql"
    ended=$(date +%s%N)
    echo "- SQLite, one committed upsert (sqlite3, WAL, synchronous = FULL, 2,000 in a row):" \
        "$(( (ended - started) / 2000 / 1000 )) µs"
    rm -rf "$dir"
fi
if command -v redis-benchmark >/dev/null; then
    echo "- Redis, one GET round trip (redis-benchmark -t get -c 1):" \
        "$(redis-benchmark -h 127.0.0.1 -t get -c 1 -n 50000 -q 2>/dev/null | tr '\r' '\n' | grep -a 'GET:' | tail -n 1)"
fi
rm -f "$sql"

./target/release/portable-sessions-peers "$@" 2>/dev/null
./target/sync/release/portable-sessions-peers "$@" 2>/dev/null
