//! The one TLS setup for peers and clients: quinn endpoint configurations with mutual TLS
//! against the cluster CA.
//!
//! - TLS 1.3 only (QUIC requires it), rustls with the *ring* provider, no 0-RTT (early data is
//!   replayable).
//! - Servers ([`server_config`]; [`rustls_server_config`] for TCP) offer both ALPNs, [`ALPN_PEER`] and [`ALPN_CLIENT`], present
//!   their site certificate and verify client certificates against the cluster CA with
//!   rustls' `WebPkiClientVerifier` (chain, validity, clientAuth EKU). With
//!   `require_client_cert == false` a client may present no certificate at all, but a
//!   certificate that *is* presented must still verify.
//! - Clients ([`client_config`]) present their certificate and verify the server against the
//!   cluster CA. The server name passed to `Endpoint::connect` selects the name check:
//!   - [`site_server_name`]`("a")` = `site-a.causalkv`: the server must be site `a`;
//!   - any other name or IP literal (`localhost`, `127.0.0.1`): the usual WebPKI name check;
//!   - [`ANY_SITE_SERVER_NAME`]: for clients that know an address but not the site behind
//!     it. The certificate must still chain to the cluster CA (with serverAuth EKU and a valid
//!     date); it is then checked against the first `site-<name>.causalkv` SAN it carries, so it
//!     must be *some* site's certificate. [`peer_identity`] tells which one.
//!
//!   Chain validation to the cluster CA always happens, in every case.
//! - Authorisation is the caller's job: after the handshake, [`peer_identity`] yields the
//!   verified peer's names; a peer link must check that
//!   [`PeerIdentity::site_name`] equals the site id claimed in its hello, and that
//!   [`negotiated_alpn`] is the one the stream protocol expects.
//!
//! With TLS 1.3 the server validates the client certificate after the client considers the
//! handshake complete, so a refused client sees `connect()` succeed and the error only on its
//! first stream operation.
//!
//! Flow control ([`TransportLimits`]) is sized for WAN bandwidth-delay products: at 100 ms RTT
//! and 100 MB/s a single stream needs a 10 MB window to avoid stalling, so the defaults are
//! 16 MiB per stream and 32 MiB per connection (quinn's defaults are ~1.2 MB per stream).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::names as certs;

/// The wire protocol version: the `/N` suffix of both ALPNs ([`ALPN_PEER`], [`ALPN_CLIENT`]).
/// Sites and clients of different protocol versions do not connect.
/// Version 2 prefixes frames with a varint length ([`encode_frame`](crate::wire::encode_frame))
/// where version 1 used four bytes.
pub const PROTOCOL_VERSION: u32 = 2;
/// ALPN between sites.
pub const ALPN_PEER: &[u8] = b"causalkv-peer/2";
/// ALPN between clients and sites.
pub const ALPN_CLIENT: &[u8] = b"causalkv-client/2";
/// Server name to connect with when the site behind an address is not known: the server must
/// present a certificate of *some* site of the cluster (see the module docs).
pub const ANY_SITE_SERVER_NAME: &str = "any-site.causalkv";

/// The server name to connect to site `name` with: `site-<name>.causalkv`.
pub fn site_server_name(name: &str) -> String {
    certs::site_dns_name(name)
}

/// Installs rustls' *ring* provider as the process default. Idempotent; called by every
/// config builder here. (Our builders also pass the provider explicitly, so they do not depend
/// on the process default; this is for any other rustls user in the process.)
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Errors of the TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A PEM file is malformed or lacks what it should contain.
    #[error("{}: {reason}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error("{} is not the private key of {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Our own certificate does not verify against the cluster CA.
    #[error("{} does not verify against the CA in {}: {reason}", cert.display(), ca.display())]
    NotSignedByCa {
        /// The certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// What the verifier said.
        reason: String,
    },
    /// Invalid [`TransportLimits`].
    #[error("invalid transport limits: {0}")]
    Limits(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate verifier could not be built.
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The PEM files of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate(s): the trust roots.
    pub ca: PathBuf,
    /// Our certificate chain, leaf first.
    pub cert: PathBuf,
    /// Our private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files [`certs::init`] writes for site `name` in `dir`.
    pub fn site(dir: &Path, name: &str) -> TlsFiles {
        Self::from_paths(dir, certs::site_paths(dir, name))
    }

    /// The files [`certs::init`] writes for client `name` in `dir`.
    pub fn client(dir: &Path, name: &str) -> TlsFiles {
        Self::from_paths(dir, certs::client_paths(dir, name))
    }

    fn from_paths(dir: &Path, paths: certs::CertPaths) -> TlsFiles {
        TlsFiles {
            ca: dir.join(certs::CA_CERT_FILE),
            cert: paths.cert,
            key: paths.key,
        }
    }
}

