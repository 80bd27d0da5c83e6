//! Per-packet cost of the XDP forwarding program, measured with BPF_PROG_TEST_RUN.
//!
//! Usage (root; namespaces and XDP):
//!
//! ```text
//! cargo run --release -p relay-tests --example xdp_cost -- \
//!     [--baseline OBJECT] [--object LABEL=OBJECT]... [--samples N] [--rounds R] [--repeat N]
//! ```
//!
//! Builds the fixture lab (three namespaces, static neighbours, forwarding off), loads the
//! embedded eBPF object (and any other build of it given with `--baseline` / `--object`, each
//! in a lab of its own), installs the fixture bindings and times each case in the relay
//! namespace, so the next-hop, policy and redirect checks do their real work. Cases: 120-byte
//! ChannelData data both ways and both families, a padded client message, two frames the
//! program passes, and the cheapest possible frame.
//!
//! A baseline object (with the same map ABI) for a before/after comparison: copy
//! `target/ebpf/bpfel-unknown-none/release/relay-ebpf` (what `cargo xtask build-ebpf` builds)
//! aside before changing `relay-ebpf`, then rebuild this example, which embeds the new one.
//!
//! With `kernel.bpf_stats_enabled=1` every run also pays for the statistics; compare objects
//! in one invocation rather than numbers from different ones.
//!
//! How a case is timed: the kernel does not restore the frame between the runs of one
//! `repeat`ed BPF_PROG_TEST_RUN, so a forwarded frame is only forwarded on the first run.
//! Every case is therefore run `--samples` times with `repeat = 1`, and the median of the
//! kernel-reported durations is taken; `--rounds` rounds alternate the objects so both see the
//! same machine load (case by case), and the median over rounds is printed. A single run's duration includes
//! the harness's own overhead (a clock read, bottom halves off/on), shown by the `ARP` case (an
//! Ethernet header the program rejects at once). Frames the program passes unchanged are also
//! timed with one call of `--repeat` runs, which averages the overhead away.
//!
//! This is a tool for comparing builds on one machine, not a test: nothing is asserted about
//! time.

use std::{net::SocketAddr, time::Instant};

use relay::fastpath::{AttachMode, ChannelBinding, FastPath, TestProgram};
use relay_tests::{
    fastpath::{lab_policy, Installer},
    lab::{ThreeHosts, CLIENT_MAC, PEER_MAC, RELAY_CLIENT_SIDE_MAC, RELAY_PEER_SIDE_MAC},
    packet::{channel_data, UdpFrame},
    require_root,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: &str = "198.18.1.2:40000";
const LISTENER: &str = "198.18.1.1:3478";
const RELAYED: &str = "198.18.2.1:50000";
const PEER: &str = "198.18.2.2:9000";
const CLIENT6: &str = "[2001:2:0:1::2]:40000";
const LISTENER6: &str = "[2001:2:0:1::1]:3478";
const RELAYED6: &str = "[2001:2:0:2::1]:50000";
const PEER6: &str = "[2001:2:0:2::2]:9000";
const CHANNEL: u16 = 0x4001;
const CHANNEL6: u16 = 0x4002;
const PAYLOAD_LEN: usize = 120;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

/// One timed frame.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// Arrives on the relay's peer-side interface (else the client side).
    from_peer_side: bool,
    /// XDP action the program must return, or the numbers mean nothing.
    action: u32,
}

fn cases() -> Vec<Case> {
    let payload: Vec<u8> = (0..PAYLOAD_LEN).map(|i| i as u8).collect();
    let client = |src: &str, dst: &str, payload: &[u8]| {
        UdpFrame::new(
            CLIENT_MAC,
            RELAY_CLIENT_SIDE_MAC,
            addr(src),
            addr(dst),
            payload,
        )
        .build()
    };
    let peer = |src: &str, dst: &str, payload: &[u8]| {
        UdpFrame::new(PEER_MAC, RELAY_PEER_SIDE_MAC, addr(src), addr(dst), payload).build()
    };
    // Ethernet header only, EtherType ARP: rejected by the first check.
    let mut arp = vec![0u8; 14];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let stun = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    vec![
        Case {
            name: "client->peer v4 120B",
            frame: client(CLIENT, LISTENER, &channel_data(CHANNEL, &payload, 0)),
            from_peer_side: false,
            action: XDP_REDIRECT,
        },
        Case {
            name: "client->peer v4 119B+1pad",
            frame: client(
                CLIENT,
                LISTENER,
                &channel_data(CHANNEL, &payload[..PAYLOAD_LEN - 1], 1),
            ),
            from_peer_side: false,
            action: XDP_REDIRECT,
        },
        Case {
            name: "peer->client v4 120B",
            frame: peer(PEER, RELAYED, &payload),
            from_peer_side: true,
            action: XDP_REDIRECT,
        },
        Case {
            name: "client->peer v6 120B",
            frame: client(CLIENT6, LISTENER6, &channel_data(CHANNEL6, &payload, 0)),
            from_peer_side: false,
            action: XDP_REDIRECT,
        },
        Case {
            name: "peer->client v6 120B",
            frame: peer(PEER6, RELAYED6, &payload),
            from_peer_side: true,
            action: XDP_REDIRECT,
        },
        Case {
            name: "pass: STUN to listener",
            frame: client(CLIENT, LISTENER, &stun),
            from_peer_side: false,
            action: XDP_PASS,
        },
        Case {
            name: "pass: peer w/o channel",
            frame: peer("198.18.2.2:9999", RELAYED, &payload),
            from_peer_side: true,
            action: XDP_PASS,
        },
        Case {
            name: "ARP (harness floor)",
            frame: arp,
            from_peer_side: false,
            action: XDP_PASS,
        },
    ]
}

