#!/usr/bin/env python3
"""The table, the verdicts and the plot of a scripts/soak.sh run: reads DIR/samples.csv,
DIR/events.csv, DIR/summary.json and (when the run has it) DIR/memory.csv, the RSS and its
anonymous part every few seconds; writes DIR/soak.md and DIR/soak.png.

    python3 scripts/soak_report.py results/soak
"""
import csv
import json
import os
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "results/soak"
S = json.load(open(os.path.join(OUT, "summary.json")))
rows = list(csv.DictReader(open(os.path.join(OUT, "samples.csv"))))
events = list(csv.DictReader(open(os.path.join(OUT, "events.csv"))))
sites = sorted({r["site"] for r in rows})
MEMORY = os.path.join(OUT, "memory.csv")
memory = list(csv.DictReader(open(MEMORY))) if os.path.exists(MEMORY) else []
has_anon = bool(rows) and "rss_anon_kb" in rows[0]


def num(v):
    return None if v in ("", None) else int(v)


def mib(b):
    return "–" if b is None else f"{b / 2**20:.1f}"


def series(site, col):
    return [(int(r["secs"]), num(r[col])) for r in rows if r["site"] == site]


def at_or_after(site, col, secs):
    """The first sample of `col` at or after `secs` with a value."""
    for t, v in series(site, col):
        if t >= secs and v is not None:
            return t, v
    return None, None


def last(site, col):
    vals = [(t, v) for t, v in series(site, col) if v is not None]
    return vals[-1] if vals else (None, None)


lines = []
p = lines.append
p(f"# Soak: {S['minutes']} minutes, 3 sites, faults on a schedule")
p("")
env = ""
if S.get("fault_secs", 150) != 150:
    env += f"SOAK_FAULT_SECS={S['fault_secs']} "
if S.get("faults", ["cut", "kill"]) != ["cut", "kill"]:
    env += f"SOAK_FAULTS={','.join(S['faults'])} "
