//! The async client library: sessions with a causal context, and causal failover.
//!
//! A [`Client`] holds one QUIC connection (mutual TLS, ALPN `causalkv-client/2`) to its current
//! site and a **session context**: the vector clock of everything it has read or written. Every
//! request carries the context, and a site answers only once it has applied all of it, so the
//! session keeps read-your-writes, monotonic reads and monotonic writes, and its writes follow its
//! reads, whichever site serves it.
//!
//! When the current site cannot be reached, the client moves to the next configured site; the
//! first request there waits (bounded by the request timeout) until that site has caught up
//! with the context, or fails with [`ClientError::NotReady`] saying what is missing.
//!
//! Concurrent calls on one `Client` are pipelined on its connection: each request is its own
//! QUIC stream. The context can be exported as a compact token ([`Client::session_token`]) and
//! adopted by another process ([`Client::set_session_token`]) to share one session.
//!
//! ```no_run
//! # async fn demo() -> Result<(), causalkv_client::ClientError> {
//! use causalkv_client::Client;
//!
//! let client = Client::builder()
//!     .sites(["127.0.0.1:7100", "127.0.0.1:7101"])
//!     .identity("certs/dev/client-app.pem", "certs/dev/client-app.key")
//!     .ca("certs/dev/ca.pem")
//!     .connect()
//!     .await?;
//! client.put("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! let token = client.session_token(); // hand this to another process
//! # let _ = token;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use quinn::{Connection, Endpoint};

use crate::clock::{VClock, Version};
use crate::tls::{self, Identity, TlsFiles, TransportLimits};
use crate::wire::{self, ClientOp, Request, Response, ResponseBody, StatusInfo, error_code};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not complete in time.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The site has not applied the session's causal context within the timeout.
    #[error("site {site} is not causally ready: {message}")]
    NotReady {
        /// The site's address.
        site: SocketAddr,
        /// What is missing.
        message: String,
    },
    /// A key or value exceeds the site's limits.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The TLS handshake or certificate check failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// No configured site could be reached.
    #[error("connection: {0}")]
    Connection(String),
    /// The write is durable at the site but synchronous replication did not complete in time.
    #[error("synchronous replication incomplete: {message}")]
    SyncTimeout {
        /// The version written.
        version: Version,
        /// Details.
        message: String,
    },
    /// The site refused the request.
    #[error("site error {code}: {message}")]
    Server {
        /// One of [`error_code`].
        code: u16,
        /// The site's explanation.
        message: String,
    },
    /// Local configuration (certificates, addresses, token).
    #[error("configuration: {0}")]
    Config(String),
    /// A strong operation found no leader or no majority within the timeout. It was not
    /// applied; the message names what is missing.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A strong write timed out after it was proposed: it may or may not be applied. Retrying
    /// it is not the same request (a new serial); read the key to find out.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The session saw updates of a site that was removed while dead, beyond what the
    /// surviving sites hold (the cut): they died with that site, and no site will ever serve
    /// the session's context. Continue explicitly with [`Client::accept_loss`], which caps
    /// the context at the cut, or start a new session.
    #[error(
        "Lost {{ site: {site}, have: {have}, need: {need} }}: the session saw updates of removed \
         site {site} up to {need}, the survivors hold them up to {have}: {message}"
    )]
    Lost {
        /// The removed site's id.
        site: u16,
        /// The cut: how much of its stream survives.
        have: u64,
        /// How much of it the session's context names.
        need: u64,
        /// The site's explanation.
        message: String,
    },
}

/// The result of a compare-and-set ([`Client::cas`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key held the expected value (or was absent, as expected) and now holds the new one.
    Swapped,
    /// The key did not hold the expected value; nothing changed.
    Failed {
        /// The value found (`None`: absent).
        current: Option<Bytes>,
    },
}

/// A value read, with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadValue {
    /// The value, if the key exists.
    pub value: Option<Bytes>,
    /// The version read, if any.
    pub version: Option<Version>,
}