/// What a verified certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// The subject common name, if any.
    pub common_name: Option<String>,
    /// The DNS subject alternative names, in certificate order.
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// Parses the names out of a DER certificate (no verification: use it on certificates the
    /// handshake has verified).
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_string()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(e.to_string()),
        };
        Ok(PeerIdentity {
            common_name,
            dns_names,
        })
    }

    /// The names in `<prefix>-<name>.causalkv` SANs; an identity is only meaningful if there is
    /// exactly one (fail closed on ambiguity).
    fn unique(&self, parse: fn(&str) -> Option<&str>) -> Option<&str> {
        let mut names = self.dns_names.iter().filter_map(|d| parse(d));
        match (names.next(), names.next()) {
            (Some(name), None) => Some(name),
            _ => None,
        }
    }

    /// The site this certificate belongs to, from its single `site-<name>.causalkv` SAN
    /// (`None` if it has none, or several).
    pub fn site_name(&self) -> Option<&str> {
        self.unique(certs::site_from_dns_name)
    }

    /// The client this certificate belongs to, from its single `client-<name>.causalkv` SAN
    /// (`None` if it has none, or several).
    pub fn client_name(&self) -> Option<&str> {
        self.unique(certs::client_from_dns_name)
    }
}

/// Our credentials: the cluster CA roots, our certificate chain and private key.
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    subject: PeerIdentity,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            subject: self.subject.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("roots", &self.roots.len())
            .field("subject", &self.subject)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn bad_pem(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::BadPem {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(path, format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad_pem(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Loads the trust roots (one or more CA certificates) from a PEM file.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| bad_pem(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The end of a certificate's validity period (`notAfter`), in Unix seconds; `None` if it does
/// not parse.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// A certificate's serial number as lowercase hex (leading zero bytes kept, no separators);
/// `None` if it does not parse. Tells two certificates of the same holder apart, e.g. to see
/// that a reloaded certificate is the one in use.
pub fn serial(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(
        x509.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// [`not_after`] of the first certificate in a PEM file.
pub fn pem_not_after(path: &Path) -> Result<i64, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| format!("{}: no certificate", path.display()))?
        .map_err(|e| format!("{}: {e}", path.display()))?;
    not_after(&der).ok_or_else(|| format!("{}: unparsable certificate", path.display()))
}

impl Identity {
    /// The key an endpoint with this identity signs QUIC stateless resets with: derived from
    /// the private key, so the same credentials give the same key in every run. A node that
    /// restarts after a crash then answers a packet of a connection its previous run had with a
    /// reset its peer accepts (RFC 9000, section 10.3), and the peer redials at once instead of
    /// sending into the dead connection until the idle timeout.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use causalkv_client::tls::{Identity, TlsFiles};
    ///
    /// let id = Identity::load(&TlsFiles::site("certs".as_ref(), "a"))?;
    /// let mut endpoint = quinn::EndpointConfig::default();
    /// endpoint.reset_key(id.stateless_reset_key());
    /// # Ok(()) }
    /// ```
    pub fn stateless_reset_key(&self) -> Arc<dyn quinn::crypto::HmacKey> {
        let seed = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.secret_der());
        let derived = ring::hmac::sign(&seed, b"causalkv QUIC stateless reset key");
        Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            derived.as_ref(),
        ))
    }

    /// [`not_after`] of this identity's own certificate (the leaf of its chain).
    pub fn not_after(&self) -> Option<i64> {
        self.chain.first().and_then(|c| not_after(c))
    }

    /// [`serial`] of this identity's own certificate (the leaf of its chain).
    pub fn serial(&self) -> Option<String> {
        self.chain.first().and_then(|c| serial(c))
    }

    /// Loads and checks an identity: the CA file must hold usable CA certificates, the
    /// certificate file a chain (leaf first), the key file a private key belonging to the leaf,
    /// and the leaf must verify against the CA (so a misconfigured node fails at startup, not
    /// at every connection). Errors name the file and what is wrong.
    pub fn load(files: &TlsFiles) -> Result<Identity, TlsError> {
        let roots = load_roots(&files.ca)?;
        let chain = read_certs(&files.cert)?;
        let key_pem = read_file(&files.key)?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| bad_pem(&files.key, format!("unreadable PEM: {e}")))?
            .ok_or_else(|| bad_pem(&files.key, "no PRIVATE KEY block"))?;

        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| bad_pem(&files.key, format!("unusable private key: {e}")))?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::KeyMismatch {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                });
            }
            Err(e) => return Err(bad_pem(&files.cert, e.to_string())),
        }

        // Every causalkv identity carries the clientAuth EKU (sites dial each other), so the
        // client verifier is the right check for all of them.
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider).build()?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| TlsError::NotSignedByCa {
                cert: files.cert.clone(),
                ca: files.ca.clone(),
                reason: e.to_string(),
            })?;

        let subject = PeerIdentity::from_der(&chain[0]).map_err(|e| bad_pem(&files.cert, e))?;
        Ok(Identity {
            roots,
            chain,
            key,
            subject,
        })
    }

    /// The same certificate and key, trusting `roots` instead (a CA being rotated in, or a
    /// test that presents a certificate the server does not trust).
    pub fn with_roots(self, roots: Arc<RootCertStore>) -> Identity {
        Identity { roots, ..self }
    }

    /// The cluster CA roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// Our certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The names in our own certificate (e.g. `subject().site_name()` is our site).
    pub fn subject(&self) -> &PeerIdentity {
        &self.subject
    }
}

