//! Daemon configuration: the embedded defaults, then an optional TOML file, then flags.
//!
//! The TOML keys are the long flag names (`listen`, `relay-ip`, `port-range`, `realm`, `user`,
//! `auth-secret`, `auth-secret-file`, `users-file`, `allow-peer`, `allow-peer-unsafe`, `nat64-prefix`, `deny-peer`, `fastpath`, `interface`, `log-level`,
//! `admin`, `legacy-channels`, `workers`, `kernel-bindings`, `max-allocations`,
//! `max-allocations-per-user`, `unauth-rate-bytes`, `unauth-burst-bytes`, `user-bandwidth`,
//! `user-bandwidth-burst`, `user-id`, `group-id`,
//! `metrics`, `listen-tcp`, `listen-tls`, `tls-cert`, `tls-key`, `max-connections`,
//! `max-connections-per-ip`, `stream-handshake-timeout`, `stream-idle-timeout`,
//! `alternate-server`, `alternate-domain`, `redirect-above`, `usage-log`); a key the file does not set keeps the layer below, a flag given on the command line
//! replaces the file's value (lists are replaced, not merged).

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context};
use ipnet::{IpNet, Ipv6Net};
use serde::Deserialize;

use crate::cli::{FastPathMode, ServeArgs};

/// The configuration `relay serve` runs with when given no flags: loopback only.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// One configuration layer as written in TOML; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub listen: Option<Vec<SocketAddr>>,
    pub listen_tcp: Option<Vec<SocketAddr>>,
    pub listen_tls: Option<Vec<SocketAddr>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub stream_handshake_timeout: Option<u64>,
    pub stream_idle_timeout: Option<u64>,
    pub relay_ip: Option<Vec<IpAddr>>,
    pub port_range: Option<String>,
    pub realm: Option<String>,
    pub user: Option<Vec<String>>,
    pub auth_secret: Option<Vec<String>>,
    pub auth_secret_file: Option<PathBuf>,
    pub users_file: Option<PathBuf>,
    pub allow_peer: Option<Vec<IpNet>>,
    pub deny_peer: Option<Vec<IpNet>>,
    pub allow_peer_unsafe: Option<Vec<IpAddr>>,
    pub nat64_prefix: Option<Vec<Ipv6Net>>,
    pub fastpath: Option<FastPathMode>,
    pub interface: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub admin: Option<SocketAddr>,
    pub legacy_channels: Option<bool>,
    pub workers: Option<usize>,
    pub kernel_bindings: Option<u32>,
    pub user_id: Option<String>,
    pub group_id: Option<String>,
    pub metrics: Option<SocketAddr>,
    pub usage_log: Option<PathBuf>,
    pub max_allocations: Option<usize>,
    pub max_allocations_per_user: Option<usize>,
    pub unauth_rate_bytes: Option<u64>,
    pub unauth_burst_bytes: Option<u64>,
    pub user_bandwidth: Option<u64>,
    pub user_bandwidth_burst: Option<u64>,
    pub alternate_server: Option<Vec<SocketAddr>>,
    pub alternate_domain: Option<String>,
    pub redirect_above: Option<usize>,
}

