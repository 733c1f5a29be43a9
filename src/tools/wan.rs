//! User-space WAN emulation: a mesh of delaying relays between sites on loopback.
//!
//! The benchmark machines have no `netem`, so the wide-area network is emulated here, in user
//! space, with all traffic on `127.0.0.0/8`. A [`Wan`] holds one directed [`Link`] per ordered
//! pair of sites `(i, j)`, each with its own [`LinkParams`]: one-way delay, jitter, loss,
//! reordering and a bandwidth limit, and a cut switch that can be flipped at runtime.
//!
//! Relays put traffic on the links:
//!
//! - [`Wan::udp_relay`] (QUIC between causalkv sites): site `i` dials site `j` at the address in
//!   `i`'s own configuration, so for every directed pair there is one relay listening on its own
//!   port and forwarding to `j`'s real address; [`relay_layout`] starts them and rewrites each
//!   site's configuration (`sites[j].addr` in site `i`'s file) to point at them. Datagrams from
//!   `i` travel on link `i → j`; the replies on that connection come back through the same relay
//!   on link `j → i`, so the round trip is `d(i→j) + d(j→i)`.
//! - [`Wan::tcp_relay`] (etcd peers): one relay in front of a member. TCP cannot drop or reorder
//!   bytes, so loss and reordering do not apply; delay, jitter (FIFO), bandwidth and cuts do (a
//!   cut holds the bytes back until healed, like a partition TCP retransmits through). The relay
//!   learns which member dialed from an HTTP request header on the connection's first bytes
//!   (`X-Server-From`, which etcd's peer transport sends with every peer request), mapped to a
//!   site index; connections it cannot attribute are relayed without delay.
//!
//! Timing: a relay thread receives a datagram, asks its link for a release time and hands it to
//! the one release thread of the [`Wan`], which keeps a heap of pending packets. Tokio timers
//! have a 1 ms granularity, so that thread sleeps (condition variable with timeout) until
//! [`SPIN_WINDOW`] before the earliest deadline and then spins, which puts releases within a few
//! microseconds of their deadline on an idle machine. [`self_test`] measures what the emulator
//! adds on top of the configured delay (`causalkv wan --self-test`).
//!
//! Runtime control: the Rust API ([`Link::set_cut`], [`Link::set_params`], [`Wan::cut`],
//! [`Wan::isolate`], and [`Wan::hold`], which queues a link's packets instead of dropping them)
//! and, for scripts, a control text applied with [`Wan::apply_control`]
//! (`causalkv wan --control FILE` re-reads the file whenever it changes; an empty file restores
//! the base matrix):
//!
//! ```text
//! # one command per line; sites by name or index; a>b is one direction, a b both
//! cut a b
//! cut a>c
//! isolate c
//! set a>b delay_ms=40 jitter_ms=2 loss=0.01
//! set * loss=0.05
//! ```

use std::collections::{BinaryHeap, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How long before a deadline the release thread stops sleeping and starts spinning.
///
/// The release thread asks the kernel for a 1 ns timer slack (`PR_SET_TIMERSLACK`; the default is
/// 50 µs), so its timed waits already wake within tens of microseconds and only this short final
/// stretch is spent spinning. A longer window would keep a core busy at high packet rates, which on
/// a small machine slows the very sites being measured.
pub const SPIN_WINDOW: Duration = Duration::from_micros(40);

/// How often blocked relay threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The behaviour of one directed link.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkParams {
    /// One-way delay in milliseconds.
    pub delay_ms: f64,
    /// Jitter in milliseconds: each packet's delay varies uniformly by up to this much either
    /// way. Packets stay in order unless reordered (see `reorder`).
    pub jitter_ms: f64,
    /// Probability that a datagram is dropped (UDP only).
    pub loss: f64,
    /// Probability that a datagram is held back by `reorder_gap_ms`, so that the following
    /// ones overtake it (UDP only).
    pub reorder: f64,
    /// How long a reordered datagram is held back, in milliseconds.
    pub reorder_gap_ms: f64,
    /// Bandwidth limit in megabits per second (0: unlimited). Packets queue behind each other
    /// at this rate before the delay applies.
    pub bandwidth_mbit: f64,
    /// Longest queue, in milliseconds of transmission at the bandwidth limit, before
    /// datagrams are dropped (tail drop).
    pub queue_ms: f64,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            delay_ms: 0.0,
            jitter_ms: 0.0,
            loss: 0.0,
            reorder: 0.0,
            reorder_gap_ms: 2.0,
            bandwidth_mbit: 0.0,
            queue_ms: 500.0,
        }
    }
}

impl LinkParams {
    /// These parameters with this one-way delay.
    pub fn with_delay_ms(mut self, ms: f64) -> Self {
        self.delay_ms = ms;
        self
    }

