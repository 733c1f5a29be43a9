#!/usr/bin/env bash
# Durability benchmarks, side by side in one run, in interleaved rounds:
#   - the disk's own latency: a plain loop of one small write(2) + fdatasync on the file system
#     the sites log to (what one fsync costs here, with nothing else in the way);
#   - the transport's own round trip: bare QUIC with the same mutual TLS and framing, a new
#     stream per request as the client uses (`causalkv bench transport-floor --processes`);
#   - put throughput and latency of one causalkv site under each fsync policy (always, batch,
#     never) with 1, 16 and 64 concurrent writers, 100-byte values; one site per policy, all
#     started before the first round;
#   - Redis with `appendfsync always` (TLS, same CA): `redis-benchmark -t set -c 1` and `-c 50`;
#   - group commit as the always site's /metrics saw it at 64 writers (fsyncs per second,
#     records per fsync, fsync latency);
#   - recovery time of 1M keys (snapshot + 100k-record log tail) and disk use before and after
#     the snapshot pruned the log (`causalkv bench recovery`; skipped with --no-recovery).
# Every round runs every measurement once (the disk loop right before each writer count's
# loads); the tables give each row's median over the rounds, and the targets are checked per
# round against that round's own floors, then summarised by their median.
#
#   bash scripts/bench-durability.sh [--rounds N] [--seconds N] [--out DIR] [--no-recovery]
#   bash scripts/bench-durability.sh --storage-ab "NAME:key=value,key=value NAME:..." [--rounds N] [--seconds N] [--out DIR]
#   bash scripts/bench-durability.sh --commit-threads "1 2 4 8" [--rounds N] [--seconds N] [--out DIR]
#
# --storage-ab runs only an A/B of `[storage]` settings: one site per variant (its settings
# written into the site's config; `fsync` defaults to always), plus one with fsync=never,
# loaded in interleaved rounds with 1, 16 and 64 writers, with each site's group-commit figures
# (/metrics) and CPU time (/proc) around every load; writes OUT/storage-ab.md and .jsonl.
# --commit-threads "1 2" is short for --storage-ab "threads-1:fsync_threads=1 threads-2:fsync_threads=2"
# (and writes OUT/commit-threads.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=3
ROUNDS=3
RECOVERY=1
OUT=results/durability
AB=""
AB_FILE=storage-ab.md
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --storage-ab) AB="$2"; shift 2 ;;
    --commit-threads)
      AB=""; AB_FILE=commit-threads.md
      for t in $2; do AB="$AB threads-$t:fsync_threads=$t"; done
      shift 2 ;;
    --no-recovery) RECOVERY=0; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
parse_seconds_out "${ARGS[@]+"${ARGS[@]}"}"
ensure_pkg redis-server redis-benchmark redis-cli curl -- redis-server redis-tools curl
start_work
mkdir -p "$OUT"
RAW="$WORK/rounds.jsonl"
: > "$RAW"

BASE=$(( 20000 + RANDOM % 20000 ))
declare -A SITE CERTS ADMIN SETTINGS SITE_PID
POLICIES=(always batch never)
if [ -n "$AB" ]; then
  POLICIES=()
  for v in $AB; do POLICIES+=("${v%%:*}"); SETTINGS[${v%%:*}]="fsync=always,${v#*:}"; done
  POLICIES+=(never)
fi
set_storage() {  # CONFIG KEY VALUE: one [storage] line, checked
  local value=$3
  [ "$2" = fsync ] && value="\"$3\""
  sed -i "s/^$2 = .*/$2 = $value/" "$1"
  grep -q "^$2 = $value\$" "$1" || { echo "no [storage] $2 in $1" >&2; exit 1; }
}
port=$BASE
for policy in "${POLICIES[@]}"; do
  D="$WORK/$policy"
  "$BIN" dev --sites 1 --layout-only --dir "$D" --port "$port" >/dev/null
  settings=${SETTINGS[$policy]:-fsync=$policy}
  IFS=, read -ra kvs <<< "$settings"
  for kv in "${kvs[@]}"; do set_storage "$D/site-a.toml" "${kv%%=*}" "${kv#*=}"; done
  "$BIN" serve --config "$D/site-a.toml" 2>"$D/site.log" &
  PIDS+=($!)
  SITE_PID[$policy]=$!
  SITE[$policy]="127.0.0.1:$port"
  CERTS[$policy]="$D/certs"
  ADMIN[$policy]=$(sed -n 's/^admin_addr = "\(.*\)"/\1/p' "$D/site-a.toml")
  port=$(( port + 10 ))
