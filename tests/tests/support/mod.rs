//! Processes the interop tests run: the relay itself, coturn's echo peer and TURN client, the
//! aioice client script. Every child is killed when its handle drops, even if a test panics.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

pub mod client;
pub mod echo;
pub mod stream;
pub mod tls;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use relay_tests::relay_bin;

/// How long a child may take to report that it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `relay serve`, stopped with SIGTERM on drop.
pub struct Relay {
    child: Child,
    /// The UDP listener addresses it reported.
    pub listeners: Vec<SocketAddr>,
    /// Its admin endpoint (tests pass `--admin 127.0.0.1:0` unless they choose one).
    pub admin: SocketAddr,
    /// What it was started through (e.g. `ip netns exec NS`): `relay ctl` runs the same way,
    /// since the admin endpoint is on that namespace's loopback.
    prefix: Vec<String>,
    log: Arc<Mutex<String>>,
}

impl Relay {
    /// Starts `relay serve ARGS` (through `prefix`, e.g. `ip netns exec NS`) and waits until
    /// it logs `expect_listeners` listener addresses.
    pub fn start_with(prefix: &[&str], args: &[&str], expect_listeners: usize) -> Self {
        let bin = relay_bin();
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        command.arg("serve").args(args);
        if !args.contains(&"--admin") {
            command.args(["--admin", "127.0.0.1:0"]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start relay");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let address_after = |line: &str, key: &str| {
                line.split(key)
                    .nth(1)
                    .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == ')').next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = address_after(&line, "listening on udp ") {
                    let _ = tx.send((false, addr));
                }
                if let Some(addr) = address_after(&line, "admin endpoint on http://") {
                    let _ = tx.send((true, addr));
                }
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let mut relay = Self {
            child,
            prefix: prefix.iter().map(|s| (*s).to_owned()).collect(),
            listeners: Vec::new(),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
        };
        let mut admin = None;
        while relay.listeners.len() < expect_listeners || admin.is_none() {
            match rx.recv_timeout(START_TIMEOUT) {
                Ok((true, addr)) => admin = Some(addr),
                Ok((false, addr)) => relay.listeners.push(addr),
                Err(_) => panic!("relay did not start:\n{}", relay.log()),
            }
        }
        relay.admin = admin.unwrap_or(relay.admin);
        relay
    }

    /// Starts `relay serve ARGS` on this host and waits for one listener.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(&[], args, 1)
    }

    pub fn listener(&self) -> SocketAddr {
        self.listeners[0]
    }