impl ConfigFile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        toml::from_str(text).with_context(|| format!("invalid config {origin}"))
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Keys set in `upper` replace this layer's.
    fn overlay(&mut self, upper: ConfigFile) {
        fn put<T>(slot: &mut Option<T>, value: Option<T>) {
            if value.is_some() {
                *slot = value;
            }
        }
        put(&mut self.listen, upper.listen);
        put(&mut self.listen_tcp, upper.listen_tcp);
        put(&mut self.listen_tls, upper.listen_tls);
        put(&mut self.tls_cert, upper.tls_cert);
        put(&mut self.tls_key, upper.tls_key);
        put(&mut self.max_connections, upper.max_connections);
        put(
            &mut self.max_connections_per_ip,
            upper.max_connections_per_ip,
        );
        put(
            &mut self.stream_handshake_timeout,
            upper.stream_handshake_timeout,
        );
        put(&mut self.stream_idle_timeout, upper.stream_idle_timeout);
        put(&mut self.relay_ip, upper.relay_ip);
        put(&mut self.port_range, upper.port_range);
        put(&mut self.realm, upper.realm);
        put(&mut self.user, upper.user);
        put(&mut self.auth_secret, upper.auth_secret);
        put(&mut self.auth_secret_file, upper.auth_secret_file);
        put(&mut self.users_file, upper.users_file);
        put(&mut self.allow_peer, upper.allow_peer);
        put(&mut self.deny_peer, upper.deny_peer);
        put(&mut self.allow_peer_unsafe, upper.allow_peer_unsafe);
        put(&mut self.nat64_prefix, upper.nat64_prefix);
        put(&mut self.fastpath, upper.fastpath);
        put(&mut self.interface, upper.interface);
        put(&mut self.log_level, upper.log_level);
        put(&mut self.admin, upper.admin);
        put(&mut self.legacy_channels, upper.legacy_channels);
        put(&mut self.workers, upper.workers);
        put(&mut self.kernel_bindings, upper.kernel_bindings);
        put(&mut self.user_id, upper.user_id);
        put(&mut self.group_id, upper.group_id);
        put(&mut self.metrics, upper.metrics);
        put(&mut self.usage_log, upper.usage_log);
        put(&mut self.max_allocations, upper.max_allocations);
        put(&mut self.unauth_rate_bytes, upper.unauth_rate_bytes);
        put(&mut self.unauth_burst_bytes, upper.unauth_burst_bytes);
        put(&mut self.user_bandwidth, upper.user_bandwidth);
        put(&mut self.user_bandwidth_burst, upper.user_bandwidth_burst);
        put(
            &mut self.max_allocations_per_user,
            upper.max_allocations_per_user,
        );
        put(&mut self.alternate_server, upper.alternate_server);
        put(&mut self.alternate_domain, upper.alternate_domain);
        put(&mut self.redirect_above, upper.redirect_above);
    }

    /// The layer the command-line flags form (unset flags leave keys unset).
    fn from_flags(args: &ServeArgs) -> Self {
        fn list<T: Clone>(v: &[T]) -> Option<Vec<T>> {
            (!v.is_empty()).then(|| v.to_vec())
        }
        Self {
            listen: list(&args.listen),
            listen_tcp: list(&args.listen_tcp),
            listen_tls: list(&args.listen_tls),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            stream_handshake_timeout: args.stream_handshake_timeout,
            stream_idle_timeout: args.stream_idle_timeout,
            relay_ip: list(&args.relay_ip),
            port_range: args.port_range.clone(),
            realm: args.realm.clone(),
            user: list(&args.user),
            auth_secret: list(&args.auth_secret),
            auth_secret_file: args.auth_secret_file.clone(),
            users_file: args.users_file.clone(),
            allow_peer: list(&args.allow_peer),
            deny_peer: list(&args.deny_peer),
            allow_peer_unsafe: list(&args.allow_peer_unsafe),
            nat64_prefix: list(&args.nat64_prefix),
            fastpath: args.fastpath,
            interface: list(&args.interface),
            log_level: args.log_level.clone(),
            admin: args.admin,
            legacy_channels: args.legacy_channels.then_some(true),
            workers: args.workers,
            kernel_bindings: args.kernel_bindings,
            user_id: args.user_id.clone(),
            group_id: args.group_id.clone(),
            metrics: args.metrics,
            usage_log: args.usage_log.clone(),
            max_allocations: args.max_allocations,
            max_allocations_per_user: args.max_allocations_per_user,
            unauth_rate_bytes: args.unauth_rate_bytes,
            unauth_burst_bytes: args.unauth_burst_bytes,
            user_bandwidth: args.user_bandwidth,
            user_bandwidth_burst: args.user_bandwidth_burst,
            alternate_server: list(&args.alternate_server),
            alternate_domain: args.alternate_domain.clone(),
            redirect_above: args.redirect_above,
        }
    }
}

/// A static long-term credential.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticUser {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for StaticUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticUser({}:***)", self.name)
    }
}

