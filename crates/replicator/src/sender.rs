//! The sending side: one long-lived session per configured peer.
//!
//! A session connects, says Hello, learns the peer's applied vector from its
//! Welcome, then streams every event the peer lacks (oldest first, in batches of
//! at most `batch_size` events and about `max_batch_bytes`), keeping at most
//! `max_unacked_batches` batches unacknowledged. It wakes on every local commit, so
//! new events (local or relayed) go out at once. Each Ack records the peer's
//! progress and marks `synced_at` on events every peer now has; the vector it
//! carries (everything the peer holds, from any path) moves the session past
//! what the peer got elsewhere, and the peer's own events go back to it only to
//! catch up a copy restored from an older backup (no echo). Origins the peer
//! lists as connected to it directly are left to their own sessions (see
//! `Direct`). Any failure ends the
//! session; it reconnects with exponential backoff and jitter, restarting from the
//! peer's vector, so nothing is lost and nothing is applied twice.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_hlc::Hlc;
use tidemark_store::model::parse_ulid;
use tidemark_store::{Store, StoreError, VersionVector};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{Instrument, debug, error, info, info_span, warn};
use ulid::Ulid;

use crate::convert::{logged_to_pb, positions_from_pb, tables_to_pb};
use crate::pb::{self, receiver_message, sender_message};
use crate::receiver::peer_vector;
use crate::{LocalNode, PROTOCOL_VERSION, Peer, ReplicationOptions};

/// Pause between two synced_at passes, to coalesce bursts.
const SYNC_MARK_DEBOUNCE: Duration = Duration::from_millis(10);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid peer address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("peer refused: {} ({:?})", .0.message(), .0.code())]
    Refused(tonic::Status),
    #[error("peer {expected} answered as node {actual}")]
    WrongPeer { expected: Ulid, actual: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no ack from the peer within {0:?}")]
    AckTimeout(Duration),
    #[error("peer closed the stream")]
    Closed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Observable state of one peer session (for status and metrics).
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    pub connected: bool,
    /// Last successful ack, ms since the epoch.
    pub last_ack_wall_ms: Option<i64>,
    pub last_error: Option<String>,
    /// Origins the peer holds (their events wait), with why.
    pub held: Vec<HeldOrigin>,
    /// Records whose rows the peer cannot place (as of its last ack).
    pub blocked_records: u64,
    /// Away longer than the absent-peer limit: `synced_at` does not wait for
    /// it until it connects again.
    pub released: bool,
}

/// An origin whose events a peer does not take now (see `Hold` in the proto).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldOrigin {
    pub origin: Ulid,
    /// The peer's gRPC status code name for it.
    pub code: String,
    pub reason: String,
    /// When the events are resent, ms since the epoch.
    pub retry_at_ms: i64,
}

/// Longest wait before an origin a peer holds is resent.
const MAX_HOLD: Duration = Duration::from_secs(300);

/// How often a session that leaves origins to the peer asks again which are
/// live there, when it has nothing else in flight.
const DIRECT_PROBE: Duration = Duration::from_secs(1);

/// Origins other than this node and the peer with a live session of their own
/// to the peer (its last Welcome or Ack): this session does not relay them.
/// When one is no longer listed, relaying resumes from the peer's vector (the
/// cursor follows every ack's vector).
#[derive(Debug, Default)]
struct Direct {
    origins: Vec<Ulid>,
}

impl Direct {
    fn update(&mut self, listed: &[String], local: Ulid, peer: Ulid) {
        self.origins = listed
            .iter()
            .filter_map(|o| Ulid::from_string(o).ok())
            .filter(|o| *o != local && *o != peer)
            .collect();
    }
}

/// Held origins of one session: when each is resent, and how many times each was
/// held (the wait doubles each time, up to [`MAX_HOLD`]).
#[derive(Debug, Default)]
struct Holds {
    until: std::collections::HashMap<Ulid, Instant>,
    times: std::collections::HashMap<Ulid, u32>,
}

