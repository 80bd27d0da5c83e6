//! The stream-client variant's results: medians over the rounds, relay / coturn ratios, the
//! issue's target, and the table, JSON and SVG data.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::{json, Value};

use super::{
    first_line, opt_k, share, FloodMeasure, HandshakeMeasure, StreamResults, StreamServer,
    StreamTransport, GENERATOR_LIMIT_SHARE, PAYLOAD, TCP_PORT, TLS_PORT,
};
use crate::bench::runner::PathKind;

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians over the rounds of one (server, transport, connections) flood.
struct FloodSummary {
    server: StreamServer,
    transport: StreamTransport,
    connections: usize,
    p2c: bool,
    pps: f64,
    offered_pps: f64,
    pps_per_core: Option<f64>,
    core_share: f64,
    core_busy_share: f64,
    process_ns_per_pkt: Option<f64>,
    generator_share: Option<f64>,
    lost: u64,
    far_end_drops: u64,
    /// Delivered plus what the far end dropped: what the server itself relayed.
    server_sent_pps: f64,
    runs: usize,
}

fn flood_summaries(r: &StreamResults) -> Vec<FloodSummary> {
    type Key = (StreamTransport, bool, usize, StreamServer);
    let mut groups: BTreeMap<Key, Vec<&FloodMeasure>> = BTreeMap::new();
    for (_, server, transport, connections, m) in &r.floods {
        groups
            .entry((*transport, m.p2c, *connections, *server))
            .or_default()
            .push(m);
    }
    groups
        .into_iter()
        .map(|((transport, p2c, connections, server), ms)| FloodSummary {
            server,
            transport,
            connections,
            p2c,
            pps: median(ms.iter().map(|m| m.pps()).collect()).unwrap_or(0.0),
            offered_pps: median(
                ms.iter()
                    .map(|m| m.offered as f64 / m.window_s.max(1e-9))
                    .collect(),
            )
            .unwrap_or(0.0),
            pps_per_core: median(ms.iter().filter_map(|m| m.pps_per_core()).collect()),
            core_share: median(ms.iter().map(|m| m.core_share()).collect()).unwrap_or(0.0),
            core_busy_share: median(ms.iter().map(|m| m.core_busy_share()).collect())
                .unwrap_or(0.0),
            process_ns_per_pkt: median(
                ms.iter()
                    .filter_map(|m| {
                        m.process_cpu_ns
                            .map(|ns| ns as f64 / m.delivered.max(1) as f64)
                    })
                    .collect(),
            ),
            generator_share: median(ms.iter().filter_map(|m| m.generator_share()).collect()),
            // Over a window in steady state, frames written but not relayed are what the
            // server lost (or still held): a hint, not an exact count.
            lost: ms
                .iter()
                .map(|m| m.offered.saturating_sub(m.delivered))
                .sum(),
            far_end_drops: ms.iter().map(|m| m.far_end_drops).sum(),
            server_sent_pps: median(
                ms.iter()
                    .map(|m| (m.delivered + m.far_end_drops) as f64 / m.window_s.max(1e-9))
                    .collect(),
            )
            .unwrap_or(0.0),
            runs: ms.len(),
        })
        .collect()
}

struct HandshakeSummary {
    server: StreamServer,
    transport: StreamTransport,
    per_s: f64,
    per_core_s: Option<f64>,
    core_share: f64,
    core_busy_share: f64,
    process_ns_per_handshake: Option<f64>,
    generator_share: Option<f64>,
    failed: u64,
    first_error: Option<String>,
    tls: Option<String>,
    runs: usize,
}

