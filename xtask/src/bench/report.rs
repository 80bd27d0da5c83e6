//! Results: the terminal table, the JSON file, and a hand-written SVG bar chart.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::{json, Value};

use super::{
    measure::LatencyStats,
    peak::Peak,
    runner::{Ctx, Framing, Measurement, PathKind, Variant},
    Plan,
};

pub struct Run {
    pub round: usize,
    pub path: PathKind,
    pub variant: Variant,
    pub m: Measurement,
}

pub struct Results {
    pub conditions: Value,
    pub runs: Vec<Run>,
    pub latency: Vec<(usize, PathKind, LatencyStats)>,
    /// Peak zero-loss searches, per round, path and (client->peer ChannelData) variant.
    pub peaks: Vec<(usize, PathKind, Variant, Peak)>,
    /// None: available; Some(reason): unavailable.
    pub availability: BTreeMap<PathKind, Option<String>>,
    /// Variants a path does not run, with the reason: the minimal forwarders' both-directions
    /// and Send ones (`Variant::not_applicable`), and those a server refused the allocations for.
    pub not_applicable: Vec<(PathKind, Variant, String)>,
    /// The stream-client variant (TCP/TLS clients), relay and coturn.
    pub stream: super::stream::StreamResults,
    pub elapsed_s: f64,
}

impl Results {
    pub fn new(plan: &Plan, ctx: &Ctx, generator: &str, notes: &[String]) -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let coturn = std::process::Command::new(&ctx.coturn_bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Self {
            conditions: json!({
                "mode": plan.mode,
                "rounds": plan.rounds,
                "flood_seconds": plan.duration.as_secs_f64(),
                "latency_seconds": plan.latency_duration.as_secs_f64(),
                "latency_rate_pps": ctx.latency_rate,
                "peak_search": {
                    "steps": plan.search.steps,
                    "trial_seconds": plan.search.trial.as_secs_f64(),
                    "max_loss_percent": 100.0 * super::peak::MAX_LOSS,
                    "method": "after each client->peer ChannelData flood: paced socket-generator \
                               trials, log-space bisection from 1.25x that flood's goodput down \
                               to 1/32 of it; the first trial offers the top; a passing trial \
                               the generator could not offer in full ends the search (lower \
                               bound)",
                },
                "generator": generator,
                "generator_cpu": ctx.gen_cpu,
                "server_cpu": ctx.relay_cpu,
                "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
                "cpu_model": cpu_model,
                "kernel": kernel.trim(),
                "coturn": coturn,
                "coturn_bin": ctx.coturn_bin.display().to_string(),
                "coturn_args": ctx.coturn_args,
                "relay_bin": ctx.relay_bin.display().to_string(),
                "lab_notes": notes,
                "topology": "client ns c0 198.18.1.2-64 <-veth-> relay ns 198.18.1.1 | 198.18.2.1 <-veth-> peer ns 198.18.2.2; ip_forward off; tx checksum offload off on c0/p0; GRO + threaded NAPI on all veth ends (far ends c0/p0: SCHED_FIFO on the generator core)",
                "delivered": "receiving namespace /proc/net/snmp: Ip InDelivers - Icmp InMsgs - Udp NoPorts - Udp InCsumErrors (Udp InDatagrams only counts datagrams a socket has read)",
            }),
            runs: Vec::new(),
            latency: Vec::new(),
            peaks: Vec::new(),
            availability: BTreeMap::new(),
            not_applicable: Vec::new(),
            stream: Default::default(),
            elapsed_s: 0.0,
        }
    }

    /// Records that `path` cannot run `variant` (once: the first round's reason is kept).
    pub fn set_not_applicable(&mut self, path: PathKind, variant: Variant, reason: String) {
        if !self
            .not_applicable
            .iter()
            .any(|(p, v, _)| *p == path && *v == variant)
        {
            self.not_applicable.push((path, variant, reason));
        }
    }

    fn not_applicable_reason(&self, path: PathKind, variant: Variant) -> Option<&str> {
        self.not_applicable
            .iter()
            .find(|(p, v, _)| *p == path && *v == variant)
            .map(|(_, _, r)| r.as_str())
    }

