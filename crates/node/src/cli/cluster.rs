//! `tidemark admin cluster`: every node the CLI can reach, asked through
//! Admin: its state, open conflicts and stuck records, and each link's lag in
//! events and seconds; `--watch` refreshes and shows how fast backlogs drain.
//!
//! The nodes are found from the one at `--addr` (and any `--node`): each
//! node's status names its peers' addresses, which are asked in turn with the
//! same credentials. A peer address this machine cannot reach (a container's
//! service name, an Admin listener of its own) can be given with `--node`; a
//! node reached at any address counts as reached. The admin token is sent to
//! `--addr` and `--node` addresses, and to addresses found through peers only
//! over TLS.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde_json::{Value, json};
use tidemark_replicator::pb;

use super::{
    BearerToken, ClientTlsArgs, admin_client, ago, int64_json, now_ms, print_table, rpc_error,
};

/// How long one node may take to answer before it counts as unreachable.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// One node as the cluster view shows it.
#[derive(Debug)]
enum NodeView {
    Up {
        address: String,
        status: Box<pb::StatusResponse>,
    },
    Unreachable {
        address: String,
        /// Who its peers say is there, when a peer named it.
        node_id: Option<String>,
        name: Option<String>,
        error: String,
    },
}

/// The node id and name a peer gave for an address it listed.
type PeerHint = Option<(String, String)>;

/// What one round of asking found.
#[derive(Debug, Default)]
struct View {
    /// By node id (unreachable addresses with no known id by address).
    nodes: BTreeMap<String, NodeView>,
    at_ms: i64,
}

impl View {
    fn all_up(&self) -> bool {
        self.nodes
            .values()
            .all(|n| matches!(n, NodeView::Up { .. }))
    }

    /// Each link (from, peer) with what `from` reports about it.
    fn links(&self) -> Vec<(&pb::StatusResponse, &pb::PeerStatus)> {
        let mut out = Vec::new();
        for node in self.nodes.values() {
            if let NodeView::Up { status, .. } = node {
                for p in &status.peers {
                    out.push((status.as_ref(), p));
                }
            }
        }
        out
    }

    /// A node's name for people: its own, or what a peer calls it.
    fn name_of(&self, node_id: &str) -> String {
        match self.nodes.get(node_id) {
            Some(NodeView::Up { status, .. }) if !status.name.is_empty() => status.name.clone(),
            Some(NodeView::Unreachable { name: Some(n), .. }) => n.clone(),
            _ => super::short(node_id),
        }
    }
}

