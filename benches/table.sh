#!/usr/bin/env bash
# The BENCHMARKS.md table: for each backend, each scenario is run by `fanpipe-load compare`
# (the floor and the server alternately, REPEAT times each, medians compared), and one
# markdown row is printed per scenario: the server's and the floor's median GB/s, their
# ratio, the CPU ratio, and the server's peak RSS over the scenario's runs.
#
# Usage: benches/table.sh [BACKEND...]   (default: tokio smol glommio; REPEAT=3; ONLY=REGEX
# keeps the scenarios whose name matches; TLS=1: the HTTPS table, each server given a
# certificate from `fanpipe-load cert` and compared with the floor over TLS)
# Builds what it needs: target/release/fanpipe-load, and each backend's binary into
# target/backends/BACKEND (the same place the conformance suite builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=${REPEAT:-3}
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(tokio smol glommio)
cargo build --quiet --release -p fanpipe-bench
load=target/release/fanpipe-load

# name | fanpipe-load arguments
scenarios=(
    "n=1, 1 GiB|-n 1 --size 1GiB"
    "n=4, 1 GiB|-n 4 --size 1GiB"
    "n=30, 800 MiB (the seed scenario)|-n 30 --size 800MiB"
    "n=30, 800 MiB, chunked upload in 64 KiB chunks (as curl -T -)|-n 30 --size 800MiB --chunked --block-size 64KiB"
    "n=100, 200 MiB|-n 100 --size 200MiB"
    "n=1000, 16 MiB|-n 1000 --size 16MiB"
    "1000 pipes at once, n=1, 1 MiB each|--pipes 1000 -n 1 --size 1MiB"
)

scheme=http
tls_args=()
header="| backend | scenario | server GB/s | floor GB/s | server/floor | CPU server/floor | server peak RSS |"
sep="| --- | --- | ---: | ---: | ---: | ---: | ---: |"
if [[ ${TLS:-} == 1 ]]; then
    scenarios=(
        "n=1, 800 MiB|-n 1 --size 800MiB"
        "n=30, 200 MiB|-n 30 --size 200MiB"
    )
    pki=$(mktemp -d)
    trap 'rm -rf "$pki"' EXIT
    "$load" cert --out "$pki" >/dev/null
    scheme=https
    tls_args=(--tls-cert "$pki/cert.pem" --tls-key "$pki/key.pem")
    header="| backend | scenario | server GB/s | TLS floor GB/s | server/floor | CPU server/floor | server CPU s/GB | floor CPU s/GB | server peak RSS |"
    sep="| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
fi

field() { # field NAME JSON: a number from a flat JSON line
    sed -n "s/.*\"$1\":\([0-9.e+-]*\).*/\1/p" <<<"$2"
}

echo "$header"
echo "$sep"
for backend in "${backends[@]}"; do
    cargo build --quiet --release --bin fanpipe --no-default-features --features "$backend" \
        --target-dir "target/backends/$backend"
    bin="target/backends/$backend/release/fanpipe"
    port=$((18500 + RANDOM % 1000))
    "$bin" --listen "127.0.0.1:$port" --max-connections-per-client 0 --max-waiting-per-client 0 \
        "${tls_args[@]}" 2>/dev/null &
    pid=$!
    sleep 1
    for scenario in "${scenarios[@]}"; do
        name=${scenario%%|*}
        [[ -z ${ONLY:-} || $name =~ $ONLY ]] || continue
        # shellcheck disable=SC2206
        args=(${scenario#*|})
        [[ $scheme == https ]] && args+=(--cacert "$pki/ca.pem")
        out=$("$load" compare --url "$scheme://127.0.0.1:$port" --pid "$pid" --repeat "$repeat" \
            --json "${args[@]}" 2>/dev/null)
        cmp=$(grep '"mode":"compare"' <<<"$out")
        rss=$(grep '"run":"median"' <<<"$out" | grep '"mode":"server"' | head -1)
        rss_mib=$(awk "BEGIN { print $(field peak_rss_kib "$rss") / 1024 }")
        if [[ $scheme == https ]]; then
            printf "| %s | %s | %.3f | %.3f | %.2f | %.2f | %.3f | %.3f | %.1f MiB |\n" "$backend" \
                "$name" "$(field server_gbps "$cmp")" "$(field floor_gbps "$cmp")" \
                "$(field ratio "$cmp")" "$(field cpu_ratio "$cmp")" \
                "$(field server_cpu_s_per_gb "$cmp")" "$(field floor_cpu_s_per_gb "$cmp")" "$rss_mib"
        else
            printf "| %s | %s | %.2f | %.2f | %.2f | %.2f | %.1f MiB |\n" "$backend" "$name" \
                "$(field server_gbps "$cmp")" "$(field floor_gbps "$cmp")" "$(field ratio "$cmp")" \
                "$(field cpu_ratio "$cmp")" "$rss_mib"
        fi
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
done