/// Builds a [`Client`].
#[derive(Debug, Default)]
pub struct ClientBuilder {
    sites: Vec<String>,
    partitions: Option<u32>,
    site_partitions: Vec<Vec<SocketAddr>>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    timeout: Option<Duration>,
}

impl ClientBuilder {
    /// The sites to use, in failover order (`host:port`).
    pub fn sites<I, S>(mut self, sites: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sites = sites.into_iter().map(Into::into).collect();
        self
    }

    /// The number of partition nodes per site (default 1). Keys are routed by
    /// [`partition_of`](crate::sharding::partition_of); partition `p` of a site listens at the
    /// site address's port + `p`, unless [`ClientBuilder::site_partitions`] says otherwise.
    pub fn partitions(mut self, p: u32) -> Self {
        self.partitions = Some(p);
        self
    }

    /// The sites to use, in failover order, each as the addresses of its partition nodes in
    /// partition order (overrides [`ClientBuilder::sites`]).
    pub fn site_partitions<I, A>(mut self, sites: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: IntoIterator<Item = SocketAddr>,
    {
        self.site_partitions = sites.into_iter().map(|s| s.into_iter().collect()).collect();
        self
    }

    /// The client certificate and key (PEM).
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// The cluster CA certificate (PEM).
    pub fn ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.ca = Some(ca.into());
        self
    }