    /// (path, variant) → runs, in a stable order.
    fn groups(&self) -> BTreeMap<(Variant, PathKind), Vec<&Measurement>> {
        let mut out: BTreeMap<(Variant, PathKind), Vec<&Measurement>> = BTreeMap::new();
        for run in &self.runs {
            out.entry((run.variant, run.path)).or_default().push(&run.m);
        }
        out
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Summary {
    path: PathKind,
    variant: Variant,
    median_pps: f64,
    min_pps: f64,
    max_pps: f64,
    offered_pps: f64,
    loss_pct: f64,
    relay_drops: u64,
    csum_errors: u64,
    far_end_drops: u64,
    process_ns_per_pkt: Option<f64>,
    core_ns_per_pkt: f64,
    bpf_ns_per_run: Option<f64>,
    /// Delivered rate relative to the generator ceiling for the same payload and flows.
    of_ceiling: Option<f64>,
    /// Peak zero-loss rate, median over rounds, when searched.
    peak: Option<PeakSummary>,
}

struct PeakSummary {
    median_pps: f64,
    min_pps: f64,
    max_pps: f64,
    /// Some round's search ended at its top or at the generator's reach: "at least".
    lower_bound: bool,
    generator_limited: bool,
    trials: usize,
}

fn peak_summary(results: &Results, path: PathKind, variant: Variant) -> Option<PeakSummary> {
    let peaks: Vec<&Peak> = results
        .peaks
        .iter()
        .filter(|(_, p, v, _)| *p == path && *v == variant)
        .map(|(_, _, _, peak)| peak)
        .collect();
    if peaks.is_empty() {
        return None;
    }
    let rates: Vec<f64> = peaks.iter().map(|p| p.rate_pps).collect();
    Some(PeakSummary {
        median_pps: median(rates.clone()),
        min_pps: rates.iter().copied().fold(f64::INFINITY, f64::min),
        max_pps: rates.iter().copied().fold(0.0, f64::max),
        lower_bound: peaks.iter().any(|p| p.lower_bound),
        generator_limited: peaks.iter().any(|p| p.generator_limited),
        trials: peaks.iter().map(|p| p.trials.len()).sum(),
    })
}

/// "0.312", or ">=0.812" when the search could not go higher (Mpps).
fn peak_cell(p: &PeakSummary) -> String {
    format!(
        "{}{:.3}",
        if p.lower_bound { ">=" } else { "" },
        p.median_pps / 1e6
    )
}

fn summaries(results: &Results) -> Vec<Summary> {
    let groups = results.groups();
    let ceiling = |v: Variant| -> Option<f64> {
        let key = (Variant { bidi: false, ..v }, PathKind::Generator);
        groups
            .get(&key)
            .map(|ms| median(ms.iter().map(|m| m.pps()).collect()))
    };
    groups
        .iter()
        .map(|(&(variant, path), ms)| {
            let pps: Vec<f64> = ms.iter().map(|m| m.pps()).collect();
            let per_pkt = |ns: u64, m: &Measurement| ns as f64 / m.delivered().max(1) as f64;
            let sent: u64 = ms.iter().map(|m| m.sent()).sum();
            let delivered: u64 = ms.iter().map(|m| m.delivered()).sum();
            let process: Vec<f64> = ms
                .iter()
                .filter_map(|m| m.process_cpu_ns.map(|ns| per_pkt(ns, m)))
                .collect();
            let bpf: Vec<f64> = ms
                .iter()
                .filter_map(|m| match (m.bpf_run_ns, m.bpf_runs) {
                    (Some(ns), Some(runs)) if runs > 0 => Some(ns as f64 / runs as f64),
                    _ => None,
                })
                .collect();
            let median_pps = median(pps.clone());
            // The ceiling is one direction; both-directions runs have two generators.
            let of_ceiling = (path != PathKind::Generator && !variant.bidi)
                .then(|| ceiling(variant))
                .flatten()
                .filter(|c| *c > 0.0)
                .map(|c| median_pps / c);
            Summary {
                path,
                variant,
                median_pps,
                min_pps: pps.iter().copied().fold(f64::INFINITY, f64::min),
                max_pps: pps.iter().copied().fold(0.0, f64::max),
                offered_pps: median(ms.iter().map(|m| m.offered_pps()).collect()),
                loss_pct: 100.0 * sent.saturating_sub(delivered) as f64 / sent.max(1) as f64,
                relay_drops: ms.iter().map(|m| m.relay_rcvbuf_errors).sum(),
                csum_errors: ms.iter().map(|m| m.csum_errors).sum(),
                far_end_drops: ms.iter().map(|m| m.far_end_drops).sum(),
                process_ns_per_pkt: (!process.is_empty()).then(|| median(process)),
                core_ns_per_pkt: median(ms.iter().map(|m| per_pkt(m.core_cpu_ns, m)).collect()),
                bpf_ns_per_run: (!bpf.is_empty()).then(|| median(bpf)),
                of_ceiling,
                peak: peak_summary(results, path, variant),
            }
        })
        .collect()
}

fn latency_summary(results: &Results) -> BTreeMap<PathKind, (f64, f64, f64, u64, u64)> {
    let mut by_path: BTreeMap<PathKind, Vec<&LatencyStats>> = BTreeMap::new();
    for (_, path, l) in &results.latency {
        by_path.entry(*path).or_default().push(l);
    }
    by_path
        .into_iter()
        .map(|(path, ls)| {
            (
                path,
                (
                    median(ls.iter().map(|l| l.p50_us).collect()),
                    median(ls.iter().map(|l| l.p99_us).collect()),
                    ls.iter().map(|l| l.max_us).fold(0.0, f64::max),
                    ls.iter().map(|l| l.sent).sum(),
                    ls.iter().map(|l| l.received).sum(),
                ),
            )
        })
        .collect()
}

/// Ratios the issue asks for, at 120 B, one flow, client→peer.
fn ratios(sums: &[Summary]) -> BTreeMap<&'static str, f64> {
    let at = |path| {
        sums.iter()
            .find(|s| {
                s.path == path
                    && s.variant.payload == 120
                    && s.variant.flows == 1
                    && !s.variant.bidi
                    && !s.variant.is_send()
            })
            .map(|s| s.median_pps)
            .filter(|p| *p > 0.0)
    };
    let mut out = BTreeMap::new();
    let pairs = [
        ("socket_over_coturn", PathKind::Socket, PathKind::Coturn),
        (
            "socket_over_reference",
            PathKind::Socket,
            PathKind::Reference,
        ),
        ("xdp_over_socket", PathKind::Xdp, PathKind::Socket),
        ("tc_over_socket", PathKind::Tc, PathKind::Socket),
        (
            "socket_over_generator_ceiling",
            PathKind::Socket,
            PathKind::Generator,
        ),
        (
            "xdp_over_generator_ceiling",
            PathKind::Xdp,
            PathKind::Generator,
        ),
        ("xdp_over_raw_xdp", PathKind::Xdp, PathKind::RawXdp),
        (
            "raw_xdp_over_generator_ceiling",
            PathKind::RawXdp,
            PathKind::Generator,
        ),
    ];
    for (name, a, b) in pairs {
        if let (Some(a), Some(b)) = (at(a), at(b)) {
            out.insert(name, a / b);
        }
    }
    out
}

/// XDP Send indications / XDP ChannelData (median delivered rates, same run) for every Send
/// variant: the issue's target is at least 0.8 at 1 and at 1000 flows.
fn xdp_send_over_channel(sums: &[Summary]) -> Vec<(Variant, f64)> {
    sums.iter()
        .filter(|s| s.path == PathKind::Xdp && s.variant.is_send())
        .filter_map(|send| {
            let channel = Variant {
                framing: Framing::ChannelData,
                ..send.variant
            };
            let cd = sums
                .iter()
                .find(|c| c.path == PathKind::Xdp && c.variant == channel)?;
            (cd.median_pps > 0.0).then(|| (send.variant, send.median_pps / cd.median_pps))
        })
        .collect()
}

/// Relay XDP / raw XDP (median delivered rates) for every variant both ran: how much of the
/// bare frame work's rate the relay's XDP path keeps with its TURN state and checks.
fn xdp_over_raw(sums: &[Summary]) -> Vec<(Variant, f64)> {
    sums.iter()
        .filter(|s| s.path == PathKind::Xdp)
        .filter_map(|xdp| {
            let raw = sums
                .iter()
                .find(|r| r.path == PathKind::RawXdp && r.variant == xdp.variant)?;
            (raw.median_pps > 0.0).then(|| (xdp.variant, xdp.median_pps / raw.median_pps))
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

pub fn table(results: &Results) -> String {
    let sums = summaries(results);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<10} {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "path",
        "variant",
        "0-loss",
        "Mpps med",
        "min",
        "max",
        "offered",
        "loss%",
        "ceil%",
        "proc ns",
        "core ns",
        "bpf ns",
        "drops",
        "fe drops"
    );
    // Rows in (variant, path) order, the not-applicable ones in their place.
    let mut rows: Vec<(Variant, PathKind, Option<&Summary>)> = sums
        .iter()
        .map(|s| (s.variant, s.path, Some(s)))
        .chain(
            results
                .not_applicable
                .iter()
                .map(|(p, v, _)| (*v, *p, None)),
        )
        .collect();
    rows.sort_by_key(|(v, p, _)| (*v, *p));
    for (variant, path, s) in rows {
        let Some(s) = s else {
            let _ = writeln!(
                t,
                "{:<10} {:<16} {:>8}   ({})",
                path.name(),
                variant.label(),
                "n/a",
                results
                    .not_applicable_reason(path, variant)
                    .unwrap_or("not run")
            );
            continue;
        };
        let _ = writeln!(
            t,
            "{:<10} {:<16} {:>8} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>6.1} {:>7} {:>8} {:>8.0} {:>8} {:>8} {:>8}",
            s.path.name(),
            s.variant.label(),
            s.peak.as_ref().map_or_else(|| "-".to_owned(), peak_cell),
            s.median_pps / 1e6,
            s.min_pps / 1e6,
            s.max_pps / 1e6,
            s.offered_pps / 1e6,
            s.loss_pct,
            opt(s.of_ceiling.map(|c| c * 100.0), 0),
            opt(s.process_ns_per_pkt, 0),
            s.core_ns_per_pkt,
            opt(s.bpf_ns_per_run, 0),
            s.relay_drops + s.csum_errors,
            s.far_end_drops,
        );
    }
    let _ = writeln!(
        t,
        "(0-loss: peak zero-loss rate, Mpps: the highest paced offered rate with <= 0.1 % lost \
         (RFC 2544 throughput), median over rounds, \">=\" where the search reached its top or \
         the paced generator's reach, \"-\" not searched (both-directions and Send variants); \
         Mpps: overload goodput, delivered at the far end (XDP sink counters, see \"delivered\" \
         in the JSON) while the generator offers all it can, median/min/max over rounds; offered: what the generator sent; ceil%: share of the generator's own ceiling; proc/core ns: server \
         process CPU / relay-core busy time per delivered packet; bpf ns: per program run; \
         drops: server socket RcvbufErrors + checksum errors; fe drops: frames the veth \
         towards the far end refused, summed over rounds: non-zero means the far end, not the \
         server, limited that run)"
    );
    let voip: Vec<&Summary> = sums.iter().filter(|s| s.variant.is_voip()).collect();
    if let Some(first) = voip.first() {
        let v = first.variant;
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "VoIP-shaped ({}): {} allocations, {} B ChannelData, {} pps per allocation each way \
             (offered {:.1} kpps in all, paced)",
            v.label(),
            v.flows,
            v.payload,
            v.pps_per_flow,
            2.0 * v.voip_rate_per_direction().unwrap_or(0.0) / 1e3
        );
        let _ = writeln!(
            t,
            "{:<10} {:>10} {:>10} {:>7} {:>11} {:>11} {:>10}",
            "path", "offered", "delivered", "loss%", "proc ns/pkt", "core ns/pkt", "bpf ns/run"
        );
        for s in &voip {
            let _ = writeln!(
                t,
                "{:<10} {:>10.1} {:>10.1} {:>7.2} {:>11} {:>11.0} {:>10}",
                s.path.name(),
                s.offered_pps / 1e3,
                s.median_pps / 1e3,
                s.loss_pct,
                opt(s.process_ns_per_pkt, 0),
                s.core_ns_per_pkt,
                opt(s.bpf_ns_per_run, 0)
            );
        }
        for (path, variant, reason) in &results.not_applicable {
            if variant.is_voip() {
                let _ = writeln!(t, "{:<10} n/a ({reason})", path.name());
            }
        }
        let _ = writeln!(
            t,
            "(kpps; proc ns/pkt: the server process's CPU time (schedstat of its threads) per \
             delivered packet, which for the kernel paths is their control plane only; core \
             ns/pkt: the relay core's busy time (process, softirq, NAPI, other users of the \
             core) per delivered packet; bpf ns/run: the kernel program's run time per frame)"
        );
    }
    let lat = latency_summary(results);
    if !lat.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:<10} {:>9} {:>9} {:>9} {:>10}   latency: 120 B round trip client->relay->peer echo->relay->client at {} pps",
            "path",
            "p50 us",
            "p99 us",
            "max us",
            "answered",
            results.conditions["latency_rate_pps"]
        );
        for (path, (p50, p99, max, sent, received)) in &lat {
            let _ = writeln!(
                t,
                "{:<10} {:>9.1} {:>9.1} {:>9.1} {:>10}",
                path.name(),
                p50,
                p99,
                max,
                format!("{received}/{sent}")
            );
        }
    }
    let r = ratios(&sums);
    if !r.is_empty() {
        let _ = writeln!(t);
        let line: Vec<String> = r.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        let _ = writeln!(t, "ratios (120B x1 c>p medians): {}", line.join(", "));
    }
    let raw = xdp_over_raw(&sums);
    if !raw.is_empty() {
        let line: Vec<String> = raw
            .iter()
            .map(|(v, r)| format!("{} {r:.2}", v.label()))
            .collect();
        let _ = writeln!(t, "relay XDP / raw XDP (medians): {}", line.join(", "));
    }
    let send = xdp_send_over_channel(&sums);
    if !send.is_empty() {
        let line: Vec<String> = send
            .iter()
            .map(|(v, r)| format!("{} {r:.2}", v.label()))
            .collect();
        let _ = writeln!(
            t,
            "XDP send / XDP ChannelData (medians, same payload and flows; target >= 0.80): {}",
            line.join(", ")
        );
    }
    for (path, reason) in &results.availability {
        if reason.is_some() {
            let _ = writeln!(t, "{}: unavailable (reason below)", path.name());
        }
    }
    t.push_str(&super::stream::table(&results.stream));
    t
}

