//! The `tidemark` daemon: configuration, the gRPC server (replication and the
//! write API), the capture loop, peer sessions, and an ordered shutdown.
//!
//! Start-up, in order: open the store (migrate, check identity, seed the clock),
//! bind the cluster id, register the configured tables, drain captures left from
//! before, bind the gRPC listener, start the capture loop and one session per
//! peer. Shutdown, in order: stop accepting and cancel every task (a receiver
//! finishes the batch in hand: commit, then ack), wait for the tasks, close the
//! store.

pub mod access;
pub mod admin;
pub mod bench;
pub mod certs;
pub mod cli;
pub mod config;
pub mod demo;
pub mod http;
pub mod peers;
pub mod pgserver;
pub mod ports;
pub mod records;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tidemark_hlc::{Clock, WallClock};
use tidemark_replicator::{ReceiverService, Sender};
use tidemark_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub use config::{Config, Settings, TableSettings};

/// How long shutdown waits for tasks before closing the store anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A started node.
#[derive(Debug)]
pub struct Node {
    /// The address the gRPC server listens on.
    pub grpc_addr: SocketAddr,
    /// Where the Admin service listens (the gRPC address unless separate).
    pub admin_addr: SocketAddr,
    /// The HTTP listener for /metrics, /healthz, /readyz, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub store: Store,
    pub sender: Sender,
    peer_names: peers::PeerNames,
    local: tidemark_replicator::LocalNode,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// Why the node stopped by itself, if it did (the writer lock was lost).
    fault: Arc<std::sync::OnceLock<String>>,
}

impl Node {
    /// Starts a node; it runs until `shutdown` is cancelled, then call
    /// [`Node::stopped`].
    pub async fn start(
        settings: Settings,
        shutdown: CancellationToken,
        metrics: Option<PrometheusHandle>,
    ) -> anyhow::Result<Node> {
        let node_id = settings.local.node_id;
        if metrics.is_some() {
            http::export_at_zero();
        }
        if settings.clock_offset_ms != 0 {
            warn!(
                offset_ms = settings.clock_offset_ms,
                "this node's wall clock is deliberately shifted (clock.offset_ms)"
            );
            tidemark_hlc::set_system_offset_ms(settings.clock_offset_ms);
        }
        let clock = Arc::new(
            Clock::new(node_id, settings.max_drift_ms, WallClock::System)
                .context("clock.max_drift_ms")?,
        );
        let store = Store::open(&settings.store_url, clock)
            .await
            .context("opening the store (store.url)")?;
        store
            .bind_cluster(&settings.local.cluster_id)
            .await
            .context("node.cluster_id")?;
        store.set_max_event_bytes(settings.max_event_bytes);
        for table in &settings.tables {
            let info = store
                .register_table_with(&table.name, table.policy, &table.types)
                .await
                .with_context(|| format!("registering table {} (tables)", table.name))?;
            if info.conflict_policy != table.policy {
                warn!(
                    table = %table.name,
                    configured = %table.policy,
                    registered = %info.conflict_policy,
                    "the configured conflict_policy applies only at first registration; the cluster-wide policy is {} (change it with `tidemark admin policy set`)",
                    info.conflict_policy
                );
            }
            debug!(table = %table.name, columns = ?info.columns, policy = %info.conflict_policy, "table registered");
        }
        // A node removed from [[peers]] is no longer waited for: its progress goes.
        let configured: Vec<ulid::Ulid> = settings.peers.iter().map(|p| p.node_id).collect();
        let forgotten = store
            .forget_peers(&configured)
            .await
            .context("forgetting removed peers")?;
        if forgotten > 0 {
            info!(
                peers = forgotten,
                "forgot the progress of peers no longer configured (removed nodes)"
            );
        }
        // New own events wait until the peers have said how far they hold this
        // node's origin (a restored database takes its lost events back first).
        if !settings.peers.is_empty() && !settings.startup_check.is_zero() {
            store.hold_own_writes();
        }
        let drained = store.drain().await.context("draining captured writes")?;
        metrics::counter!("tidemark_events_captured_total", "source" => "sql")
            .increment(drained.events);
        report_set_aside(&drained.set_aside);
        if drained.events > 0 {
            info!(
                events = drained.events,
                "stamped direct writes captured while stopped"
            );
        }

        let cancel = shutdown.child_token();
        let tracker = TaskTracker::new();
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| {
                format!(
                    "server.listen_addr: cannot listen on {}",
                    settings.listen_addr
                )
            })?;
        let grpc_addr = listener.local_addr()?;

