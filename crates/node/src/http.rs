//! The HTTP listener for operators: `/metrics` (Prometheus text format),
//! `/healthz` (the process is up) and `/readyz` (the store answers and the
//! node has caught up with its peers since it started), plus the task that
//! refreshes the lag gauges.
//!
//! Every counter is exported at 0 from start-up, with the label sets it will
//! use where they are known up front (each configured peer, each store
//! operation, each refusal code), so an alert on it has a series before the
//! first increment ([`export_at_zero`], [`export_peer_at_zero`]).
//!
//! Lag gauges come from the store, not from counters kept in memory: per peer, the
//! events this node holds that the peer has not acknowledged, and the age of the
//! oldest of them (origin wall time to now, never negative). An idle, synced
//! cluster therefore shows zero lag however long it stays idle.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tidemark_replicator::{CatchUp, CatchUpStatus, Peer, Phase, Sender};

use crate::peers::PeerNames;
use tidemark_store::{RejectKind, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

const REFRESH: Duration = Duration::from_secs(1);
/// Longest pause between two readings of a costly gauge (below
/// [`GAUGE_IDLE`], and set from its last reading in between anyway).
const COSTLY_PAUSE_MAX: Duration = Duration::from_secs(20);

/// How long a gauge nobody sets stays exported (see [`install_recorder`]).
pub const GAUGE_IDLE: Duration = Duration::from_secs(45);

/// Installs the process-wide metrics recorder and describes every metric.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("tidemark_apply_delay_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0, 3600.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("tidemark_batch_events".into()),
            &[
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 10000.0,
            ],
        )?
        // A gauge nobody sets for this long is dropped: every gauge is set at
        // least every 30 s while it means something (most every second, by
        // `refresh`), so this only removes the series of peers no longer
        // configured.
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "tidemark_build_info",
        "Always 1; the daemon's version as a label."
    );
    describe_gauge!(
        "tidemark_peer_unacked_events",
        Unit::Count,
        "Events this node holds that the peer has not acknowledged."
    );
    describe_gauge!(
        "tidemark_peer_oldest_unacked_age_seconds",
        Unit::Seconds,
        "Age of the oldest event the peer has not acknowledged (0 when none)."
    );
    describe_gauge!(
        "tidemark_peer_connected",
        "1 while a replication session to the peer is established, else 0."
    );
    describe_gauge!(
        "tidemark_peer_last_ack_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the peer's last acknowledgement."
    );
    describe_histogram!(
        "tidemark_apply_delay_seconds",
        Unit::Seconds,
        "Apply wall time minus the event's HLC wall time, per sending peer."
    );
    describe_histogram!(
        "tidemark_batch_events",
        Unit::Count,
        "Events per received batch."
    );
    describe_counter!(
        "tidemark_events_captured_total",
        Unit::Count,
        "Local writes stamped into change_events, by source (sql: captured direct writes, api: write API)."
    );
    describe_gauge!(
        "tidemark_peer_info",
        Unit::Count,
        "1 per configured peer, with its configured name ([[peers]] name) as a label, to join on the peer label."
    );
    describe_gauge!(
        "tidemark_peer_released",
        Unit::Count,
        "1 while the peer is released: disconnected longer than retention.max_peer_absence_secs while it lacks events, so synced_at and compaction do not wait for it."
    );
    describe_counter!(
        "tidemark_writes_refused_total",
        Unit::Count,
        "Write-API requests refused before they reached the store, by reason (memory: server.max_write_bytes_in_flight was taken)."
    );
    describe_counter!(
        "tidemark_events_sent_total",
        Unit::Count,
        "Events sent to a peer."
    );
    describe_counter!(
        "tidemark_events_applied_total",
        Unit::Count,
        "Events from a peer that became their record's current version."
    );
    describe_counter!(
        "tidemark_events_skipped_total",
        Unit::Count,
        "Events from a peer kept but not applied (superseded) or already present (duplicate)."
    );
    describe_counter!(
        "tidemark_conflicts_detected_total",
        Unit::Count,
        "Concurrent versions detected."
    );
    describe_gauge!(
        "tidemark_conflicts_open",
        Unit::Count,
        "Open conflicts per table."
    );
    describe_counter!(
        "tidemark_drift_rejections_total",
        Unit::Count,
        "Events from a peer held because their HLC was beyond the drift bound (or far in the future)."
    );
    describe_counter!(
        "tidemark_store_errors_total",
        Unit::Count,
        "Store operations that failed, by operation."
    );
    describe_gauge!(
        "tidemark_hlc_wall_seconds",
        Unit::Seconds,
        "Wall-clock part of the node's current HLC."
    );
    describe_gauge!(
        "tidemark_node_state",
        Unit::Count,
        "1 for where the node stands since it started (waiting_for_peer, catching_up, active), 0 for the others; /readyz answers 200 only when active."
    );
    describe_gauge!(
        "tidemark_catchup_remaining_events",
        Unit::Count,
        "While catching up, events the node lacks of what its peers held when it met them (by their numbers); 0 when active."
    );
    describe_gauge!(
        "tidemark_origin_position",
        Unit::Count,
        "Per origin, the number of the origin's last event this node holds (every origin numbers its events 1, 2, 3... with no gap)."
    );
    describe_gauge!(
        "tidemark_unsynced_events",
        Unit::Count,
        "Events not yet acknowledged by every configured peer."
    );
    describe_gauge!(
        "tidemark_pending_captures",
        Unit::Count,
        "Direct writes captured and not yet stamped."
    );
    describe_gauge!(
        "tidemark_quarantined_events",
        Unit::Count,
        "Events from peers set aside in the quarantine."
    );
    describe_counter!(
        "tidemark_events_quarantined_total",
        Unit::Count,
        "Events from a peer quarantined, by gRPC code."
    );
    describe_gauge!(
        "tidemark_peer_held_origins",
        Unit::Count,
        "Origins a peer holds: their events wait (beyond its max drift, malformed, not allowed), the others go on."
    );
    describe_gauge!(
        "tidemark_peer_blocked_records",
        Unit::Count,
        "Records whose rows a peer cannot place (a UNIQUE clash with a greater write, a missing parent, a refusal by its table), as of its last ack."
    );
    describe_counter!(
        "tidemark_events_held_total",
        Unit::Count,
        "Holds of an origin at one of its events from a peer, by gRPC code."
    );
    describe_gauge!(
        "tidemark_application_triggers",
        Unit::Count,
        "Triggers on replicated tables that are not Tidemark's: they fire on replicated writes too, so what they set differs per node (each is logged), checked every 30 s."
    );
    describe_gauge!(
        "tidemark_capture_problems",
        Unit::Count,
        "Capture triggers of replicated tables that are missing or disabled (direct writes would go uncaptured), checked every 30 s."
    );
    describe_counter!(
        "tidemark_own_events_missing_total",
        Unit::Count,
        "Handshakes where a peer held events of this node's origin its log lacked (a database restored from an older copy)."
    );
    describe_counter!(
        "tidemark_duplicate_instances_refused_total",
        Unit::Count,
        "Handshakes refused because another live daemon claims the sender's node id."
    );
    describe_counter!(
        "tidemark_events_compacted_total",
        Unit::Count,
        "Superseded events every peer acknowledged that retention deleted from change_events."
    );
    describe_counter!(
        "tidemark_conflicts_compacted_total",
        Unit::Count,
        "Decided conflicts retention deleted with a compacted event of theirs."
    );
    describe_counter!(
        "tidemark_tombstones_compacted_total",
        Unit::Count,
        "Tombstones retention collected: deleted records of which nothing stayed."
    );
    describe_counter!(
        "tidemark_quarantine_compacted_total",
        Unit::Count,
        "Quarantined events retention deleted once older than retention.min_age_secs."
    );
    describe_gauge!(
        "tidemark_log_events",
        Unit::Count,
        "Events in change_events, checked every 30 s."
    );
    describe_gauge!(
        "tidemark_log_oldest_event_age_seconds",
        Unit::Seconds,
        "Age (by its HLC's wall time) of the oldest event in change_events, checked every 30 s."
    );
    describe_gauge!(
        "tidemark_blocked_records",
        Unit::Count,
        "Records on this node whose winning event is in the log but whose row cannot be placed here."
    );
    describe_gauge!(
        "tidemark_unreplicated_captures",
        Unit::Count,
        "Direct writes set aside because they cannot be replicated (a value outside its column's class, an event over store.max_event_bytes); the rows stay on this node."
    );
    describe_counter!(
        "tidemark_captures_set_aside_total",
        Unit::Count,
        "Direct writes set aside since start because they cannot be replicated."
    );
}