    /// Per-request timeout (default 5 s); also bounds how long a site may wait to become
    /// causally ready.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Connects to the first reachable site.
    pub async fn connect(self) -> Result<Client, ClientError> {
        tls::install_crypto_provider();
        // Resolved without blocking the runtime: a slow resolver must not stall other tasks.
        let mut sites = Vec::with_capacity(self.sites.len());
        for s in &self.sites {
            let addr = tokio::net::lookup_host(s.as_str())
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ClientError::Config(format!("cannot resolve site address {s:?}")))?;
            sites.push(addr);
        }
        let routes: Vec<Vec<SocketAddr>> = if self.site_partitions.is_empty() {
            let parts = self.partitions.unwrap_or(1);
            if !(1..=64).contains(&parts) {
                return Err(ClientError::Config(format!(
                    "partitions must be 1 to 64, not {parts}"
                )));
            }
            sites
                .iter()
                .map(|a| {
                    (0..parts)
                        .map(|p| {
                            let mut a = *a;
                            a.set_port(a.port().wrapping_add(p as u16));
                            a
                        })
                        .collect()
                })
                .collect()
        } else {
            self.site_partitions
        };
        let parts = routes.first().map_or(0, Vec::len);
        if routes.is_empty() || parts == 0 {
            return Err(ClientError::Config("no sites given".into()));
        }
        if routes.iter().any(|r| r.len() != parts)
            || self.partitions.is_some_and(|p| p as usize != parts)
        {
            return Err(ClientError::Config(
                "every site must list the same number of partitions".into(),
            ));
        }
        let ca = self
            .ca
            .ok_or_else(|| ClientError::Config("the cluster CA certificate is required".into()))?;
        let limits = TransportLimits::default();
        let config = match (self.cert, self.key) {
            (Some(cert), Some(key)) => {
                let id = Identity::load(&TlsFiles { ca, cert, key })
                    .map_err(|e| ClientError::Config(e.to_string()))?;
                tls::client_config(&id, &limits, tls::ALPN_CLIENT)
            }
            _ => {
                let roots = tls::load_roots(&ca).map_err(|e| ClientError::Config(e.to_string()))?;
                tls::client_config_anonymous(roots, &limits, tls::ALPN_CLIENT)
            }
        }
        .map_err(|e| ClientError::Config(e.to_string()))?;
        let bind: SocketAddr = if routes[0][0].is_ipv6() {
            "[::]:0".parse().expect("addr")
        } else {
            "0.0.0.0:0".parse().expect("addr")
        };
        let mut endpoint =
            Endpoint::client(bind).map_err(|e| ClientError::Connection(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let client = Client {
            endpoint,
            conns: (0..parts).map(|_| tokio::sync::Mutex::new(None)).collect(),
            current: AtomicUsize::new(0),
            routes,
            known_down: Mutex::new(Vec::new()),
            ctx: Mutex::new(VClock::default()),
            timeout: self.timeout.unwrap_or(Duration::from_secs(5)),
            client_id: random_id(),
            serial: AtomicU64::new(0),
            accept_losses: std::sync::atomic::AtomicBool::new(false),
        };
        client.connection(0).await?;
        Ok(client)
    }
}

/// A causal session against a causalkv cluster. See the [module docs](self).
pub struct Client {
    endpoint: Endpoint,
    /// Per site, in failover order: the address of each of its partition nodes.
    routes: Vec<Vec<SocketAddr>>,
    /// Per partition: the site index and the connection to its node there.
    conns: Vec<tokio::sync::Mutex<Option<(usize, Connection)>>>,
    /// The site the session uses for every partition (an index into `routes`).
    current: AtomicUsize,
    ctx: Mutex<VClock>,
    timeout: Duration,
    /// Whether a [`ClientError::Lost`] is accepted at once ([`Client::set_accept_losses`]).
    accept_losses: std::sync::atomic::AtomicBool,
    /// Sites the last connected site's failure detector reported `down`: failover tries them
    /// last instead of waiting on their connect timeouts first.
    known_down: Mutex<Vec<SocketAddr>>,
    /// This client's id for strong writes (random): with `serial`, what makes a retried
    /// strong write apply once.
    client_id: u64,
    /// The serial number of the last strong write.
    serial: AtomicU64,
}

/// A random client id (std's per-process random hash keys, the time and the process id): with
/// a serial number per write, what lets the strong keyspace apply a retried write once.
///
/// ```
/// assert_ne!(causalkv_client::client::random_id(), causalkv_client::client::random_id());
/// ```
pub fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

const TOKEN_PREFIX: &str = "ckv1.";

/// A causal context as a session token (`ckv1.` and the entries, base64): what
/// [`Client::session_token`] returns, and what the RESP command `CAUSAL.TOKEN` returns.
///
/// ```
/// use causalkv_client::client::{decode_session_token, encode_session_token};
/// use causalkv_client::clock::VClock;
///
/// let ctx = VClock::from_vec(vec![3, 0, 7]);
/// let token = encode_session_token(&ctx);
/// assert!(token.starts_with("ckv1."));
/// assert_eq!(decode_session_token(&token), Some(ctx));
/// assert_eq!(decode_session_token("ckv1.!"), None);
/// ```
pub fn encode_session_token(ctx: &VClock) -> String {
    let mut raw = Vec::with_capacity(ctx.len() * 8);
    for e in ctx.as_slice() {
        raw.extend_from_slice(&e.to_le_bytes());
    }
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

/// The causal context in a session token ([`encode_session_token`]), or `None` if `token` is
/// not one (at most 64 entries).
pub fn decode_session_token(token: &str) -> Option<VClock> {
    let b64 = token.strip_prefix(TOKEN_PREFIX)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .ok()?;
    if raw.len() % 8 != 0 || raw.len() > 64 * 8 {
        return None;
    }
    Some(VClock::from_vec(
        raw.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    ))
}

impl Client {
    /// A builder.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Reads `key`: `None` when it is absent or deleted.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, ClientError> {
        Ok(self.get_versioned(key).await?.value)
    }

    /// Reads `key` with its version.
    pub async fn get_versioned(&self, key: impl AsRef<[u8]>) -> Result<ReadValue, ClientError> {
        let op = ClientOp::Get {
            key: key.as_ref().to_vec(),
        };
        match self.call(op, true, self.partition(key.as_ref())).await? {
            ResponseBody::Value {
                value,
                version,
                deps,
            } => {
                let version = version.map(Version::from);
                if let Some(v) = version {
                    let mut ctx = self.ctx.lock().expect("ctx lock");
                    ctx.raise(v.site, v.ts);
                    // What the value depends on: a site split into partitions needs the
                    // session's context closed under dependencies.
                    if !deps.is_empty() {
                        ctx.merge(&VClock::from_vec(deps));
                    }
                }
                Ok(ReadValue {
                    value: value.map(Bytes::from),
                    version,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Writes `value` under `key` (asynchronous replication).
    pub async fn put(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Version, ClientError> {
        self.put_sync(key, value, 0).await
    }

    /// Writes `value` under `key` and waits until `k` remote sites have it durably.
    pub async fn put_sync(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        k: u8,
    ) -> Result<Version, ClientError> {
        let op = ClientOp::Put {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            sync: k,
        };
        self.write(op).await
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<Version, ClientError> {
        self.write(ClientOp::Delete {
            key: key.as_ref().to_vec(),
            sync: 0,
        })
        .await
    }

    /// Writes `value` under `key` in the strong keyspace, linearizably: once this returns,
    /// every strong read at any site sees it (or a later write). The write goes through the
    /// partition's Raft group (forwarded to the leader's site if need be) and carries the
    /// session's causal context, which strong readers merge into theirs.
    ///
    /// Fails with [`ClientError::Unavailable`] when no leader or majority answers within the
    /// timeout (not applied), or [`ClientError::OutcomeUnknown`] when it timed out after being
    /// proposed. The strong keyspace is separate from the causal one: [`Client::get`] does not
    /// see strong keys.
    ///
    /// ```no_run
    /// # async fn demo(client: causalkv_client::Client) -> Result<(), causalkv_client::ClientError> {
    /// use causalkv_client::client::CasOutcome;
    /// client.put_strong("owner", "alice").await?;
    /// assert_eq!(client.get_strong("owner").await?.as_deref(), Some(&b"alice"[..]));
    /// match client.cas("owner", Some(b"alice".as_slice()), Some(b"bob".as_slice())).await? {
    ///     CasOutcome::Swapped => println!("bob owns it now"),
    ///     CasOutcome::Failed { current } => println!("someone else: {current:?}"),
    /// }
    /// client.delete_strong("owner").await?;
    /// # Ok(()) }
    /// ```
    pub async fn put_strong(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), ClientError> {
        self.strong_write(key.as_ref(), Some(value.as_ref().to_vec()))
            .await
    }

    /// Deletes `key` from the strong keyspace, linearizably (see [`Client::put_strong`]).
    pub async fn delete_strong(&self, key: impl AsRef<[u8]>) -> Result<(), ClientError> {
        self.strong_write(key.as_ref(), None).await
    }

    async fn strong_write(&self, key: &[u8], value: Option<Vec<u8>>) -> Result<(), ClientError> {
        let op = ClientOp::StrongWrite {
            key: key.to_vec(),
            value,
            client: self.client_id,
            serial: self.serial.fetch_add(1, Ordering::Relaxed) + 1,
        };
        // A retry at another site is safe: the serial makes the write apply once.
        match self.call(op, true, self.partition(key)).await? {
            ResponseBody::StrongWritten => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `key` from the strong keyspace, linearizably: the leader confirms its leadership
    /// with a majority (read-index) before answering, so the read sees every strong write
    /// acknowledged before it started. The causal context stored with the value is merged into
    /// the session, so causal reads after it see what the value's writer had seen.
    pub async fn get_strong(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, ClientError> {
        let op = ClientOp::StrongGet {
            key: key.as_ref().to_vec(),
        };
        match self.call(op, true, self.partition(key.as_ref())).await? {
            ResponseBody::StrongValue { value, ctx } => {
                self.merge_context(ctx);
                Ok(value.map(Bytes::from))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Compare-and-set in the strong keyspace: sets `key` to `new` (`None` deletes it) iff it
    /// holds `expected` (`None`: iff it is absent), atomically and linearizably. Reports
    /// success, or the value found.
    pub async fn cas(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, ClientError> {
        let op = ClientOp::Cas {
            key: key.as_ref().to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
            client: self.client_id,
            serial: self.serial.fetch_add(1, Ordering::Relaxed) + 1,
        };
        match self.call(op, true, self.partition(key.as_ref())).await? {
            ResponseBody::CasResult { ok: true, .. } => Ok(CasOutcome::Swapped),
            ResponseBody::CasResult { current, ctx, .. } => {
                self.merge_context(ctx);
                Ok(CasOutcome::Failed {
                    current: current.map(Bytes::from),
                })
            }
            other => Err(unexpected(other)),
        }
    }

    fn merge_context(&self, ctx: Vec<u64>) {
        if !ctx.is_empty() {
            self.ctx
                .lock()
                .expect("ctx lock")
                .merge(&VClock::from_vec(ctx));
        }
    }

    /// The end of the validity period (`notAfter`, Unix seconds) of the certificate that the
    /// site serving partition 0 presented, if there is a connection to it.
    pub async fn site_certificate_not_after(&self) -> Option<i64> {
        let guard = self.conns[0].lock().await;
        let (_, conn) = guard.as_ref()?;
        let chain = conn
            .peer_identity()?
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        tls::not_after(chain.first()?)
    }

    /// Adds a site to the cluster configuration (what `causalkv sites add` does): it gets the
    /// next site id and starts as `joining`. The change is made against `expected_epoch` (the
    /// epoch [`Client::status`] shows in its `membership`) and refused if the configuration
    /// has moved on; a retry is applied once. Returns the new epoch.
    ///
    /// ```no_run
    /// # async fn f(client: causalkv_client::Client) -> Result<(), causalkv_client::ClientError> {
    /// let status = client.status().await?;
    /// let epoch = status.membership.map_or(0, |m| m.epoch);
    /// let new_epoch = client
    ///     .add_site("d", "10.0.0.4:7100".parse().unwrap(), epoch)
    ///     .await?;
    /// assert_eq!(new_epoch, epoch + 1);
    /// # Ok(()) }
    /// ```
    pub async fn add_site(
        &self,
        name: &str,
        addr: std::net::SocketAddr,
        expected_epoch: u64,
    ) -> Result<u64, ClientError> {
        self.change_sites(|client, serial| ClientOp::SitesAdd {
            name: name.to_owned(),
            addr: addr.to_string(),
            expected_epoch,
            client,
            serial,
        })
        .await
    }

    /// Sends a change of the cluster configuration, made by `op` from this client's id and its
    /// next serial (the change's deduplication key), and returns the new epoch.
    async fn change_sites(
        &self,
        op: impl FnOnce(u64, u64) -> ClientOp,
    ) -> Result<u64, ClientError> {
        let op = op(
            self.client_id,
            self.serial.fetch_add(1, Ordering::Relaxed) + 1,
        );
        match self.call(op, true, 0).await? {
            ResponseBody::SitesChanged { epoch } => Ok(epoch),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a site from the cluster configuration (what `causalkv sites remove` does),
    /// made against `expected_epoch` like [`Client::add_site`]. A live site (`dead` false) is
    /// decommissioned: it becomes `leaving`, refuses writes (its clients fail over), drains
    /// its updates to every peer and then becomes `removed` by itself. A dead site (`dead`
    /// true: gone for good, disk included) is removed at once with the cut the survivors agree
    /// on; every survivor must answer. Returns the new epoch.
    pub async fn remove_site(
        &self,
        name: &str,
        dead: bool,
        expected_epoch: u64,
    ) -> Result<u64, ClientError> {
        self.change_sites(|client, serial| ClientOp::SitesRemove {
            name: name.to_owned(),
            dead,
            expected_epoch,
            client,
            serial,
        })
        .await
    }

    /// Continues a session past a [`ClientError::Lost`]: caps its context's entry for the
    /// removed `site` at the cut (`have`), forgetting the updates that died with it. Requests
    /// then proceed; what the session saw of those updates is no longer guaranteed.
    ///
    /// ```no_run
    /// # async fn f(client: causalkv_client::Client) -> Result<(), causalkv_client::ClientError> {
    /// use causalkv_client::ClientError;
    /// let value = match client.get("k").await {
    ///     Err(ClientError::Lost { site, have, .. }) => {
    ///         client.accept_loss(site, have);
    ///         client.get("k").await?
    ///     }
    ///     other => other?,
    /// };
    /// # let _ = value;
    /// # Ok(()) }
    /// ```
    pub fn accept_loss(&self, site: u16, have: u64) {
        let mut ctx = self.ctx.lock().expect("ctx lock");
        if ctx.get(site) > have {
            let mut v = ctx.clone().into_vec();
            v[site as usize] = have;
            *ctx = VClock::from_vec(v);
        }
    }

    /// When `on`, every request that meets a [`ClientError::Lost`] caps the session's
    /// context at the cut ([`Client::accept_loss`]) and is sent again, instead of failing
    /// (what the CLI's `--accept-loss` does).
    pub fn set_accept_losses(&self, on: bool) {
        self.accept_losses.store(on, Ordering::Relaxed);
    }

    /// The current site's status.
    pub async fn status(&self) -> Result<StatusInfo, ClientError> {
        match self.call(ClientOp::Status, true, 0).await? {
            ResponseBody::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// The session's causal context.
    pub fn context(&self) -> VClock {
        self.ctx.lock().expect("ctx lock").clone()
    }

    /// The session's causal context as a compact token string.
    pub fn session_token(&self) -> String {
        encode_session_token(&self.context())
    }

    /// Starts a new session on the same connections: the causal context is emptied, so later
    /// requests carry no guarantee about what this client did or saw before.
    pub fn new_session(&self) {
        *self.ctx.lock().expect("ctx lock") = VClock::default();
    }

    /// Adopts a session token (merged into the current context, so nothing already seen is
    /// forgotten).
    pub fn set_session_token(&self, token: &str) -> Result<(), ClientError> {
        let ctx = decode_session_token(token)
            .ok_or_else(|| ClientError::Config(format!("not a session token: {token:?}")))?;
        self.ctx.lock().expect("ctx lock").merge(&ctx);
        Ok(())
    }

    /// The address of the site currently serving this session (its partition 0 node).
    pub async fn current_site(&self) -> Option<SocketAddr> {
        let current = self.current.load(Ordering::Relaxed);
        for c in &self.conns {
            if c.lock().await.as_ref().is_some_and(|(i, _)| *i == current) {
                return Some(self.routes[current][0]);
            }
        }
        None
    }

    /// The partition that holds `key`.
    fn partition(&self, key: &[u8]) -> usize {
        crate::sharding::partition_of(key, self.conns.len() as u32) as usize
    }

    async fn write(&self, op: ClientOp) -> Result<Version, ClientError> {
        let key = match &op {
            ClientOp::Put { key, .. } | ClientOp::Delete { key, .. } => key.as_slice(),
            _ => &[],
        };
        let p = self.partition(key);
        match self.call(op, false, p).await? {
            ResponseBody::Written { version } => {
                let v = Version::from(version);
                self.ctx.lock().expect("ctx lock").raise(v.site, v.ts);
                Ok(v)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The connection to partition `p` at its current site, connecting (with failover) if there
    /// is none.
    async fn connection(&self, p: usize) -> Result<(usize, Connection), ClientError> {
        let mut guard = self.conns[p].lock().await;
        let current = self.current.load(Ordering::Relaxed);
        if let Some((i, c)) = guard.as_ref()
            && *i == current
            && c.close_reason().is_none()
        {
            return Ok((*i, c.clone()));
        }
        // All partitions follow the session's current site: a partition whose node there failed
        // moves on, and the others follow it on their next request (staying behind on a site
        // where one partition node is down would leave them waiting for a context that site
        // can no longer cover).
        let start = match guard.as_ref() {
            Some((i, _)) if *i == current => current + 1,
            _ => current,
        };
        let down = self.known_down();
        // Configured order from the next site on, with sites reported down moved to the end.
        let n = self.routes.len();
        let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        order.sort_by_key(|&i| self.routes[i].iter().any(|a| down.contains(a)));
        let mut last = String::new();
        for i in order {
            let addr = self.routes[i][p];
            let connecting = match self.endpoint.connect(addr, tls::ANY_SITE_SERVER_NAME) {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            match tokio::time::timeout(self.timeout, connecting).await {
                Ok(Ok(c)) => {
                    *guard = Some((i, c.clone()));
                    self.current.store(i, Ordering::Relaxed);
                    self.learn_peer_states(&c).await;
                    return Ok((i, c));
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: connect timed out"),
            }
        }
        *guard = None;
        Err(ClientError::Connection(format!(
            "no site reachable (last: {last})"
        )))
    }

    /// Sites that the site this client last connected to reported `down` (phi-accrual failure
    /// detector); failover tries them last.
    pub fn known_down(&self) -> Vec<SocketAddr> {
        self.known_down.lock().expect("known_down lock").clone()
    }

    /// Asks a newly connected site for its view of its peers (best effort, short timeout).
    async fn learn_peer_states(&self, conn: &Connection) {
        let req = Request {
            timeout_ms: 0,
            ctx: Vec::new(),
            op: ClientOp::Status,
        };
        let limit = self.timeout.min(Duration::from_secs(1));
        if let Ok(Ok(Response {
            body: ResponseBody::Status(s),
            ..
        })) = tokio::time::timeout(limit, exchange(conn, &req)).await
        {
            let down = s
                .peers
                .iter()
                .filter(|p| p.state == "down")
                .filter_map(|p| p.addr.parse().ok())
                .collect();
            *self.known_down.lock().expect("known_down lock") = down;
        }
    }

    /// Sends one request, failing over to the next site when the current one is unreachable.
    /// A write is retried on another site only if it was certainly not delivered.
    async fn call(
        &self,
        op: ClientOp,
        idempotent: bool,
        p: usize,
    ) -> Result<ResponseBody, ClientError> {
        let mut attempts = 0;
        // Whether an earlier attempt may have reached a site (then a strong write refused as
        // unavailable now may still have been applied by that attempt).
        let mut delivered_before = false;
        loop {
            attempts += 1;
            let (i, conn) = self.connection(p).await?;
            let req = Request {
                timeout_ms: self.timeout.as_millis().min(u32::MAX as u128) as u32,
                ctx: self.context().into_vec(),
                op: op.clone(),
            };
            // Give the site its own timeout plus a margin to answer NOT_READY itself.
            let limit = self.timeout + Duration::from_millis(500);
            let result = tokio::time::timeout(limit, exchange(&conn, &req)).await;
            let err = match result {
                // No answer at all: the site is unreachable (an answer to a slow request,
                // NOT_READY included, comes before this limit).
                Err(_) if !idempotent => return Err(ClientError::Timeout(limit)),
                Err(_) => Exchange::AfterSend(format!("no answer within {limit:?}")),
                Ok(Ok(Response {
                    body: ResponseBody::Error { code, message, .. },
                    ..
                })) if code == error_code::SHUTTING_DOWN => {
                    // Refused before it was executed: safe to retry elsewhere, write or not.
                    conn.close(0u32.into(), b"failing over");
                    if attempts >= self.routes.len() * 2 {
                        return Err(ClientError::Connection(format!(
                            "{}: {message}",
                            self.routes[i][p]
                        )));
                    }
                    continue;
                }
                Ok(Ok(Response {
                    body:
                        ResponseBody::Error {
                            code,
                            version: Some(v),
                            ..
                        },
                    ..
                })) if code == error_code::LOST
                    && self.accept_losses.load(Ordering::Relaxed)
                    && attempts <= self.routes.len() * 2 =>
                {
                    // Refused before it was executed: cap the context and send it again.
                    let v = Version::from(v);
                    self.accept_loss(v.site, v.ts);
                    continue;
                }
                Ok(Ok(resp)) => {
                    return self.interpret(self.routes[i][p], resp, delivered_before);
                }
                Ok(Err(e)) => e,
            };
            // The site failed: forget its connection so the next attempt fails over.
            conn.close(0u32.into(), b"failing over");
            let delivered = matches!(err, Exchange::AfterSend(_));
            delivered_before |= delivered;
            let msg = err.message();
            if is_tls(&msg) {
                return Err(ClientError::Tls(msg));
            }
            if (delivered && !idempotent) || attempts >= self.routes.len() * 2 {
                return Err(ClientError::Connection(format!(
                    "{}: {msg}{}",
                    self.routes[i][p],
                    if delivered && !idempotent {
                        " (the write may or may not have been applied)"
                    } else {
                        ""
                    }
                )));
            }
        }
    }

    fn interpret(
        &self,
        site: SocketAddr,
        resp: Response,
        delivered_before: bool,
    ) -> Result<ResponseBody, ClientError> {
        match resp.body {
            ResponseBody::Error {
                code,
                message,
                version,
            } => Err(match code {
                error_code::NOT_READY => ClientError::NotReady { site, message },
                error_code::TOO_LARGE => ClientError::TooLarge(message),
                error_code::UNAVAILABLE if delivered_before => ClientError::OutcomeUnknown(
                    format!("{message} (an earlier attempt may have been applied)"),
                ),
                error_code::UNAVAILABLE => ClientError::Unavailable(message),
                error_code::OUTCOME_UNKNOWN => ClientError::OutcomeUnknown(message),
                error_code::LOST => {
                    let v = version.map(Version::from).unwrap_or_default();
                    ClientError::Lost {
                        site: v.site,
                        have: v.ts,
                        need: self.context().get(v.site),
                        message,
                    }
                }
                error_code::SYNC_TIMEOUT => {
                    let version = version.map(Version::from).unwrap_or_default();
                    self.ctx
                        .lock()
                        .expect("ctx lock")
                        .raise(version.site, version.ts);
                    ClientError::SyncTimeout { version, message }
                }
                code => ClientError::Server { code, message },
            }),
            body => Ok(body),
        }
    }
}

enum Exchange {
    BeforeSend(String),
    AfterSend(String),
}

impl Exchange {
    fn message(&self) -> String {
        match self {
            Exchange::BeforeSend(m) | Exchange::AfterSend(m) => m.clone(),
        }
    }
}

fn is_tls(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("certificate") || m.contains("crypto") || m.contains("tls")
}

async fn exchange(conn: &Connection, req: &Request) -> Result<Response, Exchange> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| Exchange::BeforeSend(e.to_string()))?;
    if let Err(e) = wire::write_frame(&mut send, &wire::encode(req)).await {
        // A site that refuses a request frame (one over its frame limit) answers why and then
        // stops the stream; that answer is the error to report. Nothing was executed.
        if let Ok(Some(frame)) = wire::read_frame(&mut recv, 64 << 20).await
            && let Ok(resp) = wire::decode::<Response>(&frame)
        {
            return Ok(resp);
        }
        return Err(Exchange::BeforeSend(e.to_string()));
    }
    let _ = send.finish();
    let frame = wire::read_frame(&mut recv, 64 << 20)
        .await
        .map_err(|e| Exchange::AfterSend(e.to_string()))?
        .ok_or_else(|| Exchange::AfterSend("stream closed without a response".into()))?;
    wire::decode::<Response>(&frame).map_err(|e| Exchange::AfterSend(e.to_string()))
}

fn unexpected(body: ResponseBody) -> ClientError {
    ClientError::Server {
        code: 0,
        message: format!("unexpected response {body:?}"),
    }
}
