#!/usr/bin/env bash
# The end-to-end benchmark: the same web application (src/bin/e2e.rs) served bare, under
# our session layer and under the peer's, loaded by wrk with random cookies over 2,000
# sessions, and one table of requests per second with the ratios:
#   bash peers/e2e.sh [memory] [redis] [sqlite] [postgres] [actix]
#                     [--rounds N] [--duration SECONDS] [--connections N] [--unpinned]
# By default the server runs on core 0 with one worker thread and wrk on core 1, so that
# the load generator does not take the server's CPU (the store servers float); with
# --unpinned both float and the server has a worker per core.
# axum: tower-sessions 0.14's layer with its memory store, tower-sessions-redis-store
# (fred), tower-sessions-sqlx-store (SQLite, PostgreSQL); actix: actix-web with
# actix-session's Redis store. No store named: all of them. Redis on 127.0.0.1:6379 and
# PostgreSQL on 127.0.0.1:5432 (`PEERS_REDIS`, `PEERS_POSTGRES` to point elsewhere).
# For Redis and PostgreSQL it also times a write on one connection against its floor:
# the bare server's request plus the two round trips (redis-benchmark, pgbench).
# Needs wrk (Debian's `wrk` package).
set -euo pipefail
cd "$(dirname "$0")"

rounds=3
duration=5
connections=32
pinned=1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --unpinned) pinned=0; shift ;;
    memory | redis | sqlite | postgres | actix) targets+=("$1"); shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(memory redis sqlite postgres actix)
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
server_cpu=()
load_cpu=()
if [ "$pinned" = 1 ]; then
    server_cpu=(taskset -c 0)
    load_cpu=(taskset -c 1)
    export E2E_WORKERS=1
fi

cargo build --release -q --bin e2e
bin="$PWD/target/release/e2e"
work="$(mktemp -d)"
servers=()
cleanup() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    # What the servers stored: their Redis keys, PostgreSQL schemas and SQLite files.
    redis-cli -u "${PEERS_REDIS:-redis://127.0.0.1:6379}" --scan --pattern 'e2e-*' 2>/dev/null |
        xargs -r -n 1000 redis-cli -u "${PEERS_REDIS:-redis://127.0.0.1:6379}" DEL >/dev/null 2>&1 || true
    psql "${PEERS_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}" -X -q -t -c \
        "SELECT 'DROP SCHEMA ' || nspname || ' CASCADE;' FROM pg_namespace WHERE nspname LIKE 'e2e\\_%'" 2>/dev/null |
        psql "${PEERS_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}" -X -q >/dev/null 2>&1 || true
    rm -rf "$work" /tmp/peers-e2e-*
}
trap cleanup EXIT