        let records = records::RecordsService::new(store.clone());
        let write_limits = records::WriteLimits {
            max_event_bytes: settings.max_event_bytes,
            in_flight_bytes: settings.max_write_bytes_in_flight,
        };
        let peer_set = tidemark_replicator::PeerSet::new(settings.peers.clone());
        let peer_names: peers::PeerNames =
            Arc::new(std::sync::RwLock::new(settings.peer_names.clone()));
        let sender = Sender::new(
            store.clone(),
            settings.local.clone(),
            settings.replication.clone(),
            peer_set.clone(),
            settings.tls.clone(),
        );
        let receiver = ReceiverService::new(
            store.clone(),
            settings.local.clone(),
            settings.replication.clone(),
            cancel.clone(),
            tracker.clone(),
            peer_set,
            settings.tls.is_some(),
        )
        .waking(sender.wake_handle())
        .catching_up(sender.catch_up().clone());
        let admin = admin::AdminService::new(
            store.clone(),
            sender.clone(),
            peer_names.clone(),
            settings.name.clone(),
            settings.local.cluster_id.clone(),
        );
        let max_message = settings.replication.max_message_bytes;
        let access = access::Access::new(
            settings.local.node_id,
            access::Names::from_config(&settings.writers),
            access::Names::from_config(&settings.operators),
            settings.admin_token.as_ref().map(|t| t.0.as_str()),
        );
        let auth = access.require(access::Role::Operator);
        if settings.admin_token.is_none() {
            warn!(
                "the admin RPC has no authentication (admin.token_file is empty): expose it only on loopback or a trusted network"
            );
        }
        if settings.tls.is_none() {
            warn!(
                "peers run in plaintext without authentication (tls.insecure = true): use it only on a trusted network"
            );
        }
        let peer_tls = settings.tls.as_ref().map(|t| {
            tonic::transport::ServerTlsConfig::new()
                .identity(t.identity())
                .client_ca_root(t.ca())
                .timeout(Duration::from_secs(10))
        });
        let builder = || {
            // `tcp_nodelay` here would apply only to listeners tonic binds
            // itself; ours come bound, see `accepting`.
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(settings.replication.keepalive_interval()))
                .http2_keepalive_timeout(Some(settings.replication.keepalive_timeout()))
                .max_concurrent_streams(Some(settings.max_concurrent_streams))
                .concurrency_limit_per_connection(256)
                .timeout(settings.request_timeout)
        };
        let mut peer_builder = builder();
        if let Some(tls) = peer_tls {
            peer_builder = peer_builder
                .tls_config(tls)
                .context("tls: loading the certificate and key")?;
        }
        let peer_router = peer_builder
            .add_service(receiver.into_server())
            .add_service(records.into_server(
                write_limits,
                max_message,
                access.require(access::Role::Writer),
            ));
        let admin_addr = match settings.admin_addr {
            // Admin, health and reflection on a listener of their own.
            Some(addr) => {
                let admin_listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("admin.listen_addr: cannot listen on {addr}"))?;
                let bound = admin_listener.local_addr()?;
                let (health_service, reflection, reflection_alpha) = operator_services().await?;
                let admin_server = builder()
                    .add_service(admin.into_server(max_message, auth))
                    .add_service(health_service)
                    .add_service(reflection)
                    .add_service(reflection_alpha)
                    .serve_with_incoming_shutdown(
                        accepting(admin_listener),
                        cancel.clone().cancelled_owned(),
                    );
                tracker.spawn(async move {
                    if let Err(e) = admin_server.await {
                        error!(error = %e, "admin gRPC server failed");
                    }
                });
                let server = peer_router.serve_with_incoming_shutdown(
                    accepting(listener),
                    cancel.clone().cancelled_owned(),
                );
                tracker.spawn(async move {
                    if let Err(e) = server.await {
                        error!(error = %e, "gRPC server failed");
                    }
                });
                bound
            }
            None => {
                let (health_service, reflection, reflection_alpha) = operator_services().await?;
                let server = peer_router
                    .add_service(admin.into_server(max_message, auth))
                    .add_service(health_service)
                    .add_service(reflection)
                    .add_service(reflection_alpha)
                    .serve_with_incoming_shutdown(
                        accepting(listener),
                        cancel.clone().cancelled_owned(),
                    );
                tracker.spawn(async move {
                    if let Err(e) = server.await {
                        error!(error = %e, "gRPC server failed");
                    }
                });
                grpc_addr
            }
        };

        let metrics_addr = match (settings.metrics_addr, metrics) {
            (Some(addr), Some(handle)) => {
                let http_listener = TcpListener::bind(addr).await.with_context(|| {
                    format!("server.metrics_listen_addr: cannot listen on {addr}")
                })?;
                let bound = http_listener.local_addr()?;
                tracker.spawn(http::serve(
                    http_listener,
                    handle.clone(),
                    store.clone(),
                    sender.catch_up().clone(),
                    cancel.clone(),
                ));
                tracker.spawn(http::refresh(
                    store.clone(),
                    sender.clone(),
                    peer_names.clone(),
                    handle,
                    cancel.clone(),
                ));
                Some(bound)
            }
            _ => None,
        };

        tracker.spawn(capture_loop(
            store.clone(),
            settings.capture_poll,
            cancel.clone(),
        ));

        tracker.spawn(peers::supervise(
            sender.clone(),
            store.clone(),
            peer_names.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        tracker.spawn(sender.clone().run_sync_marker(cancel.clone()));
        sender.catch_up().set_grace(settings.startup_check);
        tracker.spawn(sender.catch_up().clone().watch(
            store.clone(),
            sender.peers().clone(),
            cancel.clone(),
        ));
        tracker.spawn(startup_check(
            store.clone(),
            settings.peers.iter().map(|p| p.node_id).collect(),
            settings.startup_check,
            cancel.clone(),
        ));
        if let Some(retention) = settings.retention.clone() {
            tracker.spawn(retention_loop(
                store.clone(),
                retention,
                sender.peers().clone(),
                cancel.clone(),
            ));
        }
        let fault = Arc::new(std::sync::OnceLock::new());
        tracker.spawn(store_watch(store.clone(), fault.clone(), cancel.clone()));
        info!(
            node = %node_id,
            name = %settings.name,
            cluster = %settings.local.cluster_id,
            store = store.kind(),
            grpc = %grpc_addr,
            admin = %admin_addr,
            metrics = ?metrics_addr,
            peers = settings.peers.len(),
            tables = settings.tables.len(),
            "tidemark ready"
        );
        Ok(Node {
            grpc_addr,
            admin_addr,
            metrics_addr,
            store,
            sender,
            peer_names,
            local: settings.local.clone(),
            cancel,
            tracker,
            fault,
        })
    }

    /// What changes the peer list while the node runs.
    pub fn peer_control(&self) -> PeerControl {
        PeerControl {
            sender: self.sender.clone(),
            peer_names: self.peer_names.clone(),
            local: self.local.clone(),
        }
    }

    /// Why the node stopped by itself, if it did: set before the shutdown it
    /// caused.
    pub fn fault(&self) -> Arc<std::sync::OnceLock<String>> {
        self.fault.clone()
    }

    /// Waits for shutdown, lets every task finish, and closes the store.
    pub async fn stopped(self) {
        self.cancel.cancelled().await;
        info!("shutting down");
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(grace = ?SHUTDOWN_GRACE, "tasks still running after the grace period; closing the store anyway");
        }
        self.store.close().await;
        info!("stopped");
    }
}

