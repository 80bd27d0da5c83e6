//! Process limits the configured capacity needs, set at start while the relay is still root.
//!
//! Every allocation holds a relay socket (two for a dual allocation, RFC 8656 §7.2), so
//! `--max-allocations` needs that many file descriptors on top of the listeners, the admin
//! endpoint and netlink: with the common default of 1024 a busy relay would start answering
//! 508 long before its cap. The soft limit is raised to what is needed, the hard limit too
//! when the relay may (CAP_SYS_RESOURCE); when neither is possible the log says how many
//! allocations the limit allows.

use tracing::{info, warn};

/// Descriptors besides relay sockets: listeners per worker, admin and metrics listeners and
/// their connections, epoll, netlink, the kernel maps and programs.
const BASE_DESCRIPTORS: u64 = 256;

/// Descriptors `max_allocations` allocations need at most (every one of them dual).
pub fn needed(max_allocations: usize) -> u64 {
    BASE_DESCRIPTORS + 2 * max_allocations as u64
}

/// Raises RLIMIT_NOFILE to `needed` (soft, and hard if it must and may); returns the soft
/// limit in force afterwards.
pub fn raise_open_files(needed: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(
            "cannot read RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        return 0;
    }
    if limit.rlim_cur >= needed {
        return limit.rlim_cur;
    }
    let wanted = libc::rlimit {
        rlim_cur: needed,
        rlim_max: limit.rlim_max.max(needed),
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        info!(
            from = limit.rlim_cur,
            to = needed,
            "raised the open-file limit for the configured allocations"
        );
        return needed;
    }
    // Not allowed to raise the hard limit: go as far as it allows.
    let capped = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    let soft = if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } == 0 {
        limit.rlim_max
    } else {
        limit.rlim_cur
    };
    warn!(
        soft,
        needed,
        "the open-file limit (RLIMIT_NOFILE) allows about {} allocations, fewer than \
         --max-allocations: beyond them Allocate gets 508; raise the limit \
         (systemd LimitNOFILE=, ulimit -n) or lower --max-allocations",
        soft.saturating_sub(BASE_DESCRIPTORS) / 2
    );
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allocation_may_be_dual() {
        assert_eq!(needed(0), BASE_DESCRIPTORS);
        assert_eq!(needed(16_384), BASE_DESCRIPTORS + 32_768);
    }
}
