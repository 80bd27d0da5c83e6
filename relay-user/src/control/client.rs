//! `relay ctl`: talks to a running daemon's admin endpoint.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context};

use super::{AllocationList, AllocationView};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one request and returns the body of a 200 answer; other answers become errors that
/// carry the daemon's message.
pub fn request(admin: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&admin, TIMEOUT).with_context(|| {
        format!("cannot reach the relay's admin endpoint at {admin} (is `relay serve` running? see --admin)")
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nX-Relay-Ctl: 1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .context("reading the admin answer")?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed admin answer")?;
    if status != 200 {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        bail!("{message}");
    }
    Ok(body.to_owned())
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
