#!/usr/bin/env bash
# Builds each program here (async-only integrations used in blocking mode) and checks
# that it fails with the message that names the `sync` feature.
set -uo pipefail
cd "$(dirname "$0")"
status=0
check() {
    local bin=$1 expected=$2 output
    if output=$(cargo build --bin "$bin" 2>&1); then
        echo "wrong-mode: $bin compiled, but it must not" >&2
        status=1
    elif ! grep -qF -- "$expected" <<<"$output"; then
        echo "wrong-mode: $bin failed without naming the cause ($expected):" >&2
        echo "$output" | tail -40 >&2
        status=1
    else
        echo "wrong-mode: $bin fails as it should: $expected"
    fi
}
check axum_layer "this integration needs async mode, but the \`sync\` feature is on"
check actix_wrap "this integration needs async mode, but the \`sync\` feature is on"
check tokio_timer "is not a \`Timer\` in this build's mode"
exit $status