/// Changes a running node's peer list ([`Node::peer_control`]).
#[derive(Debug, Clone)]
pub struct PeerControl {
    sender: Sender,
    peer_names: peers::PeerNames,
    local: tidemark_replicator::LocalNode,
}

impl PeerControl {
    /// Replaces the peer list with the `[[peers]]` of `settings` (a reloaded
    /// config): sessions start for added peers and stop for removed ones,
    /// which are no longer waited for (see [`peers`]). Other settings take
    /// effect only at the next start; a config naming another node id or
    /// cluster is refused.
    pub fn reload_peers(&self, settings: &Settings) -> anyhow::Result<()> {
        if settings.local != self.local {
            anyhow::bail!(
                "node.id and node.cluster_id cannot change while running (config has {} in {}, running as {} in {}); restart to change them",
                settings.local.node_id,
                settings.local.cluster_id,
                self.local.node_id,
                self.local.cluster_id
            );
        }
        let before = self.sender.peers().ids();
        *self.peer_names.write().unwrap_or_else(|p| p.into_inner()) = settings.peer_names.clone();
        self.sender.peers().replace(settings.peers.clone());
        let after = self.sender.peers().ids();
        info!(
            added = ?after.iter().filter(|p| !before.contains(p)).collect::<Vec<_>>(),
            removed = ?before.iter().filter(|p| !after.contains(p)).collect::<Vec<_>>(),
            peers = after.len(),
            "reloaded [[peers]]; other settings take effect at the next start"
        );
        Ok(())
    }
}

