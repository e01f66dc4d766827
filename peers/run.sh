#!/usr/bin/env bash
# Builds the peer benchmark in both of our modes and prints one ratio table per store
# and mode, with the physical floors measured in the same run:
#   bash peers/run.sh [postgres] [postgres-tls] [sqlite] [redis] [redis-tls]
#                     [redis-cluster] [redis-cluster-wait] [--sessions N]
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q
CARGO_TARGET_DIR=target/sync cargo build --release -q --features sync

# A Redis of our own with TLS only, on a free port, for `redis-tls`: a certificate
# authority and a server certificate made now with the openssl command.
tls_dir="$(mktemp -d)"
redis_tls_pid=""
cluster_dir=""
cluster_pids=()
cleanup() {
    if [ -n "$redis_tls_pid" ]; then kill "$redis_tls_pid" 2>/dev/null || true; fi
    for pid in "${cluster_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$tls_dir" ${cluster_dir:+"$cluster_dir"}
}
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=peers CA" -keyout "$tls_dir/ca.key" -out "$tls_dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$tls_dir/server.key" -out "$tls_dir/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$tls_dir/ext"
openssl x509 -req -in "$tls_dir/server.csr" -CA "$tls_dir/ca.crt" -CAkey "$tls_dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$tls_dir/ext" -out "$tls_dir/server.crt" 2>/dev/null
PEERS_REDIS_TLS_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis-server --port 0 --bind 127.0.0.1 --tls-port "$PEERS_REDIS_TLS_PORT" --save "" --appendonly no \
    --tls-cert-file "$tls_dir/server.crt" --tls-key-file "$tls_dir/server.key" \
    --tls-ca-cert-file "$tls_dir/ca.crt" --tls-auth-clients no >/dev/null 2>&1 &
redis_tls_pid=$!
export PEERS_REDIS_TLS_PORT PEERS_REDIS_TLS_CA="$tls_dir/ca.crt"
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PEERS_REDIS_TLS_PORT") 2>/dev/null && break; sleep 0.1; done

# A Redis Cluster of our own for `redis-cluster` and `redis-cluster-wait` (three
# primaries with a replica each, on free ports), only when one of them is asked for.
case " $* " in
*" redis-cluster"*)
    cluster_dir="$(mktemp -d)"
    # Six ports free with their cluster bus ports (port + 10000).
    ports="$(python3 - <<'PY'
import socket
ports = []
while len(ports) < 6:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p + 10000 > 65535 or p in ports:
        continue
    try:
        t = socket.socket(); t.bind(("127.0.0.1", p + 10000)); t.close()
    except OSError:
        continue
    ports.append(p)
print(",".join(map(str, ports)))
PY
)"
    seeds=()
    for port in ${ports//,/ }; do
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
            --cluster-enabled yes --cluster-config-file "$cluster_dir/nodes-$port.conf" \
            --dir "$cluster_dir" >/dev/null 2>&1 &
        cluster_pids+=("$!")
        seeds+=("127.0.0.1:$port")
    done
    for port in ${ports//,/ }; do
        for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    done
    timeout 60 redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
    for port in ${ports//,/ }; do
        for _ in $(seq 300); do
            redis-cli -p "$port" CLUSTER INFO | grep -q 'cluster_state:ok' && break
            sleep 0.1
        done
    done
    export PEERS_REDIS_CLUSTER_PORTS="$ports"
    ;;
esac

echo "# machine: $(nproc) cores, $(uname -sr); $(date -u +%Y-%m-%d)"
echo
echo "## floors (same run)"
sql="$(mktemp)"
echo "SELECT 1;" > "$sql"
if command -v pgbench >/dev/null && (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    # pgbench, as libpq, takes TLS where the server offers it: each line says which.
    floor() { PGSSLMODE="$1" pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 1 -T 5 -f "$sql" test 2>/dev/null | grep 'latency average'; }
    echo "- PostgreSQL, one prepared SELECT 1 round trip (pgbench -M prepared -c 1):" "$(floor disable)"
    echo "- PostgreSQL over TLS, the same (sslmode=require):" "$(floor require)"
    psql -h 127.0.0.1 -U postgres -d test -Xqc "CREATE TABLE IF NOT EXISTS peers_floor (k int PRIMARY KEY, v bytea)"
    printf '%s\n' '\set k random(1, 1000000)' \
        "INSERT INTO peers_floor VALUES (:k, '\\x00') ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v;" > "$sql"
    echo "- PostgreSQL, one committed upsert (pgbench -M prepared -c 1):" "$(floor disable)"
    echo "- PostgreSQL over TLS, the same (sslmode=require):" "$(floor require)"
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
    echo "- Redis over TLS, one GET round trip (redis-benchmark --tls -t get -c 1):" \
        "$(redis-benchmark -h 127.0.0.1 -p "$PEERS_REDIS_TLS_PORT" --tls --cacert "$PEERS_REDIS_TLS_CA" -t get -c 1 -n 50000 -q 2>/dev/null | tr '\r' '\n' | grep -a 'GET:' | tail -n 1)"
fi
rm -f "$sql"

./target/release/portable-sessions-peers "$@" 2>/dev/null
./target/sync/release/portable-sessions-peers "$@" 2>/dev/null