/// The validated configuration the daemon runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// TCP and TLS client listeners, and what their connections may do.
    pub streams: StreamConfig,
    pub relay_ips: Vec<IpAddr>,
    pub port_range: RangeInclusive<u16>,
    pub realm: String,
    pub users: Vec<StaticUser>,
    pub auth_secrets: Vec<String>,
    pub allow_peer: Vec<IpNet>,
    pub deny_peer: Vec<IpNet>,
    /// Exact peer addresses allowed past the non-overridable tier.
    pub allow_peer_unsafe: Vec<IpAddr>,
    /// NAT64 prefixes (RFC 6052 lengths).
    pub nat64_prefixes: Vec<Ipv6Net>,
    pub fastpath: FastPathMode,
    pub interfaces: Vec<String>,
    pub log_level: String,
    /// Local admin endpoint (HTTP on loopback) for `relay ctl`.
    pub admin: SocketAddr,
    /// ChannelBind accepts RFC 5766's 0x4000-0x7FFF instead of RFC 8656's 0x4000-0x4FFF.
    pub legacy_channels: bool,
    /// Worker threads, each with its own SO_REUSEPORT listener sockets.
    pub workers: usize,
    /// Channel bindings the kernel maps hold; `None` sizes them from the quotas within a
    /// memory budget.
    pub kernel_bindings: Option<u32>,
    /// The user (name or number) and group the daemon switches to after its privileged start
    /// when started as root; `None`: `nobody` and its group.
    pub user_id: Option<String>,
    pub group_id: Option<String>,
    /// Read-only listener for `/metrics`, `/healthz` and `/readyz` (may face the network).
    pub metrics: Option<SocketAddr>,
    /// File usage records are appended to, besides the log.
    pub usage_log: Option<PathBuf>,
    /// Allocations relay-wide (508 beyond).
    pub max_allocations: usize,
    /// Allocations per user, REST usernames by their user part (486 beyond).
    pub max_allocations_per_user: usize,
    /// Unauthenticated answers: bytes per second per source, relay-wide.
    pub unauth_rate_bytes: u64,
    /// Unauthenticated answers: burst in bytes per source.
    pub unauth_burst_bytes: u64,
    /// Per-user bandwidth limit (bytes per second, both directions together) and burst;
    /// `None` is no limit.
    pub user_bandwidth: Option<UserBandwidthLimit>,
    /// `--user` or `--auth-secret` was given on the command line (readable in
    /// /proc/PID/cmdline): the daemon warns.
    pub secrets_on_command_line: bool,
    /// Test-only overrides of the RFC 8656 permission and channel lifetimes (hidden flags).
    pub permission_lifetime: Option<std::time::Duration>,
    pub channel_lifetime: Option<std::time::Duration>,
    /// ALTERNATE-SERVER targets and ALTERNATE-DOMAIN (drain, allocation cap).
    pub alternates: relay_proto::server::Alternates,
    /// Allocations from which new ones go to alternates (`--redirect-above`).
    pub redirect_above: Option<usize>,
    /// Test-only default allocation lifetime (hidden flag).
    pub allocation_lifetime: Option<std::time::Duration>,
    /// Test-only fault injection in worker 0 (hidden flags).
    pub fault_receive_errors: u32,
    pub fault_panic_worker_after: u64,
}

