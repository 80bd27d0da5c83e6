//! Draining the daemon: `relay ctl drain` and SIGUSR1 start it, the core's shared
//! [`DrainState`] refuses new allocations in every worker, and [`drained`] ends the daemon's
//! main wait (a clean stop, exit 0) once no allocation is left or the deadline passed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tracing::info;

use crate::control::drain::StatusView;
use relay_proto::server::{Alternates, DrainState, QuotaLedger};

/// How often the main task looks whether a drain is done.
const POLL: Duration = Duration::from_millis(100);

/// What drain and status need: the shared state and the relay-wide allocation count.
#[derive(Clone, Debug)]
pub struct Drain {
    pub state: Arc<DrainState>,
    /// Every worker's allocations (being set up or live): the quota ledger counts them all.
    pub ledger: Arc<QuotaLedger>,
    pub alternates: Alternates,
}

impl Drain {
    /// Starts draining (or replaces the deadline); logs what remains.
    pub fn start(&self, deadline: Option<Duration>, by: &str) {
        let now = Instant::now();
        let first = self.state.start(now, deadline.map(|d| now + d));
        let remaining = self.ledger.total();
        let deadline = deadline.map_or("none".to_owned(), |d| format!("{}s", d.as_secs()));
        if first {
            info!(
                remaining,
                %deadline,
                alternates = self.alternates.servers.len(),
                "draining ({by}): no new allocations; the relay stops when the last one ends \
                 or at the deadline"
            );
        } else {
            info!(remaining, %deadline, "already draining ({by}): deadline replaced");
        }
    }

    /// `relay ctl status` (and the answer to `relay ctl drain`).
    pub fn status(&self, live: bool) -> StatusView {
        let now = Instant::now();
        let draining = self.state.is_draining();
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            live,
            ready: live && !draining,
            draining,
            draining_for_secs: self
                .state
                .since()
                .map(|since| now.saturating_duration_since(since).as_secs()),
            deadline_in_secs: self
                .state
                .deadline()
                .map(|d| d.saturating_duration_since(now).as_secs()),
            allocations: self.ledger.total() as u64,
            alternates: self
                .alternates
                .servers
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// Prometheus samples: whether the relay drains and the seconds to its deadline.
    pub fn metrics(&self, out: &mut super::exposition::Exposition) {
        let now = Instant::now();
        out.gauge(
            "relay_draining",
            "1 while the relay drains (no new allocations; it stops when relay_allocations \
             reaches 0 or the deadline passes).",
            u64::from(self.state.is_draining()),
        );
        if let Some(deadline) = self.state.deadline() {
            out.gauge(
                "relay_drain_deadline_seconds",
                "Seconds until a draining relay stops whatever allocations remain.",
                deadline.saturating_duration_since(now).as_secs(),
            );
        }
    }
}

/// SIGUSR1, caught from the start (its default action would end the process at once).
pub fn install_sigusr1() -> anyhow::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")
}

/// Drains on every SIGUSR1 (without a deadline: `relay ctl drain --deadline` sets one).
pub async fn on_sigusr1(mut signal: tokio::signal::unix::Signal, drain: Drain) {
    while signal.recv().await.is_some() {
        drain.start(None, "SIGUSR1");
    }
}

/// Resolves once the relay drains and no allocation is left, or its deadline has passed.
pub async fn drained(drain: &Drain) {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        if !drain.state.is_draining() {
            continue;
        }
        let remaining = drain.ledger.total();
        if remaining == 0 {
            info!("drained: no allocation left; stopping");
            return;
        }
        if drain
            .state
            .deadline()
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            info!(
                remaining,
                "drain deadline passed; stopping with allocations left"
            );
            return;
        }
    }
}