/// The `op` label values of `tidemark_store_errors_total`, one per place that
/// counts a failed store operation (the daemon's tests check this list against
/// the code).
pub const STORE_ERROR_OPS: [&str; 4] = ["apply", "compact", "drain", "metrics"];

/// Every refusal code an event from a peer can be held or quarantined with.
fn reject_codes() -> Vec<&'static str> {
    // Exhaustive: a new kind fails to compile here until it is listed below.
    let _listed = |k: RejectKind| match k {
        RejectKind::Invalid
        | RejectKind::UnknownTable
        | RejectKind::NotAllowed
        | RejectKind::FarFuture
        | RejectKind::Drift
        | RejectKind::Refused
        | RejectKind::Gap
        | RejectKind::SecondWriter => (),
    };
    let mut codes: Vec<&'static str> = [
        RejectKind::Invalid,
        RejectKind::UnknownTable,
        RejectKind::NotAllowed,
        RejectKind::FarFuture,
        RejectKind::Drift,
        RejectKind::Refused,
        RejectKind::Gap,
        RejectKind::SecondWriter,
    ]
    .into_iter()
    .map(RejectKind::code)
    .collect();
    codes.sort_unstable();
    codes.dedup();
    codes
}

/// Exports every node-wide counter at 0 with the label sets known at start
/// (Prometheus practice: an alert on a counter needs its series before the
/// first increment), and `tidemark_build_info` at 1; each peer's are exported
/// by [`export_peer_at_zero`]. Call once the recorder is installed, before the
/// node starts counting.
pub fn export_at_zero() {
    use metrics::{counter, gauge};
    gauge!("tidemark_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for source in ["api", "sql"] {
        counter!("tidemark_events_captured_total", "source" => source).increment(0);
    }
    for op in STORE_ERROR_OPS {
        counter!("tidemark_store_errors_total", "op" => op).increment(0);
    }
    counter!("tidemark_writes_refused_total", "reason" => "memory").increment(0);
    counter!("tidemark_conflicts_detected_total").increment(0);
    counter!("tidemark_captures_set_aside_total").increment(0);
    counter!("tidemark_events_compacted_total").increment(0);
    counter!("tidemark_conflicts_compacted_total").increment(0);
    counter!("tidemark_tombstones_compacted_total").increment(0);
    counter!("tidemark_quarantine_compacted_total").increment(0);
}

