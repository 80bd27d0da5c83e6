//! Dropping root once the privileged start is done.
//!
//! Loading and attaching the kernel programs, raising RLIMIT_MEMLOCK and binding the
//! listeners need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_RESOURCE, ...). Everything after —
//! parsing STUN from the internet, the recvmmsg/cmsg code, the admin endpoint — does not, so the
//! daemon switches to an unprivileged user (`--user-id`, default `nobody` when started as root)
//! and keeps only what the rest of the run needs:
//! - CAP_NET_ADMIN: asking the kernel to resolve a neighbour (RTM_NEWNEIGH with NTF_USE) for
//!   the fast path's next hops, and detaching programs attached through netlink at exit on
//!   kernels without BPF links (XDP before 5.9, TC before 6.6).
//! - CAP_NET_BIND_SERVICE, only when a listener or the relayed port range is below 1024.
//!
//! Nothing else needs a capability: map updates and lookups go through the map file
//! descriptors opened while root (the kernel checks the descriptor, not the caller), BPF links
//! detach when their descriptors close, and route, link and address queries are unprivileged.
//! The bounding set is cut to the same capabilities and `no_new_privs` is set, so no later
//! `execve` can regain anything.

use std::ffi::CString;

use anyhow::{bail, ensure, Context};
use tracing::{info, warn};

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// The user the daemon becomes when started as root without `--user-id`.
const DEFAULT_USER: &str = "nobody";

/// Who the daemon runs as after the start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// The identity to switch to: `None` when the process is not root (nothing to drop) or the
/// operator asked to stay root (`--user-id root` or `0`).
pub fn resolve(user: Option<&str>, group: Option<&str>) -> anyhow::Result<Option<Identity>> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        ensure!(
            user.is_none() && group.is_none(),
            "--user-id/--group-id need the relay to start as root (it runs as uid {euid})"
        );
        return Ok(None);
    }
    let user = user.unwrap_or(DEFAULT_USER);
    let (uid, primary_gid) = lookup_user(user)?;
    if uid == 0 {
        warn!("--user-id {user}: the relay keeps running as root");
        return Ok(None);
    }
    let gid = match group {
        Some(group) => lookup_group(group)?,
        None => primary_gid.with_context(|| {
            format!("--user-id {user} has no passwd entry: give its group with --group-id")
        })?,
    };
    Ok(Some(Identity {
        user: user.to_owned(),
        uid,
        gid,
    }))
}

/// Switches the process to `identity`, keeping CAP_NET_ADMIN and, with `bind_low_ports`,
/// CAP_NET_BIND_SERVICE. Must run while the process has a single thread: credentials and
/// capabilities are per thread, and threads started later inherit them.
pub fn drop_to(identity: &Identity, bind_low_ports: bool) -> anyhow::Result<()> {
    ensure!(
        thread_count()? == 1,
        "internal error: privileges must be dropped before any thread starts"
    );
    let mut keep = 1u32 << CAP_NET_ADMIN;
    if bind_low_ports {
        keep |= 1 << CAP_NET_BIND_SERVICE;
    }
    cut_bounding_set(keep)?;
    // SAFETY: prctl with these constant arguments only changes this thread's flags.
    let result = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    check(result, "PR_SET_KEEPCAPS")?;
    let groups = [identity.gid];
    // SAFETY: `groups` outlives the call and holds exactly one gid.
    let result = unsafe { libc::setgroups(1, groups.as_ptr()) };
    check(result, "setgroups")?;
    // SAFETY: plain syscalls on this (only) thread's credentials.
    let result = unsafe { libc::setresgid(identity.gid, identity.gid, identity.gid) };
    check(result, "setresgid")?;
    // SAFETY: as above.
    let result = unsafe { libc::setresuid(identity.uid, identity.uid, identity.uid) };
    check(result, "setresuid")?;
    set_capabilities(keep)?;
    // SAFETY: prctl with constant arguments.
    let result = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    check(result, "PR_SET_KEEPCAPS")?;
    // SAFETY: as above.
    let result = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(result, "PR_SET_NO_NEW_PRIVS")?;
    // Root must be gone for good.
    // SAFETY: a plain syscall; it must fail.
    if unsafe { libc::setuid(0) } == 0 {
        bail!("internal error: still able to become root after dropping privileges");
    }
    info!(
        user = %identity.user,
        uid = identity.uid,
        gid = identity.gid,
        "dropped root: running unprivileged with CAP_NET_ADMIN{}",
        if bind_low_ports {
            " and CAP_NET_BIND_SERVICE"
        } else {
            ""
        }
    );
    Ok(())
}

/// `(uid, primary gid)` of a user name or number (a number without a passwd entry has no
/// primary group).
fn lookup_user(user: &str) -> anyhow::Result<(u32, Option<u32>)> {
    let name = CString::new(user).context("--user-id contains a NUL byte")?;
    // SAFETY: an all-zero `passwd` is a valid value of this plain C struct.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer length is its real length.
    let status = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status == 0 && !found.is_null() {
        return Ok((entry.pw_uid, Some(entry.pw_gid)));
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok((uid, None)),
        Err(_) => bail!("--user-id {user}: no such user"),
    }
}

/// The gid of a group name or number.
fn lookup_group(group: &str) -> anyhow::Result<u32> {
    let name = CString::new(group).context("--group-id contains a NUL byte")?;
    // SAFETY: an all-zero `group` is a valid value of this plain C struct.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer length is its real length.
    let status = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status == 0 && !found.is_null() {
        return Ok(entry.gr_gid);
    }
    group
        .parse::<u32>()
        .map_err(|_| anyhow::anyhow!("--group-id {group}: no such group"))
}

/// Removes every capability but `keep` from the bounding set (needs CAP_SETPCAP: done while
/// still root).
fn cut_bounding_set(keep: u32) -> anyhow::Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .context("parsing /proc/sys/kernel/cap_last_cap")?;
    for cap in 0..=last {
        if cap < 32 && keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with plain integer arguments.
        let result = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        check(result, "PR_CAPBSET_DROP")?;
    }
    Ok(())
}

/// Sets this thread's permitted and effective sets to `keep` (capabilities below 32), the
/// inheritable set empty.
fn set_capabilities(keep: u32) -> anyhow::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: keep,
            permitted: keep,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads one header and two data structs of the version-3 layout, which
    // both outlive the call.
    let result =
        unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    check(result as libc::c_int, "capset")
}

/// Threads of this process (/proc/self/status).
fn thread_count() -> anyhow::Result<usize> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
        .context("no thread count in /proc/self/status")
}

fn check(result: libc::c_int, call: &str) -> anyhow::Result<()> {
    if result == -1 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("{call} failed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_and_number() {
        assert_eq!(lookup_user("root").unwrap(), (0, Some(0)));
        assert_eq!(lookup_user("4242").unwrap(), (4242, None));
        assert!(lookup_user("no-such-user-here").is_err());
        assert_eq!(lookup_group("root").unwrap(), 0);
        assert_eq!(lookup_group("4243").unwrap(), 4243);
        assert!(lookup_group("no-such-group-here").is_err());
    }
}