pub fn json(results: &Results) -> Value {
    let sums = summaries(results);
    let summary: Vec<Value> = sums
        .iter()
        .map(|s| {
            json!({
                "path": s.path.name(),
                "variant": s.variant.label(),
                "payload": s.variant.payload,
                "flows": s.variant.flows,
                "both_directions": s.variant.bidi,
                "kind": if s.variant.is_voip() { "voip" } else { "flood" },
                "pps_per_flow_per_direction": s.variant.is_voip().then_some(s.variant.pps_per_flow),
                "framing": match s.variant.framing {
                    Framing::ChannelData => "channel-data",
                    Framing::Send => "send-indication",
                },
                "delivered_pps": {"median": s.median_pps, "min": s.min_pps, "max": s.max_pps},
                "peak_zero_loss_pps": s.peak.as_ref().map(|p| json!({
                    "median": p.median_pps,
                    "min": p.min_pps,
                    "max": p.max_pps,
                    "lower_bound": p.lower_bound,
                    "generator_limited": p.generator_limited,
                    "trials": p.trials,
                })),
                "offered_pps_median": s.offered_pps,
                "loss_percent": s.loss_pct,
                "share_of_generator_ceiling": s.of_ceiling,
                "process_cpu_ns_per_packet": s.process_ns_per_pkt,
                "relay_core_ns_per_packet": s.core_ns_per_pkt,
                "bpf_ns_per_run": s.bpf_ns_per_run,
                "server_rcvbuf_errors": s.relay_drops,
                "checksum_errors": s.csum_errors,
                "far_end_drops": s.far_end_drops,
            })
        })
        .collect();
    let runs: Vec<Value> = results
        .runs
        .iter()
        .map(|r| {
            let m = &r.m;
            json!({
                "round": r.round,
                "path": r.path.name(),
                "variant": r.variant.label(),
                "elapsed_s": m.elapsed_s,
                "sent_client_to_peer": m.sent_c2p,
                "sent_peer_to_client": m.sent_p2c,
                "delivered_client_to_peer": m.delivered_c2p,
                "delivered_peer_to_client": m.delivered_p2c,
                "delivered_pps": m.pps(),
                "send_errors": m.send_errors,
                "server_rcvbuf_errors": m.relay_rcvbuf_errors,
                "checksum_errors": m.csum_errors,
                "far_end_drops": m.far_end_drops,
                "process_cpu_ns": m.process_cpu_ns,
                "relay_core_busy_ns": m.core_cpu_ns,
                "bpf_run_ns": m.bpf_run_ns,
                "bpf_runs": m.bpf_runs,
            })
        })
        .collect();
    let voip: Vec<Value> = sums
        .iter()
        .filter(|s| s.variant.is_voip())
        .map(|s| {
            json!({
                "path": s.path.name(),
                "variant": s.variant.label(),
                "allocations": s.variant.flows,
                "payload": s.variant.payload,
                "pps_per_allocation_per_direction": s.variant.pps_per_flow,
                "offered_pps": s.offered_pps,
                "delivered_pps": s.median_pps,
                "loss_percent": s.loss_pct,
                "process_cpu_ns_per_packet": s.process_ns_per_pkt,
                "relay_core_ns_per_packet": s.core_ns_per_pkt,
                "bpf_ns_per_run": s.bpf_ns_per_run,
            })
        })
        .chain(
            results
                .not_applicable
                .iter()
                .filter(|(_, v, _)| v.is_voip())
                .map(|(path, v, reason)| {
                    json!({"path": path.name(), "variant": v.label(), "allocations": v.flows,
                           "not_applicable": reason})
                }),
        )
        .collect();
    let peak_searches: Vec<Value> = results
        .peaks
        .iter()
        .map(|(round, path, variant, p)| {
            let trials: Vec<Value> = p
                .trials
                .iter()
                .map(|t| {
                    json!({"target_pps": t.target_pps, "offered_pps": t.offered_pps,
                           "delivered_pps": t.delivered_pps, "loss_percent": 100.0 * t.loss,
                           "passed": t.passed, "generator_short": t.generator_short})
                })
                .collect();
            json!({"round": round, "path": path.name(), "variant": variant.label(),
                   "peak_zero_loss_pps": p.rate_pps, "search_top_pps": p.upper_pps,
                   "lower_bound": p.lower_bound, "generator_limited": p.generator_limited,
                   "trials": trials})
        })
        .collect();
    let latency: Vec<Value> = results
        .latency
        .iter()
        .map(|(round, path, l)| {
            json!({"round": round, "path": path.name(), "sent": l.sent, "received": l.received,
                   "p50_us": l.p50_us, "p99_us": l.p99_us, "max_us": l.max_us})
        })
        .collect();
    let availability: serde_json::Map<String, Value> = results
        .availability
        .iter()
        .map(|(p, reason)| {
            (
                p.name().to_owned(),
                json!({"available": reason.is_none(), "reason": reason}),
            )
        })
        .collect();
    let ratios: serde_json::Map<String, Value> = ratios(&sums)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect();
    let not_applicable: Vec<Value> = results
        .not_applicable
        .iter()
        .map(|(path, variant, reason)| {
            json!({"path": path.name(), "variant": variant.label(), "reason": reason})
        })
        .collect();
    let xdp_over_raw_xdp: Vec<Value> = xdp_over_raw(&sums)
        .iter()
        .map(|(v, r)| json!({"variant": v.label(), "ratio": r}))
        .collect();
    let xdp_send_over_channel_data: Vec<Value> = xdp_send_over_channel(&sums)
        .iter()
        .map(|(v, r)| json!({"variant": v.label(), "flows": v.flows, "ratio": r}))
        .collect();
    json!({
        "conditions": results.conditions,
        "elapsed_s": results.elapsed_s,
        "paths": availability,
        "summary": summary,
        "not_applicable": not_applicable,
        "ratios": ratios,
        "xdp_over_raw_xdp": xdp_over_raw_xdp,
        "xdp_send_over_xdp_channel_data": xdp_send_over_channel_data,
        "latency": latency,
        "peak_searches": peak_searches,
        "voip": voip,
        "runs": runs,
        "stream": super::stream::json(&results.stream),
    })
}

