#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60) and reports, per target,
# the executions, executions per second (wall, and per CPU second: the machine may be shared),
# coverage (libFuzzer's `cov` and `ft`), the corpus size, peak RSS and crashes. Installs the
# nightly toolchain and cargo-fuzz if they are missing. Builds every target once, then runs
# FUZZ_JOBS targets at a time (default: one per core).
#
#   bash scripts/fuzz.sh [SECONDS]
#
# Environment: FUZZ_JOBS (targets at a time), FUZZ_TARGETS (space-separated subset),
# FUZZ_SANITIZER (default `none`: the targets are safe Rust, where AddressSanitizer finds
# nothing the bounds checks do not, and costs build time and speed; `address` to use it),
# FUZZ_OUT (default results/fuzz: fuzz.md, a table, and fuzz.csv), FUZZ_RUNS (stop a target
# once it has run this many inputs, before SECONDS if it is fast enough), FUZZ_DEV=1 (build
# the targets unoptimised: about a minute faster to build, slower to run; the test command's
# smoke run uses it, since it only checks that every target builds and starts).
#
# The corpus grows in fuzz/corpus/<target>/ (not committed), starting from fuzz/seeds/<target>/.
# A crash leaves its input in fuzz/artifacts/<target>/ and makes the script fail; once fixed,
# copy the input to fuzz/regressions/<target>/, where the normal test suite replays it
# (`fuzzing::tests` in the library).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-60}"
JOBS="${FUZZ_JOBS:-$(nproc)}"
SANITIZER="${FUZZ_SANITIZER:-none}"
OUT="${FUZZ_OUT:-results/fuzz}"

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "installing the nightly toolchain..." >&2
  rustup toolchain install nightly --profile minimal >&2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz..." >&2
  cargo install cargo-fuzz >&2
fi

cd fuzz
# The fuzz crate has its own target folder: its flags (coverage instrumentation, nightly) differ
# from the main build's, so sharing one would rebuild both.
unset CARGO_TARGET_DIR
TARGETS="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
echo "== building the fuzz targets (sanitizer: $SANITIZER)" >&2
build_start=$(date +%s)
PROFILE=release
DEV_FLAG=()
if [ "${FUZZ_DEV:-0}" = 1 ]; then
  # The smoke build (the test command's): no debug info, about 10 % less build time.
  PROFILE=debug; DEV_FLAG=(--dev); export CARGO_PROFILE_DEV_DEBUG=0
fi
cargo +nightly fuzz build -s "$SANITIZER" "${DEV_FLAG[@]}" >&2   # every target, in one build
echo "built in $(($(date +%s) - build_start)) s" >&2
BIN=target/$(rustc +nightly -vV | sed -n 's/^host: //p')/$PROFILE
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT

# run TARGET: fuzzes it for SECONDS_PER_TARGET; its output goes to $LOGS/TARGET.log, the CPU
# time it used (user and system seconds) to $LOGS/TARGET.cpu.
run() {
  local t="$1"
  mkdir -p "corpus/$t" "artifacts/$t"
  local TIMEFORMAT='%U %S'
  {
    time "$BIN/$t" "corpus/$t" "seeds/$t" -max_total_time="$SECONDS_PER_TARGET" \
      ${FUZZ_RUNS:+-runs="$FUZZ_RUNS"} -print_final_stats=1 -timeout=10 -artifact_prefix="artifacts/$t/" >"$LOGS/$t.log" 2>&1 \
      || echo "$?" >"$LOGS/$t.failed"
  } 2>"$LOGS/$t.cpu"
}

touch "$LOGS/started"
echo "== fuzzing: $(wc -w <<<"$TARGETS") targets, ${SECONDS_PER_TARGET} s each, $JOBS at a time" >&2
running=0
for t in $TARGETS; do
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait

cd ..
mkdir -p "$OUT"
stat_of() { sed -n "s/^stat::$1: *//p" "$2" | tail -1; }
crashed=0
{
  echo "target,seconds,executions,exec_per_s,exec_per_cpu_s,cov,ft,corpus,peak_rss_mb,crashes"
  for t in $TARGETS; do
    log="$LOGS/$t.log"
    execs=$(stat_of number_of_executed_units "$log")
    rate=$(stat_of average_exec_per_sec "$log")
    rss=$(stat_of peak_rss_mb "$log")
    # The last status line: "#N DONE cov: C ft: F corp: K/SIZE ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
    cpu=$(awk '{print $1 + $2}' "$LOGS/$t.cpu")
    per_cpu=$(awk -v e="${execs:-0}" -v c="$cpu" 'BEGIN { printf "%d", (c > 0 ? e / c : 0) }')
    crashes=$(find "fuzz/artifacts/$t" -type f -newer "$LOGS/started" 2>/dev/null | wc -l)
    if [ -e "$LOGS/$t.failed" ] || [ "$crashes" -gt 0 ]; then
      crashed=1
      echo "$t: FAILED (exit $(cat "$LOGS/$t.failed" 2>/dev/null || echo 0)); its output:" >&2
      grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || tail -20 "$log" >&2
      [ "$crashes" -gt 0 ] || crashes=1
    fi
    echo "$t,$SECONDS_PER_TARGET,${execs:-0},${rate:-0},$per_cpu,${cov:-0},${ft:-0},${corp:-0},${rss:-0},$crashes"
  done
} >"$OUT/fuzz.csv"

{
  echo "# Fuzzing: every target, ${SECONDS_PER_TARGET} s each${FUZZ_RUNS:+ or until $FUZZ_RUNS executions}"
  echo
  echo "\`${FUZZ_RUNS:+FUZZ_RUNS=$FUZZ_RUNS }scripts/fuzz.sh $SECONDS_PER_TARGET\` at $(git rev-parse --short HEAD) on $(date -u +%Y-%m-%dT%H:%MZ):"
  echo "sanitizer \`$SANITIZER\`, $JOBS targets at a time on $(nproc) cores (load average before the"
  echo "report: $(cut -d' ' -f1-3 /proc/loadavg)). exec/s is wall-clock; exec/CPU-s divides by the CPU"
  echo "time the target itself used, the fairer figure on a shared machine. cov and ft are libFuzzer's"
  echo "coverage counters (edges, features) at the end; corpus includes the seeds."
  echo
  echo "| target | executions | exec/s | exec/CPU-s | cov | ft | corpus | peak RSS MB | crashes |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  tail -n +2 "$OUT/fuzz.csv" | while IFS=, read -r t _ e r c cov ft corp rss cr; do
    echo "| $t | $e | $r | $c | $cov | $ft | $corp | $rss | $cr |"
  done
} >"$OUT/fuzz.md"
cat "$OUT/fuzz.md"
if [ "$crashed" = 1 ]; then
  echo "a target crashed: its input is in fuzz/artifacts/<target>/ (see above)" >&2
  exit 1
fi
