//! One epoll instance per worker: readiness of all of its sockets (listeners and every relay
//! socket) in one wait.
//!
//! The worker registers the epoll descriptor itself with tokio (`AsyncFd`), so the tokio reactor
//! holds one registration per worker whatever the number of allocations, and the worker learns
//! which sockets are readable from one `epoll_wait` instead of polling each of them. Sockets are
//! level-triggered: one that still holds datagrams after a receive batch is reported again.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Readiness reports taken per `epoll_wait`.
const EVENTS: usize = 256;

pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
        })
    }

    /// Reports `socket` readable under `token` until [`Epoll::remove`].
    pub fn add(&self, socket: RawFd, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, socket, token, false)
    }

    /// Reports `socket` readable, and also writable when `writable`, from now on (a stream
    /// connection watches writability only while it has output the kernel did not take).
    pub fn watch(&self, socket: RawFd, token: u64, writable: bool) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, socket, token, writable)
    }

    fn control(
        &self,
        op: libc::c_int,
        socket: RawFd,
        token: u64,
        writable: bool,
    ) -> io::Result<()> {
        let mut events = libc::EPOLLIN as u32;
        if writable {
            events |= libc::EPOLLOUT as u32;
        }
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: `event` is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, socket, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops reporting `socket` (before it is closed).
    pub fn remove(&self, socket: RawFd) {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since Linux 2.6.9).
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                socket,
                std::ptr::null_mut(),
            )
        };
    }

    /// The sockets ready now, without waiting (at most [`EVENTS`]): each token with whether it
    /// is writable (and not only readable, or closed, which a read reports).
    pub fn ready(&mut self) -> io::Result<impl Iterator<Item = (u64, bool)> + '_> {
        // SAFETY: `events` has room for its length of epoll_events, which the kernel fills.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                0,
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        let n = usize::try_from(n).unwrap_or(0);
        Ok(self
            .events
            .iter()
            .take(n)
            .map(|e| (e.u64, e.events & libc::EPOLLOUT as u32 != 0)))
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