fn bindings() -> Vec<ChannelBinding> {
    // Far beyond any benchmark run.
    let expires_at = Instant::now() + std::time::Duration::from_secs(24 * 3600);
    vec![
        ChannelBinding {
            allocation: 1,
            client: addr(CLIENT),
            listener: addr(LISTENER),
            relayed: addr(RELAYED),
            peer: addr(PEER),
            channel: CHANNEL,
            expires_at,
        },
        ChannelBinding {
            allocation: 2,
            client: addr(CLIENT6),
            listener: addr(LISTENER6),
            relayed: addr(RELAYED6),
            peer: addr(PEER6),
            channel: CHANNEL6,
            expires_at,
        },
    ]
}

struct Options {
    /// `(label, path)` of other builds of the eBPF object to time next to the embedded one.
    objects: Vec<(String, String)>,
    samples: usize,
    rounds: usize,
    repeat: u32,
}

fn options() -> Options {
    let mut options = Options {
        objects: Vec::new(),
        samples: 20_000,
        rounds: 9,
        repeat: 1_000_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--baseline" => options.objects.push(("baseline".to_owned(), value())),
            "--object" => {
                let spec = value();
                let (label, path) = spec
                    .split_once('=')
                    .unwrap_or_else(|| panic!("--object LABEL=PATH, not {spec}"));
                options.objects.push((label.to_owned(), path.to_owned()));
            }
            "--samples" => options.samples = value().parse().expect("--samples N"),
            "--rounds" => options.rounds = value().parse().expect("--rounds N"),
            "--repeat" => options.repeat = value().parse().expect("--repeat N"),
            _ => panic!(
                "usage: xdp_cost [--baseline OBJECT] [--object LABEL=OBJECT]... [--samples N] \
                 [--rounds R] [--repeat N]"
            ),
        }
    }
    options
}

/// One eBPF object loaded in a lab of its own.
struct Subject {
    label: String,
    lab: ThreeHosts,
    client_index: u32,
    peer_index: u32,
    /// `[case][round]` medians of single runs, ns.
    single: Vec<Vec<f64>>,
    /// `[case][round]` averages of one `repeat`ed run (frames that pass unchanged only), ns.
    repeated: Vec<Vec<f64>>,
}

/// A message to the thread that owns one loaded object inside its lab's relay namespace.
type Job = Box<dyn FnOnce(&mut FastPath) + Send>;