faults = (
    f"faults every {S.get('fault_secs', 150)} s from minute 1, in turn: "
    f"{', '.join(S.get('faults', ['cut', 'kill']))} (cut: the link a <-> b for 30 s; kill: "
    "kill -9 of site c, restarted after 5 s); "
)
p(
    f"`{env}scripts/soak.sh {S['minutes']}` (seed {S['seed']}): {faults}{S['sessions']} sessions, one operation "
    f"every {S['pace_ms']} ms each (half writes of ~110 bytes, half reads) over {S['keys']} keys; "
    f"log segments of {mib(S['segment_bytes'])} MiB, a snapshot once the log holds "
    f"{mib(S['snapshot_log_bytes'])} MiB (considered every {S['snapshot_interval_ms']} ms). "
    "The sites are `causalkv serve` processes behind the WAN emulator (2-4 ms one way), on a "
    "2-core machine shared with other builds (figures are noisy)."
)
p("")
p("## Samples (every minute)")
p("")
anon_h, anon_a = (" anon MiB |", "---:|") if has_anon else ("", "")
p(f"| min | site | RSS MiB |{anon_h} fds | buffered | retained | keys | log MiB | snapshots MiB | other MiB | ops so far |")
p(f"|---:|---|---:|{anon_a}---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    rss = num(r["rss_kb"])
    anon = num(r["rss_anon_kb"]) if has_anon else None
    anon_c = (f" {'–' if anon is None else f'{anon / 1024:.1f}'} |") if has_anon else ""
    p(
        f"| {int(r['secs']) / 60:.1f} | {r['site']} | {'–' if rss is None else f'{rss / 1024:.1f}'} |{anon_c}"
        f" {r['fds'] or '–'} | {r['buffered'] or '–'} | {r['retained'] or '–'} | {r['keys'] or '–'} "
        f"| {mib(num(r['wal_bytes']))} | {mib(num(r['snapshot_bytes']))} "
        f"| {mib(num(r['other_bytes']))} | {r['ops']} |"
    )
p("")
if memory:
    every = S.get("memory_secs", "a few")
    p(f"## Memory (every {every} s)")
    p("")
    p(
        "RSS and its anonymous part (`RssAnon`: the heap; the rest is the mapped binary and "
        "libraries) from /proc/PID/status, sampled through the faults too. For each fault: each "
        "surviving site's anonymous memory just before it, its highest value in the 60 s after "
        "it, and 60 s later still."
    )
    p("")

    def mem_series(site, col):
        return [(float(m["secs"]), int(m[col])) for m in memory if m["site"] == site]

    def before(site, secs):
        vals = [v for t, v in mem_series(site, "anon_kb") if t <= secs]
        return vals[-1] if vals else None

    def peak(site, t0, t1):
        vals = [v for t, v in mem_series(site, "anon_kb") if t0 <= t <= t1]
        return max(vals) if vals else None

    def kib(v):
        return "–" if v is None else f"{v / 1024:.1f}"

    p("| s | fault | site | anon MiB before | peak within 60 s | 60 s after the peak window |")
    p("|---:|---|---|---:|---:|---:|")
    for e in events:
        if e["event"] not in ("cut", "kill"):
            continue
        t = int(e["secs"])
        for s in sites:
            if e["event"] == "kill" and s == "c":
                continue
            p(
                f"| {t} | {e['event']} | {s} | {kib(before(s, t))} | {kib(peak(s, t, t + 60))} "
                f"| {kib(before(s, t + 120))} |"
            )
    p("")
    since = " (from minute 5)" if S["minutes"] >= 10 else ""
    p(f"| site | RSS MiB min / max / end{since} | anon MiB min / max / end{since} |")
    p("|---|---:|---:|")
    for s in sites:
        rss_v = [v for t, v in mem_series(s, "rss_kb") if t >= 300 or S["minutes"] < 10]
        anon_v = [v for t, v in mem_series(s, "anon_kb") if t >= 300 or S["minutes"] < 10]
        if rss_v:
            p(
                f"| {s} | {kib(min(rss_v))} / {kib(max(rss_v))} / {kib(rss_v[-1])} "
                f"| {kib(min(anon_v))} / {kib(max(anon_v))} / {kib(anon_v[-1])} |"
            )
    p("")
p("## Faults and drains")
p("")
p("| s | event | detail |")
p("|---:|---|---|")
for e in events:
    p(f"| {e['secs']} | {e['event']} | {e['detail']} |")
p("")
p("## Verdicts")
p("")
# RSS: the end against minute 5 (or the first sample after it; the earliest one in a short run).
ref_secs = 300 if S["minutes"] >= 10 else 60
for s in sites:
    t0, r0 = at_or_after(s, "rss_kb", ref_secs)
    t1, r1 = last(s, "rss_kb")
    if r0 and r1:
        change = (r1 - r0) / r0 * 100
        ok = abs(change) <= 10
        p(
            f"- RSS of site {s}: {r0 / 1024:.1f} MiB at {t0 / 60:.1f} min, {r1 / 1024:.1f} MiB at "
            f"{t1 / 60:.1f} min ({change:+.1f} %): {'within' if ok else 'NOT within'} 10 %"
            + (" (site c restarts after each kill -9: its RSS is that of its latest start)" if s == "c" else "")
        )
    if has_anon:
        t0, a0 = at_or_after(s, "rss_anon_kb", ref_secs)
        t1, a1 = last(s, "rss_anon_kb")
        if a0 and a1:
            p(
                f"  - its anonymous part: {a0 / 1024:.1f} MiB at {t0 / 60:.1f} min, "
                f"{a1 / 1024:.1f} MiB at {t1 / 60:.1f} min ({a1 - a0:+d} kB)"
            )
# Disk: the largest log and snapshot bytes seen against the bound the settings give: the log
# is cut back once it passes snapshot_log_bytes, so it stays below that plus a segment plus
# what arrives between two snapshot checks (and what a cut peer has not acknowledged).
bound = S["snapshot_log_bytes"] + 2 * S["segment_bytes"]
for s in sites:
    wal = [v for _, v in series(s, "wal_bytes") if v is not None]
    snap = [v for _, v in series(s, "snapshot_bytes") if v is not None]
    p(
        f"- disk of site {s}: log at most {mib(max(wal))} MiB (bound {mib(bound)} MiB: "
        f"snapshot_log_bytes + 2 segments: {'within' if max(wal) <= bound else 'ABOVE'}), "
        f"snapshots at most {mib(max(snap))} MiB, at the end {mib(wal[-1])} + {mib(snap[-1])} MiB"
    )
drains = S["drains_ms"]
p(
    f"- after each of the {len(drains)} heals, with the load paused, every site's dependency buffer "
    f"and retained log reached 0 within {', '.join(f'{d} ms' for d in drains) or '–'}"
)
p(
    f"- checker: {S['checker']} ({S['history_ops']} operations: {S['acknowledged_writes']} acknowledged "
    f"writes, {S['reads']} reads, {S['unknown_writes']} writes of unknown outcome of which "
    f"{S['unknown_kept']} observed and kept; checked in {S['checker_ms']} ms): "
    f"{'passes' if S['checker_ok'] else 'FAILS'}"
)
p(
    f"- convergence: {'identical contents at every site' if S['digests_equal'] else 'CONTENTS DIFFER'} "
    f"{S['converged_ms']} ms after the load stopped; acknowledged writes lost: {S['lost_writes']}"
)
p(f"- session errors (during faults): {S['errors']}")
p("")
p("![samples](soak.png)")
open(os.path.join(OUT, "soak.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

panels = [
    ("rss_kb", "RSS (MiB)", 1 / 1024),
    ("fds", "open fds", 1),
    ("buffered", "dependency buffer (updates)", 1),
    ("retained", "retained updates", 1),
    ("wal_bytes", "log on disk (MiB)", 1 / 2**20),
    ("snapshot_bytes", "snapshots on disk (MiB)", 1 / 2**20),
]
fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
for ax, (col, title, scale) in zip(axes.flat, panels):
    for i, s in enumerate(sites):
        color = f"C{i}"
        if col == "rss_kb" and memory:
            # The fine samples: RSS solid, its anonymous part dashed.
            for mcol, ls, what in (("rss_kb", "-", "RSS"), ("anon_kb", "--", "anon")):
                pts = [(float(m["secs"]) / 60, int(m[mcol]) / 1024) for m in memory if m["site"] == s]
                ax.plot([x for x, _ in pts], [y for _, y in pts], ls=ls, lw=1, color=color,
                        label=f"site {s} {what}")
            continue
        pts = [(t / 60, v * scale) for t, v in series(s, col) if v is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, color=color, label=f"site {s}")
    for e in events:
        if e["event"] in ("cut", "kill"):
            ax.axvline(int(e["secs"]) / 60, color="red" if e["event"] == "kill" else "orange", lw=0.8, ls="--")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
for ax in axes[-1]:
    ax.set_xlabel("minutes (dashed: orange a link cut, red a kill -9)")
axes[0][0].legend(fontsize=7, ncol=2 if memory else 1)
if memory:
    axes[0][0].set_title(f"RSS (MiB; solid) and its anonymous part (dashed), every {S.get('memory_secs', '?')} s")
fig.suptitle(f"soak: {S['minutes']} min, checker {'passes' if S['checker_ok'] else 'FAILS'}")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "soak.png"), dpi=90)
