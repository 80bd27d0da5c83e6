//! Routes admin requests to the workers and merges their answers.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

use tokio::sync::mpsc;

use super::{
    connection_limits::ConnectionLimits,
    exposition::{Exposition, Labels},
    kernel_sync::KernelSync,
    reload::SharedReloader,
    worker::{lock, DisconnectTarget as WorkerTarget, WorkerRequest, WorkerSnapshot},
};
use crate::control::{ask, AdminRequest, AllocationList, DisconnectTarget, Health};
use relay_proto::{limiter::UnauthLimiter, server::AllocationId};

/// The relay-wide byte budgets the metrics report on.
pub struct Limits {
    /// Answers to unauthenticated requests, per source.
    pub unauth: Arc<UnauthLimiter>,
    /// Relayed bytes per user, when `--user-bandwidth` is set.
    pub bandwidth: Option<Arc<super::bandwidth::Shared>>,
}

/// Serves requests from the admin endpoint until it goes away.
#[expect(
    clippy::too_many_arguments,
    reason = "one shared handle per concern the router answers for; a struct would only rename them"
)]
pub async fn route(
    mut requests: mpsc::Receiver<AdminRequest>,
    workers: Vec<mpsc::Sender<WorkerRequest>>,
    kernel: Arc<Mutex<KernelSync>>,
    alive_workers: Arc<AtomicUsize>,
    limits: Limits,
    reloader: SharedReloader,
    connection_limits: Arc<ConnectionLimits>,
    drain: super::drain::Drain,
) {
    while let Some(request) = requests.recv().await {
        match request {
            AdminRequest::List(reply) => {
                let mut allocations = Vec::new();
                for worker in &workers {
                    if let Some(mut part) = ask(worker, WorkerRequest::List).await {
                        allocations.append(&mut part);
                    }
                }
                allocations.sort_by_key(|a| a.id);
                let (fastpath_attached, fastpath_default) = {
                    let kernel = lock(&kernel);
                    (kernel.attached(), kernel.default_on())
                };
                let _ = reply.send(AllocationList {
                    fastpath_attached,
                    fastpath_default,
                    allocations,
                });
            }
            AdminRequest::SetFastPath {
                allocation,
                on,
                reply,
            } => {
                // Allocation ids are striped over the workers: worker i owns i + 1 + k * n.
                let owner = usize::try_from(allocation.saturating_sub(1))
                    .ok()
                    .and_then(|i| workers.get(i % workers.len().max(1)));
                let result = match owner {
                    Some(worker) => ask(worker, |reply| WorkerRequest::SetFastPath {
                        allocation: AllocationId(allocation),
                        on,
                        reply,
                    })
                    .await
                    .unwrap_or_else(|| Err("the relay is shutting down".to_owned())),
                    None => Err(format!("no allocation {allocation}")),
                };
                let _ = reply.send(result);
            }
            AdminRequest::Disconnect { target, reply } => {
                let _ = reply.send(disconnect(&workers, target).await);
            }
            AdminRequest::SetDefault { on, reply } => {
                let _ = reply.send(lock(&kernel).set_default(on));
            }
            AdminRequest::Reload(reply) => {
                let result = reloader.lock().await.reload().await;
                let _ = reply.send(result.map_err(|e| format!("{e:#}")));
            }
            AdminRequest::Health(reply) => {
                let live = alive_workers.load(Ordering::SeqCst) == workers.len();
                // Not ready while draining: a load balancer stops sending new clients here.
                let ready = live && !drain.state.is_draining();
                let _ = reply.send(Health { live, ready });
            }
            AdminRequest::Drain { deadline, reply } => {
                drain.start(deadline, "relay ctl drain");
                let live = alive_workers.load(Ordering::SeqCst) == workers.len();
                let _ = reply.send(drain.status(live));
            }
            AdminRequest::Status(reply) => {
                let live = alive_workers.load(Ordering::SeqCst) == workers.len();
                let _ = reply.send(drain.status(live));
            }
            AdminRequest::Metrics(reply) => {
                let mut total = WorkerSnapshot::default();
                for worker in &workers {
                    if let Some(part) = ask(worker, WorkerRequest::Snapshot).await {
                        total.allocations += part.allocations;
                        total.permissions += part.permissions;
                        total.channels += part.channels;
                        total.socket_totals += part.socket_totals;
                        total.send_drops += part.send_drops;
                        total.allocation_ids.extend(part.allocation_ids);
                        for (key, count) in part.error_responses {
                            *total.error_responses.entry(key).or_insert(0) += count;
                        }
                        for (key, count) in part.allocations_by_transport {
                            *total.allocations_by_transport.entry(key).or_insert(0) += count;
                        }
                        for (key, count) in part.connections {
                            *total.connections.entry(key).or_insert(0) += count;
                        }
                        for (key, count) in part.connections_closed {
                            *total.connections_closed.entry(key).or_insert(0) += count;
                        }
                        total.stream_send_drops += part.stream_send_drops;
                        total.stream_buffered_bytes += part.stream_buffered_bytes;
                    }
                }
                let mut out = Exposition::default();
                metrics(&mut out, &total, &kernel);
                unauth_metrics(&mut out, &limits.unauth);
                super::bandwidth::metrics(&mut out, limits.bandwidth.as_deref());
                error_response_metrics(&mut out, &total);
                stream_metrics(&mut out, &total, &connection_limits);
                drain.metrics(&mut out);
                let _ = reply.send(out.encode());
            }
        }
    }
}

