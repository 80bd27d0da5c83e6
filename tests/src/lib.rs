//! Shared helpers for the integration tests: network namespaces, veth pairs, the lab topology.
//!
//! Every namespace and device name carries a per-process unique suffix, so tests run in
//! parallel (nextest runs each in its own process) and never collide. Namespaces are deleted
//! on drop, which also removes the veth ends inside them, even when a test panics.
//! Addresses come only from the benchmark range 198.18.0.0/15 (RFC 2544) and 2001:2::/48.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

pub mod capture;
pub mod fastpath;
pub mod lab;
pub mod packet;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short suffix unique to this process and call (interface names are limited to 15 bytes).
pub fn unique_suffix() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{n:x}", std::process::id() % 0x10_0000)
}

/// Runs a command and returns its output, panicking with the command line and stderr on failure.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Panics with a clear message unless the tests run as root (namespaces and XDP need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, XDP); run it as root"
    );
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `<prefix><unique suffix>` with its loopback up.
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}{}", unique_suffix());
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs any command inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A `Command` that runs `program` inside this namespace (for long-running children).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// Namespaces are per thread, so the caller's thread is never moved.
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Reads `/proc/net/snmp6` counter `name` (e.g. "Udp6InCsumErrors") inside this namespace.
    pub fn snmp6_counter(&self, name: &str) -> u64 {
        let out = self.exec("cat", &["/proc/net/snmp6"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {name} in /proc/net/snmp6"))
    }

    /// Reads `/proc/net/snmp` `Udp` counter `field` (e.g. "InDatagrams") inside this namespace.
    pub fn udp_counter(&self, field: &str) -> u64 {
        let out = self.exec("cat", &["/proc/net/snmp"]);
        parse_snmp(&String::from_utf8_lossy(&out.stdout), "Udp", field)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: a failed delete must not hide the test's own panic.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the namespace mounted at `path`.
pub fn enter_netns(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns only reads the fd, which stays open for the call; CLONE_NEWNET moves just
    // this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Value of `field` in the `proto` table of a /proc/net/snmp dump.
pub fn parse_snmp(snmp: &str, proto: &str, field: &str) -> u64 {
    let prefix = format!("{proto}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no {proto} table in /proc/net/snmp");
    };
    let index = names
        .split_whitespace()
        .position(|n| n == field)
        .unwrap_or_else(|| panic!("no {proto} field {field}"));
    values
        .split_whitespace()
        .nth(index)
        .and_then(|v| v.parse().ok())
        .expect("numeric counter")
}

/// Path of the `relay` binary: `$RELAY_BIN`, or the one cargo built next to this test.
/// `cargo test --workspace` (what `cargo xtask test` runs) builds it with the tests.
pub fn relay_bin() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("RELAY_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/relay
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("relay"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        candidate.exists(),
        "{} is missing: build it with `cargo build -p relay-user` or run `cargo xtask test`",
        candidate.display()
    );
    candidate
}
