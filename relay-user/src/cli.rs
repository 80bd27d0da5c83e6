//! Command-line interface of the `relay` binary.

use std::{net::IpAddr, net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// TURN relay (RFC 8656) with a kernel (XDP) fast path for ChannelData.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the TURN server (with no flags: the embedded default config, on loopback).
    Serve(Box<ServeArgs>),
    /// Talk to a running relay's admin endpoint.
    Ctl(CtlArgs),
}

/// The admin endpoint `relay serve` listens on unless told otherwise.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:3479";

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin endpoint of the relay (`relay serve --admin`).
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_ADMIN, global = true)]
    pub admin: SocketAddr,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List allocations: id, user, client, relayed address, peers, channels, path, counters.
    Allocations {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the Prometheus metrics (what `GET /metrics` on the admin endpoint serves).
    Metrics,
    /// `fastpath on|off ALLOCATION` moves one allocation between the kernel and the socket
    /// path; `fastpath default on|off` sets the path for allocations without their own setting.
    Fastpath {
        /// `on`, `off` or `default`.
        #[arg(value_name = "on|off|default")]
        first: String,
        /// The allocation id, or `on`/`off` after `default`.
        #[arg(value_name = "ALLOCATION|on|off")]
        second: String,
    },
    /// End an allocation (or every allocation of a user; a TURN REST username `expiry:user`
    /// counts as its user part): its kernel entries and relay socket go, a TCP/TLS client's
    /// connection closes, and its usage record says `disconnected`. Exits non-zero if there is
    /// no such allocation or the user has none.
    Disconnect {
        /// The allocation id (see `relay ctl allocations`).
        #[arg(
            value_name = "ALLOCATION",
            required_unless_present = "user",
            conflicts_with = "user"
        )]
        allocation: Option<u64>,
        /// End every allocation of this user instead.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Re-read the config (as SIGHUP does): users, REST secrets, peer policy, quotas, log
    /// level, TLS certificate and key; live allocations stay. Exits non-zero with the reason
    /// if anything is invalid or a setting that needs a restart changed (nothing then changes).
    Reload,
    /// Stop taking new allocations (new Allocates are sent to an --alternate-server with 300,
    /// or refused with 508) and stop the relay, exit code 0, once the last allocation ends or
    /// the deadline passes; what SIGUSR1 does without a deadline.
    Drain {
        /// Stop after this long even with allocations left, e.g. 30s, 10m, 1h (default: wait
        /// for the last allocation). Given again, it replaces the deadline.
        #[arg(long, value_name = "DURATION", value_parser = crate::control::drain::parse_duration)]
        deadline: Option<std::time::Duration>,
    },
    /// Show whether the relay runs or drains, its drain deadline and the allocations left.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Which kernel fast path to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FastPathMode {
    /// Socket path only.
    Off,
    /// Native (driver) XDP.
    Xdp,
    /// Generic (SKB) XDP, for interfaces whose driver lacks native XDP.
    XdpGeneric,
    /// TC ingress (TCX), the same forwarding logic on skbs.
    Tc,
}

