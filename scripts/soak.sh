#!/usr/bin/env bash
# The long run: three `causalkv serve` sites behind the user-space WAN emulator under steady
# load from several sessions (a write or a read every 20 ms each, values of ~110 bytes over 500
# keys), with faults on a schedule (from minute 1, every 150 s alternately: the link between
# sites a and b cut for 30 s, then a kill -9 of site c restarted after 5 s). Every minute it
# samples each process's RSS and open file descriptors (/proc), its dependency-buffer
# occupancy and retained updates (status), and its log segment and snapshot bytes on disk;
# every 2 s, through the faults too, each process's RSS and its anonymous part (RssAnon).
# After each heal it pauses the load and records how long the buffers and retained logs take to
# drain to 0. It ends with the causal checker over the whole history, no acknowledged write
# lost, and a convergence check.
#
#   bash scripts/soak.sh [MINUTES]        # default 30
#
# The sites use small log segments (1 MiB) and snapshot once the log holds 4 MiB, so a run of
# minutes goes through many rolls, snapshots and prunings. Writes into results/soak/ (SOAK_OUT):
# samples.csv, memory.csv, events.csv, summary.json, soak.md (the table and the verdicts) and
# soak.png. Environment: SOAK_SESSIONS, SOAK_PACE_MS, SOAK_KEYS, SOAK_SAMPLE_SECS (default 60),
# SOAK_MEMORY_SECS (2), SOAK_FAULT_SECS (150), SOAK_FAULTS (the kinds in turn: cut,kill),
# FAULTS_SEED. A short run with faults close together, e.g.
#   SOAK_FAULT_SECS=40 SOAK_OUT=results-tmp/soak bash scripts/soak.sh 5
# shows what each fault costs in memory. The test behind it is `soak` in tests/faults.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
MINUTES="${1:-30}"
OUT="${SOAK_OUT:-results/soak}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ensure_pkg python3 -- python3 python3-pip
if ! python3 -c "import matplotlib" 2>/dev/null; then
  echo "installing matplotlib..." >&2
  python3 -m pip install --quiet matplotlib 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages matplotlib
fi
cargo build --release --bin causalkv --test e2e >&2
echo "== soak: $MINUTES minutes (results in $OUT)" >&2
SOAK_MINUTES="$MINUTES" SOAK_OUT="$OUT" \
  cargo test --release --test e2e -- --ignored --exact faults::soak --nocapture
python3 scripts/soak_report.py "$OUT"
