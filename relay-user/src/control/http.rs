//! The admin endpoint: an HTTP/1.1 server on hyper (one request per connection) that turns
//! routes into [`AdminRequest`]s for the core task.
//!
//! Each listener serves at most [`MAX_CONNECTIONS`] connections at once (more are answered 503
//! and closed at once, so a flood cannot queue up behind them); a request head must arrive
//! within [`REQUEST_TIMEOUT`] (hyper's header-read timeout), the answer is computed within
//! [`HANDLER_TIMEOUT`] (else 503), and a connection lives at most the sum of those and
//! [`WRITE_TIMEOUT`], which bounds a client that does not take its answer.
//!
//! Access on the admin listener: every route except `/metrics`, `/healthz` and `/readyz` (the
//! ones `--metrics` may expose to the network, which carry no user names or client addresses)
//! needs the [`CTL_HEADER`] header, reads as well as writes, and a loopback `Host`. A browser
//! cannot add that header to a cross-site request without a CORS preflight, which this endpoint
//! never grants, and DNS rebinding fails the `Host` check. It is not a secret: it does not keep
//! out a local user who sends it (loopback is the boundary for that).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
};
use tracing::{debug, warn};

use super::{ask, AdminRequest, DisconnectTarget, Disconnected};

/// Longest request head accepted (hyper's minimum); the admin API has no request bodies.
const MAX_REQUEST: usize = 8192;
/// A client that has not sent its whole request head by then is dropped (slow-loris).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the core's answer (e.g. metrics while the workers are busy).
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not take the answer by then is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once per listener; `relay ctl` and a scraper need a handful.
pub const MAX_CONNECTIONS: usize = 32;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Every route, for `relay ctl`: loopback only.
    Admin,
    /// `GET /metrics`, `/healthz`, `/readyz` only (`--metrics`): may face the network.
    ReadOnly,
}

/// Binds the admin endpoint. Non-loopback addresses are refused: the API has no
/// authentication, so it must only be reachable from the host itself.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--admin {addr}: the admin endpoint has no authentication and must stay on loopback"
    );
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on admin address {addr}: {e}"))
}

/// Binds the read-only metrics and health endpoint (`--metrics`), on any address.
pub async fn bind_read_only(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on metrics address {addr}: {e}"))
}

/// Serves requests until the core goes away.
pub async fn serve(listener: TcpListener, core: mpsc::Sender<AdminRequest>, exposure: Exposure) {
    // Per listener, so a flood of the network-facing `--metrics` port leaves `relay ctl` alone.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refuse_busy(&stream, from);
            continue;
        };
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, core, exposure).await {
                debug!(%from, %error, "admin request failed");
            }
            drop(slot);
        });
    }
}

/// Over the cap: one non-blocking try to say so, then the connection is closed.
fn refuse_busy(stream: &TcpStream, from: SocketAddr) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
        Content-Length: 40\r\nConnection: close\r\n\r\n{\"error\": \"too many admin connections\"}\n";
    debug!(%from, "admin connection refused: {MAX_CONNECTIONS} already open");
    // A fresh socket's send buffer takes this whole; if not, the client just sees the close.
    let _ = stream.try_write(BUSY);
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned()),
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }
}

impl Response {
    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(self.content_type),
        );
        response
    }
}

