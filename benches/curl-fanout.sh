#!/usr/bin/env bash
# One sender and N curl receivers through a running fanpipe, on loopback.
# Prints the sender's summary, the receivers' sizes and exit codes, the server's peak RSS
# (since it started) and the CPU time it spent on this transfer. Usage: benches/curl-fanout.sh URL_BASE SERVER_PID BYTES N
set -euo pipefail
base=$1 pid=$2 bytes=$3 n=$4
name="bench-$$-$RANDOM"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
cpu_before=$(cpu)
for _ in $(seq "$n"); do
    curl -sS -o /dev/null -w '%{size_download} exit=%{exitcode}\n' "$base/$name?n=$n" >>"$out" &
done
sleep 0.5
head -c "$bytes" /dev/zero | curl -sS -T - "$base/$name?n=$n"
wait
echo "receivers (count, bytes, exit):"
sort "$out" | uniq -c
grep VmHWM "/proc/$pid/status"
echo "server cpu for this transfer: $(( $(cpu) - cpu_before )) ticks of 10 ms (user+system)"
