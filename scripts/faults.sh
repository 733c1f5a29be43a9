#!/usr/bin/env bash
# The fault-injection suite on real processes: three `causalkv serve` sites behind the user-space
# WAN emulator, a seeded schedule of partitions (one-way, isolation), kill -9 with restart and
# loss bursts, hopping client sessions; then convergence, no lost acknowledged write, and the
# causal checker over the recorded history. Also runs the split-brain and planted-bug cases.
#
#   bash scripts/faults.sh [SEED]          # FAULTS_SECS=N sets the fault schedule's length
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then export FAULTS_SEED="$1"; fi
exec cargo test --release --test e2e -- faults:: --nocapture --test-threads 1
