//! The site's TLS credentials as loaded from its files ([`LoadedTls`]): the identity new peer
//! dials present, the RESP listener's TLS configuration, and what metrics and status show of each certificate. Loaded at start and by
//! a reload ([`super::reload`]); below the shared state, which holds the credentials in force.

use std::sync::Arc;

use crate::config::SiteConfig;
use crate::tls::{self, Identity, TlsError, TlsFiles, TransportLimits};

/// One loaded certificate, as metrics and status show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedCert {
    /// `site` (the site's own certificate) or `ca` (the first CA certificate).
    pub role: &'static str,
    /// The end of its validity period (`notAfter`), Unix seconds.
    pub not_after: i64,
    /// Its serial number, lowercase hex.
    pub serial: String,
}

/// The credentials in force: read on every peer dial, replaced as a whole by a reload.
pub(crate) struct LoadedTls {
    /// Checked credentials; peer dials build their client configuration from them.
    pub identity: Identity,
    pub certs: Vec<LoadedCert>,
    /// The RESP listener's TLS configuration (when `[resp]` is configured): built from the
    /// same identity, so a reload renews it too.
    pub resp: Option<Arc<rustls::ServerConfig>>,
}

/// Why a reload was rejected. The previous credentials stay in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A file failed to load or the certificate does not verify against the CA.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The certificate is another site's (or no site's).
    #[error("{} names site {found:?}, but this is site {expected:?}", cert.display())]
    WrongSite {
        /// The certificate file.
        cert: std::path::PathBuf,
        /// The site the certificate names (`<none>` if none).
        found: String,
        /// This site.
        expected: String,
    },
    /// The loading task did not complete.
    #[error("the reload did not complete: {0}")]
    Task(String),
}

impl LoadedTls {
    /// Loads the configured files and builds both configurations. With `expect_site`, the
    /// certificate must name that site (a reload must not turn a site into another).
    pub fn load(
        cfg: &SiteConfig,
        transport: &TransportLimits,
        expect_site: Option<&str>,
    ) -> Result<(LoadedTls, quinn::ServerConfig), ReloadError> {
        let identity = Identity::load(&TlsFiles {
            ca: cfg.tls.ca.clone(),
            cert: cfg.tls.cert.clone(),
            key: cfg.tls.key.clone(),
        })?;
        if let Some(expected) = expect_site {
            let found = identity.subject().site_name();
            if found != Some(expected) {
                return Err(ReloadError::WrongSite {
                    cert: cfg.tls.cert.clone(),
                    found: found.unwrap_or("<none>").to_owned(),
                    expected: expected.to_owned(),
                });
            }
        }
        let leaf = identity.cert_chain().first();
        let ca = pem_first_cert(&cfg.tls.ca);
        let certs = [("site", leaf.cloned()), ("ca", ca)]
            .into_iter()
            .filter_map(|(role, der)| {
                let der = der?;
                Some(LoadedCert {
                    role,
                    not_after: tls::not_after(&der)?,
                    serial: tls::serial(&der)?,
                })
            })
            .collect();
        let server = tls::server_config(&identity, transport, cfg.tls.require_client_cert)?;
        // Checked here rather than at the first dial, so that a reload that could not dial
        // is rejected.
        tls::client_config(&identity, transport, tls::ALPN_PEER)?;
        let resp = match &cfg.resp {
            Some(r) => Some(Arc::new(tls::rustls_server_config(
                &identity,
                r.require_client_cert,
                &[],
            )?)),
            None => None,
        };
        Ok((
            LoadedTls {
                identity,
                certs,
                resp,
            },
            server,
        ))
    }

    /// The site's own certificate.
    pub fn site_cert(&self) -> Option<&LoadedCert> {
        self.certs.iter().find(|c| c.role == "site")
    }
}

/// The first certificate of a PEM file (the CA file was just loaded, so a failure here only
/// leaves the CA out of metrics).
fn pem_first_cert(path: &std::path::Path) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let pem = std::fs::read(path).ok()?;
    rustls_pemfile::certs(&mut pem.as_slice()).next()?.ok()
}