/// The congestion controller of a QUIC connection ([`TransportLimits::congestion`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: it reads every loss as congestion and shrinks its
    /// window, down to two packets per round trip under steady random loss.
    #[default]
    Cubic,
    /// BBR (quinn's implementation, which quinn calls experimental): it paces to the measured
    /// bottleneck bandwidth and round trip, and does not shrink on random loss. Measured
    /// against CUBIC with [`TransportLimits::min_window`] under 5 % loss, its visibility p99 at
    /// the nearer remote site was 133-147 ms against 52-82 ms.
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
}

/// QUIC transport limits shared by servers and clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// Close a connection after this long without any packet. Default 30 s.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without sending; must be below `idle_timeout`.
    /// Default 5 s.
    pub keep_alive: Duration,
    /// Per-stream receive window, bytes. Default 16 MiB (>= 100 ms x 100 MB/s).
    pub stream_window: u64,
    /// Per-connection receive window and send buffer, bytes; at least `stream_window`.
    /// Default 32 MiB.
    pub conn_window: u64,
    /// Bidirectional streams the peer may have open at once. Default 100.
    pub max_concurrent_bidi_streams: u32,
    /// Unidirectional streams the peer may have open at once (peers send updates on these,
    /// one per origin / partition). Default 100.
    pub max_concurrent_uni_streams: u32,
    /// Largest UDP payload this endpoint accepts and path-MTU discovery probes for, bytes
    /// (1200..=65527). Default 1452, quinn's: one Ethernet frame. Raising it lets loopback and
    /// jumbo-frame links carry fewer, larger packets, but measured on loopback between two
    /// sites at full replication rate (9000) the large packets met spurious loss detection
    /// while the receiver was busy applying, and quinn's black-hole detection then fell back to
    /// 1200-byte packets, so throughput halved. Raise it only where that was measured to help.
    pub max_udp_payload: u16,
    /// The congestion window a new connection starts with, bytes (at least 2400). Default
    /// 256 KiB. QUIC's own default (about 14 KiB, ten packets) suits unknown paths on the open
    /// Internet; between sites it makes a link that comes back after a cut or a restart send
    /// its backlog in slow start, doubling once per round trip: measured behind a 150 ms round
    /// trip, a 100 KB backlog took about four round trips to arrive, and every update that
    /// depended on it waited with it.
    pub initial_window: u64,
    /// The congestion controller. Default CUBIC; see [`Congestion`].
    pub congestion: Congestion,
    /// The congestion window never counts as below this many bytes (0: the controller's own
    /// floor, two packets). Default 64 KiB: measured on the emulated WAN (one-way 15/40/75 ms,
    /// 500 ops/s per site) under 5 % loss on every link, CUBIC without it let the visibility
    /// p99 grow to 10-16 s as its window collapsed, and 52-82 ms / 179-183 ms at the two
    /// remote sites with it. See [`FloorWindow`].
    pub min_window: u64,
    /// The longest this endpoint asks its peer to delay an acknowledgement, through QUIC's
    /// acknowledgement-frequency extension (both sides of a causalkv connection support it);
    /// `None` (the default) leaves QUIC's own 25 ms and the extension off. A sender declares a
    /// tail packet lost only after its probe timeout, which includes the peer's acknowledgement
    /// delay, so on a lossy link a shorter delay can bring a lost update sooner, at the cost of
    /// more acknowledgements on a busy link (see `ack_eliciting_threshold`). Not the default
    /// yet: the loss benchmark has not shown the gain on this machine (its runs were too noisy
    /// to tell).
    pub max_ack_delay: Option<Duration>,
    /// How many ack-eliciting packets a peer may receive before it must acknowledge at once,
    /// asked for through the acknowledgement-frequency extension (QUIC's own rule is 1: every
    /// second packet). Default 16: a busy link's acknowledgements go at most every
    /// `max_ack_delay` (25 ms unless set) or every 17 packets, mostly inside packets that
    /// carry data or causalkv's own acks anyway, instead of as a packet of their own for every
    /// two packets of updates. Loss detection does not wait for them: the peer still
    /// acknowledges at once any packet that arrives out of order (a gap), and the probe
    /// timeout already allows for `max_ack_delay`. 1 with no `max_ack_delay` leaves the
    /// extension off.
    pub ack_eliciting_threshold: u32,
    /// Length of the connection IDs this endpoint issues, bytes (1..=20). Every packet a peer
    /// sends to this endpoint carries one. Default 4 (quinn's own is 8): the IDs only have to
    /// tell this endpoint's connections apart (quinn draws again on a collision), which 32
    /// random bits do for any number of connections a site holds, and a peer link of small
    /// updates sends about one packet per update, so each byte here is a byte per update. Not
    /// 0: a zero-length ID makes the endpoint tell connections apart by the peer's address, and
    /// every pair of sites has two connections between the same two addresses (one dialed by
    /// each side).
    pub cid_len: u8,
    /// How many packets sent after a packet must be acknowledged before that packet counts
    /// as lost (QUIC's loss detection; at least 1). Default 1, where QUIC recommends 3: the
    /// peer acknowledges a gap at once, so a lost update is sent again as soon as the first
    /// acknowledgement of a later packet arrives, about a round trip after the loss. With 3 a
    /// link of sparse updates waits for two more packets or for QUIC's time threshold (9/8 of
    /// the round trip), which on a 150 ms link is some 20 ms more (see results/wan-metadata,
    /// `loss-threshold/`). The cost is on paths that reorder datagrams: a datagram overtaken
    /// by a later one is sent again needlessly, and the congestion window shrinks as for a
    /// loss. With 1 % of datagrams held back 2 ms, visibility and bytes per update were
    /// unchanged (links carrying updates are far below their window); a path that reorders
    /// much, carrying a large backlog, may want 3.
    pub loss_packet_threshold: u32,
    /// How long, in thousandths of the round trip, after a packet was sent a later packet's
    /// acknowledgement makes it count as lost (QUIC's time threshold; 1000..=4000, default
    /// 1125, QUIC's 9/8). 1000 was measured and not kept: under 5 % loss it made the
    /// visibility p99 at the nearest site two to four times longer in one interleaved run
    /// (the cause was not pinned down).
    pub loss_time_threshold_permille: u32,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            stream_window: 16 << 20,
            conn_window: 32 << 20,
            max_concurrent_bidi_streams: 100,
            max_concurrent_uni_streams: 100,
            max_udp_payload: 1452,
            initial_window: 256 << 10,
            congestion: Congestion::Cubic,
            min_window: 64 << 10,
            max_ack_delay: None,
            ack_eliciting_threshold: 16,
            cid_len: 4,
            loss_packet_threshold: 1,
            loss_time_threshold_permille: 1125,
        }
    }
}

