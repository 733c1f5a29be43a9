#!/usr/bin/env bash
# Shared pieces of the benchmark scripts: they source it (`source scripts/lib.sh`). Run on its
# own, it only says so.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "scripts/lib.sh holds helpers that the scripts/bench-*.sh scripts source; run one of those" >&2
  exit 0
fi

# ensure_pkg COMMAND... -- DEBIAN_PACKAGE...: installs the packages unless every command exists.
ensure_pkg() {
  local cmds=() missing=0
  while [ "$1" != "--" ]; do cmds+=("$1"); shift; done
  shift
  for c in "${cmds[@]}"; do command -v "$c" >/dev/null || missing=1; done
  if [ "$missing" = 1 ]; then
    echo "installing $*..." >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  fi
}

# parse_seconds_out ARGS...: the common options --seconds N and --out DIR (into SECONDS_PER_RUN
# and OUT, which the caller sets to its defaults first).
parse_seconds_out() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
      --out) OUT="$2"; shift 2 ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
}

# build_bin: builds the release binary into BIN. With CAUSALKV_PREBUILT=1 an existing
# target/release/causalkv is used as it is: the test command sets it after `cargo test
# --release --all-targets` has built the binary, which a plain `cargo build` would rebuild
# (dev-dependencies give some shared crates other features). CAUSALKV_BIN=PATH uses that binary
# instead, built elsewhere (to run two builds of the same benchmark in alternation).
build_bin() {
  if [ -n "${CAUSALKV_BIN:-}" ]; then
    BIN=$CAUSALKV_BIN
    return
  fi
  BIN=target/release/causalkv
  if [ "${CAUSALKV_PREBUILT:-0}" = 1 ] && [ -x "$BIN" ]; then
    return
  fi
  cargo build --release --bin causalkv >&2
}

# start_work: builds the release binary (BIN) and makes a scratch folder (WORK); on exit every
# process in PIDS is stopped and WORK removed.
start_work() {
  build_bin
  WORK=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
  PIDS=()
  trap _cleanup_work EXIT
}

_cleanup_work() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${BENCH_KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}

# cpu_ticks PID...: user + system CPU time of the processes, in clock ticks.
cpu_ticks() {
  local t=0
  for p in "$@"; do
    t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
  done
  echo "$t"
}

# steal_mark: the machine's CPU time so far, as "STEAL TOTAL" in clock ticks (/proc/stat).
steal_mark() {
  awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t }' /proc/stat
}

# steal_pct MARK: the share of the machine's CPU time since MARK (from steal_mark) that the
# hypervisor ran other guests instead ("steal"), in percent. On a shared virtual machine every
# wake-up of an idle core waits for the host, so latency figures ride on this.
steal_pct() {
  local s0 t0
  read -r s0 t0 <<<"$1"
  awk -v s0="$s0" -v t0="$t0" '$1 == "cpu" {
    t = 0; for (i = 2; i <= 9; i++) t += $i
    printf "%.1f\n", (t > t0) ? 100 * ($9 - s0) / (t - t0) : 0 }' /proc/stat
}
