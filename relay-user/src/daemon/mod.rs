//! The `relay serve` daemon: wires config, sockets, protocol core and fast path together.

mod admin;
mod aggregate;
mod bandwidth;
mod connection;
mod connection_limits;
mod drain;
mod exposition;
mod host_addresses;
mod interfaces;
mod kernel_sync;
mod limits;
mod notify;
mod privileges;
mod reload;
mod tls;
mod usage;
mod worker;

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use anyhow::Context;
use rand::{distributions::Alphanumeric, Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    cli::{FastPathMode, ServeArgs},
    config::{Config, StaticUser},
    control,
    fastpath::{AttachMode, FastPath, MapCapacity},
    net,
};
use relay_proto::{
    auth::Credentials,
    channel_data::LEGACY_CHANNEL_RANGE,
    limiter::UnauthLimiter,
    policy::PeerPolicy,
    server::{
        AllocationQuota, BandwidthLedger, DrainState, LiveRelayed, QuotaLedger, Server,
        ServerConfig, UserBandwidth,
    },
    Transport,
};

use self::{
    kernel_sync::KernelSync,
    worker::{Worker, WorkerRequest},
};

/// Runs the daemon until SIGINT/SIGTERM, or until a drain (SIGUSR1, `relay ctl drain`) ends.
/// What `/metrics` answers with.
pub const METRICS_CONTENT_TYPE: &str = exposition::CONTENT_TYPE;

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_args(&args)?;
    reload::init_logging(&config.log_level)?;
    // The main runtime only runs the admin endpoint and waits for signals; the workers have
    // runtimes of their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(config, args))
}