fn handshake_summaries(r: &StreamResults) -> Vec<HandshakeSummary> {
    let mut groups: BTreeMap<(StreamTransport, StreamServer), Vec<&HandshakeMeasure>> =
        BTreeMap::new();
    for (_, server, transport, h) in &r.handshakes {
        groups.entry((*transport, *server)).or_default().push(h);
    }
    groups
        .into_iter()
        .map(|((transport, server), hs)| HandshakeSummary {
            server,
            transport,
            per_s: median(hs.iter().map(|h| h.per_s()).collect()).unwrap_or(0.0),
            per_core_s: median(hs.iter().filter_map(|h| h.per_core_s()).collect()),
            core_share: median(hs.iter().map(|h| h.core_share()).collect()).unwrap_or(0.0),
            core_busy_share: median(
                hs.iter()
                    .map(|h| h.core_cpu_ns as f64 / 1e9 / h.window_s.max(1e-9))
                    .collect(),
            )
            .unwrap_or(0.0),
            process_ns_per_handshake: median(
                hs.iter()
                    .filter_map(|h| {
                        h.process_cpu_ns
                            .map(|ns| ns as f64 / h.completed.max(1) as f64)
                    })
                    .collect(),
            ),
            generator_share: median(hs.iter().filter_map(|h| h.generator_share()).collect()),
            failed: hs.iter().map(|h| h.failed).sum(),
            first_error: hs.iter().find_map(|h| h.first_error.clone()),
            tls: hs.iter().find_map(|h| h.tls.clone()),
            runs: hs.len(),
        })
        .collect()
}

/// relay / coturn for every figure both have, keyed like "tcp_x1_relayed_pps_per_core".
fn ratios(r: &StreamResults) -> BTreeMap<String, f64> {
    let floods = flood_summaries(r);
    let hs = handshake_summaries(r);
    let mut out = BTreeMap::new();
    let mut put = |key: String, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            if b > 0.0 {
                out.insert(key, a / b);
            }
        }
    };
    for f in floods.iter().filter(|f| f.server == StreamServer::Relay) {
        let Some(c) = floods.iter().find(|c| {
            c.server == StreamServer::Coturn
                && c.transport == f.transport
                && c.connections == f.connections
                && c.p2c == f.p2c
        }) else {
            continue;
        };
        let key = format!(
            "{}_x{}{}",
            f.transport.name(),
            f.connections,
            if f.p2c { "_p2c" } else { "" }
        );
        put(format!("{key}_relayed_pps"), Some(f.pps), Some(c.pps));
        put(
            format!("{key}_relayed_pps_per_core"),
            f.pps_per_core,
            c.pps_per_core,
        );
    }
    for h in hs.iter().filter(|h| h.server == StreamServer::Relay) {
        let Some(c) = hs
            .iter()
            .find(|c| c.server == StreamServer::Coturn && c.transport == h.transport)
        else {
            continue;
        };
        let key = h.transport.name();
        put(
            format!("{key}_handshakes_per_s"),
            Some(h.per_s),
            Some(c.per_s),
        );
        put(
            format!("{key}_handshakes_per_core_s"),
            h.per_core_s,
            c.per_core_s,
        );
    }
    out
}

/// The target per transport: relay >= 2x coturn on relayed pps per relay core, at
/// every connection count both ran. None when either side has no figure.
fn target(r: &StreamResults) -> BTreeMap<&'static str, Option<bool>> {
    let ratios = ratios(r);
    [StreamTransport::Tcp, StreamTransport::Tls]
        .into_iter()
        .map(|t| {
            let prefix = format!("{}_x", t.name());
            let mine: Vec<f64> = ratios
                .iter()
                .filter(|(k, _)| {
                    k.starts_with(&prefix)
                        && !k.contains("_p2c")
                        && k.ends_with("_relayed_pps_per_core")
                })
                .map(|(_, v)| *v)
                .collect();
            (
                t.name(),
                (!mine.is_empty()).then(|| mine.iter().all(|v| *v >= 2.0)),
            )
        })
        .collect()
}

/// One group of the SVG's stream panel: its label ("tcp x1") and each server's relayed pps
/// per relay core (by the path whose colour it takes; None: n/a).
pub type SvgGroup = (String, Vec<(PathKind, Option<f64>)>);

