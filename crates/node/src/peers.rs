//! The peer list while the node runs: one session per configured peer, started
//! and stopped as `[[peers]]` changes (SIGHUP reloads it, see
//! [`crate::Node::reload_peers`]).
//!
//! When a peer is removed: its session is cancelled and waited for, its
//! session state and gauges go, the receiver refuses its sessions (a live one
//! ends at its next batch), `synced_at` stops waiting for it, and its stored
//! progress is deleted. A removed node can come back only as a configured
//! peer again, and then catches up like any peer that was away.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use tidemark_replicator::{Peer, Sender};
use tidemark_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use ulid::Ulid;

/// Peers' configured names (`[[peers]] name`), for status and metrics labels.
pub type PeerNames = Arc<RwLock<BTreeMap<Ulid, String>>>;

/// A running session: how to stop it and when it has stopped.
struct Session {
    peer: Peer,
    cancel: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

/// Keeps one session per peer of `sender`'s list until `cancel`.
pub async fn supervise(
    sender: Sender,
    store: Store,
    names: PeerNames,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut changes = sender.peers().subscribe();
    let mut sessions: HashMap<Ulid, Session> = HashMap::new();
    loop {
        let wanted = changes.borrow_and_update().clone();
        // Stop sessions of removed peers, and of peers whose address or relay
        // permission changed (they start again below).
        let stale: Vec<Ulid> = sessions
            .iter()
            .filter(|(id, s)| !wanted.iter().any(|p| p.node_id == **id && *p == s.peer))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(session) = sessions.remove(&id) {
                session.cancel.cancel();
                if let Err(e) = session.done.await {
                    warn!(peer = %id, error = %e, "a peer session ended abnormally");
                }
                if !wanted.iter().any(|p| p.node_id == id) {
                    sender.forget(id);
                    info!(peer = %id, "peer removed: its session stopped");
                }
            }
        }
        for peer in wanted.iter() {
            if sessions.contains_key(&peer.node_id) {
                continue;
            }
            let name = names
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&peer.node_id)
                .cloned()
                .unwrap_or_default();
            crate::http::export_peer_at_zero(peer, &name);
            let token = cancel.child_token();
            let done = tracker.spawn(sender.clone().run_peer(peer.clone(), token.clone()));
            sessions.insert(
                peer.node_id,
                Session {
                    peer: peer.clone(),
                    cancel: token,
                    done,
                },
            );
        }
        // Progress of nodes no longer listed goes (nothing waits for them).
        let ids: Vec<Ulid> = wanted.iter().map(|p| p.node_id).collect();
        match store.forget_peers(&ids).await {
            Ok(0) => {}
            Ok(n) => info!(peers = n, "forgot the progress of removed peers"),
            Err(e) => warn!(error = %e, "cannot forget the progress of removed peers"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}
