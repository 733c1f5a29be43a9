#!/usr/bin/env bash
# Partitioned sites, side by side with unpartitioned ones, in interleaved rounds of one run.
#
#   ROUNDS=3 bash scripts/bench-partitions.sh [--seconds N] [--out DIR]
#
# Every configuration runs as separate `causalkv serve` processes on loopback (laid out by
# `causalkv dev --layout-only --partitions P`). Each round runs every measurement for P = 1 and
# P = 2 back to back (the order alternates between rounds), so both see the same machine; the
# tables give the median over the rounds and every round's P = 2 / P = 1 ratio:
#   - throughput, 1 site and 3 sites replicating to each other: `causalkv bench load
#     --partitions P` at site a with 64 requests in flight, 50 % reads, 100 B values,
#     fsync = "never" (this measures CPU, not the disk), and the servers' CPU time;
#   - operations per server CPU-second at the same load, 1 site and 3 sites: the same `bench
#     load` paced at SAME_RATE ops/s (default 20,000, below what either configuration
#     saturates at here), so P = 1 and P = 2 serve the same operations; with the sibling
#     contribution frames per second each load caused;
#     at three sites, also by site, and once more for P = 2 with the sibling exchange slowed to
#     one contribution per SLOW_EXCHANGE_MS (default 20) ms, to show its share;
#   - the transport's floor at that load: `causalkv bench partition-floor --servers P` spreads
#     SAME_RATE bare QUIC request/responses (a new stream each, the same mutual TLS and framing,
#     64 workers) over P echo processes with nothing behind them, and reports their CPU time:
#     what a second serving process costs before any store, log or sibling exchange; and with
#     `--threads`, two serving threads of one process;
#   - the idle cost of partitioning, 3 sites: the servers' CPU time and the bytes of sibling
#     contributions (`causalkv_sibling_bytes_out_total`) over IDLE seconds (default 3) before
#     the load starts;
#   - remote visibility latency, 3 sites, default fsync (= always): `causalkv bench
#     visibility-wan` writes a fresh key at a every 10 ms and polls b and c (fresh sessions)
#     every 200 µs; ack at a → visible at b / c; once on an idle cluster and once while `bench
#     load` adds 2,000 ops/s at a (16 sessions, half writes).
# Writes results.md and results.json into the output folder and prints the table with ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=5
OUT=results/partitions
ROUNDS=${ROUNDS:-3}
IDLE=${IDLE:-3}
SAME_RATE=${SAME_RATE:-20000}
SLOW_EXCHANGE_MS=${SLOW_EXCHANGE_MS:-20}
parse_seconds_out "$@"
start_work

RESULTS="$WORK/results"
mkdir -p "$RESULTS"

# metric_sum NAME BASE NODES: the sum over every node of the counter NAME (`/metrics`).
metric_sum() {
  local name=$1 base=$2 nodes=$3 t=0 v
  for n in $(seq 0 $(( nodes - 1 ))); do
    v=$(curl -s "http://127.0.0.1:$(( base + 1000 + n ))/metrics" \
        | awk -v k="$name" '$1 == k {print $2}')
    t=$(( t + ${v:-0} ))
  done
  echo "$t"
}
sibling_bytes() { metric_sum causalkv_sibling_bytes_out_total "$@"; }
sibling_frames() { metric_sum causalkv_sibling_contributions_out_total "$@"; }