fn main() {
    require_root();
    let options = options();
    let cases = cases();

    let mut objects: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for (label, path) in &options.objects {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        objects.push((label.clone(), Some(bytes)));
    }
    objects.push(("current".to_owned(), None));

    // Each object lives on a thread inside its own lab's relay namespace (namespaces are per
    // thread); the main thread hands it work.
    let mut subjects = Vec::new();
    let mut workers = Vec::new();
    for (label, bytes) in objects {
        let lab = ThreeHosts::new();
        lab.force_forwarding_off();
        lab.add_static_neighbours();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let relay_ns = format!("/run/netns/{}", lab.relay.name());
        let (client_if, peer_if) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = label.clone();
        let worker = std::thread::spawn(move || {
            relay_tests::enter_netns(&relay_ns);
            let loaded = match &bytes {
                Some(bytes) => FastPath::load_object(bytes),
                None => FastPath::load(),
            };
            let mut fastpath = loaded.unwrap_or_else(|e| panic!("load {name}: {e}"));
            for dev in [&client_if, &peer_if] {
                fastpath
                    .attach(dev, AttachMode::XdpNative)
                    .unwrap_or_else(|e| panic!("attach {dev}: {e}"));
            }
            fastpath
                .set_peer_policy(&lab_policy())
                .unwrap_or_else(|e| panic!("policy: {e}"));
            let mut installer = Installer::new(&fastpath);
            for binding in bindings() {
                installer.install(&mut fastpath, &binding, false);
            }
            let indices = (ifindex(&client_if), ifindex(&peer_if));
            ready_tx.send(indices).expect("main thread waits");
            for job in rx {
                job(&mut fastpath);
            }
        });
        let (client_index, peer_index) = ready_rx.recv().expect("worker loads the object");
        subjects.push((
            Subject {
                label,
                lab,
                client_index,
                peer_index,
                single: vec![Vec::new(); cases.len()],
                repeated: vec![Vec::new(); cases.len()],
            },
            tx,
        ));
        workers.push(worker);
    }

    eprintln!(
        "{} case(s) x {} object(s) x {} round(s), {} single runs per case and round",
        cases.len(),
        subjects.len(),
        options.rounds,
        options.samples
    );
    for round in 0..options.rounds {
        // Objects take turns case by case, so a burst of load from elsewhere on the machine
        // hits all of them alike.
        for (i, case) in cases.iter().enumerate() {
            for (subject, tx) in &mut subjects {
                let ingress = if case.from_peer_side {
                    subject.peer_index
                } else {
                    subject.client_index
                };
                let (frame, action, samples, repeat) = (
                    case.frame.clone(),
                    // Check the verdict (and warn) in the first round only.
                    (round == 0).then_some(case.action),
                    options.samples,
                    options.repeat,
                );
                let name = case.name;
                let (result_tx, result_rx) = std::sync::mpsc::channel();
                tx.send(Box::new(move |fastpath: &mut FastPath| {
                    result_tx
                        .send(time_case(
                            fastpath, name, &frame, ingress, action, samples, repeat,
                        ))
                        .expect("main thread waits");
                }))
                .expect("worker runs");
                let (single, repeated) = result_rx.recv().expect("worker answers");
                subject.single[i].push(single);
                if let Some(repeated) = repeated {
                    subject.repeated[i].push(repeated);
                }
            }
        }
        eprintln!("round {} of {} done", round + 1, options.rounds);
    }

    println!(
        "\nns/packet, BPF_PROG_TEST_RUN, median over {} rounds (single: median of {} runs with \
         repeat=1, harness overhead included; repeat: average of one call with repeat={}, \
         unchanged frames only)",
        options.rounds, options.samples, options.repeat
    );
    print!("{:<28}", "case");
    for (subject, _) in &subjects {
        print!(
            " {:>16} {:>16}",
            format!("{} single", subject.label),
            format!("{} repeat", subject.label)
        );
    }
    println!();
    for (i, case) in cases.iter().enumerate() {
        print!("{:<28}", case.name);
        for (subject, _) in &subjects {
            let repeated = if subject.repeated[i].is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", median(&mut subject.repeated[i].clone()))
            };
            print!(
                " {:>16.1} {:>16}",
                median(&mut subject.single[i].clone()),
                repeated
            );
        }
        println!();
    }

    for (subject, tx) in subjects {
        drop(tx);
        drop(subject.lab);
    }
    for worker in workers {
        worker.join().expect("worker exits cleanly");
    }
}

/// Times one case: the median of `samples` single runs and, for a frame the program passes
/// unchanged, the average of one call with `repeat` runs.
fn time_case(
    fastpath: &mut FastPath,
    name: &str,
    frame: &[u8],
    ingress: u32,
    action: Option<u32>,
    samples: usize,
    repeat: u32,
) -> (f64, Option<f64>) {
    let (first, _) = fastpath
        .test_run_repeat(TestProgram::Xdp, frame, ingress, 1)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Some(action) = action.filter(|&action| action != first.action) {
        // Not fatal: a scratch build that short-circuits a step on purpose is still worth timing.
        eprintln!(
            "warning: {name}: the program returned {} (want {action}); this object does not \
             forward the case as the fixtures expect",
            first.action
        );
    }
    let mut durations: Vec<f64> = (0..samples)
        .map(|_| {
            let (_, duration) = fastpath
                .test_run_repeat(TestProgram::Xdp, frame, ingress, 1)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            duration.as_nanos() as f64
        })
        .collect();
    let single = median(&mut durations);
    let repeated = (first.action == XDP_PASS && first.frame == frame).then(|| {
        let (_, duration) = fastpath
            .test_run_repeat(TestProgram::Xdp, frame, ingress, repeat)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        duration.as_nanos() as f64
    });
    (single, repeated)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}