#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML config file; flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Client-facing UDP listener address (repeatable).
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Client-facing TCP listener address (repeatable): TURN over TCP (RFC 8656 §5); the
    /// relayed side stays UDP.
    #[arg(long = "listen-tcp", value_name = "ADDR:PORT")]
    pub listen_tcp: Vec<SocketAddr>,
    /// Client-facing TLS listener address (repeatable), e.g. 0.0.0.0:443: TURN over TLS 1.2
    /// or 1.3 (RFC 8656 §5, `turns:`); needs --tls-cert and --tls-key.
    #[arg(long = "listen-tls", value_name = "ADDR:PORT")]
    pub listen_tls: Vec<SocketAddr>,
    /// PEM file with the TLS certificate chain (leaf first). Re-read on SIGHUP and
    /// `relay ctl reload`.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the TLS private key (PKCS#8, PKCS#1 or SEC1). Re-read with the certificate.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// TCP and TLS client connections the whole relay holds (beyond: closed at once).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// TCP and TLS client connections from one source IP (IPv6: its /64). Users behind one
    /// NAT share an address, so keep it generous.
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Seconds a new TCP/TLS connection has to finish its TLS handshake and send its first
    /// complete STUN message (slowloris); default 10.
    #[arg(long, value_name = "SECS")]
    pub stream_handshake_timeout: Option<u64>,
    /// Seconds a TCP/TLS connection without an allocation may stay silent; default 60.
    #[arg(long, value_name = "SECS")]
    pub stream_idle_timeout: Option<u64>,
    /// Address relayed transport addresses are allocated on (repeatable: one IPv4, one IPv6).
    #[arg(long = "relay-ip", value_name = "IP")]
    pub relay_ip: Vec<IpAddr>,
    /// Relay port range, e.g. 49152-65535.
    #[arg(long, value_name = "LOW-HIGH")]
    pub port_range: Option<String>,
    /// Authentication realm.
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,
    /// Static long-term credential (repeatable). Visible to every local user in
    /// /proc/PID/cmdline: prefer --users-file.
    #[arg(long = "user", value_name = "NAME:PASSWORD")]
    pub user: Vec<String>,
    /// TURN REST API shared secret (repeatable, for rotation). Visible to every local user in
    /// /proc/PID/cmdline: prefer --auth-secret-file or RELAY_AUTH_SECRET.
    #[arg(long = "auth-secret", value_name = "SECRET")]
    pub auth_secret: Vec<String>,
    /// File with TURN REST API shared secrets, one per line (blank lines and # comments
    /// ignored); added to --auth-secret and to the RELAY_AUTH_SECRET environment variable.
    #[arg(long, value_name = "FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// File with static long-term credentials, one NAME:PASSWORD per line; added to --user.
    #[arg(long, value_name = "FILE")]
    pub users_file: Option<PathBuf>,
    /// Allow peers in this CIDR even if the safe default denies it (repeatable).
    #[arg(long = "allow-peer", value_name = "CIDR")]
    pub allow_peer: Vec<ipnet::IpNet>,
    /// Allow exactly this peer address although it is loopback, unspecified, link-local
    /// (169.254.169.254), multicast, broadcast or an address of this host, which no
    /// --allow-peer CIDR opens (repeatable; unsafe: only for test labs and known services).
    #[arg(long = "allow-peer-unsafe", value_name = "ADDR")]
    pub allow_peer_unsafe: Vec<IpAddr>,
    /// NAT64 prefix of this network (RFC 6052 length /32, /40, /48, /56, /64 or /96;
    /// repeatable): its addresses are denied unless allowed, and the IPv4 address they carry
    /// must pass the IPv4 policy.
    #[arg(long = "nat64-prefix", value_name = "CIDR")]
    pub nat64_prefix: Vec<ipnet::Ipv6Net>,
    /// Deny peers in this CIDR (repeatable; wins over --allow-peer).
    #[arg(long = "deny-peer", value_name = "CIDR")]
    pub deny_peer: Vec<ipnet::IpNet>,
    /// Kernel fast path mode.
    #[arg(long, value_enum, value_name = "MODE")]
    pub fastpath: Option<FastPathMode>,
    /// Interface to attach the fast path to (repeatable).
    #[arg(long = "interface", value_name = "IFACE")]
    pub interface: Vec<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Also accept the RFC 5766 channel numbers 0x5000-0x7FFF in ChannelBind (older clients,
    /// coturn's turnutils_uclient among them, pick from 0x4000-0x7FFF).
    #[arg(long)]
    pub legacy_channels: bool,
    /// Worker threads (default: one per core), each with its own SO_REUSEPORT listener.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Channel bindings the kernel fast path holds (default: sized from the allocation and
    /// channel quotas within a 16 MiB kernel-memory budget; the size is logged at start).
    /// Bindings beyond it stay on the socket path.
    #[arg(long, value_name = "N")]
    pub kernel_bindings: Option<u32>,
    /// Bytes per second of answers to unauthenticated requests (401, 438, 400, Binding) one
    /// source IP (IPv6: its /64) may receive from the whole relay; beyond that they are
    /// dropped and counted (`relay_unauth_refused_total`). Bounds reflection towards a spoofed
    /// address. Default 131072 (about 1,100 401s a second).
    #[arg(long, value_name = "BYTES")]
    pub unauth_rate_bytes: Option<u64>,
    /// Burst of those answers, in bytes, per source (default 65536). A source new to the
    /// relay's table of 65,536 sources (or evicted from it) starts from at most 2048 bytes.
    #[arg(long, value_name = "BYTES")]
    pub unauth_burst_bytes: Option<u64>,
    /// Relayed payload bytes per second one user may send and receive, both directions
    /// together, relay-wide (REST usernames count under their user part). Beyond it datagrams
    /// are dropped and counted (`relay_bandwidth_dropped_total`); a user over it on the kernel
    /// fast path is moved to the socket path, which enforces it. Default: no limit.
    #[arg(long, value_name = "BYTES")]
    pub user_bandwidth: Option<u64>,
    /// Burst of a user's relayed bytes above the rate (default: one second's worth, at least
    /// 65536 bytes).
    #[arg(long, value_name = "BYTES")]
    pub user_bandwidth_burst: Option<u64>,
    /// Allocations the whole relay holds (beyond: 508 Insufficient Capacity).
    #[arg(long, value_name = "N")]
    pub max_allocations: Option<usize>,
    /// Allocations one user holds (beyond: 486 Allocation Quota Reached); a TURN REST username
    /// `expiry:user` counts under its user part. Must be below --max-allocations, so no user can
    /// take the whole relay.
    #[arg(long, value_name = "N")]
    pub max_allocations_per_user: Option<usize>,
    /// Permission lifetime in seconds instead of RFC 8656's 300 (for tests only).
    #[arg(long, value_name = "SECS", hide = true)]
    pub permission_lifetime: Option<u64>,
    /// Channel binding lifetime in seconds instead of RFC 8656's 600 (for tests only).
    #[arg(long, value_name = "SECS", hide = true)]
    pub channel_lifetime: Option<u64>,
    /// Allocation lifetime without a LIFETIME attribute, in seconds, instead of RFC 8656's
    /// 600 (for tests only: an expiry within a test's time).
    #[arg(long, value_name = "SECS", hide = true)]
    pub allocation_lifetime: Option<u64>,
    /// Fault injection (for tests only): the first N receive calls of worker 0 fail with
    /// ENOMEM.
    #[arg(long, value_name = "N", hide = true)]
    pub fault_receive_errors: Option<u32>,
    /// Fault injection (for tests only): worker 0 panics after N client datagrams.
    #[arg(long, value_name = "N", hide = true)]
    pub fault_panic_worker_after: Option<u64>,
    /// Alternate server for ALTERNATE-SERVER (RFC 8489 §10), repeatable, of either family: a
    /// client refused while draining or at --max-allocations is sent (300 Try Alternate) to
    /// one of the family of the address it contacted, never to that address itself.
    #[arg(long = "alternate-server", value_name = "ADDR:PORT")]
    pub alternate_server: Vec<SocketAddr>,
    /// ALTERNATE-DOMAIN sent with that 300 to clients over TLS: the name the alternates'
    /// certificates are checked against (needs --listen-tls and --alternate-server).
    #[arg(long, value_name = "NAME")]
    pub alternate_domain: Option<String>,
    /// A load threshold: from this many allocations relay-wide on, new Allocates are sent to
    /// an --alternate-server (300) of the client's family, while below --max-allocations;
    /// clients with no such alternate are still served. Default: off.
    #[arg(long, value_name = "N")]
    pub redirect_above: Option<usize>,
    /// Local admin endpoint for `relay ctl` (keep it on loopback).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin: Option<SocketAddr>,
    /// User (name or number) to run as once the fast path is attached and the listeners are
    /// bound, when started as root (default: nobody). `root` keeps root.
    #[arg(long, value_name = "USER")]
    pub user_id: Option<String>,
    /// Group (name or number) to run as (default: the user's primary group).
    #[arg(long, value_name = "GROUP")]
    pub group_id: Option<String>,
    /// A read-only HTTP listener for `/metrics`, `/healthz` and `/readyz` that may face the
    /// network (Prometheus, Kubernetes probes); the admin endpoint stays on loopback.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Also append every usage record (one JSON object per ended allocation, see README
    /// "Usage records") to this file, one line each. Opened at start, before root is dropped.
    #[arg(long, value_name = "PATH")]
    pub usage_log: Option<std::path::PathBuf>,
}