    /// Sets one field by name (`delay_ms=40`, `loss=0.01`, ...), as in the control text.
    pub fn set(&mut self, field: &str, value: &str) -> Result<(), String> {
        let v: f64 = value
            .parse()
            .map_err(|_| format!("{field}: {value:?} is not a number"))?;
        let slot = match field {
            "delay_ms" => &mut self.delay_ms,
            "jitter_ms" => &mut self.jitter_ms,
            "loss" => &mut self.loss,
            "reorder" => &mut self.reorder,
            "reorder_gap_ms" => &mut self.reorder_gap_ms,
            "bandwidth_mbit" => &mut self.bandwidth_mbit,
            "queue_ms" => &mut self.queue_ms,
            _ => return Err(format!("unknown link parameter {field:?}")),
        };
        *slot = v;
        Ok(())
    }
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

/// Counters and settings of one directed link.
#[derive(Clone, Debug, Serialize)]
pub struct LinkStats {
    /// Sending site.
    pub from: usize,
    /// Receiving site.
    pub to: usize,
    /// Datagrams (UDP) or chunks (TCP) delivered.
    pub packets: u64,
    /// Payload bytes delivered (UDP payload or TCP stream bytes, no IP/UDP/TCP headers).
    pub bytes: u64,
    /// Dropped by the loss setting.
    pub dropped_loss: u64,
    /// Dropped while the link was cut.
    pub dropped_cut: u64,
    /// Dropped because the bandwidth queue was full.
    pub dropped_queue: u64,
    /// Whether the link is cut now.
    pub cut: bool,
    /// Current parameters.
    pub params: LinkParams,
}

struct LinkState {
    params: LinkParams,
    rng: rand_chacha::ChaCha8Rng,
    busy_until: Instant,
    last_due: Instant,
}

/// One directed link `from → to`.
pub struct Link {
    from: usize,
    to: usize,
    state: Mutex<LinkState>,
    cut: AtomicBool,
    /// `Some` while the link is held: the packets admitted meanwhile, in order.
    held: Mutex<Option<Vec<Job>>>,
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_queue: AtomicU64,
}

impl Link {
    fn new(from: usize, to: usize, params: LinkParams) -> Self {
        let now = Instant::now();
        Self {
            from,
            to,
            state: Mutex::new(LinkState {
                params,
                rng: rand_chacha::ChaCha8Rng::seed_from_u64((from * 1000 + to) as u64 + 7),
                busy_until: now,
                last_due: now,
            }),
            cut: AtomicBool::new(false),
            held: Mutex::new(None),
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped_loss: AtomicU64::new(0),
            dropped_cut: AtomicU64::new(0),
            dropped_queue: AtomicU64::new(0),
        }
    }

    /// Replaces the parameters (for packets arriving from now on).
    pub fn set_params(&self, p: LinkParams) {
        lock(&self.state).params = p;
    }

    /// The current parameters.
    pub fn params(&self) -> LinkParams {
        lock(&self.state).params
    }

    /// Cuts (drops everything; TCP holds it back) or heals the link.
    pub fn set_cut(&self, on: bool) {
        self.cut.store(on, Ordering::Relaxed);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    /// Whether the link is held (see [`Wan::hold`]).
    pub fn is_held(&self) -> bool {
        lock(&self.held).is_some()
    }

    /// Hands `job` to the release thread at `due`, or queues it while the link is held. The
    /// check and the hand-over happen under one lock, so a release never overtakes a packet.
    fn release_at(&self, sched: &Scheduler, due: Instant, job: Job) {
        let mut held = lock(&self.held);
        match held.as_mut() {
            Some(queue) => queue.push(job),
            None => sched.push(due, job),
        }
    }

    /// Holds the link, or releases it: every packet held meanwhile goes out now, in order.
    fn set_hold(&self, sched: &Scheduler, on: bool) {
        let mut held = lock(&self.held);
        if on {
            held.get_or_insert_with(Vec::new);
        } else if let Some(queue) = held.take() {
            let now = Instant::now();
            for job in queue {
                sched.push(now, job);
            }
        }
    }

    /// Counters and settings.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            from: self.from,
            to: self.to,
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped_loss: self.dropped_loss.load(Ordering::Relaxed),
            dropped_cut: self.dropped_cut.load(Ordering::Relaxed),
            dropped_queue: self.dropped_queue.load(Ordering::Relaxed),
            cut: self.is_cut(),
            params: self.params(),
        }
    }

