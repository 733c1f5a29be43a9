//! The tokio + quinn driver.
pub mod tls;
