//! Draining and ALTERNATE-SERVER (RFC 8489 §10, RFC 8656 §7.2).
//!
//! A draining relay takes no new allocations but keeps serving the ones it has (Refresh,
//! permissions, channels) until they end; the daemon stops it once none is left or its deadline
//! passes. [`DrainState`] is shared by every worker's server (like the quota ledger), so one
//! `relay ctl drain` or SIGUSR1 drains the whole relay; the core only reads it.
//!
//! A new Allocate refused while draining, or at the relay-wide allocation cap, is sent to an
//! alternate server with 300 Try Alternate when one of the right family is configured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rand::{CryptoRng, Rng, RngCore};

use super::{Ctx, Server};
use crate::stun::{Attribute, Class, ErrorCode, StunErrorCode};
use crate::Transport;

/// The reason phrase of the 508 a draining relay without a usable alternate answers with, so a
/// client's log says why (RFC 8489 §14.8 lets the phrase be any text).
pub const DRAINING_REASON: &str = "Server Draining: no new allocations";

/// Whether the relay is draining, and until when; shared by every worker's server.
#[derive(Debug, Default)]
pub struct DrainState {
    draining: AtomicBool,
    times: Mutex<DrainTimes>,
}

#[derive(Clone, Copy, Debug, Default)]
struct DrainTimes {
    since: Option<Instant>,
    deadline: Option<Instant>,
}

impl DrainState {
    /// Starts draining at `now` (or, when already draining, keeps the start and sets the new
    /// deadline: an operator may shorten or lift it). Returns whether this call started it.
    pub fn start(&self, now: Instant, deadline: Option<Instant>) -> bool {
        let mut times = self.lock();
        let first = times.since.is_none();
        times.since.get_or_insert(now);
        times.deadline = deadline;
        self.draining.store(true, Ordering::SeqCst);
        first
    }

    /// Whether new allocations are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// When draining started.
    pub fn since(&self) -> Option<Instant> {
        self.lock().since
    }

    /// When the relay stops even with allocations left.
    pub fn deadline(&self) -> Option<Instant> {
        self.lock().deadline
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DrainTimes> {
        // Each update is one assignment: a panic elsewhere cannot leave it half-done.
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Configured alternate servers (`--alternate-server`, `--alternate-domain`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Alternates {
    /// Alternate transport addresses, of either family.
    pub servers: Vec<SocketAddr>,
    /// ALTERNATE-DOMAIN for clients over TLS (RFC 8489 §14.16), whose certificate check
    /// needs the alternate's name.
    pub domain: Option<String>,
}

impl Alternates {
    /// Alternates a client that contacted `listener` may be sent to: those of the listener's
    /// family (RFC 8489 §14.15: the client reaches it the way it reached this one), never the
    /// listener itself (an identical fleet config names every instance, this one included).
    pub fn candidates(&self, listener: SocketAddr) -> impl Iterator<Item = SocketAddr> + '_ {
        let own = SocketAddr::new(listener.ip().to_canonical(), listener.port());
        self.servers.iter().copied().filter(move |alt| {
            let alt_canonical = SocketAddr::new(alt.ip().to_canonical(), alt.port());
            alt_canonical.is_ipv4() == own.is_ipv4() && alt_canonical != own
        })
    }
}

/// Why a new allocation is refused relay-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `relay ctl drain` or SIGUSR1.
    Draining,
    /// `--max-allocations` reached.
    Capacity,
    /// `--redirect-above` reached (only refused when an alternate can take the client).
    Load,
}

impl<R: RngCore + CryptoRng> Server<R> {
    /// Whether a new Allocate on `listener` should go to an alternate because the relay holds
    /// `--redirect-above` allocations or more (a load threshold below the hard cap, RFC 8489
    /// §10): only when an alternate of the client's family exists, else the relay serves it.
    pub(super) fn over_load_threshold(&self, listener: SocketAddr) -> bool {
        self.config
            .redirect_above
            .is_some_and(|threshold| self.config.quota.total() >= threshold)
            && self.config.alternates.candidates(listener).next().is_some()
    }

    /// An alternate for this client: a random one of the usable candidates, so a fleet's
    /// redirected clients spread over it.
    fn pick_alternate(&mut self, listener: SocketAddr) -> Option<SocketAddr> {
        let count = self.config.alternates.candidates(listener).count();
        if count == 0 {
            return None;
        }
        let index = self.rng.gen_range(0..count);
        self.config.alternates.candidates(listener).nth(index)
    }

    /// Answers an authenticated Allocate the relay will not serve (RFC 8489 §10, RFC 8656
    /// §7.2): 300 Try Alternate with ALTERNATE-SERVER (and ALTERNATE-DOMAIN over TLS) when an
    /// alternate of the client's family is configured, signed like every answer to an
    /// authenticated request; else 508, whose reason phrase says the server is draining.
    pub(super) fn refuse_allocation(&mut self, ctx: &Ctx, why: Refusal) {
        if let Some(alternate) = self.pick_alternate(ctx.listener) {
            let domain = match (ctx.transport, &self.config.alternates.domain) {
                (Transport::Tls, Some(domain)) => Some(domain.clone()),
                _ => None,
            };
            let mut extra = vec![Attribute::AlternateServer(alternate)];
            if let Some(domain) = domain.as_deref() {
                extra.push(Attribute::AlternateDomain(domain));
            }
            tracing::debug!(
                client = %ctx.client,
                %alternate,
                reason = ?why,
                "Allocate sent to an alternate server"
            );
            return self.respond_error(ctx, StunErrorCode::TryAlternate, &extra);
        }
        match why {
            Refusal::Capacity | Refusal::Load => {
                let detail = format!(
                    "relay-wide --max-allocations {} reached, no alternate server for the \
                     client's family",
                    self.config.max_allocations
                );
                self.refuse(ctx, StunErrorCode::InsufficientCapacity, &detail);
            }
            Refusal::Draining => {
                let code = StunErrorCode::InsufficientCapacity;
                self.note_refusal_because(
                    ctx,
                    code,
                    "draining, no alternate server for the client's family",
                );
                let error = ErrorCode {
                    code: code.code(),
                    reason: DRAINING_REASON,
                };
                self.respond(ctx, Class::Error, &[Attribute::ErrorCode(error)]);
            }
        }
    }
}
