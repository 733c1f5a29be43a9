#!/usr/bin/env bash
# Partitioned sites, side by side with unpartitioned ones, in one run.
#
#   bash scripts/bench-partitions.sh [--seconds N] [--out DIR]
#
# Every configuration runs as separate `causalkv serve` processes on loopback (laid out by
# `causalkv dev --layout-only --partitions P`), one after the other:
#   - throughput, 1 site, P = 1 and P = 2: `causalkv bench load --partitions P` with 64
#     requests in flight, 50 % reads, 100 B values, fsync = "never" (this measures CPU, not the
#     disk);
#   - throughput, 3 sites replicating to each other, P = 1 and P = 2, the same load at site a;
#   - remote visibility latency, 3 sites, P = 1 and P = 2, default fsync (= always):
#     `causalkv bench visibility-wan` writes a fresh key at a every 10 ms and polls b and c
#     (fresh sessions) every 200 µs; ack at a → visible at b / c; once on an idle cluster and
#     once while `bench load` adds 2,000 ops/s at a (16 sessions, half writes).
# Writes results.md and results.json into the output folder and prints the table with ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=5
OUT=results/partitions
parse_seconds_out "$@"
start_work

RESULTS="$WORK/results"
mkdir -p "$RESULTS"

# cpu_ticks PID...: user + system CPU time of the processes, in clock ticks.
cpu_ticks() {
  local t=0
  for p in "$@"; do
    t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
  done
  echo "$t"
}

