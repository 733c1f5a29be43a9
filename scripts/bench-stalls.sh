#!/usr/bin/env bash
# Client GET latency at one site while its write-ahead log rolls segments and its snapshotter
# runs, against the same load without either (`causalkv bench stalls`).
#
#   bash scripts/bench-stalls.sh [--seconds N] [--out DIR]
#
# One site runs as a `causalkv serve` process (one `current_thread` runtime, as deployed) with
# fsync = "always", preloaded with 100,000 keys of 512 B (a snapshot of about 55 MB). Load per
# run: a writer with 16 puts in flight (values of 1-4 KiB, 5,000 keys of its own) and a reader
# doing 2,000 gets/s open loop on the preloaded keys (latency from each get's scheduled start,
# so a stalled site cannot hide queueing). The variants, interleaved in ROUNDS rounds (default
# 3), differ only in [storage]:
#   - quiet:     segment_bytes 1 TiB, no snapshot (the baseline);
#   - rolls:     segment_bytes 2 MiB, no snapshot;
#   - snapshots: segment_bytes 1 TiB, a snapshot every 1 s once the log holds 16 MiB;
#   - busy:      both (rolls, snapshots and the deletion of the segments they cover).
# Writes results.md and results.json into the output folder and prints the table.
#
# BEFORE_BIN=PATH compares two builds in the same run instead: in each of ROUNDS rounds, the
# site runs from PATH (another build's `causalkv`) and then from this build, each for quiet and
# busy, all under this build's load driver. It writes results-ab.md and results-ab.json;
# BEFORE_LABEL names the other build there (default: its path).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SECONDS_PER_RUN=5
OUT=results/stalls
ROUNDS=${ROUNDS:-3}
VARIANTS=${VARIANTS:-quiet,rolls,snapshots,busy}
parse_seconds_out "$@"
start_work
mkdir -p "$OUT"

if [ -n "${BEFORE_BIN:-}" ]; then
  for r in $(seq 1 "$ROUNDS"); do
    for build in before after; do
      site_bin=()
      [ "$build" = before ] && site_bin=(--site-bin "$BEFORE_BIN")
      echo "round $r: $build build, quiet and busy, $SECONDS_PER_RUN s each..." >&2
      if ! "$BIN" bench stalls --rounds 1 --seconds "$SECONDS_PER_RUN" --variants quiet,busy \
          "${site_bin[@]}" --out "$WORK/$build-$r.json" >/dev/null 2>"$WORK/bench.log"; then
        cat "$WORK/bench.log" >&2
        exit 1
      fi
    done
  done
  python3 - "$WORK" "$ROUNDS" "$OUT" "${BEFORE_LABEL:-$BEFORE_BIN}" <<'PY'
import json, statistics, sys
work, rounds, out, before_bin = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows, data = [], {}
for r in range(1, rounds + 1):
    for b in ("before", "after"):
        rep = json.load(open(f"{work}/{b}-{r}.json"))
        data[(b, r)] = rep
        for run in rep["runs"]:
            rows.append((r, b, run))
def p99(b, r, v):
    return next(x["get"]["p99_us"] for x in data[(b, r)]["runs"] if x["variant"] == v)
busy_q = {b: [p99(b, r, "busy") / p99(b, r, "quiet") for r in range(1, rounds + 1)] for b in ("before", "after")}
cross = [p99("after", r, "busy") / p99("before", r, "busy") for r in range(1, rounds + 1)]
fmt = lambda v: ", ".join(f"{x:.2f}" for x in v)
lines = [f"# GET latency during log rolls and snapshots: two builds in one run ({rounds} interleaved rounds)", "",
         f"`BEFORE_BIN=... bash scripts/bench-stalls.sh`, the before build being {before_bin}: the same load driver and settings as "
         "results.md (quiet: no roll, no snapshot; busy: 2 MiB segments and a snapshot every second once "
         "the log holds 16 MiB); in every round the site runs from the before build, then from this one.", "",
         "| build | busy get p99 / quiet get p99, median (every round) |", "|---|---|"]
for b in ("before", "after"):
    lines.append(f"| {b} | {statistics.median(busy_q[b]):.2f} ({fmt(busy_q[b])}) |")