/// `args` are kept for reloads, which re-read the configuration the same way.
async fn run(mut config: Config, args: ServeArgs) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM at any point of the start (a service manager stopping the relay
    // right after starting it) is a clean stop, never the default action.
    let mut signals = ShutdownSignals::install()?;
    // SIGHUP's default action ends the process: caught from the start too.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing SIGHUP handler")?;
    // SIGUSR1 (drain) too: its default action also ends the process.
    let usr1 = drain::install_sigusr1()?;
    // A certificate that cannot be used stops the start, naming the file, before anything
    // else is set up.
    let tls = match &config.streams.tls {
        Some(files) => Some(Arc::new(tls::TlsCertificates::load(files.clone())?)),
        None => None,
    };
    if config.secrets_on_command_line {
        warn!(
            "--user/--auth-secret on the command line are readable by every local user in \
             /proc/PID/cmdline: prefer --users-file, --auth-secret-file or RELAY_AUTH_SECRET"
        );
    }
    let mut generated = None;
    if config.users.is_empty() && config.auth_secrets.is_empty() {
        let password: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(20)
            .map(char::from)
            .collect();
        // Shown once where the operator looks, never in the (shipped) log.
        match crate::secrets::announce_generated("relay", &password)? {
            crate::secrets::Announced::Terminal => {
                warn!("no credential configured: generated one for user `relay`, shown once above")
            }
            crate::secrets::Announced::File(path) => warn!(
                "no credential configured: generated one for user `relay`; it is in {} \
                 (mode 0600, valid until this process exits)",
                path.display()
            ),
        }
        let user = StaticUser {
            name: "relay".to_owned(),
            password,
        };
        generated = Some(user.clone());
        config.users.push(user);
    }
    // While still root: descriptors for every allocation the caps allow.
    // (and one per TCP/TLS connection the caps allow, with TCP or TLS listeners).
    let stream_descriptors =
        if config.streams.listen_tcp.is_empty() && config.streams.listen_tls.is_empty() {
            0
        } else {
            config.streams.max_connections as u64
        };
    limits::raise_open_files(limits::needed(config.max_allocations) + stream_descriptors);
    // The fast path comes first: if the operator asked for it and it cannot attach, nothing
    // else should start.
    let fastpath = start_fastpath(&config)?;

    // TC sees a GRO aggregate as one skb and passes it to the socket path: no GRO with TC.
    net::set_gro(config.fastpath != FastPathMode::Tc);
    let gso = net::batch::probe_gso();
    info!(
        "socket path: recvmmsg batches{}, sendmmsg{}",
        if config.fastpath == FastPathMode::Tc {
            " (UDP GRO off for the TC fast path)"
        } else {
            " with UDP GRO"
        },
        if gso {
            " with UDP GSO"
        } else {
            " (no UDP GSO on this kernel)"
        }
    );
    let admin_listener = control::http::bind(config.admin).await?;
    let admin_addr = admin_listener.local_addr().context("admin address")?;
    let metrics_listener = match config.metrics {
        Some(addr) => {
            let listener = control::http::bind_read_only(addr).await?;
            let bound = listener.local_addr().context("metrics address")?;
            info!("metrics endpoint on http://{bound} (/metrics, /healthz, /readyz)");
            Some(listener)
        }
        None => None,
    };

    // Every worker gets one SO_REUSEPORT socket per listen address; the first one fixes the
    // port when the config says 0.
    let workers = config.workers.max(1);
    let mut sockets: Vec<Vec<(SocketAddr, std::net::UdpSocket)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for addr in &config.listen {
        let mut bound = *addr;
        for worker in sockets.iter_mut() {
            let socket = net::bind_udp_std(bound, true)
                .with_context(|| format!("cannot listen on udp {addr} (in use, or not local?)"))?;
            bound = socket.local_addr().context("listener address")?;
            worker.push((bound, socket));
        }
        if bound.ip().is_unspecified() {
            let family = if bound.is_ipv4() { "IPv4" } else { "IPv6" };
            info!(
                "listening on udp {bound} (all {family} addresses; replies leave from the \
                 address each client contacted)"
            );
        } else {
            info!("listening on udp {bound}");
        }
    }
    let streams = bind_stream_listeners(&config, workers)?;
    let own_addresses = interfaces::listener_ips(&config.listen)
        .context("listing the host addresses a wildcard listener serves")?;

    // One policy for every worker: its set of host addresses is shared and kept current from
    // netlink, so a secondary or SLAAC address added at runtime is denied at once.
    let policy = peer_policy(&config, &own_addresses);
    let monitor = host_addresses::open_monitor();
    host_addresses::refresh(policy.host_addresses());
    if let Some(fastpath) = &fastpath {
        kernel_sync::log_capacity(fastpath);
    }
    let kernel = Arc::new(Mutex::new(KernelSync::new(
        fastpath,
        policy.clone(),
        config.relay_ips.clone(),
    )?));
    // Opened as root: the file may live where the unprivileged daemon cannot create it.
    let usage = Arc::new(usage::UsageLog::open(config.usage_log.as_deref())?);
    // Everything privileged is done (programs attached, map descriptors open, listeners
    // bound) and no thread has started yet: drop root.
    if let Some(identity) =
        privileges::resolve(config.user_id.as_deref(), config.group_id.as_deref())?
    {
        // Port 0 picks an ephemeral port, never a privileged one.
        let low_ports = config
            .listen
            .iter()
            .chain(&config.streams.listen_tcp)
            .chain(&config.streams.listen_tls)
            .any(|a| (1..1024).contains(&a.port()))
            || *config.port_range.start() < 1024;
        privileges::drop_to(&identity, low_ports).context("dropping root privileges")?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let monitor = host_addresses::spawn_monitor(
        monitor,
        Arc::clone(&kernel),
        policy.host_addresses().clone(),
        stop_rx.clone(),
    );
    // One ledger for every worker: the caps are relay-wide.
    let ledger = Arc::new(QuotaLedger::default());
    let quota: Arc<dyn AllocationQuota> = ledger.clone();
    // One drain state for every worker: a drain covers the whole relay.
    let drain = drain::Drain {
        state: Arc::new(DrainState::default()),
        ledger,
        alternates: config.alternates.clone(),
    };
    // One budget for unauthenticated answers: a spoofed victim's limit is relay-wide.
    let unauth_limiter = Arc::new(UnauthLimiter::new(
        config.unauth_rate_bytes,
        config.unauth_burst_bytes,
    ));
    // One budget per user for the whole relay (issue 12 item 3); none without a limit, so the
    // relayed datagrams cost nothing extra.
    let bandwidth = config.user_bandwidth.map(|limit| {
        info!(
            rate = limit.rate,
            burst = limit.burst,
            "per-user bandwidth limit (bytes per second, both directions together)"
        );
        Arc::new(bandwidth::Shared {
            ledger: Arc::new(BandwidthLedger::new(limit.rate, limit.burst)),
            held_users: AtomicUsize::new(0),
        })
    });
    let live_relayed = Arc::new(LiveRelayed::default());
    let mut handles = Vec::new();
    let mut worker_requests = Vec::new();
    let alive_workers = Arc::new(AtomicUsize::new(0));
    let connection_limits = Arc::new(connection_limits::ConnectionLimits::new(
        config.streams.max_connections,
        config.streams.max_connections_per_ip,
    ));
    let stream_env = worker::StreamEnv {
        tls: tls.clone(),
        limits: Arc::clone(&connection_limits),
        handshake_timeout: config.streams.handshake_timeout,
        idle_timeout: config.streams.idle_timeout,
    };
    for ((index, listeners), stream_listeners) in sockets.into_iter().enumerate().zip(streams) {
        let mut server_config = server_config(&config, policy.clone());
        server_config.quota = Arc::clone(&quota);
        server_config.unauth_limiter = Arc::clone(&unauth_limiter);
        server_config.bandwidth = bandwidth
            .as_ref()
            .map(|b| Arc::clone(&b.ledger) as Arc<dyn UserBandwidth>);
        server_config.live_relayed = Arc::clone(&live_relayed);
        server_config.drain = Arc::clone(&drain.state);
        server_config.first_allocation_id = index as u64 + 1;
        server_config.allocation_id_stride = workers as u64;
        server_config.port_range = worker_ports(&config.port_range, index, workers);
        let (requests_tx, requests_rx) = mpsc::channel(16);
        worker_requests.push(requests_tx);
        let kernel = Arc::clone(&kernel);
        let stop = stop_rx.clone();
        let alive = notify::Alive::new(&alive_workers);
        let faults = if index == 0 {
            worker::Faults {
                receive_errors: config.fault_receive_errors,
                panic_after_datagrams: config.fault_panic_worker_after,
            }
        } else {
            worker::Faults::default()
        };
        let env = stream_env.clone();
        let usage = Arc::clone(&usage);
        let handle = std::thread::Builder::new()
            .name(format!("relay-worker-{index}"))
            .spawn(move || {
                let _alive = alive;
                let listeners = WorkerListeners {
                    udp: listeners,
                    streams: stream_listeners,
                    env,
                };
                run_worker(
                    server_config,
                    listeners,
                    kernel,
                    requests_rx,
                    stop,
                    faults,
                    usage,
                )
            })
            .context("starting a worker thread")?;
        handles.push(handle);
    }

    let reloader = reload::Reloader::new(
        args,
        reload::Running {
            config: config.clone(),
            own_addresses: own_addresses.clone(),
            policy: policy.clone(),
            generated,
        },
        tls.clone(),
        worker_requests.clone(),
        Arc::clone(&kernel),
    );
    // The kernel path cannot run the shared buckets: a sampler moves users over the limit to
    // the socket path (see `bandwidth`).
    let sampler = match (&bandwidth, worker::lock(&kernel).attached()) {
        (Some(shared), true) => Some(tokio::spawn(bandwidth::run(
            Arc::clone(shared),
            Arc::clone(&kernel),
            stop_rx.clone(),
        ))),
        _ => None,
    };
    let (admin_tx, admin_rx) = mpsc::channel(64);
    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(control::http::serve(
            listener,
            admin_tx.clone(),
            control::http::Exposure::ReadOnly,
        ))
    });
    let admin_task = tokio::spawn(control::http::serve(
        admin_listener,
        admin_tx,
        control::http::Exposure::Admin,
    ));
    let router = tokio::spawn(admin::route(
        admin_rx,
        worker_requests,
        Arc::clone(&kernel),
        Arc::clone(&alive_workers),
        admin::Limits {
            unauth: unauth_limiter,
            bandwidth,
        },
        Arc::clone(&reloader),
        connection_limits,
        drain.clone(),
    ));
    info!("admin endpoint on http://{admin_addr} (relay ctl --admin {admin_addr})");
    info!(
        workers,
        relay_ips = ?config.relay_ips,
        ports = %format!("{}-{}", config.port_range.start(), config.port_range.end()),
        realm = %config.realm,
        "relay running; stop with SIGINT or SIGTERM"
    );
    // Listeners are bound, the fast path attached, the workers started: ready (systemd).
    let notifier = Arc::new(notify::Notifier::from_env());
    notifier.notify(&format!(
        "READY=1\nSTATUS=relaying on {} listener(s) with {workers} worker(s)",
        config.listen.len() + config.streams.listen_tcp.len() + config.streams.listen_tls.len()
    ));
    let watchdog = notify::Notifier::watchdog_interval().map(|every| {
        let notifier = Arc::clone(&notifier);
        let alive = Arc::clone(&alive_workers);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // A dead worker stops the pings: systemd then restarts the relay.
                if alive.load(Ordering::SeqCst) == workers {
                    notifier.notify("WATCHDOG=1");
                }
            }
        })
    });
    // A worker that ends on its own (a panic, a fatal error) takes the relay down with a
    // failure exit: its allocations' state is gone with it and its listeners left the
    // SO_REUSEPORT group, so the kernel would hash its clients to other workers that know
    // nothing of them. Stopping everything cleanly (kernel entries removed) and letting the
    // service manager restart the relay is the one state that is whole again.
    let reloads = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            info!("SIGHUP: reloading");
            // Refusals are logged by the reload itself.
            let _ = reloader.lock().await.reload().await;
        }
    });
    let drains = tokio::spawn(drain::on_sigusr1(usr1, drain.clone()));
    let result = tokio::select! {
        result = signals.wait() => result,
        // Draining and nothing left (or the deadline passed): a clean stop, exit 0.
        () = drain::drained(&drain) => Ok(()),
        () = worker_lost(&alive_workers, workers) => Err(anyhow::anyhow!(
            "a worker thread stopped unexpectedly; the relay stops so that its service \
             manager restarts it"
        )),
    };
    reloads.abort();
    drains.abort();
    notifier.notify("STOPPING=1");
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    let _ = stop_tx.send(true);
    admin_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    router.abort();
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let mut released = 0;
    for handle in handles {
        match handle.join() {
            Ok(Ok(n)) => released += n,
            Ok(Err(error)) => warn!("worker failed: {error:#}"),
            Err(_) => warn!("a worker thread panicked"),
        }
    }
    info!(released, "relay sockets released");
    if let Some(monitor) = monitor {
        let _ = monitor.join();
    }
    let fastpath = worker::lock(&kernel).shutdown();
    if let Some(fastpath) = fastpath {
        report_verdicts(&fastpath);
        // Dropping it detaches the programs and frees the maps (nothing is pinned).
        drop(fastpath);
        info!("fast path detached");
    }
    result?;
    info!("relay stopped");
    Ok(())
}