/// Health (every service SERVING) and reflection (v1 and v1alpha), for operators
/// and generic clients.
#[allow(clippy::type_complexity)]
/// Connections accepted on a bound listener, with Nagle's algorithm off.
///
/// tonic sets `TCP_NODELAY` only on listeners it binds itself; on ours a small
/// message (a peer's ack, a unary reply) written while an earlier segment is
/// unacknowledged would wait for the other side's delayed ACK, about 40 ms,
/// and stall a replication session that keeps one batch in flight.
fn accepting(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn operator_services() -> anyhow::Result<(
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    use tidemark_replicator::pb;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::replication_server::ReplicationServer<ReceiverService>>()
        .await;
    health
        .set_serving::<pb::records_server::RecordsServer<records::RecordsService>>()
        .await;
    health
        .set_serving::<pb::admin_server::AdminServer<admin::AdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the gRPC reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the gRPC reflection service")?;
    Ok((health_service, reflection, reflection_alpha))
}

/// Drains the capture queue whenever direct writes may be pending.
/// Releases new own events once every peer has said how far it holds this
/// node's origin (or `wait` is over) and the log holds every own event a peer
/// has (or they stopped arriving for `wait`).
async fn startup_check(
    store: Store,
    peers: Vec<ulid::Ulid>,
    wait: Duration,
    cancel: CancellationToken,
) {
    if !store.own_writes_held() {
        return;
    }
    let me = store.clock().node_id();
    let started = tokio::time::Instant::now();
    let pause = async |ms: u64| {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
        }
    };
    loop {
        let heard = store.own_heard_from();
        let silent: Vec<String> = peers
            .iter()
            .filter(|p| !heard.contains(p))
            .map(|p| p.to_string())
            .collect();
        if silent.is_empty() {
            break;
        }
        if started.elapsed() >= wait {
            warn!(
                ?silent,
                "not every peer answered within replication.startup_check_ms; writing anyway (if this database was restored from an older copy, the events it lost are asked back when those peers answer)"
            );
            break;
        }
        if !pause(50).await {
            return;
        }
    }
    let mut progress: Option<(tidemark_hlc::Hlc, tokio::time::Instant)> = None;
    loop {
        let missing = match store.own_missing().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot check this node's own events against its peers'");
                None
            }
        };
        let Some(upto) = missing else { break };
        let have = store.vector().await.map(|v| v.get(me)).unwrap_or_default();
        match progress {
            Some((last, since)) if last == have => {
                if since.elapsed() >= wait {
                    error!(
                        peer_has = %upto,
                        log_has = %have,
                        "events of this node its peers hold stopped arriving (a peer that may not relay cannot send them: see `tidemark admin status`); writing anyway, they stay asked for"
                    );
                    break;
                }
            }
            _ => {
                info!(peer_has = %upto, log_has = %have, "taking back this node's own events from its peers before writing");
                progress = Some((have, tokio::time::Instant::now()));
            }
        }
        if !pause(100).await {
            return;
        }
    }
    store.release_own_writes();
    info!(after = ?started.elapsed(), "own events checked with the peers; writes open");
}

