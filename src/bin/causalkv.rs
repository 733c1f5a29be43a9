//! The `causalkv` command: thin. It parses arguments, sets up tracing and calls the library.
//!
//! Exit codes of the client commands: 0 found / ok, 1 not found, 2 error.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use causalkv::client::{Client, ClientError};
use causalkv::net::NodeError;
use causalkv::tools::dev::{self, CLI_CLIENT, DevOptions};
use causalkv::tools::{bench, certs};
use causalkv::{Node, SiteConfig};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// mimalloc instead of the system allocator: replication moves millions of short-lived buffers
/// a second (frames, dependency vectors, log records), and glibc's malloc/free was a fifth of the
/// receiving site's profile.
///
/// Without transparent huge pages (built with mimalloc's `no_thp`, and
/// [`disable_transparent_huge_pages`] at start): a heap of a few MiB spread over mimalloc's
/// 64 KiB pages would otherwise be backed by 2 MiB pages, so that a short burst of allocations
/// (a catch-up after a partition heals) grew a site's RSS by 10-17 MiB, given back only in 2 MiB
/// steps over minutes. Without them the same site holds about 2.5 MiB of anonymous memory
/// instead of 12.5, and the burst costs what it allocates.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), also where the
/// system policy is `always` rather than `madvise`: see [`GLOBAL`]. Best effort: a kernel
/// without the call leaves the policy as it is.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(2) with PR_SET_THP_DISABLE takes integers only and sets a flag of this
    // process; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// What `--version` prints: the crate version, the wire protocol version with its ALPNs, and
/// the version of the peer protocol that two sites check in their hello.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (wire protocol {}: {}, {}; peer protocol {})",
        env!("CARGO_PKG_VERSION"),
        causalkv::tls::PROTOCOL_VERSION,
        String::from_utf8_lossy(causalkv::tls::ALPN_CLIENT),
        String::from_utf8_lossy(causalkv::tls::ALPN_PEER),
        causalkv::peer_wire::PROTOCOL_VERSION,
    )
});