    /// Runs `relay ctl --admin ADMIN ARGS` and returns (success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let mut command = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(relay_bin());
                c
            }
            None => Command::new(relay_bin()),
        };
        let out = command
            .arg("ctl")
            .args(["--admin", &self.admin.to_string()])
            .args(args)
            .output()
            .expect("run relay ctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `relay ctl allocations --json`, parsed.
    pub fn allocations(&self) -> relay::control::AllocationList {
        let (ok, stdout, stderr) = self.ctl(&["allocations", "--json"]);
        assert!(ok, "relay ctl allocations: {stderr}");
        serde_json::from_str(&stdout).expect("allocation JSON")
    }

    /// One sample from `relay ctl metrics`, e.g. `relay_allocations` or
    /// `relay_relayed_packets_total{path="kernel",direction="to_peer"}`.
    pub fn metric(&self, name: &str) -> u64 {
        let (ok, stdout, stderr) = self.ctl(&["metrics"]);
        assert!(ok, "relay ctl metrics: {stderr}");
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{stdout}"))
    }

    /// One sample from `relay ctl metrics`, or `None` when the relay does not export it (yet).
    pub fn metric_opt(&self, name: &str) -> Option<u64> {
        let (ok, stdout, stderr) = self.ctl(&["metrics"]);
        assert!(ok, "relay ctl metrics: {stderr}");
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// The sum of every sample of metric `family` (e.g. `relay_connections_closed_total`) whose
    /// labels contain each of `labels` (e.g. `transport="tcp"`): 0 when there is none.
    pub fn metric_sum(&self, family: &str, labels: &[&str]) -> u64 {
        let (ok, stdout, stderr) = self.ctl(&["metrics"]);
        assert!(ok, "relay ctl metrics: {stderr}");
        let open = format!("{family}{{");
        stdout
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&open)?;
                let (labelset, value) = rest.split_once("} ")?;
                labels
                    .iter()
                    .all(|l| labelset.split(',').any(|have| have == *l))
                    .then(|| value.trim().parse::<u64>().ok())?
            })
            .sum()
    }

    /// Waits (bounded) until `metric` reads `want`; the last value read.
    pub fn wait_metric(&self, metric: &str, want: u64, within: Duration) -> u64 {
        let deadline = std::time::Instant::now() + within;
        loop {
            let value = self.metric_opt(metric).unwrap_or(u64::MAX);
            if value == want || std::time::Instant::now() >= deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until a TCP socket listens on `addr` in the relay's namespace, without
    /// connecting to it (a probe connection would show up in the connection metrics).
    pub fn wait_tcp_listening(&self, addr: SocketAddr) {
        let filter = format!("sport = :{}", addr.port());
        for _ in 0..100 {
            let mut full: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
            full.extend(["ss", "-Hltn", filter.as_str()]);
            let out = Command::new(full[0])
                .args(&full[1..])
                .output()
                .expect("run ss (iproute2)");
            if String::from_utf8_lossy(&out.stdout).contains(&format!(":{}", addr.port())) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nothing listens on tcp {addr}:\n{}", self.log());
    }

    /// Everything the relay logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The first log line with every one of `needles`, waiting up to 5 s for it (the log is
    /// read from the relay's stderr by a thread, a little behind the relay's answers).
    pub fn wait_for_log_line(&self, needles: &[&str]) -> Option<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let log = self.log();
            if let Some(line) = log
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return Some(line.to_owned());
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The process id (of the relay itself when started through `env` or `ip netns exec`,
    /// which exec it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to end on its own; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread collect the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGKILL (no cleanup of any kind can run) and waits for the process to be gone;
    /// returns the log.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the reader thread collect the last lines.
        std::thread::sleep(Duration::from_millis(50));
        self.log()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the log.
    pub fn stop(mut self) -> String {
        self.terminate();
        self.log()
    }

    fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill only sends a signal to our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                // Let the reader thread collect the final lines.
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
    }
}

/// A child process killed on drop.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A UDP port that was free on `ip` a moment ago.
pub fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// A TCP port that was free on `ip` a moment ago.
pub fn free_tcp_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// coturn's `turnutils_peer`, a UDP echo server, on `ip:port` (through `prefix`).
pub fn echo_peer(prefix: &[&str], ip: &str, port: u16) -> Background {
    let port = port.to_string();
    let mut args: Vec<&str> = prefix.to_vec();
    args.extend(["turnutils_peer", "-L", ip, "-p", &port]);
    let child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start turnutils_peer (coturn package; `cargo xtask setup` installs it)");
    // It binds at once; give it a moment before clients send.
    std::thread::sleep(Duration::from_millis(300));
    Background(child)
}

/// What a `turnutils_uclient` run reported.
#[derive(Debug)]
pub struct UclientReport {
    pub sent: u64,
    pub received: u64,
    pub lost: Option<u64>,
    pub output: String,
}

/// The lab's standard coturn workload: an echo peer on `peer_ip:3480` in namespace `peer_ns`,
/// and `turnutils_uclient` in `client_ns` with 4 sessions x 250 messages of 200 B through the
/// relay at `server:3478` as alice (plus `extra` flags). Asserts zero loss both ways.
pub fn uclient_echo(
    relay: &Relay,
    (client_ns, peer_ns): (&str, &str),
    (peer_ip, server): (&str, &str),
    v6: bool,
    extra: &[&str],
) -> UclientReport {
    let _peer = echo_peer(&["ip", "netns", "exec", peer_ns], peer_ip, 3480);
    let mut args = vec![
        "-u",
        "alice",
        "-w",
        "wonderland",
        "-e",
        peer_ip,
        "-r",
        "3480",
        "-n",
        "250",
        "-m",
        "4",
        "-l",
        "200",
        "-c",
        "-p",
        "3478",
    ];
    if v6 {
        args.push("-x");
    }
    args.extend_from_slice(extra);
    args.push(server);
    let report = uclient(&["ip", "netns", "exec", client_ns], &args);
    assert_eq!(report.lost, Some(0), "{}\n{}", report.output, relay.log());
    assert_eq!(
        (report.sent, report.received),
        (1000, 1000),
        "{}",
        report.output
    );
    report
}

/// Runs `turnutils_uclient ARGS` (through `prefix`) to completion with a time limit.
pub fn uclient(prefix: &[&str], args: &[&str]) -> UclientReport {
    let mut full: Vec<&str> = prefix.to_vec();
    full.extend(["timeout", "120", "turnutils_uclient"]);
    full.extend_from_slice(args);
    let out = Command::new(full[0])
        .args(&full[1..])
        .output()
        .expect("run turnutils_uclient (coturn package; `cargo xtask setup` installs it)");
    parse_uclient(&out)
}

/// [`uclient`] for TURN over TCP/TLS: its report and the messages it sent (what the relay
/// relayed). The relay writes one TLS record per message, as coturn does: uclient's TLS reader
/// reads one message per record and loses the rest of a record carrying several.
pub fn uclient_stream(prefix: &[&str], args: &[&str]) -> (UclientReport, u64) {
    let report = uclient(prefix, args);
    let sent = report.sent;
    (report, sent)
}

fn parse_uclient(out: &Output) -> UclientReport {
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let number_after = |key: &str| -> Option<u64> {
        output.lines().rev().find_map(|line| {
            let rest = line.split(key).nth(1)?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
    };
    UclientReport {
        sent: number_after("tot_send_msgs=").unwrap_or(0),
        received: number_after("tot_recv_msgs=").unwrap_or(0),
        lost: number_after("Total lost packets "),
        output,
    }
}

/// The aioice interop script.
pub fn aioice_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/aioice_turn.py")
}

/// How the aioice script reaches the relay.
#[derive(Clone, Copy, Debug)]
pub enum AioiceTransport<'a> {
    Udp,
    Tcp,
    /// TLS, trusting only the CA certificate in this PEM file.
    Tls(&'a Path),
}

/// Runs the aioice script against `server` with the echo peer on `peer_ip` (through `prefix`).
pub fn run_aioice(prefix: &[&str], server: SocketAddr, user: &str, pass: &str, peer_ip: &str) {
    run_aioice_over(prefix, server, (user, pass), peer_ip, AioiceTransport::Udp);
}

/// [`run_aioice`] over `transport` (UDP, TCP or TLS).
pub fn run_aioice_over(
    prefix: &[&str],
    server: SocketAddr,
    (user, pass): (&str, &str),
    peer_ip: &str,
    transport: AioiceTransport<'_>,
) {
    let script = aioice_script();
    let port = server.port().to_string();
    let ip = server.ip().to_string();
    let mut full: Vec<&str> = prefix.to_vec();
    // Debian's python3 carries python3-aioice, whatever python3 comes first on PATH.
    full.extend(["timeout", "60", "/usr/bin/python3"]);
    full.push(script.to_str().expect("utf-8 path"));
    full.extend([ip.as_str(), port.as_str(), user, pass, peer_ip]);
    match transport {
        AioiceTransport::Udp => {}
        AioiceTransport::Tcp => full.push("tcp"),
        AioiceTransport::Tls(ca) => {
            full.push("tls");
            full.push(ca.to_str().expect("utf-8 path"));
        }
    }
    let out = Command::new(full[0])
        .args(&full[1..])
        .output()
        .expect("run /usr/bin/python3 (python3-aioice; `cargo xtask setup` installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("aioice interop: all steps passed"),
        "aioice interop failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    print!("{stdout}");
}
