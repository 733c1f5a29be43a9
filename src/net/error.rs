//! [`NodeError`]: why a node could not start.

use std::net::SocketAddr;

use crate::storage::wal::StorageError;
use crate::tls;

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// TLS files or settings.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding the UDP socket.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Durable storage could not be opened or recovered.
    #[error("storage in {dir}: {source}")]
    Storage {
        /// The data directory.
        dir: std::path::PathBuf,
        /// Why.
        source: StorageError,
    },
    /// The recovery task did not complete (it panicked or was cancelled).
    #[error("recovery did not complete: {0}")]
    Recovery(String),
}
