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

echo "== format"
cargo fmt --all -- --check
echo "== lints"
cargo clippy --all-targets --release -- -D warnings
echo "== tests (release: the simulation and end-to-end suites run optimised)"
SIM_SEEDS="${SIM_SEEDS:-200}" cargo test --release --all-targets
echo "== doc tests"
cargo test --release --doc
echo "== benchmark smoke run (each criterion bench once)"
cargo bench --bench core -- --test >/dev/null
if [ "${WAN_SMOKE:-1}" = 1 ]; then
  echo "== WAN benchmark smoke run (bench-wan.sh --quick, about a minute; WAN_SMOKE=0 skips)"
  bash scripts/bench-wan.sh --quick --out "$(mktemp -d)" >/dev/null
fi
echo "== all checks passed"
