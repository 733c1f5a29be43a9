#!/usr/bin/env python3
''''exec python3 -- "$0" "$@" # '''
# (The line above lets `bash scripts/plot.py DIR` hand the file to Python, like the other scripts.)
"""Tables and plots for scripts/bench-wan.sh: reads DIR/results.json, writes DIR/results.md,
DIR/results.csv and DIR/*.png (latency CDFs, visibility CDFs, throughput and dependency-buffer
occupancy over time, sweeps).

    python3 scripts/plot.py results/wan
"""
import csv
import json
import os
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "results/wan"
R = json.load(open(os.path.join(OUT, "results.json")))
RUNS = R["runs"]


def ms(us):
    return "–" if us is None else f"{us / 1000:.2f}"


def run(mode, name):
    return next((r for r in RUNS if r["mode"] == mode and r["name"] == name), None)


def lat(r, op, key, site=0):
    try:
        v = r["loads"][site][op]
        return v[key] if v.get("count") else None
    except (KeyError, IndexError, TypeError):
        return None


def merged(r, op, key):
    """The worst site's figure (sites run the same workload)."""
    vals = [l[op][key] for l in r["loads"] if l.get(op, {}).get("count")]
    return max(vals) if vals else None


def vis(r, site_idx, key):
    try:
        return r["visibility"]["sites"][site_idx]["latency"][key]
    except (KeyError, IndexError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# CSV
rows = []
for r in RUNS + R.get("sweeps", {}).get("sites", []) + R.get("sweeps", {}).get("loss", []):
    rows.append({
        "mode": r["mode"], "workload": r["name"], "sites": r["sites"], "seconds": r["seconds"],
        "load_sites": len(r["load_sites"]), "throughput_ops_s": round(r["throughput"]), "errors": r["errors"],
        "put_p50_us": merged(r, "put", "p50_us"), "put_p99_us": merged(r, "put", "p99_us"),
        "put_p999_us": merged(r, "put", "p999_us"), "get_p50_us": merged(r, "get", "p50_us"),
        "get_p99_us": merged(r, "get", "p99_us"), "get_p999_us": merged(r, "get", "p999_us"),
        "vis_b_p50_us": vis(r, 0, "p50_us"), "vis_b_p99_us": vis(r, 0, "p99_us"),
        "vis_c_p50_us": vis(r, 1, "p50_us"), "vis_c_p99_us": vis(r, 1, "p99_us"),
        "buffer_max": r["buffer_max"], "buffer_mean": round(r["buffer_mean"], 1),
        "wire_bytes_per_update": round(r["wire_bytes_per_update"] or 0),
    })
with open(os.path.join(OUT, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)

# ---------------------------------------------------------------------------------------------
# Markdown
ow = R["one_way_ms"]
md = ["# WAN benchmark: causalkv vs eventual vs sync vs etcd", "",
      f"Command: `{R['command']}` ({R['wall_seconds']:.0f} s wall, {R['machine']['cpus']} CPUs, "
      f"load average before {R['machine']['load_before'][0]:.1f}, after {R['machine']['load_after'][0]:.1f}; "
      f"{R['seconds_per_run']:.0f} s per run).", "",
      "Emulated WAN (user-space relays, `causalkv wan`): RTT a–b 30 ms, a–c 80 ms, b–c 150 ms "
      f"(one-way a→b {ow[0][1]:.0f} ms, a→c {ow[0][2]:.0f} ms). No jitter or loss unless stated.", ""]
st = R["emulator_self_test"]
md += ["## Emulator accuracy (`causalkv wan --self-test`)", "",
       "Delay added by the emulator on top of the configured one-way delay (100 B datagrams, 1 per ms; "
       "includes the extra loopback hop through the relay):", "",
       "| configured | p50 added | p99 added | max added | lost |", "|---:|---:|---:|---:|---:|"]
for s in st:
    md.append(f"| {s['delay_ms']:.0f} ms | {s['added_p50_us']:.0f} µs | {s['added_p99_us']:.0f} µs | "
              f"{s['added_max_us']:.0f} µs | {s['lost']} |")
md += ["", "## Modes side by side", "",
       "One load generator per site, all sites at once, each against its own site (closed loop: 8 in flight per "
       "site; open: fixed rate per site). Latencies are the worst site's percentile, in ms. Visibility: "
       "`causalkv bench visibility-wan` writes a fresh key at a every 40 ms during the run and reads it once at b and c "
       "in a session holding a's token, which the site answers as soon as it covers the write (or, with BENCH_PROBE=poll, "
       "polls every 0.5 ms in fresh sessions until the value is there): ack at a → visible at b / c. "
       "Buffer: dependency-buffer occupancy sampled every 250 ms at every site. B/update: relay payload "
       "bytes on all links (replication, acks, heartbeats, markers; no IP/UDP headers) per put.", "",
       "| mode | workload | ops/s | put p50 | put p99 | put p999 | get p50 | get p99 | vis b p50/p99 | "
       "vis c p50/p99 | buffer max (mean) | B/update | errors |",
       "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for r in RUNS:
    md.append(f"| {r['mode']} | {r['name']} | {r['throughput']:,.0f} | {ms(merged(r, 'put', 'p50_us'))} | "
              f"{ms(merged(r, 'put', 'p99_us'))} | {ms(merged(r, 'put', 'p999_us'))} | "
              f"{ms(merged(r, 'get', 'p50_us'))} | {ms(merged(r, 'get', 'p99_us'))} | "
              f"{ms(vis(r, 0, 'p50_us'))} / {ms(vis(r, 0, 'p99_us'))} | {ms(vis(r, 1, 'p50_us'))} / {ms(vis(r, 1, 'p99_us'))} | "
              f"{r['buffer_max']} ({r['buffer_mean']:.1f}) | {r['wire_bytes_per_update'] or 0:,.0f} | {r['errors']} |")
md.append("")
e = R.get("etcd", {})
rd = R.get("redis", {})
md += ["## etcd (3 members, same emulated WAN) and Redis (one local site)", ""]
if "put_c1" in e:
    md += ["etcd 3.4 with its peers behind TCP relays (same delays), client and leader at a, puts through the "
           "HTTP/JSON gateway from a keep-alive Python client (100 B values; Python adds ~0.1 ms).", "",
           "| system | in flight | put p50 | put p99 | put p999 | puts/s |", "|---|---:|---:|---:|---:|---:|"]
    for k in sorted(x for x in e if x.startswith("put_c")):
        v = e[k]
        md.append(f"| etcd | {k[5:]} | {ms(v['p50_us'])} | {ms(v['p99_us'])} | {ms(v['p999_us'])} | {v['throughput']:,.0f} |")
else:
    md.append(f"etcd run failed: {e.get('error')}")
if "SET" in rd:
    md.append(f"| Redis (local, no WAN, no TLS) | 1 | {ms(rd['SET']['p50_us'])} | {ms(rd['SET']['p99_us'])} | – | "
              f"{rd['SET']['rps']:,.0f} |")
md.append("")

# Headline ratios.
c, ev, sy = run("causal", "mixed50"), run("eventual", "mixed50"), run("sync", "mixed50")
co, eo = run("causal", "open"), run("eventual", "open")
md += ["## Headline", ""]
cli = run("causal", "light")
if c and "put_c1" in e:
    ep = e["put_c1"]["p50_us"]
    if cli:
        cpl = lat(cli, "put", "p50_us")
        md.append(f"- causal put p50 at a {ms(cpl)} ms at {cli['params'].get('rate')} ops/s per site (open loop, "
                  f"50 % writes, fsync always): {'at most' if cpl <= 2000 else 'ABOVE'} 2 ms; etcd put p50 "
                  f"{ms(ep)} ms (client and leader at a, 1 in flight, one WAN round trip a–b): etcd/causal = "
                  f"{ep / cpl:,.1f}×.")
    for r, what in ((co, f"{co['params'].get('rate') if co else '?'} ops/s per site (open loop)"),
                    (c, "mixed50: 3 sites × 8 in flight (closed loop)")):
        if r:
            cp = lat(r, "put", "p50_us")
            md.append(f"- under heavier load, {what}: causal put p50 at a {ms(cp)} ms, etcd/causal = {ep / cp:,.1f}×.")
if c and ev:
    best = lambda mode: max((r for r in (run(mode, "mixed50"), run(mode, "mixed50-again")) if r),
                            key=lambda r: r["throughput"])
    cb, eb = best("causal"), best("eventual")
    md.append(f"- causal/eventual throughput (mixed50, closed loop, better of two runs each): "
              f"{cb['throughput']:,.0f} / {eb['throughput']:,.0f} = {cb['throughput'] / eb['throughput']:.2f} "
              f"(single runs: causal {c['throughput']:,.0f}"
              + (f" and {run('causal', 'mixed50-again')['throughput']:,.0f}" if run('causal', 'mixed50-again') else "")
              + f", eventual {ev['throughput']:,.0f}"
              + (f" and {run('eventual', 'mixed50-again')['throughput']:,.0f}" if run('eventual', 'mixed50-again') else "")
              + ").")
if sy:
    md.append(f"- sync (k = 1) put p50 at a {ms(lat(sy, 'put', 'p50_us'))} ms (nearest remote site b: RTT 30 ms), "
              f"worst site (c, nearest RTT 80 ms) {ms(merged(sy, 'put', 'p50_us'))} ms.")
eli = run("eventual", "light")
for cr, er in ((cli, eli), (co, eo)):
    if not cr:
        continue
    rate = cr["params"].get("rate")
    b99, c99 = vis(cr, 0, "p99_us"), vis(cr, 1, "p99_us")
    within = b99 <= (ow[0][1] + 5) * 1000 and c99 <= (ow[0][2] + 5) * 1000
    md.append(f"- visibility at {rate} ops/s per site (open loop, 50 % writes): a→b p99 {ms(b99)} ms "
              f"(one-way {ow[0][1]:.0f} ms), a→c p99 {ms(c99)} ms (one-way {ow[0][2]:.0f} ms): "
              f"{'within' if within else 'NOT within'} one-way + 5 ms"
              + (f"; eventual: {ms(vis(er, 0, 'p99_us'))} / {ms(vis(er, 1, 'p99_us'))} ms." if er else "."))
if "SET" in rd and c:
    md.append(f"- Redis local SET p50 {ms(rd['SET']['p50_us'])} ms (plaintext TCP, no replication) vs causal put p50 "
              f"{ms(merged(c, 'put', 'p50_us'))} ms (QUIC + mTLS, fsync always, replicating to 2 sites).")
md.append("")
sw = R.get("sweeps", {})
if sw.get("sites"):
    md += ["## Sweep: number of sites (metadata cost)", "",
           "Load at site a only (closed loop, 8 in flight, 50 % reads, 100 B); one-way delays spread 15–75 ms.", "",
           "| sites | ops/s | put p50 | put p99 | vis b p99 | B/update | B/update/remote site |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sw["sites"]:
        b = r["wire_bytes_per_update"] or 0
        md.append(f"| {r['sites']} | {r['throughput']:,.0f} | {ms(merged(r, 'put', 'p50_us'))} | "
                  f"{ms(merged(r, 'put', 'p99_us'))} | {ms(vis(r, 0, 'p99_us'))} | {b:,.0f} | {b / (r['sites'] - 1):,.0f} |")
    md.append("")
if sw.get("loss"):
    md += ["## Sweep: datagram loss on every link", "", "Open loop as above, 3 sites.", "",
           "| loss | ops/s | put p50 | put p99 | vis b p50/p99 | vis c p50/p99 | B/update |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sw["loss"]:
        md.append(f"| {r['loss']:.0%} | {r['throughput']:,.0f} | {ms(merged(r, 'put', 'p50_us'))} | "
                  f"{ms(merged(r, 'put', 'p99_us'))} | {ms(vis(r, 0, 'p50_us'))} / {ms(vis(r, 0, 'p99_us'))} | "
                  f"{ms(vis(r, 1, 'p50_us'))} / {ms(vis(r, 1, 'p99_us'))} | {r['wire_bytes_per_update'] or 0:,.0f} |")
    md.append("")
vals = [r for r in RUNS if r["name"].startswith("values-")]
if vals:
    md += ["## Value size (puts only at a, 4 in flight, causal)", "",
           "| value | puts/s | MB/s | put p50 | put p99 | B/update |", "|---:|---:|---:|---:|---:|---:|"]
    for r in vals:
        v = r["params"]["value"]
        md.append(f"| {v:,} B | {r['throughput']:,.0f} | {r['throughput'] * v / 1e6:.1f} | {ms(merged(r, 'put', 'p50_us'))} | "
                  f"{ms(merged(r, 'put', 'p99_us'))} | {r['wire_bytes_per_update'] or 0:,.0f} |")
    md.append("")
md += ["Notes: the machine is shared (see the load averages above), so closed-loop throughput is CPU-bound "
       "and noisy; compare modes within one run. Visibility is measured from the client's receipt of the ack, "
       "which comes after the origin's fsync while the update ships in parallel, so a few samples fall below the "
       "one-way delay. Under loss, QUIC's loss recovery on the ordered per-origin stream (head-of-line "
       "blocking) sets the visibility tail.", ""]
md += ["Plots: `latency_cdf.png`, `visibility_cdf.png`, `throughput.png`, `buffer.png`"
       + (", `sweeps.png`" if sw.get("sites") or sw.get("loss") else "") + ".", ""]
text = "\n".join(md)
open(os.path.join(OUT, "results.md"), "w").write(text)
print(text)

# ---------------------------------------------------------------------------------------------
# Plots
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib missing: no plots", file=sys.stderr)
    sys.exit(0)

COLORS = {"causal": "tab:blue", "eventual": "tab:orange", "sync": "tab:green", "etcd": "tab:red"}


def cdf_xy(points):
    return [v / 1000 for _, v in points], [q for q, _ in points]


fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
for mode in ["causal", "eventual", "sync"]:
    r = run(mode, "mixed50")
    if not r:
        continue
    for ax, op in zip(axes, ["put", "get"]):
        pts = r["loads"][0].get(f"{op}_cdf")
        if pts:
            ax.plot(*cdf_xy(pts), label=f"{mode} (site a, 8 in flight/site)", color=COLORS[mode])
for k, style in [("put_c1", "-"), ("put_c8", "--")]:
    if k in e:
        axes[0].plot(*cdf_xy(e[k]["cdf"]), style, color=COLORS["etcd"], label=f"etcd ({k[5:]} in flight)")
if "SET" in rd:
    axes[0].axvline(rd["SET"]["p50_us"] / 1000, color="grey", ls=":", label="Redis local SET p50")
for ax, op in zip(axes, ["put", "get"]):
    ax.set_xscale("log")
    ax.set_xlabel(f"{op} latency (ms, log scale)")
    ax.set_ylabel("fraction of operations ≤ x")
    ax.set_title(f"{op} latency CDF, mixed50 workload, 3 sites (RTT 30/80/150 ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "latency_cdf.png"), dpi=110)
plt.close(fig)

fig, ax = plt.subplots(figsize=(8, 4.5))
for mode, name, style in [("causal", "light", "-"), ("eventual", "light", "--"), ("causal", "open", ":")]:
    r = run(mode, name)
    if not r or not r.get("visibility") or "sites" not in r["visibility"]:
        continue
    for idx, (site, d) in enumerate([("b", ow[0][1]), ("c", ow[0][2])]):
        s = r["visibility"]["sites"][idx]
        ax.plot(*cdf_xy(s["cdf"]), style, color=["tab:blue", "tab:purple"][idx] if mode == "causal"
                else ["tab:orange", "tab:brown"][idx],
                label=f"{mode}: a → {site}, {r['params'].get('rate')} ops/s per site")
for d, site in [(ow[0][1], "b"), (ow[0][2], "c")]:
    ax.axvline(d, color="grey", ls=":", lw=1)
    ax.text(d, 0.5, f"one-way a→{site} {d:.0f} ms ", rotation=90, fontsize=8, color="grey", va="center", ha="right")
ax.set_xlabel("ack at a → visible at remote site (ms)")
ax.set_ylabel("fraction of writes ≤ x")
ax.set_title("Remote visibility latency, open loop, 3 sites (RTT 30/80/150 ms)")
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "visibility_cdf.png"), dpi=110)
plt.close(fig)

fig, ax = plt.subplots(figsize=(9, 4.5))
for r in RUNS:
    if r["name"] in ("mixed50", "read95") and r["per_second"]:
        ax.plot(range(1, len(r["per_second"]) + 1), r["per_second"], marker="o", ms=3,
                ls="-" if r["name"] == "mixed50" else "--", color=COLORS[r["mode"]],
                label=f"{r['mode']} {r['name']}")
ax.set_xlabel("time (s)")
ax.set_ylabel("completed operations per second (all sites)")
ax.set_title("Throughput over time, closed loop, 3 sites × 8 in flight")
ax.set_ylim(bottom=0)
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "throughput.png"), dpi=110)
plt.close(fig)

fig, ax = plt.subplots(figsize=(9, 4.5))
for r in RUNS:
    if r["mode"] in ("causal", "eventual") and r["name"] in ("mixed50", "read95", "open"):
        by_t = {}
        for s in r["buffer_samples"]:
            by_t.setdefault(round(s["t"] * 4) / 4, 0)
            by_t[round(s["t"] * 4) / 4] += s["buffered"]
        if by_t:
            ts = sorted(by_t)
            ax.plot(ts, [by_t[t] for t in ts], label=f"{r['mode']} {r['name']}",
                    ls={"mixed50": "-", "read95": "--", "open": ":"}[r["name"]], color=COLORS[r["mode"]])
ax.set_xlabel("time (s)")
ax.set_ylabel("updates in dependency buffers (sum over sites)")
ax.set_title("Dependency-buffer occupancy (sampled every 250 ms)")
ax.set_ylim(bottom=0)
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "buffer.png"), dpi=110)
plt.close(fig)

