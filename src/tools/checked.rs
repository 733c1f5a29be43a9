//! A causally checked workload over running sites (`causalkv bench checked`), for the
//! benchmark scripts: it runs on a deployed cluster of any size, behind the emulated WAN or
//! not, what the end-to-end tests run on the clusters they build.
//!
//! Sessions are spread over the sites. Each runs a closed loop of reads and writes on a small
//! key space (so reads often return other sites' writes) and every few operations hops to the
//! next site, carrying its session token, as a client that fails over does. Every
//! acknowledged operation is recorded; every write writes a value no other write writes. At
//! the end the history is judged by the causal checker ([`checker::check`]), and, once the
//! sites have settled, their final states by the convergence check
//! ([`checker::check_convergence`]).
//!
//! A write whose outcome is unknown (it failed or timed out) may still have taken effect, so
//! a read may return it: it is recorded as a write of a session of its own, which lets reads
//! return it without ordering it after anything (the check loses that edge, never gains a
//! false one).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::checker::{self, Op, Recorder};
use crate::client::{Client, ClientError};

/// Connects a new client to site `i` (an index into the sites given).
pub type Connect = Arc<
    dyn Fn(usize) -> Pin<Box<dyn Future<Output = Result<Client, ClientError>> + Send>>
        + Send
        + Sync,
>;

/// What to run.
#[derive(Clone, Debug)]
pub struct CheckedOptions {
    /// Number of sites (the indexes [`Connect`] accepts).
    pub sites: usize,
    /// Sessions starting at each site.
    pub sessions_per_site: usize,
    /// How long the sessions run.
    pub duration: Duration,
    /// Distinct keys.
    pub keys: u64,
    /// Fraction of reads.
    pub read_ratio: f64,
    /// A session moves to the next site after this many operations (0: never).
    pub hop_every: u64,
    /// How long the sites may take to converge after the load.
    pub settle: Duration,
    /// RNG seed (printed in the report: the same seed replays the same choices).
    pub seed: u64,
}

/// The outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckedReport {
    /// Sites.
    pub sites: usize,
    /// Sessions.
    pub sessions: usize,
    /// The seed of the run.
    pub seed: u64,
    /// Acknowledged operations recorded.
    pub ops: u64,
    /// Of which reads.
    pub reads: u64,
    /// Reads that returned a value another site wrote.
    pub remote_reads: u64,
    /// Site hops.
    pub hops: u64,
    /// Operations that failed (their writes recorded as possibly applied).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Violations the causal checker found.
    pub violations: usize,
    /// The first violation, described.
    pub first_violation: Option<String>,
    /// Whether every site ended with the same value for every key.
    pub converged: bool,
    /// How the sites differ, when they do.
    pub divergence: Option<String>,
    /// Seconds from the end of the load until the sites agreed.
    pub settle_seconds: f64,
    /// No violation and converged.
    pub ok: bool,
}

fn key(k: u64) -> Vec<u8> {
    format!("chk-{k}").into_bytes()
}

/// Runs the workload and judges it.
pub async fn run_checked(connect: Connect, opts: &CheckedOptions) -> CheckedReport {
    let recorder = Recorder::new();
    let sessions = opts.sites * opts.sessions_per_site.max(1);
    let end = Instant::now() + opts.duration;
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let (connect, recorder, opts) = (connect.clone(), recorder.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            session(s, connect, recorder, &opts, end).await
        }));
    }
    let mut report = CheckedReport {
        sites: opts.sites,
        sessions,
        seed: opts.seed,
        ..Default::default()
    };
    for t in tasks {
        let Ok(r) = t.await else { continue };
        report.hops += r.hops;
        report.errors += r.errors;
        report.remote_reads += r.remote_reads;
        if report.first_error.is_none() {
            report.first_error = r.first_error;
        }
    }
    let history = recorder.snapshot();
    report.ops = history.len() as u64;
    report.reads = history
        .ops()
        .iter()
        .filter(|o| matches!(o.kind, checker::OpKind::Read { .. }))
        .count() as u64;
    let verdict = checker::check(&history);
    report.violations = verdict.total();
    report.first_violation = verdict.violations.first().map(|v| format!("{v:?}"));
    // Convergence: read every key at every site with a fresh session until they agree.
    let settled = Instant::now();
    loop {
        match final_states(&connect, opts).await {
            Ok(states) => match checker::check_convergence(&states) {
                Ok(()) => {
                    report.converged = true;
                    report.divergence = None;
                    break;
                }
                Err(e) => report.divergence = Some(e.to_string()),
            },
            Err(e) => report.divergence = Some(format!("reading the final states: {e}")),
        }
        if settled.elapsed() >= opts.settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.settle_seconds = settled.elapsed().as_secs_f64();
    report.ok = report.violations == 0 && report.converged;
    report
}

