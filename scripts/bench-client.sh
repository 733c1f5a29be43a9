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
#     `redis-benchmark -c 50`;
#   - the transport's floor: a bare QUIC request/response with the same TLS setup and framing
#     and nothing behind it (`causalkv bench transport-floor --processes`), to read the single-client
#     latency against.
# The machine is shared and its wake-up latency drifts (the same Redis run measured 31 µs and
# 119 µs p50 at different times), so the measurements run in ROUNDS interleaved rounds (default
# 3): each round runs every causalkv, floor and Redis measurement once, back to back. A ratio is
# taken within a round; the table gives the median of the rounds' ratios and every round's.
# Writes results.md and results.json into the output folder and prints the table with ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=5
OUT=results/client
ROUNDS=${ROUNDS:-3}
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
N1=$(( SECONDS_PER_RUN * 8000 ))
mkdir -p "$OUT"
RAW="$WORK/rounds.jsonl"
: > "$RAW"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS: causalkv puts, gets; bare QUIC floor; redis -c 1; causalkv 64 in flight; redis -c 50..." >&2
  CK_PUT=$(ckv --concurrency 1 --read-ratio 0)
  CK_GET=$(ckv --concurrency 1 --read-ratio 1)
  FLOOR=$("$BIN" bench transport-floor --processes --messages 100000 --pings "$N1" 2>/dev/null)
  R1=$("${RB[@]}" -c 1 -n "$N1" -t set,get)
  CK_64=$(ckv --concurrency 64 --read-ratio 0.5)
  R50=$("${RB[@]}" -c 50 -n $(( N1 * 10 )) -t set,get)
  python3 - "$CK_PUT" "$CK_GET" "$FLOOR" "$R1" "$CK_64" "$R50" >> "$RAW" <<'PY'
import csv, io, json, sys
ck_put, ck_get, floor, r1, ck_64, r50 = sys.argv[1:]
def redis(text):
    rows = {r["test"]: r for r in csv.DictReader(io.StringIO(text))}
    return {t: {"rps": float(r["rps"]), "p50_us": float(r["p50_latency_ms"]) * 1000,
                "p99_us": float(r["p99_latency_ms"]) * 1000} for t, r in rows.items()}
print(json.dumps({"causalkv": {"put_c1": json.loads(ck_put), "get_c1": json.loads(ck_get),
                               "mixed_c64": json.loads(ck_64)},
                  "floor": json.loads(floor), "redis": {"c1": redis(r1), "c50": redis(r50)}}))
PY
done

python3 - "$OUT" "$RAW" <<'PY'
import json, statistics, sys
out, raw = sys.argv[1:]
rounds = [json.loads(l) for l in open(raw)]
def rows(r):
    ck, fl, rd = r["causalkv"], r["floor"]["ping_stream_per_request"], r["redis"]
    return [
      ("put p50 (µs), 1 client", ck["put_c1"]["put"]["p50_us"], fl["p50_us"], rd["c1"]["SET"]["p50_us"], "lower is better"),
      ("put p99 (µs), 1 client", ck["put_c1"]["put"]["p99_us"], fl["p99_us"], rd["c1"]["SET"]["p99_us"], "lower is better"),
      ("get p50 (µs), 1 client", ck["get_c1"]["get"]["p50_us"], fl["p50_us"], rd["c1"]["GET"]["p50_us"], "lower is better"),
      ("get p99 (µs), 1 client", ck["get_c1"]["get"]["p99_us"], fl["p99_us"], rd["c1"]["GET"]["p99_us"], "lower is better"),
      ("throughput (ops/s), causalkv 64 in flight vs redis -c 50 (SET+GET mean)",
       ck["mixed_c64"]["throughput"], None,
       (rd["c50"]["SET"]["rps"] + rd["c50"]["GET"]["rps"]) / 2, "higher is better"),
    ]
per = [rows(r) for r in rounds]
fmt = lambda v: "–" if v is None else f"{v:,.0f}"
lines = [f"{len(rounds)} interleaved rounds; values are medians over the rounds, ratios are the median of the per-round ratios (each round's ratio in brackets).", "",
         "| metric | causalkv (QUIC+mTLS, 3 sites) | bare QUIC floor | Redis 7 (TLS) | causalkv/Redis | causalkv/floor | |",
         "|---|---:|---:|---:|---:|---:|---|"]
summary = []
for i in range(len(per[0])):
    name, note = per[0][i][0], per[0][i][4]
    c = statistics.median(p[i][1] for p in per)
    f = None if per[0][i][2] is None else statistics.median(p[i][2] for p in per)
    r = statistics.median(p[i][3] for p in per)
    ratios = [p[i][1] / p[i][3] for p in per]
    fr = None if f is None else statistics.median(p[i][1] / p[i][2] for p in per)
    rs = statistics.median(ratios)
    each = ", ".join(f"{x:.2f}" for x in ratios)
    lines.append(f"| {name} | {fmt(c)} | {fmt(f)} | {fmt(r)} | {rs:.2f} ({each}) | {'–' if fr is None else f'{fr:.2f}'} | {note} |")
    summary.append({"metric": name, "causalkv": c, "floor": f, "redis": r, "ratio_redis": rs,
                    "ratios_redis_per_round": ratios, "ratio_floor": fr})
errors = [(r["causalkv"]["put_c1"]["errors"], r["causalkv"]["get_c1"]["errors"], r["causalkv"]["mixed_c64"]["errors"]) for r in rounds]
lines.append("")
lines.append("bare QUIC floor: `causalkv bench transport-floor --processes`, a request/response of 176 B on a new stream per request between two processes, the same TLS setup and framing, no store behind it.")
lines.append("causalkv errors per round (put, get, mixed): " + ", ".join(str(e) for e in errors))
md = "\n".join(lines)
open(f"{out}/results.md", "w").write(md + "\n")
json.dump({"summary": summary, "rounds": rounds}, open(f"{out}/results.json", "w"), indent=1)
print(md)
PY
