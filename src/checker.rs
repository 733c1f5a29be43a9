//! Causal-consistency checker over recorded histories.
