//! Reload without dropping allocations (issue 13): SIGHUP and `relay ctl reload` re-read the
//! configuration the relay started with (embedded default, the `--config FILE` given at start,
//! `RELAY_AUTH_SECRET`, the same command-line flags on top) and apply what can change at
//! runtime:
//!
//! - users (`user`, `users-file`) and REST secrets (`auth-secret`, `auth-secret-file`,
//!   `RELAY_AUTH_SECRET`; several at once for rotation): every request is checked against the
//!   new set, so a removed user's next request gets 401 (RFC 8489 §9.2.4) and its allocation
//!   ends with its lifetime;
//! - the peer policy (`allow-peer`, `deny-peer`, `allow-peer-unsafe`, `nat64-prefix`): the
//!   kernel copy is recompiled, and every worker's core withdraws at once the permissions (and
//!   their channels and kernel entries) of live allocations that the new policy forbids;
//! - the caps (`max-allocations`, `max-allocations-per-user`), for the next Allocate;
//! - `log-level` (tracing-subscriber's reload layer);
//! - the TLS certificate and key (the files named at start, re-read).
//!
//! Everything is checked before anything changes: a file that cannot be read or parsed, an
//! invalid value, a certificate that cannot be used, or a change to a setting that cannot
//! change at runtime (listeners, relay addresses, ports, realm, fast path, workers, admin...,
//! see [`fixed_changes`]) refuses the whole reload, names the problem, and the running
//! configuration stays as it was.

use std::{
    fmt::Debug,
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tracing::{info, warn};
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter};

use super::{
    kernel_sync::KernelSync,
    peer_policy, server_config,
    tls::TlsCertificates,
    worker::{lock, WorkerRequest},
};
use crate::{
    cli::ServeArgs,
    config::{Config, StaticUser},
    control::ask,
};
use relay_proto::{
    policy::PeerPolicy,
    server::{Reconfigure, ReconfigureReport},
};

type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The log filter of the running process, swapped by a reload.
static LOG_FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Logs to stderr at `filter` (`--log-level`), through a filter a reload can replace.
pub fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = parse_log_level(filter)?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    let _ = LOG_FILTER.set(handle);
    Ok(())
}

fn parse_log_level(filter: &str) -> anyhow::Result<EnvFilter> {
    EnvFilter::try_new(filter).with_context(|| format!("invalid --log-level `{filter}`"))
}

/// Reloads are serialised: SIGHUP and `relay ctl reload` share one.
pub type SharedReloader = Arc<tokio::sync::Mutex<Reloader>>;

/// What a reload needs: how the relay was started, what it runs with now, and where to send
/// the new settings.
pub struct Reloader {
    args: ServeArgs,
    /// The configuration in force (the last one applied).
    running: Config,
    /// Addresses the listeners serve (always denied as peers; fixed, like the listeners).
    own_addresses: Vec<IpAddr>,
    /// The policy in force; new ones share its host-address set.
    policy: PeerPolicy,
    /// The credential generated at start when none was configured; kept while none is.
    generated: Option<StaticUser>,
    tls: Option<Arc<TlsCertificates>>,
    workers: Vec<mpsc::Sender<WorkerRequest>>,
    kernel: Arc<Mutex<KernelSync>>,
}

/// What the running relay is given at start.
pub struct Running {
    pub config: Config,
    pub own_addresses: Vec<IpAddr>,
    pub policy: PeerPolicy,
    pub generated: Option<StaticUser>,
}

impl Reloader {
    pub fn new(
        args: ServeArgs,
        running: Running,
        tls: Option<Arc<TlsCertificates>>,
        workers: Vec<mpsc::Sender<WorkerRequest>>,
        kernel: Arc<Mutex<KernelSync>>,
    ) -> SharedReloader {
        Arc::new(tokio::sync::Mutex::new(Self {
            args,
            running: running.config,
            own_addresses: running.own_addresses,
            policy: running.policy,
            generated: running.generated,
            tls,
            workers,
            kernel,
        }))
    }