    /// When a packet of `len` bytes arriving now is to be released, or `None` if it is dropped.
    /// `stream` (TCP): never dropped, never reordered (the caller waits out cuts).
    fn admit(&self, len: usize, stream: bool) -> Option<Instant> {
        if !stream && self.is_cut() {
            self.dropped_cut.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let now = Instant::now();
        let mut st = lock(&self.state);
        let p = st.params;
        if !stream && p.loss > 0.0 && st.rng.r#gen::<f64>() < p.loss {
            self.dropped_loss.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut sent = now;
        if p.bandwidth_mbit > 0.0 {
            let tx = Duration::from_secs_f64(len as f64 * 8.0 / (p.bandwidth_mbit * 1e6));
            let start = st.busy_until.max(now);
            if !stream && start - now > ms(p.queue_ms) {
                self.dropped_queue.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            st.busy_until = start + tx;
            sent = st.busy_until;
        }
        let mut delay = p.delay_ms;
        if p.jitter_ms > 0.0 {
            delay += st.rng.gen_range(-p.jitter_ms..=p.jitter_ms);
        }
        let mut due = sent + ms(delay);
        if !stream && p.reorder > 0.0 && st.rng.r#gen::<f64>() < p.reorder {
            // Held back, outside the FIFO order: the next packets overtake it.
            due += ms(p.reorder_gap_ms);
        } else {
            due = due.max(st.last_due);
            st.last_due = due;
        }
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        Some(due)
    }
}

enum Job {
    Udp {
        sock: Arc<UdpSocket>,
        to: Option<SocketAddr>,
        data: Vec<u8>,
    },
    Stream {
        tx: mpsc::Sender<Vec<u8>>,
        data: Vec<u8>,
    },
}

impl Job {
    fn run(self) {
        match self {
            Job::Udp { sock, to, data } => {
                let _ = match to {
                    Some(a) => sock.send_to(&data, a),
                    None => sock.send(&data),
                };
            }
            Job::Stream { tx, data } => {
                let _ = tx.send(data);
            }
        }
    }
}

struct Pending {
    due: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Min-heap on (due, seq).
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Pending>,
    seq: u64,
}

/// The release thread's queue: a heap of pending packets by deadline.
struct Scheduler {
    q: Mutex<Queue>,
    cv: Condvar,
    /// Set by every push, so a spinning release thread re-checks the head.
    dirty: AtomicBool,
    stop: AtomicBool,
}

impl Scheduler {
    fn push(&self, due: Instant, job: Job) {
        let mut q = lock(&self.q);
        q.seq += 1;
        let seq = q.seq;
        q.heap.push(Pending { due, seq, job });
        drop(q);
        self.dirty.store(true, Ordering::Release);
        self.cv.notify_one();
    }

    fn run(&self) {
        let mut batch = Vec::new();
        let mut q = lock(&self.q);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let Some(next) = q.heap.peek().map(|p| p.due) else {
                q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let now = Instant::now();
            if next <= now {
                while q.heap.peek().is_some_and(|p| p.due <= now) {
                    batch.push(q.heap.pop().expect("peeked").job);
                }
                drop(q);
                for job in batch.drain(..) {
                    job.run();
                }
                q = lock(&self.q);
                continue;
            }
            let wait = next - now;
            if wait > SPIN_WINDOW {
                q = self
                    .cv
                    .wait_timeout(q, wait - SPIN_WINDOW)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            self.dirty.store(false, Ordering::Relaxed);
            drop(q);
            while Instant::now() < next && !self.dirty.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            q = lock(&self.q);
        }
    }
}

/// Ask for precise timed waits on this thread: a 1 ns timer slack instead of the default 50 µs.
/// Linux only; elsewhere the platform's default timer precision applies.
pub(crate) fn precise_timers() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only changes this thread's
        // slack.
        let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            tracing::debug!("PR_SET_TIMERSLACK failed; timed waits keep the default slack");
        }
    }
}

/// Where a relay listens and what it forwards to.
#[derive(Clone, Debug, Serialize)]
pub struct RelayInfo {
    /// `udp` or `tcp`.
    pub kind: &'static str,
    /// The sending site (UDP relays); `None` for TCP relays, which attribute each connection.
    pub from: Option<usize>,
    /// The site behind the relay.
    pub to: usize,
    /// The relay's address: dial this instead of the target.
    pub listen: SocketAddr,
    /// The real address.
    pub target: SocketAddr,
}

/// How a TCP relay attributes a connection to the site that dialed it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpSources {
    /// HTTP request header naming the dialer (etcd: `X-Server-From`).
    pub header: String,
    /// Header value → site index.
    pub map: HashMap<String, usize>,
}

/// The emulated network: links, relays and the release thread.
pub struct Wan {
    names: Vec<String>,
    links: Vec<Arc<Link>>,
    direct: Arc<Link>,
    base: Mutex<Vec<LinkParams>>,
    sched: Arc<Scheduler>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    relays: Mutex<Vec<RelayInfo>>,
}