# Each request picks one of the cookies at random; the requests are formatted once.
cat >"$work/cookies.lua" <<'LUA'
local requests = {}
function init(args)
    local path = wrk.path
    for line in io.lines(args[1]) do
        requests[#requests + 1] = wrk.format("GET", path, { Cookie = line })
    end
    math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end
function request()
    return requests[math.random(#requests)]
end
LUA

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# serve NAME FRAMEWORK LAYER STORE: starts a server and waits until its sessions exist.
declare -A ports
serve() {
    local name="$1" port
    port="$(free_port)"
    ports[$name]=$port
    "${server_cpu[@]}" "$bin" "$2" "$3" "$4" "$port" "$work/$name.cookies" >"$work/$name.out" 2>"$work/$name.err" &
    servers+=($!)
    for _ in $(seq 600); do
        grep -q ready "$work/$name.out" && return 0
        kill -0 "${servers[-1]}" 2>/dev/null || { cat "$work/$name.err" >&2; exit 1; }
        sleep 0.1
    done
    echo "$name: not ready after 60 s" >&2
    cat "$work/$name.err" >&2
    exit 1
}

stop_all() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
    servers=()
}

# load NAME ROUTE: one wrk run on that server; prints requests per second, and fails
# on any error.
load() {
    local out
    out="$("${load_cpu[@]}" wrk -t1 -c"$connections" -d"${duration}s" -s "$work/cookies.lua" \
        "http://127.0.0.1:${ports[$1]}/$2" -- "$work/$1.cookies")"
    if grep -Eq 'Non-2xx|Socket errors' <<<"$out"; then
        echo "wrk on $1 /$2 saw errors:" >&2
        echo "$out" >&2
        cat "$work/$1.err" >&2
        exit 1
    fi
    awk '/^Requests\/sec/ { print $2 }' <<<"$out"
}

results="$work/results"
: >"$results"
# group FRAMEWORK NAME:LAYER:STORE...: starts the servers side by side and loads them in
# turn, each route of each round, so that a drift of the machine's speed meets all alike.
group() {
    local framework="$1" spec name layer store
    shift
    for spec in "$@"; do
        IFS=: read -r name layer store <<<"$spec"
        serve "$name" "$framework" "$layer" "$store"
    done
    for round in $(seq "$rounds"); do
        for route in none read write; do
            for spec in "$@"; do
                IFS=: read -r name layer store <<<"$spec"
                echo "$framework $store $layer $route $round $(load "$name" "$route")" >>"$results"
            done
        done
    done
    stop_all
}

for target in "${targets[@]}"; do
    case "$target" in
    actix) group actix bare:bare:redis ours:ours:redis peer:peer:redis memory:ours:memory ;;
    *) group axum bare:bare:"$target" ours:ours:"$target" peer:peer:"$target" ;;
    esac
done

# latency NAME ROUTE: the mean latency of one connection's requests, in microseconds.
latency() {
    "${load_cpu[@]}" wrk -t1 -c1 -d"${duration}s" -s "$work/cookies.lua" \
        "http://127.0.0.1:${ports[$1]}/$2" -- "$work/$1.cookies" |
        awk '$1 == "Latency" {
            v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v)
            print v * (unit == "ms" ? 1000 : unit == "s" ? 1000000 : 1)
        }'
}

# round_trips STORE: microseconds of the two round trips a write needs, read and
# written by the store's own client tool, one connection: a GET and a SET on Redis, a
# SELECT and a committed UPDATE of one row on PostgreSQL.
round_trips() {
    case "$1" in
    redis)
        local url="${PEERS_REDIS:-redis://127.0.0.1:6379}" hostport host port get set
        hostport="${url#redis://}"; host="${hostport%:*}"; port="${hostport##*:}"
        get="$(redis-benchmark -h "$host" -p "$port" -c 1 -n 20000 --csv GET e2e-rtt |
            awk -F'"' 'NR == 2 { print $4 }')"
        set="$(redis-benchmark -h "$host" -p "$port" -c 1 -n 20000 --csv SET e2e-rtt x |
            awk -F'"' 'NR == 2 { print $4 }')"
        python3 -c "print(1e6 / $get + 1e6 / $set)"
        ;;
    postgres)
        local url="${PEERS_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}" select update
        psql "$url" -X -q -c "DROP TABLE IF EXISTS e2e_rtt; CREATE TABLE e2e_rtt (k int PRIMARY KEY, v bigint); INSERT INTO e2e_rtt VALUES (1, 0)"
        echo 'SELECT 1' >"$work/select.sql"
        echo 'UPDATE e2e_rtt SET v = v + 1 WHERE k = 1' >"$work/update.sql"
        select="$(pgbench -n -c 1 -T "$duration" -f "$work/select.sql" "$url" 2>/dev/null |
            awk '/latency average/ { print $4 }')"
        update="$(pgbench -n -c 1 -T "$duration" -f "$work/update.sql" "$url" 2>/dev/null |
            awk '/latency average/ { print $4 }')"
        psql "$url" -X -q -c "DROP TABLE e2e_rtt"
        python3 -c "print(1000 * ($select + $update))"
        ;;
    esac
}

