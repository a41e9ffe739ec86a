//! The receiving side of a replication session: the `Replication` gRPC service.
//!
//! Each stream is served by two tasks in a pipeline. The reader decodes the
//! sender's messages and checks their events against the registry (work that
//! needs no transaction); the applier applies what the reader hands it in
//! arrival order, the batches that arrived together (up to
//! [`COALESCE_EVENTS`] events) in one store transaction, and acknowledges each
//! batch only after it committed. While the applier writes one transaction the
//! reader prepares the next, on the runtime's other threads. On shutdown the
//! applier finishes the batches in hand (commit, then ack) and ends the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use std::collections::{BTreeMap, HashMap};

use tidemark_hlc::Hlc;
use tidemark_store::model::parse_ulid;
use tidemark_store::{ChangeEvent, CheckedEvent, Held, Position, RejectKind, Store, VersionVector};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};
use ulid::Ulid;

use crate::convert::{
    event_from_pb, positions_to_pb, schema_difference, tables_to_pb, vector_from_pb, vector_to_pb,
};
use crate::pb::{self, receiver_message, sender_message};
use crate::{LocalNode, PROTOCOL_VERSION, ReplicationOptions, status};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// When the sender should retry an origin held at an event it could not decode.
const HOLD_MALFORMED_MS: u64 = 5_000;
/// How long an origin held at a gap in its numbers waits before the sender
/// tries it again (the missing events may reach this node by another path).
const HOLD_GAP_MS: u64 = 10_000;
/// How long an origin held for a second writer waits before the sender tries
/// it again (an operator must stop one of the two daemons).
const HOLD_SECOND_WRITER_MS: u64 = 60_000;
/// Most events of batches already received that one transaction applies
/// together (a sender ahead of this node pipelines several).
const COALESCE_EVENTS: usize = 4_000;

/// One event of a received batch, as the reader hands it to the applier.
// Nearly every item is an `Event`: boxing it would add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Received {
    /// Decoded and checked (the check's verdict counts at the event's turn).
    Event(CheckedEvent),
    /// Could not be decoded. With its origin and HLC known (`identity`), the
    /// origin is held at it; otherwise it goes to the quarantine as `json`.
    Malformed {
        identity: Option<(Ulid, Hlc)>,
        event_id: String,
        reason: String,
        json: Option<serde_json::Value>,
    },
}

/// Batches that arrived together, for one transaction.
#[derive(Debug, Default)]
struct Gathered {
    batch_ids: Vec<u64>,
    events: Vec<Received>,
}

/// What the reader hands the applier.
#[derive(Debug)]
enum Step {
    Apply(Gathered),
    /// The stream ended: the sender closed it (`None`), or the error to send
    /// it.
    End(Option<Status>),
}

/// The `Replication` service.
#[derive(Debug, Clone)]
pub struct ReceiverService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    local: LocalNode,
    opts: ReplicationOptions,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The configured peers (and whether each may relay): a sender must claim
    /// one of them, at its handshake and at every batch (a peer removed from
    /// the list while connected loses its session).
    peers: crate::PeerSet,
    /// Mutual TLS: the sender must present a certificate naming the node id it
    /// claims.
    require_certificate: bool,
    /// Live sessions per sending node: which instance (daemon process) holds
    /// them, and how many (one per connection).
    sessions: std::sync::Mutex<HashMap<Ulid, LiveSessions>>,
    /// Ends this node's reconnect backoff towards a peer that opens a session here.
    wake: Option<crate::PeerWake>,
    /// Told of origins held here, which leave the catch-up target.
    catch_up: Option<crate::CatchUp>,
}

#[derive(Debug)]
struct LiveSessions {
    instance: String,
    count: usize,
    since_ms: i64,
}

/// A session counted in [`Inner::sessions`], uncounted when dropped.
#[derive(Debug)]
struct SessionGuard {
    inner: Arc<Inner>,
    sender: Ulid,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(live) = sessions.get_mut(&self.sender) {
            live.count -= 1;
            if live.count == 0 {
                sessions.remove(&self.sender);
            }
        }
    }
}