/// What one session did besides the recorded operations.
#[derive(Default)]
struct SessionReport {
    hops: u64,
    errors: u64,
    remote_reads: u64,
    first_error: Option<String>,
}

async fn session(
    s: usize,
    connect: Connect,
    recorder: Recorder,
    opts: &CheckedOptions,
    end: Instant,
) -> SessionReport {
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed.wrapping_mul(1_000_003) + s as u64);
    let mut me = SessionReport::default();
    let mut site = s % opts.sites;
    let fail = |me: &mut SessionReport, e: String| {
        me.errors += 1;
        me.first_error.get_or_insert(e);
    };
    let mut client = match connect(site).await {
        Ok(c) => c,
        Err(e) => {
            fail(
                &mut me,
                format!("session {s}: connecting to site {site}: {e}"),
            );
            return me;
        }
    };
    let id = s as u64;
    let mut seq = 0u64;
    while Instant::now() < end {
        seq += 1;
        if opts.hop_every > 0 && seq.is_multiple_of(opts.hop_every) && opts.sites > 1 {
            let token = client.session_token();
            let next = (site + 1) % opts.sites;
            match connect(next).await {
                Ok(c) => {
                    if let Err(e) = c.set_session_token(&token) {
                        fail(&mut me, format!("session {s}: token: {e}"));
                        return me;
                    }
                    client = c;
                    site = next;
                    me.hops += 1;
                }
                Err(e) => fail(&mut me, format!("session {s}: hop to site {next}: {e}")),
            }
        }
        let k = key(rng.gen_range(0..opts.keys.max(1)));
        if rng.gen_bool(opts.read_ratio.clamp(0.0, 1.0)) {
            match client.get(&k).await {
                Ok(v) => {
                    let v = v.map(|b| b.to_vec());
                    if v.as_ref()
                        .is_some_and(|v| !v.starts_with(format!("{site}/").as_bytes()))
                    {
                        me.remote_reads += 1;
                    }
                    recorder.record(Op::read(id, site as u16, k, v));
                }
                Err(e) => fail(&mut me, format!("session {s}: get at site {site}: {e}")),
            }
        } else {
            // Unique per write: the site it was written at, the session, its sequence number.
            let value = format!("{site}/{s}/{seq}").into_bytes();
            match client.put(&k, value.clone()).await {
                Ok(_) => recorder.record(Op::write(id, site as u16, k, value)),
                Err(e) => {
                    // Perhaps applied: a write of a session of its own (see the module doc).
                    let ghost = (1 << 63) | (id << 32) | me.errors;
                    recorder.record(Op::write(ghost, site as u16, k, value));
                    fail(&mut me, format!("session {s}: put at site {site}: {e}"));
                }
            }
        }
    }
    me
}

/// Every key's value at every site, read with a fresh session at each.
async fn final_states(
    connect: &Connect,
    opts: &CheckedOptions,
) -> Result<Vec<(u16, BTreeMap<Vec<u8>, Vec<u8>>)>, ClientError> {
    let mut out = Vec::new();
    for site in 0..opts.sites {
        let c = connect(site).await?;
        let mut state = BTreeMap::new();
        for k in 0..opts.keys.max(1) {
            if let Some(v) = c.get(key(k)).await? {
                state.insert(key(k), v.to_vec());
            }
        }
        out.push((site as u16, state));
    }
    Ok(out)
}