impl Wan {
    /// A network of `names.len()` sites whose link `i → j` starts with `params(i, j)`.
    pub fn new(names: Vec<String>, params: impl Fn(usize, usize) -> LinkParams) -> Wan {
        let n = names.len();
        let mut links = Vec::with_capacity(n * n);
        let mut base = Vec::with_capacity(n * n);
        for i in 0..n {
            for j in 0..n {
                let p = params(i, j);
                base.push(p);
                links.push(Arc::new(Link::new(i, j, p)));
            }
        }
        let sched = Arc::new(Scheduler {
            q: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            dirty: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = sched.clone();
        let release = std::thread::Builder::new()
            .name("wan-release".into())
            .spawn(move || {
                precise_timers();
                s.run()
            })
            .expect("spawn the release thread");
        Wan {
            names,
            links,
            direct: Arc::new(Link::new(usize::MAX, usize::MAX, LinkParams::default())),
            base: Mutex::new(base),
            sched,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Arc::new(Mutex::new(vec![release])),
            relays: Mutex::new(Vec::new()),
        }
    }

    /// A network whose one-way delays are `matrix_ms[i][j]` (milliseconds), every link
    /// otherwise like `template`.
    pub fn from_matrix(names: Vec<String>, matrix_ms: &[Vec<f64>], template: LinkParams) -> Wan {
        Wan::new(names, |i, j| {
            let d = matrix_ms
                .get(i)
                .and_then(|r| r.get(j))
                .copied()
                .unwrap_or(0.0);
            template.with_delay_ms(d)
        })
    }

    /// Number of sites.
    pub fn sites(&self) -> usize {
        self.names.len()
    }

    /// Site names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The directed link `from → to`.
    pub fn link(&self, from: usize, to: usize) -> &Arc<Link> {
        &self.links[from * self.sites() + to]
    }

    /// Cuts or heals both directions between `a` and `b`.
    pub fn cut(&self, a: usize, b: usize, on: bool) {
        self.link(a, b).set_cut(on);
        self.link(b, a).set_cut(on);
    }

    /// Holds link `from → to` (its packets queue, in order, instead of being delivered) or
    /// releases it (everything held goes out at once). Nothing is dropped, unlike a cut: this is
    /// a link that stalls and then catches up.
    pub fn hold(&self, from: usize, to: usize, on: bool) {
        self.link(from, to).set_hold(&self.sched, on);
    }

    /// Cuts or heals every link of site `a`.
    pub fn isolate(&self, a: usize, on: bool) {
        for b in (0..self.sites()).filter(|&b| b != a) {
            self.cut(a, b, on);
        }
    }

    /// Every link's counters.
    pub fn stats(&self) -> Vec<LinkStats> {
        let n = self.sites();
        (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| self.link(i, j).stats())
            .collect()
    }

    /// The relays started so far.
    pub fn relays(&self) -> Vec<RelayInfo> {
        lock(&self.relays).clone()
    }

    fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) {
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .expect("spawn a relay thread");
        lock(&self.threads).push(h);
    }

    /// Starts a UDP relay for link `from → to`: it listens on `listen` (port 0: any free port)
    /// and forwards to `target`, through one upstream socket per sender address; replies
    /// travel back on link `to → from`. Returns the relay's address.
    pub fn udp_relay(
        &self,
        from: usize,
        to: usize,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> std::io::Result<SocketAddr> {
        let main = Arc::new(udp_socket(listen)?);
        let addr = main.local_addr()?;
        let (fwd, back) = (self.link(from, to).clone(), self.link(to, from).clone());
        let (sched, stop, threads) = (self.sched.clone(), self.stop.clone(), self.threads.clone());
        self.spawn(&format!("wan-udp-{from}-{to}"), move || {
            let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, src)) = main.recv_from(&mut buf) else {
                    continue;
                };
                let up = match ups.get(&src) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = udp_socket(SocketAddr::new(listen.ip(), 0)) else {
                            continue;
                        };
                        if u.connect(target).is_err() {
                            continue;
                        }
                        let u = Arc::new(u);
                        let (u2, main, back, sched, stop) = (
                            u.clone(),
                            main.clone(),
                            back.clone(),
                            sched.clone(),
                            stop.clone(),
                        );
                        let h = std::thread::Builder::new()
                            .name(format!("wan-udp-{to}-{from}"))
                            .spawn(move || {
                                let mut buf = vec![0u8; 65_536];
                                while !stop.load(Ordering::Relaxed) {
                                    let Ok(n) = u2.recv(&mut buf) else { continue };
                                    if let Some(due) = back.admit(n, false) {
                                        let data = buf[..n].to_vec();
                                        let (sock, to) = (main.clone(), Some(src));
                                        back.release_at(&sched, due, Job::Udp { sock, to, data });
                                    }
                                }
                            })
                            .expect("spawn a relay thread");
                        lock(&threads).push(h);
                        ups.insert(src, u.clone());
                        u
                    }
                };
                if let Some(due) = fwd.admit(n, false) {
                    let data = buf[..n].to_vec();
                    fwd.release_at(
                        &sched,
                        due,
                        Job::Udp {
                            sock: up,
                            to: None,
                            data,
                        },
                    );
                }
            }
        });
        lock(&self.relays).push(RelayInfo {
            kind: "udp",
            from: Some(from),
            to,
            listen: addr,
            target,
        });
        Ok(addr)
    }

    /// Starts a TCP relay in front of site `to`: it listens on `listen` and forwards each
    /// connection to `target`. The dialing site is found with `sources` (see [`TcpSources`]);
    /// bytes to `to` travel on link `from → to`, bytes back on `to → from`. Connections that
    /// cannot be attributed are relayed without delay. Returns the relay's address.
    pub fn tcp_relay(
        &self,
        to: usize,
        listen: SocketAddr,
        target: SocketAddr,
        sources: TcpSources,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let links: Vec<(Arc<Link>, Arc<Link>)> = (0..self.sites())
            .map(|i| (self.link(i, to).clone(), self.link(to, i).clone()))
            .collect();
        let direct = self.direct.clone();
        let (sched, stop) = (self.sched.clone(), self.stop.clone());
        let sources = Arc::new(sources);
        self.spawn(&format!("wan-tcp-{to}"), move || {
            while !stop.load(Ordering::Relaxed) {
                let conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let (links, direct, sched, stop, sources) = (
                    links.clone(),
                    direct.clone(),
                    sched.clone(),
                    stop.clone(),
                    sources.clone(),
                );
                std::thread::spawn(move || {
                    let _ = tcp_connection(conn, target, &links, &direct, &sources, sched, stop);
                });
            }
        });
        lock(&self.relays).push(RelayInfo {
            kind: "tcp",
            from: None,
            to,
            listen: addr,
            target,
        });
        Ok(addr)
    }

    /// Applies a control text (see the module docs) on top of the base parameters: every link
    /// not mentioned returns to its base parameters and is healed.
    pub fn apply_control(&self, text: &str) -> Result<(), String> {
        let n = self.sites();
        let mut params = lock(&self.base).clone();
        let mut cut = vec![false; n * n];
        for (lineno, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |m: String| format!("control line {}: {m}", lineno + 1);
            let mut words = line.split_whitespace();
            let cmd = words.next().unwrap_or("");
            let words: Vec<&str> = words.collect();
            match cmd {
                "cut" | "set" => {
                    let (pairs, rest) = self.parse_links(&words).map_err(err)?;
                    for (i, j) in pairs {
                        if cmd == "cut" {
                            cut[i * n + j] = true;
                            continue;
                        }
                        for kv in &rest {
                            let (k, v) = kv
                                .split_once('=')
                                .ok_or_else(|| err(format!("expected field=value, got {kv:?}")))?;
                            params[i * n + j].set(k, v).map_err(err)?;
                        }
                    }
                }
                "isolate" => {
                    for w in &words {
                        let a = self.site(w).map_err(err)?;
                        for b in (0..n).filter(|&b| b != a) {
                            cut[a * n + b] = true;
                            cut[b * n + a] = true;
                        }
                    }
                }
                _ => return Err(err(format!("unknown command {cmd:?}"))),
            }
        }
        for i in 0..n {
            for j in 0..n {
                self.link(i, j).set_params(params[i * n + j]);
                self.link(i, j).set_cut(cut[i * n + j]);
            }
        }
        Ok(())
    }

    fn site(&self, w: &str) -> Result<usize, String> {
        if let Some(i) = self.names.iter().position(|n| n == w) {
            return Ok(i);
        }
        match w.parse::<usize>() {
            Ok(i) if i < self.sites() => Ok(i),
            _ => Err(format!("unknown site {w:?}")),
        }
    }

    /// `a>b`, `a b` (both ways) or `*` (every link), then the remaining words.
    #[allow(clippy::type_complexity)]
    fn parse_links<'a>(
        &self,
        words: &[&'a str],
    ) -> Result<(Vec<(usize, usize)>, Vec<&'a str>), String> {
        let n = self.sites();
        match words {
            ["*", rest @ ..] => Ok((
                (0..n)
                    .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
                    .collect(),
                rest.to_vec(),
            )),
            [w, rest @ ..] if w.contains('>') => {
                let (a, b) = w.split_once('>').expect("contains >");
                Ok((vec![(self.site(a)?, self.site(b)?)], rest.to_vec()))
            }
            [a, b, rest @ ..] => {
                let (a, b) = (self.site(a)?, self.site(b)?);
                Ok((vec![(a, b), (b, a)], rest.to_vec()))
            }
            _ => Err("expected a>b, a b or *".into()),
        }
    }

    /// Stops every relay and the release thread and waits for them (TCP connection threads
    /// end on their own within [`POLL`]).
    pub fn shutdown(self) {
        self.signal_stop();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.sched.stop.store(true, Ordering::Relaxed);
        self.sched.cv.notify_all();
    }
}

