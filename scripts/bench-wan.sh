#!/usr/bin/env bash
# The WAN benchmark suite: causalkv over an emulated wide-area network, side by side with
# eventual consistency, synchronous replication and etcd (Raft) behind the same network, and
# Redis as the single-site local-latency anchor.
#
#   bash scripts/bench-wan.sh [--quick] [--no-sweeps] [--no-strong] [--seconds N] [--out DIR]
#   bash scripts/bench-wan.sh --strong-only [--seconds N] [--out DIR]
#   bash scripts/bench-wan.sh --metadata-only "3 8" [--seconds N] [--out DIR]
#   bash scripts/bench-wan.sh --loss-only "0 0.01 0.05" [--seconds N] [--out DIR]
#   bash scripts/bench-wan.sh --restart-only 20 [--out DIR]
#
# No netem needed: `causalkv wan` (src/wan.rs) is a user-space relay mesh on 127.0.0.0/8, one
# UDP relay per directed site pair (TCP relays in front of the etcd members), with one-way
# delays from the RTT matrix a-b 30 ms, a-c 80 ms, b-c 150 ms. Each causalkv site is a
# `causalkv serve` process (mutual TLS, default fsync = always); etcd members use their
# default fsync on the same disk.
#
# Modes (each on a fresh cluster behind the same emulated WAN):
#   causal    the default;
#   eventual  dependency check off (CAUSALKV_BENCH_EVENTUAL=1, benchmark-only);
#   sync      causal with `--sync 1` puts (each put waits for one remote site's durable ack);
#   etcd      3 members, client at member a, leader moved to a; puts through the HTTP/JSON
#             gateway (/v3/kv/put) from a keep-alive Python client.
# Workloads (one `causalkv bench load` per site, all sites at once, each against its own site):
#   mixed50   closed loop, 8 in flight per site, 50 % reads, uniform over 10 000 keys, 100 B values
#             (run twice per mode, the headline taking the better; once in --quick);
#   read95    closed loop, 8 in flight per site, 95 % reads, zipfian keys (s = 0.99; not in --quick);
#   open      open loop at a fixed rate per site, 50 % reads, uniform keys;
#   light     the same at 100 ops/s per site (the load the visibility headline states);
#   values    puts only at site a, 4 in flight, values of 100 B, 4 KiB, 64 KiB.
# Measured during each workload: op latency p50/p99/p999, throughput (and per second),
# remote visibility latency (`causalkv bench visibility-wan`: writes at a every 40 ms; ack ->
# visible at b and c, learnt by one read per write and site carrying a's session token, which the
# site answers once it covers the write; BENCH_PROBE=poll polls instead, every 0.5 ms in fresh
# sessions, and a variant may set probe=wait|poll), dependency-buffer occupancy (`causalkv bench status-sample`),
# bytes on the wire per update (relay counters / puts).
# Sweeps (skip with --no-sweeps; off in --quick): 3/5/8 sites, 0/1/5 % loss.
# Metadata sweep (3 sites in --quick; 3/5/8/16 with sweeps; only these with --metadata-only):
#   every site at 1,000 ops/s open loop, 50 % writes of 100 B values (11 B keys); UDP payload
#   bytes per update per remote site (relay counters), the same split by kind from the sites'
#   /metrics (causalkv_peer_bytes_out_total{kind}), then idle bytes per second per directed link,
#   then a causally checked workload over every site (`causalkv bench checked`: sessions hop
#   between sites with their tokens; the checker judges the history, then convergence; the seed
#   is printed, CHECK_SEED=N replays it); once per BENCH_VARIANTS entry, as the loss sweep.
# Loss sweep (--loss-only): 3 sites, the given loss on every link, without and with 5 ms jitter,
#   once per BENCH_VARIANTS entry ("name:key=value,..." replaces site configuration keys),
#   500 ops/s per site open loop (BENCH_RATE), jitters 0 and 5 ms (BENCH_JITTERS="0 5");
#   visibility p50/p99 at b and c, put p50 at a. BENCH_REORDER=P holds back that fraction of
#   datagrams on every link by 2 ms (reordering), for any sweep.
# Restart catch-up (--restart-only N): 3 sites, a and b writing 500 puts/s each; c killed with
#   SIGKILL N times, down 2 s each, restarted; time to serving and to c's applied vector covering
#   what a and b had at the restart (output: restart.md, restart.json).
# Strong operations (skip with --no-strong; off in --quick; --strong-only runs just these): a
# causalkv cluster (preferred leader a) and etcd, both up for the whole section, in interleaved
# rounds (causalkv then etcd): strong put / linearizable get at 1 in flight from the leader's
# site (a) and a follower's (b); compare-and-set at 8 and 64 in flight (etcd: a txn comparing
# the value, then a put); causal put p50 at a alone and with 64 compare-and-sets in flight;
# then kill -9 of the leader, alternating, timed to the next write that succeeds at b.
# BENCH_STRONG_SECONDS / _ROUNDS / _KILLS size it (default min(--seconds, 5) s, 3, 5);
# output: strong.json and strong.md.
# Output: results.json, results.csv, results.md and PNG plots (scripts/plot.py) in --out.
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS="$*"
QUICK=0
SWEEPS=1
STRONG=1
STRONG_ONLY=0
SECS=""
OUT=""
METADATA_ONLY=""
LOSS_ONLY=""
RESTART_ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --no-sweeps) SWEEPS=0; shift ;;
    --no-strong) STRONG=0; shift ;;
    --strong-only) STRONG_ONLY=1; shift ;;
    --seconds) SECS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --metadata-only) METADATA_ONLY="$2"; shift 2 ;;
    --loss-only) LOSS_ONLY="$2"; shift 2 ;;
    --restart-only) RESTART_ONLY="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { [ "$QUICK" = 1 ] && OUT=results/wan-quick || OUT=results/wan; }

source scripts/lib.sh
ensure_pkg etcd etcdctl -- etcd-server etcd-client
ensure_pkg redis-server redis-benchmark -- redis-server redis-tools
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "installing matplotlib..." >&2
  pip install -q matplotlib >&2 || echo "matplotlib unavailable: no plots" >&2
fi
build_bin

CMDLINE="bash scripts/bench-wan.sh $ARGS"
WORK=$(mktemp -d -p "${TMPDIR:-/var/tmp}" causalkv-wan.XXXXXX)
[ -n "${BENCH_KEEP_WORK:-}" ] && echo "keeping $WORK" >&2 || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
RESTART_ONLY="$RESTART_ONLY" python3 - "$OUT" "$WORK" "$QUICK" "$SWEEPS" "$SECS" "$CMDLINE" "$METADATA_ONLY" "$LOSS_ONLY" "$STRONG" "$STRONG_ONLY" <<'PY'
import base64, hashlib, http.client, json, os, random, re, signal, subprocess, sys, threading, time

