//! The `causalkv` command: thin. It parses arguments, sets up tracing and calls the library.
//!
//! Exit codes of the client commands: 0 found / ok, 1 not found, 2 error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use causalkv::client::{Client, ClientError};
use causalkv::dev::{self, CLI_CLIENT, DevOptions};
use causalkv::{Node, SiteConfig, certs};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "causalkv",
    version,
    about = "Geo-replicated key-value store with causal+ consistency"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one site from its configuration file.
    Serve {
        /// The site's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a ready-to-use local deployment: certificates, configs and N sites on loopback.
    Dev {
        /// Number of sites.
        #[arg(long, default_value_t = 3)]
        sites: usize,
        /// Directory for certificates, configs and data.
        #[arg(long, default_value = "causalkv-dev")]
        dir: PathBuf,
        /// First UDP port; site i listens on port + i.
        #[arg(long, default_value_t = 7100)]
        port: u16,
    },
    /// Certificate tooling.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Write a value.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Wait until this many remote sites have the write durably.
        #[arg(long, default_value_t = 0)]
        sync: u8,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Read a value (exit code 1 when absent).
    Get {
        /// Key.
        key: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a key.
    Del {
        /// Key.
        key: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show a site's applied and stable vectors, its peers and their lag.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Make a development CA and certificates for sites and clients.
    Init {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Site names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        /// Client names, comma-separated.
        #[arg(long, value_delimiter = ',')]
        clients: Vec<String>,
        /// Replace existing keys and certificates.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct ConnArgs {
    /// Site to talk to (repeat for failover order).
    #[arg(long = "site", default_value = "127.0.0.1:7100")]
    sites: Vec<String>,
    /// Directory holding ca.pem and client-<name>.pem/.key.
    #[arg(long, default_value = "causalkv-dev/certs")]
    certs: PathBuf,
    /// Client certificate name.
    #[arg(long, default_value = CLI_CLIENT)]
    client: String,
    /// Session token to continue (from an earlier --json output).
    #[arg(long)]
    token: Option<String>,
    /// Request timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn,rustls=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(cli.cmd))
}

async fn run(cmd: Cmd) -> ExitCode {
    match cmd {
        Cmd::Serve { config } => match serve(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Cmd::Dev { sites, dir, port } => match run_dev(sites, dir, port).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Cmd::Certs {
            cmd:
                CertsCmd::Init {
                    out,
                    sites,
                    clients,
                    force,
                },
        } => {
            let opts = certs::InitOptions {
                out,
                sites,
                clients,
                force,
            };
            match certs::init(&opts) {
                Ok(report) => {
                    println!("{report:#?}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Cmd::Put {
            key,
            value,
            sync,
            conn,
        } => client_cmd(&conn, |c| async move {
            let v = c.put_sync(&key, &value, sync).await?;
            Ok((Some(format!("ok {v}")), serde_json::json!({"ok": true, "version": v.to_string()}), true))
        })
        .await,
        Cmd::Get { key, conn } => client_cmd(&conn, |c| async move {
            let r = c.get_versioned(&key).await?;
            let found = r.value.is_some();
            let text = r.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned());
            let json = serde_json::json!({
                "found": found,
                "value": text,
                "version": r.version.map(|v| v.to_string()),
            });
            Ok((text.or(Some("(not found)".into())), json, found))
        })
        .await,
        Cmd::Del { key, conn } => client_cmd(&conn, |c| async move {
            let v = c.delete(&key).await?;
            Ok((Some(format!("deleted {v}")), serde_json::json!({"ok": true, "version": v.to_string()}), true))
        })
        .await,
        Cmd::Status { conn } => client_cmd(&conn, |c| async move {
            let s = c.status().await?;
            let mut text = format!(
                "site {} ({})\n  applied  {:?}\n  stable   {:?}\n  buffered {}  retained {}  keys {}\n  peers:",
                s.name, s.site, s.applied, s.stable, s.buffered, s.retained, s.keys
            );
            for p in &s.peers {
                text.push_str(&format!(
                    "\n    {} ({}) {}  {}: lag {} updates, {} ms ({})",
                    p.name, p.site, p.addr, p.state, p.lag_updates, p.lag_ms, p.reason
                ));
            }
            let json = serde_json::to_value(&s).expect("status serialises");
            Ok((Some(text), json, true))
        })
        .await,
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

/// Connects, runs `f`, prints its result (text or JSON with the session token) and maps the
/// outcome to the exit code.
async fn client_cmd<F, Fut>(args: &ConnArgs, f: F) -> ExitCode
where
    F: FnOnce(std::sync::Arc<Client>) -> Fut,
    Fut: std::future::Future<Output = Result<(Option<String>, serde_json::Value, bool), ClientError>>,
{
    let paths = certs::client_paths(&args.certs, &args.client);
    let connected = Client::builder()
        .sites(args.sites.clone())
        .identity(paths.cert, paths.key)
        .ca(certs::ca_paths(&args.certs).cert)
        .timeout(Duration::from_millis(args.timeout_ms))
        .connect()
        .await;
    let client = match connected {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => return fail(&e),
    };
    if let Some(t) = &args.token
        && let Err(e) = client.set_session_token(t)
    {
        return fail(&e);
    }
    match f(client.clone()).await {
        Ok((text, mut json, found)) => {
            if args.json {
                json["token"] = client.session_token().into();
                println!("{json}");
            } else if let Some(t) = text {
                println!("{t}");
            }
            if found {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({"error": e.to_string()}));
            }
            fail(&e)
        }
    }
}

async fn serve(config: PathBuf) -> Result<(), String> {
    let cfg = SiteConfig::load(&config).map_err(|e| e.to_string())?;
    let node = Node::start(cfg).await.map_err(|e| e.to_string())?;
    node.run_until(shutdown_signal()).await;
    Ok(())
}

async fn run_dev(sites: usize, dir: PathBuf, port: u16) -> Result<(), String> {
    let cluster = dev::prepare(&DevOptions {
        sites,
        dir: dir.clone(),
        base_port: port,
        clients: vec![],
    })
    .map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    for cfg in &cluster.configs {
        nodes.push(Node::start(cfg.clone()).await.map_err(|e| e.to_string())?);
    }
    let addrs: Vec<String> = cluster
        .configs
        .iter()
        .map(|c| c.me().addr.to_string())
        .collect();
    let certs = cluster.certs.display();
    println!(
        "causalkv dev: {} sites up: {}",
        nodes.len(),
        addrs.join(", ")
    );
    println!("site configs: {}/site-<name>.toml", dir.display());
    println!("try, from another shell:");
    println!(
        "  causalkv put hello world --site {} --certs {certs}",
        addrs[0]
    );
    println!(
        "  causalkv get hello --site {} --certs {certs}",
        addrs.get(1).unwrap_or(&addrs[0])
    );
    println!("  causalkv status --site {} --certs {certs}", addrs[0]);
    println!("(with cargo: cargo run --release -- get hello ...). Ctrl-C stops all sites.");
    shutdown_signal().await;
    let mut stopping = tokio::task::JoinSet::new();
    for n in nodes {
        stopping.spawn(n.shutdown());
    }
    while stopping.join_next().await.is_some() {}
    println!("causalkv dev: stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
