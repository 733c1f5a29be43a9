//! Local deployments: the one place that lays out a cluster on this machine.
//!
//! [`prepare`] makes development certificates (once), and one configuration file and data
//! directory per site on loopback. `causalkv dev` runs the result in one process; the
//! integration tests and benchmark scripts build their clusters with the same function, so
//! what they test is what an operator gets.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use crate::config::{
    FailureConfig, ReplicationConfig, RespConfig, SiteConfig, SiteEntry, StorageConfig, Timeouts,
    TlsConfig,
};
use crate::tools::certs;
use crate::wire::Limits;

/// The client certificate name `causalkv dev` makes for the CLI.
pub const CLI_CLIENT: &str = "cli";

/// Site names: `a`, `b`, `c`, ... then `s26`, `s27`, ...
pub fn site_name(i: usize) -> String {
    if i < 26 {
        ((b'a' + i as u8) as char).to_string()
    } else {
        format!("s{i}")
    }
}

/// How to lay out a local cluster.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Number of sites.
    pub sites: usize,
    /// Directory for certificates (`DIR/certs`), configs and data (`DIR/site-<name>`).
    pub dir: PathBuf,
    /// First UDP port; site `i` listens on `base_port + i`, serves its admin HTTP endpoints
    /// on TCP port `base_port + 1000 + i` ([`admin_port`]) and Redis clients (RESP over TLS) on
    /// TCP port `base_port + 2000 + i` ([`resp_port`]). `0` picks free ports.
    pub base_port: u16,
    /// Extra client certificates to make.
    pub clients: Vec<String>,
    /// Partition nodes per site (1: one node per site). With `P` partitions, site `i`'s
    /// partition `p` listens on `base_port + i * P + p`.
    pub partitions: u32,
    /// Size limits of every node (`[limits]` of the written configurations).
    pub limits: Limits,
}

/// [`Limits`] for a largest value of `max_value` bytes: the default key limit, and a frame
/// limit that is the default or just large enough for such a value, whichever is larger.
pub fn limits_for_max_value(max_value: usize) -> Limits {
    let d = Limits::default();
    Limits {
        max_value,
        max_frame: d.max_frame.max(max_value + d.max_key + (64 << 10)),
        ..d
    }
}

impl DevOptions {
    /// `sites` sites under `dir` on ports from `base_port`, one node per site.
    pub fn new(sites: usize, dir: impl Into<PathBuf>, base_port: u16) -> Self {
        Self {
            sites,
            dir: dir.into(),
            base_port,
            clients: Vec::new(),
            partitions: 1,
            limits: Limits::default(),
        }
    }
}

/// Where things are.
#[derive(Clone, Debug)]
pub struct DevCluster {
    /// One configuration per node, site by site and partition by partition within a site (node
    /// `i * P + p` is site `i`'s partition `p`), also written as `DIR/site-<name>.toml`
    /// (`DIR/site-<name>-p<p>.toml` with several partitions).
    pub configs: Vec<SiteConfig>,
    /// Where each configuration was written, in the same order.
    pub files: Vec<PathBuf>,
    /// Partition nodes per site.
    pub partitions: u32,
    /// The certificate directory.
    pub certs: PathBuf,
}

