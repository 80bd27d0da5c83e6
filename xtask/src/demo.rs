//! `cargo xtask demo`: the relay in the three-namespace lab with the XDP fast path attached,
//! carrying a real third-party TURN client's traffic, shown while it happens.
//!
//! client ns (198.18.1.2, coturn's turnutils_uclient) <-> relay ns (198.18.1.1 listener,
//! 198.18.2.1 relayed; `relay serve --fastpath xdp`) <-> peer ns (198.18.2.2, turnutils_peer)

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::bench::lab::Lab;

/// Messages per uclient session and sessions: enough to watch for a few seconds.
const MESSAGES: &str = "2000";
const SESSIONS: &str = "4";

/// A child process killed on drop (also when the demo fails half-way).
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, program]);
    command
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "relay-user",
            "--bin",
            "relay",
        ])
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("building relay failed");
    }
    let relay_bin = root.join("target/release/relay");
    let relay_bin = relay_bin.to_str().context("utf-8 path")?;

    // Frames the fast path redirects into a veth are only delivered if its far end runs XDP:
    // the lab puts the benchmark's XDP_PASS program there.
    let bench_object = std::fs::read(crate::build_bench_object()?)
        .context("reading the benchmark's eBPF object")?;
    let mut lab = Lab::up(0, 1)?;
    let out = root.join("target/demo");
    std::fs::create_dir_all(&out)?;
    lab.attach_far_end_pass(&std::sync::Arc::new(bench_object))?;
    println!(
        "demo: lab up: {} (198.18.1.2) <-> {} (198.18.1.1 | 198.18.2.1) <-> {} (198.18.2.2)",
        lab.client, lab.relay, lab.peer
    );

    let _peer = Background(
        in_ns(&lab.peer, "turnutils_peer")
            .args(["-L", "198.18.2.2", "-p", "3480"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting turnutils_peer (coturn)")?,
    );
    // Credentials from a file, as operators should pass them (not readable in /proc/PID/cmdline).
    let users = out.join("users");
    std::fs::write(&users, "demo:demo\n").context("writing the demo's users file")?;
    let users = users.to_str().context("UTF-8 path")?.to_owned();
    let mut relay = Background(
        in_ns(&lab.relay, relay_bin)
            .args([
                "serve",
                "--listen",
                "198.18.1.1:3478",
                "--relay-ip",
                "198.18.2.1",
                "--realm",
                "demo",
                "--users-file",
                &users,
                "--allow-peer",
                "198.18.2.0/24",
                "--legacy-channels",
                "--fastpath",
                "xdp",
                "--interface",
                &lab.r_c,
                "--interface",
                &lab.r_p,
            ])
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting relay")?,
    );
    std::thread::sleep(Duration::from_millis(1500));
    if let Some(status) = relay.0.try_wait()? {
        bail!("relay exited early ({status})");
    }
    let shown = Command::new("ip")
        .args(["-n", &lab.relay, "-o", "link", "show"])
        .output()?;
    for line in String::from_utf8_lossy(&shown.stdout).lines() {
        let mut words = line.split_whitespace();
        let device = words.nth(1).unwrap_or_default().trim_end_matches(':');
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(at) = words.iter().position(|w| *w == "prog/xdp") {
            let program = words.get(at + 1..at + 5).unwrap_or_default().join(" ");
            println!("demo: {device}: XDP program attached ({program})");
        }
    }
    println!(
        "demo: turnutils_uclient: {SESSIONS} sessions x {MESSAGES} ChannelData messages of 200 B \
         to the echo peer, through the relay"
    );
    let uclient_log = out.join("uclient.log");
    let log_file = std::fs::File::create(&uclient_log)?;
    let client = in_ns(&lab.client, "turnutils_uclient")
        .args([
            "-u",
            "demo",
            "-w",
            "demo",
            "-e",
            "198.18.2.2",
            "-r",
            "3480",
            "-n",
            MESSAGES,
            "-m",
            SESSIONS,
            "-l",
            "200",
            "-z",
            "2",
            "-c",
            "198.18.1.1",
        ])
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting turnutils_uclient (coturn)")?;
    let mut client = Background(client);

    // Mid-flow: the allocations are on the kernel path and its counters grow.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut shown_table = false;
    while Instant::now() < deadline {
        if client.0.try_wait()?.is_some() {
            break;
        }
        let table = ctl(&lab.relay, relay_bin, &["allocations"])?;
        let carrying = table
            .lines()
            .skip(2)
            .any(|l| l.contains("kernel") && l.split_whitespace().nth(9).is_some_and(|n| n != "0"));
        if carrying && !shown_table {
            println!("demo: relay ctl allocations (mid-flow):\n{table}");
            shown_table = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if client.0.try_wait()?.is_none() {
        bail!("turnutils_uclient did not finish within a minute");
    }
    let report = std::fs::read_to_string(&uclient_log)?;
    for line in report
        .lines()
        .filter(|l| l.contains("tot_send_msgs") || l.contains("Total lost packets"))
        .rev()
        .take(2)
    {
        println!(
            "demo: uclient: {}",
            line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ':' || c == ' ')
        );
    }
    let metrics = ctl(&lab.relay, relay_bin, &["metrics"])?;
    println!("demo: what each path relayed (relay ctl metrics):");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("relay_relayed_packets_total"))
    {
        println!("demo:   {line}");
    }
    let kernel = metric(&metrics, "path=\"kernel\",direction=\"to_peer\"");
    let socket = metric(&metrics, "path=\"socket\",direction=\"to_peer\"");

    // SAFETY: kill only signals the child we started; its pid is valid until we wait on it.
    unsafe { libc::kill(relay.0.id() as i32, libc::SIGINT) };
    let status = relay.0.wait()?;
    lab.detach_far_end_pass();
    println!("demo: relay exited ({status}); lab torn down");
    if kernel == 0 {
        bail!("the kernel fast path forwarded nothing (socket path carried {socket})");
    }
    println!(
        "demo: the XDP fast path forwarded {kernel} ChannelData datagrams client -> peer; the \
         socket path carried {socket}"
    );
    Ok(())
}

/// `relay ctl ARGS` inside the relay namespace (the admin endpoint is on its loopback).
fn ctl(ns: &str, relay_bin: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = in_ns(ns, relay_bin).arg("ctl").args(args).output()?;
    if !out.status.success() {
        bail!("relay ctl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metric(metrics: &str, labels: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.contains(labels))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
