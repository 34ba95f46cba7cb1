//! `tandemd`: the Tandem node daemon.
//!
//! Loads the config (and, in a cluster of more than one node, the shared peer secret), opens
//! the pools, reloads the volume definitions, opens every replicated volume's replica in the
//! replication engine, serves the control API on `<run_dir>/tandemd.sock` and, in a cluster,
//! the authenticated peer control API on this node's `control` address, until SIGTERM or
//! SIGINT, every volume over NBD on `<run_dir>/nbd.sock` and over vhost-user-blk on
//! `<run_dir>/vhost/<volume>.sock`, and Prometheus metrics on `metrics_listen`; then closes the replicas cleanly, removes the socket and exits 0.
//! SIGHUP reloads the config (see `volume_driver::reload`).
//! Logs go to stderr (journald under systemd), filtered by `RUST_LOG` (default `info`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;
use volume_driver::config::{self, Config};
use volume_driver::engine::{Engine, NoEngine};
use volume_driver::engine_adapter::ReplicationEngine;
use volume_driver::events::EventHub;
use volume_driver::frontend::Exports;
use volume_driver::metrics::{self, Snapshot};
use volume_driver::metrics_http;
use volume_driver::nbd;
use volume_driver::peer;
use volume_driver::report::error_chain;
use volume_driver::server;
use volume_driver::service::VolumeService;
use volume_driver::vhost;