/// The listener sockets of one worker, and what its TCP/TLS clients need.
struct WorkerListeners {
    udp: Vec<(SocketAddr, std::net::UdpSocket)>,
    streams: Vec<(std::net::TcpListener, Transport)>,
    env: worker::StreamEnv,
}

/// One SO_REUSEPORT TCP listener per worker for every `--listen-tcp` and `--listen-tls`
/// address (the first fixes the port when the config says 0): the kernel spreads connections
/// over the workers.
fn bind_stream_listeners(
    config: &Config,
    workers: usize,
) -> anyhow::Result<Vec<Vec<(std::net::TcpListener, Transport)>>> {
    let mut per_worker: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    let listeners = config
        .streams
        .listen_tcp
        .iter()
        .map(|a| (*a, Transport::Tcp))
        .chain(
            config
                .streams
                .listen_tls
                .iter()
                .map(|a| (*a, Transport::Tls)),
        );
    for (addr, transport) in listeners {
        let mut bound = addr;
        for worker in per_worker.iter_mut() {
            let listener = net::bind_tcp_listener(bound, true).with_context(|| {
                format!("cannot listen on {transport} {addr} (in use, or not local?)")
            })?;
            bound = listener.local_addr().context("listener address")?;
            worker.push((listener, transport));
        }
        info!(
            "listening on {transport} {bound} (TURN over {})",
            transport.label().to_uppercase()
        );
    }
    Ok(per_worker)
}