#[derive(Parser)]
#[command(
    name = "causalkv",
    version = VERSION.as_str(),
    about = "Geo-replicated key-value store with causal+ consistency"
)]
struct Cli {
    /// Log format on stderr: `text` (coloured only on a terminal and without `NO_COLOR`) or
    /// `json` (one object per line, for log shippers). `RUST_LOG` sets the filter.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The log formats of `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one site from its configuration file. SIGHUP reloads its certificate, key and CA
    /// from their files (new connections use them); SIGINT/SIGTERM stop it gracefully.
    Serve {
        /// The site's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Truncate a site's write-ahead log at its first corrupt record (the site must be stopped).
    /// Records after it are lost at this site: peers resend their own updates, but this site's
    /// own updates after that point survive only where peers already have them.
    Repair {
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
        /// First UDP port; site i listens on port + i, serves its admin HTTP endpoints
        /// (`/metrics`, `/status`) on TCP port + 1000 + i, and Redis clients (RESP over TLS)
        /// on TCP port + 2000 + i.
        #[arg(long, default_value_t = 7100)]
        port: u16,
        /// Partition nodes per site: site i's partition p listens on port + i * P + p.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Only write certificates and site configs (for `causalkv serve --config`), then exit.
        #[arg(long)]
        layout_only: bool,
        /// Largest value the sites accept, in bytes (`[limits] max_value`; the frame limit
        /// grows with it).
        #[arg(long, default_value_t = causalkv::wire::Limits::default().max_value)]
        max_value: usize,
    },
    /// Benchmarks (release builds): load against running sites, replication throughput,
    /// visibility latency.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// User-space WAN emulator: a mesh of delaying UDP relays between the sites of a local
    /// layout (and TCP relays, e.g. for etcd peers), running until SIGINT/SIGTERM.
    /// `--self-test` instead measures the delay the emulator itself adds.
    Wan(WanArgs),
    /// Certificate tooling.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Write a value (given as an argument, or the bytes of a file with --value-file).
    Put {
        /// Key.
        key: String,
        /// Value (UTF-8 text; use --value-file for binary or large values).
        #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
        value: Option<String>,
        /// Read the value's raw bytes from this file (`-`: standard input).
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// Wait until this many remote sites have the write durably.
        #[arg(long, default_value_t = 0, conflicts_with = "strong")]
        sync: u8,
        /// Write to the strong keyspace, linearizably, through the partition's Raft group.
        #[arg(long)]
        strong: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Read a value (exit code 1 when absent). Without --out, a value that is not UTF-8 is
    /// printed with non-printable bytes escaped (`\xNN`, `\n`, ...).
    Get {
        /// Key.
        key: String,
        /// Write the value's raw bytes to this file (`-`: standard output) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Read the strong keyspace, linearizably (read-index at the partition's leader).
        #[arg(long)]
        strong: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a key.
    Del {
        /// Key.
        key: String,
        /// Delete from the strong keyspace, linearizably.
        #[arg(long)]
        strong: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Compare-and-set in the strong keyspace: set KEY to NEW iff it holds --expect OLD (or is
    /// absent, with --expect-absent). Exit code 1 when it does not match; the current value is
    /// printed.
    Cas {
        /// Key.
        key: String,
        /// The new value (omit with --delete).
        #[arg(required_unless_present = "delete", conflicts_with = "delete")]
        new: Option<String>,
        /// The value KEY must hold.
        #[arg(
            long,
            required_unless_present = "expect_absent",
            conflicts_with = "expect_absent"
        )]
        expect: Option<String>,
        /// KEY must be absent.
        #[arg(long)]
        expect_absent: bool,
        /// Delete KEY instead of setting a new value.
        #[arg(long)]
        delete: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show a site's applied and stable vectors, its peers and their lag.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The cluster configuration: its epoch and sites.
    Sites {
        #[command(subcommand)]
        cmd: SitesCmd,
    },
    /// Print a shell completion script (e.g. `causalkv completions bash > /etc/bash_completion.d/causalkv`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum SitesCmd {
    /// Show the cluster configuration a site holds: epoch, and every site with its id, name,
    /// address and state (the replicated configuration, or the file's sites before the first
    /// one is committed).
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Add a site to the cluster configuration: it gets the next site id and starts as
    /// `joining` (its certificate: `causalkv certs add-site NAME`). Made against the epoch the
    /// site asked shows; refused if the configuration changes meanwhile.
    Add {
        /// The new site's name.
        name: String,
        /// Where it listens (HOST:PORT; the host is resolved here).
        #[arg(long)]
        addr: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove a site from the cluster configuration. A live site is decommissioned: it
    /// refuses writes (its clients fail over), drains its updates to every peer, leaves the
    /// Raft groups and becomes `removed` (then stop it). With --dead, for a site gone for
    /// good (disk included): the survivors agree on a cut (the most of its updates any of them
    /// holds; every survivor must answer) and relay its updates to each other up to there.
    Remove {
        /// The site's name.
        name: String,
        /// The site is dead for good, disk included.
        #[arg(long)]
        dead: bool,
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
    /// Issue one more client certificate (`client-NAME.pem/.key`) from an existing CA.
    AddClient {
        /// Client name.
        name: String,
        /// Directory holding the CA (`ca.pem`, `ca.key`); the new files are written there.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Replace an existing certificate and key of this client.
        #[arg(long)]
        force: bool,
    },
    /// Issue the certificate of a new site (`site-NAME.pem/.key`) from an existing CA, for a
    /// site joining a running cluster.
    AddSite {
        /// Site name.
        name: String,
        /// Directory holding the CA (`ca.pem`, `ca.key`); the new files are written there.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Replace an existing certificate and key of this site.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Closed- or open-loop load from one client (one connection, pipelined requests).
    Load {
        /// Concurrent requests in flight.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Fraction of reads (0 = puts only, 1 = gets only).
        #[arg(long, default_value_t = 0.5)]
        read_ratio: f64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Distinct keys.
        #[arg(long, default_value_t = 10_000)]
        keys: u64,
        /// Zipfian key choice with this exponent (default: uniform).
        #[arg(long)]
        zipf: Option<f64>,
        /// Open loop at this many operations per second (default: closed loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Synchronous replication for puts.
        #[arg(long, default_value_t = 0)]
        sync: u8,
        /// Strong (linearizable) puts and gets instead of causal ones.
        #[arg(long, conflicts_with = "cas")]
        strong: bool,
        /// Compare-and-set only, one key per worker (latencies reported as `put`).
        #[arg(long)]
        cas: bool,
        /// Seed of the key choice (and of the compare-and-set keys' names).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Replication throughput between two in-process sites on loopback (catch-up of a backlog).
    Replication {
        /// Updates to stream.
        #[arg(long, default_value_t = 1_000_000)]
        updates: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Distinct keys written (fewer keys than updates: overwrites).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Run the two sites as separate `causalkv serve` processes (default: both in this
        /// process, on one runtime).
        #[arg(long)]
        processes: bool,
    },
    /// The transport's floor: bare QUIC with mutual TLS between two threads (one-way batched
    /// throughput, request/response latency), with no store, log or replica behind it.
    TransportFloor {
        /// Messages to send one way.
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// Bytes per message (176 is what one 100-byte update takes on the wire).
        #[arg(long, default_value_t = 176)]
        message_size: usize,
        /// Messages per frame.
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        /// Request/response round trips per variant.
        #[arg(long, default_value_t = 20_000)]
        pings: u64,
        /// Run the serving end as a separate process (default: a thread of this process).
        #[arg(long)]
        processes: bool,
    },
    /// The transport's floor for partitioning: a paced load of bare QUIC requests spread over
    /// separate echo servers, and the CPU time they spent (run with 1 and 2 servers).
    PartitionFloor {
        #[command(flatten)]
        opts: bench::PartitionFloorOptions,
    },
    /// The serving end of `transport-floor --processes` (prints its address, serves one
    /// connection).
    #[command(hide = true)]
    FloorServer {
        /// The certificate directory (serves as site b).
        #[arg(long)]
        certs: PathBuf,
        /// Serving ends to run, each on a thread and runtime of its own (an address line each).
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Recovery time of one site: snapshot of N keys plus a log tail.
    Recovery {
        /// Keys in the snapshot.
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Log records after the snapshot.
        #[arg(long, default_value_t = 100_000)]
        tail: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
    },
    /// Remote visibility latency between running sites: writes at the first --site, polls
    /// every other --site with its own fresh client until the value is there (ack → visible).
    VisibilityWan {
        /// Writes to measure.
        #[arg(long, default_value_t = 200)]
        writes: u64,
        /// Milliseconds between two writes.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Microseconds between two polls of a remote site.
        #[arg(long, default_value_t = 500)]
        poll_us: u64,
        /// Instead of polling, read each write once per remote site in a session holding the
        /// origin's token: the site answers as soon as it covers the write.
        #[arg(long)]
        wait: bool,
        /// With --wait: clients per remote site, one per read in flight.
        #[arg(long, default_value_t = 8)]
        readers: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// A causally checked workload over every --site: sessions spread over the sites hop from
    /// site to site with their session tokens; the recorded history is judged by the causal
    /// checker and the sites' final states by the convergence check. Prints a JSON report and
    /// exits 1 on a violation or divergence.
    Checked {
        /// Sessions starting at each site.
        #[arg(long, default_value_t = 2)]
        sessions_per_site: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Distinct keys (few, so that reads see other sites' writes).
        #[arg(long, default_value_t = 64)]
        keys: u64,
        /// Fraction of reads.
        #[arg(long, default_value_t = 0.5)]
        read_ratio: f64,
        /// A session moves to the next site after this many operations (0: never).
        #[arg(long, default_value_t = 10)]
        hop_every: u64,
        /// Seconds the sites may take to converge after the load.
        #[arg(long, default_value_t = 30.0)]
        settle_seconds: f64,
        /// Seed of the choices (printed in the report; the same seed replays them).
        #[arg(long)]
        seed: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Samples every --site's status (dependency-buffer occupancy, retained log) as JSON.
    StatusSample {
        /// Milliseconds between samples.
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
        /// Seconds to sample.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Client GET latency at one site (a `causalkv serve` process) while its write-ahead log
    /// rolls segments and its snapshotter runs, against the same load without either: per
    /// round and variant, get p50/p99/p99.9/max, puts/s, rolls and snapshots seen, and each
    /// variant's get p99 over quiet's. JSON on stdout, the table on stderr.
    Stalls {
        #[command(flatten)]
        opts: bench::StallOptions,
        /// Also write the JSON report to this file (pretty-printed).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run the site from this `causalkv` binary instead of this one (another build, to
        /// compare two builds under the same load driver).
        #[arg(long)]
        site_bin: Option<PathBuf>,
    },
    /// Remote visibility latency on loopback (write acked at a until applied at b).
    Visibility {
        /// Writes to measure.
        #[arg(long, default_value_t = 2000)]
        writes: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
    },
}

#[derive(Args)]
struct WanArgs {
    /// A layout directory from `causalkv dev --layout-only`: its site configs are rewritten
    /// (originals kept as `.orig`) to dial each peer through its own relay.
    #[arg(long)]
    layout: Option<PathBuf>,
    /// One-way delays in ms, rows `;`-separated: row i, column j = delay of i → j
    /// (e.g. "0,15,40;15,0,75;40,75,0" for RTTs of 30/80/150 ms).
    #[arg(long)]
    matrix: Option<String>,
    /// A JSON `WanSpec` (matrix, link parameters, layout, TCP relays); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Jitter of every link, ms.
    #[arg(long)]
    jitter_ms: Option<f64>,
    /// Datagram loss probability of every link (0.01 = 1 %).
    #[arg(long)]
    loss: Option<f64>,
    /// Reordering probability of every link.
    #[arg(long)]
    reorder: Option<f64>,
    /// Bandwidth limit of every link, Mbit/s.
    #[arg(long)]
    bandwidth_mbit: Option<f64>,
    /// Control file, re-applied whenever it changes (cut/heal/set; see the `wan` module docs).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Write relays and per-link counters here (JSON) every 500 ms and at exit.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Measure the delay the emulator adds (0 ms and 20 ms links) and exit.
    #[arg(long)]
    self_test: bool,
    /// Datagrams per delay in the self-test (one per millisecond).
    #[arg(long, default_value_t = 3000)]
    samples: usize,
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
    /// When the session token names updates lost with a site removed while dead (a `Lost`
    /// error), cap it at the cut the survivors hold and continue.
    #[arg(long)]
    accept_loss: bool,
    /// Partition nodes per site: keys are routed to partition p at the --site port + p.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Whether text logs may use colour: only on a terminal, and not when `NO_COLOR` is set to a
/// non-empty value (<https://no-color.org>).
fn colour_wanted(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default: info, quieter for quinn,
/// rustls and openraft, whose info lines narrate every election; the node logs leader changes
/// itself).
fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn,rustls=warn,openraft=warn".into()),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(colour_wanted(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .init(),
        LogFormat::Json => builder.with_ansi(false).json().init(),
    }
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let threads: usize = std::env::var("CAUSALKV_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rt = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    rt.block_on(run(cli.cmd))
}

async fn run(cmd: Cmd) -> ExitCode {
    match cmd {
        Cmd::Serve { config } => match serve(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Cmd::Dev {
            sites,
            dir,
            port,
            partitions,
            layout_only,
            max_value,
        } => match run_dev(sites, dir, port, partitions, layout_only, max_value).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Cmd::Bench { cmd } => run_bench(cmd).await,
        Cmd::Wan(args) => match run_wan(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Cmd::Repair { config } => match repair(&config) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
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
        Cmd::Certs {
            cmd: cmd @ (CertsCmd::AddClient { .. } | CertsCmd::AddSite { .. }),
        } => {
            use causalkv::names::Role;
            let (role, name, ca_dir, force) = match cmd {
                CertsCmd::AddClient {
                    name,
                    ca_dir,
                    force,
                } => (Role::Client, name, ca_dir, force),
                CertsCmd::AddSite {
                    name,
                    ca_dir,
                    force,
                } => (Role::Site, name, ca_dir, force),
                CertsCmd::Init { .. } => unreachable!("matched above"),
            };
            match certs::add(&ca_dir, role, &name, force) {
                Ok(paths) => {
                    println!("{}\n{}", paths.cert.display(), paths.key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Put {
            key,
            value,
            value_file,
            sync,
            strong,
            conn,
        } => {
            let value = match (value, value_file) {
                (Some(v), _) => v.into_bytes(),
                (None, Some(path)) => match read_value_file(&path) {
                    Ok(v) => v,
                    Err(e) => return fail(&e),
                },
                (None, None) => return fail(&"give a value or --value-file"),
            };
            client_cmd(&conn, |c| async move {
                if strong {
                    c.put_strong(&key, &value).await?;
                    return Ok((
                        Some("ok (strong)".to_owned()),
                        serde_json::json!({"ok": true, "strong": true}),
                        true,
                    ));
                }
                let v = c.put_sync(&key, &value, sync).await?;
                Ok((
                    Some(format!("ok {v}")),
                    serde_json::json!({"ok": true, "version": v.to_string()}),
                    true,
                ))
            })
            .await
        }
        Cmd::Get {
            key,
            out,
            strong,
            conn,
        } => {
            client_cmd(&conn, |c| async move {
                let r = if strong {
                    causalkv::client::ReadValue {
                        value: c.get_strong(&key).await?,
                        version: None,
                    }
                } else {
                    c.get_versioned(&key).await?
                };
                let found = r.value.is_some();
                let mut json = serde_json::json!({
                    "found": found,
                    "version": r.version.map(|v| v.to_string()),
                });
                let text = match (&r.value, &out) {
                    (None, _) => Some("(not found)".to_owned()),
                    (Some(v), Some(path)) => {
                        write_value_out(path, v).map_err(|e| ClientError::Config(e.to_string()))?;
                        json["bytes"] = v.len().into();
                        None
                    }
                    (Some(v), None) => {
                        let (text, escaped) = printable(v);
                        json["value"] = text.clone().into();
                        if escaped {
                            json["escaped"] = true.into();
                        }
                        Some(text)
                    }
                };
                Ok((text, json, found))
            })
            .await
        }
        Cmd::Cas {
            key,
            new,
            expect,
            expect_absent: _,
            delete: _,
            conn,
        } => {
            client_cmd(&conn, |c| async move {
                let new = new.map(String::into_bytes);
                let expect = expect.map(String::into_bytes);
                match c.cas(&key, expect.as_deref(), new.as_deref()).await? {
                    causalkv::client::CasOutcome::Swapped => {
                        Ok((Some("ok".to_owned()), serde_json::json!({"ok": true}), true))
                    }
                    causalkv::client::CasOutcome::Failed { current } => {
                        let shown = current.as_ref().map(|v| printable(v).0);
                        Ok((
                            Some(format!(
                                "failed: current value {}",
                                shown.as_deref().unwrap_or("(not found)")
                            )),
                            serde_json::json!({"ok": false, "current": shown}),
                            false,
                        ))
                    }
                }
            })
            .await
        }
        Cmd::Del { key, strong, conn } => {
            client_cmd(&conn, |c| async move {
                if strong {
                    c.delete_strong(&key).await?;
                    return Ok((
                        Some("deleted (strong)".to_owned()),
                        serde_json::json!({"ok": true, "strong": true}),
                        true,
                    ));
                }
                let v = c.delete(&key).await?;
                Ok((
                    Some(format!("deleted {v}")),
                    serde_json::json!({"ok": true, "version": v.to_string()}),
                    true,
                ))
            })
            .await
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "causalkv",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Cmd::Sites {
            cmd: SitesCmd::List { conn },
        } => {
            client_cmd(&conn, |c| async move {
                let s = c.status().await?;
                let Some(m) = s.membership else {
                    return Err(ClientError::Config(format!(
                        "site {} reported no cluster configuration",
                        s.name
                    )));
                };
                let mut text = format!(
                    "cluster configuration at site {}: epoch {} ({}), next id {}",
                    s.name, m.epoch, m.source, m.next_id
                );
                for site in &m.sites {
                    text.push_str(&format!(
                        "\n  {:>2}  {:<12} {:<22} {}",
                        site.site, site.name, site.addr, site.state
                    ));
                }
                let json = serde_json::json!({"site": s.name, "membership": m});
                Ok((Some(text), json, true))
            })
            .await
        }
        Cmd::Sites {
            cmd: SitesCmd::Add { name, addr, conn },
        } => {
            client_cmd(&conn, |c| async move {
                let resolved = tokio::net::lookup_host(&addr)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        ClientError::Config(format!("cannot resolve site address {addr:?}"))
                    })?;
                let epoch = replicated_epoch(&c).await?;
                let new_epoch = c.add_site(&name, resolved, epoch).await?;
                let text = format!(
                    "site {name} added at {resolved} as joining; cluster configuration epoch {new_epoch}"
                );
                let json = serde_json::json!({"added": name, "addr": resolved.to_string(), "epoch": new_epoch});
                Ok((Some(text), json, true))
            })
            .await
        }
        Cmd::Sites {
            cmd: SitesCmd::Remove { name, dead, conn },
        } => {
            client_cmd(&conn, |c| async move {
                let epoch = replicated_epoch(&c).await?;
                let new_epoch = c.remove_site(&name, dead, epoch).await?;
                let text = if dead {
                    format!(
                        "site {name} removed as dead; the survivors relay its updates up to the \
                         cut; cluster configuration epoch {new_epoch}"
                    )
                } else {
                    format!(
                        "site {name} is leaving: it drains its updates to every peer, then \
                         becomes removed (watch `causalkv sites list`); epoch {new_epoch}"
                    )
                };
                let json = serde_json::json!({"removed": name, "dead": dead, "epoch": new_epoch});
                Ok((Some(text), json, true))
            })
            .await
        }
        Cmd::Status { conn } => {
            let local_certs = [
                (
                    "CA certificate".to_owned(),
                    certs::ca_paths(&conn.certs).cert,
                ),
                (
                    format!("client certificate {}", conn.client),
                    certs::client_paths(&conn.certs, &conn.client).cert,
                ),
            ];
            client_cmd(&conn, |c| async move {
            let s = c.status().await?;
            let mut text = format!(
                "site {} ({})\n  applied  {:?}\n  stable   {:?}\n  buffered {}  retained {}  keys {}\n  \
                 wal {} bytes  fsyncs {}",
                s.name, s.site, s.applied, s.stable, s.buffered, s.retained, s.keys, s.wal_bytes,
                s.fsyncs
            );
            if s.retention_held > 0 {
                text.push_str(&format!(
                    "\n  retention held: a peer counts {} sites, this site {}; nothing is pruned \
                     until this site applies the change",
                    s.retention_held,
                    s.applied.len()
                ));
            }
            if s.partitions > 1 {
                text.push_str(&format!(
                    "\n  partition {} of {}  site stable {:?}",
                    s.partition, s.partitions, s.site_stable
                ));
            }
            if let Some(cs) = &s.consensus {
                let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
                text.push_str(&format!(
                    "\n  consensus: {} term {}  leader {}  commit {}  applied {}",
                    cs.state,
                    cs.term,
                    cs.leader_name.as_deref().unwrap_or("(none)"),
                    show(cs.commit_index),
                    show(cs.applied_index)
                ));
                for v in &cs.voters {
                    text.push_str(&format!(
                        "\n    voter {} ({}) match index {}",
                        v.name,
                        v.site,
                        show(v.match_index)
                    ));
                }
            }
            if let Some(m) = &s.membership {
                text.push_str(&format!(
                    "\n  membership: epoch {} ({}), {} sites",
                    m.epoch,
                    m.source,
                    m.sites.iter().filter(|s| s.state != "removed").count()
                ));
            }
            text.push_str("\n  peers:");
            for p in &s.peers {
                text.push_str(&format!(
                    "\n    {} ({}) {}  {}: lag {} updates, {} ms ({})",
                    p.name, p.site, p.addr, p.state, p.lag_updates, p.lag_ms, p.reason
                ));
            }
            let mut json = serde_json::to_value(&s).expect("status serialises");
            // Certificates: the one the site presented, and this client's own.
            let mut seen = Vec::new();
            if let Some(t) = c.site_certificate_not_after().await {
                seen.push((format!("certificate of site {}", s.name), t));
            }
            for (what, path) in local_certs {
                if let Ok(t) = causalkv::tls::pem_not_after(&path) {
                    seen.push((what, t));
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let mut warnings = Vec::new();
            let mut listed = Vec::new();
            for (what, not_after) in &seen {
                listed.push(serde_json::json!({"cert": what, "expires_in_seconds": not_after - now}));
                if let Some(w) = certs::expiry_warning(what, *not_after, now) {
                    text.push_str(&format!("\n  warning: {w}"));
                    warnings.push(w);
                }
            }
            json["certificates"] = listed.into();
            json["warnings"] = warnings.into();
            Ok((Some(text), json, true))
        })
        .await
        }
    }
}

async fn run_bench(cmd: BenchCmd) -> ExitCode {
    let print = |v: serde_json::Value| {
        println!("{v}");
        ExitCode::SUCCESS
    };
    match cmd {
        BenchCmd::Load {
            concurrency,
            seconds,
            read_ratio,
            value_size,
            keys,
            zipf,
            rate,
            sync,
            strong,
            cas,
            seed,
            conn,
        } => {
            let opts = bench::LoadOptions {
                level: match (strong, cas) {
                    (_, true) => bench::Level::Cas,
                    (true, _) => bench::Level::Strong,
                    _ => bench::Level::Causal,
                },
                concurrency,
                duration: Duration::from_secs_f64(seconds),
                read_ratio,
                value_size,
                keys,
                dist: zipf.map_or(bench::KeyDist::Uniform, bench::KeyDist::Zipf),
                rate,
                sync,
                seed,
            };
            client_cmd(&conn, |c| async move {
                let report = bench::run_load(c, &opts).await;
                let json = serde_json::to_value(&report).expect("report serialises");
                Ok((Some(json.to_string()), json, true))
            })
            .await
        }
        BenchCmd::Replication {
            updates,
            value_size,
            keys,
            processes,
        } => {
            in_temp_dir("repl", |dir| async move {
                if processes {
                    let bin = std::env::current_exe().map_err(|e| e.to_string())?;
                    bench::replication_throughput_processes(&dir, &bin, updates, value_size, keys)
                        .await
                } else {
                    bench::replication_throughput(&dir, updates, value_size, keys).await
                }
            })
            .await
        }
        BenchCmd::TransportFloor {
            messages,
            message_size,
            batch,
            pings,
            processes,
        } => {
            in_temp_dir("floor", |dir| async move {
                let bin = match processes {
                    true => Some(std::env::current_exe().map_err(|e| e.to_string())?),
                    false => None,
                };
                bench::transport_floor(&dir, messages, message_size, batch, pings, bin.as_deref())
            })
            .await
        }
        BenchCmd::PartitionFloor { opts } => {
            in_temp_dir("partition-floor", |dir| async move {
                let bin = std::env::current_exe().map_err(|e| e.to_string())?;
                tokio::task::spawn_blocking(move || bench::partition_floor(&dir, &bin, &opts))
                    .await
                    .map_err(|e| e.to_string())?
            })
            .await
        }
        BenchCmd::FloorServer { certs, count } => {
            // Each serving end has its own runtime, so a thread of its own.
            let ends: Vec<_> = (0..count.max(1))
                .map(|_| {
                    let certs = certs.clone();
                    std::thread::spawn(move || {
                        bench::floor_server(&certs, |addr| {
                            use std::io::Write;
                            let mut out = std::io::stdout().lock();
                            let _ = writeln!(out, "{addr}");
                            let _ = out.flush();
                        })
                    })
                })
                .collect();
            let mut code = ExitCode::SUCCESS;
            for end in ends {
                code = match end.join() {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => fail(&e),
                    Err(_) => fail(&"the floor server panicked"),
                };
            }
            code
        }
        BenchCmd::Recovery {
            keys,
            tail,
            value_size,
        } => {
            in_temp_dir("rec", |dir| async move {
                bench::recovery(&dir, keys, tail, value_size).await
            })
            .await
        }
        BenchCmd::VisibilityWan {
            writes,
            interval_ms,
            poll_us,
            wait,
            readers,
            value_size,
            conn,
        } => {
            let clients = match connect_each(&conn).await {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            let mut it = clients.into_iter();
            let Some((_, origin)) = it.next() else {
                return fail(&"give the origin and remote sites with --site");
            };
            let mut remotes = Vec::new();
            for (site, first) in it {
                let mut pool = vec![first];
                while wait && pool.len() < readers.max(1) {
                    match connect_one(&conn, &site).await {
                        Ok(c) => pool.push(std::sync::Arc::new(c)),
                        Err(e) => return fail(&e),
                    }
                }
                remotes.push((site, pool));
            }
            let probe = if wait {
                bench::VisibilityProbe::Wait
            } else {
                bench::VisibilityProbe::Poll(Duration::from_micros(poll_us))
            };
            let r = bench::visibility_wan(
                origin,
                remotes,
                writes,
                Duration::from_millis(interval_ms),
                probe,
                value_size,
            )
            .await;
            match r {
                Ok(r) => print(serde_json::to_value(r).expect("serialises")),
                Err(e) => fail(&e),
            }
        }
        BenchCmd::Checked {
            sessions_per_site,
            seconds,
            keys,
            read_ratio,
            hop_every,
            settle_seconds,
            seed,
            conn,
        } => {
            use causalkv::tools::checked;
            let seed = seed.unwrap_or_else(causalkv::client::random_id);
            eprintln!("bench checked: seed {seed} (replay with --seed {seed})");
            let opts = checked::CheckedOptions {
                sites: conn.sites.len(),
                sessions_per_site,
                duration: Duration::from_secs_f64(seconds),
                keys,
                read_ratio,
                hop_every,
                settle: Duration::from_secs_f64(settle_seconds),
                seed,
            };
            let conn = std::sync::Arc::new(conn);
            let connect: checked::Connect = std::sync::Arc::new(move |i| {
                let conn = conn.clone();
                Box::pin(async move { connect_one(&conn, &conn.sites[i]).await })
            });
            let r = checked::run_checked(connect, &opts).await;
            println!("{}", serde_json::to_value(&r).expect("serialises"));
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        BenchCmd::StatusSample {
            interval_ms,
            seconds,
            conn,
        } => {
            let clients = match connect_each(&conn).await {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            let r = bench::sample_status(
                clients,
                Duration::from_millis(interval_ms),
                Duration::from_secs_f64(seconds),
            )
            .await;
            print(serde_json::to_value(r).expect("serialises"))
        }
        BenchCmd::Stalls {
            opts,
            out,
            site_bin,
        } => {
            in_temp_dir("stalls", |dir| async move {
                let bin = match site_bin {
                    Some(b) => b,
                    None => std::env::current_exe().map_err(|e| e.to_string())?,
                };
                let report = bench::stalls(&dir, &bin, &opts).await?;
                eprintln!("{}", report.table());
                if let Some(out) = out {
                    let json = serde_json::to_string_pretty(&report).expect("report serialises");
                    std::fs::write(&out, json).map_err(|e| format!("{}: {e}", out.display()))?;
                }
                Ok(report)
            })
            .await
        }
        BenchCmd::Visibility { writes, value_size } => {
            in_temp_dir("vis", |dir| async move {
                bench::visibility_latency(&dir, writes, value_size).await
            })
            .await
        }
    }
}

/// Runs an in-process benchmark in a fresh temporary directory, removes the directory, and
/// prints the report as JSON.
async fn in_temp_dir<R, F, Fut>(name: &str, f: F) -> ExitCode
where
    R: serde::Serialize,
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<R, String>>,
{
    let dir = std::env::temp_dir().join(format!("causalkv-bench-{name}-{}", std::process::id()));
    let r = f(dir.clone()).await;
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Ok(r) => {
            println!("{}", serde_json::to_value(r).expect("report serialises"));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// The bytes of a `--value-file`: the file's, or standard input's for `-`.
fn read_value_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin().lock().read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut buf))
    };
    read.map_err(|e| format!("--value-file {}: {e}", path.display()))?;
    Ok(buf)
}

/// Writes a value's raw bytes to `--out` (standard output for `-`).
fn write_value_out(path: &Path, value: &[u8]) -> Result<(), String> {
    let written = if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(value).and_then(|()| out.flush())
    } else {
        std::fs::write(path, value)
    };
    written.map_err(|e| format!("--out {}: {e}", path.display()))
}

/// A value as text: UTF-8 as it is, anything else with its bytes escaped the way Rust's
/// `escape_ascii` does (`\xNN`, `\n`, `\\`, ...), so that nothing is lost or replaced. The flag
/// tells whether it was escaped.
fn printable(value: &[u8]) -> (String, bool) {
    match std::str::from_utf8(value) {
        Ok(s) => (s.to_owned(), false),
        Err(_) => (value.escape_ascii().to_string(), true),
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
        .partitions(args.partitions)
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
    client.set_accept_losses(args.accept_loss);
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

/// One client per `--site` (each talking to that site only).
async fn connect_each(
    args: &ConnArgs,
) -> Result<Vec<(String, std::sync::Arc<Client>)>, ClientError> {
    let mut out = Vec::new();
    for site in &args.sites {
        let c = connect_one(args, site).await?;
        out.push((site.clone(), std::sync::Arc::new(c)));
    }
    Ok(out)
}

/// The epoch of the replicated cluster configuration the site of `c` holds (the epoch a change
/// is made against), or an error saying it holds none yet.
async fn replicated_epoch(c: &Client) -> Result<u64, ClientError> {
    let s = c.status().await?;
    match s.membership {
        Some(m) if m.source == "replicated" => Ok(m.epoch),
        _ => Err(ClientError::Config(format!(
            "site {} holds no replicated cluster configuration yet (is it partition 0 of its \
             site, and has the cluster bootstrapped?)",
            s.name
        ))),
    }
}

/// A client of `site` alone, with the identity and limits of `args`.
async fn connect_one(args: &ConnArgs, site: &str) -> Result<Client, ClientError> {
    let paths = certs::client_paths(&args.certs, &args.client);
    Client::builder()
        .sites(vec![site.to_owned()])
        .partitions(args.partitions)
        .identity(paths.cert, paths.key)
        .ca(certs::ca_paths(&args.certs).cert)
        .timeout(Duration::from_millis(args.timeout_ms))
        .connect()
        .await
}

async fn run_wan(args: WanArgs) -> Result<(), String> {
    use causalkv::tools::wan;
    if args.self_test {
        let r = tokio::task::spawn_blocking(move || {
            wan::self_test(&[0.0, 20.0], args.samples, Duration::from_millis(1))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        println!("{}", serde_json::to_string(&r).expect("serialises"));
        return Ok(());
    }
    let mut spec: wan::WanSpec = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => wan::WanSpec::default(),
    };
    if let Some(m) = &args.matrix {
        spec.matrix_ms = wan::parse_matrix(m)?;
    }
    if let Some(l) = &args.layout {
        spec.layout = Some(l.clone());
    }
    if let Some(v) = args.jitter_ms {
        spec.link.jitter_ms = v;
    }
    if let Some(v) = args.loss {
        spec.link.loss = v;
    }
    if let Some(v) = args.reorder {
        spec.link.reorder = v;
    }
    if let Some(v) = args.bandwidth_mbit {
        spec.link.bandwidth_mbit = v;
    }
    let net = wan::start(&spec)?;
    let write_stats = |net: &wan::Wan| {
        if let Some(p) = &args.stats {
            let v = serde_json::json!({ "relays": net.relays(), "links": net.stats() });
            let tmp = p.with_extension("tmp");
            if std::fs::write(&tmp, v.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    };
    write_stats(&net);
    eprintln!(
        "causalkv wan: {} sites, {} relays up",
        net.sites(),
        net.relays().len()
    );
    let mut control_seen = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        n += 1;
        if let Some(c) = &args.control {
            let text = std::fs::read_to_string(c).unwrap_or_default();
            if control_seen.as_ref() != Some(&text) {
                match net.apply_control(&text) {
                    Ok(()) => eprintln!(
                        "causalkv wan: control applied ({} lines)",
                        text.lines().count()
                    ),
                    Err(e) => eprintln!("causalkv wan: {e}"),
                }
                control_seen = Some(text);
            }
        }
        if n.is_multiple_of(5) {
            write_stats(&net);
        }
    }
    write_stats(&net);
    tokio::task::spawn_blocking(move || net.shutdown())
        .await
        .map_err(|e| e.to_string())
}

fn repair(config: &std::path::Path) -> Result<String, String> {
    use causalkv::storage::{snapshot, wal};
    let cfg = SiteConfig::load(config).map_err(|e| e.to_string())?;
    let from = snapshot::load(&cfg.data_dir)
        .map_err(|e| e.to_string())?
        .map_or(0, |s| s.wal_lsn());
    let report = wal::repair(&cfg.data_dir, from).map_err(|e| e.to_string())?;
    Ok(report.to_string())
}

async fn serve(config: PathBuf) -> Result<(), String> {
    let cfg = SiteConfig::load(&config).map_err(|e| e.to_string())?;
    // Benchmark-only: `CAUSALKV_BENCH_EVENTUAL=1` switches the dependency check off, so remote
    // updates apply on arrival (eventual consistency), for the side-by-side comparison in
    // scripts/bench-wan.sh. Never set it in a deployment: it gives up causal consistency.
    let opts = causalkv::net::NodeOptions {
        check_deps: std::env::var("CAUSALKV_BENCH_EVENTUAL").as_deref() != Ok("1"),
        // Test-only: `CAUSALKV_TEST_NO_RELAY=1` keeps the survivors of a site removed while
        // dead from relaying its updates to each other (the membership tests show that they
        // then miss them). Never set it in a deployment.
        relay: std::env::var("CAUSALKV_TEST_NO_RELAY").as_deref() != Ok("1"),
        // Test-only: `CAUSALKV_TEST_PRUNE_AHEAD=1` lets a site prune updates a site it has not
        // counted yet may need (the membership tests show the joining site then misses them);
        // `CAUSALKV_TEST_HOLD_SITES=1` makes a site lag on a change that adds sites while a
        // file `test-hold-sites` is in its data directory (and hold a snapshot it serves before
        // its floor while `test-hold-floor` is there). Never set them in a deployment.
        hold_for_added: std::env::var("CAUSALKV_TEST_PRUNE_AHEAD").as_deref() != Ok("1"),
        hold_sites: std::env::var("CAUSALKV_TEST_HOLD_SITES").as_deref() == Ok("1"),
        // Test-only: `CAUSALKV_TEST_PAUSE_JOINT=1` pauses a membership change in joint consensus
        // while a file `test-pause-joint` is in the data directory. Never set it in a deployment.
        strong: causalkv::net::StrongOptions {
            pause_joint: std::env::var("CAUSALKV_TEST_PAUSE_JOINT").as_deref() == Ok("1"),
            ..Default::default()
        },
        ..Default::default()
    };
    if !opts.check_deps {
        tracing::warn!("CAUSALKV_BENCH_EVENTUAL=1: dependency checks off (benchmark only)");
    }
    if !opts.hold_for_added {
        tracing::warn!(
            "CAUSALKV_TEST_PRUNE_AHEAD=1: pruning does not wait for sites added elsewhere (tests only)"
        );
    }
    if !opts.relay {
        tracing::warn!(
            "CAUSALKV_TEST_NO_RELAY=1: no relay of removed dead sites' updates (tests only)"
        );
    }
    // Installed before the start, so that a SIGHUP sent while the site starts is a reload
    // once it runs rather than the default action (terminating the process).
    let mut hangups = hangups();
    let node = Node::start_with(cfg, opts)
        .await
        .map_err(|e| e.to_string())?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(()) = hangups.recv() => {
                tracing::info!("SIGHUP: reloading the certificates");
                // The outcome, either way, is logged by the reload itself.
                let _ = node.reload_tls().await;
            }
        }
    }
    node.shutdown().await;
    Ok(())
}

/// A channel that receives one message per SIGHUP (never any off Unix).
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // Several SIGHUPs while a reload runs make one more reload, not a queue.
                let _ = tx.try_send(());
            }
        });
    }
    // Off Unix the sender is dropped: the channel is closed and never yields.
    #[cfg(not(unix))]
    drop(tx);
    rx
}

async fn run_dev(
    sites: usize,
    dir: PathBuf,
    port: u16,
    partitions: u32,
    layout_only: bool,
    max_value: usize,
) -> Result<(), String> {
    if !(1..=64).contains(&partitions) {
        return Err(format!("--partitions must be 1 to 64, not {partitions}"));
    }
    // Before the banner: Ctrl-C right after it must stop the sites cleanly.
    let stop = shutdown_signal();
    let cluster = dev::prepare(&DevOptions {
        partitions,
        limits: dev::limits_for_max_value(max_value),
        ..DevOptions::new(sites, &dir, port)
    })
    .map_err(|e| e.to_string())?;
    if layout_only {
        for f in &cluster.files {
            println!("{}", f.display());
        }
        return Ok(());
    }
    let mut nodes = Vec::new();
    for cfg in &cluster.configs {
        let node = match Node::start(cfg.clone()).await {
            // The admin port is a convenience here: run without it rather than not at all.
            Err(NodeError::Bind { addr, source }) if cfg.admin_addr == Some(addr) => {
                eprintln!(
                    "warning: site {}: admin port {addr} unavailable ({source}); no /metrics",
                    cfg.me().name
                );
                let mut cfg = cfg.clone();
                cfg.admin_addr = None;
                Node::start(cfg).await
            }
            Err(NodeError::Bind { addr, source })
                if cfg.resp.as_ref().is_some_and(|r| r.addr == addr) =>
            {
                eprintln!(
                    "warning: site {}: RESP port {addr} unavailable ({source}); no Redis clients",
                    cfg.me().name
                );
                let mut cfg = cfg.clone();
                cfg.resp = None;
                Node::start(cfg).await
            }
            other => other,
        };
        nodes.push(node.map_err(|e| e.to_string())?);
    }
    let addrs: Vec<String> = cluster.configs[0]
        .sites
        .iter()
        .map(|s| s.addr.to_string())
        .collect();
    let part_flag = if partitions > 1 {
        format!(" --partitions {partitions}")
    } else {
        String::new()
    };
    let certs = cluster.certs.display();
    if partitions > 1 {
        println!(
            "causalkv dev: {} sites x {partitions} partitions up ({} nodes), partition 0 at: {}",
            addrs.len(),
            nodes.len(),
            addrs.join(", ")
        );
    } else {
        println!(
            "causalkv dev: {} sites up: {}",
            nodes.len(),
            addrs.join(", ")
        );
    }
    let admin: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.admin_addr())
        .map(|a| format!("http://{a}/metrics"))
        .collect();
    if !admin.is_empty() {
        println!(
            "metrics (Prometheus; /status for JSON): {}",
            admin.join(", ")
        );
    }
    println!("site configs: {}/site-<name>.toml", dir.display());
    println!("try, from another shell:");
    println!(
        "  causalkv put hello world --site {}{part_flag} --certs {certs}",
        addrs[0]
    );
    println!(
        "  causalkv get hello --site {}{part_flag} --certs {certs}",
        addrs.get(1).unwrap_or(&addrs[0])
    );
    println!("  causalkv status --site {} --certs {certs}", addrs[0]);
    let resp: Vec<std::net::SocketAddr> = nodes.iter().filter_map(|n| n.resp_addr()).collect();
    if let Some(first) = resp.first() {
        let list: Vec<String> = resp.iter().map(|a| a.to_string()).collect();
        println!(
            "Redis clients (RESP over TLS), one port per site: {}",
            list.join(", ")
        );
        println!(
            "  redis-cli --tls --cacert {certs}/ca.pem --cert {certs}/client-{CLI_CLIENT}.pem --key {certs}/client-{CLI_CLIENT}.key -h {} -p {}",
            first.ip(),
            first.port()
        );
    }
    println!("(with cargo: cargo run --release -- get hello ...). Ctrl-C stops all sites.");
    stop.await;
    let mut stopping = tokio::task::JoinSet::new();
    for n in nodes {
        stopping.spawn(n.shutdown());
    }
    while stopping.join_next().await.is_some() {}
    println!("causalkv dev: stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled: a signal that arrives in between is not lost (and does not kill
/// the process with the default action).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