OUT, WORK, QUICK, SWEEPS, SECS, CMDLINE, METADATA_ONLY, LOSS_ONLY, STRONG, STRONG_ONLY = sys.argv[1:]
QUICK, SWEEPS = QUICK == "1", SWEEPS == "1" and QUICK != "1"
STRONG_ONLY = STRONG_ONLY == "1"
STRONG = STRONG_ONLY or (STRONG == "1" and not QUICK)
T = float(SECS) if SECS else (3.0 if QUICK else 8.0)
BIN = os.path.abspath("target/release/causalkv")
RTT = {(0, 1): 30, (0, 2): 80, (1, 2): 150}
T0 = time.time()
procs = []


def log(msg):
    m, s = divmod(int(time.time() - T0), 60)
    print(f"[{m:02d}:{s:02d}] {msg}", file=sys.stderr, flush=True)


def one_way(n):
    """One-way delay matrix (ms): the 30/80/150 ms RTT triangle for 3 sites; for more sites,
    RTTs spread from 30 to 150 ms by distance between site indices."""
    m = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            a, b = min(i, j), max(i, j)
            rtt = RTT[(a, b)] if n == 3 else 30 + 120 * (b - a - 1) / max(1, n - 2)
            m[i][j] = rtt / 2
    return m


def spawn(args, env=None, **kw):
    p = subprocess.Popen(args, env={**os.environ, **(env or {})}, **kw)
    procs.append(p)
    return p


def stop(ps):
    for p in ps:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in ps:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p in procs:
            procs.remove(p)


def run_json(args, timeout=None):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])}: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def free_base(span):
    # Below the kernel's ephemeral range (32768+), where the relays' port-0 sockets land.
    return random.randint(12000, 32000 - span)


class Cluster:
    """n causalkv sites as `causalkv serve` processes behind `causalkv wan`."""

    def __init__(self, n, mode, loss=0.0, jitter=0.0, extra_toml="", overrides=()):
        self.n, self.mode = n, mode
        self.dir = os.path.join(WORK, f"ckv-{mode}-{n}-{loss}-{int(time.time()*1000) % 100000}")
        base = free_base(n)
        subprocess.run([BIN, "dev", "--layout-only", "--sites", str(n), "--dir", self.dir, "--port", str(base)],
                       check=True, capture_output=True)
        self.addrs = [f"127.0.0.1:{base + i}" for i in range(n)]
        self.certs = os.path.join(self.dir, "certs")
        self.stats_file = os.path.join(self.dir, "wan-stats.json")
        m = ";".join(",".join(str(x) for x in row) for row in one_way(n))
        wan = ["nice", "-n", "-10", BIN, "wan", "--layout", self.dir, "--matrix", m,
               "--control", os.path.join(self.dir, "wan.ctl"), "--stats", self.stats_file]
        if loss:
            wan += ["--loss", str(loss)]
        if jitter:
            wan += ["--jitter-ms", str(jitter)]
        if os.environ.get("BENCH_REORDER"):
            wan += ["--reorder", os.environ["BENCH_REORDER"]]
        self.wan = spawn(wan, stderr=open(os.path.join(self.dir, "wan.log"), "w"))
        for _ in range(100):
            if os.path.exists(self.stats_file):
                break
            time.sleep(0.05)
        self.env = {"CAUSALKV_BENCH_EVENTUAL": "1"} if mode == "eventual" else {}
        self.sites = []
        for i in range(n):
            path = os.path.join(self.dir, f"site-{chr(ord('a') + i)}.toml")
            if overrides:
                text = open(path).read()
                for k, v in overrides:
                    text, hits = re.subn(rf"(?m)^{re.escape(k)} = .*$", f"{k} = {v}", text)
                    if hits != 1:
                        raise RuntimeError(f"override {k}: {hits} matching lines in {path}")
                open(path, "w").write(text)
            if extra_toml:
                with open(path, "a") as f:
                    f.write(extra_toml)
            self.sites.append(self.serve(i))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                ok = all(
                    all(p["state"] == "up" for p in run_json(self.status_cmd(a), timeout=5)["peers"])
                    for a in self.addrs)
                if ok:
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{mode} cluster of {n} did not connect within 30 s")

    def serve(self, i):
        name = chr(ord("a") + i)
        return spawn([BIN, "serve", "--config", os.path.join(self.dir, f"site-{name}.toml")],
                     env=self.env, stderr=open(os.path.join(self.dir, f"site-{name}.log"), "a"))

    def restart(self, i):
        """Starts site i again (after a kill -9) on its data directory."""
        if self.sites[i] in procs:
            procs.remove(self.sites[i])
        self.sites[i] = self.serve(i)

    def status_cmd(self, addr):
        return [BIN, "status", "--site", addr, "--certs", self.certs, "--json"]

    def wire(self):
        with open(self.stats_file) as f:
            links = json.load(f)["links"]
        return sum(l["bytes"] for l in links), sum(l["packets"] for l in links)

    def close(self):
        stop(self.sites + [self.wan])


def load_cmd(cl, site, secs, conc=8, read=0.5, value=100, zipf=None, rate=None, sync=0):
    a = [BIN, "bench", "load", "--site", cl.addrs[site], "--certs", cl.certs, "--seconds", str(secs),
         "--concurrency", str(conc), "--read-ratio", str(read), "--value-size", str(value),
         "--keys", "10000", "--sync", str(sync), "--timeout-ms", "20000"]
    if zipf:
        a += ["--zipf", str(zipf)]
    if rate:
        a += ["--rate", str(rate)]
    return a


PROBE = os.environ.get("BENCH_PROBE", "wait")


