//! Peer address policy: which peer addresses a client may create permissions / channels for and
//! send to (RFC 8656 §21 security considerations, architecture.md "Safety defaults").
//!
//! Evaluation order for a peer address `p` (first match decides):
//!
//! 1. `p` is one of the host's own addresses (the configured listener and relay addresses and
//!    every address on every interface, kept current from netlink; compared after IPv4-mapped
//!    canonicalisation) → denied ([`DenyReason::RelayAddress`]), even if allowed. The server
//!    lets the relayed-address IPs through for client-to-client relaying and checks their
//!    ports itself. A host address found on an interface (not a configured listener or relay
//!    address) that the operator names exactly with [`PeerPolicy::allow_unsafe`] is not denied
//!    here.
//! 2. `p` is in a configured deny CIDR → denied ([`DenyReason::ExplicitDeny`]). Deny always
//!    wins over allow.
//! 3. `p` is exactly an address named with [`PeerPolicy::allow_unsafe`]
//!    (`--allow-peer-unsafe ADDR`) → allowed.
//! 4. `p` is in the **non-overridable tier** ([`NON_OVERRIDABLE`]: unspecified, loopback,
//!    link-local including the 169.254.169.254 metadata service, multicast, broadcast) → denied
//!    with that range's reason, whatever `--allow-peer` says: `--allow-peer 0.0.0.0/0` must not
//!    open the metadata service or the host's loopback services.
//! 5. `p` is in a configured allow CIDR → allowed, **except** that if `p` is an IPv6 encoding of
//!    IPv4 addresses (see below) every embedded IPv4 address must itself pass the full policy
//!    (steps 1–6 applied to the IPv4 address), else denied ([`DenyReason::EmbeddedIpv4`]).
//! 6. `p` is in a default-denied range ([`DEFAULT_DENIED`]) or in a configured NAT64 prefix
//!    ([`PeerPolicy::add_nat64_prefix`]) → denied with that range's reason.
//! 7. Otherwise allowed.
//!
//! # IPv6 encodings of IPv4 (decision)
//!
//! IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible (`::/96`), IPv4-translated
//! (`::ffff:0:0:0/96`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`), 6to4 (`2002::/16`) and Teredo
//! (`2001::/32`) addresses are **denied outright** by default, whatever IPv4 address they carry:
//! a dual-stack relay socket, a NAT64 gateway, a 6to4 or Teredo relay would otherwise deliver to
//! that IPv4 address and bypass the IPv4 policy, and legitimate TURN peers essentially never need
//! these forms. An operator who needs them (e.g. an IPv6-only relay behind NAT64) allows the IPv6
//! prefix explicitly; even then the embedded IPv4 address(es) must be allowed by the IPv4 policy
//! (for Teredo both the server address, bits 32..64, and the client address, the last 32 bits
//! XOR `0xffffffff`). So `allow(64:ff9b::/96)` permits `64:ff9b::8.8.8.8` but never
//! `64:ff9b::169.254.169.254`.
//!
//! NAT64 prefixes follow RFC 6052 §2.2, whose layout depends on the prefix length (/32, /40,
//! /48, /56, /64 or /96; bits 64..72, the "u" octet, never carry address bits). The well-known
//! `64:ff9b::/96` has one layout. Inside the local-use `64:ff9b:1::/48` (RFC 8215) the operator
//! picks the length, most often a /96: an address in a NAT64 prefix configured with
//! [`PeerPolicy::add_nat64_prefix`] (`--nat64-prefix`) is decoded with that prefix's layout;
//! any other address in `64:ff9b:1::/48` is decoded with every layout that fits inside it
//! (/48, /56, /64, /96) and must pass for all of them. Operator prefixes outside
//! `64:ff9b::/96` and `64:ff9b:1::/48` (e.g. `2001:db8:100::/40`) are embeddings only when
//! configured with `--nat64-prefix`; then they are denied by default like the well-known ones.
//!
//! Not treated as embeddings (no fixed prefix): ISATAP interface identifiers.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why a peer address is denied. `Display` names the range (e.g. `loopback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// 0.0.0.0/8, ::/128
    Unspecified,
    /// 127.0.0.0/8, ::1/128
    Loopback,
    /// RFC 1918: 10/8, 172.16/12, 192.168/16
    Private,
    /// fc00::/7
    UniqueLocal,
    /// 169.254.0.0/16 (incl. the 169.254.169.254 metadata service), fe80::/10
    LinkLocal,
    /// fec0::/10 (deprecated)
    SiteLocal,
    /// 100.64.0.0/10 (RFC 6598 shared address space)
    Cgnat,
    /// 224.0.0.0/4, ff00::/8
    Multicast,
    /// 255.255.255.255/32
    Broadcast,
    /// 240.0.0.0/4 (future use)
    Reserved,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32, 3fff::/20
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48
    Benchmarking,
    /// 192.0.0.0/24
    IetfProtocolAssignments,
    /// 192.88.99.0/24 (deprecated 6to4 relay anycast)
    SixToFourRelayAnycast,
    /// 100::/64 (RFC 6666)
    DiscardOnly,
    /// 2001:10::/28, 2001:20::/28 (ORCHID, not routable)
    Orchid,
    /// ::ffff:0:0/96
    Ipv4Mapped,
    /// ::/96
    Ipv4Compatible,
    /// ::ffff:0:0:0/96 (SIIT)
    Ipv4Translated,
    /// 64:ff9b::/96, 64:ff9b:1::/48
    Nat64,
    /// 2002::/16
    SixToFour,
    /// 2001::/32
    Teredo,
    /// In a configured deny CIDR.
    ExplicitDeny(IpNet),
    /// One of the relay's own addresses.
    RelayAddress(IpAddr),
    /// An allowed IPv6 encoding of an IPv4 address that the IPv4 policy denies.
    EmbeddedIpv4(Ipv4Addr),
}

impl DenyReason {
    /// Short, stable label (also usable as a metric label; no addresses in it).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::UniqueLocal => "unique-local",
            Self::LinkLocal => "link-local",
            Self::SiteLocal => "site-local",
            Self::Cgnat => "cgnat",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
            Self::Documentation => "documentation",
            Self::Benchmarking => "benchmarking",
            Self::IetfProtocolAssignments => "ietf-protocol-assignments",
            Self::SixToFourRelayAnycast => "6to4-relay-anycast",
            Self::DiscardOnly => "discard-only",
            Self::Orchid => "orchid",
            Self::Ipv4Mapped => "ipv4-mapped",
            Self::Ipv4Compatible => "ipv4-compatible",
            Self::Ipv4Translated => "ipv4-translated",
            Self::Nat64 => "nat64",
            Self::SixToFour => "6to4",
            Self::Teredo => "teredo",
            Self::ExplicitDeny(_) => "configured-deny",
            Self::RelayAddress(_) => "relay-address",
            Self::EmbeddedIpv4(_) => "embedded-ipv4",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExplicitDeny(net) => write!(f, "configured-deny ({net})"),
            Self::RelayAddress(ip) => write!(f, "relay-address ({ip})"),
            Self::EmbeddedIpv4(ip) => write!(f, "embedded-ipv4 ({ip} is denied)"),
            other => f.write_str(other.as_str()),
        }
    }
}