impl TransportLimits {
    /// Checks the limits for consistency.
    pub fn validate(&self) -> Result<(), TlsError> {
        let bad = |s: &str| Err(TlsError::Limits(s.to_owned()));
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout must be positive");
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad("keep_alive must be positive and below idle_timeout");
        }
        if self.stream_window == 0 || self.stream_window > self.conn_window {
            return bad("stream_window must be positive and at most conn_window");
        }
        if self.conn_window > VarInt::MAX.into_inner() {
            return bad("conn_window exceeds 2^62 - 1");
        }
        if !(1200..=65527).contains(&self.max_udp_payload) {
            return bad("max_udp_payload must be within 1200..=65527 bytes");
        }
        if self.initial_window < 2400 {
            return bad("initial_window must be at least 2400 bytes");
        }
        if self
            .max_ack_delay
            .is_some_and(|d| d < Duration::from_millis(1) || d > Duration::from_millis(1_000))
        {
            return bad("max_ack_delay must be within 1..=1000 ms");
        }
        if self.ack_eliciting_threshold == 0 || self.ack_eliciting_threshold > 1_000 {
            return bad("ack_eliciting_threshold must be within 1..=1000 packets");
        }
        if !(1..=20).contains(&self.cid_len) {
            return bad("cid_len must be within 1..=20 bytes");
        }
        if !(1..=1000).contains(&self.loss_packet_threshold) {
            return bad("loss_packet_threshold must be within 1..=1000 packets");
        }
        if !(1000..=4000).contains(&self.loss_time_threshold_permille) {
            return bad("loss_time_threshold_permille must be within 1000..=4000");
        }
        if IdleTimeout::try_from(self.idle_timeout).is_err() {
            return bad("idle_timeout too large");
        }
        Ok(())
    }

    /// The quinn endpoint configuration for these limits: it accepts (and tells peers it
    /// accepts) UDP payloads up to `max_udp_payload`, without which a peer's MTU discovery
    /// stops at quinn's default of 1472; and it issues connection IDs of `cid_len` bytes.
    pub fn endpoint_config(&self) -> Result<quinn::EndpointConfig, TlsError> {
        self.validate()?;
        let mut config = quinn::EndpointConfig::default();
        config
            .max_udp_payload_size(self.max_udp_payload)
            .map_err(|e| TlsError::Limits(e.to_string()))?;
        let cid_len = usize::from(self.cid_len);
        config.cid_generator(move || Box::new(RandomCids(cid_len)));
        Ok(config)
    }

    /// The quinn transport configuration for these limits.
    pub fn transport_config(&self) -> Result<TransportConfig, TlsError> {
        self.validate()?;
        let varint = |v: u64| VarInt::from_u64(v).map_err(|e| TlsError::Limits(e.to_string()));
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|e| TlsError::Limits(e.to_string()))?;
        let mut config = TransportConfig::default();
        config
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(varint(self.stream_window)?)
            .receive_window(varint(self.conn_window)?)
            .send_window(self.conn_window)
            .max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into())
            .max_concurrent_uni_streams(self.max_concurrent_uni_streams.into())
            .packet_threshold(self.loss_packet_threshold)
            .time_threshold(self.loss_time_threshold_permille as f32 / 1000.0);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        config.mtu_discovery_config(Some(mtu));
        let inner: Arc<dyn ControllerFactory + Send + Sync> = match self.congestion {
            Congestion::Cubic => {
                let mut c = quinn::congestion::CubicConfig::default();
                c.initial_window(self.initial_window);
                Arc::new(c)
            }
            Congestion::Bbr => {
                let mut c = quinn::congestion::BbrConfig::default();
                c.initial_window(self.initial_window);
                Arc::new(c)
            }
            Congestion::NewReno => {
                let mut c = quinn::congestion::NewRenoConfig::default();
                c.initial_window(self.initial_window);
                Arc::new(c)
            }
        };
        if self.min_window > 0 {
            config.congestion_controller_factory(Arc::new(FloorWindow {
                inner,
                floor: self.min_window,
            }));
        } else {
            config.congestion_controller_factory(inner);
        }
        if self.max_ack_delay.is_some() || self.ack_eliciting_threshold != 1 {
            let mut acks = quinn::AckFrequencyConfig::default();
            acks.max_ack_delay(self.max_ack_delay)
                .ack_eliciting_threshold(VarInt::from_u32(self.ack_eliciting_threshold))
                // A packet out of order (a gap: a loss, or reordering) is acknowledged at
                // once, as without the extension, so that loss detection does not wait.
                .reordering_threshold(VarInt::from_u32(1));
            config.ack_frequency_config(Some(acks));
        }
        Ok(config)
    }
}

