//! What the benchmark reads: sink sockets, CPU time (process and core), BPF program run time,
//! and a paced latency probe (timestamps in the payload, round trip through an echo at the
//! peer). Packet counts come from the namespaces' /proc/net/snmp (lab.rs), which see every
//! datagram whether or not a socket had room for it.

use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;

use super::lab::{pin_current_thread, STOP};

/// Sets SO_RCVBUF beyond rmem_max (root may), so a sink never drops for want of buffer.
pub fn big_rcvbuf(socket: &UdpSocket, bytes: usize) -> anyhow::Result<()> {
    let value = bytes as libc::c_int;
    // SAFETY: setsockopt reads `value` (a c_int of the given size) from our stack.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE");
    }
    Ok(())
}

/// Reads and discards what is queued on `socket` (bounded), so the next phase starts empty.
pub fn drain(socket: &UdpSocket) -> u64 {
    let mut buf = [0u8; 2048];
    let _ = socket.set_nonblocking(true);
    let mut n = 0;
    while n < 10_000_000 && socket.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    let _ = socket.set_nonblocking(false);
    n
}

pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime of process `pid` (all threads), in clock ticks.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after "pid (comm) ".
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of process `pid`'s live threads in nanoseconds, from each thread's
/// /proc/PID/task/TID/schedstat (first field: time on a CPU, in ns): finer than utime+stime's
/// 10 ms ticks, which a short paced run at a few percent of a core would round to nothing.
/// Threads that exit between two readings drop out, which the servers measured here (tokio
/// workers, coturn's relay threads) do not do while they forward. Without schedstat (a kernel
/// without CONFIG_SCHED_INFO), utime+stime.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            total += ns;
            any = true;
        }
    }
    if any {
        Some(total)
    } else {
        process_ticks(pid).map(|t| t * 1_000_000_000 / clk_tck())
    }
}

/// Non-idle ticks of one CPU (user, nice, system, irq, softirq, steal) from /proc/stat.
pub fn core_busy_ticks(cpu: usize) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let key = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&key))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7).unwrap_or(&0))
}

/// Summed (run_time_ns, run_cnt) of the BPF programs attached to devices in namespace `ns`
/// (XDP and TC); both stay 0 unless `kernel.bpf_stats_enabled` is 1.
pub fn bpf_run_stats(ns: &str) -> Option<(u64, u64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "bpftool", "-j", "net", "show"])
        .output()
        .ok()?;
    let net: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut ids = Vec::new();
    collect_ids(&net, &mut ids);
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return None;
    }
    let (mut time, mut count) = (0, 0);
    for id in ids {
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .ok()?;
        let prog: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        time += prog["run_time_ns"].as_u64().unwrap_or(0);
        count += prog["run_cnt"].as_u64().unwrap_or(0);
    }
    Some((time, count))
}

fn collect_ids(v: &serde_json::Value, out: &mut Vec<u64>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "id" || k == "prog_id" {
                    if let Some(id) = v.as_u64() {
                        out.push(id);
                    }
                }
                collect_ids(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_ids(i, out)),
        _ => {}
    }
}

/// Sets `kernel.bpf_stats_enabled` for the benchmark and restores the old value on drop.
pub struct BpfStatsGuard(Option<String>);

impl BpfStatsGuard {
    pub fn enable() -> Self {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(path).ok();
        if std::fs::write(path, "1").is_err() {
            return Self(None);
        }
        Self(old)
    }
}