impl std::error::Error for DenyReason {}

/// A `--nat64-prefix` whose length RFC 6052 §2.2 defines no layout for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("NAT64 prefix {0}: RFC 6052 defines layouts for /32, /40, /48, /56, /64 and /96 only")]
pub struct InvalidNat64Prefix(pub Ipv6Net);

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len))
}

const fn v6(s0: u16, s1: u16, s2: u16, s3: u16, s4: u16, s5: u16, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(s0, s1, s2, s3, s4, s5, 0, 0),
        len,
    ))
}

/// The default-denied ranges, most specific first where they overlap (the first match names the
/// reason).
pub const DEFAULT_DENIED: &[(IpNet, DenyReason)] = &[
    // IPv4
    (v4(0, 0, 0, 0, 8), DenyReason::Unspecified),
    (v4(127, 0, 0, 0, 8), DenyReason::Loopback),
    (v4(10, 0, 0, 0, 8), DenyReason::Private),
    (v4(172, 16, 0, 0, 12), DenyReason::Private),
    (v4(192, 168, 0, 0, 16), DenyReason::Private),
    (v4(169, 254, 0, 0, 16), DenyReason::LinkLocal),
    (v4(100, 64, 0, 0, 10), DenyReason::Cgnat),
    (v4(224, 0, 0, 0, 4), DenyReason::Multicast),
    (v4(255, 255, 255, 255, 32), DenyReason::Broadcast),
    (v4(240, 0, 0, 0, 4), DenyReason::Reserved),
    (v4(192, 0, 2, 0, 24), DenyReason::Documentation),
    (v4(198, 51, 100, 0, 24), DenyReason::Documentation),
    (v4(203, 0, 113, 0, 24), DenyReason::Documentation),
    (v4(198, 18, 0, 0, 15), DenyReason::Benchmarking),
    (v4(192, 0, 0, 0, 24), DenyReason::IetfProtocolAssignments),
    (v4(192, 88, 99, 0, 24), DenyReason::SixToFourRelayAnycast),
    // IPv6 (specific ones before the ::/96 and 2001::/32 embeddings that contain them)
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
        DenyReason::Unspecified,
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
        DenyReason::Loopback,
    ),
    (v6(0, 0, 0, 0, 0, 0xffff, 96), DenyReason::Ipv4Mapped),
    (v6(0, 0, 0, 0, 0xffff, 0, 96), DenyReason::Ipv4Translated),
    (v6(0, 0, 0, 0, 0, 0, 96), DenyReason::Ipv4Compatible),
    (v6(0x64, 0xff9b, 0, 0, 0, 0, 96), DenyReason::Nat64),
    (v6(0x64, 0xff9b, 1, 0, 0, 0, 48), DenyReason::Nat64),
    (v6(0x100, 0, 0, 0, 0, 0, 64), DenyReason::DiscardOnly),
    (v6(0x2001, 0x2, 0, 0, 0, 0, 48), DenyReason::Benchmarking),
    (v6(0x2001, 0x10, 0, 0, 0, 0, 28), DenyReason::Orchid),
    (v6(0x2001, 0x20, 0, 0, 0, 0, 28), DenyReason::Orchid),
    (v6(0x2001, 0, 0, 0, 0, 0, 32), DenyReason::Teredo),
    (v6(0x2001, 0xdb8, 0, 0, 0, 0, 32), DenyReason::Documentation),
    (v6(0x3fff, 0, 0, 0, 0, 0, 20), DenyReason::Documentation),
    (v6(0x2002, 0, 0, 0, 0, 0, 16), DenyReason::SixToFour),
    (v6(0xfc00, 0, 0, 0, 0, 0, 7), DenyReason::UniqueLocal),
    (v6(0xfe80, 0, 0, 0, 0, 0, 10), DenyReason::LinkLocal),
    (v6(0xfec0, 0, 0, 0, 0, 0, 10), DenyReason::SiteLocal),
    (v6(0xff00, 0, 0, 0, 0, 0, 8), DenyReason::Multicast),
];

/// The ranges no `--allow-peer` CIDR overrides (only an exact `--allow-peer-unsafe ADDR`):
/// what is never a legitimate TURN peer and always a way into the host or its cloud
/// (unspecified, loopback, link-local with the 169.254.169.254 metadata service, multicast,
/// broadcast). Every one of them is also in [`DEFAULT_DENIED`], so the kernel's prefix list
/// holds them.
pub const NON_OVERRIDABLE: &[(IpNet, DenyReason)] = &[
    (v4(0, 0, 0, 0, 8), DenyReason::Unspecified),
    (v4(127, 0, 0, 0, 8), DenyReason::Loopback),
    (v4(169, 254, 0, 0, 16), DenyReason::LinkLocal),
    (v4(224, 0, 0, 0, 4), DenyReason::Multicast),
    (v4(255, 255, 255, 255, 32), DenyReason::Broadcast),
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
        DenyReason::Unspecified,
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
        DenyReason::Loopback,
    ),
    (v6(0xfe80, 0, 0, 0, 0, 0, 10), DenyReason::LinkLocal),
    (v6(0xff00, 0, 0, 0, 0, 0, 8), DenyReason::Multicast),
];

/// The local-use NAT64 prefix of RFC 8215, inside which operators choose their own prefix.
const NAT64_LOCAL_USE: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48);

/// The prefix lengths RFC 6052 §2.2 defines an address layout for.
pub const RFC6052_PREFIX_LENGTHS: [u8; 6] = [32, 40, 48, 56, 64, 96];

/// The IPv4 address in `ip` under the RFC 6052 §2.2 layout of a `prefix_len` prefix (the "u"
/// octet, bits 64..72, is skipped); `None` for a length without a layout.
pub fn rfc6052_extract(ip: Ipv6Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let v4 = match prefix_len {
        32 => [o[4], o[5], o[6], o[7]],
        40 => [o[5], o[6], o[7], o[9]],
        48 => [o[6], o[7], o[9], o[10]],
        56 => [o[7], o[9], o[10], o[11]],
        64 => [o[9], o[10], o[11], o[12]],
        96 => [o[12], o[13], o[14], o[15]],
        _ => return None,
    };
    Some(Ipv4Addr::from(v4))
}

