#!/usr/bin/env bash
# Adding a site to a running cluster: three `causalkv serve` processes on loopback holding
# KEYS keys of 100-byte values, then a fourth site joins (certificate, `sites add`, start with
# `join_from`).
#
#   bash scripts/bench-membership.sh [--keys N] [--rate OPS] [--out DIR]
#
# Measured:
#   - time to join: from the start of site d's process to the snapshot loaded, and to d being
#     an active member (a Raft voter); the snapshot's bytes and its transfer rate, against
#     the bare QUIC floor one way (`causalkv bench transport-floor --processes`, the same TLS,
#     messages of 64 KiB in batches, nothing behind them): the ratio is the snapshot rate over
#     the floor's;
#   - live traffic at site b during the join against before it: an open-loop load of RATE
#     operations per second (half gets, half puts) for the same duration, p99 of each.
# The keys are loaded with `causalkv bench load` (puts only, uniformly random keys, so a
# little below KEYS distinct keys are written: the status's key count is reported).
# Writes results.md and results.json into the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

KEYS=1000000
RATE=500
OUT=results/membership
while [ $# -gt 0 ]; do
  case "$1" in
    --keys) KEYS="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
start_work
mkdir -p "$OUT"
PORT=$((17000 + ($$ % 400) * 10))
"$BIN" dev --sites 4 --dir "$WORK" --port "$PORT" --layout-only >/dev/null 2>&1
# Sites a, b, c are the cluster; d's entry leaves their files, and d's file says it joins.
python3 - "$WORK" <<'EOF'
import re, sys
work = sys.argv[1]
for name in "abc":
    path = f"{work}/site-{name}.toml"
    text = open(path).read()
    blocks = text.split("\n\n")
    blocks = [b for b in blocks if not (b.strip().startswith("[[sites]]") and 'name = "d"' in b)]
    open(path, "w").write("\n\n".join(blocks))
path = f"{work}/site-d.toml"
text = open(path).read()
open(path, "w").write('join_from = "a"\n' + text)
EOF
CERTS="$WORK/certs"
ADDR() { echo "127.0.0.1:$((PORT + $1))"; }
for i in 0 1 2; do
  name=$(echo abc | cut -c$((i + 1)))
  RUST_LOG=info "$BIN" serve --config "$WORK/site-$name.toml" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
done
wait_log() { # FILE TEXT SECONDS
  for _ in $(seq 1 $((10 * $3))); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2
  tail -20 "$1" >&2
  exit 1
}
for n in a b c; do wait_log "$WORK/$n.log" "site listening" 30; done
sleep 2
echo "loading about $KEYS keys of 100 B..." >&2
LOAD_SECONDS=$(python3 -c "print(max(5, $KEYS * 2 // 40000))")
"$BIN" bench load --site "$(ADDR 0)" --certs "$CERTS" --concurrency 64 --read-ratio 0 \
  --keys "$KEYS" --value-size 100 --seconds "$LOAD_SECONDS" >"$WORK/bulk.json" 2>/dev/null