/// Dropping a [`Wan`] stops its relays without waiting for them: each thread ends within
/// [`POLL`]. [`Wan::shutdown`] also waits.
impl Drop for Wan {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&addr.into())?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(POLL))?;
    Ok(s)
}

/// Reads the start of an HTTP request until the end of its headers (or 16 KiB, or 2 s) and
/// finds `header`'s value.
fn sniff(conn: &mut TcpStream, header: &str) -> std::io::Result<(Vec<u8>, Option<String>)> {
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while !first.windows(4).any(|w| w == b"\r\n\r\n")
        && first.len() < 16 << 10
        && Instant::now() < deadline
    {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => first.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    let text = String::from_utf8_lossy(&first);
    let value = text
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(header))
        .map(|(_, v)| v.trim().to_string());
    Ok((first, value))
}

fn tcp_connection(
    mut conn: TcpStream,
    target: SocketAddr,
    links: &[(Arc<Link>, Arc<Link>)],
    direct: &Arc<Link>,
    sources: &TcpSources,
    sched: Arc<Scheduler>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(POLL))?;
    let (first, value) = if sources.header.is_empty() {
        (Vec::new(), None)
    } else {
        sniff(&mut conn, &sources.header)?
    };
    let (fwd, back) = match value.and_then(|v| sources.map.get(&v).copied()) {
        Some(i) if i < links.len() => links[i].clone(),
        _ => (direct.clone(), direct.clone()),
    };
    let up = TcpStream::connect(target)?;
    up.set_nodelay(true)?;
    up.set_read_timeout(Some(POLL))?;
    pump(
        conn.try_clone()?,
        up.try_clone()?,
        fwd,
        first,
        &sched,
        &stop,
    );
    pump(up, conn, back, Vec::new(), &sched, &stop);
    Ok(())
}

