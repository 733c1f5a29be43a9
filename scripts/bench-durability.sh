#!/usr/bin/env bash
# Durability benchmarks, side by side in one run:
#   - put throughput of one causalkv site for each fsync policy (always, batch, never), as a
#     ratio to `never`, with 1, 16 and 64 concurrent writers (group commit at work);
#   - Redis with `appendfsync always` (TLS, same CA), `redis-benchmark -c 1` and `-c 50`;
#   - recovery time of 1M keys (snapshot + 100k-record log tail) and disk use before and after
#     the snapshot pruned the log (`causalkv bench recovery`).
#
#   bash scripts/bench-durability.sh [--seconds N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=4
OUT=results/durability
parse_seconds_out "$@"
ensure_pkg redis-server redis-benchmark -- redis-server redis-tools
start_work
mkdir -p "$OUT"
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"

BASE=$(( 20000 + RANDOM % 20000 ))
for policy in always batch never; do
  D="$WORK/$policy"
  "$BIN" dev --sites 1 --layout-only --dir "$D" --port "$BASE" >/dev/null
  sed -i "s/^fsync = .*/fsync = \"$policy\"/" "$D/site-a.toml"
  grep -q "^fsync = \"$policy\"" "$D/site-a.toml"
  "$BIN" serve --config "$D/site-a.toml" 2>"$D/site.log" &
  PID=$!
  for _ in $(seq 1 20); do
    kill -0 "$PID" || { cat "$D/site.log" >&2; exit 1; }
    "$BIN" status --site "127.0.0.1:$BASE" --certs "$D/certs" --timeout-ms 500 >/dev/null 2>&1 && break
  done
  for c in 1 16 64; do
    echo "causalkv fsync=$policy, $c writers..." >&2
    R=$("$BIN" bench load --site "127.0.0.1:$BASE" --certs "$D/certs" --seconds "$SECONDS_PER_RUN" \
        --concurrency "$c" --read-ratio 0 --value-size 100 2>/dev/null)
    echo "{\"system\":\"causalkv\",\"policy\":\"$policy\",\"writers\":$c,\"report\":$R}" >> "$RESULTS"
  done
  kill "$PID"; wait "$PID" 2>/dev/null || true
done

D="$WORK/always"
REDIS_PORT=$(( BASE + 100 ))
mkdir -p "$WORK/redis"
redis-server --port 0 --tls-port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
  --appendonly yes --appendfsync always --save "" \
  --tls-cert-file "$D/certs/site-a.pem" --tls-key-file "$D/certs/site-a.key" \
  --tls-ca-cert-file "$D/certs/ca.pem" --tls-auth-clients yes --logfile "$WORK/redis.log" &
PIDS+=($!)
RB=(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" --tls --cert "$D/certs/client-cli.pem" \
    --key "$D/certs/client-cli.key" --cacert "$D/certs/ca.pem" -d 100 -r 10000 --csv -t set)
for _ in $(seq 1 50); do
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --tls --cert "$D/certs/client-cli.pem" --key "$D/certs/client-cli.key" \
    --cacert "$D/certs/ca.pem" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done
echo "redis appendfsync always -c 1, -c 50..." >&2
R1=$("${RB[@]}" -c 1 -n $(( SECONDS_PER_RUN * 500 )))
R50=$("${RB[@]}" -c 50 -n $(( SECONDS_PER_RUN * 5000 )))
echo "recovery of 1M keys + 100k tail..." >&2
REC=$("$BIN" bench recovery --keys 1000000 --tail 100000 2>/dev/null)

python3 - "$OUT" "$RESULTS" "$R1" "$R50" "$REC" <<'PY'
import csv, io, json, sys
out, results, r1, r50, rec = sys.argv[1:]
rows = [json.loads(l) for l in open(results)]
def rps(text):
    return float(next(csv.DictReader(io.StringIO(text)))["rps"])
redis = {1: rps(r1), 50: rps(r50)}
rec = json.loads(rec)
tp = {(r["policy"], r["writers"]): r["report"]["throughput"] for r in rows}
p50 = {(r["policy"], r["writers"]): r["report"]["put"]["p50_us"] for r in rows}
lines = ["## Put throughput by fsync policy (one site, 100 B values, puts/s)", "",
         "| writers | always | batch (5 ms) | never | always/never | batch/never | always p50 µs |",
         "|---:|---:|---:|---:|---:|---:|---:|"]
for w in (1, 16, 64):
    a, b, n = tp[("always", w)], tp[("batch", w)], tp[("never", w)]
    lines.append(f"| {w} | {a:,.0f} | {b:,.0f} | {n:,.0f} | {a/n:.2f} | {b/n:.2f} | {p50[('always', w)]:,.0f} |")
lines += ["", "## Group commit against Redis `appendfsync always` (both over TLS)", "",
          "| load | causalkv fsync=always puts/s | Redis SET/s | ratio |", "|---|---:|---:|---:|",
          f"| 1 writer vs redis -c 1 | {tp[('always', 1)]:,.0f} | {redis[1]:,.0f} | {tp[('always', 1)]/redis[1]:.2f} |",
          f"| 16 writers vs redis -c 50 | {tp[('always', 16)]:,.0f} | {redis[50]:,.0f} | {tp[('always', 16)]/redis[50]:.2f} |",
          f"| 64 writers vs redis -c 50 | {tp[('always', 64)]:,.0f} | {redis[50]:,.0f} | {tp[('always', 64)]/redis[50]:.2f} |",
          "", "## Recovery and disk use", "",
          f"- recovery of {rec['snapshot_keys']:,} keys (snapshot) + {rec['tail_records']:,} log records: **{rec['recovery_seconds']:.2f} s**",
          f"- log on disk before the snapshot: {rec['log_bytes_before_snapshot']/1e6:.0f} MB; after pruning (tail included): {rec['log_bytes_after_pruning']/1e6:.0f} MB; snapshot file {rec['snapshot_bytes']/1e6:.0f} MB"]
md = "\n".join(lines)
open(f"{out}/results.md", "w").write(md + "\n")
json.dump({"causalkv": rows, "redis_appendfsync_always": redis, "recovery": rec}, open(f"{out}/results.json", "w"), indent=1)
print(md)
PY
