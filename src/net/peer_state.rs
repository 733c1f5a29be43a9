//! What a node knows of each peer: whether its outbound link is up, and a phi-accrual failure
//! detector fed by heartbeats and acks; [`judge`] turns both into `up`, `suspect` or `down` with a
//! reason.

use std::time::{Duration, Instant};

use super::failure::PhiAccrual;

/// What this node knows of one peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerState {
    /// Whether this site's link to the peer is up (hello exchanged).
    pub outbound_up: bool,
    /// Heartbeat and ack arrivals, from the control streams of both connections.
    pub detector: PhiAccrual,
    /// Why the outbound link is in its state ("connected", or the last error).
    pub reason: String,
}

impl PeerState {
    /// A heartbeat (or ack) arrived.
    pub fn heard(&mut self, now: Instant) {
        self.detector.heartbeat(now);
    }

    /// A connection to the peer came up: the silence before it says nothing about the link's
    /// rhythm, so the detector starts over (seeded with the heartbeat period).
    pub fn connected(&mut self, now: Instant) {
        self.detector.reset();
        self.detector.heartbeat(now);
    }
}

/// A peer's state and the reason for it, from the suspicion level `phi` after `silence`
/// (`None` before any heartbeat) and the state of the outbound link.
pub(crate) fn judge(
    st: &PeerState,
    phi: f64,
    silence: Option<Duration>,
    f: &crate::config::FailureConfig,
) -> (&'static str, String) {
    let link = if st.outbound_up {
        String::new()
    } else {
        format!("; link down: {}", st.reason)
    };
    let Some(silence) = silence else {
        return if st.outbound_up {
            ("suspect", "connected, no heartbeat yet".into())
        } else {
            ("down", format!("no heartbeat yet{link}"))
        };
    };
    let silent = format!("phi {phi:.1} after {} ms of silence", silence.as_millis());
    if phi >= f.phi_down {
        ("down", format!("{silent}{link}"))
    } else if phi >= f.phi_suspect {
        ("suspect", format!("{silent}{link}"))
    } else if !st.outbound_up {
        (
            "suspect",
            format!(
                "link down: {}; heartbeats still arriving (phi {phi:.1})",
                st.reason
            ),
        )
    } else {
        (
            "up",
            format!(
                "phi {phi:.1}, last heartbeat {} ms ago",
                silence.as_millis()
            ),
        )
    }
}