/// One worker thread: a single-threaded runtime around the worker's loop.
fn run_worker(
    config: ServerConfig,
    listeners: WorkerListeners,
    kernel: Arc<Mutex<KernelSync>>,
    requests: mpsc::Receiver<WorkerRequest>,
    stop: watch::Receiver<bool>,
    faults: worker::Faults,
    usage: Arc<usage::UsageLog>,
) -> anyhow::Result<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a worker runtime")?;
    runtime.block_on(async move {
        let server = Server::new(
            config,
            rand::rngs::StdRng::from_entropy(),
            Instant::now(),
            worker::unix_now(),
        );
        let mut worker =
            Worker::new(server, kernel, faults, listeners.env, usage).context("worker epoll")?;
        for (addr, socket) in listeners.udp {
            worker
                .add_listener(addr, socket)
                .with_context(|| format!("listener socket {addr}"))?;
        }
        for (listener, transport) in listeners.streams {
            worker
                .add_stream_listener(listener, transport)
                .with_context(|| format!("{transport} listener socket"))?;
        }
        Ok(worker.run(requests, stop).await)
    })
}

/// Worker `index` of `workers` relays on its own slice of the port range, so workers never
/// race for a port; a range too small to split is shared (a lost race only costs a retry).
fn worker_ports(range: &RangeInclusive<u16>, index: usize, workers: usize) -> RangeInclusive<u16> {
    let (lo, hi) = (usize::from(*range.start()), usize::from(*range.end()));
    let span = hi + 1 - lo;
    if workers <= 1 || span < workers * 16 {
        return range.clone();
    }
    let share = span / workers;
    let start = lo + index * share;
    let end = if index + 1 == workers {
        hi
    } else {
        start + share - 1
    };
    match (u16::try_from(start), u16::try_from(end)) {
        (Ok(start), Ok(end)) => start..=end,
        _ => range.clone(),
    }
}