/// The SVG's stream panel: its groups, and one line of handshakes per second per server and
/// transport.
pub fn svg_data(r: &StreamResults) -> (Vec<SvgGroup>, Vec<String>) {
    let floods = flood_summaries(r);
    let mut groups: Vec<SvgGroup> = Vec::new();
    let Some(plan) = &r.plan else {
        return (groups, Vec::new());
    };
    for &transport in &plan.transports {
        for &connections in &plan.connections {
            let bars = r
                .servers
                .iter()
                .map(|&server| {
                    let v = floods
                        .iter()
                        .find(|f| {
                            f.server == server
                                && f.transport == transport
                                && f.connections == connections
                                && !f.p2c
                        })
                        .and_then(|f| f.pps_per_core);
                    (server.path(), v)
                })
                .collect();
            groups.push((format!("{} x{connections}", transport.name()), bars));
        }
    }
    let lines = handshake_summaries(r)
        .iter()
        .map(|h| {
            format!(
                "{} {}: {:.0} handshakes/s ({} per relay core-s)",
                h.server.name(),
                h.transport.name(),
                h.per_s,
                h.per_core_s.map_or("-".to_owned(), |v| format!("{v:.0}"))
            )
        })
        .collect();
    (groups, lines)
}

/// The stream section of the terminal/markdown table.
pub fn table(r: &StreamResults) -> String {
    let mut t = String::new();
    if r.plan.is_none() {
        return t;
    }
    let _ = writeln!(
        t,
        "\nstream clients (TURN over TCP/TLS -> UDP peer), 120 B ChannelData client->peer:"
    );
    let _ = writeln!(
        t,
        "| server | transport | conns | direction | relayed kpps | kpps/relay core | server cpu | core busy | ns/pkt (process) | generator | offered kpps | fe drops |"
    );
    let _ = writeln!(
        t,
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for f in flood_summaries(r) {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {:.1} | {} | {:.0}% | {:.0}% | {} | {}{} | {:.1} | {} |",
            f.server.name(),
            f.transport.name(),
            f.connections,
            if f.p2c { "p>c" } else { "c>p" },
            f.pps / 1e3,
            opt_k(f.pps_per_core),
            100.0 * f.core_share,
            100.0 * f.core_busy_share,
            f.process_ns_per_pkt
                .map_or("-".to_owned(), |v| format!("{v:.0}")),
            share(f.generator_share),
            if f.generator_share.is_some_and(|g| g > GENERATOR_LIMIT_SHARE) {
                " (limit?)"
            } else {
                ""
            },
            f.offered_pps / 1e3,
            f.far_end_drops,
        );
    }
    let _ = writeln!(
        t,
        "\n| server | transport | handshakes/s | per relay core-s | server cpu | core busy | generator | failed |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|");
    for h in handshake_summaries(r) {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {} | {:.0}% | {:.0}% | {} | {} |",
            h.server.name(),
            h.transport.name(),
            h.per_s,
            h.per_core_s.map_or("-".to_owned(), |v| format!("{v:.0}")),
            100.0 * h.core_share,
            100.0 * h.core_busy_share,
            share(h.generator_share),
            h.failed
        );
    }
    let _ = writeln!(
        t,
        "(relayed: at the peer's sink in the window; fe drops: frames the relay namespace's veth \
         could not hand to the far end, summed over rounds: the server sent them, the far end on \
         the generator core lost them; server cpu: its threads + relay-side NAPI; core busy: \
         anything on the relay core; generator: its threads' share of the generator core)"
    );
    let ratios = ratios(r);
    if !ratios.is_empty() {
        let _ = writeln!(t, "\nrelay / coturn (same run):");
        for (k, v) in &ratios {
            let _ = writeln!(t, "  {k}: {v:.2}x");
        }
    }
    for (transport, met) in target(r) {
        let _ = writeln!(
            t,
            "  target relay >= 2x coturn relayed pps per core over {transport}: {}",
            match met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "no comparison (a side is unavailable)",
            }
        );
    }
    for (server, reason) in &r.unavailable {
        let _ = writeln!(
            t,
            "  {} stream: unavailable: {}",
            server.name(),
            first_line(reason)
        );
    }
    for note in &r.notes {
        let _ = writeln!(t, "  note: {}", first_line(note));
    }
    for ((server, transport), reason) in &r.not_applicable {
        let _ = writeln!(
            t,
            "  {} {}: n/a: {}",
            server.name(),
            transport.name(),
            first_line(reason)
        );
    }
    t
}

