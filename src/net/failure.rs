//! Failure detection: the phi-accrual detector (Hayashibara et al., "The φ Accrual Failure
//! Detector", SRDS 2004), sans-IO.
//!
//! Instead of a yes/no verdict after a fixed timeout, the detector outputs a suspicion level
//! `φ = -log10(P(a heartbeat arrives later than now))`, estimated from the recent inter-arrival
//! times of a peer's heartbeats (a sliding window, modelled as a normal distribution). φ = 1
//! means a 10 % chance that the peer is still alive and merely late, φ = 3 a 0.1 % chance, and so
//! on; the caller picks the thresholds (`failure.phi_suspect`, `failure.phi_down`). Because the
//! distribution is learned, the same thresholds fit a loopback link with heartbeats every few
//! milliseconds and a WAN link with jittery ones.
//!
//! As in Akka's implementation, the standard deviation is floored at `min_std_dev` so that a
//! perfectly regular link does not make one late heartbeat look like a crash, and a fresh
//! detector is seeded with an expected interval (± a quarter) until the first real samples
//! replace it. The normal CDF
//! uses the logistic approximation (max error about 1e-4), which stays finite far into the tail.
//!
//! The caller passes the time in ([`PhiAccrual::heartbeat`], [`PhiAccrual::phi`]): no clock is
//! read here, so tests drive it with synthetic instants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A phi-accrual failure detector for one peer.
#[derive(Clone, Debug)]
pub struct PhiAccrual {
    /// Most inter-arrival samples kept.
    window: usize,
    /// Floor of the standard deviation, in milliseconds.
    min_std_dev_ms: f64,
    /// Seed interval used until real samples arrive, in milliseconds.
    first_interval_ms: f64,
    /// Recent inter-arrival times, in milliseconds; the first `seeds` are not measured.
    intervals: VecDeque<f64>,
    /// How many entries at the front of `intervals` are seeds.
    seeds: usize,
    /// The last heartbeat.
    last: Option<Instant>,
}

impl PhiAccrual {
    /// A detector keeping the last `window` inter-arrival times (at least 2), whose standard
    /// deviation never drops below `min_std_dev`. Until intervals have been measured it
    /// expects one of a second; see [`PhiAccrual::with_first_interval`].
    pub fn new(window: usize, min_std_dev: Duration) -> Self {
        Self {
            window: window.max(2),
            min_std_dev_ms: (min_std_dev.as_secs_f64() * 1e3).max(1e-3),
            first_interval_ms: 1e3,
            intervals: VecDeque::new(),
            seeds: 0,
            last: None,
        }
    }

    /// Sets the interval expected before any has been measured (the heartbeat period): the
    /// first heartbeat seeds the window with it, ± a quarter, and each of the next two
    /// measured intervals replaces one seed.
    pub fn with_first_interval(mut self, expected: Duration) -> Self {
        self.first_interval_ms = (expected.as_secs_f64() * 1e3).max(1e-3);
        self
    }

    /// Records a heartbeat arriving at `now`. An instant earlier than the last heartbeat counts
    /// as arriving with it.
    pub fn heartbeat(&mut self, now: Instant) {
        match self.last {
            None => {
                // Seed with the expected interval, so that phi is meaningful at once.
                let m = self.first_interval_ms;
                self.intervals.clear();
                self.intervals.push_back(m * 0.75);
                self.intervals.push_back(m * 1.25);
                self.seeds = 2;
            }
            Some(last) => {
                let gap = now.saturating_duration_since(last).as_secs_f64() * 1e3;
                if self.seeds > 0 || self.intervals.len() >= self.window {
                    self.intervals.pop_front();
                    self.seeds = self.seeds.saturating_sub(1);
                }
                self.intervals.push_back(gap);
            }
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// Forgets the history (a new connection: the silence before it says nothing about the
    /// link's rhythm). The next heartbeat seeds the window again.
    pub fn reset(&mut self) {
        self.intervals.clear();
        self.seeds = 0;
        self.last = None;
    }

    /// The last heartbeat, if any.
    pub fn last_heartbeat(&self) -> Option<Instant> {
        self.last
    }

    /// How long the peer has been silent at `now` (zero before the first heartbeat).
    pub fn silence(&self, now: Instant) -> Duration {
        self.last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l))
    }

    /// Mean and standard deviation (floored) of the window, in milliseconds.
    fn stats(&self) -> (f64, f64) {
        let n = self.intervals.len().max(1) as f64;
        let mean = self.intervals.iter().sum::<f64>() / n;
        let var = self
            .intervals
            .iter()
            .map(|x| (x - mean) * (x - mean))
            .sum::<f64>()
            / n;
        (mean, var.sqrt().max(self.min_std_dev_ms))
    }

    /// The suspicion level at `now`: 0 before the first heartbeat, then growing with the
    /// silence since the last one. Always finite and non-negative.
    pub fn phi(&self, now: Instant) -> f64 {
        let Some(last) = self.last else {
            return 0.0;
        };
        let elapsed = now.saturating_duration_since(last).as_secs_f64() * 1e3;
        let (mean, std_dev) = self.stats();
        phi(elapsed, mean, std_dev)
    }
}