/// Serves the one request of a connection; hyper drops a client whose head is late
/// ([`REQUEST_TIMEOUT`]), the overall bound covers a client that does not take the answer.
async fn handle(
    stream: TcpStream,
    core: mpsc::Sender<AdminRequest>,
    exposure: Exposure,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let core = core.clone();
        async move { Ok::<_, Infallible>(answer(&request, &core, exposure).await.into_hyper()) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::time::timeout(
        REQUEST_TIMEOUT + HANDLER_TIMEOUT + WRITE_TIMEOUT,
        connection,
    )
    .await
    .map_err(|_| "connection timeout")??;
    Ok(())
}

/// The answer to one request, after the access checks of `exposure`.
async fn answer(
    request: &hyper::Request<Incoming>,
    core: &mpsc::Sender<AdminRequest>,
    exposure: Exposure,
) -> Response {
    let method = request.method().as_str();
    let path = request.uri().path();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    let ctl_header = request.headers().contains_key(CTL_HEADER);
    let routed = match exposure {
        // Read-only: no state changes and nothing per user, so no Host or header checks.
        Exposure::ReadOnly => {
            return tokio::time::timeout(HANDLER_TIMEOUT, read_only_route(method, path, core))
                .await
                .unwrap_or_else(|_| Response::error(503, "the relay did not answer in time"))
        }
        Exposure::Admin if !host.as_deref().is_some_and(local_host) => {
            return Response::error(
                403,
                "the admin endpoint answers only requests for a loopback host",
            )
        }
        Exposure::Admin if !ctl_header && !public_route(path) => {
            return Response::error(
                403,
                "admin requests need the X-Relay-Ctl header (use relay ctl)",
            )
        }
        Exposure::Admin => route(method, path, core),
    };
    tokio::time::timeout(HANDLER_TIMEOUT, routed)
        .await
        .unwrap_or_else(|_| Response::error(503, "the relay did not answer in time"))
}

/// Routes the `--metrics` listener serves to anyone: nothing per user or per client.
fn public_route(path: &str) -> bool {
    matches!(path.trim_matches('/'), "metrics" | "healthz" | "readyz")
}

/// Header every admin request but the public ones must carry: browsers cannot add it to a
/// cross-site request without a CORS preflight, which this endpoint never grants.
pub const CTL_HEADER: &str = "x-relay-ctl";

/// Whether a Host header names this host by a loopback literal or `localhost` (any port):
/// anything else is a browser sent here by DNS rebinding.
fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn on_off(word: &str) -> Option<bool> {
    match word {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// The routes of the `--metrics` listener.
async fn read_only_route(method: &str, path: &str, core: &mpsc::Sender<AdminRequest>) -> Response {
    match (method, path.trim_matches('/')) {
        ("GET", "metrics" | "healthz" | "readyz") => route(method, path, core).await,
        (_, "metrics" | "healthz" | "readyz") => Response::error(405, "method not allowed"),
        _ => Response::error(
            404,
            "no such route (this listener serves /metrics, /healthz, /readyz)",
        ),
    }
}

async fn route(method: &str, path: &str, core: &mpsc::Sender<AdminRequest>) -> Response {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let unavailable = || Response::error(503, "the relay is shutting down");
    let applied = |result: Option<Result<(), String>>| match result {
        Some(Ok(())) => Response::json(200, &serde_json::json!({ "ok": true })),
        Some(Err(message)) => Response::error(409, &message),
        None => unavailable(),
    };
    match (method, segments.as_slice()) {
        ("GET", ["allocations"]) => match ask(core, AdminRequest::List).await {
            Some(list) => Response::json(200, &list),
            None => unavailable(),
        },
        ("GET", ["metrics"]) => match ask(core, AdminRequest::Metrics).await {
            Some(text) => Response {
                status: 200,
                content_type: crate::daemon::METRICS_CONTENT_TYPE,
                body: text,
            },
            None => unavailable(),
        },
        ("GET", [probe @ ("healthz" | "readyz")]) => match ask(core, AdminRequest::Health).await {
            Some(health) => {
                let ok = if *probe == "healthz" {
                    health.live
                } else {
                    health.ready
                };
                Response::json(if ok { 200 } else { 503 }, &health)
            }
            None => unavailable(),
        },
        ("POST", ["allocations", id, "fastpath", state]) => {
            let (Ok(allocation), Some(on)) = (id.parse::<u64>(), on_off(state)) else {
                return Response::error(400, "expected /allocations/<id>/fastpath/on|off");
            };
            applied(
                ask(core, |reply| AdminRequest::SetFastPath {
                    allocation,
                    on,
                    reply,
                })
                .await,
            )
        }
        ("POST", ["allocations", id, "disconnect"]) => {
            let Ok(allocation) = id.parse::<u64>() else {
                return Response::error(400, "expected /allocations/<id>/disconnect");
            };
            disconnect(core, DisconnectTarget::Allocation(allocation)).await
        }
        ("POST", ["users", name, "disconnect"]) => match percent_decode(name) {
            Some(user) if !user.is_empty() => disconnect(core, DisconnectTarget::User(user)).await,
            _ => Response::error(400, "expected /users/<percent-encoded name>/disconnect"),
        },
        ("POST", ["reload"]) => match ask(core, AdminRequest::Reload).await {
            Some(Ok(message)) => Response::json(200, &serde_json::json!({ "message": message })),
            Some(Err(message)) => Response::error(409, &message),
            None => unavailable(),
        },
        ("POST", ["drain"]) => drain_route(core, None).await,
        ("POST", ["drain", secs]) => match secs.parse::<u64>() {
            Ok(secs) => drain_route(core, Some(Duration::from_secs(secs))).await,
            Err(_) => Response::error(400, "expected /drain or /drain/<deadline seconds>"),
        },
        ("GET", ["status"]) => match ask(core, AdminRequest::Status).await {
            Some(status) => Response::json(200, &status),
            None => unavailable(),
        },
        ("POST", ["fastpath", "default", state]) => {
            let Some(on) = on_off(state) else {
                return Response::error(400, "expected /fastpath/default/on|off");
            };
            applied(ask(core, |reply| AdminRequest::SetDefault { on, reply }).await)
        }
        (_, ["allocations"] | ["metrics"] | ["healthz"] | ["readyz"] | ["reload"] | ["status"])
        | (_, ["drain"] | ["drain", _])
        | (_, ["allocations", _, "fastpath", _])
        | (_, ["allocations", _, "disconnect"])
        | (_, ["users", _, "disconnect"])
        | (_, ["fastpath", "default", _]) => Response::error(405, "method not allowed"),
        _ => Response::error(404, "no such route"),
    }
}

async fn drain_route(core: &mpsc::Sender<AdminRequest>, deadline: Option<Duration>) -> Response {
    match ask(core, |reply| AdminRequest::Drain { deadline, reply }).await {
        Some(status) => Response::json(200, &status),
        None => Response::error(503, "the relay is shutting down"),
    }
}

/// Ends allocations; 404 when there was none to end.
async fn disconnect(core: &mpsc::Sender<AdminRequest>, target: DisconnectTarget) -> Response {
    match ask(core, |reply| AdminRequest::Disconnect { target, reply }).await {
        Some(Ok(disconnected)) => Response::json(200, &Disconnected { disconnected }),
        Some(Err(message)) => Response::error(404, &message),
        None => Response::error(503, "the relay is shutting down"),
    }
}

/// `%XX` escapes of a path segment decoded; `None` for a broken escape or non-UTF-8 result.
pub fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `text` as a path segment: everything but RFC 3986 unreserved characters escaped.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{local_host, percent_decode, percent_encode};

    #[test]
    fn user_names_survive_the_path() {
        for name in ["alice", "1700000000:alice", "a b/c%d?e", "ünï", "x.y-z_~"] {
            assert_eq!(percent_decode(&percent_encode(name)).as_deref(), Some(name));
            assert!(!percent_encode(name).contains(['/', ' ', '?']));
        }
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("abc%4"), None);
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn only_loopback_hosts_are_local() {
        for host in [
            "127.0.0.1:3479",
            "localhost",
            "localhost:3479",
            "[::1]:3479",
            "127.0.0.2",
        ] {
            assert!(local_host(host), "{host}");
        }
        for host in [
            "evil.example:3479",
            "10.0.0.1",
            "[2001:db8::1]:80",
            "",
            "localhost.evil",
        ] {
            assert!(!local_host(host), "{host}");
        }
    }
}
