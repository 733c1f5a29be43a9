#!/usr/bin/env bash
# causalkv's RESP listener against Redis, with the same redis-benchmark, both over TLS with the
# same CA and client certificate, on this machine:
#   - causalkv: three sites (replication on), redis-benchmark against site a's RESP port;
#   - Redis: a primary and two `replicaof` replicas over TLS, redis-benchmark against the primary.
# Both keep two more copies on the same cores. Two modes, each with both systems up side by side:
#   - non-durable: causalkv fsync never, Redis without persistence;
#   - durable: causalkv fsync always, Redis appendonly with appendfsync always.
# For SET and GET with 100-byte values: -c 1 (p50, p99), -c 50 (throughput), -c 50 -P 16
# (throughput), in interleaved rounds (each round runs causalkv then Redis per setting), and the
# per-round ratio causalkv / Redis. Results: OUT/results.csv (every run) and OUT/summary.md.
#
#   bash scripts/bench-resp.sh [--rounds N] [--requests N] [--out DIR]
#
# --requests scales every run (default 20000: -c 1 runs a quarter of it, -P 16 runs 4x). The
# machine may be shared: figures are noisy, compare ratios within a round.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ROUNDS=3
REQUESTS=20000
OUT=results/resp
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
ensure_pkg redis-server redis-benchmark redis-cli -- redis-server redis-tools
start_work
mkdir -p "$OUT"
CSV="$OUT/results.csv"
echo "mode,round,system,setting,test,rps,p50_ms,p99_ms" > "$CSV"

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STEAL0=$(steal_mark)
BASE=$(( 20000 + RANDOM % 20000 ))
D="$WORK/dev"
"$BIN" dev --sites 3 --layout-only --dir "$D" --port "$BASE" >/dev/null
C="$D/certs"
TLS=(--tls --cacert "$C/ca.pem" --cert "$C/client-cli.pem" --key "$C/client-cli.key")
CK_PORT=$(( BASE + 2000 ))    # site a's RESP port (dev layout: port + 2000 + i)
REDIS_PORT=$(( BASE + 3000 ))

wait_ping() { # PORT
  for _ in $(seq 1 100); do
    redis-cli -h 127.0.0.1 -p "$1" "${TLS[@]}" ping 2>/dev/null | grep -q PONG && return 0
    sleep 0.1
  done
  echo "nothing answers PING on port $1" >&2
  exit 1
}

wait_two_copies() { # PORT MESSAGE: until a WAIT 2 on a fresh write returns 2 (every copy is up)
  for _ in $(seq 1 100); do
    got=$(printf 'SET warmup 1\nWAIT 2 1000\n' | redis-cli -h 127.0.0.1 -p "$1" "${TLS[@]}" | tail -1)
    [ "$got" = 2 ] && return 0
  done
  echo "$2" >&2
  exit 1
}

start_causalkv() { # FSYNC
  SITE_PIDS=()
  for s in a b c; do
    sed -i "s/^fsync = .*/fsync = \"$1\"/" "$D/site-$s.toml"
    rm -rf "$D/site-$s" && mkdir -p "$D/site-$s"
    "$BIN" serve --config "$D/site-$s.toml" 2>"$WORK/causalkv-$s.log" &
    SITE_PIDS+=($!)
    PIDS+=($!)
  done
  wait_ping "$CK_PORT"
  wait_two_copies "$CK_PORT" "causalkv: the sites never connected"
}

start_redis() { # DURABLE(0|1)
  REDIS_PIDS=()
  local persist=(--save "" --appendonly no)
  [ "$1" = 1 ] && persist=(--save "" --appendonly yes --appendfsync always)
  for i in 0 1 2; do
    local dir="$WORK/redis-$i"
    rm -rf "$dir" && mkdir -p "$dir"
    local extra=()
    [ "$i" -gt 0 ] && extra=(--replicaof 127.0.0.1 "$REDIS_PORT")
    redis-server --port 0 --tls-port $(( REDIS_PORT + i )) --bind 127.0.0.1 --dir "$dir" \
      "${persist[@]}" --tls-replication yes \
      --tls-cert-file "$C/site-a.pem" --tls-key-file "$C/site-a.key" \
      --tls-ca-cert-file "$C/ca.pem" --tls-auth-clients yes \
      --logfile "$WORK/redis-$i.log" "${extra[@]}" &
    REDIS_PIDS+=($!)
    PIDS+=($!)
    wait_ping $(( REDIS_PORT + i ))
  done
  wait_two_copies "$REDIS_PORT" "redis: the replicas never attached"
}