/// Relays `src → dst` on `link`: a reader thread schedules each chunk, a writer thread writes
/// what the release thread hands it.
fn pump(
    mut src: TcpStream,
    mut dst: TcpStream,
    link: Arc<Link>,
    first: Vec<u8>,
    sched: &Arc<Scheduler>,
    stop: &Arc<AtomicBool>,
) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for data in rx {
            if dst.write_all(&data).is_err() {
                break;
            }
        }
        let _ = dst.shutdown(Shutdown::Write);
    });
    let (sched, stop) = (sched.clone(), stop.clone());
    std::thread::spawn(move || {
        let send = |data: Vec<u8>| {
            while link.is_cut() && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Some(due) = link.admit(data.len(), true) {
                let tx = tx.clone();
                link.release_at(&sched, due, Job::Stream { tx, data });
            }
        };
        if !first.is_empty() {
            send(first);
        }
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => send(buf[..n].to_vec()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    });
}

/// Starts one UDP relay per directed pair of the causalkv sites laid out in `dir` (the
/// `site-<name>.toml` files of `causalkv dev --layout-only`) and rewrites each site's file so
/// that it dials its peers through them (client addresses, a site's own entry, stay real).
/// The original files are kept as `site-<name>.toml.orig` and are what later calls start from.
pub fn relay_layout(wan: &Wan, dir: &Path) -> Result<Vec<RelayInfo>, String> {
    let file = |name: &str| dir.join(format!("site-{name}.toml"));
    let orig = |name: &str| PathBuf::from(format!("{}.orig", file(name).display()));
    let load = |name: &str| -> Result<crate::SiteConfig, String> {
        if !orig(name).exists() {
            std::fs::copy(file(name), orig(name)).map_err(|e| format!("{name}: {e}"))?;
        }
        crate::SiteConfig::load(&orig(name)).map_err(|e| e.to_string())
    };
    let n = wan.sites();
    let mut configs = Vec::new();
    for name in wan.names() {
        configs.push(load(name)?);
    }
    if configs.iter().any(|c| c.sites.len() != n) {
        return Err(format!("the layout in {} is not {n} sites", dir.display()));
    }
    let real: Vec<SocketAddr> = configs[0].sites.iter().map(|s| s.addr).collect();
    let mut out = Vec::new();
    for (i, cfg) in configs.iter_mut().enumerate() {
        for j in (0..n).filter(|&j| j != i) {
            let listen = SocketAddr::new(real[j].ip(), 0);
            let addr = wan
                .udp_relay(i, j, listen, real[j])
                .map_err(|e| format!("relay {i}->{j}: {e}"))?;
            cfg.sites[j].addr = addr;
        }
        let text = toml::to_string_pretty(cfg).map_err(|e| e.to_string())?;
        std::fs::write(file(&wan.names()[i]), text).map_err(|e| e.to_string())?;
    }
    out.extend(wan.relays());
    Ok(out)
}