impl Drop for BpfStatsGuard {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", old.trim());
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LatencyStats {
    pub sent: u64,
    pub received: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

const PROBE_MAGIC: &[u8; 8] = b"relaylat";

/// Round trips at `rate` per second for `duration`: the client sends ChannelData on `channel`
/// carrying (magic, seq, send time); `peer` echoes each datagram back to where it came from
/// (the relayed address), which the relay turns into ChannelData to the client.
#[expect(
    clippy::too_many_arguments,
    reason = "the probe's knobs, each used once; one call site"
)]
pub fn latency_probe(
    client: &UdpSocket,
    server: SocketAddr,
    channel: u16,
    peer: &UdpSocket,
    rate: u32,
    duration: Duration,
    payload: usize,
    cpu: usize,
) -> anyhow::Result<LatencyStats> {
    drain(peer);
    drain(client);
    let echo = peer.try_clone()?;
    let echo_for = duration + Duration::from_millis(300);
    let echo_thread = std::thread::spawn(move || {
        let _ = pin_current_thread(cpu);
        let mut buf = [0u8; 2048];
        let _ = echo.set_read_timeout(Some(Duration::from_millis(20)));
        let deadline = Instant::now() + echo_for;
        while Instant::now() < deadline && !STOP.load(std::sync::atomic::Ordering::Relaxed) {
            match echo.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let _ = echo.send_to(&buf[..n], from);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    });
    pin_current_thread(cpu)?;
    let epoch = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let total = (duration.as_secs_f64() * f64::from(rate)).ceil() as u64;
    let payload = payload.max(24);
    let mut msg = vec![0u8; 4 + payload];
    msg[..2].copy_from_slice(&channel.to_be_bytes());
    msg[2..4].copy_from_slice(&(payload as u16).to_be_bytes());
    msg[4..12].copy_from_slice(PROBE_MAGIC);
    let mut rtts = Vec::with_capacity(total as usize);
    let mut buf = [0u8; 2048];
    let mut seq = 0u64;
    let drain_until = epoch + duration + Duration::from_millis(200);
    loop {
        let now = Instant::now();
        if seq < total {
            let due = epoch + interval.mul_f64(seq as f64);
            if now >= due {
                msg[12..20].copy_from_slice(&seq.to_be_bytes());
                let t = epoch.elapsed().as_nanos() as u64;
                msg[20..28].copy_from_slice(&t.to_be_bytes());
                client.send_to(&msg, server)?;
                seq += 1;
                continue;
            }
        } else if now >= drain_until || rtts.len() as u64 >= total {
            break;
        }
        let wait = if seq < total {
            (epoch + interval.mul_f64(seq as f64)).saturating_duration_since(now)
        } else {
            drain_until.saturating_duration_since(now)
        };
        client.set_read_timeout(Some(wait.max(Duration::from_micros(50))))?;
        match client.recv_from(&mut buf) {
            Ok((n, _)) if n >= 28 && &buf[4..12] == PROBE_MAGIC => {
                let mut t = [0u8; 8];
                t.copy_from_slice(&buf[20..28]);
                let sent_at = u64::from_be_bytes(t);
                let rtt = epoch.elapsed().as_nanos() as u64 - sent_at;
                rtts.push(rtt);
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        if STOP.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
    }
    client.set_read_timeout(None)?;
    let _ = echo_thread.join();
    rtts.sort_unstable();
    let pct = |p: f64| -> f64 {
        if rtts.is_empty() {
            return 0.0;
        }
        let i = ((rtts.len() as f64 - 1.0) * p).round() as usize;
        rtts[i] as f64 / 1000.0
    };
    Ok(LatencyStats {
        sent: seq,
        received: rtts.len() as u64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: pct(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_ticks_and_core_ticks_read() {
        assert!(process_ticks(std::process::id()).is_some());
        assert!(process_cpu_ns(std::process::id()).is_some_and(|ns| ns > 0));
        assert!(core_busy_ticks(0).is_some());
    }

    #[test]
    fn prog_ids_found_in_bpftool_json() {
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"xdp":[{"devname":"a","ifindex":2,"mode":"driver","id":42}],
                 "tc":[{"devname":"a","kind":"tcx/ingress","name":"x","prog_id":7}]}]"#,
        )
        .unwrap();
        let mut ids = Vec::new();
        collect_ids(&v, &mut ids);
        ids.sort_unstable();
        assert_eq!(ids, vec![7, 42]);
    }
}