impl Config {
    /// Embedded defaults, then `--config FILE`, then flags.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Self> {
        let mut layers = ConfigFile::parse(EMBEDDED_DEFAULT, "(embedded default)")?;
        if let Some(path) = &args.config {
            layers.overlay(ConfigFile::load(path)?);
        }
        layers.overlay(ConfigFile::from_flags(args));
        let mut config = Self::resolve(layers)?;
        if let Some(secret) = crate::secrets::env_auth_secret() {
            if !config.auth_secrets.contains(&secret) {
                config.auth_secrets.push(secret);
            }
        }
        config.secrets_on_command_line = !args.user.is_empty() || !args.auth_secret.is_empty();
        let seconds = |s: Option<u64>| s.map(std::time::Duration::from_secs);
        config.permission_lifetime = seconds(args.permission_lifetime);
        config.channel_lifetime = seconds(args.channel_lifetime);
        config.allocation_lifetime = seconds(args.allocation_lifetime);
        config.fault_receive_errors = args.fault_receive_errors.unwrap_or(0);
        config.fault_panic_worker_after = args.fault_panic_worker_after.unwrap_or(0);
        Ok(config)
    }

    /// Checks every key and turns the merged layer into a `Config`.
    pub fn resolve(file: ConfigFile) -> anyhow::Result<Self> {
        let listen = file.listen.unwrap_or_default();
        let streams = StreamConfig {
            listen_tcp: file.listen_tcp.unwrap_or_default(),
            listen_tls: file.listen_tls.unwrap_or_default(),
            tls: match (file.tls_cert, file.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                (Some(_), None) => {
                    bail!("--tls-cert needs --tls-key (the certificate's private key)")
                }
                (None, Some(_)) => bail!("--tls-key needs --tls-cert (the certificate chain)"),
            },
            max_connections: file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_connections_per_ip: file
                .max_connections_per_ip
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
            handshake_timeout: std::time::Duration::from_secs(
                file.stream_handshake_timeout.unwrap_or(10),
            ),
            idle_timeout: std::time::Duration::from_secs(file.stream_idle_timeout.unwrap_or(60)),
        };
        ensure!(
            !listen.is_empty() || !streams.listen_tcp.is_empty() || !streams.listen_tls.is_empty(),
            "no listener: set --listen ADDR:PORT (UDP), --listen-tcp or --listen-tls"
        );
        if let Some(both) = streams
            .listen_tcp
            .iter()
            .find(|a| streams.listen_tls.contains(a))
        {
            bail!(
                "{both} is both a --listen-tcp and a --listen-tls address: one port serves one \
                 of them (the kernel would hand half the connections to each)"
            );
        }
        ensure!(
            streams.listen_tls.is_empty() || streams.tls.is_some(),
            "--listen-tls needs a certificate: set --tls-cert PEM and --tls-key PEM"
        );
        ensure!(
            streams.max_connections >= 1 && streams.max_connections_per_ip >= 1,
            "--max-connections and --max-connections-per-ip must be at least 1"
        );
        ensure!(
            !streams.handshake_timeout.is_zero() && !streams.idle_timeout.is_zero(),
            "--stream-handshake-timeout and --stream-idle-timeout must be at least 1 second"
        );
        let relay_ips = file.relay_ip.unwrap_or_default();
        ensure!(!relay_ips.is_empty(), "no relay address: set --relay-ip IP");
        if let Some(ip) = relay_ips.iter().find(|ip| ip.is_unspecified()) {
            bail!("--relay-ip {ip}: a relayed address must be a concrete address, not a wildcard");
        }
        let port_range = parse_port_range(file.port_range.as_deref().unwrap_or("49152-65535"))?;
        let realm = file.realm.unwrap_or_default();
        ensure!(!realm.is_empty(), "the realm must not be empty (--realm)");
        let mut users = file
            .user
            .unwrap_or_default()
            .iter()
            .map(|u| parse_user(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(path) = &file.users_file {
            users.extend(crate::secrets::read_users(path)?);
        }
        let mut auth_secrets = file.auth_secret.unwrap_or_default();
        if let Some(path) = &file.auth_secret_file {
            auth_secrets.extend(crate::secrets::read_auth_secrets(path)?);
        }
        ensure!(
            auth_secrets.iter().all(|s| !s.is_empty()),
            "--auth-secret must not be empty"
        );
        let max_allocations = file.max_allocations.unwrap_or(DEFAULT_MAX_ALLOCATIONS);
        ensure!(max_allocations >= 1, "--max-allocations must be at least 1");
        let max_allocations_per_user = file
            .max_allocations_per_user
            .unwrap_or(DEFAULT_MAX_ALLOCATIONS_PER_USER.min(max_allocations.saturating_sub(1)));
        ensure!(
            max_allocations_per_user >= 1,
            "--max-allocations-per-user must be at least 1 (and --max-allocations at least 2)"
        );
        ensure!(
            max_allocations_per_user < max_allocations,
            "--max-allocations-per-user {max_allocations_per_user} must be below \
             --max-allocations {max_allocations}: otherwise one user can take every allocation"
        );
        let alternates =
            resolve_alternates(file.alternate_server, file.alternate_domain, &streams)?;
        Ok(Self {
            alternates,
            redirect_above: match file.redirect_above {
                Some(0) => bail!("--redirect-above must be at least 1"),
                other => other,
            },
            listen,
            streams,
            relay_ips,
            port_range,
            realm,
            users,
            auth_secrets,
            allow_peer: file.allow_peer.unwrap_or_default(),
            deny_peer: file.deny_peer.unwrap_or_default(),
            allow_peer_unsafe: file.allow_peer_unsafe.unwrap_or_default(),
            nat64_prefixes: {
                let prefixes = file.nat64_prefix.unwrap_or_default();
                let mut check = relay_proto::policy::PeerPolicy::safe_default();
                for prefix in &prefixes {
                    check
                        .add_nat64_prefix(*prefix)
                        .map_err(|e| anyhow::anyhow!("--nat64-prefix {e}"))?;
                }
                prefixes
            },
            fastpath: file.fastpath.unwrap_or(FastPathMode::Off),
            interfaces: file.interface.unwrap_or_default(),
            log_level: file.log_level.unwrap_or_else(|| "info".to_owned()),
            admin: file
                .admin
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3479))),
            legacy_channels: file.legacy_channels.unwrap_or(false),
            workers: match file.workers {
                Some(0) => bail!("--workers must be at least 1"),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, usize::from),
            },
            kernel_bindings: match file.kernel_bindings {
                Some(0) => bail!("--kernel-bindings must be at least 1"),
                other => other,
            },
            user_id: file.user_id,
            group_id: file.group_id,
            metrics: file.metrics,
            usage_log: file.usage_log,
            max_allocations,
            max_allocations_per_user,
            secrets_on_command_line: false,
            unauth_rate_bytes: file
                .unauth_rate_bytes
                .unwrap_or(relay_proto::limiter::DEFAULT_RATE_BYTES),
            unauth_burst_bytes: file
                .unauth_burst_bytes
                .unwrap_or(relay_proto::limiter::DEFAULT_BURST_BYTES),
            user_bandwidth: resolve_user_bandwidth(file.user_bandwidth, file.user_bandwidth_burst)?,
            permission_lifetime: None,
            channel_lifetime: None,
            allocation_lifetime: None,
            fault_receive_errors: 0,
            fault_panic_worker_after: 0,
        })
    }
}