const COLORS: [(PathKind, &str); 7] = [
    (PathKind::Generator, "#9e9e9e"),
    (PathKind::Socket, "#1f77b4"),
    (PathKind::Xdp, "#d62728"),
    (PathKind::Tc, "#ff7f0e"),
    (PathKind::Coturn, "#2ca02c"),
    (PathKind::Reference, "#9467bd"),
    (PathKind::RawXdp, "#8c564b"),
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn color(path: PathKind) -> &'static str {
    COLORS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or("#000", |c| c.1)
}

/// Estimated width of `text` in pixels at `size` px sans-serif: 0.6 em per character is above
/// the average advance of DejaVu Sans / Liberation Sans for these labels, so estimates err wide.
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.6
}

/// Cuts `text` to what fits in `width` pixels at `size` px, with an ellipsis.
fn fit(text: &str, width: f64, size: f64) -> String {
    let max = ((width / (size * 0.6)) as usize).max(4);
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max - 1).collect();
    format!("{cut}…")
}

/// An SVG being laid out: elements, and the widest x any text reaches (for the final width).
struct Canvas {
    body: String,
    right: f64,
}

impl Canvas {
    fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, text: &str) {
        let w = text_width(text, size);
        let right = match anchor {
            "middle" => x + w / 2.0,
            "end" => x,
            _ => x + w,
        };
        self.right = self.right.max(right);
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}">{}</text>"#,
            escape(text)
        );
    }
}

