//! The benchmark's namespace lab (shared/docs/test-lab.md), torn down on drop, so also on
//! error, panic (unwinding) and Ctrl-C (the signal handler only raises a flag; loops see it and
//! return an error, and the drop runs).
//!
//! ```text
//!  client ns                 relay ns                         peer ns
//!  c0 198.18.1.2/24 <-veth-> r_c 198.18.1.1/24  (listener)
//!     (+ .3-.64 for many     r_p 198.18.2.1/24  (relay-ip) <-veth-> p0 198.18.2.2/24
//!      clients)
//! ```
//!
//! IP forwarding stays off in the relay namespace (a new namespace's default; the lab sets no
//! forwarding sysctl, and neither does the relay's fast path need one), so client and peer reach
//! each other only through the relay (`runner::check_isolation` proves it). Every veth end gets GRO on (veth then runs NAPI, whose thread can be
//! pinned, instead of charging the receive to whichever CPU sent) and a threaded NAPI poller:
//! the relay-side pollers run on the relay core, the far-end ones on the generator core, so the
//! relay's core carries exactly the relay's work. The far-end pollers run SCHED_FIFO: they share
//! the generator core with the generator, and veth's 256-frame ring overflows (the relay's
//! redirects fail as xdp_xmit_errors) whenever they wait for a slice, so a slow far end would
//! cap what the benchmark can see of the relay.

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context};

pub const LISTEN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// Client addresses: 198.18.1.2 and up. The relay rate-limits unauthenticated requests per
/// source IP (burst 20), and every allocation starts with one (the 401 challenge), so the
/// 1000-allocation variant spreads its clients over many addresses.
pub const CLIENTS_PER_IP: usize = 16;
pub const CLIENT_IPS: usize = 63;

pub fn client_ip(index: usize) -> Ipv4Addr {
    let host = 2 + (index / CLIENTS_PER_IP) % CLIENT_IPS;
    Ipv4Addr::new(198, 18, 1, host as u8)
}

/// Raised by SIGINT/SIGTERM; every loop of the benchmark checks it.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

pub fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub struct Lab {
    pub client: String,
    pub relay: String,
    pub peer: String,
    /// Client-side veth end (in `client`).
    pub c0: String,
    /// Relay's client-facing end (in `relay`).
    pub r_c: String,
    /// Relay's peer-facing end (in `relay`).
    pub r_p: String,
    /// Peer-side end (in `peer`).
    pub p0: String,
    /// What could not be set up exactly as intended (NAPI pinning etc.), for the report.
    pub notes: Vec<String>,
    /// The far ends' XDP_PASS hooks while attached (see `attach_far_end_pass`).
    far_end_pass: Vec<aya::Ebpf>,
}

const PREFIX: &str = "rbench-";

