//! Development CA and certificate tooling.