def workload(cl, name, secs, sites=None, probe=True, probe_mode=None, **kw):
    """Runs one load generator per site (all at once), the visibility probe (`probe_mode`: wait
    or poll; BENCH_PROBE by default) and the status sampler alongside, and returns everything
    measured."""
    sites = list(range(cl.n)) if sites is None else sites
    log(f"  {cl.mode:8s} {cl.n} sites: {name} ({secs:.0f} s) ...")
    time.sleep(0.6)  # let the wan stats file settle
    b0, p0 = cl.wire()
    gens = [spawn(load_cmd(cl, s, secs, **kw), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for s in sites]
    sampler = spawn([BIN, "bench", "status-sample", "--certs", cl.certs, "--seconds", str(secs),
                     "--interval-ms", "250"] + sum((["--site", a] for a in cl.addrs), []),
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    vis = None
    if probe:
        writes = max(20, int((secs - 1) * 1000 / 40))
        vis = spawn([BIN, "bench", "visibility-wan", "--certs", cl.certs, "--writes", str(writes),
                     "--interval-ms", "40", "--poll-us", "500", "--timeout-ms", "20000"]
                    + (["--wait"] if (probe_mode or PROBE) == "wait" else [])
                    + sum((["--site", a] for a in cl.addrs[:3]), []),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loads = []
    for g in gens:
        out, _ = g.communicate()
        procs.remove(g)
        loads.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no output"})
    status, _ = sampler.communicate()
    procs.remove(sampler)
    visibility = None
    if vis:
        out, err = vis.communicate()
        procs.remove(vis)
        visibility = json.loads(out.strip().splitlines()[-1]) if vis.returncode == 0 else {"error": err[-300:]}
    time.sleep(0.7)
    b1, p1 = cl.wire()
    puts = sum(l.get("put", {}).get("count", 0) for l in loads)
    if visibility and "writes" in visibility:
        puts += visibility["writes"]
        for s in visibility["sites"]:
            # The slowest writes the report names must be the histogram's tail.
            slow = [w["us"] for w in s["slowest"]]
            top = s["latency"]["max_us"]
            if slow != sorted(slow, reverse=True) or len(slow) > 10 \
                    or (slow and abs(slow[0] - top) > 0.01 * top + 1):
                raise RuntimeError(f"visibility at {s['site']}: slowest writes {slow[:3]} do not "
                                   f"match the histogram's maximum {top} us")
    ops = sum(l.get("ops", 0) for l in loads)
    thr = sum(l.get("throughput", 0) for l in loads)
    per_second = [sum(x) for x in zip(*[l.get("per_second", []) for l in loads])]
    samples = json.loads(status) if status.strip() else []
    buf = [s["buffered"] for s in samples]
    r = {"name": name, "mode": cl.mode, "sites": cl.n, "seconds": secs, "params": kw,
         "load_sites": sites, "loads": loads, "ops": ops, "throughput": thr, "per_second": per_second,
         "errors": sum(l.get("errors", 0) for l in loads), "visibility": visibility,
         "buffer_samples": samples, "buffer_max": max(buf, default=0),
         "buffer_mean": sum(buf) / len(buf) if buf else 0,
         "wire_bytes": b1 - b0, "wire_packets": p1 - p0, "puts": puts,
         "wire_bytes_per_update": (b1 - b0) / puts if puts else None}
    l0 = loads[0]
    vis_txt = ""
    if visibility and "sites" in visibility:
        vis_txt = " vis p99 " + "/".join(f"{s['latency']['p99_us']/1000:.0f}" for s in visibility["sites"]) + " ms"
    log(f"  {cl.mode:8s} {name}: {thr:,.0f} ops/s, put p50 {l0.get('put',{}).get('p50_us',0)/1000:.2f} ms"
        f"{vis_txt}, buffer max {r['buffer_max']}, {r['wire_bytes_per_update'] or 0:,.0f} B/update")
    return r


# ---------------------------------------------------------------------------------------------
# etcd behind the same emulated WAN

def etcd_member_id(peer_url, token):
    """etcd's member id: sha1 of the sorted peer URLs joined, plus the cluster token."""
    return format(int.from_bytes(hashlib.sha1((peer_url + token).encode()).digest()[:8], "big"), "x")


ETCDCTL = {**os.environ, "ETCDCTL_API": "3"}


class Etcd:
    """3 etcd members behind the emulated WAN (TCP relays in front of the peer ports), with the
    leader moved to member a (m0)."""

    def __init__(self):
        n = self.n = 3
        base = free_base(20)
        self.dir = d = os.path.join(WORK, f"etcd-{base}")
        os.makedirs(d, exist_ok=True)
        token = f"bench-{base}"
        self.client = [base + i for i in range(n)]
        peer = [base + 5 + i for i in range(n)]
        relay = [base + 10 + i for i in range(n)]
        purl = [f"http://127.0.0.1:{p}" for p in relay]
        self.ids = ids = [etcd_member_id(u, token) for u in purl]
        spec = {"sites": ["a", "b", "c"], "matrix_ms": one_way(n),
                "tcp": [{"site": i, "listen": f"127.0.0.1:{relay[i]}", "target": f"127.0.0.1:{peer[i]}",
                         "sources": {"header": "X-Server-From", "map": {ids[k]: k for k in range(n)}}}
                        for i in range(n)]}
        with open(os.path.join(d, "wan.json"), "w") as f:
            json.dump(spec, f)
        self.stats = os.path.join(d, "wan-stats.json")
        self.wan = spawn(["nice", "-n", "-10", BIN, "wan", "--config", os.path.join(d, "wan.json"),
                          "--stats", self.stats], stderr=open(os.path.join(d, "wan.log"), "w"))
        cluster = ",".join(f"m{i}={purl[i]}" for i in range(n))
        self.args = [["etcd", "--name", f"m{i}", "--data-dir", os.path.join(d, f"m{i}"),
                      "--listen-client-urls", f"http://127.0.0.1:{self.client[i]}",
                      "--advertise-client-urls", f"http://127.0.0.1:{self.client[i]}",
                      "--listen-peer-urls", f"http://127.0.0.1:{peer[i]}",
                      "--initial-advertise-peer-urls", purl[i],
                      "--initial-cluster", cluster, "--initial-cluster-token", token,
                      "--initial-cluster-state", "new",
                      # Raft timing for 150 ms RTTs (etcd's tuning guide: heartbeat ~ RTT).
                      "--heartbeat-interval", "150", "--election-timeout", "1500"] for i in range(n)]
        self.members = [self.start(i) for i in range(n)]
        self.eps = ",".join(f"127.0.0.1:{c}" for c in self.client)
        try:
            st = self.wait_leader(60)
            got = sorted(format(s["Status"]["header"]["member_id"], "x") for s in st)
            if got != sorted(ids):
                raise RuntimeError(f"etcd member ids {got} differ from the computed {ids}: relays cannot attribute")
            self.lead_at(0)
        except Exception:
            self.close()
            raise

    def start(self, i):
        return spawn(self.args[i], stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, f"m{i}.log"), "a"))

    def status(self, members=None):
        eps = ",".join(f"127.0.0.1:{self.client[i]}" for i in (members or range(self.n)))
        r = subprocess.run(["etcdctl", "--endpoints", eps, "endpoint", "status", "-w", "json"],
                           capture_output=True, text=True, env=ETCDCTL, timeout=10)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait_leader(self, secs, members=None):
        """Waits until every (listed) member names the same leader; returns their status."""
        deadline = time.time() + secs
        while time.time() < deadline:
            try:
                st = self.status(members)
            except Exception:
                st = None
            if st and st[0]["Status"]["leader"] and all(s["Status"]["leader"] == st[0]["Status"]["leader"] for s in st):
                return st
            time.sleep(0.3)
        raise RuntimeError(f"etcd members did not agree on a leader within {secs} s")

    def member_index(self, mid):
        return self.ids.index(format(mid, "x"))

    def leader(self):
        return self.member_index(self.wait_leader(30)[0]["Status"]["leader"])

    def lead_at(self, i):
        for _ in range(10):
            l = self.leader()
            if l == i:
                return
            subprocess.run(["etcdctl", "--endpoints", f"127.0.0.1:{self.client[l]}", "move-leader", self.ids[i]],
                           capture_output=True, env=ETCDCTL, timeout=20)
            time.sleep(0.5)
        raise RuntimeError(f"could not move the etcd leader to m{i}")

    def wire_bytes(self):
        with open(self.stats) as f:
            return sum(l["bytes"] for l in json.load(f)["links"])

    def close(self):
        stop(self.members + [self.wan])


def etcd_bench(secs, concs):
    e = Etcd()
    out = {"leader_at_a": True}
    try:
        for c in concs:
            log(f"  etcd     3 members: puts, {c} in flight ({secs:.0f} s) ...")
            r = etcd_load(e.client[0], secs, c)
            out[f"put_c{c}"] = r
            log(f"  etcd     put p50 {r['p50_us']/1000:.2f} ms p99 {r['p99_us']/1000:.2f} ms, {r['throughput']:,.0f} puts/s")
        out["wire_bytes"] = e.wire_bytes()
    finally:
        e.close()
    return out


def quantiles(xs):
    xs = sorted(xs)
    if not xs:
        return {}
    q = lambda p: xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))]
    pts = [i / 100 for i in range(100)] + [0.99 + i / 1000 for i in range(10)] + [0.9995, 0.9999, 1.0]
    return {"count": len(xs), "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": xs[-1],
            "mean_us": sum(xs) / len(xs), "cdf": [(p, q(p)) for p in pts]}