async fn capture_loop(store: Store, poll: Duration, cancel: CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = store.own_writes_released() => {}
    }
    let fallback = if store.kind() == "postgres" {
        poll.max(Duration::from_secs(1))
    } else {
        poll
    };
    let mut waiter = loop {
        match store.capture_waiter(fallback).await {
            Ok(w) => break w,
            Err(e) => {
                warn!(error = %e, "cannot listen for captured writes; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut failures = 0u32;
    loop {
        let pending = match store.has_captures().await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the capture queue");
                false
            }
        };
        if pending {
            match store.drain().await {
                Ok(out) => {
                    failures = 0;
                    debug!(events = out.events, "captured writes stamped");
                    report_set_aside(&out.set_aside);
                    http::count_captures(&store);
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!("tidemark_store_errors_total", "op" => "drain").increment(1);
                    if e.is_transient() {
                        warn!(error = %e, failures, "capture drain failed; retrying");
                    } else {
                        error!(error = %e, failures, "capture drain failed; retrying");
                    }
                    let pause = Duration::from_millis(100 * u64::from(failures.min(50)));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = waiter.wait() => {}
        }
    }
}

/// Logs captured writes that cannot be replicated (the rows stay on this node;
/// `tidemark admin unreplicated` lists them).
fn report_set_aside(set_aside: &[tidemark_store::SetAside]) {
    for s in set_aside {
        warn!(
            table = %s.table_name,
            record_id = %s.record_id,
            operation = %s.operation,
            reason = %s.reason,
            "a direct write cannot be replicated: set aside, the row stays on this node"
        );
    }
}

/// Runs a node until SIGINT or SIGTERM. On SIGHUP, `reload` reads the config
/// again and the node takes its `[[peers]]` ([`Node::reload_peers`]); a
/// config that does not load is reported and changes nothing.
pub async fn run(
    settings: Settings,
    reload: impl Fn() -> Result<Settings, String> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let metrics = match settings.metrics_addr {
        Some(_) => Some(http::install_recorder().context("installing the metrics recorder")?),
        None => None,
    };
    let node = Node::start(settings, shutdown.clone(), metrics).await?;
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    let reloading = node.peer_control();
    let hangups = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP: the peer list cannot be reloaded");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangups.cancelled() => return,
                _ = hup.recv() => {}
            }
            info!("SIGHUP received: reloading [[peers]] from the config");
            match reload() {
                Ok(settings) => {
                    if let Err(e) = reloading.reload_peers(&settings) {
                        error!(error = %e, "config not reloaded");
                    }
                }
                Err(e) => error!(error = %e, "config not reloaded: the running peers stay"),
            }
        }
    });
    let fault = node.fault();
    node.stopped().await;
    match fault.get() {
        Some(why) => anyhow::bail!("stopped: {why}"),
        None => Ok(()),
    }
}

/// How often the writer lock is checked (PostgreSQL's lock lives with one session).
const LOCK_CHECK: Duration = Duration::from_secs(5);
/// How often the capture triggers are checked, in lock checks.
const CAPTURE_CHECK_EVERY: u32 = 6;