/// A per-user bandwidth limit (issue 12 item 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserBandwidthLimit {
    /// Bytes per second, both directions together.
    pub rate: u64,
    /// Bytes above the rate a user may send at once.
    pub burst: u64,
}

/// The smallest default burst: one largest UDP datagram's worth, so a low rate still lets
/// whole datagrams through.
pub const MIN_DEFAULT_USER_BURST: u64 = 65_536;

/// `--user-bandwidth` and `--user-bandwidth-burst`: no rate is no limit.
fn resolve_user_bandwidth(
    rate: Option<u64>,
    burst: Option<u64>,
) -> anyhow::Result<Option<UserBandwidthLimit>> {
    let Some(rate) = rate else {
        ensure!(
            burst.is_none(),
            "--user-bandwidth-burst needs --user-bandwidth (the rate)"
        );
        return Ok(None);
    };
    ensure!(
        rate >= 1,
        "--user-bandwidth must be at least 1 byte per second (leave it out for no limit)"
    );
    let burst = burst.unwrap_or(rate.max(MIN_DEFAULT_USER_BURST));
    ensure!(burst >= 1, "--user-bandwidth-burst must be at least 1 byte");
    Ok(Some(UserBandwidthLimit { rate, burst }))
}

/// `--alternate-server` and `--alternate-domain`: concrete addresses, and a domain only where
/// it can be sent (to TLS clients, with an alternate to name).
fn resolve_alternates(
    servers: Option<Vec<SocketAddr>>,
    domain: Option<String>,
    streams: &StreamConfig,
) -> anyhow::Result<relay_proto::server::Alternates> {
    let servers = servers.unwrap_or_default();
    if let Some(bad) = servers
        .iter()
        .find(|a| a.ip().is_unspecified() || a.port() == 0)
    {
        bail!("--alternate-server {bad}: an alternate needs a concrete address and port");
    }
    if let Some(domain) = &domain {
        ensure!(
            !domain.is_empty() && domain.len() <= 253 && !domain.contains(char::is_whitespace),
            "--alternate-domain `{domain}` is not a domain name"
        );
        ensure!(
            !servers.is_empty(),
            "--alternate-domain needs --alternate-server (the domain names the alternates' \
             certificate)"
        );
        ensure!(
            !streams.listen_tls.is_empty(),
            "--alternate-domain is only sent to clients over TLS: it needs --listen-tls"
        );
    }
    Ok(relay_proto::server::Alternates { servers, domain })
}