# run_config NAME SITES P FSYNC ROUND [EXCHANGE_MS]: starts the nodes, runs the measurements
# (into files NAME.rROUND.*), stops the nodes. With EXCHANGE_MS, the nodes send sibling
# contributions at most 3 per that many ms, and only the same-load measurement runs.
run_config() {
  local name=$1 sites=$2 parts=$3 fsync=$4 round=$5 exchange=${6:-}
  # UDP ports from base, admin (TCP) from base + 1000: both below the ephemeral range (32768).
  local dir="$WORK/$name.r$round" base=$(( 20000 + RANDOM % 10000 ))
  local out="$RESULTS/$name.r$round"
  "$BIN" dev --layout-only --dir "$dir" --port "$base" --sites "$sites" --partitions "$parts" \
    > "$dir.files"
  local pids=()
  while read -r f; do
    [ "$fsync" = never ] && sed -i 's/^fsync = .*/fsync = "never"/' "$f"
    [ -n "$exchange" ] && sed -i "s/^stable_exchange_ms = .*/stable_exchange_ms = $exchange/" "$f"
    "$BIN" serve --config "$f" 2>"${f%.toml}.log" &
    pids+=($!)
    PIDS+=($!)
  done < "$dir.files"
  local certs="$dir/certs" a="127.0.0.1:$base"
  local b="127.0.0.1:$(( base + parts ))" c="127.0.0.1:$(( base + 2 * parts ))"
  # Every node up and, with several sites, linked to its peers.
  local want=$(( sites - 1 ))
  for _ in $(seq 1 200); do
    for p in "${pids[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        echo "a node of $name exited at start:" >&2
        tail -n 3 "$dir"/*.log >&2
        exit 1
      fi
    done
    local ok=1
    for p in $(seq 0 $(( sites * parts - 1 ))); do
      local st
      st=$("$BIN" status --site "127.0.0.1:$(( base + p ))" --certs "$certs" --json 2>/dev/null) || { ok=0; break; }
      [ "$(grep -o '"state":"up"' <<<"$st" | wc -l)" -ge "$want" ] || { ok=0; break; }
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  if [ "$sites" -ge 3 ] && [ "$fsync" = never ] && [ -z "$exchange" ]; then
    echo "  $name (round $round): idle for ${IDLE} s..." >&2
    local i0 i1 b0 b1
    i0=$(cpu_ticks "${pids[@]}"); b0=$(sibling_bytes "$base" $(( sites * parts )))
    sleep "$IDLE"
    i1=$(cpu_ticks "${pids[@]}"); b1=$(sibling_bytes "$base" $(( sites * parts )))
    echo "{\"seconds\": $IDLE, \"cpu_ticks\": $(( i1 - i0 )), \"sibling_bytes\": $(( b1 - b0 ))}" \
      > "$out.idle.json"
  fi
  if [ "$sites" -ge 3 ] && [ "$fsync" != never ]; then
    local vis=("$BIN" bench visibility-wan --site "$a" --site "$b" --site "$c" --partitions "$parts"
               --certs "$certs" --writes 400 --interval-ms 10 --poll-us 200)
    echo "  $name (round $round): visibility, idle (400 writes)..." >&2
    "${vis[@]}" 2>/dev/null > "$out.vis.json"
    echo "  $name (round $round): visibility under 2,000 ops/s of load at a..." >&2
    "$BIN" bench load --site "$a" --partitions "$parts" --certs "$certs" --seconds 6 \
      --concurrency 16 --rate 2000 --read-ratio 0.5 --value-size 100 2>/dev/null \
      > "$out.bg.json" &
    local bg=$!
    sleep 0.5
    "${vis[@]}" 2>/dev/null > "$out.visload.json"
    wait "$bg"
  fi
  local nodes=$(( sites * parts ))
  # measure_load KIND [ARGS...]: `bench load` at a (64 in flight, 50 % reads) into
  # NAME.rROUND.KIND.json, with the servers' CPU ticks (in all, and per node in site order)
  # and the sibling frames it took.
  measure_load() {
    local kind=$1 f0 f1 p n0=() n1=()
    shift
    for p in "${pids[@]}"; do n0+=("$(cpu_ticks "$p")"); done
    f0=$(sibling_frames "$base" "$nodes")
    "$BIN" bench load --site "$a" --partitions "$parts" --certs "$certs" \
      --seconds "$SECONDS_PER_RUN" --concurrency 64 --read-ratio 0.5 --value-size 100 "$@" \
      2>/dev/null > "$out.$kind.json"
    for p in "${pids[@]}"; do n1+=("$(cpu_ticks "$p")"); done
    f1=$(sibling_frames "$base" "$nodes")
    # The total is the nodes' sum: one reading of each node at each end.
    local per=() i total=0
    for i in "${!pids[@]}"; do per+=("$(( n1[i] - n0[i] ))"); total=$(( total + n1[i] - n0[i] )); done
    echo "{\"cpu_ticks\": $total, \"node_ticks\": [$(IFS=,; echo "${per[*]}")], \"sibling_frames\": $(( f1 - f0 ))}" \
      > "$out.$kind.cost.json"
  }
  if [ -z "$exchange" ]; then
    echo "  $name (round $round): load (64 in flight, ${SECONDS_PER_RUN} s)..." >&2
    measure_load load
  fi
  if [ "$fsync" = never ]; then
    echo "  $name (round $round): the same load, ${SAME_RATE} ops/s (${SECONDS_PER_RUN} s)..." >&2
    measure_load rate --rate "$SAME_RATE"
  fi
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

echo "partitions benchmark: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
STEAL0=$(steal_mark)
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  if [ $(( round % 2 )) = 1 ]; then order="1 2"; else order="2 1"; fi
  for p in $order; do run_config "one-site-p$p" 1 "$p" never "$round"; done
  for v in $order t; do
    # v: 1 or 2 serving processes, or t: two serving threads of one process.
    floor_args=(--servers "${v/t/2}")
    [ "$v" = t ] && floor_args+=(--threads)
    echo "  floor-p$v (round $round): bare QUIC, ${SAME_RATE} requests/s (${floor_args[*]})..." >&2
    "$BIN" bench partition-floor "${floor_args[@]}" --rate "$SAME_RATE" --concurrency 64 \
      --seconds "$SECONDS_PER_RUN" 2>/dev/null > "$RESULTS/floor-p$v.r$round.floor.json"
  done
  for p in $order; do run_config "three-sites-p$p" 3 "$p" never "$round"; done
  run_config "three-sites-p2-slow" 3 2 never "$round" "$SLOW_EXCHANGE_MS"
  for p in $order; do run_config "vis-p$p" 3 "$p" always "$round"; done
done
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)
STEAL=$(steal_pct "$STEAL0")

mkdir -p "$OUT"
SAME_RATE=$SAME_RATE STEAL=$STEAL python3 - "$OUT" "$RESULTS" "$(nproc)" "$LOAD_BEFORE" "$LOAD_AFTER" "ROUNDS=$ROUNDS bash scripts/bench-partitions.sh $*" "$(getconf CLK_TCK)" "$ROUNDS" <<'PY'
import json, os, statistics, sys
out, res, cpus, before, after, cmd, tck, rounds = sys.argv[1:]
tck, R = int(tck), range(1, int(rounds) + 1)
def load(name, r, kind):
    return json.load(open(os.path.join(res, f"{name}.r{r}.{kind}.json")))
def cost(name, r, kind):
    return load(name, r, f"{kind}.cost")
def cpu(name, r, kind="load"):
    return cost(name, r, kind)["cpu_ticks"] / tck
med = statistics.median
lines = ["# Partitions: P = 1 against P = 2", "",
         f"Command: `{cmd}` ({cpus} CPUs, load average before {before}, after {after}; "
         f"CPU steal {os.environ['STEAL']} % of the machine's CPU time over the run). "
         f"Medians over {rounds} interleaved rounds; each round runs P = 1 and P = 2 back to back "
         "(order alternating), and the ratio columns list every round's P = 2 / P = 1.", "",
         "## Throughput (64 requests in flight, 50 % reads, 100 B values, fsync never)", "",
         "| sites | P | ops/s | put p50 (µs) | put p99 (µs) | server cores busy | ops per server CPU-second | ops/s P=2/P=1 per round | ops per CPU-s P=2/P=1 per round |",
         "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
summary = {}
for sites, pre in [(1, "one-site"), (3, "three-sites")]:
    per = {}
    for p in (1, 2):
        rows = [load(f"{pre}-p{p}", r, "load") for r in R]
        c = [cpu(f"{pre}-p{p}", r) for r in R]
        per[p] = dict(tput=[x["throughput"] for x in rows],
                      eff=[x["ops"] / ci for x, ci in zip(rows, c)],
                      busy=[ci / x["seconds"] for x, ci in zip(rows, c)],
                      p50=[x["put"]["p50_us"] for x in rows], p99=[x["put"]["p99_us"] for x in rows])
    for p in (1, 2):
        d = per[p]
        rt = ", ".join(f"{a / b:.2f}" for a, b in zip(per[2]["tput"], per[1]["tput"])) if p == 2 else ""
        re_ = ", ".join(f"{a / b:.2f}" for a, b in zip(per[2]["eff"], per[1]["eff"])) if p == 2 else ""
        lines.append(f"| {sites} | {p} | {med(d['tput']):,.0f} | {med(d['p50']):,} | {med(d['p99']):,} | "
                     f"{med(d['busy']):.2f} | {med(d['eff']):,.0f} | {rt} | {re_} |")
    summary[pre] = {"throughput_ratio": med(per[2]["tput"]) / med(per[1]["tput"]),
                    "cpu_efficiency_ratio": med([a / b for a, b in zip(per[2]["eff"], per[1]["eff"])])}
lines += ["", "Server cores busy: CPU time of every `causalkv serve` process of the configuration during the "
          "load, per second. The load generator (one more process) shares the same cores.", ""]
rate = os.environ.get("SAME_RATE", "20000")
lines += [f"## The same load ({int(rate):,} ops/s offered, 64 in flight, 50 % reads, fsync never)", "",
          "| sites | P | ops/s | server cores busy | ops per server CPU-second | sibling frames/s | "
          "ops per CPU-s P=2/P=1 per round |", "|---:|---:|---:|---:|---:|---:|---|"]
for sites, pre in [(1, "one-site"), (3, "three-sites")]:
    per = {}
    for p in (1, 2):
        rows = [load(f"{pre}-p{p}", r, "rate") for r in R]
        c = [cpu(f"{pre}-p{p}", r, "rate") for r in R]
        per[p] = dict(tput=[x["throughput"] for x in rows],
                      eff=[x["ops"] / ci for x, ci in zip(rows, c)],
                      busy=[ci / x["seconds"] for x, ci in zip(rows, c)],
                      frames=[cost(f"{pre}-p{p}", r, "rate")["sibling_frames"] / x["seconds"]
                              for r, x in zip(R, rows)])
    for p in (1, 2):
        d = per[p]
        re_ = ", ".join(f"{a / b:.2f}" for a, b in zip(per[2]["eff"], per[1]["eff"])) if p == 2 else ""
        lines.append(f"| {sites} | {p} | {med(d['tput']):,.0f} | {med(d['busy']):.2f} | {med(d['eff']):,.0f} | "
                     f"{med(d['frames']):,.0f} | {re_} |")
    summary[pre]["same_load_cpu_efficiency_ratio"] = med([a / b for a, b in zip(per[2]["eff"], per[1]["eff"])])
    summary[pre]["same_load_sibling_frames_per_s"] = med(per[2]["frames"])
# Three sites by site, and P = 2 with the sibling exchange slowed.
slow_ms = os.environ.get("SLOW_EXCHANGE_MS", "20")
def by_site(name, r, parts):
    x, t = load(name, r, "rate"), cost(name, r, "rate")["node_ticks"]
    return [sum(t[s * parts:(s + 1) * parts]) / tck / x["seconds"] for s in range(3)]
lines += ["", "Three sites at the same load, server cores busy by site (a takes the load; b and c "
          "only receive a's writes), and P = 2 with sibling contributions at most 3 per "
          f"{slow_ms} ms instead of 3 per 1 ms:", "",
          "| configuration | site a | site b | site c | all | ops per server CPU-second | sibling frames/s | "
          "ops per CPU-s / P=1 per round |", "|---|---:|---:|---:|---:|---:|---:|---|"]
rows = {}
for label, name, parts in [("P = 1", "three-sites-p1", 1), ("P = 2", "three-sites-p2", 2),
                           (f"P = 2, exchange {slow_ms} ms", "three-sites-p2-slow", 2)]:
    xs = [load(name, r, "rate") for r in R]
    eff = [x["ops"] / cpu(name, r, "rate") for r, x in zip(R, xs)]
    rows[name] = eff
    sites_ = [med([by_site(name, r, parts)[i] for r in R]) for i in range(3)]
    frames = med([cost(name, r, "rate")["sibling_frames"] / x["seconds"] for r, x in zip(R, xs)])
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(eff, rows["three-sites-p1"])) if parts == 2 else ""
    lines.append(f"| {label} | {sites_[0]:.2f} | {sites_[1]:.2f} | {sites_[2]:.2f} | {sum(sites_):.2f} | "
                 f"{med(eff):,.0f} | {frames:,.0f} | {ratios} |")
summary["three-sites"]["same_load_slow_exchange_cpu_efficiency_ratio"] = med(
    [a / b for a, b in zip(rows["three-sites-p2-slow"], rows["three-sites-p1"])])
floor = {v: [load(f"floor-p{v}", r, "floor") for r in R] for v in ("1", "2", "t")}
floor_eff = {v: [x["requests_per_server_cpu_s"] for x in floor[v]] for v in floor}
floor_ratios = {v: [a / b for a, b in zip(floor_eff[v], floor_eff["1"])] for v in ("2", "t")}
summary["floor_same_load_cpu_efficiency_ratio"] = med(floor_ratios["2"])
summary["floor_threads_same_load_cpu_efficiency_ratio"] = med(floor_ratios["t"])
lines += ["", f"## The transport's floor at the same load ({int(rate):,} requests/s offered, bare QUIC echo)", "",
          "| serving ends | requests/s | p50 (µs) | server cores busy | requests per server CPU-second | "
          "/ one process, per round |", "|---|---:|---:|---:|---:|---|"]
for v, label in [("1", "1 process"), ("2", "2 processes"), ("t", "2 threads of 1 process")]:
    xs = floor[v]
    ratios = ", ".join(f"{x:.2f}" for x in floor_ratios[v]) if v != "1" else ""
    lines.append(f"| {label} | {med([x['requests'] / x['seconds'] for x in xs]):,.0f} | "
                 f"{med([x['latency']['p50_us'] for x in xs]):,} | "
                 f"{med([x['server_cpu_seconds'] / x['seconds'] for x in xs]):.2f} | "
                 f"{med(floor_eff[v]):,.0f} | {ratios} |")
lines += ["", "`causalkv bench partition-floor --servers N [--threads]`: the same paced load as above, each "
          "request a new bidirectional stream with the product's mutual TLS and framing, spread at random over "
          "N echo servers (each with its own runtime, endpoint and connection; separate processes, or threads "
          "of one process) with no store, log or sibling exchange behind them. Its ratio to one process is "
          "what a second serving end costs in the transport alone on this machine.", ""]
lines += ["## Idle cost (3 sites, no load)", "",
          "| P | server CPU (cores) | sibling contribution bytes/s (all nodes) |", "|---:|---:|---:|"]
idle = {}
for p in (1, 2):
    xs = [load(f"three-sites-p{p}", r, "idle") for r in R]
    idle[p] = dict(cpu=med([x["cpu_ticks"] / tck / x["seconds"] for x in xs]),
                   bytes=med([x["sibling_bytes"] / x["seconds"] for x in xs]))
    lines.append(f"| {p} | {idle[p]['cpu']:.3f} | {idle[p]['bytes']:,.0f} |")
lines += ["", "## Remote visibility (3 sites, fsync always, a write every 10 ms at a; ack → visible)", "",
          "| P | load at a | worst-site p50 (ms) | worst-site p99 (ms) | max (ms) | timeouts | p99 P=2/P=1 per round |",
          "|---:|---|---:|---:|---:|---:|---|"]
def worst(x, q):
    return max(s["latency"][q] for s in x["sites"]) / 1000
vis = {}
for label, kind in [("idle", "vis"), ("2,000 ops/s", "visload")]:
    per = {p: [load(f"vis-p{p}", r, kind) for r in R] for p in (1, 2)}
    for p in (1, 2):
        xs = per[p]
        ratios = ", ".join(f"{worst(a, 'p99_us') / worst(b, 'p99_us'):.2f}" for a, b in zip(per[2], per[1])) if p == 2 else ""
        lines.append(f"| {p} | {label} | {med([worst(x, 'p50_us') for x in xs]):.2f} | "
                     f"{med([worst(x, 'p99_us') for x in xs]):.2f} | {max(worst(x, 'max_us') for x in xs):.2f} | "
                     f"{sum(s['timeouts'] for x in xs for s in x['sites'])} | {ratios} |")
    vis[label] = med([worst(a, "p99_us") / worst(b, "p99_us") for a, b in zip(per[2], per[1])])
lines += ["",
          f"- Visibility p99, P = 2 / P = 1 (median of the per-round ratios): idle {vis['idle']:.2f}, "
          f"under 2,000 ops/s {vis['2,000 ops/s']:.2f}.",
          f"- Operations per server CPU-second, P = 2 / P = 1: one site {summary['one-site']['cpu_efficiency_ratio']:.2f}, "
          f"three sites {summary['three-sites']['cpu_efficiency_ratio']:.2f}; at the same load "
          f"({int(rate):,} ops/s) one site {summary['one-site']['same_load_cpu_efficiency_ratio']:.2f}, "
          f"three sites {summary['three-sites']['same_load_cpu_efficiency_ratio']:.2f}.",
          f"- The transport's floor at the same load, 2 serving processes / 1: {summary['floor_same_load_cpu_efficiency_ratio']:.2f} "
          f"(2 threads of one process / 1: {summary['floor_threads_same_load_cpu_efficiency_ratio']:.2f}); "
          f"one site's P = 2 / P = 1 is {summary['one-site']['same_load_cpu_efficiency_ratio'] / summary['floor_same_load_cpu_efficiency_ratio']:.2f}× the floor's.",
          f"- Three sites at the same load with the sibling exchange at most 3 per {slow_ms} ms: P = 2 / P = 1 "
          f"{summary['three-sites']['same_load_slow_exchange_cpu_efficiency_ratio']:.2f} "
          f"(with 3 per 1 ms: {summary['three-sites']['same_load_cpu_efficiency_ratio']:.2f}).",
          f"- Idle cost of P = 2 over P = 1 at three sites: {idle[2]['cpu'] - idle[1]['cpu']:+.3f} cores of server CPU, "
          f"{idle[2]['bytes']:,.0f} bytes/s of sibling contributions."]
md = "\n".join(lines)
open(os.path.join(out, "results.md"), "w").write(md + "\n")
json.dump({"summary": summary, "idle": idle, "visibility_p99_ratio": vis},
          open(os.path.join(out, "results.json"), "w"), indent=1)
print(md)
PY