impl Inner {
    /// Nodes with live sessions to this receiver (their own events come
    /// straight from them).
    fn direct_origins(&self) -> Vec<String> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut direct: Vec<String> = sessions.keys().map(Ulid::to_string).collect();
        direct.sort();
        direct
    }
}

impl ReceiverService {
    /// Streams are served by tasks spawned on `tracker` and stop at `cancel`.
    ///
    /// A sender must claim one of `peers` (in plaintext too: a session from a
    /// node id not configured here is refused) and sends only its own events
    /// unless that peer may relay. With `require_certificate` (mutual TLS) it
    /// must also present a certificate whose common name is the id it claims.
    pub fn new(
        store: Store,
        local: LocalNode,
        opts: ReplicationOptions,
        cancel: CancellationToken,
        tracker: TaskTracker,
        peers: crate::PeerSet,
        require_certificate: bool,
    ) -> Self {
        ReceiverService {
            inner: Arc::new(Inner {
                store,
                local,
                opts,
                cancel,
                tracker,
                peers,
                require_certificate,
                sessions: Default::default(),
                wake: None,
                catch_up: None,
            }),
        }
    }

    /// Wakes this node's sender towards a peer (out of its reconnect backoff)
    /// whenever that peer's handshake here succeeds. Call before serving.
    pub fn waking(mut self, wake: crate::PeerWake) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.wake = Some(wake);
        }
        self
    }

    /// Tells `catch_up` of every origin held here for a reason that more time
    /// or another path does not mend (everything but a gap): it leaves the
    /// node's catch-up target. Call before serving.
    pub fn catching_up(mut self, catch_up: crate::CatchUp) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.catch_up = Some(catch_up);
        }
        self
    }

    /// Serves only this service on the connections `incoming` yields (TCP, or
    /// any byte streams, e.g. a simulated network) until `shutdown`, with the
    /// daemon's HTTP/2 keepalives. The daemon serves it next to its other services
    /// on its own router instead.
    pub async fn serve_incoming<I, IO, IE>(
        self,
        incoming: I,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error>
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let opts = &self.inner.opts;
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(opts.keepalive_interval()))
            .http2_keepalive_timeout(Some(opts.keepalive_timeout()))
            .add_service(self.into_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }

    /// The tonic server for this service, with message size limits set.
    pub fn into_server(self) -> pb::replication_server::ReplicationServer<Self> {
        let max = self.inner.opts.max_message_bytes;
        pb::replication_server::ReplicationServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }
}