def etcd_load(port, secs, conc, kind="put"):
    """Closed-loop load through etcd's HTTP/JSON gateway, one keep-alive connection per thread.
    kind: "put" (puts only); "mixed" (50 % puts, 50 % linearizable range reads, the default
    consistency of a range); "cas" (each thread owns a key, writes it once, then swaps it with
    a txn: compare value == the last one written, then put the next)."""
    lat, lock, errors = {"put": [], "get": []}, threading.Lock(), [0]
    value = base64.b64encode(b"x" * 100).decode()
    b64 = lambda x: base64.b64encode(x.encode()).decode()
    end = time.time() + secs
    tag = random.randrange(1 << 30)

    def worker(w):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        mine, k = {"put": [], "get": []}, 0
        rng = random.Random(w)
        last = None
        while time.time() < end:
            if kind == "cas":
                key = b64(f"cas-{tag}-{w}")
                if last is None:
                    path, body, op = "/v3/kv/put", {"key": key, "value": b64("0")}, "put"
                else:
                    path, op = "/v3/kv/txn", "put"
                    body = {"compare": [{"key": key, "result": "EQUAL", "target": "VALUE", "value": b64(str(last))}],
                            "success": [{"requestPut": {"key": key, "value": b64(str(last + 1))}}]}
            else:
                key = b64(f"key{rng.randrange(10000) if kind == 'mixed' else w * 100000 + k % 100000:08d}")
                if kind == "mixed" and rng.random() < 0.5:
                    path, body, op = "/v3/kv/range", {"key": key}, "get"
                else:
                    path, body, op = "/v3/kv/put", {"key": key, "value": value}, "put"
            t = time.perf_counter()
            try:
                c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                resp = c.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                if kind == "cas":
                    if last is not None and not json.loads(data).get("succeeded"):
                        last = None
                        raise RuntimeError("txn compare failed")
                    last = 0 if last is None else last + 1
                mine[op].append((time.perf_counter() - t) * 1e6)
            except Exception:
                errors[0] += 1
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            k += 1
        with lock:
            for o in mine:
                lat[o].extend(mine[o])

    t0 = time.time()
    ths = [threading.Thread(target=worker, args=(w,)) for w in range(conc)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    secs_run = time.time() - t0
    if kind == "mixed":
        return {"put": quantiles(lat["put"]), "get": quantiles(lat["get"]),
                "throughput": (len(lat["put"]) + len(lat["get"])) / secs_run, "errors": errors[0]}
    r = quantiles(lat["put"])
    r["throughput"] = len(lat["put"]) / secs_run
    r["errors"] = errors[0]
    return r


# ---------------------------------------------------------------------------------------------
# Strong operations: causalkv's Raft groups against etcd, both 3 members behind the same WAN

STRONG_TOML = '\npreferred_leader = "a"\n'  # appended to [consensus], the last table


def ckv_leader(cl, sites=None):
    """The strong-operation leader (site index) that the listed sites agree on, or None."""
    leaders = set()
    for i in (range(cl.n) if sites is None else sites):
        try:
            c = run_json(cl.status_cmd(cl.addrs[i]), timeout=5).get("consensus") or {}
        except Exception:
            return None
        leaders.add(c.get("leader"))
    return leaders.pop() if len(leaders) == 1 and None not in leaders else None


def ckv_wait_leader(cl, want=None, secs=60, sites=None):
    deadline = time.time() + secs
    while time.time() < deadline:
        l = ckv_leader(cl, sites)
        if l is not None and (want is None or l == want):
            return l
        time.sleep(0.3)
    raise RuntimeError(f"causalkv sites did not agree on leader {want} within {secs} s")


def ckv_strong_load(cl, site, secs, conc, cas=False, seed=1):
    a = [BIN, "bench", "load", "--site", cl.addrs[site], "--certs", cl.certs, "--seconds", str(secs),
         "--concurrency", str(conc), "--read-ratio", "0.5", "--keys", "10000", "--timeout-ms", "20000",
         "--seed", str(seed), "--cas" if cas else "--strong"]
    return run_json(a, timeout=secs + 60)


def ckv_failover(cl, probe_site, timeout_ms=1000):
    """kill -9 of the leader's process; seconds until a strong put succeeds at probe_site."""
    l = ckv_wait_leader(cl)
    put = [BIN, "put", "--strong", "failover-probe", "x", "--site", cl.addrs[probe_site], "--certs", cl.certs,
           "--timeout-ms", str(timeout_ms)]
    t0 = time.time()
    cl.sites[l].kill()
    cl.sites[l].wait()
    while time.time() - t0 < 120:
        if subprocess.run(put, capture_output=True).returncode == 0:
            return l, time.time() - t0
    raise RuntimeError("no strong write succeeded within 120 s of the leader's kill")


def etcd_failover(e, probe, timeout_s=1.0):
    l = e.leader()
    key = base64.b64encode(b"failover-probe").decode()
    body = json.dumps({"key": key, "value": key})
    t0 = time.time()
    e.members[l].kill()
    e.members[l].wait()
    while time.time() - t0 < 120:
        c = http.client.HTTPConnection("127.0.0.1", e.client[probe], timeout=timeout_s)
        try:
            c.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status == 200 and b"error" not in data:
                return l, time.time() - t0
        except Exception:
            pass
        finally:
            c.close()
        time.sleep(0.01)
    raise RuntimeError("no etcd put succeeded within 120 s of the leader's kill")


def strong_bench(secs, rounds, kills):
    """Interleaved rounds, causalkv then etcd, on clusters that both stay up for the whole
    section (so each round sees the same idle neighbours): strong put / linearizable get at 1 in
    flight from the leader's site (a) and from a follower's (b), compare-and-set at 8 and 64 in
    flight from a; then causal puts with and without a strong load alongside (causalkv only);
    then leader kills, alternating."""
    out = {"rounds": [], "failover": {"causalkv": [], "etcd": []}, "causal_under_strong": []}
    log("strong: causalkv (3 sites, preferred leader a) and etcd (3 members, leader a) behind the WAN ...")
    cl = Cluster(3, "strong", extra_toml=STRONG_TOML)
    e = None
    try:
        e = Etcd()
        ckv_wait_leader(cl, want=0, secs=60)
        for r in range(rounds):
            row = {"round": r}
            for site, tag in [(0, "leader"), (1, "follower")]:
                ckv_wait_leader(cl, want=0)
                row[f"ckv_ops_{tag}"] = x = ckv_strong_load(cl, site, secs, 1, seed=100 + r)
                log(f"  round {r} causalkv strong at {tag} site: put p50 {x['put']['p50_us']/1000:.1f} ms "
                    f"p99 {x['put']['p99_us']/1000:.1f}, get p50 {x['get']['p50_us']/1000:.1f} ms "
                    f"p99 {x['get']['p99_us']/1000:.1f} ({x['errors']} errors)")
                e.lead_at(0)
                row[f"etcd_ops_{tag}"] = x = etcd_load(e.client[site], secs, 1, "mixed")
                log(f"  round {r} etcd     at {tag} member: put p50 {x['put']['p50_us']/1000:.1f} ms "
                    f"p99 {x['put']['p99_us']/1000:.1f}, get p50 {x['get']['p50_us']/1000:.1f} ms "
                    f"p99 {x['get']['p99_us']/1000:.1f} ({x['errors']} errors)")
            for c in [8, 64]:
                ckv_wait_leader(cl, want=0)
                row[f"ckv_cas_c{c}"] = x = ckv_strong_load(cl, 0, secs, c, cas=True, seed=1000 * r + c)
                log(f"  round {r} causalkv cas {c} in flight: {x['throughput']:,.0f}/s, p50 "
                    f"{x['put']['p50_us']/1000:.1f} ms ({x['errors']} errors)")
                e.lead_at(0)
                row[f"etcd_cas_c{c}"] = x = etcd_load(e.client[0], secs, c, "cas")
                log(f"  round {r} etcd     cas {c} in flight: {x['throughput']:,.0f}/s, p50 "
                    f"{x['p50_us']/1000:.1f} ms ({x['errors']} errors)")
            out["rounds"].append(row)
            # Causal puts at site a (1 in flight, puts only) alone, then with a strong load (cas,
            # 64 in flight at site a) alongside.
            base = run_json(load_cmd(cl, 0, secs, conc=1, read=0.0), timeout=secs + 60)
            strong = spawn([BIN, "bench", "load", "--site", cl.addrs[0], "--certs", cl.certs, "--seconds",
                            str(secs + 2), "--concurrency", "64", "--cas", "--seed", str(7000 + r),
                            "--timeout-ms", "20000"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1)
            under = run_json(load_cmd(cl, 0, secs, conc=1, read=0.0), timeout=secs + 60)
            sout, _ = strong.communicate()
            procs.remove(strong)
            sl = json.loads(sout.strip().splitlines()[-1]) if sout.strip() else {"error": "no output"}
            out["causal_under_strong"].append({"alone": base, "under": under, "strong": sl})
            log(f"  round {r} causal put p50 alone {base['put']['p50_us']/1000:.2f} ms, with 64 cas in flight "
                f"{under['put']['p50_us']/1000:.2f} ms (cas {sl.get('throughput', 0):,.0f}/s meanwhile)")
        for k in range(kills):
            ckv_wait_leader(cl, want=0, secs=90)
            l, t = ckv_failover(cl, probe_site=1)
            out["failover"]["causalkv"].append(t)
            log(f"  kill {k}: causalkv leader {'abc'[l]} killed, strong writes at b resumed after {t:.2f} s")
            cl.restart(l)
            e.lead_at(0)
            l, t = etcd_failover(e, probe=1)
            out["failover"]["etcd"].append(t)
            log(f"  kill {k}: etcd leader m{l} killed, puts at m1 resumed after {t:.2f} s")
            e.members[l] = e.start(l)
            e.wait_leader(60)
    finally:
        cl.close()
        if e:
            e.close()
    out["summary"] = strong_summary(out)
    return out


def med(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def strong_summary(out):
    """Medians over rounds, and causalkv / etcd ratios (below 1: causalkv faster for
    latencies; above 1: causalkv more for throughput)."""
    R = out["rounds"]
    s = {}
    for tag in ["leader", "follower"]:
        for op in ["put", "get"]:
            for q in ["p50_us", "p99_us"]:
                c = med([r[f"ckv_ops_{tag}"][op].get(q) for r in R])
                e = med([r[f"etcd_ops_{tag}"][op].get(q) for r in R])
                s[f"{op}_{tag}_{q}"] = {"causalkv": c, "etcd": e, "ratio": c / e if c and e else None}
    for c in [8, 64]:
        a = med([r[f"ckv_cas_c{c}"]["throughput"] for r in R])
        b = med([r[f"etcd_cas_c{c}"]["throughput"] for r in R])
        s[f"cas_c{c}_per_s"] = {"causalkv": a, "etcd": b, "ratio": a / b if a and b else None}
    U = out["causal_under_strong"]
    s["causal_put_p50_us"] = {"alone": med([u["alone"]["put"]["p50_us"] for u in U]),
                              "under_strong": med([u["under"]["put"]["p50_us"] for u in U])}
    for k, v in out["failover"].items():
        s[f"failover_{k}_s"] = {"p50": med(v), "max": max(v) if v else None, "kills": len(v)}
    return s


def redis_anchor(n):
    port = free_base(1)
    p = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--logfile", os.path.join(WORK, "redis.log")])
    try:
        for _ in range(50):
            if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() == "PONG":
                break
            time.sleep(0.1)
        r = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "1", "-n", str(n), "-d", "100",
                            "-r", "100000", "-t", "set,get", "--csv"], capture_output=True, text=True, check=True)
        import csv, io
        rows = {x["test"]: x for x in csv.DictReader(io.StringIO(r.stdout))}
        return {t: {"p50_us": float(x["p50_latency_ms"]) * 1000, "p99_us": float(x["p99_latency_ms"]) * 1000,
                    "rps": float(x["rps"])} for t, x in rows.items()}
    finally:
        stop([p])


# ---------------------------------------------------------------------------------------------
# Metadata sweep: bytes on the wire per update per remote site, by kind, and on idle links

def scrape_wire(cl):
    """Per kind, the bytes every site has sent over peer links (from each site's /metrics)."""
    base = int(cl.addrs[0].rsplit(":", 1)[1])
    total = {}
    for i in range(cl.n):
        c = http.client.HTTPConnection("127.0.0.1", base + 1000 + i, timeout=5)
        c.request("GET", "/metrics")
        body = c.getresponse().read().decode()
        c.close()
        for line in body.splitlines():
            if line.startswith('causalkv_peer_bytes_out_total{kind="'):
                kind = line.split('"')[1]
                total[kind] = total.get(kind, 0) + int(float(line.rsplit(" ", 1)[1]))
    return total


def checked_run(cl, secs):
    """`causalkv bench checked` over every site of `cl` (sessions hopping between sites with their
    tokens): the causal checker's verdict on the history, and whether the sites converged."""
    seed = int(os.environ.get("CHECK_SEED", "0")) or random.randrange(1, 1 << 31)
    cmd = [BIN, "bench", "checked", "--certs", cl.certs, "--seconds", str(secs), "--timeout-ms", "20000",
           "--seed", str(seed)]
    for a in cl.addrs:
        cmd += ["--site", a]
    log(f"  checked workload over {cl.n} sites ({secs:.0f} s, seed {seed}; replay with CHECK_SEED={seed}) ...")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 120)
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        r = {"ok": False, "error": (p.stderr or p.stdout)[-500:]}
    log(f"  checker: {'PASS' if r.get('ok') else 'FAIL'}: {r.get('ops', 0)} ops "
        f"({r.get('remote_reads', 0)} reads of other sites' writes, {r.get('hops', 0)} hops), "
        f"{r.get('violations', '?')} violations, converged {r.get('converged')}, errors {r.get('errors', '?')}")
    return r