    /// Re-reads and applies the configuration; what changed, or why nothing did (also logged,
    /// so a refused SIGHUP or `relay ctl reload` leaves a trace).
    pub async fn reload(&mut self) -> anyhow::Result<String> {
        let result = self.apply().await;
        if let Err(error) = &result {
            warn!("{error:#}");
        }
        result
    }

    async fn apply(&mut self) -> anyhow::Result<String> {
        let source = match &self.args.config {
            Some(path) => format!("{} and the command line", path.display()),
            None => "the command line (no --config file)".to_owned(),
        };
        let refused = "configuration not reloaded; the running configuration stays";
        // 1. Everything is read and checked before anything changes.
        let mut new = Config::from_args(&self.args).context(refused)?;
        let fixed = fixed_changes(&self.running, &new);
        if !fixed.is_empty() {
            bail!(
                "{refused}: these settings cannot change while the relay runs (restart it to \
                 change them): {}",
                fixed.join("; ")
            );
        }
        let filter = parse_log_level(&new.log_level).context(refused)?;
        let certificate = match &self.tls {
            Some(tls) => Some(tls.prepare().context(refused)?),
            None => None,
        };
        // As at start: with no credential configured, the generated one stays.
        if new.users.is_empty() && new.auth_secrets.is_empty() {
            new.users.extend(self.generated.clone());
        }
        let mut policy = peer_policy(&new, &self.own_addresses);
        policy.share_host_addresses(&self.policy);
        let server = server_config(&new, policy.clone());
        let update = Reconfigure {
            credentials: server.credentials,
            policy: policy.clone(),
            max_allocations: server.max_allocations,
            max_allocations_per_user: server.max_allocations_per_user,
        };

        // 2. Apply: the kernel's policy first (the fast path stops at once), then every
        // worker's core (which withdraws forbidden permissions and their kernel entries).
        lock(&self.kernel)
            .set_policy(policy.clone())
            .map_err(|e| anyhow::anyhow!("{refused}: {e}"))?;
        let mut report = ReconfigureReport::default();
        for worker in &self.workers {
            let update = Box::new(update.clone());
            match ask(worker, |reply| WorkerRequest::Reconfigure { update, reply }).await {
                Some(part) => report += part,
                // Only when the relay is stopping (a lost worker stops it).
                None => warn!("a worker did not take the reloaded configuration"),
            }
        }
        if let Some(handle) = LOG_FILTER.get() {
            if let Err(error) = handle.reload(filter) {
                warn!("cannot change the log level: {error}");
            }
        }
        let tls_message = match (&self.tls, certificate) {
            (Some(tls), Some(certificate)) => {
                tls.install(certificate);
                "reloaded the TLS certificate and key; new connections use them"
            }
            _ => "no TLS listener is configured",
        };
        let mut message = format!(
            "reloaded {source}: {} user(s), {} REST secret(s), peer policy ({} permission(s) \
             and {} channel(s) of live allocations withdrawn), max-allocations {}, \
             max-allocations-per-user {}, log-level `{}`; {tls_message}",
            new.users.len(),
            new.auth_secrets.len(),
            report.permissions_revoked,
            report.channels_revoked,
            new.max_allocations,
            new.max_allocations_per_user,
            new.log_level,
        );
        if report.allocations_without_credentials > 0 {
            message.push_str(&format!(
                "; {} live allocation(s) have credentials the new configuration no longer \
                 accepts: their next request gets 401 and they end with their lifetime",
                report.allocations_without_credentials
            ));
        }
        info!("{message}");
        self.running = new;
        self.policy = policy;
        Ok(message)
    }
}