/// A congestion controller whose window never counts as below `floor` bytes
/// ([`TransportLimits::min_window`]). Standard controllers read every lost packet as
/// congestion; under steady random loss (1 % on a WAN path) CUBIC halves its window every
/// round trip or so and, on a link the application keeps far below capacity, never grows it
/// back (application-limited), so it ends at two packets per round trip: behind a 150 ms round
/// trip, about 20 KB/s, below what replication sends. The floor keeps that much in flight
/// whatever the losses; above it the controller decides as before.
pub struct FloorWindow {
    /// The controller that decides above the floor.
    pub inner: Arc<dyn ControllerFactory + Send + Sync>,
    /// The floor, bytes.
    pub floor: u64,
}

impl ControllerFactory for FloorWindow {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Floored {
            inner: self.inner.clone().build(now, current_mtu),
            floor: self.floor,
        })
    }
}

struct Floored {
    inner: Box<dyn Controller>,
    floor: u64,
}

impl Controller for Floored {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window().max(self.floor)
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Floored {
            inner: self.inner.clone_box(),
            floor: self.floor,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().max(self.floor)
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Random connection IDs of the given length from the crypto provider's secure random source
/// (quinn's own generator of any length is not exported by `quinn`).
struct RandomCids(usize);

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; 20];
        provider()
            .secure_random
            .fill(&mut bytes[..self.0])
            .expect("the system's random source failed");
        quinn::ConnectionId::new(&bytes[..self.0])
    }

    fn cid_len(&self) -> usize {
        self.0
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// A server configuration: our site certificate, both ALPNs, client certificates verified
/// against the cluster CA (required, or optional if `require_client_cert` is false; a
/// presented certificate must verify either way).
pub fn server_config(
    id: &Identity,
    limits: &TransportLimits,
    require_client_cert: bool,
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = rustls_server_config(id, require_client_cert, &[ALPN_PEER, ALPN_CLIENT])?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(limits.transport_config()?));
    Ok(config)
}