/// The stream section of bench.json.
pub fn json(r: &StreamResults) -> Value {
    let Some(plan) = &r.plan else {
        return Value::Null;
    };
    let availability: serde_json::Map<String, Value> = r
        .servers
        .iter()
        .map(|s| {
            let reason = r.unavailable.get(s);
            (
                s.name().to_owned(),
                json!({ "available": reason.is_none(), "reason": reason }),
            )
        })
        .collect();
    json!({
        "conditions": {
            "transports": plan.transports.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "connections": plan.connections,
            "payload_bytes": PAYLOAD,
            "warmup_seconds": plan.warmup.as_secs_f64(),
            "window_seconds": plan.window.as_secs_f64(),
            "handshake_workers": plan.handshake_workers,
            "settle": format!("before each measurement, up to {:.1} s until the relay core is \
                below 30 % busy over 100 ms (settle_s per run)", plan.settle_limit.as_secs_f64()),
            "peer_to_client": plan.p2c.then_some("after each client->peer flood, the peer sends \
                120 B datagrams to the relayed addresses paced at 1.5x that flood's relayed rate \
                (socket generator, generator core); the clients read the streams and count the \
                ChannelData (generator core too: its share covers both threads)"),
            "ports": { "tcp": TCP_PORT, "tls": TLS_PORT },
            "relay": "relay serve --fastpath off (the socket path serves stream clients) with \
                      --listen-tcp, --listen-tls, --tls-cert, --tls-key",
            "coturn": "turnserver with TCP on its listening port and TLS on --tls-listening-port \
                       (--cert/--pkey)",
            "generator": "one thread on the generator core writing 128-frame batches of \
                          ChannelData to every connection, non-blocking (rustls with ring for \
                          TLS); handshakes from threads on the generator core, each a new \
                          connection from the next client address, TLS without resumption",
            "tls_client": "rustls (ring), TLS 1.2/1.3, certificate pinned, handshake signature \
                           not verified (so the generator core is not the limit)",
            "certificate": "self-signed ECDSA P-256 made at run time (rcgen), removed afterwards",
            "measured": "over a window after a warm-up, while the generator still runs: \
                         datagrams at the peer's far-end sink, the relay core's busy time \
                         (/proc/stat), the server's and the generator's thread CPU time \
                         (schedstat)",
            "per_core": "relayed datagrams (or completed handshakes) per second of the server's \
                         CPU time: its threads plus the relay-side veth NAPI threads (where its \
                         TCP receive work runs), all pinned to the relay core; the core's own \
                         busy share (relay_core_busy_share) also counts other jobs on a shared \
                         machine",
        },
        "availability": availability,
        "floods": r.floods.iter().map(|(round, server, transport, connections, m)| json!({
            "round": round,
            "server": server.name(),
            "transport": transport.name(),
            "connections": connections,
            "window_s": m.window_s,
            "offered": m.offered,
            "delivered": m.delivered,
            "delivered_pps": m.pps(),
            "relayed_pps_per_core": m.pps_per_core(),
            "relay_core_busy_ns": m.core_cpu_ns,
            "process_cpu_ns": m.process_cpu_ns,
            "server_cpu_ns": m.server_cpu_ns,
            "far_end_drops": m.far_end_drops,
            "generator_cpu_ns": m.generator_cpu_ns,
            "direction": if m.p2c { "peer->client" } else { "client->peer" },
            "sent_total": m.total_frames,
            "settle_s": m.settle_s,
        })).collect::<Vec<_>>(),
        "summary": flood_summaries(r).iter().map(|f| json!({
            "server": f.server.name(),
            "transport": f.transport.name(),
            "connections": f.connections,
            "direction": if f.p2c { "peer->client" } else { "client->peer" },
            "delivered_pps": f.pps,
            "offered_pps": f.offered_pps,
            "relayed_pps_per_core": f.pps_per_core,
            "server_cpu_share": f.core_share,
            "relay_core_busy_share": f.core_busy_share,
            "process_cpu_ns_per_packet": f.process_ns_per_pkt,
            "generator_cpu_share": f.generator_share,
            "generator_limited": f.generator_share.map(|g| g > GENERATOR_LIMIT_SHARE),
            "written_not_relayed": f.lost,
            "far_end_drops": f.far_end_drops,
            "sent_by_server_pps": f.server_sent_pps,
            "runs": f.runs,
        })).collect::<Vec<_>>(),
        "handshake_runs": r.handshakes.iter().map(|(round, server, transport, h)| json!({
            "round": round,
            "server": server.name(),
            "transport": transport.name(),
            "window_s": h.window_s,
            "completed": h.completed,
            "failed": h.failed,
            "first_error": h.first_error,
            "relay_core_busy_ns": h.core_cpu_ns,
            "process_cpu_ns": h.process_cpu_ns,
            "server_cpu_ns": h.server_cpu_ns,
            "latency_us": h.latency_us.map(|(p50, p99, max)| json!({
                "p50": p50, "p99": p99, "max": max,
            })),
            "generator_cpu_ns": h.generator_cpu_ns,
            "settle_s": h.settle_s,
        })).collect::<Vec<_>>(),
        "handshakes": handshake_summaries(r).iter().map(|h| json!({
            "server": h.server.name(),
            "transport": h.transport.name(),
            "per_s": h.per_s,
            "per_relay_core_s": h.per_core_s,
            "server_cpu_share": h.core_share,
            "relay_core_busy_share": h.core_busy_share,
            "process_cpu_ns_per_handshake": h.process_ns_per_handshake,
            "generator_cpu_share": h.generator_share,
            "generator_limited": h.generator_share.map(|g| g > GENERATOR_LIMIT_SHARE),
            "failed": h.failed,
            "first_error": h.first_error,
            "tls": h.tls,
            "runs": h.runs,
        })).collect::<Vec<_>>(),
        "ratios_relay_over_coturn": ratios(r),
        "target": "relay >= 2x coturn 4.6.1 on relayed pps (per relay core) over TCP and TLS",
        "target_met": target(r),
        "notes": r.notes,
        "not_applicable": r.not_applicable.iter().map(|((s, t), reason)| json!({
            "server": s.name(),
            "transport": t.name(),
            "reason": reason,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flood_m(delivered: u64, core_ms: u64) -> FloodMeasure {
        FloodMeasure {
            window_s: 1.0,
            offered: delivered,
            delivered,
            server_cpu_ns: Some(core_ms * 1_000_000),
            ..FloodMeasure::default()
        }
    }

    #[test]
    fn ratios_and_target_compare_relay_with_coturn_per_core() {
        let mut r = StreamResults::default();
        for (server, pps, core_ms) in [
            (StreamServer::Relay, 300_000, 1000),
            (StreamServer::Coturn, 100_000, 500),
        ] {
            r.floods
                .push((0, server, StreamTransport::Tcp, 1, flood_m(pps, core_ms)));
        }
        // TLS: the relay only 1.5x per core.
        for (server, pps) in [
            (StreamServer::Relay, 150_000),
            (StreamServer::Coturn, 100_000),
        ] {
            r.floods
                .push((0, server, StreamTransport::Tls, 1, flood_m(pps, 1000)));
        }
        let ratios = ratios(&r);
        assert!((ratios["tcp_x1_relayed_pps"] - 3.0).abs() < 1e-9);
        // 300k per core-second against 200k.
        assert!((ratios["tcp_x1_relayed_pps_per_core"] - 1.5).abs() < 1e-9);
        assert!((ratios["tls_x1_relayed_pps_per_core"] - 1.5).abs() < 1e-9);
        let target = target(&r);
        assert_eq!(target["tcp"], Some(false));
        assert_eq!(target["tls"], Some(false));
        r.floods.retain(|f| f.1 == StreamServer::Relay);
        assert_eq!(super::target(&r)["tcp"], None);
    }
}
