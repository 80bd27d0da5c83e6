//! `relay ctl`: talks to a running daemon's admin endpoint.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header;
use hyper_util::rt::TokioIo;

use super::{AllocationList, AllocationView};

/// For connecting; the answer may take up to the daemon's own handler timeout, and a little.
const TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends one request and returns the body of a 200 answer; other answers become errors that
/// carry the daemon's message.
pub fn request(admin: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    // One request per command: a current-thread runtime is all hyper needs here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin client")?;
    runtime.block_on(exchange(admin, method, path))
}

async fn exchange(admin: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    let unreachable = || {
        format!("cannot reach the relay's admin endpoint at {admin} (is `relay serve` running? see --admin)")
    };
    let stream = match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(admin)).await {
        Ok(connected) => connected.with_context(unreachable)?,
        Err(_) => bail!("{}: connection timed out", unreachable()),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("talking to the admin endpoint")?;
    // Drives the connection while the request below waits for its answer.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, admin.to_string())
        .header(super::http::CTL_HEADER, "1")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .context("building the admin request")?;
    let answer = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) = tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| anyhow::anyhow!("the admin endpoint at {admin} did not answer in time"))?
        .context("reading the admin answer")?;
    if status != 200 {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        bail!("{message}");
    }
    Ok(body)
}

/// `relay ctl allocations [--json]`.
pub fn allocations(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let body = request(admin, "GET", "/allocations")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let list: AllocationList =
        serde_json::from_str(&body).context("unexpected answer from the admin endpoint")?;
    print!("{}", render(&list));
    Ok(())
}

/// The human-readable allocation table.
pub fn render(list: &AllocationList) -> String {
    let mut out = format!(
        "fast path: {}; default for allocations: {}\n",
        if list.fastpath_attached {
            "attached"
        } else {
            "not attached (--fastpath off)"
        },
        if list.fastpath_default { "on" } else { "off" }
    );
    let header = [
        "ID",
        "USER",
        "CLIENT",
        "RELAYED",
        "PEERS",
        "CHANNELS",
        "PATH",
        "SOCKET PKTS",
        "SOCKET BYTES",
        "KERNEL PKTS",
        "KERNEL BYTES",
        "EXPIRES",
        // Last, so scripts that count columns keep working: the address the client contacted
        // (RFC 8656 §2 5-tuple), which tells apart the addresses a wildcard listener serves.
        "LISTENER",
        // The client's transport (udp, tcp, tls): stream clients are always on the socket path.
        "TRANSPORT",
    ];
    let rows: Vec<[String; 14]> = list.allocations.iter().map(row).collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = cells
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    out.push_str(&line(&header.map(str::to_owned)));
    for r in &rows {
        out.push_str(&line(r));
    }
    if rows.is_empty() {
        out.push_str("(no allocations)\n");
    }
    out
}

fn row(a: &AllocationView) -> [String; 14] {
    let channels = a
        .channels
        .iter()
        .map(|c| format!("{:#06x}->{}", c.number, c.peer))
        .collect::<Vec<_>>()
        .join(",");
    [
        a.id.to_string(),
        a.user.clone(),
        a.client.clone(),
        // Every relayed address: a dual allocation has two.
        std::iter::once(&a.relayed)
            .chain(&a.relayed_additional)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(","),
        if a.peers.is_empty() {
            "-".to_owned()
        } else {
            a.peers.join(",")
        },
        if channels.is_empty() {
            "-".to_owned()
        } else {
            channels
        },
        a.path.clone(),
        a.socket.packets().to_string(),
        a.socket.bytes().to_string(),
        a.kernel.packets().to_string(),
        a.kernel.bytes().to_string(),
        format!("{}s", a.expires_in_secs),
        a.listener.clone(),
        a.transport.clone(),
    ]
}

/// `relay ctl fastpath on|off ALLOCATION` and `relay ctl fastpath default on|off`.
/// `relay ctl reload`.
pub fn reload(admin: SocketAddr) -> anyhow::Result<()> {
    let body = request(admin, "POST", "/reload")?;
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or(body);
    println!("{message}");
    Ok(())
}

/// `relay ctl disconnect ALLOCATION` and `relay ctl disconnect --user NAME`: ends the
/// allocation(s) and prints which; an unknown allocation or user is an error.
pub fn disconnect(
    admin: SocketAddr,
    allocation: Option<u64>,
    user: Option<&str>,
) -> anyhow::Result<()> {
    let path = match (allocation, user) {
        (Some(id), None) => format!("/allocations/{id}/disconnect"),
        (None, Some(user)) => format!("/users/{}/disconnect", super::http::percent_encode(user)),
        _ => bail!("usage: relay ctl disconnect ALLOCATION, or relay ctl disconnect --user NAME"),
    };
    let body = request(admin, "POST", &path)?;
    let answer: super::Disconnected =
        serde_json::from_str(&body).context("unexpected answer from the admin endpoint")?;
    let ids: Vec<String> = answer.disconnected.iter().map(u64::to_string).collect();
    println!("disconnected allocation(s) {}", ids.join(", "));
    Ok(())
}

pub fn fastpath(admin: SocketAddr, first: &str, second: &str) -> anyhow::Result<()> {
    let state = |word: &str| match word {
        "on" | "off" => Ok(word.to_owned()),
        other => bail!("expected `on` or `off`, got `{other}`"),
    };
    let path = if first == "default" {
        format!("/fastpath/default/{}", state(second)?)
    } else {
        let state = state(first).context(
            "usage: relay ctl fastpath on|off ALLOCATION, or relay ctl fastpath default on|off",
        )?;
        let id: u64 = second.parse().with_context(|| {
            format!("`{second}` is not an allocation id (see `relay ctl allocations`)")
        })?;
        format!("/allocations/{id}/fastpath/{state}")
    };
    request(admin, "POST", &path)?;
    println!("ok");
    Ok(())
}