impl Inner {
    /// Counts a session of `sender`'s `instance`, or refuses it while another
    /// instance of that node id holds live sessions (two daemons claiming one
    /// node id). An empty instance id is not checked.
    fn enter(
        self: &Arc<Self>,
        sender: Ulid,
        instance: &str,
    ) -> Result<Option<SessionGuard>, Status> {
        if instance.is_empty() {
            return Ok(None);
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let live = sessions.entry(sender).or_insert_with(|| LiveSessions {
            instance: instance.to_owned(),
            count: 0,
            since_ms: tidemark_hlc::system_wall_ms(),
        });
        if live.instance != instance {
            metrics::counter!("tidemark_duplicate_instances_refused_total", "peer" => sender.to_string())
                .increment(1);
            return Err(Status::failed_precondition(format!(
                "node {sender} is already connected from another running daemon (instance {}, connected {} ms ago): two daemons claim one node id; stop one (each node needs its own node id and database). If that daemon is gone, its session times out within 30 s",
                live.instance,
                tidemark_hlc::system_wall_ms() - live.since_ms,
            )));
        }
        live.count += 1;
        Ok(Some(SessionGuard {
            inner: self.clone(),
            sender,
        }))
    }

    /// Checks a Hello; the error names what does not match.
    fn check_hello(&self, hello: &pb::Hello) -> Result<Ulid, Status> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: node {} speaks version {PROTOCOL_VERSION}",
                hello.protocol_version, self.local.node_id
            )));
        }
        if hello.cluster_id != self.local.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster id mismatch: sender is in cluster {:?}, node {} is in cluster {:?}",
                hello.cluster_id, self.local.node_id, self.local.cluster_id
            )));
        }
        let sender = parse_ulid("hello.sender_node_id", &hello.sender_node_id).map_err(|_| {
            Status::invalid_argument(format!(
                "hello.sender_node_id: {:?} is not a ULID",
                hello.sender_node_id
            ))
        })?;
        if hello.receiver_node_id != self.local.node_id.to_string() {
            return Err(Status::failed_precondition(format!(
                "wrong node: sender expected node {}, this is node {}",
                hello.receiver_node_id, self.local.node_id
            )));
        }
        if sender == self.local.node_id {
            return Err(Status::failed_precondition(format!(
                "sender claims this node's own id {sender}"
            )));
        }
        let mine = tables_to_pb(&self.store.tables(), self.store.kind());
        if let Some(diff) = schema_difference(&mine, &hello.tables) {
            return Err(Status::failed_precondition(format!(
                "replicated schema differs from sender {sender}: {diff}"
            )));
        }
        Ok(sender)
    }

    /// Decodes one received event and checks it against the registry: the
    /// reader's share of the work, done while the applier writes.
    fn receive_event(&self, raw: pb::Event) -> Received {
        let identity = match (
            parse_ulid("node_id", &raw.node_id),
            tidemark_hlc::Hlc::decode(raw.hlc),
        ) {
            (Ok(origin), Ok(hlc)) => Some((origin, hlc)),
            _ => None,
        };
        let event_id = raw.event_id.clone();
        // Kept only for an event that cannot even be identified (it goes to the
        // quarantine as sent); a held one is sent again.
        let json = identity.is_none().then(|| crate::convert::event_json(&raw));
        match event_from_pb(raw) {
            Ok(e) => Received::Event(self.store.check_event(e)),
            Err(e) => Received::Malformed {
                identity,
                event_id,
                reason: e.to_string(),
                json,
            },
        }
    }

    /// Applies batches that arrived together and builds their Acks. `holds`
    /// are this session's held origins (origin -> the HLC it was held at): the
    /// sender may have pipelined more of a held origin's events before it
    /// learned of the hold; they are skipped until it resends from the held
    /// event, which lifts the hold.
    async fn apply_batches(
        &self,
        sender: Ulid,
        compacted: &VersionVector,
        gathered: Gathered,
        holds: &mut HashMap<Ulid, Hlc>,
    ) -> Result<Vec<pb::Ack>, Status> {
        let peer = sender.to_string();
        let Some(configured) = self.peers.get(sender) else {
            return Err(Status::permission_denied(format!(
                "node {sender} is no longer a configured peer of node {}",
                self.local.node_id
            )));
        };
        let may_relay = configured.may_relay;
        let Gathered {
            batch_ids: ids,
            events: items,
        } = gathered;
        let received = items.len();
        let mut events: Vec<CheckedEvent> = Vec::with_capacity(received);
        let mut rejected = Vec::new();
        let mut held: Vec<Held> = Vec::new();
        for item in items {
            let identity = match &item {
                Received::Event(c) => Some((c.event().node_id, c.event().hlc)),
                Received::Malformed { identity, .. } => *identity,
            };
            if let Some((origin, hlc)) = identity {
                if let Some(&at) = holds.get(&origin) {
                    match hlc.cmp(&at) {
                        std::cmp::Ordering::Greater => continue,
                        std::cmp::Ordering::Equal => {
                            holds.remove(&origin);
                        }
                        std::cmp::Ordering::Less => {}
                    }
                }
                if held.iter().any(|h| h.origin == origin) {
                    continue;
                }
            }
            match item {
                Received::Event(c) => events.push(c),
                Received::Malformed {
                    identity: Some((origin, hlc)),
                    event_id,
                    reason,
                    ..
                } => held.push(Held {
                    origin,
                    hlc,
                    event_id,
                    kind: RejectKind::Invalid,
                    reason,
                    retry_after_ms: HOLD_MALFORMED_MS,
                }),
                Received::Malformed {
                    identity: None,
                    event_id,
                    reason,
                    json,
                } => rejected.push(tidemark_store::Rejected {
                    event_id,
                    kind: RejectKind::Invalid,
                    reason,
                    event: json.unwrap_or_default(),
                }),
            }
        }
        held.extend(hold_gaps(
            &self.store.positions(),
            compacted,
            &mut events,
            CheckedEvent::event,
        ));
        // An origin held at a malformed event or a gap: its later events wait too.
        events.retain(|c| {
            let e = c.event();
            held.iter().all(|h| h.origin != e.node_id || e.hlc < h.hlc)
        });
        let allowed = move |origin: Ulid| may_relay || origin == sender;
        let outcome = match self
            .store
            .apply_from(
                Some(sender),
                events,
                rejected,
                &allowed,
                // Every configured peer (released ones included, which only
                // makes this stricter than the synced_at pass).
                &self.peers.ids(),
            )
            .await
        {
            Ok(o) => o,
            Err(e) => {
                metrics::counter!("tidemark_store_errors_total", "op" => "apply").increment(1);
                return Err(status::from_store(&e));
            }
        };
        held.extend(outcome.held.iter().cloned());
        for h in &held {
            let first = holds.insert(h.origin, h.hlc).is_none();
            metrics::counter!("tidemark_events_held_total", "peer" => peer.clone(), "code" => h.kind.code())
                .increment(1);
            if matches!(h.kind, RejectKind::Drift | RejectKind::FarFuture) {
                metrics::counter!("tidemark_drift_rejections_total", "peer" => peer.clone())
                    .increment(1);
            }
            if let (Some(c), false) = (&self.catch_up, h.kind == RejectKind::Gap) {
                c.origin_held(h.origin);
            }
            if first {
                warn!(%sender, origin = %h.origin, event_id = %h.event_id, code = h.kind.code(), reason = %h.reason, retry_after_ms = h.retry_after_ms, "origin held: its events wait, the others go on");
            }
        }
        for q in &outcome.quarantined {
            warn!(%sender, event_id = %q.event_id, code = q.kind.code(), reason = %q.reason, "event quarantined");
            metrics::counter!("tidemark_events_quarantined_total", "peer" => peer.clone(), "code" => q.kind.code())
                .increment(1);
        }
        if outcome.blocked > 0 {
            debug!(%sender, records = outcome.blocked, "records blocked by constraints");
        }
        // Apply delay: apply wall time minus the event's HLC wall time (never
        // negative: a sender whose clock runs ahead gives 0, not a negative lag).
        let now = tidemark_hlc::system_wall_ms();
        let delay = metrics::histogram!("tidemark_apply_delay_seconds", "peer" => peer.clone());
        for hlc in &outcome.fresh {
            delay.record((now - hlc.wall_ms()).max(0) as f64 / 1000.0);
        }
        metrics::counter!("tidemark_events_applied_total", "peer" => peer.clone())
            .increment(outcome.applied);
        metrics::counter!("tidemark_events_skipped_total", "peer" => peer.clone(), "reason" => "superseded")
            .increment(outcome.superseded);
        metrics::counter!("tidemark_events_skipped_total", "peer" => peer.clone(), "reason" => "duplicate")
            .increment(outcome.duplicates);
        metrics::counter!("tidemark_conflicts_detected_total").increment(outcome.conflicts);
        if outcome.conflicts > 0 {
            info!(
                %sender,
                conflicts = outcome.conflicts,
                "concurrent versions met: `tidemark admin conflicts list` shows the conflicts they made (none where they hold the same row)"
            );
        }
        let vector = self
            .store
            .advertised_vector()
            .await
            .map_err(|e| status::from_store(&e))?;
        let blocked_records = self
            .store
            .count_blocked()
            .await
            .map_err(|e| status::from_store(&e))?;
        let direct = self.direct_origins();
        let (last, earlier) = ids.split_last().expect("at least one batch");
        debug!(
            batch_id = last,
            coalesced = earlier.len(),
            events = received,
            applied = outcome.applied,
            superseded = outcome.superseded,
            duplicates = outcome.duplicates,
            held = held.len(),
            "batch applied"
        );
        // One ack per batch, in order, each after the commit; the last carries
        // the counts, refusals and holds of them all.
        let mut acks: Vec<pb::Ack> = earlier
            .iter()
            .map(|id| pb::Ack {
                batch_id: *id,
                vector: Some(vector_to_pb(&vector)),
                blocked_records,
                direct_origins: direct.clone(),
                ..Default::default()
            })
            .collect();
        acks.push(pb::Ack {
            batch_id: *last,
            vector: Some(vector_to_pb(&vector)),
            applied: outcome.applied,
            superseded: outcome.superseded,
            duplicates: outcome.duplicates,
            rejected: outcome
                .quarantined
                .iter()
                .map(|q| pb::Rejection {
                    event_id: q.event_id.clone(),
                    code: q.kind.code().to_owned(),
                    message: q.reason.clone(),
                })
                .collect(),
            held: held
                .iter()
                .map(|h| pb::Hold {
                    origin: h.origin.to_string(),
                    hlc: h.hlc.encode(),
                    event_id: h.event_id.clone(),
                    code: h.kind.code().to_owned(),
                    message: h.reason.clone(),
                    retry_after_ms: h.retry_after_ms,
                })
                .collect(),
            blocked_records,
            direct_origins: direct,
        });
        Ok(acks)
    }

    /// The reader of one accepted stream: decodes the sender's messages and
    /// checks their events (see [`Inner::receive_event`]), gathering the
    /// batches that arrive while the applier is busy into the next
    /// transaction's (up to [`COALESCE_EVENTS`] events). Ends with the stream,
    /// at shutdown, or when the applier stops.
    async fn read(
        self: Arc<Self>,
        sender: Ulid,
        mut inbound: Streaming<pb::SenderMessage>,
        steps: mpsc::Sender<Step>,
    ) {
        let peer = sender.to_string();
        let mut pending: Option<Gathered> = None;
        let mut end: Option<Option<Status>> = None;
        loop {
            if pending.is_none()
                && let Some(end) = end.take()
            {
                let _ = steps.send(Step::End(end)).await;
                return;
            }
            let room = pending
                .as_ref()
                .is_none_or(|g| g.events.len() < COALESCE_EVENTS);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                _ = steps.closed() => return,
                permit = steps.reserve(), if pending.is_some() => match (permit, pending.take()) {
                    (Ok(permit), Some(gathered)) => permit.send(Step::Apply(gathered)),
                    _ => return,
                },
                msg = inbound.message(), if end.is_none() && room => {
                    end = self.gather(&peer, msg, &mut pending).err();
                }
            }
        }
    }

    /// Adds one message from the sender to `pending`; `Err` when the stream
    /// ends with it (`Err(None)`: the sender closed it).
    fn gather(
        &self,
        peer: &str,
        msg: Result<Option<pb::SenderMessage>, Status>,
        pending: &mut Option<Gathered>,
    ) -> Result<(), Option<Status>> {
        let batch = match msg {
            Ok(Some(pb::SenderMessage {
                kind: Some(sender_message::Kind::Batch(b)),
            })) => b,
            Ok(Some(_)) => {
                return Err(Some(Status::invalid_argument(
                    "expected a batch: hello is only the first message",
                )));
            }
            Ok(None) => {
                debug!("sender closed the stream");
                return Err(None);
            }
            Err(status) => {
                // A transport failure, or a message the server refused to decode
                // (over max_message_bytes): tell the sender why, if it listens.
                if status.code() == tonic::Code::OutOfRange {
                    warn!(message = status.message(), "message from sender refused");
                } else {
                    debug!(%status, "stream from sender failed");
                }
                return Err(Some(status));
            }
        };
        if batch.events.len() > self.opts.max_batch_events {
            let status = Status::invalid_argument(format!(
                "batch {} has {} events, more than the limit of {}",
                batch.batch_id,
                batch.events.len(),
                self.opts.max_batch_events
            ));
            warn!(batch_id = batch.batch_id, code = ?status.code(), message = status.message(), "batch refused");
            return Err(Some(status));
        }
        if !batch.events.is_empty() {
            metrics::histogram!("tidemark_batch_events", "peer" => peer.to_owned())
                .record(batch.events.len() as f64);
        }
        let gathered = pending.get_or_insert_with(Gathered::default);
        gathered.batch_ids.push(batch.batch_id);
        gathered
            .events
            .extend(batch.events.into_iter().map(|raw| self.receive_event(raw)));
        Ok(())
    }
    /// The applier of one accepted stream: applies what its reader (spawned
    /// here) hands it, in order, and acknowledges each batch after its commit.
    /// Ends when the stream ends, at an error (sent to the sender), or at
    /// shutdown (after the transaction in hand).
    async fn serve(
        self: Arc<Self>,
        sender: Ulid,
        compacted: VersionVector,
        inbound: Streaming<pb::SenderMessage>,
        out: mpsc::Sender<Result<pb::ReceiverMessage, Status>>,
    ) {
        // One transaction's batches wait here while the reader gathers the next.
        let (steps, mut ready) = mpsc::channel(1);
        self.tracker
            .spawn(self.clone().read(sender, inbound, steps).in_current_span());
        let mut holds: HashMap<Ulid, Hlc> = HashMap::new();
        loop {
            let step = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    debug!("shutting down: closing stream");
                    return;
                }
                step = ready.recv() => step,
            };
            let gathered = match step {
                Some(Step::Apply(gathered)) => gathered,
                Some(Step::End(Some(status))) => {
                    let _ = out.send(Err(status)).await;
                    return;
                }
                Some(Step::End(None)) | None => return,
            };
            let batch_id = gathered.batch_ids.last().copied().unwrap_or_default();
            let replies: Vec<Result<pb::ReceiverMessage, Status>> = match self
                .apply_batches(sender, &compacted, gathered, &mut holds)
                .await
            {
                Ok(acks) => acks
                    .into_iter()
                    .map(|ack| {
                        Ok(pb::ReceiverMessage {
                            kind: Some(receiver_message::Kind::Ack(ack)),
                        })
                    })
                    .collect(),
                Err(status) => {
                    warn!(batch_id, code = ?status.code(), message = status.message(), "batch refused");
                    vec![Err(status)]
                }
            };
            let failed = replies.iter().any(Result::is_err);
            if let (false, Some(pause)) = (failed, crate::testhooks::pause_after_apply()) {
                debug!(batch_id, ?pause, "test pause between commit and ack");
                tokio::time::sleep(pause).await;
            }
            for reply in replies {
                if out.send(reply).await.is_err() {
                    return;
                }
            }
            if failed {
                return;
            }
        }
    }
}