HELD=$("$BIN" status --site "$(ADDR 0)" --certs "$CERTS" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"])')
echo "site a holds $HELD keys" >&2
# Wait until b and c have everything (lag 0 at a).
for _ in $(seq 1 600); do
  LAG=$("$BIN" status --site "$(ADDR 0)" --certs "$CERTS" --json | python3 -c 'import json,sys; print(sum(p["lag_updates"] for p in json.load(sys.stdin)["peers"]))')
  [ "$LAG" = 0 ] && break
  sleep 0.5
done
FLOOR=$("$BIN" bench transport-floor --processes --messages 20000 --message-size 65536 --batch 16 --pings 100 2>/dev/null | tail -1)
LIVE_SECONDS=20
"$BIN" bench load --site "$(ADDR 1)" --certs "$CERTS" --rate "$RATE" --read-ratio 0.5 \
  --keys "$KEYS" --seconds "$LIVE_SECONDS" --json >"$WORK/before.json" 2>/dev/null || true
# The join: d's certificate and `sites add` are done before the clock starts; the live load
# runs meanwhile.
"$BIN" certs add-site d --ca-dir "$CERTS" --force >/dev/null 2>&1 || true
"$BIN" sites add d --addr "$(ADDR 3)" --site "$(ADDR 1)" --certs "$CERTS" >/dev/null
"$BIN" bench load --site "$(ADDR 1)" --certs "$CERTS" --rate "$RATE" --read-ratio 0.5 \
  --keys "$KEYS" --seconds "$LIVE_SECONDS" --json >"$WORK/during.json" 2>/dev/null &
LOADPID=$!
T0=$(date +%s.%N)
RUST_LOG=info "$BIN" serve --config "$WORK/site-d.toml" >"$WORK/d.log" 2>&1 &
PIDS+=($!)
wait_log "$WORK/d.log" "joined: snapshot loaded" 600
T1=$(date +%s.%N)
for _ in $(seq 1 1200); do
  STATE=$("$BIN" sites list --site "$(ADDR 1)" --certs "$CERTS" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["membership"]["sites"][3]["state"])' || true)
  [ "$STATE" = active ] && break
  sleep 0.1
done
T2=$(date +%s.%N)
wait "$LOADPID" || true
FLOOR_AFTER=$("$BIN" bench transport-floor --processes --messages 20000 --message-size 65536 --batch 16 --pings 100 2>/dev/null | tail -1)
SNAP_LINE=$(grep "joined: snapshot loaded" "$WORK/d.log")
SERVED=$(grep "snapshot sent to a joining site" "$WORK/a.log" || true)

python3 - "$OUT" "$WORK" "$T0" "$T1" "$T2" "$KEYS" "$HELD" "$RATE" "$STATE" "$FLOOR" "$SNAP_LINE" "$SERVED" "$FLOOR_AFTER" <<'EOF'
import json, re, sys
out, work, t0, t1, t2, keys, held, rate, state, floor, snap, served, floor_after = sys.argv[1:14]
t0, t1, t2 = float(t0), float(t1), float(t2)
floor = json.loads(floor)
def field(line, name):
    m = re.search(r"(?<![a-z_])" + name + r"=([0-9.]+)", line)
    return float(m.group(1)) if m else None
snap_bytes = field(snap, "bytes")
snap_ms = field(snap, "ms")
snap_rate = snap_bytes / (snap_ms / 1000) / 1e6
transfer_ms = field(snap, "transfer_ms")
transfer_rate = snap_bytes / (transfer_ms / 1000) / 1e6
floor_after = json.loads(floor_after)
floor_rate = max(floor["mb_per_s"], floor_after["mb_per_s"])
before = json.load(open(f"{work}/before.json"))
during = json.load(open(f"{work}/during.json"))
def p99(r):
    return max(r["get"]["p99_us"], r["put"]["p99_us"])
res = {
    "keys_asked": int(keys), "keys_held": int(held), "live_rate": int(rate),
    "snapshot_bytes": int(snap_bytes), "snapshot_ms": snap_ms,
    "snapshot_mb_per_s": snap_rate, "transfer_ms": transfer_ms,
    "transfer_mb_per_s": transfer_rate,
    "floor_mb_per_s_before": floor["mb_per_s"], "floor_mb_per_s_after": floor_after["mb_per_s"],
    "snapshot_over_floor": snap_rate / floor_rate,
    "transfer_over_floor": transfer_rate / floor_rate,
    "start_to_snapshot_loaded_s": t1 - t0, "start_to_active_s": t2 - t0,
    "final_state": state,
    "before": {"get_p99_us": before["get"]["p99_us"], "put_p99_us": before["put"]["p99_us"],
               "errors": before["errors"], "ops": before["ops"]},
    "during": {"get_p99_us": during["get"]["p99_us"], "put_p99_us": during["put"]["p99_us"],
               "errors": during["errors"], "ops": during["ops"]},
    "p99_during_over_before": p99(during) / max(1, p99(before)),
    "source_capture_ms": field(served, "captured_ms"),
    "source_log": served.strip(),
}
json.dump(res, open(f"{out}/results.json", "w"), indent=2)
md = f"""# Adding a site to a running cluster

`bash scripts/bench-membership.sh --keys {keys} --rate {rate}`: three `causalkv serve`
processes on loopback holding {held} keys of 100 B (asked: {keys}, uniformly random puts),
then site d joins from a.

| measure | value |
|---|---|
| d's start to snapshot loaded | {t1 - t0:.2f} s |
| d's start to active (Raft voter) | {t2 - t0:.2f} s (final state: {state}) |
| snapshot bytes | {int(snap_bytes):,} |
| source's copy of its store (before the header) | {field(served, "captured_ms"):.0f} ms |
| snapshot transfer: header to the archive's last byte received | {transfer_ms:.0f} ms, {transfer_rate:.1f} MB/s |
| snapshot request to installed (source's copy, transfer, fsync, validation) | {snap_ms:.0f} ms, {snap_rate:.1f} MB/s |
| bare QUIC floor, one way, 64 KiB messages, before / after the join | {floor["mb_per_s"]:.1f} / {floor_after["mb_per_s"]:.1f} MB/s |
| **transfer rate / floor** (the better floor) | **{transfer_rate / floor_rate:.2f}** |
| request-to-installed rate / floor | {snap_rate / floor_rate:.2f} |
| live p99 at b before (get / put) | {before["get"]["p99_us"]} / {before["put"]["p99_us"]} µs, {before["errors"]} errors of {before["ops"]} |
| live p99 at b during (get / put) | {during["get"]["p99_us"]} / {during["put"]["p99_us"]} µs, {during["errors"]} errors of {during["ops"]} |
| p99 during / before (worse of get, put) | {p99(during) / max(1, p99(before)):.2f} |

One run on a shared 2-core machine (four sites, the load generator and the joiner's own work
share two cores): noisy. The live load is an
open loop of {rate} operations per second for {20} s each time, at site b (not the snapshot's
source).
"""
open(f"{out}/results.md", "w").write(md)
print(md)
EOF