impl Lab {
    /// Builds the lab; `gen_cpu` runs the far-end NAPI threads, `relay_cpu` the relay-side ones.
    pub fn up(gen_cpu: usize, relay_cpu: usize) -> anyhow::Result<Self> {
        remove_stale_labs();
        let id = format!("{:x}", std::process::id());
        // Devices live in the lab's namespaces, but their NAPI threads (`napi/DEV-N`, 15
        // characters at most) are global: a short suffix keeps those names whole.
        let dev = format!("{:04x}", std::process::id() % 0x1_0000);
        let lab = Self {
            client: format!("{PREFIX}{id}-c"),
            relay: format!("{PREFIX}{id}-r"),
            peer: format!("{PREFIX}{id}-p"),
            c0: format!("rbc{dev}"),
            r_c: format!("rbrc{dev}"),
            r_p: format!("rbrp{dev}"),
            p0: format!("rbp{dev}"),
            notes: Vec::new(),
            far_end_pass: Vec::new(),
        };
        let mut lab = lab;
        for ns in [&lab.client, &lab.relay, &lab.peer] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        lab.veth(&lab.client.clone(), &lab.c0.clone(), &lab.r_c.clone())?;
        lab.veth(&lab.peer.clone(), &lab.p0.clone(), &lab.r_p.clone())?;

        let mut batch = String::new();
        for host in 2..2 + CLIENT_IPS {
            batch.push_str(&format!("addr add 198.18.1.{host}/24 dev {}\n", lab.c0));
        }
        ip_batch(&lab.client, &batch)?;
        ip(&[
            "-n",
            &lab.relay,
            "addr",
            "add",
            "198.18.1.1/24",
            "dev",
            &lab.r_c,
        ])?;
        ip(&[
            "-n",
            &lab.relay,
            "addr",
            "add",
            "198.18.2.1/24",
            "dev",
            &lab.r_p,
        ])?;
        ip(&[
            "-n",
            &lab.peer,
            "addr",
            "add",
            "198.18.2.2/24",
            "dev",
            &lab.p0,
        ])?;
        for (ns, dev) in lab.devices() {
            ip(&["-n", &ns, "link", "set", &dev, "up"])?;
        }
        // Frames a local socket sends over veth carry partial checksums; once an XDP program
        // rewrites and redirects them that state is lost (ebpf-toolchain.md), so the senders
        // the generator uses compute full checksums.
        for (ns, dev) in [(&lab.client, &lab.c0), (&lab.peer, &lab.p0)] {
            exec(ns, "ethtool", &["-K", dev, "tx", "off"])?;
        }
        for (ns, dev) in lab.devices() {
            let cpu = if dev == lab.r_c || dev == lab.r_p {
                relay_cpu
            } else {
                gen_cpu
            };
            let far_end = dev == lab.c0 || dev == lab.p0;
            if let Err(e) = pin_napi(&ns, &dev, cpu, far_end) {
                lab.notes.push(format!("NAPI of {dev} not pinned: {e:#}"));
            }
        }
        // Neighbours resolved up front, so the first flood packets are not queued behind ARP
        // (a datagram to the discard port; the ICMP unreachable that answers it is harmless).
        for (ns, from, to) in [
            (&lab.client, "198.18.1.2:0", "198.18.1.1:9"),
            (&lab.peer, "198.18.2.2:0", "198.18.2.1:9"),
        ] {
            in_ns(ns, move || {
                let s = std::net::UdpSocket::bind(from)?;
                s.send_to(b"arp", to)?;
                Ok(())
            })?;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        Ok(lab)
    }

    fn veth(&self, far_ns: &str, far: &str, near: &str) -> anyhow::Result<()> {
        ip(&[
            "-n",
            far_ns,
            "link",
            "add",
            far,
            "type",
            "veth",
            "peer",
            "name",
            near,
            "netns",
            &self.relay,
        ])
    }

    pub fn devices(&self) -> [(String, String); 4] {
        [
            (self.client.clone(), self.c0.clone()),
            (self.relay.clone(), self.r_c.clone()),
            (self.relay.clone(), self.r_p.clone()),
            (self.peer.clone(), self.p0.clone()),
        ]
    }

    /// Hook for the kernel paths: frames that XDP redirects into a veth are delivered only if
    /// the far end runs an XDP program too (XDP_PASS is enough; ebpf-toolchain.md). Attaches
    /// the benchmark's `relay_bench_pass` from `object` to c0 and p0. The benchmark needs it
    /// only when its far-end sinks (sink.rs, XDP programs themselves) are unavailable.
    pub fn attach_far_end_pass(&mut self, object: &Arc<Vec<u8>>) -> anyhow::Result<()> {
        if !self.far_end_pass.is_empty() {
            return Ok(());
        }
        for (ns, dev) in [(&self.client, &self.c0), (&self.peer, &self.p0)] {
            let hook = super::sink::pass_hook(object, ns, dev)?;
            self.far_end_pass.push(hook);
        }
        Ok(())
    }

    /// Detaches the XDP_PASS hooks (each link goes with its loaded object).
    pub fn detach_far_end_pass(&mut self) {
        self.far_end_pass.clear();
    }

    /// Frames the veth `dev` in `ns` refused to hand to its peer: XDP redirects that found the
    /// peer's ring full (`*xdp_xmit_errors` of `ethtool -S`) plus skbs it dropped (tx_dropped).
    /// On the relay's ends these are frames the relay sent that the far end never took.
    pub fn xmit_drops(&self, ns: &str, dev: &str) -> anyhow::Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ethtool", "-S", dev])
            .output()
            .context("running ethtool -S")?;
        let xdp: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .filter(|(k, _)| k.ends_with("xdp_xmit_errors"))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum();
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat"])
            .arg(format!("/sys/class/net/{dev}/statistics/tx_dropped"))
            .output()
            .context("reading tx_dropped")?;
        let dropped = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        Ok(xdp + dropped)
    }