/// Errors laying out a cluster.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Certificates.
    #[error(transparent)]
    Certs(#[from] certs::CertsError),
    /// Files.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A free UDP port on 127.0.0.1, for a site that binds it later.
///
/// The port is taken below the kernel's usual ephemeral range (32768 and up), from a cursor that
/// hands each port out once per process: a port the kernel picked for `bind(0)` and released can
/// be picked again at once by the next ephemeral bind (a client endpoint, say) before the site
/// binds it, which made cluster starts fail now and then. A port found in use is skipped.
pub fn free_udp_port() -> std::io::Result<u16> {
    free_udp_ports(1)
}

/// The first of `n` consecutive free UDP ports on 127.0.0.1 (see [`free_udp_port`]), for a
/// layout that numbers its ports from a base (`causalkv dev --port`). They are handed out
/// together, so no later call of this process returns one of them.
pub fn free_udp_ports(n: u16) -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000; // 10000..32000
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let n32 = u32::from(n.max(1));
    if CURSOR.load(Ordering::Relaxed) == u32::MAX {
        // Processes started together (test binaries, scripts) start in different places.
        let start = std::process::id().wrapping_mul(7_919) % SPAN;
        let _ = CURSOR.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..SPAN / n32 {
        let at = CURSOR.fetch_add(n32, Ordering::Relaxed) % SPAN;
        if at + n32 > SPAN {
            continue; // would run past the range
        }
        let base = LOW + at;
        if (base..base + n32).all(|p| UdpSocket::bind((Ipv4Addr::LOCALHOST, p as u16)).is_ok()) {
            return Ok(base as u16);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no {n} consecutive free UDP ports in {LOW}..{}", LOW + SPAN),
    ))
}

/// The admin (HTTP) port of site `i` in a layout whose first UDP port is `base_port`:
/// `base_port + 1000 + i`, or `None` when that overflows. A `base_port` of 0 gives 0 (the port
/// is picked when the site binds it; see [`crate::Node::admin_addr`]).
pub fn admin_port(base_port: u16, i: usize) -> Option<u16> {
    if base_port == 0 {
        return Some(0);
    }
    u16::try_from(base_port as usize + 1000 + i).ok()
}

/// The RESP (TCP) port of site `i` in a layout whose first UDP port is `base_port`:
/// `base_port + 2000 + i`, or `None` when that overflows. A `base_port` of 0 gives 0 (the port
/// is picked when the site binds it; see [`crate::Node::resp_addr`]). Only layouts with one
/// node per site get a RESP listener: a RESP connection talks to one node.
pub fn resp_port(base_port: u16, i: usize) -> Option<u16> {
    if base_port == 0 {
        return Some(0);
    }
    u16::try_from(base_port as usize + 2000 + i).ok()
}

/// Makes certificates (keeping existing ones), site configurations and data directories.
pub fn prepare(opts: &DevOptions) -> Result<DevCluster, DevError> {
    std::fs::create_dir_all(&opts.dir).map_err(io(&opts.dir))?;
    let certs_dir = opts.dir.join("certs");
    let names: Vec<String> = (0..opts.sites).map(site_name).collect();
    let mut clients = vec![CLI_CLIENT.to_string()];
    clients.extend(opts.clients.iter().cloned());
    certs::init(&certs::InitOptions {
        out: certs_dir.clone(),
        sites: names.clone(),
        clients,
        force: false,
    })?;
    let parts = opts.partitions.max(1);
    let mut sites = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut addrs = Vec::new();
        for p in 0..parts {
            let port = if opts.base_port == 0 {
                free_udp_port().map_err(io(&opts.dir))?
            } else {
                u16::try_from(u32::from(opts.base_port) + i as u32 * parts + p).map_err(|_| {
                    io(&opts.dir)(std::io::Error::other(format!(
                        "ports from {} for {} sites x {parts} partitions run past 65535",
                        opts.base_port, opts.sites
                    )))
                })?
            };
            addrs.push(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
        let mut entry = SiteEntry::new(i as u16, name.clone(), addrs[0]);
        if parts > 1 {
            entry.partition_addrs = addrs;
        }
        sites.push(entry);
    }
    let mut configs = Vec::new();
    let mut files = Vec::new();
    let nodes = names
        .iter()
        .enumerate()
        .flat_map(|(i, name)| (0..parts).map(move |p| (i, name, p)));
    for (node, (i, name, partition)) in nodes.enumerate() {
        let suffix = if parts > 1 {
            format!("{name}-p{partition}")
        } else {
            name.clone()
        };
        let paths = certs::site_paths(&certs_dir, name);
        let cfg = SiteConfig {
            cluster_id: "dev".into(),
            site_id: i as u16,
            data_dir: opts.dir.join(format!("site-{suffix}")),
            admin_addr: admin_port(opts.base_port, node)
                .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
            partitions: parts,
            partition,
            sites: sites.clone(),
            tls: TlsConfig {
                ca: certs::ca_paths(&certs_dir).cert,
                cert: paths.cert,
                key: paths.key,
                require_client_cert: true,
            },
            limits: opts.limits,
            timeouts: Timeouts::default(),
            replication: ReplicationConfig::default(),
            quic: Default::default(),
            storage: StorageConfig::default(),
            failure: FailureConfig::default(),
            resp: (parts == 1)
                .then(|| resp_port(opts.base_port, i))
                .flatten()
                .map(|p| RespConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, p)))),
            consensus: Default::default(),
            join_from: None,
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(io(&cfg.data_dir))?;
        let file = opts.dir.join(format!("site-{suffix}.toml"));
        let text = toml::to_string_pretty(&cfg).expect("config serialises");
        std::fs::write(&file, text).map_err(io(&file))?;
        configs.push(cfg);
        files.push(file);
    }
    Ok(DevCluster {
        configs,
        files,
        partitions: parts,
        certs: certs_dir,
    })
}