/// [`export_at_zero`] for one peer, when its session starts (at start-up, or
/// when it is added while running: see [`crate::peers::supervise`]), with
/// its configured name in `tidemark_peer_info`, to join on the `peer` label of
/// the per-peer series (`* on(instance, peer) group_left(name) tidemark_peer_info`).
pub fn export_peer_at_zero(peer: &Peer, name: &str) {
    use metrics::{counter, gauge};
    let label = peer.node_id.to_string();
    gauge!("tidemark_peer_info", "peer" => label.clone(), "name" => name.to_owned()).set(1.0);
    for metric in [
        "tidemark_events_sent_total",
        "tidemark_events_applied_total",
        "tidemark_drift_rejections_total",
        "tidemark_own_events_missing_total",
        "tidemark_duplicate_instances_refused_total",
    ] {
        counter!(metric, "peer" => label.clone()).increment(0);
    }
    for reason in ["superseded", "duplicate"] {
        counter!("tidemark_events_skipped_total", "peer" => label.clone(), "reason" => reason)
            .increment(0);
    }
    for code in reject_codes() {
        for metric in [
            "tidemark_events_held_total",
            "tidemark_events_quarantined_total",
        ] {
            counter!(metric, "peer" => label.clone(), "code" => code).increment(0);
        }
    }
}