def metadata_run(n, secs, rate=1000, idle_secs=None, variant="default", overrides=()):
    """n sites at `rate` ops/s each (50 % writes of 100 B values), then idle."""
    idle_secs = idle_secs or (3.0 if QUICK else 5.0)
    log(f"metadata: {n} sites at {rate} ops/s per site ({secs:.0f} s), then idle ({idle_secs:.0f} s), {variant} ...")
    cl = Cluster(n, "causal", overrides=overrides)
    try:
        time.sleep(0.6)
        b0, p0 = cl.wire()
        k0 = scrape_wire(cl)
        gens = [spawn(load_cmd(cl, s, secs, rate=rate), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                      text=True) for s in range(n)]
        loads = []
        for g in gens:
            out, _ = g.communicate()
            procs.remove(g)
            loads.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no output"})
        time.sleep(1.0)  # the last batches and acks
        b1, p1 = cl.wire()
        k1 = scrape_wire(cl)
        puts = sum(l.get("put", {}).get("count", 0) for l in loads)
        kv = 11 + 100
        per = (b1 - b0) / (puts * (n - 1)) if puts else None
        kinds = {k: (k1.get(k, 0) - k0.get(k, 0)) / (puts * (n - 1)) if puts else None for k in k1}
        time.sleep(1.0)
        i0, _ = cl.wire()
        ik0 = scrape_wire(cl)
        t0 = time.time()
        time.sleep(idle_secs)
        i1, _ = cl.wire()
        ik1 = scrape_wire(cl)
        links = (time.time() - t0) * n * (n - 1)
        idle = (i1 - i0) / links
        idle_kinds = {k: (ik1.get(k, 0) - ik0.get(k, 0)) / links for k in ik1}
        r = {"sites": n, "variant": variant, "rate_per_site": rate, "seconds": secs, "puts": puts, "key_value_bytes": kv,
             "wire_bytes": b1 - b0, "wire_packets": p1 - p0,
             "bytes_per_update_per_remote_site": per, "ratio_to_key_value": per / kv if per else None,
             "by_kind_per_update_per_remote_site": kinds,
             "idle_bytes_per_second_per_link": idle, "idle_by_kind_per_second_per_link": idle_kinds,
             "throughput": sum(l.get("throughput", 0) for l in loads),
             "errors": sum(l.get("errors", 0) for l in loads),
             "put_p50_us": loads[0].get("put", {}).get("p50_us")}
        log(f"  {n} sites: {puts} puts, {per or 0:,.1f} B per update per remote site ({(per or 0) / kv:.2f}x key+value), "
            f"idle {idle:,.0f} B/s per link")
        log("  by kind (B per update per remote site): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items()) if v))
        log("  idle by kind (B/s per link): "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(idle_kinds.items()) if v))
        r["checked"] = checked_run(cl, secs)
        return r
    finally:
        cl.close()


