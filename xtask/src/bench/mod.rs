//! `cargo xtask bench`: socket path vs kernel fast path (XDP, TC) vs coturn, side by side, in a
//! namespace lab of its own, next to two minimal forwarders without TURN (a raw XDP program and
//! a recvmmsg/sendmmsg socket forwarder), with the load generator's own ceiling measured in the
//! same run.
//!
//! Modules: `lab` (namespaces, veth, NAPI pinning, cleanup), `turn` (the client's control
//! plane), `loadgen` (generators), `measure` (counters, CPU, latency), `runner` (servers and
//! floods per path), `report` (table, JSON, SVG), `forwarder` and `raw_xdp` (the minimal
//! forwarders' processes), `sink` (the far ends), `stream` (the stream-client variant: TURN
//! over TCP and TLS to the UDP peer, relay against coturn).
//!
//! The kernel programs of the benchmark (generator, sinks, raw forwarder) come from their own
//! eBPF object, relay-bench-ebpf, which this builds before it starts (`build_bench_object`):
//! the relay's object holds none of them.

pub(crate) mod forwarder;
pub(crate) mod lab;
mod loadgen;
mod measure;
mod peak;
pub(crate) mod raw_xdp;
mod report;
mod runner;
mod sink;
mod stream;
mod turn;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use self::{
    report::{Results, Run},
    runner::{Ctx, Framing, PathKind, Variant},
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Fewer rounds and variants, shorter floods, 4-trial peak searches: about 4 minutes.
    #[arg(long)]
    quick: bool,
    /// A few seconds: one round, one short flood per path (what the test suite runs).
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Where to write the JSON results (default: OUT/bench.json).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Output directory for JSON, SVG and server logs (default: bench-results/ in the workspace).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Paths to run, comma-separated (default: all of
    /// generator,socket,xdp,tc,coturn,reference,raw-xdp; reference is a minimal recvmmsg+GSO
    /// forwarder and raw-xdp a minimal XDP forwarder, both without TURN logic and client→peer
    /// only).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    paths: Option<Vec<String>>,
    /// Rounds (each runs every path once, in rotating order).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per flood.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// The relay binary (default: $RELAY_BIN, else built with `cargo build --release`).
    #[arg(long, value_name = "PATH")]
    relay_bin: Option<PathBuf>,
    /// Load generator for every path: live-frames (BPF_PROG_TEST_RUN with
    /// BPF_F_TEST_XDP_LIVE_FRAMES, needs the benchmark's eBPF object), socket (sendmmsg), or
    /// auto (live-frames when it loads, else socket).
    #[arg(long, default_value = "auto")]
    generator: String,
    /// The benchmark's eBPF object (generator, sinks, raw XDP forwarder). Default:
    /// $RELAY_BENCH_OBJECT, else relay-bench-ebpf built now (`cargo xtask build-ebpf` builds it
    /// too), target/ebpf/bpfel-unknown-none/release/relay-bench-ebpf.
    #[arg(long, value_name = "PATH")]
    bench_object: Option<PathBuf>,
    /// Core for the generator, sinks and the far veth ends' NAPI threads.
    #[arg(long, default_value_t = 0)]
    gen_cpu: usize,
    /// Core for the server under test and the relay-side NAPI threads (the measured core).
    #[arg(long, default_value_t = 1)]
    relay_cpu: usize,
    /// Packets per second of the paced latency probe.
    #[arg(long, default_value_t = 2000)]
    latency_rate: u32,
    /// Run in this (debug) build instead of re-running in a release build.
    #[arg(long)]
    no_release: bool,
    /// coturn's `turnserver` to compare against (default: `turnserver` on PATH), e.g. a
    /// coturn 4.17 build's build/bin/turnserver.
    #[arg(long, value_name = "PATH", default_value = "turnserver")]
    coturn_bin: PathBuf,
    /// One extra argument for coturn, appended to the benchmark's own; repeat for several
    /// (e.g. `--coturn-arg=--multiplex-peer --coturn-arg=--udp-gso`). A variant coturn cannot
    /// run with them is reported n/a with its reason.
    #[arg(long = "coturn-arg", value_name = "ARG", allow_hyphen_values = true)]
    coturn_args: Vec<String>,
    /// Paced trials per peak zero-loss search (per path, client->peer ChannelData variant and
    /// round); 0 skips the search. Default: 3 smoke, 4 quick, 6 full.
    #[arg(long, value_name = "N")]
    peak_steps: Option<usize>,
    /// Seconds per paced trial of the peak search. Default: 0.2 smoke, 0.4 quick, 1 full.
    #[arg(long, value_name = "SECONDS")]
    peak_trial: Option<f64>,
    /// Allocations of the VoIP-shaped variant (default: 50 smoke, 1000 quick, 2000 full).
    #[arg(long, value_name = "N")]
    voip_allocations: Option<usize>,
    /// Datagrams per second per allocation and direction in the VoIP-shaped variant.
    #[arg(long, value_name = "PPS", default_value_t = 25)]
    voip_pps: u32,
    /// Client transports of the stream-client variant (TURN over TCP/TLS relaying to the UDP
    /// peer; the relay when the socket path runs, coturn when coturn does), comma-separated:
    /// tcp, tls, or none to skip it. Default: tcp,tls.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    stream: Option<Vec<String>>,
    /// Connections per stream-client flood, comma-separated (default: 1 smoke, 1,8 otherwise).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    stream_connections: Option<Vec<usize>>,
    /// Skip the stream-client variant's peer->client floods (client->peer and handshakes only).
    #[arg(long)]
    no_stream_p2c: bool,
    /// Run only the mode's variants with these labels, comma-separated (as the table prints
    /// them, e.g. `--variants "120B x1 c>p,120B x1000 c>p"`): a shorter run for profiling.
    #[arg(long, value_delimiter = ',', value_name = "LABELS")]
    variants: Option<Vec<String>>,
}

/// The shape of a run: rounds, variants, durations.
struct Plan {
    mode: &'static str,
    rounds: usize,
    variants: Vec<Variant>,
    duration: Duration,
    latency_duration: Duration,
    /// The peak zero-loss search after each client->peer ChannelData flood.
    search: peak::SearchPlan,
    /// The stream-client variant (TCP/TLS clients), run after the UDP paths in each round.
    stream: stream::StreamPlan,
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Self {
        let v = |payload, flows, bidi| Variant {
            payload,
            flows,
            bidi,
            framing: Framing::ChannelData,
            pps_per_flow: 0,
        };
        // VoIP-shaped: 160 B (G.711 at 20 ms), both directions, every allocation paced.
        let voip = |flows| Variant {
            payload: 160,
            flows: args.voip_allocations.unwrap_or(flows).clamp(1, 10_000),
            bidi: true,
            framing: Framing::ChannelData,
            pps_per_flow: args.voip_pps.clamp(1, 1000),
        };
        // Client→peer Send indications (and with `bidi`, the peer's answers as Data
        // indications), compared with ChannelData of the same size, flows and directions.
        let send = |payload, flows| Variant {
            payload,
            flows,
            bidi: false,
            framing: Framing::Send,
            pps_per_flow: 0,
        };
        let send_data = |payload, flows| Variant {
            bidi: true,
            ..send(payload, flows)
        };
        let stream_plan = |connections, warmup_ms, window_ms| stream::StreamPlan {
            transports: vec![stream::StreamTransport::Tcp, stream::StreamTransport::Tls],
            connections,
            warmup: Duration::from_millis(warmup_ms),
            window: Duration::from_millis(window_ms),
            handshake_workers: 8,
            p2c: true,
            settle_limit: Duration::from_millis(window_ms.min(2000)),
        };
        let search = |steps, trial_ms| peak::SearchPlan {
            steps,
            trial: Duration::from_millis(trial_ms),
            settle: Duration::from_millis(150),
        };
        let mut plan = if args.smoke {
            Self {
                mode: "smoke",
                rounds: 1,
                variants: vec![v(120, 1, false), send(120, 1), voip(50)],
                duration: Duration::from_millis(500),
                latency_duration: Duration::from_millis(300),
                search: search(3, 200),
                stream: stream_plan(vec![1], 200, 500),
            }
        } else if args.quick {
            Self {
                mode: "quick",
                rounds: 2,
                variants: vec![
                    v(120, 1, false),
                    v(120, 1000, false),
                    v(120, 1, true),
                    send(120, 1),
                    send(120, 1000),
                    send_data(120, 1),
                    send_data(120, 1000),
                    voip(1000),
                ],
                duration: Duration::from_secs(2),
                latency_duration: Duration::from_secs(1),
                search: search(4, 400),
                stream: stream_plan(vec![1, 8], 300, 2000),
            }
        } else {
            let mut variants = Vec::new();
            for payload in [120, 1200] {
                for flows in [1, 1000] {
                    for bidi in [false, true] {
                        variants.push(v(payload, flows, bidi));
                    }
                    // The Send variants are 120 B; 1200 B would mostly measure copies.
                    if payload == 120 {
                        variants.push(send(payload, flows));
                        variants.push(send_data(payload, flows));
                    }
                }
            }
            variants.push(voip(2000));
            Self {
                mode: "full",
                rounds: 5,
                variants,
                duration: Duration::from_secs(5),
                latency_duration: Duration::from_secs(3),
                search: search(6, 1000),
                stream: stream_plan(vec![1, 8], 500, 5000),
            }
        };
        if let Some(r) = args.rounds {
            plan.rounds = r.clamp(1, 100);
        }
        if let Some(d) = args.duration {
            plan.duration = Duration::from_secs_f64(d.clamp(0.1, 120.0));
        }
        if let Some(steps) = args.peak_steps {
            plan.search.steps = steps.min(16);
        }
        if let Some(t) = args.peak_trial {
            plan.search.trial = Duration::from_secs_f64(t.clamp(0.05, 30.0));
        }
        if args.duration.is_some() {
            plan.stream.window = plan.duration;
        }
        plan.stream.p2c = !args.no_stream_p2c;
        if let Some(c) = &args.stream_connections {
            let mut c: Vec<usize> = c.iter().map(|n| (*n).clamp(1, 1000)).collect();
            c.sort_unstable();
            c.dedup();
            if !c.is_empty() {
                plan.stream.connections = c;
            }
        }
        if let Some(labels) = &args.variants {
            plan.variants
                .retain(|v| labels.iter().any(|l| l.trim() == v.label()));
        }
        plan
    }
}

pub fn run(root: &Path, args: BenchArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask bench needs root (network namespaces, taskset of kernel threads, XDP)");
    }
    let relay_bin = match args
        .relay_bin
        .clone()
        .or_else(|| std::env::var_os("RELAY_BIN").map(PathBuf::from))
    {
        Some(path) => path,
        None => build_relay(root)?,
    };
    if !relay_bin.exists() {
        bail!("relay binary {} does not exist", relay_bin.display());
    }
    // The generator and the sinks are part of the measurement: run them optimised.
    if cfg!(debug_assertions) && !args.no_release && !args.smoke {
        let pass_relay = args.relay_bin.is_none().then_some(relay_bin.as_path());
        return reexec_release(root, pass_relay);
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("bench-results"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = args.json.clone().unwrap_or_else(|| out.join("bench.json"));

    let mut plan = Plan::from_args(&args);
    if let Some(list) = &args.stream {
        plan.stream.transports = stream::StreamTransport::parse_list(list)?;
    }
    if plan.variants.is_empty() {
        bail!(
            "--variants matched none of the {} mode's variants",
            plan.mode
        );
    }
    let paths: Vec<PathKind> = match &args.paths {
        Some(list) => list
            .iter()
            .map(|p| PathKind::parse(p))
            .collect::<anyhow::Result<_>>()?,
        None => vec![
            PathKind::Generator,
            PathKind::Socket,
            PathKind::Xdp,
            PathKind::Tc,
            PathKind::Coturn,
            PathKind::Reference,
            PathKind::RawXdp,
        ],
    };
    let bench_object = match args
        .bench_object
        .clone()
        .or_else(|| std::env::var_os("RELAY_BENCH_OBJECT").map(PathBuf::from))
    {
        Some(path) => path,
        None => crate::build_bench_object()?,
    };
    let (generator, generator_note) = loadgen::by_name(&args.generator, &bench_object)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.gen_cpu >= cpus || args.relay_cpu >= cpus || args.gen_cpu == args.relay_cpu {
        bail!(
            "need two distinct cores below {cpus} (--gen-cpu {}, --relay-cpu {})",
            args.gen_cpu,
            args.relay_cpu
        );
    }
    let ctx = Ctx {
        relay_bin,
        out: out.clone(),
        gen_cpu: args.gen_cpu,
        relay_cpu: args.relay_cpu,
        duration: plan.duration,
        settle: Duration::from_millis(300),
        // Far above what one core can send in the duration; a bound in count as well as time.
        max_packets: (plan.duration.as_secs_f64() * 20e6) as u64,
        latency_rate: args.latency_rate.clamp(1, 100_000),
        latency_duration: plan.latency_duration,
        secret: format!("bench-{:x}", std::process::id()),
        server_bound: Duration::from_secs(30)
            + (plan.duration + Duration::from_secs(2)) * plan.variants.len() as u32
            + (plan.search.trial + plan.search.settle + Duration::from_secs(1))
                * (plan.search.steps * plan.variants.iter().filter(|v| v.searched()).count())
                    as u32
            + plan.latency_duration,
        bench_object: bench_object.clone(),
        coturn_bin: args.coturn_bin.clone(),
        coturn_args: args.coturn_args.clone(),
    };

    lab::install_signal_handlers();
    let started = Instant::now();
    println!(
        "bench: {} mode, {} round(s), {} variant(s), {:.1} s floods; generator {} on cpu {}, \
         server on cpu {}",
        plan.mode,
        plan.rounds,
        plan.variants.len(),
        plan.duration.as_secs_f64(),
        generator.name(),
        ctx.gen_cpu,
        ctx.relay_cpu
    );
    let _bpf_stats = paths
        .iter()
        .any(|p| p.is_kernel())
        .then(measure::BpfStatsGuard::enable);
    let mut lab = lab::Lab::up(ctx.gen_cpu, ctx.relay_cpu)?;
    lab.notes.extend(generator_note);
    for note in &lab.notes {
        println!("bench: note: {note}");
    }
    runner::check_isolation(&lab)?;
    let peer = runner::peer_socket(&lab)?;
    // The far ends count in XDP (sink.rs); without them (an eBPF object lacking the program, a
    // kernel refusing it) the receiving namespaces' UDP stacks count, as before, and cap
    // what can be measured.
    let sink_object = std::fs::read(&bench_object).map(std::sync::Arc::new);
    let mut far = match &sink_object {
        Ok(object) => sink::FarEnds::attach(&lab, object, runner::PEER_PORT),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", bench_object.display())),
    };
    if let Err(e) = &far {
        let note = format!(
            "far-end XDP sinks unavailable, counting at the receivers' UDP stacks (which cap \
             the measurable rate): {}",
            format!("{e:#}").lines().next().unwrap_or("")
        );
        println!("bench: note: {note}");
        lab.notes.push(note);
    }
    // The XDP_PASS fallback for the far ends comes from the same object.
    let pass_object = sink_object.as_ref().ok().cloned();
    let sink_object = sink_object.ok().filter(|_| far.is_ok());

    let mut results = Results::new(&plan, &ctx, generator.name(), &lab.notes);
    if far.is_ok() {
        results.conditions["delivered"] = serde_json::json!(
            "XDP counters of relay_bench_sink on the far veth ends (p0 for client->peer, c0 for \
             peer->client ChannelData; for the generator ceiling, r_c with no server), which \
             drop the counted frames; the paced latency probe passes them to real sockets. \
             An XDP program on a veth end turns UDP GSO off on its peer, so the servers' GSO \
             batches are segmented in software on the relay core, as on a NIC without UDP \
             segmentation offload"
        );
    }
    let server_paths: Vec<PathKind> = paths
        .iter()
        .copied()
        .filter(|p| *p != PathKind::Generator)
        .collect();
    let ceiling_variants: Vec<Variant> = {
        let mut v: Vec<Variant> = plan
            .variants
            .iter()
            .filter(|v| !v.is_voip())
            .map(|v| Variant { bidi: false, ..*v })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let steps_per_round = if paths.contains(&PathKind::Generator) {
        ceiling_variants.len()
    } else {
        0
    } + server_paths.len() * (plan.variants.len() + 1);
    let total_steps = steps_per_round * plan.rounds;
    let mut step = 0;
    let mut unavailable: BTreeMap<PathKind, String> = BTreeMap::new();
    let max_flows = |framing| {
        plan.variants
            .iter()
            .filter(|v| v.framing == framing)
            .map(|v| v.flows)
            .max()
            .unwrap_or(0)
    };
    let (max_flows, max_send_flows) = (
        max_flows(Framing::ChannelData).max(1),
        max_flows(Framing::Send),
    );

    // The stream-client variant: for the relay when the socket path runs, for coturn when it
    // does; the certificate is made once for the run.
    let stream_servers = if plan.stream.is_empty() {
        Vec::new()
    } else {
        stream::StreamServer::for_paths(&server_paths)
    };
    let stream_tls = if stream_servers.is_empty() {
        None
    } else {
        results.stream.plan = Some(plan.stream.clone());
        results.stream.servers = stream_servers.clone();
        Some(stream::TlsMaterial::generate(&out)?)
    };

    for round in 0..plan.rounds {
        if paths.contains(&PathKind::Generator) {
            for &variant in &ceiling_variants {
                lab::check_stop()?;
                step += 1;
                let (groups, sink) = runner::ceiling_groups(&lab, variant)?;
                // Generator -> the XDP sink on the veth end facing it: no server and no kernel
                // stack, so what is counted is what the generator can push through the veth.
                let ceiling_sink = match &sink_object {
                    Some(object) => Some(sink::Sink::attach(
                        object,
                        &lab.relay,
                        &lab.r_c,
                        &[sink::rule(
                            lab::LISTEN_IP,
                            32,
                            runner::CEILING_PORT..=runner::CEILING_PORT,
                            false,
                        )],
                    )?),
                    None => None,
                };
                let delivery = ceiling_sink
                    .as_ref()
                    .map(|s| sink::Delivery { c2p: s, p2c: None });
                let m = runner::flood(
                    &lab,
                    &ctx,
                    generator.as_ref(),
                    variant,
                    groups,
                    None,
                    &[std::sync::Arc::new(sink)],
                    None,
                    false,
                    delivery.as_ref(),
                    None,
                )?;
                drop(ceiling_sink);
                progress(
                    step,
                    total_steps,
                    round,
                    &plan,
                    PathKind::Generator,
                    variant,
                    &m,
                );
                results.runs.push(Run {
                    round,
                    path: PathKind::Generator,
                    variant,
                    m,
                });
            }
        }
        // Alternate: every round starts with a different server.
        let mut order = server_paths.clone();
        if !order.is_empty() {
            let shift = round % order.len();
            order.rotate_left(shift);
        }
        for path in order {
            lab::check_stop()?;
            if let Some(reason) = unavailable.get(&path) {
                step += plan.variants.len() + 1;
                println!(
                    "[{step:>3}/{total_steps}] round {}/{} {:<9} unavailable: {}",
                    round + 1,
                    plan.rounds,
                    path.name(),
                    first_line(reason)
                );
                continue;
            }
            // The sinks are XDP programs, which is all veth needs to deliver what the kernel
            // paths transmit into the far ends; without them, attach a bare XDP_PASS.
            let pass_hook = path.is_kernel() && far.is_err();
            if pass_hook {
                let attached = match &pass_object {
                    Some(object) => lab.attach_far_end_pass(object),
                    None => Err(anyhow::anyhow!("no benchmark eBPF object")),
                };
                if let Err(e) = attached {
                    println!("bench: note: far-end XDP_PASS hook failed: {e:#}");
                }
            }
            let outcome = run_server_path(
                &lab,
                &ctx,
                &plan,
                generator.as_ref(),
                &peer,
                path,
                round,
                (max_flows, max_send_flows),
                &mut step,
                total_steps,
                &mut results,
                far.as_mut().ok(),
            );
            if pass_hook {
                lab.detach_far_end_pass();
            }
            if let Err(reason) = outcome? {
                println!(
                    "[{:>3}/{total_steps}] round {}/{} {:<9} unavailable: {}",
                    step + plan.variants.len() + 1,
                    round + 1,
                    plan.rounds,
                    path.name(),
                    first_line(&reason)
                );
                step += plan.variants.len() + 1;
                unavailable.insert(path, reason);
            }
        }
        if let Some(tls) = &stream_tls {
            stream::run_round(
                &lab,
                &ctx,
                &plan.stream,
                tls,
                &stream_servers,
                round,
                plan.rounds,
                far.as_ref().ok(),
                &peer,
                &mut results.stream,
            )?;
        }
    }
    drop(stream_tls);
    drop(far);
    drop(lab);

    for path in &paths {
        results
            .availability
            .insert(*path, unavailable.get(path).cloned());
    }
    results.elapsed_s = started.elapsed().as_secs_f64();
    println!();
    print!("{}", report::table(&results));
    for (path, reason) in &unavailable {
        println!("{} unavailable:\n{}", path.name(), reason);
    }
    let json = report::json(&results);
    if let Some(dir) = json_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = out.join("bench.svg");
    std::fs::write(&svg_path, report::svg(&results))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    println!(
        "bench: {} and {} written in {:.0} s",
        json_path.display(),
        svg_path.display(),
        results.elapsed_s
    );
    Ok(())
}

/// Starts the server, allocates, floods every variant, probes latency. Ok(Err(reason)): the
/// path is unavailable (its server did not start).
#[expect(
    clippy::too_many_arguments,
    reason = "the orchestration state the loop threads through"
)]
fn run_server_path(
    lab: &lab::Lab,
    ctx: &Ctx,
    plan: &Plan,
    generator: &dyn loadgen::Generator,
    peer: &std::sync::Arc<std::net::UdpSocket>,
    path: PathKind,
    round: usize,
    (max_flows, max_send_flows): (usize, usize),
    step: &mut usize,
    total_steps: usize,
    results: &mut Results,
    mut far: Option<&mut sink::FarEnds>,
) -> anyhow::Result<Result<(), String>> {
    let server = match runner::start(path, lab, ctx) {
        Ok(s) => s,
        Err(reason) => return Ok(Err(reason)),
    };
    let kernel = path.is_kernel();
    let setup = Instant::now();
    let (allocations, refused) = if path.is_bare_forwarder() {
        (runner::bare_allocations(lab, max_flows)?, None)
    } else {
        runner::allocate(lab, ctx, max_flows, Framing::ChannelData)?
    };
    if allocations.is_empty() {
        return Ok(Err(format!(
            "TURN setup failed: {}\n{}",
            refused.as_deref().unwrap_or("no allocation"),
            server.log_tail(8)
        )));
    }
    // Allocations of their own for the Send variants: a channel to the peer would keep the
    // relay from putting the permission in the kernel on its own (and a client with a channel
    // would use it), so these have a permission and nothing else.
    let (send_allocations, send_refused) = if max_send_flows == 0 || path.is_bare_forwarder() {
        (Vec::new(), None)
    } else {
        runner::allocate(lab, ctx, max_send_flows, Framing::Send)?
    };
    for (what, reason) in [("", &refused), ("Send-variant ", &send_refused)] {
        if let Some(reason) = reason {
            println!(
                "bench: {} refused part of its {what}allocations: {}",
                path.name(),
                first_line(reason)
            );
        }
    }
    let setup_s = setup.elapsed().as_secs_f64();
    for &variant in &plan.variants {
        lab::check_stop()?;
        *step += 1;
        let (senders, senders_refused) = if variant.is_send() {
            (&send_allocations, &send_refused)
        } else {
            (&allocations, &refused)
        };
        let reason = variant
            .not_applicable(path)
            .map(|r| format!("the {} path forwards {r}", path.name()))
            .or_else(|| {
                (senders.len() < variant.flows).then(|| {
                    format!(
                        "{} set up {} of the {} allocations it needs: {}",
                        path.name(),
                        senders.len(),
                        variant.flows,
                        senders_refused.as_deref().unwrap_or("refused")
                    )
                })
            });
        if let Some(reason) = reason {
            println!(
                "[{:>3}/{total_steps}] round {}/{} {:<9} {:<16} n/a ({})",
                *step,
                round + 1,
                plan.rounds,
                path.name(),
                variant.label(),
                first_line(&reason)
            );
            results.set_not_applicable(path, variant, reason);
            continue;
        }
        let client = runner::client_groups(senders, variant.flows, variant.payload)?;
        let back = variant
            .bidi
            .then(|| runner::peer_group(peer, senders, variant.flows));
        let mut receivers = vec![std::sync::Arc::clone(peer)];
        if variant.bidi {
            receivers.extend(
                senders[..variant.flows]
                    .iter()
                    .map(|a| std::sync::Arc::clone(&a.socket)),
            );
        }
        let delivery = far.as_deref().map(|f| sink::Delivery {
            c2p: &f.peer,
            p2c: Some(&f.client),
        });
        // The VoIP-shaped variant is paced (socket generator): a fixed offered rate.
        let paced = loadgen::SocketGenerator { batch: 64 };
        let (generator, pace): (&dyn loadgen::Generator, _) =
            match variant.voip_rate_per_direction() {
                Some(rate_pps) => (
                    &paced,
                    Some(runner::Pace {
                        rate_pps,
                        duration: ctx.duration,
                        settle: ctx.settle,
                    }),
                ),
                None => (generator, None),
            };
        let m = runner::flood(
            lab,
            ctx,
            generator,
            variant,
            client,
            back,
            &receivers,
            Some(server.pid),
            kernel,
            delivery.as_ref(),
            pace,
        )?;
        progress(*step, total_steps, round, plan, path, variant, &m);
        let overload_pps = m.pps();
        results.runs.push(Run {
            round,
            path,
            variant,
            m,
        });
        if variant.searched() && plan.search.steps > 0 {
            let paced = loadgen::SocketGenerator { batch: 64 };
            // Receive livelock can hold overload goodput below what the path carries paced.
            let upper = overload_pps * 1.25;
            let found = peak::search(&plan.search, upper, |rate| {
                lab::check_stop()?;
                let delivery = far.as_deref().map(|f| sink::Delivery {
                    c2p: &f.peer,
                    p2c: Some(&f.client),
                });
                runner::flood(
                    lab,
                    ctx,
                    &paced,
                    variant,
                    runner::client_groups(senders, variant.flows, variant.payload)?,
                    None,
                    &[std::sync::Arc::clone(peer)],
                    Some(server.pid),
                    kernel,
                    delivery.as_ref(),
                    Some(runner::Pace {
                        rate_pps: rate,
                        duration: plan.search.trial,
                        settle: plan.search.settle,
                    }),
                )
            })?;
            println!(
                "      round {}/{} {:<9} {:<16} peak zero-loss {}{:.1} kpps ({} paced trials{}; \
                 search top {:.1} kpps)",
                round + 1,
                plan.rounds,
                path.name(),
                variant.label(),
                if found.lower_bound { ">= " } else { "" },
                found.rate_pps / 1e3,
                found.trials.len(),
                if found.generator_limited {
                    ", generator-limited"
                } else {
                    ""
                },
                found.upper_pps / 1e3,
            );
            results.peaks.push((round, path, variant, found));
        }
    }
    lab::check_stop()?;
    *step += 1;
    runner::drain_clients(&allocations);
    runner::drain_clients(&send_allocations);
    if !path.both_directions() {
        println!(
            "[{:>3}/{total_steps}] round {}/{} {:<9} latency n/a (client->peer only, no echo path)",
            *step,
            round + 1,
            plan.rounds,
            path.name()
        );
        return Ok(Ok(()));
    }
    let first = &allocations[0];
    // The probe's echo needs real sockets: the sinks count and pass while it runs.
    if let Some(f) = far.as_deref_mut() {
        f.set_drop(false)?;
    }
    let lat = measure::latency_probe(
        &first.socket,
        std::net::SocketAddr::from((lab::LISTEN_IP, runner::LISTEN_PORT)),
        first.channel.context("the latency probe needs a channel")?,
        peer,
        ctx.latency_rate,
        ctx.latency_duration,
        120,
        ctx.gen_cpu,
    );
    if let Some(f) = far {
        f.set_drop(true)?;
    }
    let lat = lat?;
    println!(
        "[{:>3}/{total_steps}] round {}/{} {:<9} latency at {} pps: p50 {:.0} us, p99 {:.0} us \
         ({}/{} answered; {} allocations set up in {:.1} s)",
        *step,
        round + 1,
        plan.rounds,
        path.name(),
        ctx.latency_rate,
        lat.p50_us,
        lat.p99_us,
        lat.received,
        lat.sent,
        allocations.len() + send_allocations.len(),
        setup_s
    );
    results.latency.push((round, path, lat));
    drop(allocations);
    drop(send_allocations);
    drop(server);
    Ok(Ok(()))
}

fn progress(
    step: usize,
    total: usize,
    round: usize,
    plan: &Plan,
    path: PathKind,
    variant: Variant,
    m: &runner::Measurement,
) {
    let lost = m.sent().saturating_sub(m.delivered());
    println!(
        "[{step:>3}/{total}] round {}/{} {:<9} {:<16} delivered {:>9.1} kpps  offered {:>9.1} \
         kpps  lost {:>5.1}%",
        round + 1,
        plan.rounds,
        path.name(),
        variant.label(),
        m.pps() / 1e3,
        m.offered_pps() / 1e3,
        100.0 * lost as f64 / m.sent().max(1) as f64
    );
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn build_relay(root: &Path) -> anyhow::Result<PathBuf> {
    println!("bench: building the relay (release)");
    let status = Command::new(cargo())
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "-p",
            "relay-user",
            "--bin",
            "relay",
        ])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the relay failed");
    }
    Ok(target_dir(root).join("release").join("relay"))
}

/// Runs this same command in a release build of xtask (with the relay binary settled), so the
/// generator and sinks are not slowed by a debug build.
fn reexec_release(root: &Path, relay_bin: Option<&Path>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    println!("bench: re-running in a release build of xtask (--no-release to skip)");
    let mut command = Command::new(cargo());
    command
        .args(["run", "--release", "--locked", "--quiet", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .args(["-p", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .arg("--no-release");
    if let Some(relay_bin) = relay_bin {
        command.arg("--relay-bin").arg(relay_bin);
    }
    Err(command.exec()).context("re-running xtask in release")
}

/// An error with its whole source chain on one line (aya puts the useful part in sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