/// `tidemark_node_state{state}` (1 for the node's phase, 0 for the others)
/// and `tidemark_catchup_remaining_events`.
fn publish_catch_up(status: &CatchUpStatus) {
    for phase in Phase::ALL {
        metrics::gauge!("tidemark_node_state", "state" => phase.as_str())
            .set(if phase == status.phase { 1.0 } else { 0.0 });
    }
    metrics::gauge!("tidemark_catchup_remaining_events").set(status.remaining_events as f64);
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    store: Store,
    catch_up: CatchUp,
    cancel: CancellationToken,
}

async fn metrics(State(s): State<AppState>) -> String {
    s.handle.render()
}

/// Ready: the store answers and the node has caught up since it started
/// (see `tidemark_replicator::catchup`); otherwise 503 saying which.
async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why);
    if s.cancel.is_cancelled() {
        return unavailable("shutting down\n".into());
    }
    if !matches!(
        tokio::time::timeout(Duration::from_secs(2), s.store.vector()).await,
        Ok(Ok(_))
    ) {
        return unavailable("store not answering\n".into());
    }
    let status = s.catch_up.status(&s.store.positions());
    match status.phase {
        Phase::Active => (StatusCode::OK, "ready\n".into()),
        Phase::WaitingForPeer => unavailable("waiting for a peer's session\n".into()),
        Phase::CatchingUp => unavailable(format!(
            "catching up: {} events behind on {} origins\n",
            status.remaining_events,
            status.origins_behind.len()
        )),
    }
}

/// Serves the HTTP endpoints on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    store: Store,
    catch_up: CatchUp,
    cancel: CancellationToken,
) {
    let state = AppState {
        handle,
        store,
        catch_up,
        cancel: cancel.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        warn!(error = %e, "metrics listener failed");
    }
}