fn report_verdicts(fastpath: &FastPath) {
    match fastpath.verdict_counters() {
        Ok(counters) => {
            let summary: Vec<String> = counters
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(reason, n)| format!("{}={n}", reason.label()))
                .collect();
            info!("fast path verdicts: {}", summary.join(" "));
        }
        Err(error) => warn!("cannot read fast path counters: {error}"),
    }
}

/// The configured peer policy. The relay's own addresses are denied as peers (clients could
/// loop traffic through it or reach services on the host); the server makes the one exception
/// of live relayed transport addresses (client-to-client).
fn peer_policy(config: &Config, listeners: &[IpAddr]) -> PeerPolicy {
    let mut policy = PeerPolicy::safe_default();
    for net in &config.allow_peer {
        policy.allow(*net);
    }
    for net in &config.deny_peer {
        policy.deny(*net);
    }
    for ip in &config.allow_peer_unsafe {
        warn!(%ip, "--allow-peer-unsafe: peers may reach {ip}, which the safe default never allows");
        policy.allow_unsafe(*ip);
    }
    for prefix in &config.nat64_prefixes {
        // Validated with the config.
        if let Err(error) = policy.add_nat64_prefix(*prefix) {
            warn!("{error}");
        }
    }
    let own: Vec<_> = listeners
        .iter()
        .copied()
        .chain(config.relay_ips.iter().copied())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    policy.set_relay_addresses(&own);
    policy
}