/// Two panels. Top: one group per flood variant, two bars per path: overload goodput (solid,
/// whiskers min-max over rounds) and peak zero-loss rate (light, "≥" above it when the search
/// could not go higher, "0" when no trial passed), "n/a" where a path does not run the variant. Bottom (when the run had
/// it): the VoIP-shaped variant's CPU per packet, server process and relay core, with loss.
/// Width and height follow the content; the reasons for n/a are listed under the chart.
pub fn svg(results: &Results) -> String {
    let sums = summaries(results);
    let mut variants: Vec<Variant> = sums
        .iter()
        .map(|s| s.variant)
        .chain(results.not_applicable.iter().map(|(_, v, _)| *v))
        .filter(|v| !v.is_voip())
        .collect();
    variants.sort();
    variants.dedup();
    let paths: Vec<PathKind> = COLORS
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            sums.iter().any(|s| s.path == *p)
                || results.not_applicable.iter().any(|(q, _, _)| q == p)
        })
        .collect();
    let mode = results.conditions["mode"].as_str().unwrap_or("").to_owned();
    let rounds = results.conditions["rounds"].as_u64().unwrap_or(0);

    let (left, margin) = (64.0, 16.0);
    let bar_w = 9.0;
    let slot_w = 2.0 * bar_w + 3.0;
    let label_w = variants
        .iter()
        .map(|v| text_width(&v.label(), 12.0))
        .fold(0.0, f64::max);
    let group_w = (slot_w * paths.len().max(1) as f64).max(label_w) + 18.0;
    let plot_w = group_w * variants.len().max(1) as f64;
    let title =
        format!("Overload goodput and peak zero-loss rate, Mpps ({mode} mode, {rounds} round(s))");
    let subtitle = "solid: goodput while the generator offers all it can (median, whiskers \
                    min-max); light: highest paced rate with <= 0.1 % lost";
    let mut w = (left + plot_w + margin)
        .max(margin + text_width(&title, 15.0) + margin)
        .max(margin + text_width(subtitle, 11.0) + margin)
        .max(560.0);
    w = w.ceil();

    let mut c = Canvas {
        body: String::new(),
        right: 0.0,
    };
    c.text(margin, 22.0, 15.0, "start", &title);
    c.text(margin, 40.0, 11.0, "start", subtitle);

    // Panel 1.
    let (top, plot_h) = (58.0, 260.0);
    let data_max = sums
        .iter()
        .filter(|s| !s.variant.is_voip())
        .flat_map(|s| [Some(s.max_pps), s.peak.as_ref().map(|p| p.max_pps)])
        .flatten()
        .fold(0.0, f64::max)
        / 1e6;
    let (scale_max, tick) = nice_axis(data_max.max(0.001));
    let y = |mpps: f64| top + plot_h * (1.0 - (mpps / scale_max).min(1.0));
    let ticks = (scale_max / tick).round() as usize;
    for i in 0..=ticks {
        let v = tick * i as f64;
        let yy = y(v);
        let _ = writeln!(
            c.body,
            r##"<line x1="{left}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            left + plot_w
        );
        c.text(left - 6.0, yy + 4.0, 11.0, "end", &axis_label(v, tick));
    }
    let raw = xdp_over_raw(&sums);
    let send = xdp_send_over_channel(&sums);
    let base = y(0.0);
    for (gi, variant) in variants.iter().enumerate() {
        let gx = left + 9.0 + group_w * gi as f64;
        let bars_w = slot_w * paths.len() as f64;
        let bx = gx + (group_w - 18.0 - bars_w) / 2.0;
        for (pi, path) in paths.iter().enumerate() {
            let x = bx + slot_w * pi as f64;
            let col = color(*path);
            let Some(sum) = sums
                .iter()
                .find(|s| s.variant == *variant && s.path == *path)
            else {
                if results.not_applicable_reason(*path, *variant).is_some() {
                    let (tx, ty) = (x + bar_w, base - 4.0);
                    let _ = writeln!(
                        c.body,
                        r##"<text x="{tx:.1}" y="{ty:.1}" font-size="9" fill="#666" transform="rotate(-90 {tx:.1} {ty:.1})">n/a</text>"##
                    );
                }
                continue;
            };
            let ty = y(sum.median_pps / 1e6);
            let _ = writeln!(
                c.body,
                r#"<rect x="{x:.1}" y="{ty:.1}" width="{bar_w}" height="{:.1}" fill="{col}"><title>{} {}: goodput {:.3} Mpps</title></rect>"#,
                (base - ty).max(0.0),
                path.name(),
                escape(&variant.label()),
                sum.median_pps / 1e6
            );
            let cx = x + bar_w / 2.0;
            let _ = writeln!(
                c.body,
                r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                y(sum.min_pps / 1e6),
                y(sum.max_pps / 1e6)
            );
            if let Some(p) = &sum.peak {
                let px = x + bar_w + 1.0;
                let py = y(p.median_pps / 1e6);
                let _ = writeln!(
                    c.body,
                    r#"<rect x="{px:.1}" y="{py:.1}" width="{bar_w}" height="{:.1}" fill="{col}" fill-opacity="0.35" stroke="{col}"><title>{} {}: peak zero-loss {}{:.3} Mpps</title></rect>"#,
                    (base - py).max(0.0),
                    path.name(),
                    escape(&variant.label()),
                    if p.lower_bound { ">= " } else { "" },
                    p.median_pps / 1e6
                );
                // "≥": the search could not go higher; "0": no paced trial passed (a bar of no
                // height would look like a path that was not searched).
                let mark = if p.lower_bound {
                    Some("≥")
                } else if p.median_pps <= 0.0 {
                    Some("0")
                } else {
                    None
                };
                if let Some(mark) = mark {
                    let _ = writeln!(
                        c.body,
                        r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{mark}</text>"#,
                        px + bar_w / 2.0,
                        py - 2.0
                    );
                }
            }
        }
        let lx = gx + (group_w - 18.0) / 2.0;
        c.text(lx, base + 16.0, 12.0, "middle", &variant.label());
        let note = raw
            .iter()
            .find(|(v, _)| v == variant)
            .map(|(_, r)| format!("xdp/raw {r:.2}"))
            .or_else(|| {
                send.iter()
                    .find(|(v, _)| v == variant)
                    .map(|(_, r)| format!("xdp send/cd {r:.2}"))
            });
        if let Some(note) = note {
            c.text(lx, base + 30.0, 11.0, "middle", &note);
        }
    }
    let mut yy = base + 52.0;

    // Legend: entries wrap at the width.
    let mut x = margin;
    for path in &paths {
        let entry_w = 16.0 + text_width(path.name(), 12.0) + 18.0;
        if x + entry_w > w - margin && x > margin {
            x = margin;
            yy += 18.0;
        }
        let _ = writeln!(
            c.body,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/>"#,
            yy - 10.0,
            color(*path)
        );
        c.text(x + 16.0, yy, 12.0, "start", path.name());
        x += entry_w;
    }
    yy += 22.0;

    // Panel 2: the VoIP-shaped variant.
    let voip: Vec<&Summary> = sums.iter().filter(|s| s.variant.is_voip()).collect();
    if let Some(first) = voip.first() {
        let v = first.variant;
        yy += 8.0;
        let title = format!(
            "VoIP-shaped: {} allocations x {} pps each way, {:.1} kpps offered; CPU ns per packet",
            v.flows,
            v.pps_per_flow,
            2.0 * v.voip_rate_per_direction().unwrap_or(0.0) / 1e3
        );
        c.text(margin, yy, 13.0, "start", &title);
        c.text(
            margin,
            yy + 16.0,
            11.0,
            "start",
            "solid: server process; light: relay core (softirq, NAPI, process; noisy on a shared machine)",
        );
        let top2 = yy + 30.0;
        let h2 = 150.0;
        let vmax = voip
            .iter()
            .flat_map(|s| [s.process_ns_per_pkt.unwrap_or(0.0), s.core_ns_per_pkt])
            .fold(0.0, f64::max);
        let (smax, stick) = nice_axis(vmax.max(1.0));
        let y2 = |ns: f64| top2 + h2 * (1.0 - (ns / smax).min(1.0));
        let slot2 = 100.0;
        let plot2 = slot2 * voip.len() as f64;
        w = w.max(left + plot2 + margin);
        for i in 0..=((smax / stick).round() as usize) {
            let val = stick * i as f64;
            let ly = y2(val);
            let _ = writeln!(
                c.body,
                r##"<line x1="{left}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="#ddd"/>"##,
                left + plot2
            );
            c.text(left - 6.0, ly + 4.0, 11.0, "end", &axis_label(val, stick));
        }
        let base2 = y2(0.0);
        for (i, s) in voip.iter().enumerate() {
            let x = left + slot2 * i as f64 + 20.0;
            let col = color(s.path);
            let bw = 26.0;
            if let Some(ns) = s.process_ns_per_pkt {
                let ty = y2(ns);
                let _ = writeln!(
                    c.body,
                    r#"<rect x="{x:.1}" y="{ty:.1}" width="{bw}" height="{:.1}" fill="{col}"><title>{}: process {ns:.0} ns/packet</title></rect>"#,
                    (base2 - ty).max(0.0),
                    s.path.name()
                );
            }
            let ty = y2(s.core_ns_per_pkt);
            let _ = writeln!(
                c.body,
                r#"<rect x="{:.1}" y="{ty:.1}" width="{bw}" height="{:.1}" fill="{col}" fill-opacity="0.35" stroke="{col}"><title>{}: relay core {:.0} ns/packet</title></rect>"#,
                x + bw + 2.0,
                (base2 - ty).max(0.0),
                s.path.name(),
                s.core_ns_per_pkt
            );
            let cx = x + bw + 1.0;
            c.text(cx, base2 + 15.0, 12.0, "middle", s.path.name());
            c.text(
                cx,
                base2 + 29.0,
                11.0,
                "middle",
                &format!("loss {:.2}%", s.loss_pct),
            );
        }
        yy = base2 + 50.0;
    }

    // Panel 3: the stream-client variant (TURN over TCP/TLS), relayed pps per relay core.
    let (stream_groups, handshake_lines) = super::stream::svg_data(&results.stream);
    if !stream_groups.is_empty() {
        yy += 8.0;
        c.text(
            margin,
            yy,
            13.0,
            "start",
            "Stream clients (TURN over TCP/TLS -> UDP peer), 120 B client->peer: kpps per relay core",
        );
        let top3 = yy + 14.0;
        let h3 = 150.0;
        let vmax = stream_groups
            .iter()
            .flat_map(|(_, bars)| bars.iter().filter_map(|(_, v)| *v))
            .fold(0.0, f64::max)
            / 1e3;
        let (smax, stick) = nice_axis(vmax.max(1.0));
        let y3 = |k: f64| top3 + h3 * (1.0 - (k / smax).min(1.0));
        let slot3 = 90.0;
        let plot3 = slot3 * stream_groups.len() as f64;
        w = w.max(left + plot3 + margin);
        for i in 0..=((smax / stick).round() as usize) {
            let val = stick * i as f64;
            let ly = y3(val);
            let _ = writeln!(
                c.body,
                r##"<line x1="{left}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="#ddd"/>"##,
                left + plot3
            );
            c.text(left - 6.0, ly + 4.0, 11.0, "end", &axis_label(val, stick));
        }
        let base3 = y3(0.0);
        for (i, (label, bars)) in stream_groups.iter().enumerate() {
            let x0 = left + slot3 * i as f64 + 12.0;
            let bw = 24.0;
            for (j, (path, v)) in bars.iter().enumerate() {
                let x = x0 + (bw + 3.0) * j as f64;
                let server = if *path == PathKind::Coturn {
                    "coturn"
                } else {
                    "relay"
                };
                match v {
                    Some(pps) => {
                        let ty = y3(pps / 1e3);
                        let _ = writeln!(
                            c.body,
                            r#"<rect x="{x:.1}" y="{ty:.1}" width="{bw}" height="{:.1}" fill="{}"><title>{server} {label}: {:.1} kpps per relay core</title></rect>"#,
                            (base3 - ty).max(0.0),
                            color(*path),
                            pps / 1e3
                        );
                    }
                    None => c.text(x + bw / 2.0, base3 - 4.0, 10.0, "middle", "n/a"),
                }
            }
            c.text(
                x0 + (bw + 3.0) * bars.len() as f64 / 2.0,
                base3 + 15.0,
                12.0,
                "middle",
                label,
            );
        }
        yy = base3 + 34.0;
        c.text(
            margin,
            yy,
            11.0,
            "start",
            "blue: relay (socket path), green: coturn",
        );
        yy += 16.0;
        for line in &handshake_lines {
            c.text(margin, yy, 11.0, "start", line);
            yy += 15.0;
        }
        yy += 6.0;
    }

    // Why some bars are missing.
    if !results.not_applicable.is_empty() {
        c.text(margin, yy, 12.0, "start", "n/a:");
        yy += 16.0;
        let mut seen = Vec::new();
        for (path, variant, reason) in &results.not_applicable {
            // One line per path and reason (the minimal forwarders skip several variants alike).
            let key = (path, reason.clone());
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let line = format!(
                "{} {}: {}",
                path.name(),
                variant.label(),
                first_line(reason)
            );
            c.text(
                margin,
                yy,
                11.0,
                "start",
                &fit(&line, w - 2.0 * margin, 11.0),
            );
            yy += 15.0;
        }
    }
    let h = (yy + 10.0).ceil();
    let w = w.max(c.right + margin).ceil();
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    out.push_str(&c.body);
    let _ = writeln!(out, "</svg>");
    out
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// An axis top just above `v` and its tick step, with 4-6 ticks: 1, 2, 2.5 or 5 times a power
/// of ten per tick, so a maximum of 2.9 gets 3.0 (not 5.0).
fn nice_axis(v: f64) -> (f64, f64) {
    let exp = 10f64.powf((v / 5.0).log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        let tick = m * exp;
        let top = (v / tick).ceil() * tick;
        if top / tick <= 6.0 {
            return (top.max(tick), tick);
        }
    }
    (v, v / 5.0)
}

