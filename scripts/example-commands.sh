#!/usr/bin/env bash
# Builds every `cargo run --example ...` command that the README and the examples'
# docs show, exactly as written (its arguments after `--` dropped, since the servers
# are built, not run): a command a newcomer copies must compile.
set -euo pipefail
cd "$(dirname "$0")/.."

# One line per command: `NAME FEATURES` (FEATURES may be empty).
commands=$(
    grep -ohE 'cargo run --example [A-Za-z0-9_]+( --features [A-Za-z0-9_,-]+)?' \
        README.md examples/README.md examples/*.rs |
        sed -E 's/^cargo run --example ([A-Za-z0-9_]+)( --features ([A-Za-z0-9_,-]+))?$/\1 \3/' |
        grep -vE '^[A-Z_]+ ' | # a placeholder (`cargo run --example NAME`)
        sort -u
)
if [ -z "$commands" ]; then
    echo "no \`cargo run --example\` command found in the docs" >&2
    exit 1
fi

# Examples that share a feature set are built in one cargo call ("-": no features).
declare -A by_features=()
while read -r name features; do
    by_features["${features:--}"]+=" --example $name"
done <<<"$commands"

count=0
for key in "${!by_features[@]}"; do
    features=${key#-}
    # shellcheck disable=SC2086
    echo "cargo build${features:+ --features $features}${by_features[$key]}"
    # shellcheck disable=SC2086
    cargo build --quiet ${features:+--features "$features"} ${by_features[$key]}
    count=$((count + $(wc -w <<<"${by_features[$key]}") / 2))
done
echo "built $count documented example commands in ${#by_features[@]} feature sets"