/// A WAN emulator configuration file (`causalkv wan --config FILE`, JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WanSpec {
    /// Site names (default: `a`, `b`, ... as many as the matrix has rows).
    pub sites: Vec<String>,
    /// One-way delay in milliseconds from site `i` (row) to site `j` (column).
    pub matrix_ms: Vec<Vec<f64>>,
    /// Every other link parameter (its `delay_ms` is replaced by the matrix's).
    pub link: LinkParams,
    /// A causalkv layout directory to put behind UDP relays (see [`relay_layout`]).
    pub layout: Option<PathBuf>,
    /// TCP relays (etcd peers).
    pub tcp: Vec<TcpRelaySpec>,
}

/// One TCP relay of a [`WanSpec`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRelaySpec {
    /// The site behind the relay.
    pub site: usize,
    /// Where the relay listens.
    pub listen: SocketAddr,
    /// The site's real address.
    pub target: SocketAddr,
    /// How connections are attributed to dialing sites.
    #[serde(default)]
    pub sources: TcpSources,
}

/// Parses `"0,15,40;15,0,75;40,75,0"` (rows separated by `;`) into a matrix.
pub fn parse_matrix(s: &str) -> Result<Vec<Vec<f64>>, String> {
    let m: Vec<Vec<f64>> = s
        .split(';')
        .map(|row| {
            row.split(',')
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .map_err(|_| format!("bad delay {v:?}"))
                })
                .collect()
        })
        .collect::<Result<_, _>>()?;
    if m.iter().any(|r| r.len() != m.len()) {
        return Err(format!("the matrix must be square ({} rows)", m.len()));
    }
    Ok(m)
}

/// Builds the network a [`WanSpec`] describes and starts its relays.
pub fn start(spec: &WanSpec) -> Result<Wan, String> {
    let n = spec
        .matrix_ms
        .len()
        .max(spec.sites.len())
        .max(spec.tcp.iter().map(|t| t.site + 1).max().unwrap_or(0));
    let names = if spec.sites.is_empty() {
        (0..n).map(crate::tools::dev::site_name).collect()
    } else {
        spec.sites.clone()
    };
    let wan = Wan::from_matrix(names, &spec.matrix_ms, spec.link);
    if let Some(dir) = &spec.layout {
        relay_layout(&wan, dir)?;
    }
    for t in &spec.tcp {
        wan.tcp_relay(t.site, t.listen, t.target, t.sources.clone())
            .map_err(|e| format!("tcp relay for site {} on {}: {e}", t.site, t.listen))?;
    }
    Ok(wan)
}

/// What [`self_test`] measured for one configured delay.
#[derive(Clone, Debug, Serialize)]
pub struct SelfTestReport {
    /// Configured one-way delay.
    pub delay_ms: f64,
    /// Datagrams received.
    pub samples: usize,
    /// Datagrams lost.
    pub lost: usize,
    /// Median delay added on top of the configured one (µs), including the two extra
    /// loopback hops through the relay.
    pub added_p50_us: f64,
    /// 99th percentile of the added delay (µs).
    pub added_p99_us: f64,
    /// Largest added delay (µs).
    pub added_max_us: f64,
    /// Smallest added delay (µs; negative would mean early release).
    pub added_min_us: f64,
}