/// TCP/TLS client connections relay-wide unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// TCP/TLS client connections per source address unless configured (a NAT's users share one).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 512;

/// The certificate and key files of the TLS listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TCP and TLS client transports (RFC 8656 §5).
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub listen_tcp: Vec<SocketAddr>,
    pub listen_tls: Vec<SocketAddr>,
    pub tls: Option<TlsFiles>,
    /// Connections relay-wide and per source address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// For the TLS handshake and the first complete STUN message.
    pub handshake_timeout: std::time::Duration,
    /// For a connection without an allocation.
    pub idle_timeout: std::time::Duration,
}

/// Allocations relay-wide unless configured.
pub const DEFAULT_MAX_ALLOCATIONS: usize = 16_384;
/// Allocations per user unless configured.
pub const DEFAULT_MAX_ALLOCATIONS_PER_USER: usize = 64;

/// `LOW-HIGH`, both in 1..=65535, LOW <= HIGH.
pub fn parse_port_range(text: &str) -> anyhow::Result<RangeInclusive<u16>> {
    let parsed = text.split_once('-').and_then(|(lo, hi)| {
        let lo: u16 = lo.trim().parse().ok()?;
        let hi: u16 = hi.trim().parse().ok()?;
        Some(lo..=hi)
    });
    match parsed {
        Some(range) if *range.start() >= 1 && range.start() <= range.end() => Ok(range),
        _ => bail!("invalid port range `{text}`: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535"),
    }
}

/// `NAME:PASSWORD`; the password may itself contain `:`.
pub fn parse_user(text: &str) -> anyhow::Result<StaticUser> {
    match text.split_once(':') {
        Some((name, password)) if !name.is_empty() && !password.is_empty() => Ok(StaticUser {
            name: name.to_owned(),
            password: password.to_owned(),
        }),
        _ => bail!("invalid --user `{}`: expected NAME:PASSWORD", redact(text)),
    }
}