stop_all() {
  for p in "${SITE_PIDS[@]}" "${REDIS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${SITE_PIDS[@]}" "${REDIS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}

# run MODE ROUND SYSTEM PORT SETTING ARGS...: one redis-benchmark run of SET and GET.
run() {
  local mode=$1 round=$2 system=$3 port=$4 setting=$5
  shift 5
  echo "$mode round $round: $system $setting" >&2
  redis-benchmark -h 127.0.0.1 -p "$port" "${TLS[@]}" -d 100 -r 100000 --csv -t set,get "$@" 2>/dev/null |
    python3 -c '
import csv, sys
mode, rnd, system, setting = sys.argv[1:5]
for row in csv.DictReader(sys.stdin):
    print(",".join([mode, rnd, system, setting, row["test"], row["rps"], row["p50_latency_ms"], row["p99_latency_ms"]]))
' "$mode" "$round" "$system" "$setting" >> "$CSV"
}

for mode in nondurable durable; do
  if [ "$mode" = durable ]; then start_causalkv always; start_redis 1; else start_causalkv never; start_redis 0; fi
  for round in $(seq 1 "$ROUNDS"); do
    for setting in c1 c50 c50P16; do
      case $setting in
        c1) args=(-c 1 -n $(( REQUESTS / 4 ))) ;;
        c50) args=(-c 50 -n "$REQUESTS") ;;
        c50P16) args=(-c 50 -P 16 -n $(( REQUESTS * 4 ))) ;;
      esac
      run "$mode" "$round" causalkv "$CK_PORT" "$setting" "${args[@]}"
      run "$mode" "$round" redis "$REDIS_PORT" "$setting" "${args[@]}"
    done
  done
  stop_all
done

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
STEAL=$(steal_pct "$STEAL0")
python3 - "$CSV" "$ROUNDS" "$REQUESTS" "$(nproc)" "$LOAD_BEFORE" "$LOAD_AFTER" "$STEAL" > "$OUT/summary.md" <<'EOF'
import csv, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
by = defaultdict(dict)
for r in rows:
    by[(r["mode"], r["setting"], r["test"], r["round"])][r["system"]] = r
print("# causalkv RESP vs Redis (3 copies each, TLS, redis-benchmark -d 100)\n")
print("Ratios are causalkv / Redis within a round; for latency lower is better for causalkv,")
print("for throughput higher is. Noisy shared machine: read the per-round ratios.\n")
print(f"{sys.argv[2]} rounds, --requests {sys.argv[3]}; {sys.argv[4]} cores; load average "
      f"{sys.argv[5]} before, {sys.argv[6]} after (other work shares the machine); CPU steal "
      f"{sys.argv[7]} % of the machine's CPU time over the run.\n")
print("| mode | setting | test | metric | per-round ratios | median ratio | causalkv median | redis median |")
print("|---|---|---|---|---|---|---|---|")
keys = sorted({k[:3] for k in by}, key=lambda k: (k[0] != "nondurable", ["c1", "c50", "c50P16"].index(k[1]), k[2]))
for mode, setting, test in keys:
    rounds = sorted((k for k in by if k[:3] == (mode, setting, test)), key=lambda k: int(k[3]))
    metrics = [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")] if setting == "c1" else [("rps", "req/s")]
    for field, label in metrics:
        ratios, ck, rd = [], [], []
        for k in rounds:
            pair = by[k]
            if "causalkv" in pair and "redis" in pair:
                a, b = float(pair["causalkv"][field]), float(pair["redis"][field])
                ck.append(a); rd.append(b)
                if b > 0:
                    ratios.append(a / b)
        if not ratios:
            continue
        print(f"| {mode} | {setting} | {test} | {label} | {' '.join(f'{x:.2f}' for x in ratios)} | "
              f"{statistics.median(ratios):.2f} | {statistics.median(ck):g} | {statistics.median(rd):g} |")
EOF
cat "$OUT/summary.md"
