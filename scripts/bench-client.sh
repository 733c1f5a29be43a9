#!/usr/bin/env bash
# Client latency and throughput on loopback, side by side with Redis over TLS, in one run.
#
#   bash scripts/bench-client.sh [--seconds N] [--out DIR]
#
# Starts three causalkv sites as separate `causalkv serve` processes (mutual TLS, replication
# to two peer sites on, fsync = "never" to match the Redis configuration it is compared with,
# which has persistence off; scripts/bench-durability.sh compares the fsync policies), and one
# redis-server with TLS (Debian's redis-server, installed if
# missing, using the same development CA). Measures:
#   - single-client put and get latency (p50, p99): `causalkv bench load --concurrency 1`
#     against `redis-benchmark -c 1`;
#   - throughput with 64 concurrent requests on one causalkv client connection against
#     `redis-benchmark -c 50`.
# Writes results.md and results.json into the output folder and prints the table with ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=5
OUT=results/client
parse_seconds_out "$@"
ensure_pkg redis-server redis-benchmark -- redis-server redis-tools
start_work

BASE=$(( 20000 + RANDOM % 20000 ))
"$BIN" dev --layout-only --dir "$WORK" --port "$BASE" >/dev/null
for s in a b c; do
  sed -i 's/^fsync = .*/fsync = "never"/' "$WORK/site-$s.toml"
  "$BIN" serve --config "$WORK/site-$s.toml" 2>"$WORK/site-$s.log" &
  PIDS+=($!)
done
CERTS="$WORK/certs"
SITE="127.0.0.1:$BASE"
for _ in $(seq 1 100); do
  if "$BIN" status --site "$SITE" --certs "$CERTS" --json 2>/dev/null | grep -q '"state":"up".*"state":"up"'; then break; fi
  sleep 0.1
done

REDIS_PORT=$(( BASE + 100 ))
redis-server --port 0 --tls-port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --tls-cert-file "$CERTS/site-a.pem" --tls-key-file "$CERTS/site-a.key" \
  --tls-ca-cert-file "$CERTS/ca.pem" --tls-auth-clients yes --daemonize no \
  --logfile "$WORK/redis.log" &
PIDS+=($!)
RB=(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" --tls --cert "$CERTS/client-cli.pem" \
    --key "$CERTS/client-cli.key" --cacert "$CERTS/ca.pem" -d 100 -r 10000 --csv)
for _ in $(seq 1 50); do
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --tls --cert "$CERTS/client-cli.pem" --key "$CERTS/client-cli.key" \
    --cacert "$CERTS/ca.pem" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done

ckv() { "$BIN" bench load --site "$SITE" --certs "$CERTS" --seconds "$SECONDS_PER_RUN" --value-size 100 "$@" 2>/dev/null; }
echo "causalkv: single-client puts, gets; 64 concurrent..." >&2
CK_PUT=$(ckv --concurrency 1 --read-ratio 0)
CK_GET=$(ckv --concurrency 1 --read-ratio 1)
CK_64=$(ckv --concurrency 64 --read-ratio 0.5)
N1=$(( SECONDS_PER_RUN * 8000 ))
echo "redis-benchmark (TLS): -c 1, -c 50..." >&2
R1=$("${RB[@]}" -c 1 -n "$N1" -t set,get)
R50=$("${RB[@]}" -c 50 -n $(( N1 * 10 )) -t set,get)

mkdir -p "$OUT"
python3 - "$OUT" "$CK_PUT" "$CK_GET" "$CK_64" "$R1" "$R50" <<'PY'
import csv, io, json, sys
out, ck_put, ck_get, ck_64, r1, r50 = sys.argv[1:]
ck_put, ck_get, ck_64 = json.loads(ck_put), json.loads(ck_get), json.loads(ck_64)
def redis(text):
    rows = {r["test"]: r for r in csv.DictReader(io.StringIO(text))}
    return {t: {"rps": float(r["rps"]), "p50_us": float(r["p50_latency_ms"]) * 1000,
                "p99_us": float(r["p99_latency_ms"]) * 1000} for t, r in rows.items()}
r1, r50 = redis(r1), redis(r50)
rows = [
  ("put p50 (µs), 1 client", ck_put["put"]["p50_us"], r1["SET"]["p50_us"], "lower is better"),
  ("put p99 (µs), 1 client", ck_put["put"]["p99_us"], r1["SET"]["p99_us"], "lower is better"),
  ("get p50 (µs), 1 client", ck_get["get"]["p50_us"], r1["GET"]["p50_us"], "lower is better"),
  ("get p99 (µs), 1 client", ck_get["get"]["p99_us"], r1["GET"]["p99_us"], "lower is better"),
  ("throughput (ops/s), causalkv 64 in flight vs redis -c 50 (SET+GET mean)",
   ck_64["throughput"], (r50["SET"]["rps"] + r50["GET"]["rps"]) / 2, "higher is better"),
]
lines = ["| metric | causalkv (QUIC+mTLS, 3 sites) | Redis 7 (TLS) | ratio causalkv/Redis | |",
         "|---|---:|---:|---:|---|"]
for name, c, r, note in rows:
    lines.append(f"| {name} | {c:,.0f} | {r:,.0f} | {c / r:.2f} | {note} |")
lines.append("")
lines.append(f"causalkv errors: put {ck_put['errors']}, get {ck_get['errors']}, mixed {ck_64['errors']}")
md = "\n".join(lines)
open(f"{out}/results.md", "w").write(md + "\n")
json.dump({"causalkv": {"put_c1": ck_put, "get_c1": ck_get, "mixed_c64": ck_64},
           "redis": {"c1": r1, "c50": r50}}, open(f"{out}/results.json", "w"), indent=1)
print(md)
PY