/// The IPv4 addresses an IPv6 address encodes under the fixed (well-known) layouts (at most
/// two, for Teredo), or none. Configured NAT64 prefixes are handled by
/// [`PeerPolicy::embedded`].
fn embedded_ipv4(ip: Ipv6Addr) -> [Option<Ipv4Addr>; 2] {
    let s = ip.segments();
    let o = ip.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let is_zero = |range: std::ops::Range<usize>| s[range].iter().all(|&x| x == 0);
    if is_zero(0..5) && s[5] == 0xffff {
        // ::ffff:0:0/96 mapped
        [Some(last32), None]
    } else if is_zero(0..4) && s[4] == 0xffff && s[5] == 0 {
        // ::ffff:0:0:0/96 translated
        [Some(last32), None]
    } else if is_zero(0..6) {
        // ::/96 compatible (includes :: and ::1)
        [Some(last32), None]
    } else if s[0] == 0x64 && s[1] == 0xff9b && is_zero(2..6) {
        // 64:ff9b::/96
        [Some(last32), None]
    } else if s[0] == 0x2002 {
        // 6to4: 2002:V4ADDR::/48
        [Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])), None]
    } else if s[0] == 0x2001 && s[1] == 0 {
        // Teredo: server at bits 32..64, client obfuscated in the last 32 bits.
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::from(!u32::from(last32));
        [Some(server), Some(client)]
    } else {
        [None, None]
    }
}

/// Every address of the host, shared by every copy of a [`PeerPolicy`] (one per worker) and
/// replaced as interfaces gain and lose addresses.
#[derive(Clone, Debug, Default)]
pub struct HostAddresses(Arc<RwLock<BTreeSet<IpAddr>>>);

impl HostAddresses {
    /// Replaces the set (IPv4-mapped IPv6 forms canonicalised; unspecified addresses ignored).
    pub fn replace(&self, ips: impl IntoIterator<Item = IpAddr>) {
        let set: BTreeSet<IpAddr> = ips
            .into_iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = set;
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ip.to_canonical())
    }

    /// The current addresses.
    pub fn snapshot(&self) -> Vec<IpAddr> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

/// Peer address policy; see the module documentation for the evaluation order.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    /// Exact addresses the operator allowed past the non-overridable tier.
    allow_unsafe: Vec<IpAddr>,
    /// Configured NAT64 prefixes (RFC 6052 lengths only).
    nat64: Vec<Ipv6Net>,
    relay_addresses: Vec<IpAddr>,
    host: HostAddresses,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self::safe_default()
    }
}

