//! The `relay serve` daemon: wires config, sockets, protocol core and fast path together.

mod interfaces;

use anyhow::Context;
use tracing::{info, warn};

use crate::{
    cli::{FastPathMode, ServeArgs},
    fastpath::{AttachMode, FastPath},
};

/// Runs the daemon until SIGINT/SIGTERM.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_level.as_deref().unwrap_or("info"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let fastpath = start_fastpath(&args)?;
    info!("relay running; stop with SIGINT or SIGTERM");
    wait_for_shutdown().await?;
    if let Some(fastpath) = &fastpath {
        report_verdicts(fastpath);
    }
    drop(fastpath);
    info!("relay stopped");
    Ok(())
}

/// Loads and attaches the kernel program as configured; `None` when the fast path is off.
fn start_fastpath(args: &ServeArgs) -> anyhow::Result<Option<FastPath>> {
    let mode = match args.fastpath.unwrap_or(FastPathMode::Off) {
        FastPathMode::Off => {
            info!("fast path: off (socket path only)");
            return Ok(None);
        }
        FastPathMode::Xdp => AttachMode::XdpNative,
        FastPathMode::XdpGeneric => AttachMode::XdpGeneric,
    };
    let interfaces = if args.interface.is_empty() {
        let addresses: Vec<_> = args
            .listen
            .iter()
            .map(|a| a.ip())
            .chain(args.relay_ip.iter().copied())
            .collect();
        interfaces::for_addresses(&addresses).context("finding interfaces to attach to")?
    } else {
        args.interface.clone()
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
        .init();
    Ok(())
}