/// `-log10(1 - F(elapsed))` for the normal distribution `N(mean, std_dev²)`, with the logistic
/// approximation of its CDF.
fn phi(elapsed: f64, mean: f64, std_dev: f64) -> f64 {
    let y = (elapsed - mean) / std_dev;
    // ln(e), where the CDF is F = 1 / (1 + e): kept in log form so that the far tail stays
    // finite instead of overflowing to infinity.
    let ln_e = -y * (1.5976 + 0.070566 * y * y);
    let p = if elapsed > mean {
        // 1 - F = e / (1 + e).
        -(ln_e - ln_e.exp().ln_1p()) / std::f64::consts::LN_10
    } else {
        // 1 - F = 1 - 1 / (1 + e).
        -(1.0 - 1.0 / (1.0 + ln_e.exp())).log10()
    };
    if p.is_finite() { p.max(0.0) } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Heartbeats at `t0 + k * period` for `k` in `0..count`; returns the last instant.
    fn steady(d: &mut PhiAccrual, t0: Instant, period: Duration, count: u32) -> Instant {
        for k in 0..count {
            d.heartbeat(t0 + period * k);
        }
        t0 + period * (count - 1)
    }

    #[test]
    fn no_heartbeat_yet_is_no_suspicion() {
        let d = PhiAccrual::new(100, ms(10));
        assert_eq!(d.phi(Instant::now()), 0.0);
        assert_eq!(d.silence(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn steady_heartbeats_give_low_phi() {
        let mut d = PhiAccrual::new(100, ms(10));
        let t0 = Instant::now();
        let last = steady(&mut d, t0, ms(100), 50);
        assert!(d.phi(last) < 0.5, "at the heartbeat: {}", d.phi(last));
        // Half a period late is nothing; right on time is about phi 0.3 (50 %).
        assert!(d.phi(last + ms(100)) < 0.5, "{}", d.phi(last + ms(100)));
        assert!(d.phi(last + ms(105)) < 1.0, "{}", d.phi(last + ms(105)));
    }

    #[test]
    fn silence_makes_phi_grow_past_the_threshold() {
        let mut d = PhiAccrual::new(100, ms(10));
        let t0 = Instant::now();
        let last = steady(&mut d, t0, ms(100), 50);
        let mut prev = d.phi(last);
        for k in 1..=30 {
            let p = d.phi(last + ms(10 * k));
            assert!(
                p >= prev,
                "phi must not decrease with silence: {prev} then {p}"
            );
            prev = p;
        }
        assert!(d.phi(last + ms(300)) > 10.0, "{}", d.phi(last + ms(300)));
        // Far into the tail it stays finite and keeps growing.
        let far = d.phi(last + Duration::from_secs(3600));
        assert!(far.is_finite() && far > 1000.0, "{far}");
        // A heartbeat brings it back down.
        d.heartbeat(last + ms(400));
        assert!(d.phi(last + ms(400)) < 0.5);
    }

    #[test]
    fn jitter_is_tolerated_but_a_real_outage_is_not() {
        // Heartbeats every 100 ms ± 40 ms (deterministic pseudo-random jitter).
        let mut d = PhiAccrual::new(200, ms(10));
        let t0 = Instant::now();
        let mut t = t0;
        let mut seed = 12345u64;
        let mut max_phi_at_arrival: f64 = 0.0;
        for k in 0..200 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let jitter = (seed >> 33) % 81; // 0..=80
            t += ms(60 + jitter);
            if k >= 20 {
                // After a short learning phase.
                max_phi_at_arrival = max_phi_at_arrival.max(d.phi(t));
            }
            d.heartbeat(t);
        }
        // No arrival within the jitter range looked like a failure.
        assert!(
            max_phi_at_arrival < 5.0,
            "jittery but regular heartbeats reached phi {max_phi_at_arrival}"
        );
        // The same learned distribution flags a long silence.
        assert!(d.phi(t + ms(1_000)) > 10.0, "{}", d.phi(t + ms(1_000)));
        // A jittery link tolerates a longer silence than a regular one of the same mean.
        let mut regular = PhiAccrual::new(200, ms(10));
        let end = steady(&mut regular, t0, ms(100), 200);
        assert!(regular.phi(end + ms(180)) > d.phi(t + ms(180)));
    }

    #[test]
    fn the_std_dev_floor_absorbs_one_late_heartbeat() {
        // A perfectly regular 5 ms link: without a floor, 20 ms of silence would be a crash.
        let mut d = PhiAccrual::new(100, ms(100));
        let last = steady(&mut d, Instant::now(), ms(5), 100);
        assert!(d.phi(last + ms(20)) < 1.0, "{}", d.phi(last + ms(20)));
        assert!(
            d.phi(last + ms(1_000)) > 10.0,
            "{}",
            d.phi(last + ms(1_000))
        );
    }

    #[test]
    fn the_window_forgets_old_rhythm_and_reset_forgets_everything() {
        let mut d = PhiAccrual::new(10, ms(1));
        let t0 = Instant::now();
        let last = steady(&mut d, t0, ms(1_000), 20);
        // Now fast heartbeats: after a window's worth, 100 ms of silence is suspicious.
        let last = steady(&mut d, last + ms(10), ms(10), 11);
        assert!(d.phi(last + ms(100)) > 10.0, "{}", d.phi(last + ms(100)));
        d.reset();
        assert_eq!(d.phi(last + ms(100)), 0.0);
        assert!(d.last_heartbeat().is_none());
    }

    #[test]
    fn the_first_heartbeat_is_judged_by_the_expected_interval() {
        let t0 = Instant::now();
        let mut d = PhiAccrual::new(100, ms(20)).with_first_interval(ms(100));
        d.heartbeat(t0);
        assert!(d.phi(t0 + ms(100)) < 1.0, "{}", d.phi(t0 + ms(100)));
        assert!(d.phi(t0 + ms(500)) > 10.0, "{}", d.phi(t0 + ms(500)));
        assert_eq!(d.silence(t0 + ms(500)), ms(500));
    }
}