/// Ends an allocation on the worker that owns it, or a user's on every worker; an unknown
/// allocation or a user without allocations is an error that names it.
async fn disconnect(
    workers: &[mpsc::Sender<WorkerRequest>],
    target: DisconnectTarget,
) -> Result<Vec<u64>, String> {
    let (asked, target, missing): (&[_], _, _) = match target {
        DisconnectTarget::Allocation(id) => {
            // Allocation ids are striped over the workers: worker i owns i + 1 + k * n.
            let owner = usize::try_from(id.saturating_sub(1))
                .ok()
                .map(|i| i % workers.len().max(1));
            let asked = match owner {
                Some(i) if id > 0 => workers.get(i..=i).unwrap_or_default(),
                _ => &[],
            };
            (
                asked,
                WorkerTarget::Allocation(AllocationId(id)),
                format!("no allocation {id} (see `relay ctl allocations`)"),
            )
        }
        DisconnectTarget::User(user) => {
            let missing = format!("no allocation of user `{user}` (see `relay ctl allocations`)");
            (workers, WorkerTarget::User(user), missing)
        }
    };
    let mut ended = Vec::new();
    for worker in asked {
        let target = target.clone();
        if let Some(ids) = ask(worker, |reply| WorkerRequest::Disconnect { target, reply }).await {
            ended.extend(ids.into_iter().map(|id| id.0));
        }
    }
    ended.sort_unstable();
    if ended.is_empty() {
        return Err(missing);
    }
    Ok(ended)
}

/// Labels of one path and direction.
fn path_direction(path: &str, direction: &str) -> Labels {
    vec![
        ("path", path.to_owned()),
        ("direction", direction.to_owned()),
    ]
}

