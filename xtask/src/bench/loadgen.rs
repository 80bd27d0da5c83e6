//! Load generators. The socket generator (sendmmsg over already-connected-enough UDP sockets)
//! works everywhere; its ceiling is measured in every run (generator → sink, no relay), so the
//! report shows whether it limited a path.
//!
//! [`Generator`] is what the runners call. The live-frames generator ([`LiveFramesGenerator`],
//! module `live`) injects frames with BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES and is
//! several times faster than the socket generator: the default whenever it works here.

use std::{
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::lab::{check_stop, pin_current_thread, STOP};

mod live;
pub use live::{mac_of, origin, LiveFramesGenerator};

/// Datagrams from one socket: either one destination (a TURN client's ChannelData to the
/// server, `prefix` = the 4-byte ChannelData header) or many (the peer answering every
/// allocation's relayed address, no prefix).
pub struct SendGroup {
    pub socket: Arc<UdpSocket>,
    pub dests: Vec<SocketAddrV4>,
    pub prefix: Vec<u8>,
}

/// Where a flood's frames enter the lab: the generator's veth end and the veth end facing it
/// (whose MAC address the frames go to). The socket generator does not need it: its sockets
/// carry their namespace and the kernel routes.
#[derive(Clone, Debug)]
pub struct Origin {
    pub netns: String,
    pub dev: String,
    pub next_hop_netns: String,
    pub next_hop_dev: String,
}

pub struct FloodPlan {
    pub groups: Vec<SendGroup>,
    pub origin: Origin,
    /// Application payload bytes after the prefix.
    pub payload: usize,
    pub duration: Duration,
    /// Hard cap, so a loop is bounded in count as well as time.
    pub max_packets: u64,
    pub cpu: usize,
    /// Paced: this many datagrams per second in all (spread over the groups in turn), instead
    /// of as many as the generator can. Only the socket generator paces.
    pub rate_pps: Option<f64>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GenStats {
    pub sent: u64,
    pub elapsed: Duration,
    /// sendmmsg calls that failed (ENOBUFS, EAGAIN): the kernel refused load.
    pub send_errors: u64,
}

pub trait Generator: Send + Sync {
    fn name(&self) -> &'static str;
    /// Sends until the plan's duration or packet cap is reached, from the calling thread
    /// (which it pins to `plan.cpu`).
    fn flood(&self, plan: &FloodPlan) -> anyhow::Result<GenStats>;
}

/// The generator called `name`; `auto` is live-frames when the eBPF object at `ebpf_object`
/// carries its program and this kernel loads it, else socket (the note says why).
pub fn by_name(
    name: &str,
    ebpf_object: &std::path::Path,
) -> anyhow::Result<(Box<dyn Generator>, Option<String>)> {
    match name {
        "socket" => Ok((Box::new(SocketGenerator { batch: 64 }), None)),
        "live-frames" => Ok((Box::new(LiveFramesGenerator::new(ebpf_object)?), None)),
        "auto" => match LiveFramesGenerator::new(ebpf_object) {
            Ok(live) => Ok((Box::new(live), None)),
            Err(e) => Ok((
                Box::new(SocketGenerator { batch: 64 }),
                Some(format!(
                    "live-frames generator unavailable, using socket: {}",
                    format!("{e:#}").lines().next().unwrap_or("")
                )),
            )),
        },
        other => bail!("unknown generator {other:?} (auto, socket, live-frames)"),
    }
}

/// sendmmsg batches of `batch` datagrams, round-robin over the groups.
pub struct SocketGenerator {
    pub batch: usize,
}

/// One group's prebuilt messages. The mmsghdr entries point into `iov`, `names` and `buf`, which
/// live as long as the struct and never move (boxed slices, built once).
struct Prepared {
    fd: i32,
    _buf: Box<[u8]>,
    _iov: Box<[libc::iovec]>,
    _names: Box<[libc::sockaddr_in]>,
    msgs: Box<[libc::mmsghdr]>,
    next: usize,
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

impl Prepared {
    fn new(group: &SendGroup, payload: usize, batch: usize) -> Self {
        let mut buf = group.prefix.clone();
        buf.extend((0..payload).map(|i| (i % 251) as u8));
        let mut buf = buf.into_boxed_slice();
        let len = batch.max(group.dests.len());
        let mut iov: Box<[libc::iovec]> = (0..len)
            .map(|_| libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            })
            .collect();
        let mut names: Box<[libc::sockaddr_in]> = (0..len)
            .map(|i| sockaddr(group.dests[i % group.dests.len()]))
            .collect();
        let msgs = (0..len)
            .map(|i| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = std::ptr::addr_of_mut!(names[i]).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                m.msg_hdr.msg_iov = std::ptr::addr_of_mut!(iov[i]);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        Self {
            fd: group.socket.as_raw_fd(),
            _buf: buf,
            _iov: iov,
            _names: names,
            msgs,
            next: 0,
        }
    }

    /// Sends up to `n` messages; returns how many the kernel took, or None on error.
    fn send(&mut self, n: usize) -> Option<usize> {
        let n = n.min(self.msgs.len() - self.next);
        // SAFETY: msgs[next..next+n] are initialised headers whose pointers target buffers owned
        // by self; the socket fd stays open because the plan (holding the socket) outlives us.
        let rc = unsafe {
            libc::sendmmsg(
                self.fd,
                self.msgs.as_mut_ptr().add(self.next),
                n as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            return None;
        }
        let sent = rc as usize;
        self.next = (self.next + sent) % self.msgs.len();
        Some(sent)
    }
}

impl Generator for SocketGenerator {
    fn name(&self) -> &'static str {
        "socket"
    }

    fn flood(&self, plan: &FloodPlan) -> anyhow::Result<GenStats> {
        pin_current_thread(plan.cpu)?;
        if let Some(rate) = plan.rate_pps {
            return self.paced(plan, rate);
        }
        let mut groups: Vec<Prepared> = plan
            .groups
            .iter()
            .map(|g| Prepared::new(g, plan.payload, self.batch))
            .collect();
        if groups.is_empty() {
            bail!("nothing to send");
        }
        let mut stats = GenStats::default();
        let started = Instant::now();
        let mut i = 0;
        while stats.sent < plan.max_packets {
            if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let n_groups = groups.len();
            let group = &mut groups[i % n_groups];
            i += 1;
            let want = (plan.max_packets - stats.sent).min(self.batch as u64) as usize;
            match group.send(want) {
                Some(n) => stats.sent += n as u64,
                None => {
                    stats.send_errors += 1;
                    std::thread::yield_now();
                }
            }
            if i % 8 == 0 && started.elapsed() >= plan.duration {
                break;
            }
        }
        stats.elapsed = started.elapsed();
        check_stop()?;
        Ok(stats)
    }
}

/// How far a paced sender may fall behind its schedule before the backlog is forgiven (not
/// sent in a burst): a preempted generator must not turn a paced flood into a line-rate burst.
const MAX_LAG: Duration = Duration::from_millis(2);

impl SocketGenerator {
    /// Paced: datagram k leaves at k / rate seconds. Whatever is due is sent at once, up to
    /// `batch` per sendmmsg, from the next group in turn; so at VoIP rates every flow sends one
    /// datagram per turn (each at rate / groups), and at a high rate one flow's batches stay
    /// short (a batch holds what came due since the last call). Between sends it sleeps
    /// (waits over 200 us) or yields (shorter waits).
    fn paced(&self, plan: &FloodPlan, rate: f64) -> anyhow::Result<GenStats> {
        let mut groups: Vec<Prepared> = plan
            .groups
            .iter()
            .map(|g| Prepared::new(g, plan.payload, self.batch))
            .collect();
        if groups.is_empty() || !rate.is_finite() || rate <= 0.0 {
            bail!("nothing to send (rate {rate})");
        }
        let mut stats = GenStats::default();
        let started = Instant::now();
        // Packets the schedule skipped because the generator fell more than MAX_LAG behind.
        let mut forgiven: u64 = 0;
        let max_lag = ((rate * MAX_LAG.as_secs_f64()) as u64).max(self.batch as u64);
        let mut i = 0;
        while stats.sent < plan.max_packets {
            if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let elapsed = started.elapsed();
            if elapsed >= plan.duration {
                break;
            }
            let scheduled = (rate * elapsed.as_secs_f64()) as u64 + 1;
            let mut due = scheduled.saturating_sub(stats.sent + forgiven);
            if due > max_lag {
                forgiven += due - max_lag;
                due = max_lag;
            }
            if due == 0 {
                let next = Duration::from_secs_f64((stats.sent + forgiven) as f64 / rate);
                let wait = next.saturating_sub(elapsed);
                if wait > Duration::from_micros(200) {
                    std::thread::sleep(wait - Duration::from_micros(100));
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            let n_groups = groups.len();
            let group = &mut groups[i % n_groups];
            i += 1;
            let want = due
                .min(plan.max_packets - stats.sent)
                .min(self.batch as u64) as usize;
            match group.send(want) {
                Some(n) => stats.sent += n as u64,
                None => {
                    stats.send_errors += 1;
                    std::thread::yield_now();
                }
            }
        }
        stats.elapsed = started.elapsed();
        check_stop()?;
        Ok(stats)
    }
}