/// Sends `samples` timestamped 100-byte datagrams, one every `interval`, through a relay with
/// each of `delays_ms` and reports how much later than the configured delay they arrive.
pub fn self_test(
    delays_ms: &[f64],
    samples: usize,
    interval: Duration,
) -> std::io::Result<Vec<SelfTestReport>> {
    let mut out = Vec::new();
    for &d in delays_ms {
        let wan = Wan::new(vec!["x".into(), "y".into()], |i, _| {
            LinkParams::default().with_delay_ms(if i == 0 { d } else { 0.0 })
        });
        let rx = UdpSocket::bind("127.0.0.1:0")?;
        rx.set_read_timeout(Some(Duration::from_millis(500)))?;
        let relay = wan.udp_relay(0, 1, "127.0.0.1:0".parse().expect("addr"), rx.local_addr()?)?;
        let base = Instant::now();
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while let Ok(n) = rx.recv(&mut buf) {
                let now = base.elapsed().as_nanos() as i64;
                if n >= 8 {
                    let sent = i64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                    got.push(now - sent);
                }
            }
            got
        });
        let tx = UdpSocket::bind("127.0.0.1:0")?;
        let mut next = Instant::now();
        for _ in 0..samples {
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            let mut msg = [0u8; 100];
            msg[..8].copy_from_slice(&(base.elapsed().as_nanos() as i64).to_le_bytes());
            tx.send_to(&msg, relay)?;
        }
        let got = receiver.join().expect("receiver");
        wan.shutdown();
        let mut added: Vec<f64> = got
            .iter()
            .map(|&ns| ns as f64 / 1000.0 - d * 1000.0)
            .collect();
        added.sort_by(f64::total_cmp);
        let q = |p: f64| {
            added
                .get(((added.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        out.push(SelfTestReport {
            delay_ms: d,
            samples: added.len(),
            lost: samples.saturating_sub(added.len()),
            added_p50_us: q(0.5),
            added_p99_us: q(0.99),
            added_max_us: q(1.0),
            added_min_us: q(0.0),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_parses_and_control_applies() {
        let m = parse_matrix("0,15,40;15,0,75;40,75,0").unwrap();
        assert_eq!(m[1][2], 75.0);
        assert!(parse_matrix("0,1;2").is_err());
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        let wan = Wan::from_matrix(names, &m, LinkParams::default());
        wan.apply_control("cut a b\nset a>c loss=0.5 # lossy\n")
            .unwrap();
        assert!(wan.link(0, 1).is_cut() && wan.link(1, 0).is_cut());
        assert!(!wan.link(0, 2).is_cut());
        assert_eq!(wan.link(0, 2).params().loss, 0.5);
        assert_eq!(wan.link(0, 2).params().delay_ms, 40.0);
        wan.apply_control("isolate 2").unwrap();
        assert!(!wan.link(0, 1).is_cut() && wan.link(2, 1).is_cut());
        assert_eq!(wan.link(0, 2).params().loss, 0.0);
        assert!(wan.apply_control("cut a z").is_err());
        wan.shutdown();
    }

    #[test]
    fn udp_relay_delays_and_cuts() {
        let wan = Wan::new(vec!["a".into(), "b".into()], |i, _| {
            LinkParams::default().with_delay_ms(if i == 0 { 20.0 } else { 5.0 })
        });
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let relay = wan
            .udp_relay(
                0,
                1,
                "127.0.0.1:0".parse().unwrap(),
                server.local_addr().unwrap(),
            )
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let t0 = Instant::now();
        client.send_to(b"ping", relay).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", from).unwrap();
        let (n, back) = client.recv_from(&mut buf).unwrap();
        let rtt = t0.elapsed();
        assert_eq!((&buf[..n], back), (&b"pong"[..], relay));
        assert!(rtt >= Duration::from_millis(25), "rtt {rtt:?}");
        assert!(rtt < Duration::from_millis(200), "rtt {rtt:?}");
        wan.cut(0, 1, true);
        client.send_to(b"lost", relay).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(server.recv_from(&mut buf).is_err());
        let s = wan.link(0, 1).stats();
        assert_eq!((s.packets, s.dropped_cut), (1, 1));
        // A held link queues instead of dropping, and releases in order.
        wan.cut(0, 1, false);
        wan.hold(0, 1, true);
        for m in [&b"one"[..], b"two", b"three"] {
            client.send_to(m, relay).unwrap();
        }
        assert!(server.recv_from(&mut buf).is_err(), "delivered while held");
        assert!(wan.link(0, 1).is_held());
        wan.hold(0, 1, false);
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        for m in [&b"one"[..], b"two", b"three"] {
            let (n, _) = server.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], m);
        }
        wan.shutdown();
    }

    #[test]
    fn tcp_relay_attributes_by_header() {
        let names = vec!["a".to_string(), "b".into()];
        let wan = Wan::from_matrix(
            names,
            &[vec![0.0, 30.0], vec![10.0, 0.0]],
            Default::default(),
        );
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let sources = TcpSources {
            header: "X-Server-From".into(),
            map: [("abc".to_string(), 0)].into_iter().collect(),
        };
        let relay = wan
            .tcp_relay(1, "127.0.0.1:0".parse().unwrap(), target, sources)
            .unwrap();
        let echo = std::thread::spawn(move || {
            let (mut c, _) = server.accept().unwrap();
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).unwrap();
            c.write_all(&buf[..n]).unwrap();
        });
        let mut c = TcpStream::connect(relay).unwrap();
        let t0 = Instant::now();
        c.write_all(b"GET / HTTP/1.1\r\nX-Server-From: abc\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0);
        let rtt = t0.elapsed();
        assert!(rtt >= Duration::from_millis(40), "rtt {rtt:?}");
        echo.join().unwrap();
        assert!(wan.link(0, 1).stats().bytes > 0);
        wan.shutdown();
    }
}
