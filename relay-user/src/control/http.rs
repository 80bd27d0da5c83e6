//! The admin endpoint: a deliberately tiny HTTP/1.1 server (one request per connection) that
//! turns routes into [`AdminRequest`]s for the core task.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tracing::{debug, warn};

use super::{ask, AdminRequest};

/// Longest request head accepted; the admin API has no request bodies.
const MAX_REQUEST: usize = 8192;
/// A client that has not sent its request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Serves admin requests until the core goes away.
pub async fn serve(listener: TcpListener, core: mpsc::Sender<AdminRequest>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, core).await {
                debug!(%from, %error, "admin request failed");
            }
        });
    }
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

async fn handle(mut stream: TcpStream, core: mpsc::Sender<AdminRequest>) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timeout"))??;
    let response = match head {
        Some((method, path)) => route(&method, &path, &core).await,
        None => Response::error(400, "malformed request"),
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(response.body.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the end of the request head; returns (method, path).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<(String, String)>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    let text = String::from_utf8_lossy(&buf);
    let mut parts = text.lines().next().unwrap_or_default().split_whitespace();
    Ok(match (parts.next(), parts.next()) {
        (Some(method), Some(path)) => Some((method.to_owned(), path.to_owned())),
        _ => None,
    })
}

fn on_off(word: &str) -> Option<bool> {
    match word {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
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
                content_type: "text/plain; version=0.0.4",
                body: text,
            },
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
        ("POST", ["fastpath", "default", state]) => {
            let Some(on) = on_off(state) else {
                return Response::error(400, "expected /fastpath/default/on|off");
            };
            applied(ask(core, |reply| AdminRequest::SetDefault { on, reply }).await)
        }
        (_, ["allocations"] | ["metrics"])
        | (_, ["allocations", _, "fastpath", _])
        | (_, ["fastpath", "default", _]) => Response::error(405, "method not allowed"),
        _ => Response::error(404, "no such route"),
    }
}
