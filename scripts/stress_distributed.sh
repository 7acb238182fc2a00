#!/usr/bin/env bash
# The multi-process tests, N times in a row (default 10), while two busy processes run beside them at normal
# priority (as on a loaded 2-core CI machine). Prints each run's result and wall time; exits 1 at the first
# failure, with that run's log kept in stress-<k>.log.   Usage: bash scripts/stress_distributed.sh [N]
set -u
case "${1:-}" in -h|--help) sed -n '2,4p' "$0" | cut -c3-; exit 0;; esac
n=${1:-10}
python3 -c "while True: pass" & b1=$!
python3 -c "while True: pass" & b2=$!
trap 'kill $b1 $b2 2>/dev/null' EXIT
for k in $(seq 1 "$n"); do
  t0=$(date +%s)
  if uv run pytest -m distributed -q -p no:cacheprovider > "stress-$k.log" 2>&1; then
    echo "run $k/$n: $(tail -n 1 "stress-$k.log" | tr -d '=') ($(( $(date +%s) - t0 )) s)"
    rm -f "stress-$k.log"
  else
    echo "run $k/$n: FAILED after $(( $(date +%s) - t0 )) s; log in stress-$k.log"
    exit 1
  fi
done
echo "all $n runs passed beside two busy processes"
