//! The local admin interface: an HTTP endpoint inside the daemon (loopback only) and the
//! `relay ctl` client that talks to it.
//!
//! Routes (all answers are JSON except `/metrics`):
//! - `GET /allocations`: every allocation with its peers, channels, path and counters.
//! - `POST /allocations/{id}/fastpath/on|off`: move one allocation between the kernel fast path
//!   and the socket path; the allocation itself is untouched.
//! - `POST /fastpath/default/on|off`: the path new allocations start on.
//! - `POST /allocations/{id}/disconnect`, `POST /users/{name}/disconnect` (name
//!   percent-encoded): end one allocation, or every allocation of a user; 404 if none matched.
//!   Each ended allocation's usage record says `disconnected`.
//! - `GET /metrics`: OpenMetrics text (encoded by `prometheus-client`; Prometheus reads it):
//!   sample names and labels as ever; counter families are named without `_total` in their
//!   `# HELP`/`# TYPE` lines, as OpenMetrics wants, and the text ends with `# EOF`.
//! - `GET /healthz`, `GET /readyz`: 200 while every worker runs (and, for readiness, new
//!   allocations are taken: not while draining), 503 otherwise; for service managers and
//!   Kubernetes probes.
//! - `POST /drain`, `POST /drain/{deadline_secs}`: start draining; answers like `/status`.
//! - `GET /status`: running or draining, the drain deadline, the allocations left.
//!
//! On the admin listener every route but `/metrics`, `/healthz` and `/readyz` needs the
//! `X-Relay-Ctl` header (reads too: they show user names and client addresses), which
//! `relay ctl` sends; see [`http`] for what that does and does not keep out, and for the
//! connection cap and timeouts.
//!
//! `--metrics ADDR:PORT` adds a second listener with only the read-only `/metrics`,
//! `/healthz` and `/readyz`, which may face the network (for Prometheus and probes).

pub mod client;
pub mod drain;
pub mod http;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Packets and bytes relayed in each direction on one path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathCounters {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

impl std::ops::AddAssign for PathCounters {
    fn add_assign(&mut self, other: Self) {
        self.to_peer_packets += other.to_peer_packets;
        self.to_peer_bytes += other.to_peer_bytes;
        self.to_client_packets += other.to_client_packets;
        self.to_client_bytes += other.to_client_bytes;
    }
}

impl PathCounters {
    /// One datagram of `bytes` in one direction.
    pub fn one(to_peer: bool, bytes: usize) -> Self {
        let bytes = bytes as u64;
        if to_peer {
            Self {
                to_peer_packets: 1,
                to_peer_bytes: bytes,
                ..Self::default()
            }
        } else {
            Self {
                to_client_packets: 1,
                to_client_bytes: bytes,
                ..Self::default()
            }
        }
    }

    pub fn packets(&self) -> u64 {
        self.to_peer_packets + self.to_client_packets
    }

    pub fn bytes(&self) -> u64 {
        self.to_peer_bytes + self.to_client_bytes
    }
}

/// A bound channel as the admin interface shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    pub number: u16,
    pub peer: String,
}

/// One allocation as `relay ctl allocations` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationView {
    pub id: u64,
    pub user: String,
    pub client: String,
    pub listener: String,
    /// The client's transport: `udp`, `tcp` or `tls` (absent in answers of older relays).
    #[serde(default = "udp")]
    pub transport: String,
    /// The relayed transport address (of the requested family; IPv4 in a dual allocation).
    pub relayed: String,
    /// The IPv6 relayed transport address of a dual allocation (RFC 8656 §7.2
    /// ADDITIONAL-ADDRESS-FAMILY); absent otherwise, and in answers of older relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_additional: Option<String>,
    pub expires_in_secs: u64,
    /// When the allocation went live, in Unix seconds (0 in answers of older relays).
    #[serde(default)]
    pub started_unix: u64,
    /// Peer IPs with a live permission.
    pub peers: Vec<String>,
    pub channels: Vec<ChannelView>,
    /// `kernel` when its channels are forwarded by the fast path, else `socket`.
    pub path: String,
    pub socket: PathCounters,
    pub kernel: PathCounters,
}

fn udp() -> String {
    "udp".to_owned()
}

/// The answer to `GET /allocations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationList {
    /// Whether a kernel fast path is attached at all.
    pub fastpath_attached: bool,
    /// Path new allocations start on.
    pub fastpath_default: bool,
    pub allocations: Vec<AllocationView>,
}

/// Sends a request made around a fresh reply channel and waits for the answer; `None` when the
/// other side is gone.
pub async fn ask<R, T>(
    to: &tokio::sync::mpsc::Sender<R>,
    make: impl FnOnce(oneshot::Sender<T>) -> R,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    to.send(make(tx)).await.ok()?;
    rx.await.ok()
}

/// What the admin endpoint asks the core task to do; the core answers on the oneshot.
#[derive(Debug)]
pub enum AdminRequest {
    List(oneshot::Sender<AllocationList>),
    /// Turn the fast path on or off for one allocation.
    SetFastPath {
        allocation: u64,
        on: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Turn the fast path on or off for allocations that have no explicit setting.
    SetDefault {
        on: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Prometheus exposition text.
    Metrics(oneshot::Sender<String>),
    /// Liveness and readiness (`/healthz`, `/readyz`).
    Health(oneshot::Sender<Health>),
    /// Re-read what can change at runtime (see `daemon::reload`): what was reloaded, or why
    /// nothing was.
    Reload(oneshot::Sender<Result<String, String>>),
    /// Start draining (or replace the deadline of a drain under way).
    Drain {
        deadline: Option<std::time::Duration>,
        reply: oneshot::Sender<drain::StatusView>,
    },
    /// `relay ctl status`.
    Status(oneshot::Sender<drain::StatusView>),
    /// End allocations (`relay ctl disconnect`): the ids ended, or why none was.
    Disconnect {
        target: DisconnectTarget,
        reply: oneshot::Sender<Result<Vec<u64>, String>>,
    },
}

/// What `relay ctl disconnect` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisconnectTarget {
    Allocation(u64),
    /// Every allocation of a user (a TURN REST username counts as its user part).
    User(String),
}

/// The answer to a disconnect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnected {
    /// The allocations ended.
    pub disconnected: Vec<u64>,
}

/// What `/healthz` and `/readyz` report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Every worker thread is running (else the relay is broken: restart it).
    pub live: bool,
    /// Live, and taking new allocations.
    pub ready: bool,
}