impl DevCluster {
    /// A client builder for client identity `client`, with site `i` first and the others after
    /// it in failover order, routing to every partition.
    pub fn client_builder(&self, client: &str, i: usize) -> crate::client::ClientBuilder {
        let entries = &self.configs[0].sites;
        let n = entries.len();
        let id = certs::client_paths(&self.certs, client);
        let parts = self.partitions;
        crate::Client::builder()
            .site_partitions((0..n).map(|k| {
                let e = &entries[(i + k) % n];
                (0..parts).map(|p| e.partition_addr(p)).collect::<Vec<_>>()
            }))
            .identity(id.cert, id.key)
            .ca(certs::ca_paths(&self.certs).cert)
    }
}

/// A local cluster running in this process: what `causalkv dev` runs, and what tests and
/// examples start.
pub struct LocalCluster {
    /// Where things are.
    pub layout: DevCluster,
    nodes: Vec<Option<crate::Node>>,
}

impl LocalCluster {
    /// Lays out (see [`prepare`]) and starts every site.
    pub async fn start(opts: &DevOptions) -> Result<LocalCluster, DevError> {
        let layout = prepare(opts)?;
        let mut nodes = Vec::new();
        for cfg in &layout.configs {
            nodes.push(Some(crate::Node::start(cfg.clone()).await.map_err(
                |e| DevError::Io {
                    path: cfg.data_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                },
            )?));
        }
        Ok(LocalCluster { layout, nodes })
    }

    /// Node `i`'s running node (site `i / P`, partition `i % P`), if running.
    pub fn node(&self, i: usize) -> Option<&crate::Node> {
        self.nodes[i].as_ref()
    }

    /// Number of sites.
    pub fn sites(&self) -> usize {
        self.layout.configs.len() / self.layout.partitions as usize
    }

    /// Site `i`'s address (its partition 0).
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.layout.configs[0].sites[i].addr
    }

    /// A client builder for the `cli` identity, with site `i` first and the others after it in
    /// failover order.
    pub fn client_builder(&self, i: usize) -> crate::client::ClientBuilder {
        self.layout.client_builder(CLI_CLIENT, i)
    }

    /// Stops node `i` (site `i / P`, partition `i % P`) gracefully.
    pub async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    /// Starts node `i` again from its configuration.
    pub async fn restart(&mut self, i: usize) -> Result<(), crate::net::NodeError> {
        if self.nodes[i].is_none() {
            self.nodes[i] = Some(crate::Node::start(self.layout.configs[i].clone()).await?);
        }
        Ok(())
    }

    /// Stops every site.
    pub async fn shutdown(mut self) {
        let mut stopping = tokio::task::JoinSet::new();
        for n in self.nodes.iter_mut().filter_map(Option::take) {
            stopping.spawn(n.shutdown());
        }
        while stopping.join_next().await.is_some() {}
    }
}