impl PeerPolicy {
    /// Denies [`DEFAULT_DENIED`]; no allow/deny CIDRs, no relay addresses yet.
    pub fn safe_default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            allow_unsafe: Vec::new(),
            nat64: Vec::new(),
            relay_addresses: Vec::new(),
            host: HostAddresses::default(),
        }
    }

    /// The shared set of host addresses this policy denies (see [`HostAddresses`]).
    pub fn host_addresses(&self) -> &HostAddresses {
        &self.host
    }

    /// Makes this policy use `from`'s host-address set (a reloaded policy keeps the set the
    /// netlink monitor updates).
    pub fn share_host_addresses(&mut self, from: &PeerPolicy) {
        self.host = from.host.clone();
    }

    /// Whether `ip` is one of the host's own addresses (configured or found on an interface)
    /// that peers may not reach. A host address found on an interface that the operator named
    /// with [`PeerPolicy::allow_unsafe`] is not; the configured listener and relay addresses
    /// always are.
    pub fn is_own_address(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.relay_addresses.contains(&canonical)
            || (self.host.contains(canonical) && !self.allow_unsafe.contains(&canonical))
    }

    /// Whether a datagram to `ip` would reach the host: `ip` is one of its own addresses
    /// ([`PeerPolicy::is_own_address`]) or an IPv6 encoding of one (a NAT64, 6to4, Teredo or
    /// mapped form the network would deliver to it). The server checks this per datagram,
    /// because the host gains addresses after permissions were granted.
    pub fn reaches_host(&self, ip: IpAddr) -> bool {
        if self.is_own_address(ip) {
            return true;
        }
        match ip {
            IpAddr::V6(v6) => self
                .embedded(v6)
                .into_iter()
                .any(|v4| self.is_own_address(IpAddr::V4(v4))),
            IpAddr::V4(_) => false,
        }
    }

    /// Whether `ip` is in a configured deny CIDR (which no exception overrides).
    pub fn explicitly_denied(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.deny
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canonical))
    }

    /// The policy as prefixes with a verdict, for the kernel's longest-prefix-match copy: for
    /// every address, the verdict of the longest listed prefix containing it never allows what
    /// [`PeerPolicy::check`] denies. It is conservative where the rules do not depend on
    /// prefixes alone: allowed IPv6 encodings of IPv4 addresses are denied (the kernel then
    /// passes them to the socket path, which applies the full rules). `::/0` and `0.0.0.0/0`
    /// are always present, so every address matches something.
    pub fn kernel_prefixes(&self) -> Vec<(IpNet, bool)> {
        let host = |ip: IpAddr| IpNet::from(ip);
        let mut prefixes: Vec<IpNet> = vec![
            IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
            IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
        ];
        prefixes.extend(DEFAULT_DENIED.iter().map(|(net, _)| *net));
        prefixes.extend(self.allow.iter().copied());
        prefixes.extend(self.deny.iter().copied());
        prefixes.extend(self.nat64.iter().copied().map(IpNet::V6));
        let own: BTreeSet<IpAddr> = self
            .relay_addresses
            .iter()
            .copied()
            .chain(self.host.snapshot())
            .filter(|ip| self.is_own_address(*ip))
            .collect();
        prefixes.extend(own.iter().map(|ip| host(*ip)));
        prefixes.extend(self.allow_unsafe.iter().map(|ip| host(*ip)));
        prefixes.sort_unstable();
        prefixes.dedup();
        prefixes
            .into_iter()
            .map(|net| {
                let single = match net {
                    IpNet::V4(n) => n.prefix_len() == 32,
                    IpNet::V6(n) => n.prefix_len() == 128,
                };
                // A prefix of one address gets that address's exact verdict.
                let allowed = if single {
                    self.check(net.addr()).is_ok()
                } else {
                    self.prefix_allowed(net)
                };
                (net, allowed)
            })
            .collect()
    }

    /// The verdict for addresses whose longest listed prefix is `net`: it depends only on
    /// which listed prefixes contain `net`.
    fn prefix_allowed(&self, net: IpNet) -> bool {
        if self.deny.iter().any(|d| d.contains(&net)) {
            return false;
        }
        if NON_OVERRIDABLE
            .iter()
            .any(|(range, _)| range.contains(&net))
        {
            return false;
        }
        let configured_nat64 = self.nat64.iter().any(|n| IpNet::V6(*n).contains(&net));
        let embedding = configured_nat64
            || DEFAULT_DENIED.iter().any(|(range, reason)| {
                range.contains(&net)
                    && matches!(
                        reason,
                        DenyReason::Ipv4Mapped
                            | DenyReason::Ipv4Compatible
                            | DenyReason::Ipv4Translated
                            | DenyReason::Nat64
                            | DenyReason::SixToFour
                            | DenyReason::Teredo
                    )
            });
        if self.allow.iter().any(|a| a.contains(&net)) {
            return !embedding;
        }
        !embedding && !DEFAULT_DENIED.iter().any(|(range, _)| range.contains(&net))
    }

    /// Explicitly allows `net`, overriding the default deny (e.g. 198.18.0.0/15 in the test lab).
    /// Does not override deny CIDRs or relay addresses.
    pub fn allow(&mut self, net: IpNet) {
        let net = net.trunc();
        if !self.allow.contains(&net) {
            self.allow.push(net);
        }
    }

    /// Explicitly denies `net`; always wins over allow.
    pub fn deny(&mut self, net: IpNet) {
        let net = net.trunc();
        if !self.deny.contains(&net) {
            self.deny.push(net);
        }
    }

    /// Allows exactly `ip` as a peer even though it is in the non-overridable tier
    /// ([`NON_OVERRIDABLE`]), a default-denied range or among the host's interface addresses
    /// (`--allow-peer-unsafe ADDR`). Deny CIDRs and the configured listener and relay addresses
    /// still win.
    pub fn allow_unsafe(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if !self.allow_unsafe.contains(&ip) {
            self.allow_unsafe.push(ip);
        }
    }

    /// Declares `net` a NAT64 prefix of this network (`--nat64-prefix`): its addresses carry an
    /// IPv4 address in the RFC 6052 §2.2 layout of its length, are denied by default, and when
    /// allowed pass only if the IPv4 address does. Lengths other than 32, 40, 48, 56, 64 and 96
    /// have no layout and are refused.
    pub fn add_nat64_prefix(&mut self, net: Ipv6Net) -> Result<(), InvalidNat64Prefix> {
        if !RFC6052_PREFIX_LENGTHS.contains(&net.prefix_len()) {
            return Err(InvalidNat64Prefix(net));
        }
        let net = net.trunc();
        if !self.nat64.contains(&net) {
            self.nat64.push(net);
            // Longest first, so the most specific configured prefix decodes an address.
            self.nat64
                .sort_by_key(|n| std::cmp::Reverse(n.prefix_len()));
        }
        Ok(())
    }

    /// The IPv4 addresses `ip` carries, every one of which must pass the IPv4 policy: the
    /// fixed layouts, the configured NAT64 prefix containing it (its length's layout), or for
    /// the rest of `64:ff9b:1::/48` every layout that fits inside it.
    fn embedded(&self, ip: Ipv6Addr) -> Vec<Ipv4Addr> {
        if let Some(prefix) = self.nat64.iter().find(|n| n.contains(&ip)) {
            return rfc6052_extract(ip, prefix.prefix_len())
                .into_iter()
                .collect();
        }
        if NAT64_LOCAL_USE.contains(&ip) {
            return [48, 56, 64, 96]
                .into_iter()
                .filter_map(|len| rfc6052_extract(ip, len))
                .collect();
        }
        embedded_ipv4(ip).into_iter().flatten().collect()
    }

    /// Replaces the set of the relay's own addresses (listener and relay interface addresses):
    /// always denied, even if allowed. IPv4-mapped IPv6 forms are canonicalised.
    pub fn set_relay_addresses(&mut self, ips: &[IpAddr]) {
        self.relay_addresses = ips.iter().map(|ip| ip.to_canonical()).collect();
        self.relay_addresses.sort_unstable();
        self.relay_addresses.dedup();
    }

    pub fn is_allowed(&self, peer: IpAddr) -> bool {
        self.check(peer).is_ok()
    }

    pub fn check(&self, peer: IpAddr) -> Result<(), DenyReason> {
        let canonical = peer.to_canonical();
        if self.is_own_address(canonical) {
            return Err(DenyReason::RelayAddress(canonical));
        }
        if let Some(net) = self.deny.iter().find(|n| n.contains(&peer)) {
            return Err(DenyReason::ExplicitDeny(*net));
        }
        if self.allow_unsafe.contains(&canonical) {
            return Ok(());
        }
        if let Some((_, reason)) = NON_OVERRIDABLE.iter().find(|(net, _)| net.contains(&peer)) {
            return Err(*reason);
        }
        if self.allow.iter().any(|n| n.contains(&peer)) {
            if let IpAddr::V6(v6) = peer {
                for embedded in self.embedded(v6) {
                    if self.check(IpAddr::V4(embedded)).is_err() {
                        return Err(DenyReason::EmbeddedIpv4(embedded));
                    }
                }
            }
            return Ok(());
        }
        if let IpAddr::V6(v6) = peer {
            if self.nat64.iter().any(|n| n.contains(&v6)) {
                return Err(DenyReason::Nat64);
            }
        }
        match DEFAULT_DENIED.iter().find(|(net, _)| net.contains(&peer)) {
            Some((_, reason)) => Err(*reason),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn default_denied_table() {
        use DenyReason::*;
        let cases: &[(&str, DenyReason)] = &[
            ("0.0.0.0", Unspecified),
            ("0.255.255.255", Unspecified),
            ("::", Unspecified),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("::1", Loopback),
            ("10.0.0.1", Private),
            ("10.255.255.255", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("169.254.0.1", LinkLocal),
            ("169.254.169.254", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", SiteLocal),
            ("100.64.0.1", Cgnat),
            ("100.127.255.255", Cgnat),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("ff0e::1", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("192.0.2.1", Documentation),
            ("198.51.100.1", Documentation),
            ("203.0.113.255", Documentation),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("2001:2::1", Benchmarking),
            ("192.0.0.8", IetfProtocolAssignments),
            ("192.88.99.1", SixToFourRelayAnycast),
            ("100::1", DiscardOnly),
            ("2001:10::1", Orchid),
            ("2001:20::1", Orchid),
            ("::ffff:8.8.8.8", Ipv4Mapped),
            ("::ffff:127.0.0.1", Ipv4Mapped),
            ("::ffff:0:8.8.8.8", Ipv4Translated),
            ("::8.8.8.8", Ipv4Compatible),
            ("::2", Ipv4Compatible),
            ("64:ff9b::8.8.8.8", Nat64),
            ("64:ff9b:1::1", Nat64),
            ("2002:0808:0808::1", SixToFour),
            ("2002:7f00:1::1", SixToFour),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Teredo),
        ];
        let p = PeerPolicy::safe_default();
        for (addr, reason) in cases {
            assert_eq!(p.check(ip(addr)), Err(*reason), "{addr}");
            assert!(!p.is_allowed(ip(addr)), "{addr}");
        }
    }

    #[test]
    fn public_addresses_allowed_and_boundaries() {
        let p = PeerPolicy::safe_default();
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.255",
            "192.0.3.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "2001:db9::1",
            "2001:1::1",
            "2001:3::1",
            "2003::1",
            "fbff::1",
        ] {
            assert_eq!(p.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn display_names_range() {
        assert_eq!(DenyReason::Loopback.to_string(), "loopback");
        let p = PeerPolicy::safe_default();
        assert_eq!(
            p.check(ip("169.254.169.254")).unwrap_err().to_string(),
            "link-local"
        );
        let mut p = PeerPolicy::safe_default();
        p.deny(net("8.8.8.0/24"));
        assert_eq!(
            p.check(ip("8.8.8.8")).unwrap_err().to_string(),
            "configured-deny (8.8.8.0/24)"
        );
    }

    #[test]
    fn allow_overrides_default_deny() {
        let mut p = PeerPolicy::safe_default();
        p.allow(net("198.18.0.0/15"));
        assert!(p.is_allowed(ip("198.18.1.1")));
        assert!(p.is_allowed(ip("198.19.0.2")));
        assert!(
            p.is_allowed(ip("198.20.0.1")),
            "public, outside the benchmark range"
        );
        assert_eq!(p.check(ip("10.0.0.1")), Err(DenyReason::Private));
        // Non-truncated CIDR is normalised.
        let mut p = PeerPolicy::safe_default();
        p.allow(net("10.1.2.3/16"));
        assert!(p.is_allowed(ip("10.1.200.1")));
        assert!(!p.is_allowed(ip("10.2.0.1")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut p = PeerPolicy::safe_default();
        p.allow(net("198.18.0.0/15"));
        p.deny(net("198.18.5.0/24"));
        assert!(p.is_allowed(ip("198.18.4.1")));
        assert_eq!(
            p.check(ip("198.18.5.1")),
            Err(DenyReason::ExplicitDeny(net("198.18.5.0/24")))
        );
        // Deny applies to public addresses too, and the order of calls does not matter.
        let mut p = PeerPolicy::safe_default();
        p.deny(net("8.8.0.0/16"));
        p.allow(net("8.8.8.0/24"));
        assert!(!p.is_allowed(ip("8.8.8.8")));
        assert!(p.is_allowed(ip("8.9.0.1")));
    }

    #[test]
    fn relay_addresses_always_denied() {
        let mut p = PeerPolicy::safe_default();
        p.allow(net("198.18.0.0/15"));
        p.set_relay_addresses(&[ip("198.18.1.1"), ip("203.0.113.10"), ip("2606:4700::1")]);
        assert_eq!(
            p.check(ip("198.18.1.1")),
            Err(DenyReason::RelayAddress(ip("198.18.1.1")))
        );
        assert!(p.is_allowed(ip("198.18.1.2")));
        assert!(!p.is_allowed(ip("2606:4700::1")));
        assert!(p.is_allowed(ip("2606:4700::2")));
        // Mapped form of a relay address, even if the mapped range is allowed.
        p.allow(net("::ffff:0:0/96"));
        assert!(!p.is_allowed(ip("::ffff:198.18.1.1")));
        assert!(p.is_allowed(ip("::ffff:198.18.1.2")));
        // A public relay address.
        p.set_relay_addresses(&[ip("8.8.8.8")]);
        assert!(!p.is_allowed(ip("8.8.8.8")));
        assert!(p.is_allowed(ip("198.18.1.1")), "replaced, not appended");
        // 6to4 / NAT64 forms of the relay address when those prefixes are allowed.
        p.allow(net("2002::/16"));
        p.allow(net("64:ff9b::/96"));
        assert_eq!(
            p.check(ip("2002:0808:0808::1")),
            Err(DenyReason::EmbeddedIpv4(Ipv4Addr::new(8, 8, 8, 8)))
        );
        assert!(!p.is_allowed(ip("64:ff9b::8.8.8.8")));
        assert!(p.is_allowed(ip("64:ff9b::8.8.4.4")));
    }

    #[test]
    fn embedded_ipv4_requires_explicit_allow_and_allowed_v4() {
        let mut p = PeerPolicy::safe_default();
        // Denied outright by default, even when the embedded IPv4 is public.
        for addr in [
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
        ] {
            assert!(!p.is_allowed(ip(addr)), "{addr}");
        }
        p.allow(net("::ffff:0:0/96"));
        p.allow(net("::/96"));
        p.allow(net("::ffff:0:0:0/96"));
        p.allow(net("64:ff9b::/96"));
        p.allow(net("64:ff9b:1::/48"));
        p.add_nat64_prefix(net6("64:ff9b:1::/48"))
            .expect("RFC 6052 length");
        p.allow(net("2002::/16"));
        p.allow(net("2001::/32"));
        let cases: &[(&str, Option<[u8; 4]>)] = &[
            ("::ffff:8.8.8.8", None),
            ("::ffff:127.0.0.1", Some([127, 0, 0, 1])),
            ("::ffff:169.254.169.254", Some([169, 254, 169, 254])),
            ("::ffff:0:8.8.8.8", None),
            ("::ffff:0:10.0.0.1", Some([10, 0, 0, 1])),
            ("::8.8.8.8", None),
            ("::10.1.1.1", Some([10, 1, 1, 1])),
            ("64:ff9b::8.8.8.8", None),
            ("64:ff9b::169.254.169.254", Some([169, 254, 169, 254])),
            ("64:ff9b::192.168.0.1", Some([192, 168, 0, 1])),
            // RFC 6052 /48: 8.8.8.8 -> 64:ff9b:1:0808:08:0800::
            ("64:ff9b:1:808:8:800::", None),
            ("64:ff9b:1:7f00:0:100::", Some([127, 0, 0, 1])),
            ("2002:0808:0808::1", None),
            ("2002:7f00:0001::1", Some([127, 0, 0, 1])),
            ("2002:a9fe:a9fe::", Some([169, 254, 169, 254])),
            // Teredo, RFC 4380 example: server 65.54.227.120, client 192.0.2.45 (documentation).
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                Some([192, 0, 2, 45]),
            ),
            // Server 65.54.227.120, client 8.8.8.8 (!0x08080808 = 0xf7f7f7f7).
            ("2001:0:4136:e378::f7f7:f7f7", None),
            // Server 10.0.0.1 (private), client 8.8.8.8.
            ("2001:0:a00:1::f7f7:f7f7", Some([10, 0, 0, 1])),
        ];
        for (addr, denied) in cases {
            let expect = match denied {
                None => Ok(()),
                Some(o) => Err(DenyReason::EmbeddedIpv4(Ipv4Addr::from(*o))),
            };
            assert_eq!(p.check(ip(addr)), expect, "{addr}");
        }
        // ::1 and :: are in the non-overridable tier before any embedding is looked at.
        assert_eq!(p.check(ip("::1")), Err(DenyReason::Loopback));
        assert_eq!(p.check(ip("::")), Err(DenyReason::Unspecified));
        // Allowing the embedded IPv4 range makes the encoded form pass too.
        p.allow(net("10.0.0.0/8"));
        assert!(p.is_allowed(ip("::ffff:10.0.0.1")));
        // ...but a deny of the IPv4 range still applies to the encoded form.
        p.deny(net("10.9.0.0/16"));
        assert!(!p.is_allowed(ip("::ffff:10.9.0.1")));
        assert!(!p.is_allowed(ip("2002:0a09:0001::1")));
    }

    #[test]
    fn broad_ipv6_allow_still_checks_embedded() {
        let mut p = PeerPolicy::safe_default();
        p.allow(net("::/0"));
        // Explicit allow overrides defaults for plain IPv6...
        assert!(p.is_allowed(ip("fd00::1")));
        // ...but never for IPv6 encodings of denied IPv4.
        assert!(!p.is_allowed(ip("::ffff:127.0.0.1")));
        assert!(!p.is_allowed(ip("::1")));
        assert!(!p.is_allowed(ip("64:ff9b::a9fe:a9fe")));
        assert!(p.is_allowed(ip("::ffff:1.1.1.1")));
    }

    #[test]
    fn default_table_is_well_formed() {
        for (n, _) in DEFAULT_DENIED {
            assert_eq!(*n, n.trunc(), "{n}");
        }
        assert_eq!(
            PeerPolicy::default().check(ip("127.0.0.1")),
            Err(DenyReason::Loopback)
        );
    }

    /// The longest listed prefix containing `addr`, as the kernel's LPM trie finds it.
    fn lpm(prefixes: &[(IpNet, bool)], addr: IpAddr) -> Option<bool> {
        prefixes
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, allow)| *allow)
    }

    /// Addresses at and around the edges of every listed prefix, plus a spread of others.
    fn probes(prefixes: &[(IpNet, bool)]) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (net, _) in prefixes {
            match net {
                IpNet::V4(n) => {
                    for base in [u32::from(n.network()), u32::from(n.broadcast())] {
                        for d in [0u32, 1, 2] {
                            out.push(IpAddr::V4(Ipv4Addr::from(base.wrapping_add(d))));
                            out.push(IpAddr::V4(Ipv4Addr::from(base.wrapping_sub(d))));
                        }
                    }
                }
                IpNet::V6(n) => {
                    for base in [u128::from(n.network()), u128::from(n.broadcast())] {
                        for d in [0u128, 1, 2] {
                            out.push(IpAddr::V6(Ipv6Addr::from(base.wrapping_add(d))));
                            out.push(IpAddr::V6(Ipv6Addr::from(base.wrapping_sub(d))));
                        }
                    }
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(IpAddr::V4(Ipv4Addr::from(x as u32)));
            out.push(IpAddr::V6(Ipv6Addr::from(
                (u128::from(x) << 64) | u128::from(x.rotate_left(29)),
            )));
        }
        out
    }

    #[test]
    fn kernel_prefixes_never_allow_what_the_policy_denies() {
        let mut p = PeerPolicy::safe_default();
        for n in [
            "198.18.0.0/15",
            "10.1.0.0/16",
            "2001:2::/48",
            "::/0",
            "64:ff9b::/96",
        ] {
            p.allow(net(n));
        }
        for n in ["198.18.7.0/24", "10.1.2.3/32", "2001:2:0:9::/64"] {
            p.deny(net(n));
        }
        p.set_relay_addresses(&[ip("198.18.2.1"), ip("2001:2:0:2::1")]);
        p.host_addresses()
            .replace([ip("198.18.1.1"), ip("203.0.113.9"), ip("2001:2:0:1::1")]);
        let prefixes = p.kernel_prefixes();
        let mut allowed = 0;
        for addr in probes(&prefixes) {
            let kernel = lpm(&prefixes, addr).expect("/0 entries match every address");
            if kernel {
                allowed += 1;
                assert!(p.is_allowed(addr), "kernel allows {addr}, policy denies it");
            }
        }
        assert!(
            allowed > 1000,
            "the kernel copy allows almost nothing: {allowed}"
        );
        // Exact answers where the rules depend on prefixes alone.
        for (addr, want) in [
            ("198.18.2.2", true),
            ("198.18.2.1", false),
            ("198.18.1.1", false),
            ("198.18.7.9", false),
            ("10.1.2.3", false),
            ("10.1.2.4", true),
            ("10.2.0.1", false),
            ("8.8.8.8", true),
            ("127.0.0.1", false),
            ("2001:2:0:2::2", true),
            ("2001:2:0:2::1", false),
            ("2001:2:0:9::1", false),
            ("fd00::1", true),
        ] {
            assert_eq!(lpm(&prefixes, ip(addr)), Some(want), "{addr}");
            assert_eq!(p.is_allowed(ip(addr)), want, "{addr}");
        }
        // Conservative where the policy looks inside addresses: an allowed NAT64 form of an
        // allowed IPv4 address takes the socket path.
        assert!(p.is_allowed(ip("64:ff9b::808:808")));
        assert_eq!(lpm(&prefixes, ip("64:ff9b::808:808")), Some(false));
    }

    /// RFC 6052 §2.4's table: 192.0.2.33 under each prefix length.
    #[test]
    fn rfc6052_layouts_decode_the_rfc_examples() {
        for (addr, len) in [
            ("2001:db8:c000:221::", 32),
            ("2001:db8:1c0:2:21::", 40),
            ("2001:db8:122:c000:2:2100::", 48),
            ("2001:db8:122:3c0:0:221::", 56),
            ("2001:db8:122:344:c0:2:2100:0", 64),
            ("2001:db8:122:344::192.0.2.33", 96),
        ] {
            let v6: Ipv6Addr = addr.parse().unwrap();
            assert_eq!(
                rfc6052_extract(v6, len),
                Some(Ipv4Addr::new(192, 0, 2, 33)),
                "{addr} /{len}"
            );
        }
        assert_eq!(rfc6052_extract(Ipv6Addr::LOCALHOST, 80), None);
        let mut p = PeerPolicy::safe_default();
        assert_eq!(
            p.add_nat64_prefix(net6("2001:db8::/80")),
            Err(InvalidNat64Prefix(net6("2001:db8::/80")))
        );
    }

    /// Builds `v4` into `prefix` with the RFC 6052 layout of the prefix's length.
    fn encode6052(prefix: &str, v4: [u8; 4]) -> IpAddr {
        let prefix = net6(prefix);
        let mut o = prefix.network().octets();
        let at: &[usize] = match prefix.prefix_len() {
            32 => &[4, 5, 6, 7],
            40 => &[5, 6, 7, 9],
            48 => &[6, 7, 9, 10],
            56 => &[7, 9, 10, 11],
            64 => &[9, 10, 11, 12],
            _ => &[12, 13, 14, 15],
        };
        for (i, byte) in at.iter().zip(v4) {
            o[*i] = byte;
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }

    #[test]
    fn configured_nat64_prefixes_decode_every_rfc6052_length() {
        for prefix in [
            "2606:4700::/32",
            "2606:4700:100::/40",
            "64:ff9b:1::/48",
            "64:ff9b:1:ab00::/56",
            "64:ff9b:1:abcd::/64",
            "64:ff9b:1:abcd::/96",
        ] {
            let mut p = PeerPolicy::safe_default();
            p.add_nat64_prefix(net6(prefix)).expect("RFC 6052 length");
            // Denied by default, whatever they carry.
            assert_eq!(
                p.check(encode6052(prefix, [8, 8, 8, 8])),
                Err(DenyReason::Nat64),
                "{prefix}"
            );
            p.allow(IpNet::V6(net6(prefix)));
            assert_eq!(
                p.check(encode6052(prefix, [8, 8, 8, 8])),
                Ok(()),
                "{prefix}"
            );
            for bad in [
                [169, 254, 169, 254],
                [127, 0, 0, 1],
                [10, 0, 0, 1],
                [0, 0, 0, 0],
            ] {
                assert_eq!(
                    p.check(encode6052(prefix, bad)),
                    Err(DenyReason::EmbeddedIpv4(Ipv4Addr::from(bad))),
                    "{prefix} carrying {bad:?}"
                );
            }
        }
    }

    #[test]
    fn local_use_nat64_without_a_configured_prefix_checks_every_layout() {
        let mut p = PeerPolicy::safe_default();
        p.allow(net("64:ff9b:1::/48"));
        // A /96 inside the local-use prefix (the usual deployment) carrying the metadata
        // service: the /96 layout decodes it although no prefix is configured.
        let metadata = encode6052("64:ff9b:1:abcd::/96", [169, 254, 169, 254]);
        assert!(
            matches!(p.check(metadata), Err(DenyReason::EmbeddedIpv4(_))),
            "{:?}",
            p.check(metadata)
        );
        // Configuring the /96 decodes with its layout only: a public address passes.
        p.add_nat64_prefix(net6("64:ff9b:1:abcd::/96")).unwrap();
        assert_eq!(
            p.check(encode6052("64:ff9b:1:abcd::/96", [8, 8, 8, 8])),
            Ok(())
        );
        assert!(!p.is_allowed(metadata));
        // Not allowed at all: the default deny names NAT64.
        let p = PeerPolicy::safe_default();
        assert_eq!(
            p.check(encode6052("64:ff9b:1:abcd::/96", [8, 8, 8, 8])),
            Err(DenyReason::Nat64)
        );
    }

    #[test]
    fn no_allow_cidr_opens_the_non_overridable_tier() {
        let mut p = PeerPolicy::safe_default();
        p.allow(net("0.0.0.0/0"));
        p.allow(net("::/0"));
        p.allow(net("169.254.169.254/32"));
        p.allow(net("127.0.0.0/8"));
        for (addr, reason) in [
            ("169.254.169.254", DenyReason::LinkLocal),
            ("127.0.0.1", DenyReason::Loopback),
            ("127.0.0.2", DenyReason::Loopback),
            ("0.0.0.0", DenyReason::Unspecified),
            ("0.1.2.3", DenyReason::Unspecified),
            ("224.0.0.1", DenyReason::Multicast),
            ("255.255.255.255", DenyReason::Broadcast),
            ("::", DenyReason::Unspecified),
            ("::1", DenyReason::Loopback),
            ("fe80::1", DenyReason::LinkLocal),
            ("ff02::1", DenyReason::Multicast),
        ] {
            assert_eq!(p.check(ip(addr)), Err(reason), "{addr}");
        }
        // Overridable defaults stay overridable.
        assert!(p.is_allowed(ip("10.0.0.1")));
        assert!(p.is_allowed(ip("fd00::1")));
        assert!(p.is_allowed(ip("198.18.0.1")));
        // The embedded forms of the tier stay denied too.
        assert!(!p.is_allowed(ip("::ffff:169.254.169.254")));
        assert!(!p.is_allowed(ip("64:ff9b::7f00:1")));
    }

    #[test]
    fn reaches_host_sees_through_ipv6_encodings() {
        let mut p = PeerPolicy::safe_default();
        p.add_nat64_prefix(net6("64:ff9b:1:abcd::/96")).unwrap();
        p.host_addresses().replace([ip("8.8.8.8")]);
        for addr in [
            "8.8.8.8",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "64:ff9b:1:abcd::808:808",
            "2002:808:808::1",
        ] {
            assert!(p.reaches_host(ip(addr)), "{addr}");
        }
        for addr in ["8.8.4.4", "64:ff9b::808:404", "2606:4700::1"] {
            assert!(!p.reaches_host(ip(addr)), "{addr}");
        }
    }

    #[test]
    fn allow_unsafe_names_exact_addresses_only() {
        let mut p = PeerPolicy::safe_default();
        p.allow_unsafe(ip("127.0.0.2"));
        p.allow_unsafe(ip("::ffff:169.254.169.254"));
        assert_eq!(p.check(ip("127.0.0.2")), Ok(()));
        assert_eq!(p.check(ip("127.0.0.3")), Err(DenyReason::Loopback));
        assert_eq!(p.check(ip("169.254.169.254")), Ok(()), "canonicalised");
        assert_eq!(p.check(ip("169.254.169.253")), Err(DenyReason::LinkLocal));
        // A deny CIDR still wins.
        p.deny(net("127.0.0.0/8"));
        assert_eq!(
            p.check(ip("127.0.0.2")),
            Err(DenyReason::ExplicitDeny(net("127.0.0.0/8")))
        );
        // A host address found on an interface may be named; the relay's own configured
        // addresses may not.
        let mut p = PeerPolicy::safe_default();
        p.set_relay_addresses(&[ip("203.0.113.1")]);
        p.host_addresses().replace([ip("8.8.4.4"), ip("8.8.8.8")]);
        p.allow_unsafe(ip("8.8.4.4"));
        p.allow_unsafe(ip("203.0.113.1"));
        assert_eq!(p.check(ip("8.8.4.4")), Ok(()));
        assert!(!p.is_own_address(ip("8.8.4.4")));
        assert_eq!(
            p.check(ip("8.8.8.8")),
            Err(DenyReason::RelayAddress(ip("8.8.8.8")))
        );
        assert_eq!(
            p.check(ip("203.0.113.1")),
            Err(DenyReason::RelayAddress(ip("203.0.113.1")))
        );
    }

    #[test]
    fn kernel_prefixes_hold_the_tier_nat64_layouts_and_unsafe_addresses() {
        let mut p = PeerPolicy::safe_default();
        for n in ["0.0.0.0/0", "::/0", "64:ff9b:1::/48", "2606:4700:100::/40"] {
            p.allow(net(n));
        }
        p.add_nat64_prefix(net6("64:ff9b:1:abcd::/96")).unwrap();
        p.add_nat64_prefix(net6("2606:4700:100::/40")).unwrap();
        p.allow_unsafe(ip("127.0.0.2"));
        p.allow_unsafe(ip("198.18.9.9"));
        p.set_relay_addresses(&[ip("198.18.2.1")]);
        p.host_addresses()
            .replace([ip("198.18.1.1"), ip("198.18.9.9")]);
        let prefixes = p.kernel_prefixes();
        let mut extra: Vec<IpAddr> = Vec::new();
        for prefix in [
            "64:ff9b:1:abcd::/96",
            "2606:4700:100::/40",
            "64:ff9b:1::/48",
        ] {
            for v4 in [
                [8, 8, 8, 8],
                [169, 254, 169, 254],
                [127, 0, 0, 1],
                [1, 1, 1, 1],
            ] {
                extra.push(encode6052(prefix, v4));
            }
        }
        let mut allowed = 0;
        for addr in probes(&prefixes).into_iter().chain(extra) {
            let kernel = lpm(&prefixes, addr).expect("/0 entries match every address");
            if kernel {
                allowed += 1;
                assert!(p.is_allowed(addr), "kernel allows {addr}, policy denies it");
            }
        }
        assert!(
            allowed > 1000,
            "the kernel copy allows almost nothing: {allowed}"
        );
        for (addr, want) in [
            ("127.0.0.2", true),
            ("127.0.0.3", false),
            ("169.254.169.254", false),
            ("198.18.9.9", true),
            ("198.18.1.1", false),
            ("198.18.2.1", false),
            ("fe80::1", false),
            ("8.8.8.8", true),
        ] {
            assert_eq!(lpm(&prefixes, ip(addr)), Some(want), "{addr}");
            assert_eq!(p.is_allowed(ip(addr)), want, "{addr}");
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// Prefixes an operator might list, the tier's among them.
        const NETS: &[&str] = &[
            "0.0.0.0/0",
            "::/0",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "169.254.169.254/32",
            "10.0.0.0/8",
            "198.18.0.0/15",
            "8.8.0.0/16",
            "64:ff9b::/96",
            "64:ff9b:1::/48",
            "64:ff9b:1:abcd::/96",
            "2606:4700::/32",
            "::ffff:0:0/96",
            "2002::/16",
            "fe80::/10",
            "fd00::/8",
        ];
        const NAT64: &[&str] = &[
            "64:ff9b:1::/48",
            "64:ff9b:1:ab00::/56",
            "64:ff9b:1:abcd::/64",
            "64:ff9b:1:abcd::/96",
            "2606:4700::/32",
            "2606:4700:100::/40",
        ];
        const ADDRS: &[&str] = &[
            "127.0.0.2",
            "169.254.169.254",
            "8.8.8.8",
            "10.1.2.3",
            "fe80::1",
            "198.18.0.1",
            "2606:4700::1",
        ];

        fn policy_strategy() -> impl Strategy<Value = PeerPolicy> {
            (
                proptest::sample::subsequence(NETS, 0..5),
                proptest::sample::subsequence(NETS, 0..3),
                proptest::sample::subsequence(NAT64, 0..3),
                proptest::sample::subsequence(ADDRS, 0..3),
                proptest::sample::subsequence(ADDRS, 0..2),
            )
                .prop_map(|(allow, deny, nat64, unsafe_allow, host)| {
                    let mut p = PeerPolicy::safe_default();
                    for n in allow {
                        p.allow(n.parse().unwrap());
                    }
                    for n in deny {
                        p.deny(n.parse().unwrap());
                    }
                    for n in nat64 {
                        p.add_nat64_prefix(n.parse().unwrap()).unwrap();
                    }
                    for a in unsafe_allow {
                        p.allow_unsafe(a.parse().unwrap());
                    }
                    p.set_relay_addresses(&["198.18.2.1".parse().unwrap()]);
                    p.host_addresses()
                        .replace(host.iter().map(|a| a.parse::<IpAddr>().unwrap()));
                    p
                })
        }

        /// Addresses inside the listed prefixes (with random host bits) and anywhere.
        fn addr_strategy() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                any::<u32>().prop_map(|x| IpAddr::V4(Ipv4Addr::from(x))),
                any::<u128>().prop_map(|x| IpAddr::V6(Ipv6Addr::from(x))),
                (proptest::sample::select(NETS), any::<u128>()).prop_map(|(n, bits)| {
                    let net: IpNet = n.parse().unwrap();
                    match net {
                        IpNet::V4(n) => {
                            let host = (bits as u32) & !u32::from(n.netmask());
                            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
                        }
                        IpNet::V6(n) => {
                            let host = bits & !u128::from(n.netmask());
                            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
                        }
                    }
                }),
                (
                    proptest::sample::select(NAT64),
                    proptest::sample::select(
                        &[
                            [8u8, 8, 8, 8],
                            [127, 0, 0, 1],
                            [169, 254, 169, 254],
                            [10, 1, 2, 3],
                            [198, 18, 2, 1],
                        ][..]
                    )
                )
                    .prop_map(|(prefix, v4)| encode6052(prefix, v4)),
                proptest::sample::select(ADDRS).prop_map(|a| a.parse().unwrap()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// For any configuration and address, the kernel's longest-prefix verdict never
            /// allows what `check()` denies.
            #[test]
            fn kernel_prefixes_never_more_permissive(
                policy in policy_strategy(),
                addrs in proptest::collection::vec(addr_strategy(), 64),
            ) {
                let prefixes = policy.kernel_prefixes();
                for addr in addrs {
                    let kernel = lpm(&prefixes, addr).expect("/0 entries match every address");
                    prop_assert!(
                        !kernel || policy.is_allowed(addr),
                        "kernel allows {addr}, policy denies it: {:?}",
                        policy.check(addr)
                    );
                }
            }

            /// No allow CIDR opens the tier; only an exact unsafe address does.
            #[test]
            fn the_tier_needs_an_exact_unsafe_address(
                policy in policy_strategy(),
                addr in addr_strategy(),
            ) {
                let canonical = addr.to_canonical();
                let in_tier = NON_OVERRIDABLE.iter().any(|(n, _)| n.contains(&addr));
                if in_tier && policy.is_allowed(addr) {
                    prop_assert!(policy.allow_unsafe.contains(&canonical), "{addr}");
                }
            }
        }
    }
}