impl Holds {
    /// `cursor` with every held origin moved past its last event, for reading
    /// what to send.
    fn skipping(&self, cursor: &VersionVector) -> VersionVector {
        let mut v = cursor.clone();
        for origin in self.until.keys() {
            v.0.insert(*origin, tidemark_hlc::Hlc::MAX);
        }
        v
    }

    fn hold(&mut self, origin: Ulid, retry_after: Duration) {
        let times = self.times.entry(origin).or_insert(0);
        let wait = retry_after
            .max(Duration::from_millis(100))
            .saturating_mul(1 << (*times).min(8))
            .min(MAX_HOLD);
        *times += 1;
        self.until.insert(origin, Instant::now() + wait);
    }

    fn is_held(&self, origin: Ulid) -> bool {
        self.until.contains_key(&origin)
    }

    /// The earliest resend time.
    fn next(&self) -> Option<Instant> {
        self.until.values().min().copied()
    }

    /// Releases the holds whose time has come; returns whether any was.
    fn release_due(&mut self) -> bool {
        let now = Instant::now();
        let before = self.until.len();
        self.until.retain(|_, t| *t > now);
        self.until.len() != before
    }
}

/// A byte stream to a peer, as a [`Connector`] opens it.
pub trait PeerIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> PeerIo for T {}

type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn PeerIo>>> + Send>>;

/// Opens the byte stream under a peer's gRPC channel, in place of TCP: e.g. a
/// simulated network. HTTP/2 (and TLS, when configured) run on top of it as usual.
#[derive(Clone)]
pub struct Connector(Arc<dyn Fn(Uri) -> ConnectFuture + Send + Sync>);

impl Connector {
    pub fn new<F, Fut, Io>(connect: F) -> Self
    where
        F: Fn(Uri) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<Io>> + Send + 'static,
        Io: PeerIo,
    {
        Connector(Arc::new(move |uri| {
            let fut = connect(uri);
            Box::pin(async move { fut.await.map(|io| Box::new(io) as Box<dyn PeerIo>) })
        }))
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector(..)")
    }
}

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn PeerIo>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = (self.0)(uri);
        Box::pin(async move { fut.await.map(TokioIo::new) })
    }
}

/// Runs the sessions to every peer of this node.
#[derive(Debug, Clone)]
pub struct Sender {
    inner: Arc<SenderInner>,
}

#[derive(Debug)]
struct SenderInner {
    store: Store,
    local: LocalNode,
    opts: ReplicationOptions,
    /// Every configured peer: `synced_at` needs all of their acks.
    peers: crate::PeerSet,
    states: std::sync::Mutex<std::collections::HashMap<Ulid, PeerState>>,
    tls: Option<crate::PeerTls>,
    /// Opens peer connections instead of TCP (network simulation).
    connector: Option<Connector>,
    /// Seeds the reconnect jitter per peer (deterministic runs); entropy otherwise.
    jitter_seed: Option<u64>,
    /// Ends a peer's reconnect backoff when that peer reaches this node.
    wake: PeerWake,
    /// Whether this node holds what its peers held at their welcomes.
    catch_up: crate::CatchUp,
}

/// Wakes a peer's sender out of its reconnect backoff. The receiver calls
/// [`PeerWake::wake`] when that peer opens a session here: a peer that reaches
/// this node is up, so waiting out a backoff of up to `reconnect_max_ms` before
/// streaming to it only delays its catch-up. Cloned handles share one state.
#[derive(Debug, Clone, Default)]
pub struct PeerWake(Arc<std::sync::Mutex<std::collections::HashMap<Ulid, Arc<Notify>>>>);

impl PeerWake {
    /// `peer` is reachable: its sender, if backing off, reconnects now (or, if
    /// not waiting, skips its next wait once).
    pub fn wake(&self, peer: Ulid) {
        self.of(peer).notify_one();
    }

    fn of(&self, peer: Ulid) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(peer).or_default().clone()
    }
}