lines += ["", f"after busy p99 / before busy p99: median {statistics.median(cross):.2f} ({fmt(cross)})", "",
          "| round | build | variant | get p50 µs | get p99 µs | get p99.9 µs | get max µs | puts/s | rolls | snapshots | cpu / io pressure % |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
pct = lambda v: "-" if v is None else f"{v:.0f}"
for r, b, x in rows:
    g = x["get"]
    lines.append(f"| {r} | {b} | {x['variant']} | {g['p50_us']:,} | {g['p99_us']:,} | {g['p999_us']:,} | {g['max_us']:,} | "
                 f"{x['puts_per_s']:,.0f} | {x['rolls']} | {x['snapshots']} | {pct(x['cpu_pressure_pct'])} / {pct(x['io_pressure_pct'])} |")
md = "\n".join(lines)
open(f"{out}/results-ab.md", "w").write(md + "\n")
json.dump({"before_bin": before_bin, "rounds": {f"{b}-{r}": v for (b, r), v in data.items()}},
          open(f"{out}/results-ab.json", "w"), indent=1)
print(md)
PY
  exit 0
fi

echo "causalkv bench stalls: $ROUNDS rounds of $VARIANTS, $SECONDS_PER_RUN s each..." >&2
if ! "$BIN" bench stalls --rounds "$ROUNDS" --seconds "$SECONDS_PER_RUN" --variants "$VARIANTS" \
    --out "$WORK/report.json" >/dev/null 2>"$WORK/bench.log"; then
  cat "$WORK/bench.log" >&2
  exit 1
fi

python3 - "$WORK/report.json" "$OUT" <<'PY'
import json, statistics, sys
report, out = json.load(open(sys.argv[1])), sys.argv[2]
o, runs = report["options"], report["runs"]
variants = o["variants"]
ratio = {(x["variant"], i + 1): v for x in report["ratios"] for i, v in enumerate(x["p99"])}
def med(v, key):
    return statistics.median(r[key[0]][key[1]] if isinstance(key, tuple) else r[key]
                             for r in runs if r["variant"] == v)
lines = [f"# GET latency at one site during log rolls and snapshots ({o['rounds']} interleaved rounds)", "",
         f"`bash scripts/bench-stalls.sh`: one `causalkv serve` process, fsync = \"always\", "
         f"{o['preload_keys']:,} preloaded keys of {o['preload_value_size']} B; "
         f"{o['writers']} puts in flight ({o['write_value_min']}-{o['write_value_max']} B values, "
         f"{o['write_keys']:,} keys of their own) and {o['get_rate']:,.0f} gets/s open loop on the "
         f"preloaded keys, {o['seconds']:g} s per run. rolls: segment_bytes {o['segment_bytes'] >> 20} MiB; "
         f"snapshots: every {o['snapshot_interval_ms']} ms once the log holds {o['snapshot_log_bytes'] >> 20} MiB; "
         "busy: both; quiet: neither.", "",
         "## Medians over the rounds", "",
         "| variant | get p50 µs | get p99 µs | get p99.9 µs | get max µs | puts/s | put p99 µs | rolls | snapshots | get p99 / quiet (every round) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
for v in variants:
    rr = [ratio[(v, n)] for n in range(1, o["rounds"] + 1)] if v != "quiet" else []
    rs = f"{statistics.median(rr):.2f} ({', '.join(f'{x:.2f}' for x in rr)})" if rr else "1"
    lines.append(f"| {v} | {med(v, ('get', 'p50_us')):,.0f} | {med(v, ('get', 'p99_us')):,.0f} | "
                 f"{med(v, ('get', 'p999_us')):,.0f} | {med(v, ('get', 'max_us')):,.0f} | "
                 f"{med(v, 'puts_per_s'):,.0f} | {med(v, ('put', 'p99_us')):,.0f} | "
                 f"{med(v, 'rolls'):.0f} | {med(v, 'snapshots'):.0f} | {rs} |")
lines += ["", "## Every run", "",
          "| round | variant | get p50 µs | get p99 µs | get p99.9 µs | get max µs | gets/s | puts/s | put p99 µs | rolls | snapshots | snapshot writing ms | cpu / io pressure % | get p99 / quiet |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
def pct(v):
    return "-" if v is None else f"{v:.0f}"
for r in runs:
    g, v = r["get"], r["variant"]
    rq = f"{ratio[(v, r['round'])]:.2f}" if v != "quiet" else ""
    lines.append(f"| {r['round']} | {v} | {g['p50_us']:,} | {g['p99_us']:,} | {g['p999_us']:,} | {g['max_us']:,} | "
                 f"{r['gets_per_s']:,.0f} | {r['puts_per_s']:,.0f} | {r['put']['p99_us']:,} | {r['rolls']} | "
                 f"{r['snapshots']} | {r['snapshot_write_ms']:,} | {pct(r['cpu_pressure_pct'])} / {pct(r['io_pressure_pct'])} | {rq} |")
errors = sum(r["get_errors"] + r["put_errors"] for r in runs)
lines += ["", "Get latency counts from each get's scheduled start. Rolls and snapshots are new segment and",
          "snapshot files seen by polling the data directory every 5 ms; snapshot writing ms is how long",
          "`snapshot.tmp` was seen. cpu / io pressure: share of the run's wall time during which some task",
          "of the machine waited for a CPU / for I/O (`/proc/pressure`); high values mean other work competed",
          f"with the measurement. Failed operations: {errors}."]
md = "\n".join(lines)
open(f"{out}/results.md", "w").write(md + "\n")
json.dump(report, open(f"{out}/results.json", "w"), indent=1)
print(md)
PY