/// Keeps secrets out of error messages.
fn redact(text: &str) -> String {
    match text.split_once(':') {
        Some((name, _)) => format!("{name}:***"),
        // Without a `:` the whole entry may be a password.
        None => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs::default()
    }

    #[test]
    fn embedded_default_runs_on_loopback() {
        let config = Config::from_args(&args()).expect("embedded default is valid");
        assert!(config.listen.iter().all(|a| a.ip().is_loopback()));
        assert!(config.relay_ips.iter().all(IpAddr::is_loopback));
        assert_eq!(config.port_range, 49152..=65535);
        assert_eq!(config.fastpath, FastPathMode::Off);
        assert!(config.admin.ip().is_loopback());
    }

    #[test]
    fn file_then_flags() {
        let mut layers = ConfigFile::parse(EMBEDDED_DEFAULT, "default").expect("default");
        layers.overlay(
            ConfigFile::parse(
                r#"
                listen = ["198.18.1.1:3478"]
                relay-ip = ["198.18.2.1", "2001:2::1"]
                realm = "example.org"
                user = ["alice:secret"]
                allow-peer = ["198.18.0.0/15"]
                fastpath = "xdp"
                "#,
                "test",
            )
            .expect("valid file"),
        );
        let mut flags = args();
        flags.realm = Some("flag.example".into());
        layers.overlay(ConfigFile::from_flags(&flags));
        let config = Config::resolve(layers).expect("valid");
        assert_eq!(config.listen, vec!["198.18.1.1:3478".parse().unwrap()]);
        assert_eq!(config.relay_ips.len(), 2);
        assert_eq!(config.realm, "flag.example");
        assert_eq!(config.users[0].name, "alice");
        assert_eq!(config.fastpath, FastPathMode::Xdp);
    }

    #[test]
    fn one_address_cannot_serve_tcp_and_tls() {
        let mut flags = args();
        flags.listen_tcp = vec!["0.0.0.0:443".parse().unwrap()];
        flags.listen_tls = vec!["0.0.0.0:443".parse().unwrap()];
        flags.tls_cert = Some("cert.pem".into());
        flags.tls_key = Some("key.pem".into());
        let err = format!("{:#}", Config::from_args(&flags).unwrap_err());
        assert!(
            err.contains("both a --listen-tcp and a --listen-tls"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = ConfigFile::parse("lisen = []", "test").unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `lisen`"),
            "{err:#}"
        );
    }

    #[test]
    fn bad_values_get_clear_errors() {
        assert!(parse_port_range("10-5").is_err());
        assert!(parse_port_range("0-5").is_err());
        assert!(parse_port_range("abc").is_err());
        assert_eq!(parse_port_range("5-10").unwrap(), 5..=10);
        let err = parse_user("bob").unwrap_err().to_string();
        assert!(err.contains("NAME:PASSWORD"), "{err}");
        let err = parse_user(":pw").unwrap_err().to_string();
        assert!(!err.contains("pw"), "password leaked: {err}");
        assert_eq!(parse_user("bob:a:b").unwrap().password, "a:b");
        let mut file = ConfigFile::parse(EMBEDDED_DEFAULT, "default").unwrap();
        file.relay_ip = Some(vec!["0.0.0.0".parse().unwrap()]);
        assert!(Config::resolve(file).is_err());
    }

    #[test]
    fn peer_policy_keys_and_bad_nat64_prefix() {
        let mut layers = ConfigFile::parse(EMBEDDED_DEFAULT, "default").expect("default");
        layers.overlay(
            ConfigFile::parse(
                r#"
                allow-peer-unsafe = ["127.0.0.2"]
                nat64-prefix = ["64:ff9b:1:abcd::/96"]
                "#,
                "test",
            )
            .expect("valid file"),
        );
        let config = Config::resolve(layers).expect("valid");
        assert_eq!(
            config.allow_peer_unsafe,
            vec!["127.0.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.nat64_prefixes.len(), 1);
        let mut file = ConfigFile::parse(EMBEDDED_DEFAULT, "default").unwrap();
        file.nat64_prefix = Some(vec!["64:ff9b:1::/50".parse().unwrap()]);
        let err = format!("{:#}", Config::resolve(file).unwrap_err());
        assert!(
            err.contains("--nat64-prefix") && err.contains("/96"),
            "{err}"
        );
    }

    /// The embedded defaults with `toml` on top.
    fn with_default(toml: &str) -> ConfigFile {
        let mut file = ConfigFile::parse(EMBEDDED_DEFAULT, "default").unwrap();
        file.overlay(ConfigFile::parse(toml, "t").unwrap());
        file
    }

    #[test]
    fn user_bandwidth_is_off_by_default_and_defaults_its_burst() {
        let config = Config::from_args(&args()).expect("default");
        assert_eq!(config.user_bandwidth, None);
        let file = with_default("user-bandwidth = 1000000");
        assert_eq!(
            Config::resolve(file).unwrap().user_bandwidth,
            Some(UserBandwidthLimit {
                rate: 1_000_000,
                burst: 1_000_000
            })
        );
        let file = with_default("user-bandwidth = 1000");
        assert_eq!(
            Config::resolve(file)
                .unwrap()
                .user_bandwidth
                .map(|l| l.burst),
            Some(MIN_DEFAULT_USER_BURST)
        );
        let file = with_default("user-bandwidth = 5000\nuser-bandwidth-burst = 7000");
        assert_eq!(
            Config::resolve(file).unwrap().user_bandwidth,
            Some(UserBandwidthLimit {
                rate: 5000,
                burst: 7000
            })
        );
        let file = with_default("user-bandwidth-burst = 7000");
        let err = format!("{:#}", Config::resolve(file).unwrap_err());
        assert!(err.contains("needs --user-bandwidth"), "{err}");
        let file = with_default("user-bandwidth = 0");
        assert!(Config::resolve(file).is_err());
    }

    #[test]
    fn allocation_caps_one_user_cannot_exhaust() {
        let config = Config::from_args(&args()).expect("default");
        assert_eq!(
            (config.max_allocations, config.max_allocations_per_user),
            (DEFAULT_MAX_ALLOCATIONS, DEFAULT_MAX_ALLOCATIONS_PER_USER)
        );
        let mut file = ConfigFile::parse(EMBEDDED_DEFAULT, "default").unwrap();
        file.overlay(
            ConfigFile::parse("max-allocations = 10\nmax-allocations-per-user = 3", "t").unwrap(),
        );
        let config = Config::resolve(file).expect("valid");
        assert_eq!(
            (config.max_allocations, config.max_allocations_per_user),
            (10, 3)
        );
        // A small relay-wide cap lowers the per-user default below it.
        let mut file = ConfigFile::parse(EMBEDDED_DEFAULT, "default").unwrap();
        file.max_allocations = Some(10);
        assert_eq!(Config::resolve(file).unwrap().max_allocations_per_user, 9);
        let mut file = ConfigFile::parse(EMBEDDED_DEFAULT, "default").unwrap();
        file.max_allocations = Some(10);
        file.max_allocations_per_user = Some(10);
        let err = format!("{:#}", Config::resolve(file).unwrap_err());
        assert!(err.contains("must be below --max-allocations 10"), "{err}");
    }

    #[test]
    fn hardening_keys_in_a_sample_file() {
        let dir = std::env::temp_dir().join(format!("relay-config-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let users = dir.join("users");
        std::fs::write(&users, "bob:builder\n").unwrap();
        let secrets = dir.join("secrets");
        std::fs::write(&secrets, "rest-one\nrest-two\n").unwrap();
        let mut layers = ConfigFile::parse(EMBEDDED_DEFAULT, "default").unwrap();
        layers.overlay(
            ConfigFile::parse(
                &format!(
                    r#"
                    user = ["alice:secret"]
                    users-file = "{}"
                    auth-secret-file = "{}"
                    unauth-rate-bytes = 65536
                    unauth-burst-bytes = 8192
                    max-allocations = 100
                    max-allocations-per-user = 10
                    "#,
                    users.display(),
                    secrets.display()
                ),
                "test",
            )
            .expect("valid file"),
        );
        let config = Config::resolve(layers).expect("valid");
        let names: Vec<&str> = config.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(config.auth_secrets, ["rest-one", "rest-two"]);
        assert_eq!(
            (config.unauth_rate_bytes, config.unauth_burst_bytes),
            (65_536, 8_192)
        );
        assert_eq!(
            (config.max_allocations, config.max_allocations_per_user),
            (100, 10)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    #[test]
    fn alternate_keys() {
        let parse = |text: &str| {
            let mut layers = ConfigFile::parse(EMBEDDED_DEFAULT, "default").expect("default");
            layers.overlay(ConfigFile::parse(text, "test").expect("valid toml"));
            Config::resolve(layers)
        };
        let config =
            parse(r#"alternate-server = ["198.18.0.2:3478", "[2001:2::2]:3478"]"#).expect("valid");
        assert_eq!(config.alternates.servers.len(), 2);
        assert_eq!(config.alternates.domain, None);
        for (text, expected) in [
            (r#"alternate-server = ["0.0.0.0:3478"]"#, "concrete"),
            (r#"alternate-server = ["198.18.0.2:0"]"#, "concrete"),
            (
                r#"alternate-domain = "turn.example.net""#,
                "needs --alternate-server",
            ),
            (
                "alternate-server = [\"198.18.0.2:3478\"]\nalternate-domain = \"turn.example.net\"",
                "needs --listen-tls",
            ),
        ] {
            let error = format!("{:#}", parse(text).expect_err(text));
            assert!(error.contains(expected), "{text}: {error}");
        }
        // A flag replaces the file's list.
        let mut layers = ConfigFile::parse(EMBEDDED_DEFAULT, "default").expect("default");
        layers.overlay(
            ConfigFile::parse(r#"alternate-server = ["198.18.0.2:3478"]"#, "test").expect("toml"),
        );
        let mut flags = args();
        flags.alternate_server = vec!["198.18.0.3:3478".parse().expect("addr")];
        layers.overlay(ConfigFile::from_flags(&flags));
        let config = Config::resolve(layers).expect("valid");
        assert_eq!(
            config.alternates.servers,
            vec!["198.18.0.3:3478".parse::<SocketAddr>().expect("addr")]
        );
    }
}
