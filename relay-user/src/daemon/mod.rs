//! The `relay serve` daemon: wires config, sockets, protocol core and fast path together.

mod core;
mod interfaces;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use anyhow::Context;
use rand::{distributions::Alphanumeric, Rng, SeedableRng};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    cli::{FastPathMode, ServeArgs},
    config::{Config, StaticUser},
    control,
    fastpath::{AttachMode, FastPath},
    net,
    proto::{
        auth::Credentials,
        channel_data::LEGACY_CHANNEL_RANGE,
        policy::PeerPolicy,
        server::{Server, ServerConfig},
    },
};

pub use self::core::Event;

/// Batches queued between the socket tasks and the core before receivers wait.
const EVENT_QUEUE: usize = 1024;

/// Runs the daemon until SIGINT/SIGTERM.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_args(&args)?;
    init_logging(&config.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(mut config: Config) -> anyhow::Result<()> {
    if config.users.is_empty() && config.auth_secrets.is_empty() {
        let password: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(20)
            .map(char::from)
            .collect();
        warn!(
            "no --user or --auth-secret configured: generated the credential relay:{password} \
             (valid until this process exits)"
        );
        config.users.push(StaticUser {
            name: "relay".to_owned(),
            password,
        });
    }
    // The fast path comes first: if the operator asked for it and it cannot attach, nothing
    // else should start.
    let fastpath = start_fastpath(&config)?;

    let gso = net::batch::probe_gso();
    info!(
        "socket path: recvmmsg batches, sendmmsg{}",
        if gso {
            " with UDP GSO"
        } else {
            " (no UDP GSO on this kernel)"
        }
    );
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let admin_listener = control::http::bind(config.admin).await?;
    let admin_addr = admin_listener.local_addr().context("admin address")?;
    let (admin_tx, admin_rx) = mpsc::channel(64);
    let admin_task = tokio::spawn(control::http::serve(admin_listener, admin_tx));
    info!("admin endpoint on http://{admin_addr} (relay ctl --admin {admin_addr})");
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let socket = net::bind_udp(*addr)
            .with_context(|| format!("cannot listen on udp {addr} (in use, or not local?)"))?;
        let bound = socket.local_addr().context("listener address")?;
        info!("listening on udp {bound}");
        listeners.push((bound, Arc::new(socket)));
    }
    let server = Server::new(
        server_config(&config, &listeners),
        rand::rngs::StdRng::from_entropy(),
        Instant::now(),
        core::unix_now(),
    );
    let mut relay_core = core::Core::new(server, events_tx, fastpath);
    for (addr, socket) in &listeners {
        relay_core.add_listener(*addr, Arc::clone(socket));
    }
    info!(
        relay_ips = ?config.relay_ips,
        ports = %format!("{}-{}", config.port_range.start(), config.port_range.end()),
        realm = %config.realm,
        "relay running; stop with SIGINT or SIGTERM"
    );
    let result = relay_core
        .run(events_rx, admin_rx, wait_for_shutdown())
        .await;
    admin_task.abort();
    result?;
    info!("relay stopped");
    Ok(())
}

fn server_config(
    config: &Config,
    listeners: &[(SocketAddr, Arc<tokio::net::UdpSocket>)],
) -> ServerConfig {
    let mut credentials = Credentials::new(&config.realm);
    for user in &config.users {
        credentials.add_user(&user.name, &user.password);
    }
    for secret in &config.auth_secrets {
        credentials.add_rest_secret(secret);
    }
    let mut policy = PeerPolicy::safe_default();
    for net in &config.allow_peer {
        policy.allow(*net);
    }
    for net in &config.deny_peer {
        policy.deny(*net);
    }
    // Peers must never be the relay itself: that would let clients loop traffic through it.
    let own: Vec<_> = listeners
        .iter()
        .map(|(a, _)| a.ip())
        .chain(config.relay_ips.iter().copied())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    policy.set_relay_addresses(&own);
    let mut server = ServerConfig::new(
        config.realm.clone(),
        config.relay_ips.clone(),
        credentials,
        policy,
    );
    server.port_range = config.port_range.clone();
    if config.legacy_channels {
        server.channel_range = LEGACY_CHANNEL_RANGE;
    }
    server.software = Some(concat!("relay ", env!("CARGO_PKG_VERSION")).to_owned());
    server
}

/// Loads and attaches the kernel program as configured; `None` when the fast path is off.
fn start_fastpath(config: &Config) -> anyhow::Result<Option<FastPath>> {
    let mode = match config.fastpath {
        FastPathMode::Off => {
            info!("fast path: off (socket path only)");
            return Ok(None);
        }
        FastPathMode::Xdp => AttachMode::XdpNative,
        FastPathMode::XdpGeneric => AttachMode::XdpGeneric,
    };
    let interfaces = if config.interfaces.is_empty() {
        let addresses: Vec<_> = config
            .listen
            .iter()
            .map(|a| a.ip())
            .chain(config.relay_ips.iter().copied())
            .collect();
        interfaces::for_addresses(&addresses).context("finding interfaces to attach to")?
    } else {
        config.interfaces.clone()
    };
    anyhow::ensure!(
        !interfaces.is_empty(),
        "--fastpath needs an interface: pass --interface IFACE (no listener or relay address \
         lives on a non-loopback interface)"
    );
    let mut fastpath = FastPath::load()?;
    for interface in &interfaces {
        fastpath.attach(interface, mode)?;
        info!(%interface, %mode, "fast path attached");
    }
    Ok(Some(fastpath))
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    info!("shutting down");
    Ok(())
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-level `{filter}`"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}
