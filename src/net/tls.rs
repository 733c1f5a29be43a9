//! The one TLS setup for peers and clients.
