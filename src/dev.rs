//! Local deployments: the one place that lays out a cluster on this machine.
//!
//! [`prepare`] makes development certificates (once), and one configuration file and data
//! directory per site on loopback. `causalkv dev` runs the result in one process; the
//! integration tests and benchmark scripts build their clusters with the same function, so
//! what they test is what an operator gets.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use crate::certs;
use crate::config::{
    FailureConfig, ReplicationConfig, SiteConfig, SiteEntry, StorageConfig, Timeouts, TlsConfig,
};
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
    /// First UDP port; site `i` listens on `base_port + i` and serves its admin HTTP endpoints
    /// on TCP port `base_port + 1000 + i` ([`admin_port`]). `0` picks free ports.
    pub base_port: u16,
    /// Extra client certificates to make.
    pub clients: Vec<String>,
}

/// Where things are.
#[derive(Clone, Debug)]
pub struct DevCluster {
    /// One configuration per site, also written as `DIR/site-<name>.toml`.
    pub configs: Vec<SiteConfig>,
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

/// A free UDP port on 127.0.0.1 (bound, read, released).
pub fn free_udp_port() -> std::io::Result<u16> {
    Ok(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
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
    let mut sites = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let port = if opts.base_port == 0 {
            free_udp_port().map_err(io(&opts.dir))?
        } else {
            opts.base_port + i as u16
        };
        sites.push(SiteEntry {
            id: i as u16,
            name: name.clone(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        });
    }
    let mut configs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let paths = certs::site_paths(&certs_dir, name);
        let cfg = SiteConfig {
            cluster_id: "dev".into(),
            site_id: i as u16,
            data_dir: opts.dir.join(format!("site-{name}")),
            admin_addr: admin_port(opts.base_port, i)
                .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
            sites: sites.clone(),
            tls: TlsConfig {
                ca: certs::ca_paths(&certs_dir).cert,
                cert: paths.cert,
                key: paths.key,
                require_client_cert: true,
            },
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            replication: ReplicationConfig::default(),
            storage: StorageConfig::default(),
            failure: FailureConfig::default(),
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(io(&cfg.data_dir))?;
        let file = opts.dir.join(format!("site-{name}.toml"));
        let text = toml::to_string_pretty(&cfg).expect("config serialises");
        std::fs::write(&file, text).map_err(io(&file))?;
        configs.push(cfg);
    }
    Ok(DevCluster {
        configs,
        certs: certs_dir,
    })
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

    /// Site `i`'s node, if running.
    pub fn node(&self, i: usize) -> Option<&crate::Node> {
        self.nodes[i].as_ref()
    }

    /// Site `i`'s address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.layout.configs[i].me().addr
    }

    /// A client builder for the `cli` identity, with site `i` first and the others after it in
    /// failover order.
    pub fn client_builder(&self, i: usize) -> crate::client::ClientBuilder {
        let n = self.layout.configs.len();
        let sites: Vec<String> = (0..n).map(|k| self.addr((i + k) % n).to_string()).collect();
        let id = certs::client_paths(&self.layout.certs, CLI_CLIENT);
        crate::Client::builder()
            .sites(sites)
            .identity(id.cert, id.key)
            .ca(certs::ca_paths(&self.layout.certs).cert)
    }

    /// Stops site `i` gracefully.
    pub async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    /// Starts site `i` again from its configuration.
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