type ReplicateStream = Pin<Box<dyn Stream<Item = Result<pb::ReceiverMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::replication_server::Replication for ReceiverService {
    type ReplicateStream = ReplicateStream;

    async fn replicate(
        &self,
        request: Request<Streaming<pb::SenderMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let peer_addr = request.remote_addr();
        let cert_identity = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| crate::tls::common_name(c)));
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let hello = match first {
            Some(pb::SenderMessage {
                kind: Some(sender_message::Kind::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        let checked = self.inner.check_hello(&hello).and_then(|sender| {
            if self.inner.require_certificate {
                match &cert_identity {
                    None => {
                        return Err(Status::unauthenticated(
                            "a client certificate naming the sender's node id is required",
                        ));
                    }
                    Some(cn) if *cn != sender.to_string() => {
                        return Err(Status::permission_denied(format!(
                            "certificate identity {cn} does not match the claimed node id {sender}"
                        )));
                    }
                    Some(_) => {}
                }
            }
            if self.inner.peers.get(sender).is_none() {
                return Err(Status::permission_denied(format!(
                    "node {sender} is not a configured peer of node {} (add it to [[peers]] on this node)",
                    self.inner.local.node_id
                )));
            }
            Ok(sender)
        });
        let entered = checked.and_then(|sender| {
            self.inner
                .enter(sender, &hello.instance_id)
                .map(|guard| (sender, guard))
        });
        let (sender, guard) = match entered {
            Ok(s) => s,
            Err(status) => {
                warn!(?peer_addr, sender = %hello.sender_node_id, message = status.message(), "handshake refused");
                return Err(status);
            }
        };
        if let Some(wake) = &self.inner.wake {
            wake.wake(sender);
        }
        if let Ok(remote) = tidemark_hlc::Hlc::decode(hello.hlc)
            && let Err(e) = self.inner.store.clock().check_drift(remote)
        {
            warn!(%sender, error = %e, "peer clock is ahead beyond max drift; its events will be refused until it is fixed");
        }
        let compacted = peer_vector("hello.compacted", hello.compacted.clone())?;
        let store = &self.inner.store;
        let peer_has = tidemark_hlc::Hlc::decode(hello.receiver_origin_hlc)
            .map_err(|e| Status::invalid_argument(format!("hello.receiver_origin_hlc: {e}")))?;
        if store
            .peer_holds_own(sender, peer_has)
            .await
            .map_err(|e| status::from_store(&e))?
        {
            let log_has = store
                .vector()
                .await
                .map_err(|e| status::from_store(&e))?
                .get(self.inner.local.node_id);
            crate::own_events_missing(sender, peer_has, log_has);
        }
        let vector = store
            .advertised_vector()
            .await
            .map_err(|e| status::from_store(&e))?;
        info!(%sender, ?peer_addr, "replication session accepted");
        let (tx, rx) = mpsc::channel(self.inner.opts.max_unacked_batches.max(1) + 1);
        let welcome = pb::ReceiverMessage {
            kind: Some(receiver_message::Kind::Welcome(pb::Welcome {
                protocol_version: PROTOCOL_VERSION,
                receiver_node_id: self.inner.local.node_id.to_string(),
                vector: Some(vector_to_pb(&vector)),
                hlc: self.inner.store.clock().now().encode(),
                direct_origins: self.inner.direct_origins(),
                positions: positions_to_pb(&store.positions()),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("sender went away"))?;
        let inner = self.inner.clone();
        let span = info_span!("receive", %sender);
        self.inner.tracker.spawn(
            async move {
                let _guard = guard;
                inner.serve(sender, compacted, inbound, tx).await
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Holds each origin at its first numbered event that does not continue the
/// origin's sequence here, and drops its later events: a session streams an
/// origin's events in order from a log with no holes, so a number past the
/// next one means the events between are missing, and applying past them would
/// leave a hole this node's position could not show. The one exception is
/// compaction: a sender that deleted superseded events of the origin newer
/// than the ones held here (`compacted`, from its Hello) streams what it kept,
/// and the records converge from that. A number at or below the next one is an
/// event held already or later in the batch; the store skips duplicates by id.
/// Unnumbered events (stamped before origins numbered their events) pass.
/// A number already held that comes with an HLC newer than any held cannot
/// come from the origin's one writer: the origin is held
/// ([`RejectKind::SecondWriter`]).
fn hold_gaps<T>(
    positions: &BTreeMap<Ulid, Position>,
    compacted: &VersionVector,
    events: &mut Vec<T>,
    event_of: impl Fn(&T) -> &ChangeEvent,
) -> Vec<Held> {
    let mut at: BTreeMap<Ulid, Position> = BTreeMap::new();
    let mut held = Vec::new();
    events.retain(|item| {
        let event = event_of(item);
        let origin = event.node_id;
        if held.iter().any(|h: &Held| h.origin == origin) {
            return false;
        }
        // A malformed number is refused by the store, with its reason.
        let Ok(Some(seq)) = event.seq() else {
            return true;
        };
        let here = at
            .entry(origin)
            .or_insert_with(|| positions.get(&origin).copied().unwrap_or_default());
        if seq > here.seq + 1 && compacted.get(origin) <= here.hlc {
            held.push(Held {
                origin,
                hlc: event.hlc,
                event_id: event.event_id.to_string(),
                kind: RejectKind::Gap,
                reason: format!(
                    "event {} is number {seq} of origin {origin}, but this node holds its events only up to number {}: numbers {} to {} are missing",
                    event.event_id,
                    here.seq,
                    here.seq + 1,
                    seq - 1
                ),
                retry_after_ms: HOLD_GAP_MS,
            });
            return false;
        }
        if seq <= here.seq && here.seq > 0 && event.hlc > here.hlc {
            held.push(Held {
                origin,
                hlc: event.hlc,
                event_id: event.event_id.to_string(),
                kind: RejectKind::SecondWriter,
                reason: format!(
                    "event {} is number {seq} of origin {origin} with HLC {}, newer than HLC {} of number {}, the last this node holds: numbers and HLCs of one writer rise together, so two daemons are writing as node {origin} (a copy of its database started with its id?); its events wait until one of them stops",
                    event.event_id, event.hlc, here.hlc, here.seq
                ),
                retry_after_ms: HOLD_SECOND_WRITER_MS,
            });
            return false;
        }
        if seq > here.seq {
            *here = Position {
                hlc: here.hlc.max(event.hlc),
                seq,
            };
        }
        true
    });
    held
}

/// Decodes a vector from a peer's message, as a status on error.
pub fn peer_vector(
    field: &str,
    v: Option<pb::VersionVector>,
) -> Result<tidemark_store::VersionVector, Status> {
    vector_from_pb(field, v).map_err(|e| status::from_field(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_store::Operation;

    fn numbered(origin: Ulid, hlc: i64, seq: u64) -> ChangeEvent {
        ChangeEvent {
            event_id: Ulid::generate(),
            hlc: Hlc::decode(hlc).expect("hlc"),
            wall_ms: 0,
            node_id: origin,
            table_name: "notes".into(),
            record_id: Ulid::generate(),
            operation: Operation::Delete,
            action: None,
            user_id: None,
            old_values: None,
            new_values: None,
            metadata: Some(serde_json::json!({ "seq": seq })),
        }
    }

    #[test]
    fn a_held_number_with_a_newer_hlc_is_a_second_writer() {
        let origin = Ulid::generate();
        let positions = BTreeMap::from([(
            origin,
            Position {
                hlc: Hlc::decode(1_000).expect("hlc"),
                seq: 5,
            },
        )]);
        let none = VersionVector::new();
        // A number held, with an older HLC: a duplicate, for the store to skip.
        let mut events = vec![numbered(origin, 900, 4), numbered(origin, 1_100, 6)];
        assert!(hold_gaps(&positions, &none, &mut events, |e| e).is_empty());
        assert_eq!(events.len(), 2);
        // A number held, with an HLC newer than any held: another writer.
        let clone = numbered(origin, 1_050, 5);
        let mut events = vec![clone.clone(), numbered(origin, 1_100, 6)];
        let held = hold_gaps(&positions, &none, &mut events, |e| e);
        assert!(events.is_empty(), "the origin's later events wait too");
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].kind, RejectKind::SecondWriter);
        assert_eq!(held[0].event_id, clone.event_id.to_string());
        assert!(
            held[0].reason.contains("two daemons are writing as node"),
            "{}",
            held[0].reason
        );
        // Nothing numbered held yet (events stamped before numbering): passes.
        let fresh = BTreeMap::from([(
            origin,
            Position {
                hlc: Hlc::decode(1_000).expect("hlc"),
                seq: 0,
            },
        )]);
        let mut events = vec![numbered(origin, 1_100, 1)];
        assert!(hold_gaps(&fresh, &none, &mut events, |e| e).is_empty());
    }
}