impl Sender {
    /// `tls`: connect to peers with mutual TLS using this material.
    pub fn new(
        store: Store,
        local: LocalNode,
        opts: ReplicationOptions,
        peers: crate::PeerSet,
        tls: Option<crate::PeerTls>,
    ) -> Self {
        let catch_up = crate::CatchUp::new(!peers.ids().is_empty());
        Sender {
            inner: Arc::new(SenderInner {
                store,
                local,
                opts,
                peers,
                states: Default::default(),
                tls,
                connector: None,
                jitter_seed: None,
                wake: PeerWake::default(),
                catch_up,
            }),
        }
    }

    /// The handle that ends a peer's reconnect backoff; give it to the
    /// receiver ([`crate::ReceiverService::waking`]).
    pub fn wake_handle(&self) -> PeerWake {
        self.inner.wake.clone()
    }

    /// Whether this node has caught up since it started; give it to the
    /// receiver ([`crate::ReceiverService::catching_up`]) and run
    /// [`crate::CatchUp::watch`].
    pub fn catch_up(&self) -> &crate::CatchUp {
        &self.inner.catch_up
    }

    /// Connects to peers through `connector` instead of TCP. Call before any
    /// session runs.
    pub fn with_connector(mut self, connector: Connector) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.connector = Some(connector);
        }
        self
    }

    /// Draws the reconnect jitter from a generator seeded with `seed` (and the
    /// peer's id) instead of entropy, so a simulated run replays. Call before any
    /// session runs.
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.jitter_seed = Some(seed);
        }
        self
    }

    /// Sets every peer session's gauges again (the metrics exporter drops a
    /// gauge nobody sets for a while: a removed peer's series go).
    pub fn publish_gauges(&self) {
        let map = self.inner.states.lock().unwrap_or_else(|p| p.into_inner());
        for (peer, state) in map.iter() {
            publish(*peer, state);
        }
    }

    /// Forgets a peer removed from the list (after its session was cancelled):
    /// its state, and so its gauges and its line in status, go.
    pub fn forget(&self, peer: Ulid) {
        let mut map = self.inner.states.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&peer);
    }

    /// The peers this sender serves now.
    pub fn peers(&self) -> &crate::PeerSet {
        &self.inner.peers
    }

    /// A snapshot of every peer session's state.
    pub fn states(&self) -> Vec<(Ulid, PeerState)> {
        let map = self.inner.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, s)| (*k, s.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Sets `synced_at` on events every peer has acknowledged, whenever an ack is
    /// recorded or new events are committed (a relayed event can arrive after
    /// every peer already acknowledged having it). Runs until `cancel`.
    pub async fn run_sync_marker(self, cancel: CancellationToken) {
        let mut commits = self.inner.store.subscribe_commits();
        let mut acks = self.inner.store.subscribe_acks();
        let mut peers = self.inner.peers.subscribe();
        let mut failures = 0u32;
        let mut absent = AbsentPeers::default();
        let limit = (self.inner.opts.absent_peer_limit_ms > 0)
            .then(|| Duration::from_millis(self.inner.opts.absent_peer_limit_ms));
        // An idle node looks at absent peers now and then all the same.
        let recheck = limit.map_or(Duration::MAX, |l| l.min(RELEASE_RECHECK));
        loop {
            let waited = self.waited_for(limit, &mut absent).await;
            let marked = if self.inner.peers.current().is_empty() {
                // No peer to wait for: nothing is ever acknowledged.
                Ok(0)
            } else if waited.is_empty() {
                self.inner.store.mark_all_synced().await
            } else {
                self.inner.store.mark_synced(&waited).await
            };
            match marked {
                Ok(n) => {
                    failures = 0;
                    if n > 0 {
                        debug!(events = n, "marked synced");
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        warn!(error = %e, failures, "cannot mark events synced; retrying");
                    }
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                changed = acks.changed() => if changed.is_err() { return },
                changed = commits.changed() => if changed.is_err() { return },
                changed = peers.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(recheck), if limit.is_some() => {}
            }
            // Coalesce bursts of acks and commits into one pass.
            let pause =
                SYNC_MARK_DEBOUNCE + crate::testhooks::pause_before_sync_mark().unwrap_or_default();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Runs the session to `peer` until `cancel`, reconnecting after failures.
    pub async fn run_peer(self, peer: Peer, cancel: CancellationToken) {
        let span = info_span!("send", peer = %peer.node_id, address = %peer.address);
        async move {
            let mut backoff = Backoff::new(
                Duration::from_millis(self.inner.opts.reconnect_initial_ms),
                Duration::from_millis(self.inner.opts.reconnect_max_ms),
            );
            if let Some(seed) = self.inner.jitter_seed {
                let id = peer.node_id.0;
                backoff = backoff.with_seed(seed ^ (id as u64) ^ ((id >> 64) as u64));
            }
            let mut failures = 0u32;
            let woken = self.inner.wake.of(peer.node_id);
            loop {
                let result = self.inner.session(&peer, &cancel, &mut backoff).await;
                let mut was_connected = false;
                self.inner.update(peer.node_id, |s| {
                    was_connected = s.connected;
                    s.connected = false;
                    // A new session starts with no holds (the peer's are per session).
                    s.held.clear();
                });
                if cancel.is_cancelled() {
                    break;
                }
                if let Err(e) = result {
                    // A session that got through its handshake ended an outage
                    // count: this failure is the first of a new one.
                    if was_connected {
                        failures = 0;
                    }
                    failures += 1;
                    // First failure and then every 10th at WARN: a peer that stays
                    // down must not flood the log.
                    if failures == 1 || failures.is_multiple_of(10) {
                        warn!(error = %e, failures, "replication session failed; reconnecting with backoff");
                    } else {
                        debug!(error = %e, failures, "replication session failed");
                    }
                    self.inner.update(peer.node_id, |s| s.last_error = Some(e.to_string()));
                } else {
                    failures = 0;
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = woken.notified() => {
                        debug!("peer opened a session here: reconnecting now");
                        backoff.reset();
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            debug!("peer session stopped");
        }
        .instrument(span)
        .await
    }
}

impl Sender {
    /// The peers `synced_at` waits for now: every configured peer but those
    /// released. A peer is released once this process has seen it
    /// disconnected for `limit` without a break while it lacks events (a
    /// restart or a blip never counts as time away); it is waited for again as
    /// soon as it connects. `away` holds when each absent peer was first seen
    /// disconnected.
    async fn waited_for(&self, limit: Option<Duration>, watch: &mut AbsentPeers) -> Vec<Ulid> {
        let all = self.inner.peers.ids();
        let Some(limit) = limit else {
            return all;
        };
        let connected: std::collections::HashSet<Ulid> = self
            .states()
            .into_iter()
            .filter(|(_, s)| s.connected)
            .map(|(p, _)| p)
            .collect();
        let now = Instant::now();
        // Peers removed from the list are no longer watched.
        watch.away.retain(|p, _| all.contains(p));
        watch.released.retain(|p| all.contains(p));
        watch.checked.retain(|p, _| all.contains(p));
        for peer in &all {
            if connected.contains(peer) {
                watch.away.remove(peer);
                if watch.released.remove(peer) {
                    info!(%peer, "released peer connected again: synced_at waits for it again");
                    self.inner.update(*peer, |s| s.released = false);
                }
                continue;
            }
            let since = *watch.away.entry(*peer).or_insert(now);
            if watch.released.contains(peer) || now.duration_since(since) < limit {
                continue;
            }
            // Away long enough: released if it lacks anything (one cheap count
            // per peer, at most once a recheck interval).
            if watch
                .checked
                .get(peer)
                .is_some_and(|at| now.duration_since(*at) < limit.min(RELEASE_RECHECK))
            {
                continue;
            }
            watch.checked.insert(*peer, now);
            match self.inner.store.peer_lag(*peer).await {
                Ok((unacked, Some(_))) if unacked > 0 => {
                    warn!(
                        %peer,
                        unacked,
                        away_limit_secs = limit.as_secs(),
                        "peer disconnected longer than retention.max_peer_absence_secs: released, synced_at and log compaction no longer wait for it; when it returns it converges from each record's current version (superseded versions it lacks may be gone from the log)"
                    );
                    watch.released.insert(*peer);
                    self.inner.update(*peer, |s| s.released = true);
                }
                Ok(_) => {}
                Err(e) => debug!(%peer, error = %e, "cannot read a peer's backlog"),
            }
        }
        all.into_iter()
            .filter(|p| !watch.released.contains(p))
            .collect()
    }
}

/// Sets a peer session's gauges from its state.
fn publish(peer: Ulid, state: &PeerState) {
    let label = peer.to_string();
    metrics::gauge!("tidemark_peer_connected", "peer" => label.clone()).set(if state.connected {
        1.0
    } else {
        0.0
    });
    metrics::gauge!("tidemark_peer_held_origins", "peer" => label.clone())
        .set(state.held.len() as f64);
    metrics::gauge!("tidemark_peer_released", "peer" => label.clone()).set(if state.released {
        1.0
    } else {
        0.0
    });
    metrics::gauge!("tidemark_peer_blocked_records", "peer" => label.clone())
        .set(state.blocked_records as f64);
    if let Some(ms) = state.last_ack_wall_ms {
        metrics::gauge!("tidemark_peer_last_ack_timestamp_seconds", "peer" => label)
            .set(ms as f64 / 1000.0);
    }
}

/// What the `synced_at` marker knows of absent peers (see
/// [`Sender::waited_for`]).
#[derive(Debug, Default)]
struct AbsentPeers {
    /// When each disconnected peer was first seen disconnected.
    away: std::collections::HashMap<Ulid, Instant>,
    /// When each was last looked up in the log.
    checked: std::collections::HashMap<Ulid, Instant>,
    released: std::collections::HashSet<Ulid>,
}

/// How often a peer away past the limit is looked up again.
const RELEASE_RECHECK: Duration = Duration::from_secs(5);

impl SenderInner {
    fn update(&self, peer: Ulid, f: impl FnOnce(&mut PeerState)) {
        let mut map = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let state = map.entry(peer).or_default();
        f(state);
        publish(peer, state);
    }

    async fn connect(&self, peer: &Peer) -> Result<Channel, SessionError> {
        let mut endpoint =
            Endpoint::from_shared(peer.address.clone()).map_err(|e| SessionError::Address {
                address: peer.address.clone(),
                reason: e.to_string(),
            })?;
        if let Some(tls) = &self.tls {
            let host = endpoint.uri().host().unwrap_or_default().to_owned();
            endpoint =
                endpoint
                    .tls_config(tls.client(&host))
                    .map_err(|e| SessionError::Address {
                        address: peer.address.clone(),
                        reason: format!("TLS: {e}"),
                    })?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_millis(self.opts.connect_timeout_ms))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.opts.keepalive_interval())
            .keep_alive_timeout(self.opts.keepalive_timeout())
            .keep_alive_while_idle(true);
        match &self.connector {
            Some(connector) => endpoint.connect_with_connector(connector.clone()).await,
            None => endpoint.connect().await,
        }
        .map_err(|source| SessionError::Connect {
            address: peer.address.clone(),
            source,
        })
    }

    /// Tells the store how far `peer` holds this node's own origin; a peer
    /// holding own events the log lacks means the database was restored from
    /// an older copy, or another daemon wrote with this node id.
    async fn check_own_origin(&self, peer: Ulid, held_there: Hlc) -> Result<(), SessionError> {
        if self.store.peer_holds_own(peer, held_there).await? {
            crate::own_events_missing(
                peer,
                held_there,
                self.store.vector().await?.get(self.local.node_id),
            );
        }
        Ok(())
    }

    /// Records an ack (the peer's vector) and wakes the synced_at marker.
    async fn acked(&self, peer: Ulid, vector: &VersionVector) -> Result<(), SessionError> {
        self.store.record_ack(peer, vector).await?;
        self.update(peer, |s| {
            s.last_ack_wall_ms = Some(tidemark_hlc::system_wall_ms())
        });
        Ok(())
    }

    async fn session(
        &self,
        peer: &Peer,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let channel = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            c = self.connect(peer) => c?,
        };
        let mut client = pb::replication_client::ReplicationClient::new(channel)
            .max_decoding_message_size(self.opts.max_message_bytes)
            .max_encoding_message_size(self.opts.max_message_bytes);
        let window = self.opts.max_unacked_batches.max(1);
        let (tx, rx) = mpsc::channel::<pb::SenderMessage>(window + 1);
        // What this node holds of the peer's own origin now: the peer gets what
        // it lacks of it (a copy restored from an older backup catches up
        // here), never the events it writes from now on (it has them).
        let peer_own = self.store.vector().await?.get(peer.node_id);
        let compacted = self.store.compacted_vector().await?;
        let hello = pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: self.local.cluster_id.clone(),
            sender_node_id: self.local.node_id.to_string(),
            receiver_node_id: peer.node_id.to_string(),
            tables: tables_to_pb(&self.store.tables(), self.store.kind()),
            hlc: self.store.clock().now().encode(),
            instance_id: crate::instance_id().to_string(),
            receiver_origin_hlc: peer_own.encode(),
            compacted: Some(crate::convert::vector_to_pb(&compacted)),
        };
        tx.send(pb::SenderMessage {
            kind: Some(sender_message::Kind::Hello(hello)),
        })
        .await
        .map_err(|_| SessionError::Closed)?;
        let mut inbound = client
            .replicate(ReceiverStream::new(rx))
            .await
            .map_err(SessionError::Refused)?
            .into_inner();
        let welcome = match inbound.message().await.map_err(SessionError::Refused)? {
            Some(pb::ReceiverMessage {
                kind: Some(receiver_message::Kind::Welcome(w)),
            }) => w,
            Some(_) => return Err(SessionError::Protocol("expected a welcome".into())),
            None => return Err(SessionError::Closed),
        };
        if welcome.receiver_node_id != peer.node_id.to_string() {
            return Err(SessionError::WrongPeer {
                expected: peer.node_id,
                actual: welcome.receiver_node_id,
            });
        }
        let mut cursor = peer_vector("welcome.vector", welcome.vector)
            .map_err(|s| SessionError::Protocol(s.message().to_owned()))?;
        let mut direct = Direct::default();
        direct.update(&welcome.direct_origins, self.local.node_id, peer.node_id);
        self.check_own_origin(peer.node_id, cursor.get(self.local.node_id))
            .await?;
        self.acked(peer.node_id, &cursor).await?;
        let theirs = positions_from_pb("welcome.positions", welcome.positions)
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        self.catch_up.welcomed(peer.node_id, &theirs);
        backoff.reset();
        self.update(peer.node_id, |s| {
            s.connected = true;
            s.last_error = None;
        });
        info!("replication session established");

        let mut commits = self.store.subscribe_commits();
        // (batch id, events, sent at)
        let mut inflight: VecDeque<(u64, u64, Instant)> = VecDeque::new();
        let mut next_batch = 0u64;
        let ack_timeout = Duration::from_millis(self.opts.ack_timeout_ms);
        let mut holds = Holds::default();
        // Room in one message for an event's ids and stamps besides its values.
        let max_event = self.opts.max_message_bytes.saturating_sub(64 << 10);
        // The last read of the log found less than a full batch: the session
        // is tailing new commits, not catching the peer up.
        let mut at_tail = false;
        loop {
            if holds.release_due() {
                self.show_holds(peer.node_id, &holds);
            }
            // Fill the window with what the peer lacks. At the tail, one batch
            // is in flight at a time and the next grows until its ack: commits
            // that land meanwhile go out together, one message and one
            // transaction at the peer instead of one each (the peer would only
            // queue them behind the batch it is applying).
            let room = |inflight: &VecDeque<_>, at_tail: bool| match at_tail {
                true => inflight.is_empty(),
                false => inflight.len() < window,
            };
            while room(&inflight, at_tail) {
                let mut wanted = holds.skipping(&cursor);
                // Origins with a live session of their own to the peer: their
                // events reach it straight from them.
                for origin in &direct.origins {
                    wanted.0.insert(*origin, tidemark_hlc::Hlc::MAX);
                }
                if cursor.get(peer.node_id) >= peer_own {
                    // No echo: the peer's own events go back to it only to
                    // catch it up.
                    wanted.0.insert(peer.node_id, tidemark_hlc::Hlc::MAX);
                }
                // As the log stores them: values go out as the text read.
                let events = self.store.log_after(&wanted, self.opts.batch_size).await?;
                if events.is_empty() {
                    at_tail = true;
                    break;
                }
                // Fewer than asked for: the log held no more when read. A commit
                // after that read bumps `commits`, so nothing is missed by not
                // asking again now (one query round per wake-up instead of two).
                let drained = events.len() < self.opts.batch_size as usize;
                at_tail = drained;
                let mut batch = pb::Batch {
                    batch_id: next_batch + 1,
                    events: Vec::with_capacity(events.len()),
                };
                let mut bytes = 0usize;
                let mut cut = false;
                for e in events {
                    if holds.is_held(e.node_id) {
                        continue;
                    }
                    let (origin, event_id, hlc) = (e.node_id, e.event_id, e.hlc);
                    let pe = logged_to_pb(e);
                    let len = pe.encoded_len();
                    if len > max_event {
                        // No message can carry it to this peer (its limit is
                        // lower than the origin's): hold the origin here, send
                        // the rest, and say so.
                        error!(
                            origin = %origin,
                            event_id = %event_id,
                            bytes = len,
                            limit = max_event,
                            "event larger than replication.max_message_bytes allows: its origin is held for this peer; raise the limit on every node"
                        );
                        holds.hold(origin, MAX_HOLD);
                        self.update(peer.node_id, |s| {
                            s.held.retain(|h| h.origin != origin);
                            s.held.push(HeldOrigin {
                                origin,
                                code: "RESOURCE_EXHAUSTED".into(),
                                reason: format!(
                                    "event {} is {len} bytes, over the {max_event} bytes a message may carry",
                                    event_id
                                ),
                                retry_at_ms: tidemark_hlc::system_wall_ms()
                                    + MAX_HOLD.as_millis() as i64,
                            });
                        });
                        continue;
                    }
                    if !batch.events.is_empty() && bytes + len > self.opts.max_batch_bytes {
                        cut = true;
                        break;
                    }
                    bytes += len;
                    cursor.observe(origin, hlc);
                    batch.events.push(pe);
                }
                if batch.events.is_empty() {
                    continue;
                }
                next_batch += 1;
                let n = batch.events.len() as u64;
                metrics::counter!("tidemark_events_sent_total", "peer" => peer.node_id.to_string())
                    .increment(n);
                tx.send(pb::SenderMessage {
                    kind: Some(sender_message::Kind::Batch(batch)),
                })
                .await
                .map_err(|_| SessionError::Closed)?;
                inflight.push_back((next_batch, n, Instant::now()));
                at_tail = drained && !cut;
                if at_tail {
                    break;
                }
            }
            let deadline = inflight
                .front()
                .map(|b| b.2 + ack_timeout)
                .unwrap_or_else(|| Instant::now() + ack_timeout);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    // Close our side; acks still in flight are not waited for: the
                    // peer's vector on the next session says what it has.
                    drop(tx);
                    return Ok(());
                }
                msg = inbound.message() => {
                    self.on_reply(peer, msg, &mut inflight, &mut cursor, &mut holds, &mut direct).await?;
                }
                changed = commits.changed() => {
                    if changed.is_err() {
                        return Err(SessionError::Closed);
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !inflight.is_empty() => {
                    return Err(SessionError::AckTimeout(ack_timeout));
                }
                _ = tokio::time::sleep_until(holds.next().unwrap_or(deadline)), if holds.next().is_some() => {}
                _ = tokio::time::sleep(DIRECT_PROBE), if inflight.is_empty() && !direct.origins.is_empty() => {
                    // Nothing in flight while origins are left to the peer: an
                    // empty batch asks again which are still live there.
                    next_batch += 1;
                    tx.send(pb::SenderMessage {
                        kind: Some(sender_message::Kind::Batch(pb::Batch {
                            batch_id: next_batch,
                            events: Vec::new(),
                        })),
                    })
                    .await
                    .map_err(|_| SessionError::Closed)?;
                    inflight.push_back((next_batch, 0, Instant::now()));
                }
            }
        }
    }

    /// Publishes a session's holds in the peer's state and metrics.
    fn show_holds(&self, peer: Ulid, holds: &Holds) {
        self.update(peer, |s| {
            s.held.retain(|h| holds.is_held(h.origin));
        });
    }

    async fn on_reply(
        &self,
        peer: &Peer,
        msg: Result<Option<pb::ReceiverMessage>, tonic::Status>,
        inflight: &mut VecDeque<(u64, u64, Instant)>,
        cursor: &mut VersionVector,
        holds: &mut Holds,
        direct: &mut Direct,
    ) -> Result<(), SessionError> {
        let ack = match msg.map_err(SessionError::Refused)? {
            Some(pb::ReceiverMessage {
                kind: Some(receiver_message::Kind::Ack(a)),
            }) => a,
            Some(_) => return Err(SessionError::Protocol("expected an ack".into())),
            None => return Err(SessionError::Closed),
        };
        match inflight.pop_front() {
            Some((id, _, _)) if id == ack.batch_id => {}
            other => {
                return Err(SessionError::Protocol(format!(
                    "ack for batch {} but batch {:?} was next",
                    ack.batch_id,
                    other.map(|o| o.0)
                )));
            }
        }
        let vector = peer_vector("ack.vector", ack.vector)
            .map_err(|s| SessionError::Protocol(s.message().to_owned()))?;
        direct.update(&ack.direct_origins, self.local.node_id, peer.node_id);
        // What the peer holds by now (no holes: all of each origin up to its
        // entry), from this node or any other path: not sent again.
        for (origin, hlc) in &vector.0 {
            if !ack.held.iter().any(|h| h.origin == origin.to_string()) {
                cursor.observe(*origin, *hlc);
            }
        }
        for hold in &ack.held {
            let origin = parse_ulid("ack.held.origin", &hold.origin)
                .map_err(|e| SessionError::Protocol(e.to_string()))?;
            // The peer took nothing of this origin from the held event on:
            // resend from what it has, after the delay.
            match vector.0.get(&origin) {
                Some(h) => cursor.0.insert(origin, *h),
                None => cursor.0.remove(&origin),
            };
            holds.hold(origin, Duration::from_millis(hold.retry_after_ms));
            let retry_at_ms = tidemark_hlc::system_wall_ms() + hold.retry_after_ms as i64;
            warn!(
                %origin,
                event_id = %hold.event_id,
                code = %hold.code,
                reason = %hold.message,
                "peer holds an origin: its events wait, the others go on"
            );
            self.update(peer.node_id, |s| {
                s.held.retain(|h| h.origin != origin);
                s.held.push(HeldOrigin {
                    origin,
                    code: hold.code.clone(),
                    reason: hold.message.clone(),
                    retry_at_ms,
                });
            });
        }
        self.update(peer.node_id, |s| s.blocked_records = ack.blocked_records);
        self.acked(peer.node_id, &vector).await?;
        debug!(
            batch_id = ack.batch_id,
            applied = ack.applied,
            superseded = ack.superseded,
            duplicates = ack.duplicates,
            "ack"
        );
        Ok(())
    }
}

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], where d
/// doubles from `initial` up to `max` and returns to `initial` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    /// Seeded jitter (deterministic runs); the thread's entropy-seeded generator
    /// when `None`.
    rng: Option<StdRng>,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
            rng: None,
        }
    }

    /// Draws the jitter from a generator seeded with `seed`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = Some(StdRng::seed_from_u64(seed));
        self
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        let jitter = match &mut self.rng {
            Some(rng) => rng.random_range(Duration::ZERO..=half),
            None => rand::rng().random_range(Duration::ZERO..=half),
        };
        half + jitter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut ceiling = 100u64;
        for _ in 0..10 {
            let d = b.next_delay().as_millis() as u64;
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d} not in [{}, {ceiling}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(1000);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn seeded_backoff_replays() {
        let delays = |seed| {
            let mut b =
                Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).with_seed(seed);
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(delays(7), delays(7));
        assert_ne!(delays(7), delays(8));
    }
}