# run_config NAME SITES P FSYNC: starts the nodes, runs the measurements, stops the nodes.
run_config() {
  local name=$1 sites=$2 parts=$3 fsync=$4
  local dir="$WORK/$name" base=$(( 20000 + RANDOM % 20000 ))
  "$BIN" dev --layout-only --dir "$dir" --port "$base" --sites "$sites" --partitions "$parts" \
    > "$dir.files"
  local pids=()
  while read -r f; do
    [ "$fsync" = never ] && sed -i 's/^fsync = .*/fsync = "never"/' "$f"
    "$BIN" serve --config "$f" 2>"${f%.toml}.log" &
    pids+=($!)
    PIDS+=($!)
  done < "$dir.files"
  local certs="$dir/certs" a="127.0.0.1:$base"
  local b="127.0.0.1:$(( base + parts ))" c="127.0.0.1:$(( base + 2 * parts ))"
  # Every node up and, with several sites, linked to its peers.
  local want=$(( sites - 1 ))
  for _ in $(seq 1 200); do
    local ok=1
    for p in $(seq 0 $(( sites * parts - 1 ))); do
      local st
      st=$("$BIN" status --site "127.0.0.1:$(( base + p ))" --certs "$certs" --json 2>/dev/null) || { ok=0; break; }
      [ "$(grep -o '"state":"up"' <<<"$st" | wc -l)" -ge "$want" ] || { ok=0; break; }
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  if [ "$sites" -ge 3 ] && [ "$fsync" != never ]; then
    local vis=("$BIN" bench visibility-wan --site "$a" --site "$b" --site "$c" --partitions "$parts"
               --certs "$certs" --writes 400 --interval-ms 10 --poll-us 200)
    echo "  $name: visibility, idle (400 writes)..." >&2
    "${vis[@]}" 2>/dev/null > "$RESULTS/$name.vis.json"
    echo "  $name: visibility under 2,000 ops/s of load at a (50 % writes, 16 sessions)..." >&2
    "$BIN" bench load --site "$a" --partitions "$parts" --certs "$certs" --seconds 6 \
      --concurrency 16 --rate 2000 --read-ratio 0.5 --value-size 100 2>/dev/null \
      > "$RESULTS/$name.bg.json" &
    local bg=$!
    sleep 0.5
    "${vis[@]}" 2>/dev/null > "$RESULTS/$name.visload.json"
    wait "$bg"
  fi
  echo "  $name: load (64 in flight, ${SECONDS_PER_RUN} s)..." >&2
  local cpu0 cpu1
  cpu0=$(cpu_ticks "${pids[@]}")
  "$BIN" bench load --site "$a" --partitions "$parts" --certs "$certs" --seconds "$SECONDS_PER_RUN" \
    --concurrency 64 --read-ratio 0.5 --value-size 100 2>/dev/null > "$RESULTS/$name.load.json"
  cpu1=$(cpu_ticks "${pids[@]}")
  echo "$(( cpu1 - cpu0 ))" > "$RESULTS/$name.cpu"
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

echo "partitions benchmark: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
run_config one-site-p1 1 1 never
run_config one-site-p2 1 2 never
run_config three-sites-p1 3 1 never
run_config three-sites-p2 3 2 never
run_config vis-p1 3 1 always
run_config vis-p2 3 2 always
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

mkdir -p "$OUT"
python3 - "$OUT" "$RESULTS" "$(nproc)" "$LOAD_BEFORE" "$LOAD_AFTER" "bash scripts/bench-partitions.sh $*" "$(getconf CLK_TCK)" <<'PY'
import json, os, sys
out, res, cpus, before, after, cmd, tck = sys.argv[1:]
def load(name, kind):
    return json.load(open(os.path.join(res, f"{name}.{kind}.json")))
L = {n: load(n, "load") for n in ["one-site-p1", "one-site-p2", "three-sites-p1", "three-sites-p2",
                                  "vis-p1", "vis-p2"]}
V = {n: load(n, "vis") for n in ["vis-p1", "vis-p2"]}
VL = {n: load(n, "visload") for n in ["vis-p1", "vis-p2"]}
lines = [f"# Partitions: P = 1 against P = 2", "",
         f"Command: `{cmd}` ({cpus} CPUs, load average before {before}, after {after}).", "",
         "## Throughput (64 requests in flight, 50 % reads, 100 B values, fsync never)", "",
         "| sites | P | ops/s | put p50 (µs) | put p99 (µs) | get p50 (µs) | errors | P=2 / P=1 | server cores busy | ops per server CPU-second |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
def cpu(name):
    return int(open(os.path.join(res, f"{name}.cpu")).read()) / int(tck)
for sites, pre in [(1, "one-site"), (3, "three-sites")]:
    base = L[f"{pre}-p1"]["throughput"]
    for p in (1, 2):
        r = L[f"{pre}-p{p}"]
        ratio = f"{r['throughput'] / base:.2f}" if p == 2 else ""
        c = cpu(f"{pre}-p{p}")
        lines.append(f"| {sites} | {p} | {r['throughput']:,.0f} | {r['put']['p50_us']:,} | "
                     f"{r['put']['p99_us']:,} | {r['get']['p50_us']:,} | {r['errors']} | {ratio} | "
                     f"{c / r['seconds']:.2f} | {r['ops'] / c:,.0f} |")
lines += ["", "Server cores busy: CPU time of every `causalkv serve` process of the configuration during the "
          "load, per second. The load generator (one more process) shares the same cores."]
lines += ["", "## Remote visibility (3 sites, fsync always, a write every 10 ms at a; ack → visible)", "",
          "| P | load at a | site | p50 (ms) | p99 (ms) | max (ms) | timeouts |",
          "|---:|---|---|---:|---:|---:|---:|"]
for label, src in [("idle", V), ("2,000 ops/s", VL)]:
    for p in (1, 2):
        for s in src[f"vis-p{p}"]["sites"]:
            lat = s["latency"]
            lines.append(f"| {p} | {label} | {s['site']} | {lat['p50_us'] / 1000:.2f} | "
                         f"{lat['p99_us'] / 1000:.2f} | {lat['max_us'] / 1000:.2f} | {s['timeouts']} |")
def worst(src, p, q):
    return max(s["latency"][q] for s in src[f"vis-p{p}"]["sites"]) / 1000
lines.append("")
for label, src in [("idle", V), ("under 2,000 ops/s at a", VL)]:
    lines.append(f"- {label}: visibility p99 (worst remote site) P = 2 {worst(src, 2, 'p99_us'):.2f} ms "
                 f"against P = 1 {worst(src, 1, 'p99_us'):.2f} ms, ratio "
                 f"{worst(src, 2, 'p99_us') / worst(src, 1, 'p99_us'):.2f}; p50 {worst(src, 2, 'p50_us'):.2f} "
                 f"against {worst(src, 1, 'p50_us'):.2f} ms.")
md = "\n".join(lines)
open(os.path.join(out, "results.md"), "w").write(md + "\n")
json.dump({"load": L, "visibility": V, "visibility_under_load": VL}, open(os.path.join(out, "results.json"), "w"), indent=1)
print(md)
PY