# One connection, so that latencies add up: a write through our layer against the bare
# server's untouched request plus the write's two round trips.
floors="$work/floors"
: >"$floors"
for target in "${targets[@]}"; do
    case "$target" in
    redis | postgres)
        serve bare axum bare memory
        serve ours axum ours "$target"
        for round in $(seq "$rounds"); do
            echo "$target $round $(latency bare none) $(latency ours write) $(round_trips "$target")" >>"$floors"
        done
        stop_all
        ;;
    esac
done

python3 - "$results" "$rounds" "$duration" "$connections" "$pinned" "$floors" <<'PY'
import statistics, sys
from collections import defaultdict
results, rounds, duration, connections, pinned, floors_file = sys.argv[1:]
rps = defaultdict(list)
for line in open(results):
    framework, store, layer, route, _round, value = line.split()
    key = (framework, store, layer, route)
    rps[key].append(float(value))
routes = ["none", "read", "write"]
def span(values):
    """The median ratio over the rounds, and their range."""
    mid, lo, hi = statistics.median(values), min(values), max(values)
    return f"{mid:.2f}x" if len(values) == 1 else f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"
where = ("server on core 0 (one worker), wrk on core 1" if pinned == "1"
         else "server and wrk unpinned, a server worker per core")
print(f"\nrequests per second, {rounds} round(s) of {duration} s, wrk -t1 -c{connections}, "
      f"random cookies over 2,000 sessions; {where}; median ratio of the rounds (range)")
def bare_of(framework, store, route):
    """The bare server measured beside these (the actix memory row: the Redis group's)."""
    for key in [(framework, store, "bare", route)] + sorted(
            k for k in rps if k[0] == framework and k[2] == "bare" and k[3] == route):
        if key in rps:
            return rps[key]
    return None
order = ["memory", "redis", "sqlite", "postgres"]
for framework in ["axum", "actix"]:
    stores = sorted({k[1] for k in rps if k[0] == framework and k[2] == "ours"}, key=order.index)
    if not stores:
        continue
    peer_name = {"axum": "tower-sessions", "actix": "actix-session"}[framework]
    print(f"\n{framework}: ours/{peer_name}, and ours/bare server")
    print("| store | " + " | ".join(f"/{r}" for r in routes) + " |")
    print("|---|" + "---|" * len(routes))
    for store in stores:
        cells = []
        for r in routes:
            ours = rps.get((framework, store, "ours", r))
            peer = rps.get((framework, store, "peer", r))
            bare = bare_of(framework, store, r)
            cell = span([o / p for o, p in zip(ours, peer)]) if peer else "-"
            if bare:
                cell += f"; {span([o / b for o, b in zip(ours, bare)])} of bare"
            cells.append(cell)
        print(f"| {store} | " + " | ".join(cells) + " |")
    print(f"\n{framework}: requests per second (median of the rounds)")
    print("| store | layer | " + " | ".join(f"/{r}" for r in routes) + " |")
    print("|---|---|" + "---|" * len(routes))
    for store, layer in sorted({(k[1], k[2]) for k in rps if k[0] == framework},
                               key=lambda k: (order.index(k[0]), k[1])):
        print(f"| {store} | {layer} | " + " | ".join(
            f"{statistics.median(rps[(framework, store, layer, r)]) / 1000:.1f}k"
            for r in routes) + " |")
floors = defaultdict(list)
for line in open(floors_file):
    store, _round, bare, write, trips = line.split()
    floors[store].append((float(bare), float(write), float(trips)))
if floors:
    print("\nwrites against their floor, one connection: the bare server's /none plus the "
          "write's two round trips (mean latency, median of the rounds)")
    print("| store | bare /none | two round trips | our /write | ours/floor |")
    print("|---|---|---|---|---|")
    for store in sorted(floors, key=order.index):
        rows = floors[store]
        med = lambda i: statistics.median(r[i] for r in rows)
        print(f"| {store} | {med(0):.0f} µs | {med(2):.0f} µs | {med(1):.0f} µs | "
              f"{span([w / (b + t) for b, w, t in rows])} |")
PY
