//! The systemd notification protocol (sd_notify(3)): `READY=1` once the relay serves,
//! `WATCHDOG=1` while every worker is alive, `STOPPING=1` on the way out, `STATUS=` lines for
//! `systemctl status`. Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::{
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
    time::Duration,
};

use tracing::debug;

/// Where notifications go, if anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_str()?.to_owned();
            let address = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, address))
        });
        Self { target }
    }

    /// Sends one notification (newline-separated `KEY=VALUE` lines). Failures are logged at
    /// debug only: the service manager going away must not stop the relay.
    pub fn notify(&self, state: &str) {
        if let Some((socket, address)) = &self.target {
            if let Err(error) = socket.send_to_addr(state.as_bytes(), address) {
                debug!(%error, state, "sd_notify failed");
            }
        }
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, if the watchdog is on for this
    /// process (`WATCHDOG_PID`, when set, names it).
    pub fn watchdog_interval() -> Option<Duration> {
        if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
            if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

/// Counts live workers: each worker thread holds one, dropped when the thread ends, normally
/// or by a panic.
pub struct Alive(pub std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Alive {
    pub fn new(counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(std::sync::Arc::clone(counter))
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