/// The Tandem node daemon: serves this host's volumes and the control API.
#[derive(Debug, Parser)]
#[command(name = "tandemd", version)]
struct Args {
    /// Configuration file [default: /etc/tandem/tandem.toml]
    #[arg(long, short = 'c', env = config::CONFIG_ENV, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args: Args = volume_driver::cli::parse_args();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator reads in `systemctl status` and the journal.
            eprintln!("tandemd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let path = config::resolve_path(args.config.as_deref());
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

/// Where the NBD frontend listens.
struct NbdListen {
    unix_socket: PathBuf,
    tcp: Option<SocketAddr>,
}

/// Bind the NBD listeners (unix socket always, TCP when configured) and serve every volume
/// on them until `stop` turns true.
fn start_nbd(
    listen: &NbdListen,
    exports: Arc<dyn Exports>,
    stop: nbd::Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let unix = nbd::bind_unix(&listen.unix_socket)
        .with_context(|| format!("cannot serve NBD on {}", listen.unix_socket.display()))?;
    tracing::info!(socket = %listen.unix_socket.display(), "NBD listening");
    let mut tasks = vec![tokio::spawn(nbd::serve_unix(
        unix,
        Arc::clone(&exports),
        stop.clone(),
    ))];
    if let Some(addr) = listen.tcp {
        let tcp = std::net::TcpListener::bind(addr)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .with_context(|| format!("cannot serve NBD on TCP {addr}"))?;
        tracing::info!(%addr, "NBD listening on TCP");
        tasks.push(tokio::spawn(nbd::serve_tcp(tcp, exports, stop)));
    }
    Ok(tasks)
}

/// Serve `/metrics` on `listen` in a task of its own. The endpoint is for observation
/// only: when its address cannot be bound, tandemd logs the error and serves volumes
/// without it rather than refusing to start VMs' disks.
async fn start_metrics(
    listen: Option<SocketAddr>,
    service: &Arc<VolumeService>,
) -> Option<tokio::task::JoinHandle<()>> {
    let addr = listen?;
    match metrics_http::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "metrics listening on http://{addr}/metrics");
            let service = Arc::clone(service);
            let render = move || {
                let service = Arc::clone(&service);
                async move { metrics::render(Snapshot::take(&service).await) }
            };
            Some(tokio::spawn(async move {
                if let Err(e) = metrics_http::serve(listener, render).await {
                    tracing::error!(%addr, error = %e, "metrics endpoint stopped");
                }
            }))
        }
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve metrics (metrics_listen); continuing without them");
            None
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let socket = config.control_socket();
    let metrics_listen = config.metrics_listen;
    let config_nbd = NbdListen {
        unix_socket: config.nbd_socket(),
        tcp: config.nbd.tcp_listen,
    };
    let vhost_dir = config.vhost_dir();
    let vhost_max_queues = usize::from(config.frontends.vhost_max_queues);
    tracing::info!(node = %config.node, config = %config.path.display(), "tandemd starting");
    if volume_driver::test_switch::drop_flush_requested() {
        tracing::error!(
            variable = volume_driver::test_switch::DROP_FLUSH_ENV,
            "TEST ONLY switch set: flushes to replicated volumes are dropped, a power cut loses acknowledged writes"
        );
    }
    // A cluster needs the shared secret before anything listens on the network.
    let secret = config
        .load_secret()
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let peer_addr = config
        .is_cluster()
        .then(|| config.this_node().map(|n| n.control))
        .flatten();
    // The replication engine listens on this node's replication address in a cluster; a
    // one-node install has no replicated volumes and no listener.
    let engine: Arc<dyn Engine> = match (&secret, config.this_node()) {
        (Some(secret), Some(this)) => {
            let engine = ReplicationEngine::start(
                &config.node,
                this.replication,
                secret.clone(),
                &config.engine,
            )
            .await
            .map_err(|e| anyhow::anyhow!("replication listener: {e}"))?;
            tracing::info!(address = %this.replication, "replication listener started");
            engine
        }
        _ => NoEngine::new(&config.node),
    };
    let service = {
        let secret = secret.clone();
        tokio::task::spawn_blocking(move || VolumeService::open_with(config, engine, secret))
            .await
            .context("startup task failed")?
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?
    };
    let service = Arc::new(service);
    service.start_replicas().await;

    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    // SIGHUP reloads the config (`tandem node reload` does the same); the outcome is logged.
    let reload_task = {
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                tracing::info!("SIGHUP received, reloading the config");
                // A refusal is logged by `reload` with its reason.
                let _ = service.reload().await;
            }
        })
    };
    // Membership changes owed to other nodes (replica add/remove/evict), retried until
    // delivered; an interrupted change resumes here.
    let membership_task = {
        let service = Arc::clone(&service);
        tokio::spawn(async move { service.run_membership_log().await })
    };
    // Snapshots an interrupted `snapshot create` left pending here: kept or removed as
    // every node's state says (volume_driver::snapshot_pending), retried until decided.
    let pending_snapshots_task = {
        let service = Arc::clone(&service);
        tokio::spawn(async move { service.run_pending_snapshots().await })
    };
    let listener = server::bind(&socket).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    tracing::info!(socket = %socket.display(), "control API listening");
    let peers = async {
        match (peer_addr, secret) {
            (Some(addr), Some(secret)) => {
                let listener = peer::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
                tracing::info!(address = %addr, "peer control API listening");
                peer::serve(listener, Arc::clone(&service), secret)
                    .await
                    .with_context(|| format!("peer control API on {addr} failed"))
            }
            _ => std::future::pending().await,
        }
    };
    let metrics = start_metrics(metrics_listen, &service).await;
    let events = {
        let service = Arc::clone(&service);
        EventHub::new(Box::new(move || service.status_all()))
    };
    let events_task = tokio::spawn(Arc::clone(&events).run());
    let exports: Arc<dyn Exports> = service.clone();
    let (stop_nbd, nbd_stopped) = tokio::sync::watch::channel(false);
    let nbd_tasks = start_nbd(&config_nbd, Arc::clone(&exports), nbd_stopped.clone())?;
    let vhost_task = tokio::spawn(vhost::serve(
        vhost::Settings {
            dir: vhost_dir,
            max_queues: vhost_max_queues,
            exports,
            runtime: tokio::runtime::Handle::current(),
            idle_timeout: vhost::IDLE_TIMEOUT,
        },
        nbd_stopped,
    ));
    let result = tokio::select! {
        served = server::serve(listener, Arc::clone(&service), events) => {
            served.with_context(|| format!("control API on {} failed", socket.display()))
        }
        served = peers => served,
        _ = sigterm.recv() => { tracing::info!("SIGTERM received, stopping"); Ok(()) }
        _ = sigint.recv() => { tracing::info!("SIGINT received, stopping"); Ok(()) }
    };
    if let Some(task) = metrics {
        task.abort();
    }
    events_task.abort();
    reload_task.abort();
    membership_task.abort();
    pending_snapshots_task.abort();
    let _ = stop_nbd.send(true);
    for task in nbd_tasks {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "NBD listener task failed");
        }
    }
    if let Err(e) = vhost_task.await {
        tracing::warn!(error = %e, "vhost-user-blk task failed");
    }
    if let Err(e) = std::fs::remove_file(&config_nbd.unix_socket) {
        tracing::warn!(socket = %config_nbd.unix_socket.display(), error = %e, "cannot remove NBD socket");
    }
    // Frontends are closed: now close the replicas cleanly (flush bitmaps, clean flag).
    service.shutdown().await;
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove control socket");
    }
    tracing::info!("tandemd stopped");
    result
}
