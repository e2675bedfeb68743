#!/usr/bin/env bash
# One sender and N curl receivers through a running fanpipe, on loopback.
# Prints the sender's summary, the receivers' sizes and exit codes, and the server's peak
# RSS and CPU time. Usage: benches/curl-fanout.sh URL_BASE SERVER_PID BYTES N
set -euo pipefail
base=$1 pid=$2 bytes=$3 n=$4
name="bench-$$-$RANDOM"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$n"); do
    curl -sS -o /dev/null -w '%{size_download} exit=%{exitcode}\n' "$base/$name?n=$n" >>"$out" &
done
sleep 0.5
head -c "$bytes" /dev/zero | curl -sS -T - "$base/$name?n=$n"
wait
echo "receivers (count, bytes, exit):"
sort "$out" | uniq -c
grep VmHWM "/proc/$pid/status"
awk '{printf "server cpu: user %.2fs system %.2fs\n", $14/100, $15/100}' "/proc/$pid/stat"
