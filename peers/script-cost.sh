#!/usr/bin/env bash
# What RedisStore's conditional write (its update script: read the stored version, then
# SET) costs against the plain SET an unconditional store sends, on the Redis at
# PEERS_REDIS (default 127.0.0.1:6379), measured by redis-benchmark, one connection and
# 16, with a 300-byte record. The script is taken from src/stores/redis/ as built.
#   bash peers/script-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
url="${PEERS_REDIS:-redis://127.0.0.1:6379}"
hostport="${url#redis://}"
host="${hostport%:*}"
port="${hostport##*:}"
script="$(python3 - <<'PY'
import re
owners = open("src/stores/redis/owners.rs").read()
store = open("src/stores/redis/mod.rs").read()
function = re.search(r'macro_rules! file_under_owner \{\s*\(\) => \{\s*r"(.*?)"\s*\};', owners, re.S).group(1)
body = re.search(r'const UPDATE_SCRIPT: &str = concat!\(\s*owners::file_under_owner!\(\),\s*r"(.*?)"\s*\);', store, re.S).group(1)
print(function + body)
PY
)"
sha="$(redis-cli -h "$host" -p "$port" SCRIPT LOAD "$script")"
# A record whose first 8 bytes are its version and whose 9th is no format marker, so
# the script takes its usual path: the version matches, the record is written.
value="VVVVVVVVx$(head -c 291 /dev/zero | tr '\0' 'r')"
key="e2e-script-cost"
now="$(date +%s)"
redis-cli -h "$host" -p "$port" SET "$key" "$value" PX 86400000 >/dev/null
check="$(redis-cli -h "$host" -p "$port" EVALSHA "$sha" 1 "$key" VVVVVVVV "$value" 86400000 "$now" 0)"
[ "$check" = 2 ] || { echo "the script did not write (answered $check)" >&2; exit 1; }
for clients in 1 16; do
    for run in 1 2; do
        set_rps="$(redis-benchmark -h "$host" -p "$port" -c "$clients" -n 100000 --csv \
            SET "$key" "$value" PX 86400000 | awk -F'"' 'NR == 2 { print $4 }')"
        script_rps="$(redis-benchmark -h "$host" -p "$port" -c "$clients" -n 100000 --csv \
            EVALSHA "$sha" 1 "$key" VVVVVVVV "$value" 86400000 "$now" 0 | awk -F'"' 'NR == 2 { print $4 }')"
        get_rps="$(redis-benchmark -h "$host" -p "$port" -c "$clients" -n 100000 --csv \
            GET "$key" | awk -F'"' 'NR == 2 { print $4 }')"
        python3 -c "
s, e, g = $set_rps, $script_rps, $get_rps
print(f'{$clients:>2} connection(s), run $run: GET {1e6 / g:6.1f} us, SET {1e6 / s:6.1f} us, '
      f'update script {1e6 / e:6.1f} us per operation: the script costs {s / e:.2f}x a SET')"
    done
done
redis-cli -h "$host" -p "$port" DEL "$key" >/dev/null