done
for policy in "${POLICIES[@]}"; do
  for _ in $(seq 1 50); do
    "$BIN" status --site "${SITE[$policy]}" --certs "${CERTS[$policy]}" --timeout-ms 500 >/dev/null 2>&1 && break
    sleep 0.1
  done
done

load() {  # POLICY WRITERS
  "$BIN" bench load --site "${SITE[$1]}" --certs "${CERTS[$1]}" --seconds "$SECONDS_PER_RUN" \
    --concurrency "$2" --read-ratio 0 --value-size 100 2>/dev/null
}

# One small record appended and fdatasync'ed, again and again, in the directory the sites log
# to: the disk's own write + fsync latency (microseconds, JSON). With `preallocated`, the file's
# space is allocated first (as the log does with `preallocate`), so the writes grow no file.
disk_fsync() {  # [append|preallocated]
  python3 - "$WORK/disk-probe" "${1:-append}" <<'PY'
import json, os, statistics, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
if sys.argv[2] == "preallocated":
    os.posix_fallocate(fd, 0, 300 * 150)
    os.fsync(fd)
lat = []
for _ in range(300):
    t = time.perf_counter()
    os.write(fd, b"x" * 150)
    os.fdatasync(fd)
    lat.append((time.perf_counter() - t) * 1e6)
os.close(fd)
os.unlink(sys.argv[1])
lat.sort()
print(json.dumps({"p50_us": lat[len(lat) // 2], "mean_us": statistics.mean(lat),
                  "p99_us": lat[int(len(lat) * 0.99)]}, separators=(",", ":")))
PY
}

# Group commit as a site's /metrics saw it between two scrapes (M0, M1) around one load: a JSON
# line, ROW (a JSON object) with its "report" set.
metrics_delta() {  # M0 M1 ROW
  python3 - "$1" "$2" "$3" "$SECONDS_PER_RUN" <<'PY'
import json, sys
def parse(path):
    out = {}
    for line in open(path):
        if line and not line.startswith("#") and " " in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out
a, b = parse(sys.argv[1]), parse(sys.argv[2])
d = lambda k: b.get(k, 0.0) - a.get(k, 0.0)
secs = float(sys.argv[4])
row = json.loads(sys.argv[3])
commits = d("causalkv_wal_commits_total")
stage = lambda s: d(f'causalkv_put_stage_seconds_sum{{stage="{s}"}}') / max(d(f'causalkv_put_stage_seconds_count{{stage="{s}"}}'), 1) * 1e6
row["report"] = {
    "fsyncs_per_s": d("causalkv_wal_fsyncs_total") / secs,
    "records_per_fsync": d("causalkv_wal_committed_records_total") / max(commits, 1),
    "fsync_mean_us": d("causalkv_wal_fsync_duration_seconds_sum") / max(d("causalkv_wal_fsync_duration_seconds_count"), 1) * 1e6,
    "stage_mean_us": {s: stage(s) for s in ("apply", "log", "wake", "reply")}}
print(json.dumps(row, separators=(",", ":")))
PY
}

if [ -n "$AB" ]; then
  TICK_HZ=$(getconf CLK_TCK)
  for round in $(seq 1 "$ROUNDS"); do
    echo "round $round/$ROUNDS: ${POLICIES[*]} x 1/16/64 writers..." >&2
    for c in 1 16 64; do
      for mode in append preallocated; do
        DISK=$(disk_fsync "$mode")
        echo "{\"round\":$round,\"kind\":\"disk\",\"mode\":\"$mode\",\"writers\":$c,\"report\":$DISK}" >> "$RAW"
      done
      for policy in "${POLICIES[@]}"; do
        curl -s "http://${ADMIN[$policy]}/metrics" > "$WORK/m0"
        t0=$(cpu_ticks "${SITE_PID[$policy]}")
        R=$(load "$policy" "$c")
        t1=$(cpu_ticks "${SITE_PID[$policy]}")
        curl -s "http://${ADMIN[$policy]}/metrics" > "$WORK/m1"
        M=$(metrics_delta "$WORK/m0" "$WORK/m1" '{}')
        echo "{\"round\":$round,\"policy\":\"$policy\",\"writers\":$c,\"report\":$R,\"metrics\":$M,\"site_cpu_ticks\":$(( t1 - t0 )),\"tick_hz\":$TICK_HZ}" >> "$RAW"
      done
    done
  done
  python3 - "$RAW" "$OUT/$AB_FILE" "$SECONDS_PER_RUN" "$ROUNDS" "$AB" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
disk = [r for r in rows if r.get("kind") == "disk"]
rows = [r for r in rows if r.get("kind") != "disk"]
secs = float(sys.argv[3])
pols = list(dict.fromkeys(r["policy"] for r in rows))
med = lambda v: sorted(v)[len(v) // 2]
L = [f"# `[storage]` settings under fsync=always: {sys.argv[4]} interleaved rounds of {secs:.0f} s",
     "", f"Variants: `{sys.argv[5].strip()}`. One site per variant, 100-byte puts; `never` is the same load",
     "with fsync=never.", "",
     "| writers | setting | puts/s per round | median | x never | p50 us (median) | fsync mean us (median) | records per fsync (median) | site CPU us per put (median) |",
     "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
for c in (1, 16, 64):
    never = med([r["report"]["ops"] / secs for r in rows if r["writers"] == c and r["policy"] == "never"])
    for p in pols:
        full = [r for r in rows if r["writers"] == c and r["policy"] == p]
        rs = [r["report"] for r in full]
        ms = [r["metrics"] for r in full]
        v = [x["ops"] / secs for x in rs]
        L.append(f"| {c} | {p} | {', '.join(f'{x:,.0f}' for x in v)} | {med(v):,.0f} | {med(v) / never:.2f} | "
                 f"{med([x['put']['p50_us'] for x in rs]):,} | "
                 f"{med([m['report']['fsync_mean_us'] for m in ms]):,.0f} | {med([m['report']['records_per_fsync'] for m in ms]):.1f} | "
                 f"{med([r['site_cpu_ticks'] / r['tick_hz'] * 1e6 / max(r['report']['ops'], 1) for r in full]):.1f} |")
L += ["", "The disk's own write(2) + fdatasync of 150 bytes, 300 times before each writer count's loads:", "",
      "| file | p50 us per round | median |", "|---|---|---:|"]
for mode in ("append", "preallocated"):
    v = [r["report"]["p50_us"] for r in disk if r["mode"] == mode]
    L.append(f"| {mode} | {', '.join(f'{x:,.0f}' for x in v)} | {med(v):,.0f} |")
open(sys.argv[2], "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
  cp "$RAW" "$OUT/${AB_FILE%.md}.jsonl"
  exit 0
fi

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

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS: disk fsync loop, bare QUIC, causalkv always/batch/never x 1/16/64 writers, redis -c 1/-c 50..." >&2
  STEAL0=$(steal_mark)
  FLOOR=$("$BIN" bench transport-floor --processes --messages 10000 --pings 1000 2>/dev/null)
  echo "{\"round\":$round,\"kind\":\"floor\",\"report\":$FLOOR}" >> "$RAW"
  for c in 1 16 64; do
    # The disk's latency changes from second to second on a shared machine: probe it right
    # before the loads it is compared with.
    DISK=$(disk_fsync)
    echo "{\"round\":$round,\"kind\":\"disk\",\"writers\":$c,\"report\":$DISK}" >> "$RAW"
    for policy in always batch never; do
      if [ "$policy" = always ] && [ "$c" = 64 ]; then
        curl -s "http://${ADMIN[always]}/metrics" > "$WORK/m0"
      fi
      R=$(load "$policy" "$c")
      echo "{\"round\":$round,\"kind\":\"causalkv\",\"policy\":\"$policy\",\"writers\":$c,\"report\":$R}" >> "$RAW"
      if [ "$policy" = always ] && [ "$c" = 64 ]; then
        curl -s "http://${ADMIN[always]}/metrics" > "$WORK/m1"
        metrics_delta "$WORK/m0" "$WORK/m1" "{\"round\":$round,\"kind\":\"metrics\"}" >> "$RAW"
      fi
    done
  done
  R1=$("${RB[@]}" -c 1 -n $(( SECONDS_PER_RUN * 1000 )))
  R50=$("${RB[@]}" -c 50 -n $(( SECONDS_PER_RUN * 8000 )))
  python3 - "$round" "$R1" "$R50" >> "$RAW" <<'PY'
import csv, io, json, sys
row = lambda text: next(csv.DictReader(io.StringIO(text)))
for c, text in ((1, sys.argv[2]), (50, sys.argv[3])):
    r = row(text)
    print(json.dumps({"round": int(sys.argv[1]), "kind": "redis", "clients": c,
                      "report": {"rps": float(r["rps"]), "p50_us": float(r.get("p50_latency_ms", 0)) * 1000}}))
PY
  echo "{\"round\":$round,\"kind\":\"steal\",\"report\":{\"pct\":$(steal_pct "$STEAL0")}}" >> "$RAW"
done

REC=null
if [ "$RECOVERY" = 1 ]; then
  echo "recovery of 1M keys + 100k tail..." >&2
  REC=$("$BIN" bench recovery --keys 1000000 --tail 100000 2>/dev/null)
fi

python3 - "$OUT" "$RAW" "$REC" "$ROUNDS" "$SECONDS_PER_RUN" <<'PY'
import json, statistics, sys
out, raw, rec, rounds, secs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = [json.loads(l) for l in open(raw)]
med = statistics.median
def kind(k, **kw):
    return [r["report"] for r in rows if r["kind"] == k and all(r.get(a) == b for a, b in kw.items())]
def one(k, **kw):
    got = kind(k, **kw)
    return got[0] if got else None
R = range(1, rounds + 1)
disk_at = lambda rd, w: one("disk", round=rd, writers=w)["p50_us"]
disk = med(r["p50_us"] for r in kind("disk"))
disk_all = {w: [round(disk_at(rd, w)) for rd in R] for w in (1, 16, 64)}
rtt_at = lambda rd: one("floor", round=rd)["ping_stream_per_request"]["p50_us"]
rtt = med(rtt_at(rd) for rd in R)
rtt_all = [rtt_at(rd) for rd in R]
ck = lambda rd, p, w: one("causalkv", round=rd, policy=p, writers=w)
tp = lambda p, w: med(r["throughput"] for r in kind("causalkv", policy=p, writers=w))
tp_all = lambda p, w: [round(r["throughput"]) for r in kind("causalkv", policy=p, writers=w)]
p50 = lambda p, w: med(r["put"]["p50_us"] for r in kind("causalkv", policy=p, writers=w))
redis = {c: med(r["rps"] for r in kind("redis", clients=c)) for c in (1, 50)}
redis_all = {c: [round(r["rps"]) for r in kind("redis", clients=c)] for c in (1, 50)}
m = kind("metrics")
gc = {k: med(r[k] for r in m) for k in ("fsyncs_per_s", "records_per_fsync", "fsync_mean_us")}
stages = {s: med(r["stage_mean_us"][s] for r in m) for s in ("apply", "log", "wake", "reply")}
fs_rounds = ", ".join(f"{r['fsync_mean_us']:,.0f}" for r in m)

steal = [r["pct"] for r in kind("steal")]
L = [f"Medians of {rounds} interleaved rounds of {secs} s per measurement, one site, 100-byte values, "
     "TLS on both sides, on a shared 2-core machine (other builds running): the figures are noisy.", "",
     f"CPU steal per round (the share of the machine's CPU time the hypervisor ran other guests "
     f"instead): {', '.join(f'{x:.1f} %' for x in steal)}.", "",
     "## The floors, measured in the same run", "",
     f"- disk: one 150-byte `write(2)` + `fdatasync` in a loop (300 of them, right before each writer count's loads): p50 **{disk:,.0f} µs** overall; per round, before 1/16/64 writers: {disk_all[1]} / {disk_all[16]} / {disk_all[64]}",
     f"- bare QUIC + mutual TLS round trip, a new stream per request: p50 **{rtt:,.0f} µs** (per round: {rtt_all})", "",
     "## Put throughput by fsync policy (puts/s) and p50 latency", "",
     "| writers | always | batch | never | always/never | batch/always | p50 always µs | p50 batch µs | p50 never µs |",
     "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for w in (1, 16, 64):
    a, b, n = tp("always", w), tp("batch", w), tp("never", w)
    L.append(f"| {w} | {a:,.0f} | {b:,.0f} | {n:,.0f} | {a/n:.2f} | {b/a:.2f} | {p50('always', w):,.0f} | {p50('batch', w):,.0f} | {p50('never', w):,.0f} |")
L += ["", "Per round, puts/s: " + "; ".join(f"{p} {w}: {tp_all(p, w)}" for w in (1, 16, 64) for p in ("always", "batch", "never")), "",
      "## Against Redis `appendfsync always` (TLS, `redis-benchmark -t set`)", "",
      "| load | causalkv always puts/s | Redis SET/s | ratio |", "|---|---:|---:|---:|",
      f"| 1 writer vs redis -c 1 | {tp('always', 1):,.0f} | {redis[1]:,.0f} | {tp('always', 1)/redis[1]:.2f} |",
      f"| 16 writers vs redis -c 50 | {tp('always', 16):,.0f} | {redis[50]:,.0f} | {tp('always', 16)/redis[50]:.2f} |",
      f"| 64 writers vs redis -c 50 | {tp('always', 64):,.0f} | {redis[50]:,.0f} | {tp('always', 64)/redis[50]:.2f} |",
      "", f"Redis per round: -c 1 {redis_all[1]}, -c 50 {redis_all[50]}.", "",
      "## Group commit at 64 writers (fsync=always, from the site's /metrics)", "",
      f"- {gc['fsyncs_per_s']:,.0f} fsyncs/s, **{gc['records_per_fsync']:.1f} records per fsync**, fsync mean {gc['fsync_mean_us']:,.0f} µs "
      f"(per round: {fs_rounds} µs)",
      "- where a put spends its time (mean µs): " + ", ".join(f"{s} {v:,.0f}" for s, v in stages.items()),
      "  (apply: request to log record queued; log: queued to fsynced; wake: fsynced to the request "
      "running again; reply: to the response written)", "",
      "## Targets", "",
      "Each checked per round against that round's own measurements (the disk loop run just before "
      "the loads); the figure is the median over rounds, with every round's value after it.", "",
      "| target | median | per round | met (median) |", "|---|---|---|---|"]
def target(name, values, ok, fmt="{:.2f}x"):
    m = med(values)
    L.append(f"| {name} | {fmt.format(m)} | {', '.join(fmt.format(v) for v in values)} | {'yes' if ok(m) else '**no**'} |")
redis_at = lambda rd, c: one("redis", round=rd, clients=c)["rps"]
target("64 writers: always / never >= 0.6", [ck(rd, "always", 64)["throughput"] / ck(rd, "never", 64)["throughput"] for rd in R], lambda m: m >= 0.6)
target("64 writers: always / Redis -c 50 >= 2", [ck(rd, "always", 64)["throughput"] / redis_at(rd, 50) for rd in R], lambda m: m >= 2)
target("64 writers: always p50 / disk fsync p50 <= 3", [ck(rd, "always", 64)["put"]["p50_us"] / disk_at(rd, 64) for rd in R], lambda m: m <= 3)
target("1 writer: always p50 / (QUIC RTT + disk fsync) <= 1.1", [ck(rd, "always", 1)["put"]["p50_us"] / (rtt_at(rd) + disk_at(rd, 1)) for rd in R], lambda m: m <= 1.1)
for w in (1, 16, 64):
    target(f"{w} writers: batch / always >= 1", [ck(rd, "batch", w)["throughput"] / ck(rd, "always", w)["throughput"] for rd in R], lambda m: m >= 1)
if rec:
    L += ["", "## Recovery and disk use", "",
          f"- recovery of {rec['snapshot_keys']:,} keys (snapshot) + {rec['tail_records']:,} log records: **{rec['recovery_seconds']:.2f} s**",
          f"- log on disk before the snapshot: {rec['log_bytes_before_snapshot']/1e6:.0f} MB; after pruning (tail included): {rec['log_bytes_after_pruning']/1e6:.0f} MB; snapshot file {rec['snapshot_bytes']/1e6:.0f} MB"]
md = "\n".join(L)
open(f"{out}/results.md", "w").write(md + "\n")
with open(f"{out}/results.json", "w") as f:  # one measurement per line
    f.write('{"recovery": ' + json.dumps(rec) + ',\n "rounds": [\n  ')
    f.write(",\n  ".join(json.dumps(r) for r in rows) + "\n]}\n")
print(md)
PY