def metadata_sweep(ns, secs):
    out = []
    for n in ns:
        for name, overrides in variants():
            try:
                out.append(metadata_run(n, secs, variant=name, overrides=overrides))
            except Exception as e:
                log(f"  metadata run with {n} sites ({name}) failed: {e}")
                out.append({"sites": n, "variant": name, "error": str(e)})
    md = ["# Metadata: bytes on the wire per 100-byte update", "", f"Command: `{CMDLINE}`"
          + (f", BENCH_VARIANTS=`{os.environ['BENCH_VARIANTS']}`" if os.environ.get("BENCH_VARIANTS") else ""), "",
          "| sites | variant | puts | B/update/remote site | x key+value | idle B/s per link | by kind (B/update/remote site) "
          "| causal checker (ops, reads of other sites' writes, violations, converged, seed) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in out:
        if "error" in r:
            md.append(f"| {r['sites']} | {r['variant']} | failed: {r['error'][:80]} | | | | | |")
            continue
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["by_kind_per_update_per_remote_site"].items()) if v)
        c = r.get("checked", {})
        verdict = (f"{'pass' if c.get('ok') else 'FAIL'}: {c.get('ops', 0)} ops, {c.get('remote_reads', 0)}, "
                   f"{c.get('violations', '?')}, {c.get('converged')}, {c.get('seed', '?')}")
        md.append(f"| {r['sites']} | {r['variant']} | {r['puts']} | {r['bytes_per_update_per_remote_site']:.1f} | "
                  f"{r['ratio_to_key_value']:.2f} | {r['idle_bytes_per_second_per_link']:.0f} | {kinds} | {verdict} |")
    return write_section("metadata", md, out)


