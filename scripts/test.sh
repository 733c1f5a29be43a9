#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test target (unit, doc, simulation, end-to-end
# over real QUIC), and a smoke run of the benchmarks. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 2
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# Clients we did not write, for the RESP tests in tests/client.rs: redis-cli (and
# redis-benchmark, for scripts/bench-resp.sh) from redis-tools, and redis-py.
source scripts/lib.sh
ensure_pkg redis-cli redis-benchmark -- redis-tools
ensure_pkg python3 -- python3 python3-pip
if ! python3 -c "import redis" 2>/dev/null; then
  echo "installing redis-py..." >&2
  python3 -m pip install --quiet redis 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages redis
fi

echo "== format"
cargo fmt --all -- --check
echo "== lints"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== tests (release: the simulation and end-to-end suites run optimised)"
cargo test --release --workspace --all-targets --no-run
echo "== unit tests (both crates) and the benches' test mode"
cargo test --release --workspace --lib --bins --benches
# The simulation and the end-to-end suites (modules of the one `e2e` binary) in three lanes side
# by side. The suites mostly wait on timers and peers (strong, client, transport use a third of a
# core or less); the two that use the CPU (faults, the simulation) share a lane, so that the
# faults suite's sites still run on an otherwise quiet machine, as its tests expect.
bin_of() {   # bin_of TARGET: the executable `cargo test --no-run` built for test target TARGET
  cargo test --release --test "$1" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["test"] and m.get("executable"):
        print(m["executable"])'
}
E2E=$(bin_of e2e)
SIM=$(bin_of sim)
if [ ! -x "$E2E" ] || [ ! -x "$SIM" ]; then
  echo "the e2e and sim test binaries were not built (cargo test --release --test e2e --no-run)" >&2
  exit 1
fi
# Every test target must be run here: a new one in Cargo.toml fails this check until it is.
targets=$(cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(" ".join(sorted(t["name"] for p in m["packages"] for t in p["targets"] if "test" in t["kind"])))')
if [ "$targets" != "e2e sim" ]; then
  echo "test targets are now: $targets; scripts/test.sh runs only e2e and sim" >&2
  exit 1
fi
run_lane() {   # run_lane SUITE...: one after another; `sim` is the simulation, the rest e2e modules
  local s
  for s in "$@"; do
    echo "-- $s"
    if [ "$s" = sim ]; then
      SIM_SEEDS="${SIM_SEEDS:-200}" "$SIM" || return 1
    else
      "$E2E" "$s::" || return 1
    fi
  done
}
LANES=(faults+sim strong+membership+durability client+transport)
LOGS=$(mktemp -d)
pids=()
for lane in "${LANES[@]}"; do
  run_lane ${lane//+/ } >"$LOGS/$lane.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!LANES[@]}"; do
  if wait "${pids[$i]}"; then
    status=passed
  else
    status=FAILED
    failed=1
  fi
  echo "== lane ${LANES[$i]}: $status"
  cat "$LOGS/${LANES[$i]}.log"
done
rm -rf "$LOGS"
if [ "$failed" = 1 ]; then
  echo "end-to-end or simulation suites failed (see the lanes above)" >&2
  exit 1
fi
echo "== doc tests"
cargo test --release --workspace --doc
echo "== layering: the client crate alone, and the server without its tooling"
# An application that depends on causalkv-client must not pull in the server's or the tooling's
# dependencies; and the server must build without the tools feature.
client_tree=$(cargo tree -p causalkv-client -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
for heavy in clap rcgen hdrhistogram memmap2 mimalloc tracing-subscriber; do
  if grep -qx "$heavy" <<<"$client_tree"; then
    echo "causalkv-client depends on $heavy (cargo tree -p causalkv-client -i $heavy)" >&2
    exit 1
  fi
done
cargo check --release -p causalkv-client   # alone: only its own dependencies' features
cargo check --release -p causalkv --no-default-features --lib
echo "== benchmark smoke run (each criterion bench once)"
cargo bench --bench core -- --test >/dev/null
echo "== partition floor smoke run (bench partition-floor: 2 echo processes, 1 s)"
floor=$(./target/release/causalkv bench partition-floor --servers 2 --rate 2000 --seconds 1)
python3 - "$floor" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["servers"] == 2 and r["errors"] == 0, r
assert r["requests"] >= 1900 and r["server_cpu_seconds"] > 0, r
PY
if [ "${WAN_SMOKE:-1}" = 1 ]; then
  echo "== WAN benchmark smoke run (bench-wan.sh --quick, about a minute; WAN_SMOKE=0 skips)"
  CAUSALKV_PREBUILT=1 bash scripts/bench-wan.sh --quick --out "$(mktemp -d)" >/dev/null
fi
if [ "${FUZZ_SMOKE:-1}" = 1 ]; then
  # A target that no longer builds or crashes at once fails here (nightly + cargo-fuzz; one
  # unoptimised build, then two targets at a time). Long runs: scripts/fuzz.sh SECONDS.
  echo "== fuzz smoke run (every target for 5 s; FUZZ_SMOKE=0 skips)"
  FUZZ_DEV=1 FUZZ_OUT="$(mktemp -d)" FUZZ_JOBS=2 bash scripts/fuzz.sh 5 >/dev/null
fi
echo "== all checks passed"
