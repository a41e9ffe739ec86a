//! Tidemark's peer replication over gRPC.
//!
//! * [`pb`]: the wire types generated from `proto/tidemark/v1` (the only place they
//!   are generated; other crates use them from here), converted to store types in
//!   [`convert`];
//! * [`receiver::ReceiverService`]: the `Replication` service a node serves: checks
//!   the handshake, applies each batch in one transaction, acks after commit;
//! * [`sender::Sender`]: one session per configured peer: streams what the peer's
//!   version vector lacks, bounded by unacked batches, reconnecting with backoff;
//!   its connections can go through a [`Connector`] and its jitter be seeded, and
//!   the receiver served from any incoming stream, so the whole replicator runs
//!   unchanged under deterministic network simulation; a [`PeerWake`] shared
//!   with the receiver ends a sender's reconnect backoff as soon as that peer
//!   opens a session here;
//! * [`catchup::CatchUp`]: whether the node holds what its peers held when it
//!   met them (waiting for a peer, catching up, active): what `/readyz` says;
//! * [`status`]: the one mapping from errors to `tonic::Status`;
//! * [`testhooks`]: test-only pauses for fault tests, off unless set in the environment.
//!
//! This crate holds no SQL; everything durable goes through `tidemark_store::Store`.

pub mod catchup;
pub mod convert;
pub mod receiver;
pub mod sender;
pub mod status;
pub mod testhooks;
pub mod tls;

/// Generated protobuf and gRPC types of `tidemark.v1`.
pub mod pb {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("tidemark.v1");

    /// Encoded descriptor set of every tidemark proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tidemark_descriptor.bin"));
}

use std::sync::Arc;

use ulid::Ulid;

pub use catchup::{CatchUp, CatchUpStatus, Phase};
pub use receiver::ReceiverService;
pub use sender::{Connector, PeerIo, PeerState, PeerWake, Sender};
pub use tls::PeerTls;

/// The replication wire protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// This daemon process's instance id: random, new at every start, sent in each
/// Hello so a receiver can tell two live daemons claiming one node id apart
/// from one daemon reconnecting.
pub fn instance_id() -> Ulid {
    static INSTANCE: std::sync::OnceLock<Ulid> = std::sync::OnceLock::new();
    *INSTANCE.get_or_init(Ulid::generate)
}

/// Reports a peer holding events of this node's origin that its log lacks.
pub(crate) fn own_events_missing(
    peer: Ulid,
    peer_has: tidemark_hlc::Hlc,
    log_has: tidemark_hlc::Hlc,
) {
    tracing::error!(
        %peer,
        %peer_has,
        %log_has,
        "the peer holds events of this node that its own log lacks: the database was restored from an older copy, or another daemon wrote with this node id; new events are stamped after the peer's and the missing ones are asked back from the peers (only peers that may relay can send them)"
    );
    metrics::counter!("tidemark_own_events_missing_total", "peer" => peer.to_string()).increment(1);
}

/// Who this node is, as peers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub node_id: Ulid,
    pub cluster_id: String,
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_id: Ulid,
    /// gRPC endpoint, e.g. `http://10.0.0.2:7070` (`https://` under TLS).
    pub address: String,
    /// Whether the peer may send events of other origins (relay); when false,
    /// only events it originated are accepted from it.
    pub may_relay: bool,
}

/// The configured peers, shared by the sender, the receiver and whoever
/// reports on them, and replaceable while the node runs (the daemon reloads
/// `[[peers]]` on SIGHUP). Readers see the whole new list at once;
/// [`PeerSet::subscribe`] tells a supervisor when it changed.
#[derive(Debug, Clone)]
pub struct PeerSet(Arc<tokio::sync::watch::Sender<Arc<Vec<Peer>>>>);

impl PeerSet {
    pub fn new(peers: Vec<Peer>) -> Self {
        PeerSet(Arc::new(tokio::sync::watch::Sender::new(Arc::new(peers))))
    }

    /// The peers now.
    pub fn current(&self) -> Arc<Vec<Peer>> {
        self.0.borrow().clone()
    }

    /// The ids of the peers now.
    pub fn ids(&self) -> Vec<Ulid> {
        self.0.borrow().iter().map(|p| p.node_id).collect()
    }

    /// The peer with this id, if it is configured now.
    pub fn get(&self, id: Ulid) -> Option<Peer> {
        self.0.borrow().iter().find(|p| p.node_id == id).cloned()
    }

    /// Replaces the list; subscribers are told if it changed.
    pub fn replace(&self, peers: Vec<Peer>) {
        self.0.send_if_modified(|now| {
            let changed = **now != peers;
            if changed {
                *now = Arc::new(peers);
            }
            changed
        });
    }

    /// Changes of the list, starting from the current one (already seen).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Vec<Peer>>> {
        self.0.subscribe()
    }
}

impl From<Vec<Peer>> for PeerSet {
    fn from(peers: Vec<Peer>) -> Self {
        PeerSet::new(peers)
    }
}

/// Replication limits and timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationOptions {
    /// Most events in one batch sent to a peer.
    pub batch_size: u32,
    /// Approximate byte budget of one batch (at least one event is always sent).
    pub max_batch_bytes: usize,
    /// Most batches sent to one peer and not yet acknowledged (backpressure).
    /// Enough that a peer catching up always has the next transaction's
    /// batches arriving while it commits one (the receiver coalesces what has
    /// arrived): with 4, a catch-up stalled between commits.
    pub max_unacked_batches: usize,
    /// Most events a received batch may hold.
    pub max_batch_events: usize,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    pub connect_timeout_ms: u64,
    /// A session with a batch unacknowledged for this long is restarted.
    pub ack_timeout_ms: u64,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    /// HTTP/2 PINGs go out on every peer connection this often (both ways); a
    /// connection whose PING is unanswered for twice this long is closed, so a
    /// partitioned peer shows as disconnected within about three times this.
    pub keepalive_ms: u64,
    /// A peer seen disconnected this long without a break, while it lacks
    /// events, is released: `synced_at` (and so log compaction) stops waiting
    /// for it until it connects again. 0: never.
    pub absent_peer_limit_ms: u64,
}

impl ReplicationOptions {
    /// How often a peer connection is pinged.
    pub fn keepalive_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.keepalive_ms)
    }

    /// How long an unanswered PING keeps a peer connection open.
    pub fn keepalive_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.keepalive_ms.saturating_mul(2))
    }
}

impl Default for ReplicationOptions {
    fn default() -> Self {
        ReplicationOptions {
            batch_size: 500,
            max_batch_bytes: 1 << 20,
            max_unacked_batches: 8,
            max_batch_events: 10_000,
            max_message_bytes: 16 << 20,
            connect_timeout_ms: 5_000,
            ack_timeout_ms: 30_000,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 10_000,
            keepalive_ms: 2_000,
            absent_peer_limit_ms: 0,
        }
    }
}
