//! The certificate naming rules shared by sites, clients and the certificate tooling.
//!
//! A site's identity is the SAN DNS name `site-<name>.causalkv`, a client's
//! `client-<name>.causalkv`; a name is one DNS label. A certificate directory holds `ca.pem` and
//! `<role>-<name>.pem/.key` pairs. These rules live here, below both the TLS setup that checks
//! identities and the tooling that issues certificates, so the two cannot drift apart.

use std::path::{Path, PathBuf};

/// File name of the CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// DNS suffix of the identity SANs (`site-<name>.causalkv`, `client-<name>.causalkv`).
pub const DNS_SUFFIX: &str = "causalkv";

/// A site or client name that is not usable as a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {reason}")]
pub struct InvalidName {
    /// The offending name.
    pub name: String,
    /// Why it is refused.
    pub reason: &'static str,
}

/// The two roles a leaf certificate can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A site: server and client of other sites.
    Site,
    /// An application client.
    Client,
}

impl Role {
    /// The role's file and SAN prefix: `site` or `client`.
    pub fn prefix(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Client => "client",
        }
    }
}

/// Paths of one certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM (PKCS#8) private key.
    pub key: PathBuf,
}

/// `ca.pem` and `ca.key` in `dir`.
pub fn ca_paths(dir: &Path) -> CertPaths {
    CertPaths {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    }
}

/// `<role>-<name>.pem` and `<role>-<name>.key` in `dir`.
pub fn leaf_paths(dir: &Path, role: Role, name: &str) -> CertPaths {
    let stem = format!("{}-{name}", role.prefix());
    CertPaths {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// `site-<name>.pem` and `site-<name>.key` in `dir`.
pub fn site_paths(dir: &Path, name: &str) -> CertPaths {
    leaf_paths(dir, Role::Site, name)
}

/// `client-<name>.pem` and `client-<name>.key` in `dir`.
pub fn client_paths(dir: &Path, name: &str) -> CertPaths {
    leaf_paths(dir, Role::Client, name)
}

/// The identity SAN of a site: `site-<name>.causalkv`.
pub fn site_dns_name(name: &str) -> String {
    format!("site-{name}.{DNS_SUFFIX}")
}

/// The identity SAN of a client: `client-<name>.causalkv`.
pub fn client_dns_name(name: &str) -> String {
    format!("client-{name}.{DNS_SUFFIX}")
}

fn name_from_dns<'a>(dns: &'a str, prefix: &str) -> Option<&'a str> {
    let name = dns
        .strip_suffix(DNS_SUFFIX)?
        .strip_suffix('.')?
        .strip_prefix(prefix)?
        .strip_prefix('-')?;
    validate_name(name).ok().map(|()| name)
}

/// The site name in an identity SAN `site-<name>.causalkv`, if `dns` is one.
pub fn site_from_dns_name(dns: &str) -> Option<&str> {
    name_from_dns(dns, Role::Site.prefix())
}

/// The client name in an identity SAN `client-<name>.causalkv`, if `dns` is one.
pub fn client_from_dns_name(dns: &str) -> Option<&str> {
    name_from_dns(dns, Role::Client.prefix())
}

/// Checks that `name` can be a site or client name: one DNS label of lowercase ASCII letters,
/// digits and inner hyphens, at most 63 bytes.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let bad = |reason| {
        Err(InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 63 {
        return bad("longer than 63 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase ASCII letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    Ok(())
}