if sw.get("sites") or sw.get("loss") or vals:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if sw.get("sites"):
        ns = [r["sites"] for r in sw["sites"]]
        axes[0].plot(ns, [r["wire_bytes_per_update"] or 0 for r in sw["sites"]], marker="o", label="all remote copies")
        axes[0].plot(ns, [(r["wire_bytes_per_update"] or 0) / (r["sites"] - 1) for r in sw["sites"]], marker="s",
                     label="per remote site")
        axes[0].set_xlabel("sites")
        axes[0].set_ylabel("wire bytes per update (B)")
        axes[0].set_title("Metadata cost vs number of sites (100 B values)")
        axes[0].legend(fontsize=8)
        axes[0].grid(True, alpha=0.3)
    if sw.get("loss"):
        ls = [r["loss"] * 100 for r in sw["loss"]]
        for idx, site in [(0, "b"), (1, "c")]:
            axes[1].plot(ls, [(vis(r, idx, "p50_us") or 0) / 1000 for r in sw["loss"]], marker="o", label=f"a→{site} p50")
            axes[1].plot(ls, [(vis(r, idx, "p99_us") or 0) / 1000 for r in sw["loss"]], marker="s", ls="--",
                         label=f"a→{site} p99")
        axes[1].set_xlabel("datagram loss on every link (%)")
        axes[1].set_ylabel("visibility latency (ms)")
        axes[1].set_title("Visibility vs loss (open loop)")
        axes[1].legend(fontsize=8)
        axes[1].grid(True, alpha=0.3)
    if vals:
        vs = [r["params"]["value"] for r in vals]
        axes[2].plot(vs, [(merged(r, "put", "p50_us") or 0) / 1000 for r in vals], marker="o", label="put p50")
        axes[2].plot(vs, [(merged(r, "put", "p99_us") or 0) / 1000 for r in vals], marker="s", label="put p99")
        axes[2].set_xscale("log")
        axes[2].set_xlabel("value size (bytes, log scale)")
        axes[2].set_ylabel("put latency at a (ms)")
        axes[2].set_title("Put latency vs value size (4 in flight, causal)")
        axes[2].legend(fontsize=8)
        axes[2].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "sweeps.png"), dpi=110)
    plt.close(fig)