/// Compacts the log (`[retention]`): a step at a time while a pass over the
/// log finds work, then a pause; each step is one short write transaction.
/// Tombstones wait for every peer configured at that step (`peers`, reloaded
/// on SIGHUP).
async fn retention_loop(
    store: Store,
    r: config::RetentionSettings,
    peers: tidemark_replicator::PeerSet,
    cancel: CancellationToken,
) {
    let (mut deleted_in_pass, mut tombstones_in_pass) = (0u64, 0u64);
    let mut failures = 0u32;
    loop {
        let rules = tidemark_store::Retain {
            min_age: r.min_age,
            tombstone_min_age: r.tombstone_min_age,
            peers: peers.ids(),
        };
        let pause = match store.compact_step(&rules, r.batch).await {
            Ok(done) => {
                failures = 0;
                metrics::counter!("tidemark_events_compacted_total").increment(done.deleted);
                metrics::counter!("tidemark_conflicts_compacted_total").increment(done.conflicts);
                metrics::counter!("tidemark_tombstones_compacted_total").increment(done.tombstones);
                metrics::counter!("tidemark_quarantine_compacted_total")
                    .increment(done.quarantined);
                deleted_in_pass += done.deleted;
                tombstones_in_pass += done.tombstones;
                if done.scanned >= u64::from(r.batch) {
                    r.step_pause
                } else {
                    if deleted_in_pass > 0 {
                        info!(
                            events = deleted_in_pass,
                            tombstones = tombstones_in_pass,
                            "log compacted: deleted superseded events every peer acknowledged, and tombstones past tombstone_min_age_secs"
                        );
                    }
                    (deleted_in_pass, tombstones_in_pass) = (0, 0);
                    r.interval
                }
            }
            Err(e) => {
                failures += 1;
                metrics::counter!("tidemark_store_errors_total", "op" => "compact").increment(1);
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(error = %e, failures, "cannot compact the log; retrying");
                }
                r.interval
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Stops the node if it loses the database's writer lock and cannot take it
/// again (another daemon may be writing beside it); reports capture triggers
/// that are missing or disabled (writes around them would never replicate).
async fn store_watch(
    store: Store,
    fault: Arc<std::sync::OnceLock<String>>,
    cancel: CancellationToken,
) {
    let mut reported: Vec<String> = Vec::new();
    let mut triggers_reported: Vec<(String, String)> = Vec::new();
    for round in 0u32.. {
        if round % CAPTURE_CHECK_EVERY == 0 {
            match store.application_triggers().await {
                Ok(found) => {
                    for (table, trigger) in found.iter().filter(|t| !triggers_reported.contains(t))
                    {
                        warn!(
                            %table,
                            %trigger,
                            "an application trigger fires on replicated writes too: what it sets, each node sets for itself \
                             (and the change is not replicated); on SQLite make it skip them with \
                             WHEN (SELECT active FROM tidemark_capture_guard WHERE id = 1) = 0, on PostgreSQL with \
                             IF current_setting('tidemark.applying', true) = 'on' THEN RETURN NEW; END IF"
                        );
                    }
                    metrics::gauge!("tidemark_application_triggers").set(found.len() as f64);
                    triggers_reported = found;
                }
                Err(e) => warn!(error = %e, "cannot list application triggers"),
            }
            match store.log_extent().await {
                Ok((events, oldest)) => {
                    metrics::gauge!("tidemark_log_events").set(events as f64);
                    let age = oldest.map_or(0, |w| (tidemark_hlc::system_wall_ms() - w).max(0));
                    metrics::gauge!("tidemark_log_oldest_event_age_seconds")
                        .set(age as f64 / 1000.0);
                }
                Err(e) => warn!(error = %e, "cannot measure the log"),
            }
            match store.check_capture().await {
                Ok(problems) => {
                    if problems != reported {
                        for p in &problems {
                            error!(problem = %p, "capture is incomplete");
                        }
                        if problems.is_empty() {
                            info!("capture triggers are complete again");
                        }
                        reported = problems;
                    }
                    metrics::gauge!("tidemark_capture_problems").set(reported.len() as f64);
                }
                Err(e) => warn!(error = %e, "cannot check the capture triggers"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(LOCK_CHECK) => {}
        }
        if let Err(e) = store.check_lock().await {
            error!(error = %e, "stopping");
            let _ = fault.set(e.to_string());
            cancel.cancel();
            return;
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    /// Accepted peer and API connections send small messages at once.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = accepting(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