/// The rustls server configuration inside [`server_config`], for servers over TCP too (the RESP
/// listener): TLS 1.3, our site certificate, client certificates verified against the cluster
/// CA (required, or optional if `require_client_cert` is false; a presented certificate must
/// verify either way), no early data, and `alpn` offered (none: any client).
pub fn rustls_server_config(
    id: &Identity,
    require_client_cert: bool,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(id.roots(), provider.clone());
    let verifier = if require_client_cert {
        builder.build()?
    } else {
        builder.allow_unauthenticated().build()?
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// A client configuration presenting our certificate (mutual TLS) and verifying the server
/// against the cluster CA; `alpn` is [`ALPN_PEER`] or [`ALPN_CLIENT`]. See the module docs for
/// the server names to connect with.
pub fn client_config(
    id: &Identity,
    limits: &TransportLimits,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SiteServerVerifier::new(id.roots(), provider)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    finish_client(tls, limits, alpn)
}

/// A client configuration without any certificate (servers requiring client certificates
/// refuse it); the server is verified as in [`client_config`].
pub fn client_config_anonymous(
    roots: Arc<RootCertStore>,
    limits: &TransportLimits,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SiteServerVerifier::new(roots, provider)?)
        .with_no_client_auth();
    finish_client(tls, limits, alpn)
}

fn finish_client(
    mut tls: rustls::ClientConfig,
    limits: &TransportLimits,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(limits.transport_config()?));
    Ok(config)
}

/// Server certificate verification against the cluster CA. A thin wrapper around rustls'
/// `WebPkiServerVerifier`, which does all the checking (chain to the CA, validity, serverAuth
/// EKU, name, signatures); the wrapper only chooses the name to check when the caller
/// connected with [`ANY_SITE_SERVER_NAME`]: then it is the certificate's own first
/// `site-<name>.causalkv` SAN, so any site's certificate passes and nothing else does.
#[derive(Debug)]
struct SiteServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl SiteServerVerifier {
    fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<Self>, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
        Ok(Arc::new(SiteServerVerifier { inner }))
    }
}

impl ServerCertVerifier for SiteServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let any_site = matches!(server_name,
            ServerName::DnsName(dns) if dns.as_ref().eq_ignore_ascii_case(ANY_SITE_SERVER_NAME));
        if !any_site {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        let ident = PeerIdentity::from_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let site_san = ident
            .dns_names
            .iter()
            .find(|dns| certs::site_from_dns_name(dns).is_some())
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))?;
        let name = ServerName::try_from(site_san.as_str()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        // Full verification, with the name taken from the certificate itself.
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The verified identity of the connection's peer: the names in its leaf certificate, or
/// `None` if it presented none (an anonymous client on a server that allows them).
pub fn peer_identity(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    PeerIdentity::from_der(chain.first()?).ok()
}

/// The ALPN protocol negotiated on the connection.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpns_carry_the_protocol_version() {
        let suffix = format!("/{PROTOCOL_VERSION}");
        for alpn in [ALPN_PEER, ALPN_CLIENT] {
            let alpn = std::str::from_utf8(alpn).unwrap();
            assert!(alpn.ends_with(&suffix), "{alpn} lacks {suffix}");
        }
    }
}