/// Refreshes the gauges computed from the store, every second until `cancel`.
pub async fn refresh(
    store: Store,
    sender: Sender,
    names: PeerNames,
    handle: PrometheusHandle,
    cancel: CancellationToken,
) {
    let mut unsynced = Costly::default();
    loop {
        let peers = sender.peers().current();
        // Gauges set once or on change are set again, so only those of
        // removed peers go idle and are dropped.
        metrics::gauge!("tidemark_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        {
            let names = names.read().unwrap_or_else(|p| p.into_inner());
            for peer in peers.iter() {
                let name = names.get(&peer.node_id).cloned().unwrap_or_default();
                metrics::gauge!("tidemark_peer_info", "peer" => peer.node_id.to_string(), "name" => name)
                    .set(1.0);
            }
        }
        sender.publish_gauges();
        publish_catch_up(&sender.catch_up().status(&store.positions()));
        if let Err(e) = refresh_once(&store, &peers, &mut unsynced).await {
            metrics::counter!("tidemark_store_errors_total", "op" => "metrics").increment(1);
            debug!(error = %e, "refreshing metrics failed");
        }
        handle.run_upkeep();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// Sets the capture counters from the store's totals: a direct write counts
/// whichever transaction stamped it (the capture loop, an API write, an
/// applied batch, a resolution), once that transaction committed.
pub(crate) fn count_captures(store: &Store) {
    let (stamped, set_aside) = store.captured_totals();
    metrics::counter!("tidemark_events_captured_total", "source" => "sql").absolute(stamped);
    metrics::counter!("tidemark_captures_set_aside_total").absolute(set_aside);
}

/// A gauge whose reading costs time in proportion to what it counts (the
/// unsynced events: a scan of them, which grows for as long as a peer is away):
/// read again only after about a hundred times what the last reading took
/// (from 1 s to [`COSTLY_PAUSE_MAX`]), so reading it takes about 1% of a core
/// at most, and set from the last reading in between.
#[derive(Debug, Default)]
struct Costly {
    last: f64,
    next: Option<Instant>,
}

impl Costly {
    async fn refresh<F>(&mut self, read: F) -> tidemark_store::Result<f64>
    where
        F: std::future::Future<Output = tidemark_store::Result<u64>>,
    {
        let now = Instant::now();
        if self.next.is_none_or(|next| now >= next) {
            self.last = read.await? as f64;
            self.next = Some(now + costly_pause(now.elapsed()));
        }
        Ok(self.last)
    }
}

/// The pause after a costly reading that took `took`.
fn costly_pause(took: Duration) -> Duration {
    took.saturating_mul(100).clamp(REFRESH, COSTLY_PAUSE_MAX)
}

async fn refresh_once(
    store: &Store,
    peers: &[Peer],
    unsynced: &mut Costly,
) -> tidemark_store::Result<()> {
    count_captures(store);
    let now = tidemark_hlc::system_wall_ms();
    for peer in peers {
        let (count, oldest) = store.peer_lag(peer.node_id).await?;
        let label = peer.node_id.to_string();
        metrics::gauge!("tidemark_peer_unacked_events", "peer" => label.clone()).set(count as f64);
        let age = oldest.map_or(0, |w| (now - w).max(0));
        metrics::gauge!("tidemark_peer_oldest_unacked_age_seconds", "peer" => label)
            .set(age as f64 / 1000.0);
    }
    for (table, open) in store.open_conflicts_by_table().await? {
        metrics::gauge!("tidemark_conflicts_open", "table" => table).set(open as f64);
    }
    for (origin, position) in store.positions() {
        metrics::gauge!("tidemark_origin_position", "origin" => origin.to_string())
            .set(position.seq as f64);
    }
    metrics::gauge!("tidemark_hlc_wall_seconds").set(store.clock().now().wall_ms() as f64 / 1000.0);
    metrics::gauge!("tidemark_unsynced_events")
        .set(unsynced.refresh(store.count_unsynced()).await?);
    metrics::gauge!("tidemark_pending_captures").set(store.pending_captures().await? as f64);
    metrics::gauge!("tidemark_quarantined_events").set(store.count_quarantined().await? as f64);
    metrics::gauge!("tidemark_unreplicated_captures").set(store.count_set_aside().await? as f64);
    metrics::gauge!("tidemark_blocked_records").set(store.count_blocked().await? as f64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costly_gauges_pause_a_hundred_times_their_cost() {
        assert_eq!(costly_pause(Duration::from_micros(300)), REFRESH);
        assert_eq!(
            costly_pause(Duration::from_millis(50)),
            Duration::from_secs(5)
        );
        assert_eq!(costly_pause(Duration::from_secs(3)), COSTLY_PAUSE_MAX);
        assert!(COSTLY_PAUSE_MAX < GAUGE_IDLE);
    }

    #[tokio::test]
    async fn a_costly_gauge_is_read_again_only_after_its_pause() {
        let mut gauge = Costly::default();
        assert_eq!(gauge.refresh(async { Ok(7) }).await.expect("read"), 7.0);
        // Within the pause (at least a second): the last reading, unread.
        let unread = async { panic!("read again within the pause") };
        assert_eq!(gauge.refresh(unread).await.expect("cached"), 7.0);
        gauge.next = Some(Instant::now());
        assert_eq!(gauge.refresh(async { Ok(9) }).await.expect("read"), 9.0);
    }
}
