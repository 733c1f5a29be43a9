//! Shared scaffolding of the end-to-end suites: the one place tests build clusters.
//!
//! - [`Cluster`]: `n` sites laid out by [`dev::prepare`] (the same layout `causalkv dev` runs) in
//!   a temporary directory, each a [`Node`] on its own loopback port; clients with the `cli`
//!   certificate; stop and restart of one site from its configuration.
//! - [`Processes`]: the same layout run as `causalkv serve` child processes, for `kill -9` and
//!   graceful stops by signal.
//! - [`Prepared::behind_wan`] puts every link between sites through the WAN emulator ([`Wan`]);
//!   [`Relay`] puts one relay in front of one site (delay, cut, hold).
//! - [`wait_until`] / [`eventually`] / [`eventually_ok`]: poll a condition at a short interval
//!   with a hard deadline, failing with a message; [`bounded`] caps a whole test.
//! - [`init`]: the rustls provider and a tracing subscriber whose output shows on failure and is
//!   also kept in memory, so tests can assert that a refusal was logged ([`logs_contain`]).
#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use causalkv::config::SiteConfig;
use causalkv::tls;
use causalkv::tools::checker::{History, Op, OpKind};
use causalkv::tools::wan::{LinkParams, Wan};
use causalkv::tools::{certs, dev};
use causalkv::{Client, Node};
use tokio::time::Instant;

/// The number in environment variable `name`, or `default` if it is unset.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Milliseconds.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

// ---------------------------------------------------------------------------------------------
// Logging

static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn log_buffer() -> &'static Mutex<Vec<u8>> {
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Writes each log line to the test's captured output (shown on failure) and to a process-wide
/// buffer that [`logs_contain`] searches.
struct TeeWriter;

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        // `print!` goes through libtest's output capture, like `with_test_writer`.
        print!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the rustls provider and the tracing subscriber (once per process).
pub fn init() {
    tls::install_crypto_provider();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| TeeWriter)
        .try_init();
}

/// True when any log line so far (from any test of this process) contains `needle`.
pub fn logs_contain(needle: &str) -> bool {
    let buf = log_buffer().lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&buf).contains(needle)
}

