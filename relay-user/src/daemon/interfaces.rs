//! Finds the network interfaces that carry given IP addresses (for attaching the fast path).

use std::{
    ffi::CStr,
    io,
    net::{IpAddr, SocketAddr},
};

/// Names of the non-loopback interfaces holding any of `addresses`, without duplicates.
/// Unspecified addresses (0.0.0.0, ::) match every non-loopback interface.
pub fn for_addresses(addresses: &[IpAddr]) -> io::Result<Vec<String>> {
    let mut found = Vec::new();
    for (name, ip) in interface_addresses()? {
        if ip.is_loopback() {
            continue;
        }
        let wanted = addresses
            .iter()
            .any(|a| *a == ip || (a.is_unspecified() && a.is_ipv4() == ip.is_ipv4()));
        if wanted && !found.contains(&name) {
            found.push(name);
        }
    }
    Ok(found)
}

/// The host addresses the listeners answer on, which peers must never be. A wildcard listener
/// is not an address: it stands for every address of its family on this host (as configured at
/// start-up; addresses added later are not covered).
pub fn listener_ips(listen: &[SocketAddr]) -> io::Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = listen
        .iter()
        .map(SocketAddr::ip)
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let wildcards: Vec<bool> = listen
        .iter()
        .filter(|a| a.ip().is_unspecified())
        .map(SocketAddr::is_ipv4)
        .collect();
    if !wildcards.is_empty() {
        let host = interface_addresses()?.into_iter().map(|(_, ip)| ip);
        ips.extend(host.filter(|ip| wildcards.contains(&ip.is_ipv4())));
    }
    ips.sort_unstable();
    ips.dedup();
    Ok(ips)
}

/// Every (interface name, address) pair from getifaddrs(3).
fn interface_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; we free it with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut pairs = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a non-null node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family field is valid.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET means the storage is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6 means the storage is a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        pairs.push((name, ip));
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_stand_for_the_host_addresses_of_their_family() {
        let ips = listener_ips(&["0.0.0.0:3478".parse().unwrap()]).unwrap();
        assert!(ips.contains(&"127.0.0.1".parse().unwrap()), "{ips:?}");
        assert!(ips.iter().all(|ip| ip.is_ipv4() && !ip.is_unspecified()));
        let ips = listener_ips(&[
            "198.51.100.7:3478".parse().unwrap(),
            "[::]:3478".parse().unwrap(),
        ])
        .unwrap();
        assert!(ips.contains(&"198.51.100.7".parse().unwrap()), "{ips:?}");
        assert!(!ips.iter().any(|ip| ip.is_unspecified()), "{ips:?}");
        assert!(ips.iter().filter(|ip| ip.is_ipv4()).count() == 1, "{ips:?}");
    }

    #[test]
    fn loopback_is_never_chosen() {
        let found = for_addresses(&["127.0.0.1".parse().unwrap()]).unwrap();
        assert!(found.is_empty(), "{found:?}");
    }
}
