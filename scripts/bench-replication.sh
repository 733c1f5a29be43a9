#!/usr/bin/env bash
# Replication throughput between two sites on loopback, read against the bare transport, in one
# run.
#
#   bash scripts/bench-replication.sh [--updates N] [--out DIR]
#
# Each measurement streams a backlog of N updates (default 1,000,000) of 100-byte values from
# site a to site b, batching on (1,024 per frame): a's log is filled while b is down, then b
# starts and the clock runs until b has applied a's last write (b's process start, handshakes
# and hello included). Site b runs with the default fsync = "always" (replicated batches are
# group-committed). Measured in ROUNDS interleaved rounds (default 3), each running back to
# back:
#   - `causalkv bench transport-floor --processes`: bare QUIC with the same TLS and framing,
#     176-byte messages (the wire size of one update) one way, nothing behind them;
#   - `causalkv bench replication --processes --keys 100000`: two `causalkv serve` processes, the
#     updates overwriting a key space of 100,000 keys (a site in steady state);
#   - the same with both `serve` processes on a 2-worker multi-threaded runtime
#     (CAUSALKV_THREADS=2), as a node embedded in an application's runtime runs, read against
#     the line above (current_thread, as `causalkv serve` runs by default);
#   - `causalkv bench replication --processes`: the same with 1,000,000 distinct keys, so b's
#     store grows from empty to a million keys during the run;
#   - `causalkv bench replication`: both sites on one runtime (one thread) in one process.
# The table gives medians, every round's value, and the ratio to the floor within each round.
# Writes results.md and results.json into the output folder and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

UPDATES=1000000
OUT=results/replication
ROUNDS=${ROUNDS:-3}
while [ $# -gt 0 ]; do
  case "$1" in
    --updates) UPDATES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
start_work
mkdir -p "$OUT"
RAW="$WORK/raw.jsonl"
: >"$RAW"

run() { # NAME ARGS...: one measurement, appended to RAW as {"round", "name", "report"}
  local name=$1; shift
  local report
  report=$("$BIN" bench "$@" 2>/dev/null | tail -1)
  echo "{\"round\": $ROUND, \"name\": \"$name\", \"report\": $report}" >>"$RAW"
  echo "round $ROUND $name: $(echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(int(r.get("updates_per_s", r.get("messages_per_s", 0))), "per s")')" >&2
}

for ROUND in $(seq 1 "$ROUNDS"); do
  run floor transport-floor --processes --messages "$((2 * UPDATES))" --pings 1000
  run steady replication --processes --updates "$UPDATES" --keys 100000
  CAUSALKV_THREADS=2 run steady_mt2 replication --processes --updates "$UPDATES" --keys 100000
  run growing replication --processes --updates "$UPDATES"
  run one_thread replication --updates "$UPDATES" --keys 100000
done

python3 - "$RAW" "$OUT" "$UPDATES" <<'EOF'
import json, statistics, sys
raw, out, updates = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(raw)]
rounds = sorted({r["round"] for r in rows})
def rate(r):
    return r["report"].get("updates_per_s", r["report"].get("messages_per_s"))
by = {(r["round"], r["name"]): rate(r) for r in rows}
mb = {(r["round"], r["name"]): r["report"]["mb_per_s"] for r in rows}
names = [("floor", "bare QUIC floor, one way (messages of 176 B)"),
         ("steady", "2 processes, 100,000 keys (overwrites)"),
         ("steady_mt2", "the same, each process on a 2-worker multi-threaded runtime"),
         ("growing", "2 processes, 1,000,000 new keys"),
         ("one_thread", "1 process, both sites on one thread, 100,000 keys")]
table = []
for key, label in names:
    vals = [by[(n, key)] for n in rounds]
    ratios = [by[(n, key)] / by[(n, "floor")] for n in rounds]
    table.append({"name": key, "label": label, "per_s": vals,
                  "median_per_s": statistics.median(vals),
                  "median_mb_per_s": statistics.median(mb[(n, key)] for n in rounds),
                  "ratio_to_floor": ratios, "median_ratio_to_floor": statistics.median(ratios)})
mt = [by[(n, "steady_mt2")] / by[(n, "steady")] for n in rounds]
json.dump({"updates": updates, "value_size": 100, "batch": 1024, "rounds": len(rounds),
           "results": table, "multi_thread_to_current_thread": mt,
           "median_multi_thread_to_current_thread": statistics.median(mt)},
          open(f"{out}/results.json", "w"), indent=2)
lines = [f"# Replication throughput on loopback ({updates:,} updates of 100 B, batches of 1,024)", "",
         f"{len(rounds)} interleaved rounds; `bash scripts/bench-replication.sh`.", "",
         "| measurement | median per s | MB/s | every round | median ratio to floor (every round) |",
         "|---|---:|---:|---|---|"]
for t in table:
    rr = ", ".join(f"{v:,.0f}" for v in t["per_s"])
    ra = ", ".join(f"{v:.2f}" for v in t["ratio_to_floor"])
    lines.append(f"| {t['label']} | {t['median_per_s']:,.0f} | {t['median_mb_per_s']:.1f} | {rr} | {t['median_ratio_to_floor']:.2f} ({ra}) |")
lines += ["", f"2-worker multi-threaded runtime / current_thread, steady state: median {statistics.median(mt):.2f} "
          f"({', '.join(f'{v:.2f}' for v in mt)})"]
lines += ["", "Per second: updates applied at the receiving site, or messages for the floor. MB/s: key and",
          "value bytes for replication (115 B per update), message bytes for the floor. Each update is",
          "176 bytes on the wire."]
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