/// The settings that cannot change at runtime and differ between `old` and `new`, each named
/// by its key with both values. They need sockets, kernel attachments, threads or privileges
/// set up at start; the realm is fixed because every long-term key and every client's cached
/// REALM derive from it (RFC 8489 §9.2), so changing it would invalidate every allocation's
/// credentials at once.
pub fn fixed_changes(old: &Config, new: &Config) -> Vec<String> {
    // Every setting is either reloaded or checked below: a new field of `Config` fails to
    // compile here until it is put in one group, so none is ever silently ignored.
    let Config {
        // Reloaded (see `Reloader::reload`).
        users: _,
        auth_secrets: _,
        allow_peer: _,
        deny_peer: _,
        allow_peer_unsafe: _,
        nat64_prefixes: _,
        log_level: _,
        max_allocations: _,
        max_allocations_per_user: _,
        // Only meaningful at start (a warning about the command line; test-only flags).
        secrets_on_command_line: _,
        permission_lifetime: _,
        channel_lifetime: _,
        allocation_lifetime: _,
        fault_receive_errors: _,
        fault_panic_worker_after: _,
        // Fixed: checked below.
        listen: _,
        streams: _,
        relay_ips: _,
        port_range: _,
        realm: _,
        fastpath: _,
        interfaces: _,
        admin: _,
        legacy_channels: _,
        workers: _,
        kernel_bindings: _,
        user_id: _,
        group_id: _,
        metrics: _,
        unauth_rate_bytes: _,
        unauth_burst_bytes: _,
        alternates: _,
        redirect_above: _,
        usage_log: _,
        user_bandwidth: _,
    } = old;
    let mut changes = Vec::new();
    let mut check = |key: &str, a: &dyn Debug, b: &dyn Debug| {
        let (a, b) = (format!("{a:?}"), format!("{b:?}"));
        if a != b {
            changes.push(format!("{key} ({a} -> {b})"));
        }
    };
    check("listen", &old.listen, &new.listen);
    check(
        "listen-tcp",
        &old.streams.listen_tcp,
        &new.streams.listen_tcp,
    );
    check(
        "listen-tls",
        &old.streams.listen_tls,
        &new.streams.listen_tls,
    );
    check(
        "tls-cert/tls-key",
        &old.streams.tls.as_ref().map(|t| (&t.cert, &t.key)),
        &new.streams.tls.as_ref().map(|t| (&t.cert, &t.key)),
    );
    check(
        "max-connections",
        &old.streams.max_connections,
        &new.streams.max_connections,
    );
    check(
        "max-connections-per-ip",
        &old.streams.max_connections_per_ip,
        &new.streams.max_connections_per_ip,
    );
    check(
        "stream-handshake-timeout",
        &old.streams.handshake_timeout,
        &new.streams.handshake_timeout,
    );
    check(
        "stream-idle-timeout",
        &old.streams.idle_timeout,
        &new.streams.idle_timeout,
    );
    check("relay-ip", &old.relay_ips, &new.relay_ips);
    check("port-range", &old.port_range, &new.port_range);
    check("realm", &old.realm, &new.realm);
    check("fastpath", &old.fastpath, &new.fastpath);
    check("interface", &old.interfaces, &new.interfaces);
    check("admin", &old.admin, &new.admin);
    check("metrics", &old.metrics, &new.metrics);
    check(
        "legacy-channels",
        &old.legacy_channels,
        &new.legacy_channels,
    );
    check("workers", &old.workers, &new.workers);
    check(
        "kernel-bindings",
        &old.kernel_bindings,
        &new.kernel_bindings,
    );
    check("user-id", &old.user_id, &new.user_id);
    check("group-id", &old.group_id, &new.group_id);
    check(
        "unauth-rate-bytes",
        &old.unauth_rate_bytes,
        &new.unauth_rate_bytes,
    );
    check(
        "unauth-burst-bytes",
        &old.unauth_burst_bytes,
        &new.unauth_burst_bytes,
    );
    check(
        "alternate-server/alternate-domain",
        &old.alternates,
        &new.alternates,
    );
    check("redirect-above", &old.redirect_above, &new.redirect_above);
    // The shared buckets are sized at start.
    check(
        "user-bandwidth/user-bandwidth-burst",
        &old.user_bandwidth,
        &new.user_bandwidth,
    );
    // Opened at start, while still root (it may live where the unprivileged relay cannot
    // create files).
    check("usage-log", &old.usage_log, &new.usage_log);
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config as `relay serve --config FILE` builds it, FILE holding `toml`.
    fn load(dir: &std::path::Path, name: &str, toml: &str) -> anyhow::Result<Config> {
        let path = dir.join(name);
        std::fs::write(&path, toml).expect("write config");
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        Config::from_args(&args)
    }

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "relay-reload-diff-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    const BASE: &str = r#"
        listen = ["127.0.0.1:3478"]
        relay-ip = ["127.0.0.1"]
        realm = "relay.test"
        workers = 2
        user = ["alice:one"]
        allow-peer = ["198.18.0.0/15"]
    "#;

    #[test]
    fn reloadable_keys_are_not_fixed_changes() {
        let dir = scratch();
        let old = load(&dir, "a.toml", BASE).expect("valid");
        let new = load(
            &dir,
            "b.toml",
            r#"
            listen = ["127.0.0.1:3478"]
            relay-ip = ["127.0.0.1"]
            realm = "relay.test"
            workers = 2
            user = ["bob:two"]
            auth-secret = ["old", "new"]
            allow-peer = ["198.18.0.0/16"]
            deny-peer = ["198.18.1.0/24"]
            allow-peer-unsafe = ["127.0.0.5"]
            nat64-prefix = ["64:ff9b::/96"]
            max-allocations = 10
            max-allocations-per-user = 2
            log-level = "debug"
            "#,
        )
        .expect("valid");
        assert_eq!(fixed_changes(&old, &new), Vec::<String>::new());
        assert_eq!(fixed_changes(&old, &old.clone()), Vec::<String>::new());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_fixed_change_is_named_with_both_values() {
        let dir = scratch();
        let old = load(&dir, "a.toml", BASE).expect("valid");
        let new = load(
            &dir,
            "b.toml",
            r#"
            listen = ["127.0.0.1:3479"]
            listen-tcp = ["127.0.0.1:3478"]
            relay-ip = ["127.0.0.2"]
            port-range = "50000-50100"
            realm = "other.test"
            workers = 3
            fastpath = "xdp"
            interface = ["eth0"]
            admin = "127.0.0.1:4000"
            user = ["alice:one"]
            "#,
        )
        .expect("valid");
        let changes = fixed_changes(&old, &new);
        for key in [
            "listen (",
            "listen-tcp (",
            "relay-ip (",
            "port-range (",
            "realm (",
            "workers (",
            "fastpath (",
            "interface (",
            "admin (",
        ] {
            assert!(
                changes.iter().any(|c| c.starts_with(key)),
                "{key} not named in {changes:?}"
            );
        }
        assert!(
            changes.contains(&"listen ([127.0.0.1:3478] -> [127.0.0.1:3479])".to_owned()),
            "{changes:?}"
        );
        // Nothing reloadable is listed.
        assert!(
            !changes.iter().any(|c| c.starts_with("user")),
            "{changes:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_invalid_file_is_an_error_naming_the_problem() {
        let dir = scratch();
        let err = format!(
            "{:#}",
            load(
                &dir,
                "bad.toml",
                "listen = [\"127.0.0.1:3478\"]\nlisen = 1\n"
            )
            .unwrap_err()
        );
        assert!(err.contains("unknown field `lisen`"), "{err}");
        let err = format!(
            "{:#}",
            load(
                &dir,
                "bad.toml",
                "max-allocations = 4\nmax-allocations-per-user = 4\n"
            )
            .unwrap_err()
        );
        assert!(err.contains("must be below --max-allocations 4"), "{err}");
        assert!(parse_log_level("info,relay=nonsense-level").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