def write_section(stem, md, out):
    """A section's table (STEM.md) and measurements (STEM.json) in OUT; returns `out`."""
    with open(os.path.join(OUT, f"{stem}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(OUT, f"{stem}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


# ---------------------------------------------------------------------------------------------
# Restart catch-up: how long a restarted site takes to receive what it missed

def restart_sweep(restarts, down=2.0, rate=500):
    """Sites a and b write at `rate` puts/s each (open loop) for the whole sweep; site c is killed
    with SIGKILL, stays down `down` seconds while the backlog grows, and is started again on its
    data directory, `restarts` times. Per restart: the target is a's and b's own entries of their
    `applied` vectors right before the restart (the backlog c must receive); measured from the
    restart to c's first status answer (serving) and to c's `applied` covering the target."""
    cl = Cluster(3, "causal")
    m = one_way(3)
    rtt = max(m[i][j] + m[j][i] for i in range(3) for j in range(3))
    rows = []
    # Each poll is one `causalkv status` process with a 200 ms request timeout: a poll that meets
    # a site not yet listening costs that much, so `serving` is late by up to 200 ms.
    status = lambda i: run_json(cl.status_cmd(cl.addrs[i]) + ["--timeout-ms", "200"], timeout=5)
    try:
        secs = restarts * (down + 6) + 20
        gens = [spawn(load_cmd(cl, s, secs, conc=16, read=0.0, rate=rate), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL) for s in (0, 1)]
        time.sleep(2)
        for k in range(restarts):
            c = cl.sites[2]
            c.send_signal(signal.SIGKILL)
            c.wait()
            time.sleep(down)  # the backlog grows at a and b while c is down
            target = [status(0)["applied"][0], status(1)["applied"][1]]
            t0 = time.time()
            cl.restart(2)
            serving = first = None
            while time.time() - t0 < 60:
                try:
                    st = status(2)
                except Exception:
                    time.sleep(0.01)
                    continue
                now = time.time() - t0
                if serving is None:
                    serving, first = now, st["applied"][:2]
                if st["applied"][0] >= target[0] and st["applied"][1] >= target[1]:
                    rows.append({"restart": k, "serving_s": serving, "caught_up_s": now,
                                 "target": target, "applied_when_serving": first})
                    log(f"  restart {k}: serving after {serving * 1000:.0f} ms, caught up after {now * 1000:.0f} ms")
                    break
            else:
                rows.append({"restart": k, "error": "not caught up within 60 s", "target": target})
                log(f"  restart {k}: not caught up within 60 s")
            time.sleep(2)
        for g in gens:
            g.kill()
            g.wait()
            procs.remove(g)
    finally:
        cl.close()
    ok = [r for r in rows if "error" not in r]
    cu = sorted(r["caught_up_s"] for r in ok)
    sv = sorted(r["serving_s"] for r in ok)
    budget = 1.0 + rtt / 1000
    q = lambda v, f: v[min(len(v) - 1, int(len(v) * f))] * 1000 if v else 0
    md = ["# Restart catch-up (3 sites, one-way 15/40/75 ms)", "", f"Command: `{CMDLINE}`", "",
          f"Sites a and b write {rate} puts/s each (open loop, 100 B values) throughout; c is killed with "
          f"SIGKILL, stays down {down:.0f} s, and restarts on its data directory, {restarts} times. Caught up: "
          "c's `applied` covers a's and b's own entries as they were right before the restart (polled with "
          "`causalkv status`, one process per poll with a 200 ms request timeout, so each time is late by "
          "up to a poll).", "",
          f"| restarts | serving p50 / max ms | caught up p50 / max ms | budget (1 s + largest RTT) ms | all within |",
          "|---|---|---|---|---|",
          f"| {len(ok)} of {len(rows)} | {q(sv, 0.5):.0f} / {q(sv, 1.0):.0f} | {q(cu, 0.5):.0f} / {q(cu, 1.0):.0f} | "
          f"{budget * 1000:.0f} | {'yes' if ok and len(ok) == len(rows) and cu[-1] <= budget else '**no**'} |", "",
          "Per restart (ms, serving / caught up): " + ", ".join(
              f"{r['serving_s'] * 1000:.0f} / {r['caught_up_s'] * 1000:.0f}" if "error" not in r else "failed"
              for r in rows)]
    return write_section("restart", md, rows)


# ---------------------------------------------------------------------------------------------
# Loss sweep: visibility under datagram loss on every link, with and without jitter

def variants():
    """BENCH_VARIANTS="name:key=value,key=value name2:..." runs each setting of the loss sweep once
    per variant, interleaved, with those site configuration keys replaced (default: one variant, the
    configuration as `causalkv dev` lays it out)."""
    out = []
    for spec in os.environ.get("BENCH_VARIANTS", "").split():
        name, _, kvs = spec.partition(":")
        out.append((name, [tuple(kv.split("=", 1)) for kv in kvs.split(",") if kv]))
    return out or [("default", [])]


def loss_sweep(losses, jitters, secs, rate=500):
    out = []
    for jitter in jitters:
        for loss in losses:
            for name, overrides in variants():
                log(f"loss: {loss:.1%} on every link, jitter {jitter} ms, {rate} ops/s per site, {name} ...")
                # `probe` is the visibility probe's mode, not a site setting.
                mode = dict(overrides).get("probe", PROBE)
                overrides = [kv for kv in overrides if kv[0] != "probe"]
                try:
                    cl = Cluster(3, "causal", loss=loss, jitter=jitter, overrides=overrides)
                    try:
                        r = workload(cl, f"loss-{loss}-jitter-{jitter}-{name}", secs, rate=rate,
                                     probe_mode=mode)
                    finally:
                        cl.close()
                    r.update({"loss": loss, "jitter_ms": jitter, "variant": name, "probe": mode})
                    out.append(r)
                except Exception as e:
                    log(f"  loss {loss} jitter {jitter} {name} failed: {e}")
                    out.append({"loss": loss, "jitter_ms": jitter, "variant": name, "error": str(e)})
    md = [f"# Visibility under loss (3 sites, one-way 15/40/75 ms, {rate} ops/s per site)", "", f"Command: `{CMDLINE}`"
          + (f", BENCH_VARIANTS=`{os.environ['BENCH_VARIANTS']}`" if os.environ.get("BENCH_VARIANTS") else ""), "",
          "| loss | jitter ms | variant | put p50 ms (a) | visibility p50 / p99 ms at b | at c | B/update |",
          "|---|---|---|---|---|---|---|"]
    for r in out:
        if "error" in r:
            md.append(f"| {r['loss']} | {r['jitter_ms']} | {r['variant']} | failed | | | |")
            continue
        v = (r.get("visibility") or {}).get("sites", [])
        cell = lambda s: f"{s['latency']['p50_us']/1000:.1f} / {s['latency']['p99_us']/1000:.1f}"
        put = r["loads"][0].get("put", {}).get("p50_us", 0) / 1000
        md.append(f"| {r['loss']} | {r['jitter_ms']} | {r['variant']} | {put:.2f} | {cell(v[0]) if len(v) > 0 else ''} | "
                  f"{cell(v[1]) if len(v) > 1 else ''} | {r['wire_bytes_per_update'] or 0:.0f} |")
    return write_section("loss", md, out)


# ---------------------------------------------------------------------------------------------

def strong_md(st, cmd):
    s = st["summary"]
    ms = lambda us: f"{us / 1000:.1f}" if us else "-"
    rt = lambda x: f"{x:.2f}x" if x else "-"
    L = [f"Strong operations, causalkv vs etcd ({cmd}): 3 sites / members behind the same emulated WAN "
         f"(RTT a-b 30, a-c 80, b-c 150 ms), leaders at a, {len(st['rounds'])} interleaved rounds of "
         f"{st['seconds']:.0f} s (causalkv then etcd), medians over rounds. Ratio = causalkv / etcd.", "",
         "| measure | causalkv | etcd | ratio |", "|---|---|---|---|"]
    for tag in ["leader", "follower"]:
        for op, name in [("put", "strong put"), ("get", "linearizable get")]:
            for q in ["p50_us", "p99_us"]:
                v = s[f"{op}_{tag}_{q}"]
                L.append(f"| {name} {q[:3]} at the {tag}'s site, 1 in flight (ms) | {ms(v['causalkv'])} | "
                         f"{ms(v['etcd'])} | {rt(v['ratio'])} |")
    for c in [8, 64]:
        v = s[f"cas_c{c}_per_s"]
        L.append(f"| compare-and-set, {c} in flight (ops/s) | {v['causalkv']:,.0f} | {v['etcd']:,.0f} | {rt(v['ratio'])} |")
    for k in ["causalkv", "etcd"]:
        v = s[f"failover_{k}_s"]
        if v["kills"]:
            L.append(f"| {k} failover, kill -9 of the leader -> write at b ok (s), p50 / max over {v['kills']} | "
                     f"{v['p50']:.2f} / {v['max']:.2f} | | |")
    v = s["causal_put_p50_us"]
    L.append(f"| causal put p50 at a, alone / with 64 cas in flight (ms) | {ms(v['alone'])} / {ms(v['under_strong'])} | | |")
    L += ["", "Per round:", ""]
    for r in st["rounds"]:
        L.append(f"- round {r['round']}: " + ", ".join(
            f"{k} put p50 {ms(r[k]['put']['p50_us'])} get p50 {ms(r[k]['get']['p50_us'])}"
            for k in ["ckv_ops_leader", "etcd_ops_leader", "ckv_ops_follower", "etcd_ops_follower"]) + "; " +
            ", ".join(f"{k} {r[k]['throughput']:,.0f}/s" for k in ["ckv_cas_c8", "etcd_cas_c8", "ckv_cas_c64", "etcd_cas_c64"]))
    L.append(f"- failover causalkv (s): {', '.join(f'{x:.2f}' for x in st['failover']['causalkv'])}")
    L.append(f"- failover etcd (s): {', '.join(f'{x:.2f}' for x in st['failover']['etcd'])}")
    return "\n".join(L) + "\n"


def run_strong(res):
    secs = float(os.environ.get("BENCH_STRONG_SECONDS", min(T, 5.0)))
    try:
        st = strong_bench(secs, int(os.environ.get("BENCH_STRONG_ROUNDS", 3)),
                          int(os.environ.get("BENCH_STRONG_KILLS", 5)))
        st["seconds"] = secs
        st["machine"] = {"cpus": os.cpu_count(), "load_after": os.getloadavg()}
        res["strong"] = st
        with open(os.path.join(OUT, "strong.json"), "w") as f:
            json.dump(st, f, indent=1)
        with open(os.path.join(OUT, "strong.md"), "w") as f:
            f.write(strong_md(st, CMDLINE))
        log("strong summary:\n" + strong_md(st, CMDLINE))
    except Exception as ex:
        log(f"  strong section failed: {ex}")
        res["strong"] = {"error": str(ex)}


def main():
    if STRONG_ONLY:
        run_strong({})
        return
    res = {"command": CMDLINE, "quick": QUICK, "seconds_per_run": T, "rtt_ms": {"a-b": 30, "a-c": 80, "b-c": 150},
           "one_way_ms": one_way(3), "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
           "runs": [], "sweeps": {}}
    log("emulator self-test (0 and 20 ms links) ...")
    res["emulator_self_test"] = run_json(["nice", "-n", "-10", BIN, "wan", "--self-test", "--samples",
                                          "1000" if QUICK else "3000"])
    for s in res["emulator_self_test"]:
        log(f"  {s['delay_ms']:.0f} ms link: added p50 {s['added_p50_us']:.0f} us, p99 {s['added_p99_us']:.0f} us")
    open_rate = 200 if QUICK else 500
    for mode in ["causal", "eventual"]:
        log(f"{mode}: starting 3 sites behind the emulated WAN ...")
        cl = Cluster(3, mode)
        try:
            res["runs"].append(workload(cl, "mixed50", T))
            if not QUICK:
                # Closed-loop throughput is CPU-bound and this machine is shared: a second run
                # of the same workload, so the headline can compare the better of two per mode.
                res["runs"].append(workload(cl, "mixed50-again", T))
                res["runs"].append(workload(cl, "read95", T, read=0.95, zipf=0.99))
            res["runs"].append(workload(cl, "open", T, rate=open_rate))
            res["runs"].append(workload(cl, "light", T, rate=100))
            if mode == "causal":
                cl.mode = "sync"
                res["runs"].append(workload(cl, "mixed50", T, sync=1))
                cl.mode = "causal"
                for v in ([100, 65536] if QUICK else [100, 4096, 65536]):
                    res["runs"].append(workload(cl, f"values-{v}", max(3.0, T / 2), sites=[0], probe=False,
                                                conc=4, read=0.0, value=v))
        finally:
            cl.close()
    log("etcd: 3 members behind the emulated WAN ...")
    try:
        res["etcd"] = etcd_bench(T, [1] if QUICK else [1, 8])
    except Exception as e:
        log(f"  etcd failed: {e}")
        res["etcd"] = {"error": str(e)}
    if STRONG:
        run_strong(res)
    log("redis: single-site local anchor ...")
    try:
        res["redis"] = redis_anchor(5000 if QUICK else 20000)
    except Exception as e:
        res["redis"] = {"error": str(e)}
    if SWEEPS:
        res["sweeps"]["sites"] = []
        for n in [3, 5, 8]:
            log(f"sweep: {n} sites ...")
            try:
                cl = Cluster(n, "causal")
                try:
                    r = workload(cl, f"sites-{n}", max(4.0, T * 0.75), sites=[0], probe=True, conc=8)
                    res["sweeps"]["sites"].append(r)
                finally:
                    cl.close()
            except Exception as e:
                log(f"  sweep with {n} sites failed: {e}")
        res["sweeps"]["loss"] = []
        for loss in [0.0, 0.01, 0.05]:
            log(f"sweep: {loss:.0%} loss on every link ...")
            try:
                cl = Cluster(3, "causal", loss=loss)
                try:
                    r = workload(cl, f"loss-{loss}", T, rate=open_rate)
                    r["loss"] = loss
                    res["sweeps"]["loss"].append(r)
                finally:
                    cl.close()
            except Exception as e:
                log(f"  sweep with {loss:.0%} loss failed: {e}")
    res["metadata"] = metadata_sweep([3] if QUICK else ([3, 5, 8, 16] if SWEEPS else [3]), max(3.0, T * 0.75))
    res["machine"]["load_after"] = os.getloadavg()
    res["wall_seconds"] = time.time() - T0
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    log(f"done in {time.time() - T0:.0f} s; writing tables and plots")


try:
    if METADATA_ONLY:
        metadata_sweep([int(x) for x in METADATA_ONLY.split()], float(SECS) if SECS else 6.0)
    if LOSS_ONLY:
        loss_sweep([float(x) for x in LOSS_ONLY.split()],
                   [float(x) for x in os.environ.get("BENCH_JITTERS", "0 5").split()],
                   float(SECS) if SECS else 6.0, rate=int(os.environ.get("BENCH_RATE", "500")))
    if os.environ.get("RESTART_ONLY"):
        restart_sweep(int(os.environ["RESTART_ONLY"]))
    if not (METADATA_ONLY or LOSS_ONLY or os.environ.get("RESTART_ONLY")):
        main()
finally:
    stop(list(procs))
PY
[ -n "$METADATA_ONLY$LOSS_ONLY$RESTART_ONLY" ] || [ "$STRONG_ONLY" = 1 ] || python3 scripts/plot.py "$OUT"
