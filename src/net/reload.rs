//! The site's TLS credentials as loaded from its files, and their reload without downtime
//! (`SIGHUP` to `causalkv serve`, `POST /reload` on the admin port, [`Node::reload_tls`]).
//!
//! A reload reads the configured CA, certificate and key again (on a blocking thread: file
//! I/O and signature checks stay off the runtime), checks them as a start would, and also
//! that the certificate still names this site. Only if everything passes does it install
//! them: the endpoint's server configuration (new inbound handshakes) and the identity that
//! new peer dials present. Established connections keep the credentials they were
//! made with: TLS never looks at them again after the handshake. On any failure the previous
//! credentials stay in force and the error is logged and returned.
//!
//! [`Node::reload_tls`]: super::Node::reload_tls

use std::sync::Arc;

use quinn::Endpoint;
use tracing::{error, info};

use super::credentials::{LoadedCert, LoadedTls, ReloadError};
use super::metrics::Metrics;
use super::shared::Shared;

/// Reloads the site's CA, certificate and key from the configured files and installs them for
/// new connections; see the module docs. Returns the new site certificate.
pub(crate) async fn reload(
    shared: &Shared,
    endpoint: &Endpoint,
) -> Result<LoadedCert, ReloadError> {
    let site = shared.cfg.me().name.clone();
    // One reload at a time, so that the configuration installed last is the one loaded last.
    let _one_at_a_time = shared.reloading.lock().await;
    let (cfg, transport, expected) = (shared.cfg.clone(), shared.transport.clone(), site.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        let (loaded, server) = LoadedTls::load(&cfg, &transport, Some(&expected))?;
        let cert = loaded
            .site_cert()
            .cloned()
            .ok_or_else(|| ReloadError::Task("the loaded certificate does not parse".into()))?;
        Ok((loaded, server, cert))
    })
    .await
    .map_err(|e| ReloadError::Task(e.to_string()))
    .and_then(|r| r);
    let (loaded, server, cert) = match loaded {
        Ok(l) => l,
        Err(e) => {
            Metrics::bump(&shared.metrics.tls_reload_failures);
            error!(site = %site, error = %e, "certificate reload rejected; the previous certificates stay in force");
            return Err(e);
        }
    };
    endpoint.set_server_config(Some(server));
    *shared.tls.write().expect("tls lock poisoned") = Arc::new(loaded);
    Metrics::bump(&shared.metrics.tls_reloads);
    info!(
        site = %site,
        serial = %cert.serial,
        not_after = cert.not_after,
        "certificates reloaded; new connections use them, established ones continue"
    );
    Ok(cert)
}