/// True when a single log line so far (from any test of this process) contains every needle:
/// to tie a message to one site or file when tests run in parallel.
pub fn log_line_contains_all(needles: &[&str]) -> bool {
    let buf = log_buffer().lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&buf)
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Runs a whole test body with a hard time limit.
pub async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(t) => t,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` every 10 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] with an async condition (client calls).
pub async fn eventually(timeout: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(true) = tokio::time::timeout(left, cond()).await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a condition that says why it does not hold yet: polls `cond` until it
/// returns `Ok`; after `timeout`, panics with `what` and the last reason.
pub async fn eventually_ok(
    timeout: Duration,
    what: &str,
    mut cond: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    let mut why = String::from("no answer yet");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, cond()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => why = e,
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}: {why}");
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters

/// A cluster laid out but not started: adjust the configurations (limits, a peer address that
/// goes through a [`Relay`], every link behind the WAN emulator, ...), then [`Prepared::start`].
pub struct Prepared {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    /// One per node: site `i`'s partition `p` is node `i * partitions + p`.
    pub configs: Vec<SiteConfig>,
    /// Partition nodes per site.
    pub partitions: usize,
}

impl Prepared {
    /// Starts every site.
    pub async fn start(self) -> Cluster {
        self.start_with(causalkv::net::NodeOptions::default()).await
    }

    /// Starts every site with `opts` (tests that plant a bug).
    pub async fn start_with(self, opts: causalkv::net::NodeOptions) -> Cluster {
        let mut nodes = Vec::new();
        for cfg in &self.configs {
            let name = cfg.me().name.clone();
            let node = Node::start_with(cfg.clone(), opts.clone())
                .await
                .unwrap_or_else(|e| panic!("site {name} does not start: {e}"));
            nodes.push(Some(node));
        }
        Cluster {
            dir: self.dir,
            certs: self.certs,
            configs: self.configs,
            partitions: self.partitions,
            nodes,
        }
    }
}

/// Running sites on loopback, in a temporary directory that lives as long as the cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// `<dir>/certs`: CA, site and client (`cli`) certificates.
    pub certs: PathBuf,
    /// The configuration each node runs with (and restarts from); site `i`'s partition `p` is
    /// node `i * partitions + p`.
    pub configs: Vec<SiteConfig>,
    /// Partition nodes per site.
    pub partitions: usize,
    nodes: Vec<Option<Node>>,
}

impl Cluster {
    /// Lays out `n` sites with [`dev::prepare`] (free ports) without starting them. Tests use
    /// short reconnection backoffs and drains so that restarts are quick.
    pub fn prepare(n: usize) -> Prepared {
        Self::prepare_partitioned(n, 1)
    }

    /// [`Cluster::prepare`] with Raft timings for the strong-operation and membership tests,
    /// whose sites often run as separate processes on a loaded machine: heartbeats every
    /// 200 ms, elections after 800 to 1,600 ms of silence.
    pub fn prepare_strong(n: usize) -> Prepared {
        let mut prep = Self::prepare(n);
        for cfg in &mut prep.configs {
            cfg.consensus = causalkv::config::ConsensusConfig {
                heartbeat_ms: 200,
                election_min_ms: 800,
                election_max_ms: 1_600,
                ..Default::default()
            };
        }
        prep
    }

    /// [`Cluster::prepare`] with `partitions` partition nodes per site.
    pub fn prepare_partitioned(n: usize, partitions: usize) -> Prepared {
        init();
        let dir = tempfile::tempdir().expect("tempdir");
        let dc = dev::prepare(&dev::DevOptions {
            partitions: partitions as u32,
            ..dev::DevOptions::new(n, dir.path(), 0)
        })
        .expect("dev::prepare");
        let mut configs = dc.configs;
        for c in &mut configs {
            c.timeouts.max_backoff_ms = 200;
            c.timeouts.drain_ms = 1_000;
        }
        Prepared {
            dir,
            certs: dc.certs,
            configs,
            partitions,
        }
    }

    /// Lays out and starts `n` sites, and waits until every link is up.
    pub async fn start(n: usize) -> Cluster {
        let c = Self::prepare(n).start().await;
        c.wait_connected().await;
        c
    }

    /// Waits until every running node sees its running peers (its partition at the other
    /// sites) up.
    pub async fn wait_connected(&self) {
        let parts = self.partitions;
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect();
        wait_until(ms(10_000), "every link is up", || {
            running.iter().all(|&i| {
                self.node(i)
                    .status()
                    .peers
                    .iter()
                    .filter(|p| running.contains(&(p.site as usize * parts + i % parts)))
                    .all(|p| p.state == "up")
            })
        })
        .await;
    }

    /// Waits until every node holds the bootstrapped cluster configuration (epoch 1).
    pub async fn wait_bootstrapped(&self) {
        eventually(
            ms(20_000),
            "the configuration is bootstrapped",
            async || {
                (0..self.len()).all(|i| {
                    self.node(i)
                        .status()
                        .membership
                        .is_some_and(|m| m.epoch == 1)
                })
            },
        )
        .await;
    }

    /// Number of nodes (sites × partitions).
    pub fn len(&self) -> usize {
        self.configs.len()
    }

    /// The addresses of site `site`'s partition nodes, in partition order.
    pub fn site_addrs(&self, site: usize) -> Vec<SocketAddr> {
        site_addrs(&self.configs, self.partitions, site)
    }

    /// A running site. Panics if it is stopped.
    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("site {i} is stopped"))
    }

    /// The address node `i` listens on.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.configs[i].listen_addr()
    }

    /// The cluster CA certificate.
    pub fn ca(&self) -> PathBuf {
        certs::ca_paths(&self.certs).cert
    }

    /// Where node `i`'s RESP listener is bound (every test site has one, on a free port).
    pub fn resp_addr(&self, i: usize) -> SocketAddr {
        self.node(i)
            .resp_addr()
            .unwrap_or_else(|| panic!("site {i} has no RESP listener"))
    }

    /// A client of site `site` only, routing to its partition nodes, with a fresh session.
    pub async fn site_client(&self, site: usize) -> Client {
        cli_client_builder(&self.certs, [])
            .site_partitions([self.site_addrs(site)])
            .connect()
            .await
            .unwrap_or_else(|e| panic!("client of site {site} cannot connect: {e}"))
    }

    /// A client of site `i` only, with the `cli` certificate and a fresh session.
    pub async fn client(&self, i: usize) -> Client {
        self.client_builder(i)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("client of site {i} cannot connect: {e}"))
    }

    /// A client builder with the `cli` certificate for `sites`, in failover order.
    pub fn client_builder_of(&self, sites: &[usize]) -> causalkv::client::ClientBuilder {
        cli_client_builder(&self.certs, sites.iter().map(|&i| self.addr(i)))
    }

    /// A client builder for site `i` only, with the `cli` certificate.
    pub fn client_builder(&self, i: usize) -> causalkv::client::ClientBuilder {
        self.client_builder_of(&[i])
    }

    /// Stops site `i` gracefully.
    pub async fn stop(&mut self, i: usize) {
        let node = self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("site {i} is already stopped"));
        node.shutdown().await;
    }

    /// Starts stopped site `i` again from its configuration (a new [`Node`]). No retry: a
    /// stopped node has closed its socket, so the address binds at once.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "site {i} is running");
        let node = Node::start(self.configs[i].clone())
            .await
            .unwrap_or_else(|e| panic!("site {i} does not restart: {e}"));
        self.nodes[i] = Some(node);
    }

    /// Stops every running site (concurrently: each shutdown waits up to a second for its
    /// endpoint to go idle).
    pub async fn shutdown(mut self) {
        let mut stopping = tokio::task::JoinSet::new();
        for n in self.nodes.iter_mut() {
            if let Some(n) = n.take() {
                stopping.spawn(n.shutdown());
            }
        }
        while let Some(r) = stopping.join_next().await {
            r.expect("site shutdown panicked");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sites as separate processes

/// The `causalkv` binary built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_causalkv");

/// `causalkv sites ARGS --certs CERTS` (the membership commands), run to its end.
pub fn sites_cli(certs: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("sites")
        .args(args)
        .arg("--certs")
        .arg(certs)
        .output()
        .expect("run the CLI")
}

/// Sites running as separate `causalkv serve --config FILE` processes (what an operator runs),
/// laid out by [`Cluster::prepare`]. Each site's configuration is written to
/// `<dir>/site-<name>.toml` (overwriting the one [`dev::prepare`] wrote, so adjustments made on
/// [`Prepared::configs`] apply); each start of a site logs to its own `site-<name>.<n>.log`.
/// Children are killed when this is dropped, so a failing test leaves no process behind.
pub struct Processes {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub configs: Vec<SiteConfig>,
    /// Partition nodes per site (node `i * partitions + p` is site `i`'s partition `p`).
    pub partitions: usize,
    /// `<dir>/site-<name>.toml`: what `serve` and `repair` are given.
    pub config_files: Vec<PathBuf>,
    children: Vec<Option<std::process::Child>>,
    /// How many times each site was started.
    starts: Vec<usize>,
    /// Extra environment variables every start of every site gets.
    env: Vec<(String, String)>,
}

impl Prepared {
    /// Writes every site's configuration file and starts each site as a `causalkv serve`
    /// process; returns once every site is listening (not necessarily connected to its peers).
    pub async fn spawn(self) -> Processes {
        self.spawn_with_env(&[]).await
    }

    /// [`Prepared::spawn`] with extra environment variables for every start of every site.
    pub async fn spawn_with_env(self, env: &[(&str, &str)]) -> Processes {
        let mut config_files = Vec::new();
        for cfg in &self.configs {
            let file = self
                .dir
                .path()
                .join(format!("site-{}.toml", node_name(cfg)));
            let text = toml::to_string_pretty(cfg).expect("config serialises");
            std::fs::write(&file, text).expect("write site config");
            config_files.push(file);
        }
        let n = self.configs.len();
        let mut p = Processes {
            dir: self.dir,
            certs: self.certs,
            configs: self.configs,
            partitions: self.partitions,
            config_files,
            children: (0..n).map(|_| None).collect(),
            starts: vec![0; n],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for i in 0..n {
            p.start(i);
        }
        for i in 0..n {
            p.wait_listening(i, ms(10_000)).await;
        }
        p
    }
}

impl Processes {
    /// Number of nodes (sites × partitions).
    pub fn len(&self) -> usize {
        self.configs.len()
    }

    /// The address node `i` listens on.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.configs[i].listen_addr()
    }

    /// The addresses of site `site`'s partition nodes, in partition order.
    pub fn site_addrs(&self, site: usize) -> Vec<SocketAddr> {
        site_addrs(&self.configs, self.partitions, site)
    }

    /// The nodes of site `site`.
    pub fn nodes_of(&self, site: usize) -> std::ops::Range<usize> {
        site * self.partitions..(site + 1) * self.partitions
    }

    /// The cluster CA certificate.
    pub fn ca(&self) -> PathBuf {
        certs::ca_paths(&self.certs).cert
    }

    /// The log file of site `i`'s current (latest) start.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!(
            "site-{}.{}.log",
            node_name(&self.configs[i]),
            self.starts[i]
        ))
    }

    /// The log of site `i`'s current (latest) start.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Adds a node to the set (a site joining the running cluster): writes its configuration
    /// file and starts its process. Returns its index. Does not wait: a joining site logs
    /// that it is listening only once it has its snapshot.
    pub fn add(&mut self, cfg: SiteConfig) -> usize {
        let file = self
            .dir
            .path()
            .join(format!("site-{}.toml", node_name(&cfg)));
        let text = toml::to_string_pretty(&cfg).expect("config serialises");
        std::fs::write(&file, text).expect("write site config");
        self.configs.push(cfg);
        self.config_files.push(file);
        self.children.push(None);
        self.starts.push(0);
        let i = self.configs.len() - 1;
        self.start(i);
        i
    }

    /// Starts site `i`'s process (from its configuration file, on its data directory). Does not
    /// wait: see [`Processes::wait_listening`].
    pub fn start(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "site {i} is running");
        self.starts[i] += 1;
        let log = std::fs::File::create(self.log_path(i)).expect("create site log");
        let child = std::process::Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_files[i])
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn causalkv serve");
        self.children[i] = Some(child);
    }

    /// Waits until site `i`'s current start logged that it is listening (it has recovered its
    /// state and bound its port). Panics with the log if the process exits first or after
    /// `timeout`.
    pub async fn wait_listening(&mut self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log(i).contains("site listening") {
                return;
            }
            let child = self.children[i].as_mut().expect("site started");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "site {i} exited ({status}) before listening; log:\n{}",
                    self.log(i)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "site {i} not listening after {timeout:?}; log:\n{}",
                    self.log(i)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `kill -9` of site `i`: SIGKILL, then reaps the process.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.children[i]
            .take()
            .unwrap_or_else(|| panic!("site {i} is not running"));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap killed site");
    }

    /// Sends signal `sig` (e.g. `libc::SIGHUP`) to site `i`'s process.
    pub fn signal(&self, i: usize, sig: libc::c_int) {
        let child = self.children[i]
            .as_ref()
            .unwrap_or_else(|| panic!("site {i} is not running"));
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Stops site `i` gracefully, as an operator does (SIGTERM: drain, flush, close), and waits
    /// until the process has exited, up to `timeout`. Panics if it exits with an error.
    pub async fn stop(&mut self, i: usize, timeout: Duration) {
        self.signal(i, libc::SIGTERM);
        let child = self.children[i]
            .as_mut()
            .unwrap_or_else(|| panic!("site {i} is not running"));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                panic!("site {i} still running {timeout:?} after SIGTERM");
            }
            tokio::time::sleep(POLL).await;
        };
        assert!(status.success(), "site {i} stopped with {status}");
        self.children[i] = None;
    }

    /// The process id of site `i`'s current start, if it is running (for /proc samples).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(|c| c.id())
    }

    /// Whether site `i`'s process is running (started and not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.children[i].as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// A client builder for site `i` only, with the `cli` certificate.
    pub fn client_builder(&self, i: usize) -> causalkv::client::ClientBuilder {
        cli_client_builder(&self.certs, [self.addr(i)])
    }

    /// A client of site `i` only, with a fresh session.
    pub async fn client(&self, i: usize) -> Client {
        self.client_builder(i)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("client of site {i} cannot connect: {e}"))
    }

    /// Waits until every running site sees every other site up (polled with `status`).
    pub async fn wait_connected(&self) {
        let clients: Vec<Client> = {
            let mut v = Vec::new();
            for i in 0..self.len() {
                v.push(self.client(i).await);
            }
            v
        };
        eventually(ms(10_000), "every link is up", async || {
            for c in &clients {
                match c.status().await {
                    Ok(s) if s.peers.iter().all(|p| p.state == "up") => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in self.children.iter_mut().filter_map(Option::take) {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A node's name in file names: the site's name, with `-p<partition>` when sites are
/// partitioned.
pub fn node_name(cfg: &SiteConfig) -> String {
    if cfg.partitions > 1 {
        format!("{}-p{}", cfg.me().name, cfg.partition)
    } else {
        cfg.me().name.clone()
    }
}

/// Where site `site`'s partition nodes listen, from the node configurations.
fn site_addrs(configs: &[SiteConfig], partitions: usize, site: usize) -> Vec<SocketAddr> {
    configs[site * partitions..(site + 1) * partitions]
        .iter()
        .map(SiteConfig::listen_addr)
        .collect()
}

/// The one client builder of the tests: the `cli` certificate from `certs`, the given sites in
/// failover order, a 5 s request timeout.
pub fn cli_client_builder(
    certs_dir: &std::path::Path,
    sites: impl IntoIterator<Item = SocketAddr>,
) -> causalkv::client::ClientBuilder {
    let id = certs::client_paths(certs_dir, dev::CLI_CLIENT);
    Client::builder()
        .sites(sites.into_iter().map(|a| a.to_string()))
        .identity(id.cert, id.key)
        .ca(certs::ca_paths(certs_dir).cert)
        .timeout(ms(5_000))
}

/// A free UDP port on 127.0.0.1 as an address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], dev::free_udp_port().expect("free port")))
}

/// Whether `program --version` runs. A test that needs a tool we did not write calls it, and
/// skips loudly when the tool is missing (`scripts/test.sh` installs them, so CI runs them).
pub fn have_tool(program: &str, args: &[&str], install: &str) -> bool {
    let ok = std::process::Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "\n!!!!!!!! SKIPPED: `{program} {}` does not run here; install {install} \
             (scripts/test.sh does) to run this test !!!!!!!!\n",
            args.join(" ")
        );
    }
    ok
}

// ---------------------------------------------------------------------------------------------
// Relays: the WAN emulator

impl Prepared {
    /// Puts every link between sites through the WAN emulator ([`Wan`], the same one
    /// `causalkv wan` runs): one UDP relay per directed pair `i → j`, on link `i → j` (replies
    /// on `j → i`), each link starting with `link(i, j)`; site `i`'s configuration dials `j`
    /// through it. One partition per site.
    pub fn behind_wan(&mut self, link: impl Fn(usize, usize) -> LinkParams) -> Wan {
        assert_eq!(
            self.partitions, 1,
            "behind_wan lays out one partition per site"
        );
        let n = self.configs.len();
        let names = self.configs.iter().map(|c| c.me().name.clone()).collect();
        let wan = Wan::new(names, link);
        let real: Vec<SocketAddr> = self.configs.iter().map(|c| c.listen_addr()).collect();
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                let relay = wan
                    .udp_relay(i, j, "127.0.0.1:0".parse().expect("addr"), real[j])
                    .expect("start a relay");
                self.configs[i].sites[j].addr = relay;
            }
        }
        wan
    }
}

/// One relayed link in front of a site, on the WAN emulator ([`Wan`]): datagrams from any
/// sender to the target are delayed by the relay's delay; replies come back undelayed.
/// [`Relay::cut`] drops everything in both directions; [`Relay::hold`] queues the datagrams to
/// the target until it is lifted.
pub struct Relay {
    wan: Wan,
    addr: SocketAddr,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and relays to `target`.
    pub fn start(target: SocketAddr, delay: Duration) -> Relay {
        let wan = Wan::new(vec!["sender".into(), "target".into()], |i, _| {
            LinkParams::default().with_delay_ms(if i == 0 { millis(delay) } else { 0.0 })
        });
        let addr = wan
            .udp_relay(0, 1, "127.0.0.1:0".parse().expect("addr"), target)
            .expect("start a relay");
        Relay { wan, addr }
    }

    /// The address to send to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the delay of datagrams received from now on.
    pub fn set_delay(&self, d: Duration) {
        let link = self.wan.link(0, 1);
        link.set_params(link.params().with_delay_ms(millis(d)));
    }

    /// Queues the datagrams to the target while `on`; lifting the hold sends them on, in order.
    pub fn hold(&self, on: bool) {
        self.wan.hold(0, 1, on);
    }

    /// Drops every datagram (both directions) while `on`.
    pub fn cut(&self, on: bool) {
        self.wan.cut(0, 1, on);
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Operation logs and the history they make

/// One session's operations in issue order.
pub enum Logged {
    Acked(Op),
    /// A write whose outcome is unknown (error, timeout or the site killed under it).
    Unknown(Op),
}

/// A [`History`] built by [`history`], with what went into it.
pub struct Built {
    pub history: History,
    /// Acknowledged writes and reads.
    pub writes: usize,
    pub reads: usize,
    /// Writes of unknown outcome, and how many of them were observed and so kept.
    pub unknown: usize,
    pub kept: usize,
}

/// The history: every acknowledged operation in session order. A write whose outcome is unknown
/// is left out unless some read, or the final state (`final_values`: `(key, value)` pairs), returned
/// its value; then it did take effect, and it is put back *where it was issued* in its session,
/// not where it was first observed: it was applied before the failure, so before everything its
/// session did afterwards. Recording it later would let a store that orders it after the
/// session's next writes (a clock going backwards across a restart) pass unnoticed, and leaving
/// it out would make reads of it ThinAirRead.
pub fn history<'a, L, F>(logs: L, final_values: F) -> Built
where
    L: IntoIterator<Item = &'a [Logged]> + Clone,
    F: IntoIterator<Item = (&'a str, &'a str)>,
{
    let observed: HashSet<(Vec<u8>, Vec<u8>)> = logs
        .clone()
        .into_iter()
        .flatten()
        .filter_map(|o| match o {
            Logged::Acked(Op {
                kind:
                    OpKind::Read {
                        key,
                        value: Some(v),
                    },
                ..
            }) => Some((key.clone(), v.clone())),
            _ => None,
        })
        .chain(
            final_values
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        )
        .collect();
    let mut b = Built {
        history: History::new(),
        writes: 0,
        reads: 0,
        unknown: 0,
        kept: 0,
    };
    for o in logs.into_iter().flatten() {
        match o {
            Logged::Acked(op) => {
                match op.kind {
                    OpKind::Write { .. } => b.writes += 1,
                    OpKind::Read { .. } => b.reads += 1,
                }
                b.history.record(op.clone());
            }
            Logged::Unknown(op) => {
                b.unknown += 1;
                let OpKind::Write { key, value } = &op.kind else {
                    unreachable!("only writes have an unknown outcome")
                };
                if observed.contains(&(key.clone(), value.clone())) {
                    b.kept += 1;
                    b.history.record(op.clone());
                }
            }
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Asserts that a finished command exited with code 0 (showing its stdout and stderr if not);
/// returns its stdout.
pub fn assert_success(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