/// A tick label with as many decimals as the step needs (0.25 steps: two).
fn axis_label(v: f64, tick: f64) -> String {
    let decimals = (0..6)
        .find(|d| {
            let scaled = tick * 10f64.powi(*d);
            (scaled - scaled.round()).abs() < 1e-6
        })
        .unwrap_or(6) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_ceiling() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(nice_axis(2.9), (3.0, 0.5));
        assert_eq!(nice_axis(0.42), (0.5, 0.1));
        assert_eq!(axis_label(0.75, 0.25), "0.75");
        assert_eq!(axis_label(2000.0, 500.0), "2000");
    }

    /// A quick run's shape (every path, six flood variants, the VoIP variant, n/a rows with
    /// long reasons): the SVG's declared width holds its widest text, and every variant and
    /// reason appears. RELAY_BENCH_SVG_OUT=PATH writes it for a look (rsvg-convert PATH -o x.png).
    #[test]
    fn svg_fits_its_content() {
        let flood = |payload, flows, bidi, framing| Variant {
            payload,
            flows,
            bidi,
            framing,
            pps_per_flow: 0,
        };
        let voip = Variant {
            payload: 160,
            flows: 2000,
            bidi: true,
            framing: Framing::ChannelData,
            pps_per_flow: 25,
        };
        let variants = [
            flood(120, 1, false, Framing::ChannelData),
            flood(120, 1000, false, Framing::ChannelData),
            flood(120, 1, true, Framing::ChannelData),
            flood(120, 1, false, Framing::Send),
            flood(120, 1000, false, Framing::Send),
            flood(1200, 1000, true, Framing::ChannelData),
            voip,
        ];
        let mut results = Results {
            conditions: json!({"mode": "quick", "rounds": 2}),
            runs: Vec::new(),
            latency: Vec::new(),
            peaks: Vec::new(),
            availability: BTreeMap::new(),
            not_applicable: Vec::new(),
            stream: Default::default(),
            elapsed_s: 1.0,
        };
        let paths = COLORS.map(|(p, _)| p);
        for (pi, &path) in paths.iter().enumerate() {
            for &variant in &variants {
                if let Some(r) = variant.not_applicable(path) {
                    results.set_not_applicable(
                        path,
                        variant,
                        format!("the {} path forwards {r}", path.name()),
                    );
                    continue;
                }
                if path == PathKind::Coturn && variant.flows == 1000 {
                    results.set_not_applicable(path, variant, "coturn set up 1 of the 1000 allocations it needs: allocation 2 of 1000: method 0x0009: error 400 Bad Request (--multiplex-peer: one channel per peer address)".to_owned());
                    continue;
                }
                let rate = 0.2e6 * (pi + 1) as f64;
                for round in 0..2 {
                    let m = Measurement {
                        elapsed_s: 1.0,
                        sent_c2p: (rate * 1.5) as u64,
                        delivered_c2p: (rate * (1.0 + 0.05 * round as f64)) as u64,
                        process_cpu_ns: Some(1_000_000),
                        core_cpu_ns: 3_000_000,
                        ..Measurement::default()
                    };
                    results.runs.push(Run {
                        round,
                        path,
                        variant,
                        m,
                    });
                    if variant.searched() {
                        let peak = Peak {
                            rate_pps: rate * 0.8,
                            upper_pps: rate * 1.25,
                            lower_bound: path == PathKind::Xdp,
                            generator_limited: path == PathKind::Xdp,
                            trials: Vec::new(),
                        };
                        results.peaks.push((round, path, variant, peak));
                    }
                }
            }
        }
        let svg = svg(&results);
        if let Some(out) = std::env::var_os("RELAY_BENCH_SVG_OUT") {
            std::fs::write(out, &svg).unwrap();
        }
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        for line in svg.lines().filter(|l| l.starts_with("<text")) {
            let attr = |name: &str| -> f64 {
                line.split(&format!(" {name}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0)
            };
            let text = line
                .split('>')
                .nth(1)
                .unwrap_or("")
                .trim_end_matches("</text")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            let text = text.as_str();
            let (x, size) = (attr("x"), attr("font-size"));
            let right = if line.contains("text-anchor=\"middle\"") {
                x + text_width(text, size) / 2.0
            } else if line.contains("text-anchor=\"end\"") || line.contains("rotate") {
                x
            } else {
                x + text_width(text, size)
            };
            assert!(right <= width, "text past the width {width}: {line}");
        }
        for v in &variants[..6] {
            assert!(svg.contains(&escape(&v.label())), "{}", v.label());
        }
        assert!(svg.contains("VoIP-shaped: 2000 allocations"));
        assert!(svg.contains("multiplex-peer"));
    }
}
