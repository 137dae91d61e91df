#!/usr/bin/env bash
# One device call running several GPU verification scripts, each under its own time limit, with
# every log and JSON packed into $OUT/batch.tar.gz (the device tool returns a handful of files).
# Usage (repository root, device machine, carry .gpu):
#   bash scripts/gpu/batch.sh "SECONDS:COMMAND" ...     e.g. "90:bash scripts/gpu/regen_check.sh"
# Each part writes into $OUT/<n>/ (its own OUT); the part's wall time and exit code go to
# $OUT/batch.txt, which is also printed.
set -u
FINAL=${OUT:-/tmp/attncheck-out}; mkdir -p "$FINAL"
WORK=$(mktemp -d /tmp/batch.XXXX)
n=0
for part in "$@"; do
  n=$((n + 1)); limit=${part%%:*}; cmd=${part#*:}
  mkdir -p "$WORK/$n"; t0=$SECONDS
  OUT="$WORK/$n" timeout -k 5 "$limit" bash -c "$cmd" > "$WORK/$n/stdout.log" 2>&1
  rc=$?
  echo "part $n: rc $rc after $((SECONDS - t0)) s (limit $limit s): $cmd" | tee -a "$WORK/batch.txt"
done
cp "$WORK/batch.txt" "$FINAL/batch.txt"
tar -czf "$FINAL/batch.tar.gz" -C "$WORK" .