    /// `Udp` counters of /proc/net/snmp inside `ns`.
    pub fn udp_counters(&self, ns: &str) -> anyhow::Result<UdpCounters> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
            .output()
            .context("reading /proc/net/snmp")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let table = parse_snmp(&text, "Udp").context("no Udp table in /proc/net/snmp")?;
        let ip = parse_snmp(&text, "Ip").context("no Ip table in /proc/net/snmp")?;
        let icmp = parse_snmp(&text, "Icmp").unwrap_or_default();
        let get = |k: &str| table.get(k).copied().unwrap_or(0);
        Ok(UdpCounters {
            ip_in_delivers: ip.get("InDelivers").copied().unwrap_or(0),
            icmp_in: icmp.get("InMsgs").copied().unwrap_or(0),
            in_datagrams: get("InDatagrams"),
            rcvbuf_errors: get("RcvbufErrors"),
            in_errors: get("InErrors"),
            in_csum_errors: get("InCsumErrors"),
            no_ports: get("NoPorts"),
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it (and so their peers).
        for ns in [&self.client, &self.relay, &self.peer] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The counters of one namespace that the benchmark reads.
///
/// Two traps: Udp InDatagrams counts a datagram when a socket *reads* it (so the benchmark
/// drains its receivers before the final snapshot), and Ip InDelivers counts a UDP GSO
/// super-packet once although UDP splits it into many datagrams (the socket path sends with
/// GSO). What reached a namespace is therefore InDatagrams (after the drain) plus the datagrams
/// UDP dropped for want of room (InErrors without the checksum failures).
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpCounters {
    pub ip_in_delivers: u64,
    pub icmp_in: u64,
    pub in_datagrams: u64,
    pub rcvbuf_errors: u64,
    /// Includes RcvbufErrors, checksum errors, and drops under global UDP memory pressure.
    pub in_errors: u64,
    pub in_csum_errors: u64,
    pub no_ports: u64,
}

impl UdpCounters {
    pub fn since(&self, before: &Self) -> Self {
        Self {
            ip_in_delivers: self.ip_in_delivers.saturating_sub(before.ip_in_delivers),
            icmp_in: self.icmp_in.saturating_sub(before.icmp_in),
            in_datagrams: self.in_datagrams.saturating_sub(before.in_datagrams),
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(before.rcvbuf_errors),
            in_errors: self.in_errors.saturating_sub(before.in_errors),
            in_csum_errors: self.in_csum_errors.saturating_sub(before.in_csum_errors),
            no_ports: self.no_ports.saturating_sub(before.no_ports),
        }
    }

    /// UDP datagrams that reached this namespace for an open port with a valid checksum,
    /// whether or not the socket (or UDP memory) had room: the relay delivered them. Valid once
    /// the receiving sockets have been drained.
    pub fn arrived(&self) -> u64 {
        self.in_datagrams + self.in_errors.saturating_sub(self.in_csum_errors)
    }
}

fn parse_snmp(text: &str, proto: &str) -> Option<BTreeMap<String, u64>> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    Some(
        names
            .split_whitespace()
            .skip(1)
            .zip(values.split_whitespace().skip(1))
            .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
            .collect(),
    )
}

/// Labs left by a benchmark that was killed (SIGKILL skips every destructor).
fn remove_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|p| u32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Real-time priority of the far ends' NAPI threads (below the kernel's own per-CPU threads).
const FAR_END_NAPI_PRIORITY: libc::c_int = 20;

/// GRO on (veth then uses NAPI), threaded NAPI, and its kernel thread pinned to `cpu`;
/// `realtime`: SCHED_FIFO, so it runs as soon as frames arrive.
fn pin_napi(ns: &str, dev: &str, cpu: usize, realtime: bool) -> anyhow::Result<()> {
    exec(ns, "ethtool", &["-K", dev, "gro", "on"])?;
    exec(
        ns,
        "sh",
        &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
    )?;
    let wanted = format!("napi/{dev}-");
    let mut pinned = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&wanted) {
            let pid = entry.file_name().to_string_lossy().into_owned();
            run("taskset", &["-p", "-c", &cpu.to_string(), &pid])?;
            if realtime {
                set_fifo(&pid)?;
            }
            pinned += 1;
        }
    }
    if pinned == 0 {
        bail!("no {wanted}* kernel thread (the names are truncated past 15 characters)");
    }
    Ok(())
}

fn set_fifo(pid: &str) -> anyhow::Result<()> {
    let pid: libc::pid_t = pid.parse().context("NAPI thread id")?;
    let param = libc::sched_param {
        sched_priority: FAR_END_NAPI_PRIORITY,
    };
    // SAFETY: `param` is a valid sched_param for the call; the kernel checks the pid.
    if unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) } != 0 {
        bail!(
            "SCHED_FIFO for thread {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn ip_batch(ns: &str, batch: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    child
        .stdin
        .take()
        .context("ip stdin")?
        .write_all(batch.as_bytes())?;
    if !child.wait()?.success() {
        bail!("ip -n {ns} -batch failed");
    }
    Ok(())
}

pub fn exec(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a new thread that entered namespace `ns` (namespaces are per thread; sockets
/// keep the namespace they were created in, so they can be used from any thread afterwards).
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_ns(&path)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

pub fn enter_ns(path: &str) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns only reads the fd, which stays open for the call; CLONE_NEWNET moves just
    // the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only touch
    // the set we own, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ips_stay_in_the_lab_subnet() {
        assert_eq!(client_ip(0), Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(client_ip(999), Ipv4Addr::new(198, 18, 1, 64));
        assert_eq!(client_ip(CLIENTS_PER_IP), Ipv4Addr::new(198, 18, 1, 3));
    }

    #[test]
    fn snmp_table_parses() {
        let text = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    Udp: 10 2 0 5 3\n";
        let t = parse_snmp(text, "Udp").unwrap();
        assert_eq!(t["InDatagrams"], 10);
        assert_eq!(t["RcvbufErrors"], 3);
    }
}
