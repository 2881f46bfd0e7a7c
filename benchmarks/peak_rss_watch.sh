#!/bin/bash
# Keep FILE holding the peak resident set (VmHWM, kB) of the process whose command line matches PATTERN,
# sampled every 20 s until it exits: for a resumable run (the ACDC search) that no wrapper sees start to end.
#   benchmarks/peak_rss_watch.sh "[h]ap discover --resume" benchmarks/converged/ioi/acdc/peak-rss.log &
# Each process's VmHWM is its own: a search resumed in several processes keeps one line per process.
pattern=$1 out=$2
pid=$(pgrep -f "$pattern" | head -1)
[ -z "$pid" ] && { echo "no process matches $pattern" >&2; exit 1; }
touch "$out"
while kill -0 "$pid" 2>/dev/null; do
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null)
  if [ -n "$hwm" ]; then
    { grep -v " pid $pid " "$out"; echo "$(date -u +%FT%TZ) pid $pid VmHWM_kB $hwm"; } > "$out.tmp" && mv "$out.tmp" "$out"
  fi
  sleep 20
done