fn server_config(config: &Config, policy: PeerPolicy) -> ServerConfig {
    let mut credentials = Credentials::new(&config.realm);
    for user in &config.users {
        credentials.add_user(&user.name, &user.password);
    }
    for secret in &config.auth_secrets {
        credentials.add_rest_secret(secret);
    }
    let mut server = ServerConfig::new(
        config.realm.clone(),
        config.relay_ips.clone(),
        credentials,
        policy,
    );
    server.port_range = config.port_range.clone();
    server.max_allocations = config.max_allocations;
    server.max_allocations_per_user = config.max_allocations_per_user;
    if config.legacy_channels {
        server.channel_range = LEGACY_CHANNEL_RANGE;
    }
    if let Some(lifetime) = config.permission_lifetime {
        server.permission_lifetime = lifetime;
    }
    if let Some(lifetime) = config.channel_lifetime {
        server.channel_lifetime = lifetime;
    }
    server.alternates = config.alternates.clone();
    server.redirect_above = config.redirect_above;
    if let Some(lifetime) = config.allocation_lifetime {
        server.default_lifetime = lifetime;
        server.max_lifetime = server.max_lifetime.max(lifetime);
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
        FastPathMode::Tc => AttachMode::Tc,
    };
    let interfaces = if config.interfaces.is_empty() {
        let addresses: Vec<_> = config
            .listen
            .iter()
            .map(|a| a.ip())
            .chain(config.relay_ips.iter().copied())
            .collect();
        let found =
            interfaces::for_addresses(&addresses).context("finding interfaces to attach to")?;
        // Found, not named: a wildcard listener matches tunnels too, which the fast path
        // cannot serve (no Ethernet header); their traffic stays on the socket path.
        found
            .into_iter()
            .filter(|interface| {
                let ethernet = crate::fastpath::is_ethernet(interface);
                if !ethernet {
                    info!(%interface, "not an Ethernet interface: the fast path leaves it to the socket path");
                }
                ethernet
            })
            .collect()
    } else {
        config.interfaces.clone()
    };
    anyhow::ensure!(
        !interfaces.is_empty(),
        "--fastpath needs an interface: pass --interface IFACE (no listener or relay address \
         lives on a non-loopback interface)"
    );
    let capacity = kernel_capacity(config);
    let mut fastpath = FastPath::load_with(crate::fastpath::EBPF_OBJECT, capacity)?;
    for interface in &interfaces {
        fastpath.attach(interface, mode)?;
        info!(%interface, %mode, "fast path attached");
    }
    Ok(Some(fastpath))
}

/// Kernel memory the fast path's maps may preallocate by default.
const DEFAULT_KERNEL_MAP_BUDGET: usize = 16 << 20;

/// `--kernel-bindings`, or enough bindings for every allocation the quotas allow to bind every
/// channel it may, within [`DEFAULT_KERNEL_MAP_BUDGET`].
fn kernel_capacity(config: &Config) -> MapCapacity {
    if let Some(bindings) = config.kernel_bindings {
        return MapCapacity::for_bindings(bindings);
    }
    let defaults = ServerConfig::new("", Vec::new(), Credentials::new(""), PeerPolicy::default());
    let wanted = config
        .max_allocations
        .saturating_mul(defaults.max_channels_per_allocation);
    let cpus = aya::util::nr_cpus().unwrap_or(1);
    let per_binding = MapCapacity::for_bindings(1).bytes(cpus);
    let affordable = DEFAULT_KERNEL_MAP_BUDGET / per_binding.max(1);
    let bindings = wanted.min(affordable).clamp(1, u32::MAX as usize);
    MapCapacity::for_bindings(u32::try_from(bindings).unwrap_or(u32::MAX))
}

/// Resolves once fewer than `workers` worker threads are alive.
async fn worker_lost(alive: &AtomicUsize, workers: usize) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tick.tick().await;
        if alive.load(Ordering::SeqCst) < workers {
            return;
        }
    }
}

/// SIGINT and SIGTERM, caught from the start of `run`.
struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
        })
    }

    async fn wait(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        info!("shutting down");
        Ok(())
    }
}