/// Prometheus exposition; no per-user labels.
fn metrics(out: &mut Exposition, snapshot: &WorkerSnapshot, kernel: &Mutex<KernelSync>) {
    out.gauge(
        "relay_allocations",
        "Live allocations.",
        snapshot.allocations,
    );
    out.gauge(
        "relay_permissions",
        "Live permissions.",
        snapshot.permissions,
    );
    out.gauge("relay_channels", "Bound channels.", snapshot.channels);
    // Outside the lock: workers installing bindings must not wait for a scrape.
    let kernel_totals = KernelSync::live_totals(kernel, &snapshot.allocation_ids);
    let paths = [
        ("socket", snapshot.socket_totals),
        ("kernel", kernel_totals),
    ];
    out.counters(
        "relay_relayed_packets_total",
        "Datagrams relayed, by path and direction.",
        paths.iter().flat_map(|(path, c)| {
            [
                (path_direction(path, "to_peer"), c.to_peer_packets),
                (path_direction(path, "to_client"), c.to_client_packets),
            ]
        }),
    );
    out.counters(
        "relay_relayed_bytes_total",
        "Payload bytes relayed, by path and direction.",
        paths.iter().flat_map(|(path, c)| {
            [
                (path_direction(path, "to_peer"), c.to_peer_bytes),
                (path_direction(path, "to_client"), c.to_client_bytes),
            ]
        }),
    );
    let kernel = lock(kernel);
    // A handful of map reads (one per verdict reason), not one per allocation.
    if let Some(fastpath) = kernel.fastpath() {
        if let Ok(counters) = fastpath.verdict_counters() {
            out.counters(
                "relay_fastpath_verdicts_total",
                "Kernel program verdicts, by reason.",
                counters
                    .into_iter()
                    .map(|(reason, n)| (vec![("reason", reason.label().to_owned())], n)),
            );
        }
    }
}

/// TCP/TLS clients (issue 11): allocations and connections by transport, why connections
/// ended, refusals at the caps, queue drops and buffered bytes; no per-user labels.
fn stream_metrics(out: &mut Exposition, snapshot: &WorkerSnapshot, limits: &ConnectionLimits) {
    let transport = |t: &str| vec![("transport", t.to_owned())];
    out.gauges(
        "relay_allocations_by_transport",
        "Live allocations by client transport.",
        ["udp", "tcp", "tls"].map(|t| {
            let n = snapshot
                .allocations_by_transport
                .get(t)
                .copied()
                .unwrap_or(0);
            (transport(t), n)
        }),
    );
    out.gauges(
        "relay_connections",
        "Open TCP and TLS client connections.",
        ["tcp", "tls"].map(|t| {
            (
                transport(t),
                snapshot.connections.get(t).copied().unwrap_or(0),
            )
        }),
    );
    out.counters(
        "relay_connections_closed_total",
        "TCP and TLS client connections closed, by transport and reason.",
        snapshot.connections_closed.iter().map(|((t, reason), n)| {
            (
                vec![("transport", t.to_string()), ("reason", reason.to_string())],
                *n,
            )
        }),
    );
    let (total, per_source) = limits.refused();
    out.counters(
        "relay_connections_refused_total",
        "TCP and TLS connections closed at accept by --max-connections (total) or \
         --max-connections-per-ip (per_ip).",
        [
            (vec![("reason", "total".to_owned())], total),
            (vec![("reason", "per_ip".to_owned())], per_source),
        ],
    );
    out.counter(
        "relay_stream_send_drops_total",
        "Messages to TCP/TLS clients dropped because their send queue was full.",
        snapshot.stream_send_drops,
    );
    out.gauge(
        "relay_stream_buffered_bytes",
        "Bytes held in TCP/TLS connection buffers.",
        snapshot.stream_buffered_bytes,
    );
}

/// Error responses by method and code (no per-user labels): 401 and 438 start every
/// allocation, 403 is the peer policy, 486 a user's quota, 508 the relay's capacity.
fn error_response_metrics(out: &mut Exposition, snapshot: &WorkerSnapshot) {
    out.counters(
        "relay_error_responses_total",
        "STUN/TURN error responses sent, by method and code.",
        snapshot
            .error_responses
            .iter()
            .map(|((method, code), count)| {
                (
                    vec![("method", method.to_string()), ("code", code.to_string())],
                    *count,
                )
            }),
    );
}

/// What the relay-wide unauthenticated-answer budget refused (issue 12 item 2).
fn unauth_metrics(out: &mut Exposition, limiter: &UnauthLimiter) {
    out.counter(
        "relay_unauth_refused_total",
        "Answers to unauthenticated requests (401, 438, 400, Binding) not sent because their \
         destination's byte budget was spent.",
        limiter.refused_answers(),
    );
    out.counter(
        "relay_unauth_refused_bytes_total",
        "Bytes of those refused answers.",
        limiter.refused_bytes(),
    );
}