async fn ask(
    address: &str,
    tls: &ClientTlsArgs,
    token: &BearerToken,
) -> anyhow::Result<pb::StatusResponse> {
    let call = async {
        let mut client = admin_client(address, tls, token).await?;
        client
            .status(pb::StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(rpc_error)
    };
    tokio::time::timeout(NODE_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {NODE_TIMEOUT:?}")))
}

/// Asks every node reachable from `starts`, following peers' addresses.
async fn gather(starts: &[String], tls: &ClientTlsArgs, token: &BearerToken) -> View {
    let mut queue: VecDeque<(String, PeerHint)> =
        starts.iter().map(|a| (a.clone(), None)).collect();
    let mut asked: std::collections::HashSet<String> = Default::default();
    let mut view = View::default();
    // Addresses that failed, with the node a peer said is there.
    let mut failed: Vec<(String, PeerHint, String)> = Vec::new();
    while let Some((address, expected)) = queue.pop_front() {
        let url = super::with_scheme(&address, tls);
        if !asked.insert(url.clone()) {
            continue;
        }
        // The token goes to the addresses the operator gave, and to the ones
        // found through peers only over TLS (where the CA vouches for the
        // server and the channel hides it): never in cleartext to an address
        // a status reply named.
        let none = BearerToken(None);
        let token = if expected.is_none() || url.starts_with("https://") {
            token
        } else {
            &none
        };
        match ask(&url, tls, token).await {
            Ok(status) => {
                for p in &status.peers {
                    queue.push_back((p.address.clone(), Some((p.node_id.clone(), p.name.clone()))));
                }
                view.nodes
                    .entry(status.node_id.clone())
                    .or_insert(NodeView::Up {
                        address: url,
                        status: Box::new(status),
                    });
            }
            Err(e) => failed.push((url, expected, format!("{e:#}"))),
        }
    }
    for (address, expected, error) in failed {
        let key = expected
            .as_ref()
            .map_or_else(|| address.clone(), |(id, _)| id.clone());
        view.nodes.entry(key).or_insert(NodeView::Unreachable {
            address,
            node_id: expected.as_ref().map(|(id, _)| id.clone()),
            name: expected.and_then(|(_, n)| (!n.is_empty()).then_some(n)),
            error,
        });
    }
    view.at_ms = now_ms();
    view
}

fn open_conflicts(s: &pb::StatusResponse) -> u64 {
    s.tables.iter().map(|t| t.open_conflicts).sum()
}

fn lag_seconds(p: &pb::PeerStatus, now: i64) -> f64 {
    if p.oldest_unacked_ms > 0 {
        (now - p.oldest_unacked_ms).max(0) as f64 / 1000.0
    } else {
        0.0
    }
}

/// How a link's backlog moved since the last round: draining (with an
/// estimate of when it is done) or growing, in events per second.
fn trend(before: Option<u64>, now: u64, secs: f64) -> String {
    let Some(before) = before else {
        return String::new();
    };
    if secs <= 0.0 || before == now {
        return String::new();
    }
    let rate = (before as f64 - now as f64) / secs;
    if rate > 0.0 {
        let eta = now as f64 / rate;
        format!("draining {rate:.0}/s, done in ~{eta:.0} s")
    } else {
        format!("growing {:.0}/s", -rate)
    }
}

/// A reachable node's state: writes held (restarted, waiting to hear how far
/// its peers hold its events), waiting for a peer or catching up (not ready),
/// else up. Nodes of older builds report no catch-up state: up.
fn state_key(status: &pb::StatusResponse) -> &'static str {
    match status.state.as_str() {
        _ if status.writes_held => "writes_held",
        "waiting_for_peer" => "waiting_for_peer",
        "catching_up" => "catching_up",
        _ => "up",
    }
}

fn state_text(status: &pb::StatusResponse) -> String {
    match state_key(status) {
        "writes_held" => "writes held".into(),
        "waiting_for_peer" => "waiting for a peer".into(),
        "catching_up" => format!("catching up, {} behind", status.catchup_remaining_events),
        other => other.into(),
    }
}

fn as_json(view: &View) -> Value {
    let nodes: Vec<Value> = view
        .nodes
        .iter()
        .map(|(key, node)| match node {
            NodeView::Up { address, status } => json!({
                "node_id": status.node_id, "name": status.name, "address": address,
                "state": state_key(status),
                "catchup_remaining_events": status.catchup_remaining_events,
                "store": status.store, "hlc": int64_json(status.hlc),
                "unsynced_events": status.unsynced_events,
                "open_conflicts": open_conflicts(status),
                "blocked_records": status.blocked_records,
                "quarantined_events": status.quarantined_events,
                "unreplicated_captures": status.unreplicated_captures,
                "pending_captures": status.pending_captures,
            }),
            NodeView::Unreachable {
                address,
                node_id,
                name,
                error,
            } => json!({
                "node_id": node_id.clone().unwrap_or_default(),
                "name": name.clone().unwrap_or_default(),
                "address": address, "state": "unreachable", "error": error,
                "key": key,
            }),
        })
        .collect();
    let links: Vec<Value> = view
        .links()
        .iter()
        .map(|(from, p)| {
            json!({
                "from": from.node_id, "from_name": from.name,
                "to": p.node_id, "to_name": view.name_of(&p.node_id),
                "connected": p.connected, "released": p.released,
                "unacked_events": p.unacked_events,
                "lag_seconds": lag_seconds(p, view.at_ms),
                "last_ack_ms": int64_json(p.last_ack_ms), "last_error": p.last_error,
            })
        })
        .collect();
    let cluster = view.nodes.values().find_map(|n| match n {
        NodeView::Up { status, .. } => Some(status.cluster_id.clone()),
        NodeView::Unreachable { .. } => None,
    });
    json!({
        "cluster_id": cluster.unwrap_or_default(),
        "at": super::rfc3339(view.at_ms),
        "nodes": nodes,
        "links": links,
    })
}

fn print_view(view: &View, previous: Option<&View>) {
    let up = view
        .nodes
        .values()
        .filter(|n| matches!(n, NodeView::Up { .. }))
        .count();
    let cluster = view.nodes.values().find_map(|n| match n {
        NodeView::Up { status, .. } => Some(status.cluster_id.clone()),
        NodeView::Unreachable { .. } => None,
    });
    out!(
        "cluster {}: {} nodes, {up} reachable, as of {}",
        cluster.unwrap_or_else(|| "?".into()),
        view.nodes.len(),
        super::rfc3339(view.at_ms)
    );
    out!();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for node in view.nodes.values() {
        match node {
            NodeView::Up { address, status } => rows.push(vec![
                status.name.clone(),
                super::short(&status.node_id),
                status.store.clone(),
                state_text(status),
                status.unsynced_events.to_string(),
                open_conflicts(status).to_string(),
                status.blocked_records.to_string(),
                status.quarantined_events.to_string(),
                status.unreplicated_captures.to_string(),
                address.clone(),
            ]),
            NodeView::Unreachable {
                address,
                node_id,
                name,
                error,
            } => {
                rows.push(vec![
                    name.clone().unwrap_or_else(|| "-".into()),
                    node_id.as_deref().map_or_else(|| "-".into(), super::short),
                    "-".into(),
                    "unreachable".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    address.clone(),
                ]);
                errors.push(format!("{address}: {error}"));
            }
        }
    }
    print_table(
        &[
            "node",
            "id",
            "store",
            "state",
            "unsynced",
            "conflicts",
            "blocked",
            "quarantined",
            "unreplicated",
            "address",
        ],
        &rows,
    );
    for e in &errors {
        out!("  {e}");
    }
    if !errors.is_empty() {
        out!(
            "  (a peer address this machine cannot reach can be given with --node; Admin on a listener of its own needs that address)"
        );
    }
    out!();
    let before: HashMap<(String, String), u64> = previous
        .map(|v| {
            v.links()
                .iter()
                .map(|(f, p)| ((f.node_id.clone(), p.node_id.clone()), p.unacked_events))
                .collect()
        })
        .unwrap_or_default();
    let secs = previous.map_or(0.0, |p| (view.at_ms - p.at_ms) as f64 / 1000.0);
    let rows: Vec<Vec<String>> = view
        .links()
        .iter()
        .map(|(from, p)| {
            let lag = lag_seconds(p, view.at_ms);
            vec![
                format!(
                    "{} -> {}",
                    view.name_of(&from.node_id),
                    view.name_of(&p.node_id)
                ),
                match (p.connected, p.released) {
                    (true, _) => "yes",
                    (false, false) => "no",
                    (false, true) => "no, released",
                }
                .to_owned(),
                p.unacked_events.to_string(),
                format!("{lag:.1} s"),
                if p.last_ack_ms > 0 {
                    ago(p.last_ack_ms, view.at_ms)
                } else {
                    "-".into()
                },
                trend(
                    before
                        .get(&(from.node_id.clone(), p.node_id.clone()))
                        .copied(),
                    p.unacked_events,
                    secs,
                ),
            ]
        })
        .collect();
    print_table(
        &[
            "link",
            "connected",
            "unacked",
            "lag",
            "last ack",
            "progress",
        ],
        &rows,
    );
}

/// Runs `tidemark admin cluster`: once, or every `watch` seconds (`count`
/// rounds, or until Ctrl-C). False when some node could not be reached.
pub(super) async fn run(
    starts: &[String],
    tls: &ClientTlsArgs,
    token: &BearerToken,
    json: bool,
    watch: Option<u64>,
    count: Option<u64>,
) -> anyhow::Result<bool> {
    let mut previous: Option<View> = None;
    let mut round = 0u64;
    loop {
        let view = gather(starts, tls, token).await;
        round += 1;
        if json {
            super::print_json(&as_json(&view));
        } else {
            if watch.is_some() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                // Clear the screen and go home, like watch(1).
                print!("\x1b[2J\x1b[H");
            }
            print_view(&view, previous.as_ref());
        }
        let all_up = view.all_up();
        let Some(every) = watch else {
            return Ok(all_up);
        };
        if count.is_some_and(|c| round >= c) {
            return Ok(all_up);
        }
        if !json {
            out!();
            out!("refreshing every {every} s; Ctrl-C stops");
        }
        previous = Some(view);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(all_up),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::trend;

    #[test]
    fn a_draining_backlog_shows_its_rate_and_when_it_is_done() {
        assert_eq!(trend(None, 10, 1.0), "");
        assert_eq!(trend(Some(10), 10, 1.0), "");
        assert_eq!(
            trend(Some(3000), 1000, 2.0),
            "draining 1000/s, done in ~1 s"
        );
        assert_eq!(trend(Some(100), 300, 2.0), "growing 100/s");
    }
}
