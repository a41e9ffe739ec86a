//! Whole daemons over real gRPC on 127.0.0.1: convergence in mesh and chain
//! topologies, catch-up after a restart, concurrent writes under last-writer-wins,
//! and a cluster mixing PostgreSQL and SQLite.

use std::time::Duration;

use serde_json::json;
use tidemark_tests::daemon::{Cluster, Topology};
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(60);

/// Writes through the API and through the database's own client on every node.
async fn write_everywhere(cluster: &Cluster, round: u32) -> Vec<Ulid> {
    write_on_first(cluster, round, cluster.nodes.len()).await
}

/// [`write_everywhere`] on the first `n` nodes only.
async fn write_on_first(cluster: &Cluster, round: u32, n: usize) -> Vec<Ulid> {
    let mut ids = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate().take(n) {
        let api = Ulid::generate();
        node.put(
            api,
            json!({"title": format!("api r{round} n{i}"), "stars": i}),
        )
        .await;
        let direct = Ulid::generate();
        node.db.sql(&format!(
            "INSERT INTO notes (id, title, body, stars) VALUES ('{direct}', 'sql r{round} n{i}', 'direct', {i})"
        ));
        ids.extend([api, direct]);
    }
    ids
}

async fn converges(backends: &[&str], topology: Topology) {
    let cluster = Cluster::start(backends, topology).await;
    let ids = write_everywhere(&cluster, 1).await;
    // Updates and deletes, through both paths, after the first round spread.
    cluster.converged(CONVERGE).await;
    cluster.nodes[0]
        .put(ids[5], json!({"body": "updated via api"}))
        .await;
    let last = cluster.nodes.len() - 1;
    cluster.nodes[last].db.sql(&format!(
        "UPDATE notes SET stars = 42 WHERE id = '{}'",
        ids[0]
    ));
    cluster.nodes[last]
        .db
        .sql(&format!("DELETE FROM notes WHERE id = '{}'", ids[1]));
    cluster.nodes[1].delete(ids[2]).await;
    let snap = cluster.converged(CONVERGE).await;
    assert_eq!(snap.rows.len(), ids.len() - 2);
    assert!(snap.rows[&ids[5].to_string()].contains("updated via api"));
    assert!(snap.rows[&ids[0].to_string()].contains("\"stars\":42"));
    assert!(!snap.rows.contains_key(&ids[1].to_string()));
    assert!(!snap.rows.contains_key(&ids[2].to_string()));
    // 2 writes per node, then 4 more.
    assert_eq!(snap.events.len(), 2 * cluster.nodes.len() + 4);
    cluster.assert_lww().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_of_three_converges() {
    converges(&["sqlite", "sqlite", "sqlite"], Topology::Mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_three_converges_through_relay() {
    converges(&["sqlite", "sqlite", "sqlite"], Topology::Chain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_postgres_and_sqlite_cluster_converges() {
    converges(&["postgres", "sqlite", "sqlite"], Topology::Mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_catches_up_and_keeps_events_unsynced_meanwhile() {
    let mut cluster = Cluster::start(&["sqlite", "sqlite", "sqlite"], Topology::Mesh).await;
    write_everywhere(&cluster, 1).await;
    cluster.converged(CONVERGE).await;
    cluster.nodes[2].stop();
    // Writes while node2 is down, through the API and directly.
    let mut written = Vec::new();
    for round in 2..5 {
        for node in &cluster.nodes[..2] {
            let id = Ulid::generate();
            let resp = node
                .put(id, json!({"title": format!("while down {round}")}))
                .await;
            written.push((node.name.clone(), resp.event_id));
            node.db.sql(&format!(
                "INSERT INTO notes (id, title) VALUES ('{}', 'direct while down {round}')",
                Ulid::generate()
            ));
        }
    }
    // node0 and node1 converge with each other, but nothing new is synced: node2
    // has not acknowledged it.
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let a = cluster.nodes[0].reader().snapshot().await;
        let b = cluster.nodes[1].reader().snapshot().await;
        if a.rows == b.rows && a.events == b.events && a.rows.len() == 6 + 12 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node0 and node1 did not converge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (name, event_id) in &written {
        let node = cluster
            .nodes
            .iter()
            .find(|n| &n.name == name)
            .expect("node");
        assert!(
            node.reader().is_unsynced(event_id).await,
            "{event_id} synced while a peer is down"
        );
    }
    cluster.nodes[2].start().await;
    let snap = cluster.converged(CONVERGE).await;
    assert_eq!(snap.rows.len(), 18);
    assert_eq!(snap.events.len(), 18);
    cluster.assert_lww().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_and_deletes_pick_one_winner_everywhere() {
    let cluster = Cluster::start(&["sqlite", "sqlite", "sqlite"], Topology::Mesh).await;
    let ids: Vec<Ulid> = (0..6).map(|_| Ulid::generate()).collect();
    for id in &ids {
        cluster.nodes[0]
            .put(*id, json!({"title": "v0", "stars": 0}))
            .await;
    }
    cluster.converged(CONVERGE).await;
    // Every node writes every record at once; some nodes delete.
    let mut tasks = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        let url = node.grpc_url();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = tidemark_replicator::pb::records_client::RecordsClient::connect(url)
                .await
                .expect("connect");
            for (k, id) in ids.iter().enumerate() {
                if (k + n) % 4 == 3 {
                    client
                        .delete(tidemark_replicator::pb::DeleteRequest {
                            table: "notes".into(),
                            id: id.to_string(),
                        })
                        .await
                        .expect("delete");
                } else {
                    client
                        .put(tidemark_replicator::pb::PutRequest {
                            table: "notes".into(),
                            id: id.to_string(),
                            values_json: json!({"title": format!("node{n}"), "stars": n})
                                .to_string(),
                        })
                        .await
                        .expect("put");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    cluster.converged(CONVERGE).await;
    cluster.assert_lww().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_older_update_does_not_resurrect_a_delete() {
    // Chain node0 - node1 - node2: with node1 down, node0 and node2 cannot talk.
    let mut cluster = Cluster::start(&["sqlite", "sqlite", "sqlite"], Topology::Chain).await;
    let id = Ulid::generate();
    cluster.nodes[0].put(id, json!({"title": "original"})).await;
    cluster.converged(CONVERGE).await;
    cluster.nodes[1].stop();
    // node2 updates first, node0 deletes later: the delete is newer.
    let update = cluster.nodes[2]
        .put(id, json!({"title": "older update"}))
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let delete = cluster.nodes[0].delete(id).await;
    assert!(delete.hlc > update.hlc);
    cluster.nodes[1].start().await;
    let snap = cluster.converged(CONVERGE).await;
    assert!(
        !snap.rows.contains_key(&id.to_string()),
        "the late update resurrected the row"
    );
    // The superseded update is kept in every node's log for audit.
    assert!(snap.events.contains(&update.event_id));
    cluster.assert_lww().await;
}

/// Events a node received from peers: (new to it, already held).
async fn received(node: &tidemark_tests::daemon::TestNode) -> (f64, f64) {
    let (_, body) = node.http_get("/metrics").await;
    let (mut fresh, mut duplicates) = (0.0, 0.0);
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let n: f64 = value.parse().unwrap_or(0.0);
        if series.starts_with("tidemark_events_applied_total{")
            || (series.starts_with("tidemark_events_skipped_total{")
                && series.contains("reason=\"superseded\""))
        {
            fresh += n;
        } else if series.starts_with("tidemark_events_skipped_total{")
            && series.contains("reason=\"duplicate\"")
        {
            duplicates += n;
        }
    }
    (fresh, duplicates)
}

/// A peer never sends a node its own events back (no echo): in a pair, with
/// both nodes writing, neither receives a single event it already holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_never_echoes_a_node_its_own_events() {
    let cluster = Cluster::start(&["sqlite", "sqlite"], Topology::Mesh).await;
    for round in 0..20u32 {
        write_everywhere(&cluster, round).await;
    }
    let snap = cluster.converged(CONVERGE).await;
    assert_eq!(snap.events.len(), 80);
    for node in &cluster.nodes {
        let (fresh, duplicates) = received(node).await;
        // Each node receives the other's 40 events, once.
        assert_eq!((fresh, duplicates), (40.0, 0.0), "{}", node.name);
    }
}

/// In a full mesh every node hears each origin directly, so once the sessions
/// are up (and each peer's list of direct origins known) nothing is relayed: an
/// event reaches every node once, from its origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_relays_nothing_a_peer_hears_directly() {
    let cluster = Cluster::start(&["sqlite", "sqlite", "sqlite"], Topology::Mesh).await;
    // Two rounds bring up every session and an ack on each of them after all
    // were up.
    for round in 0..2u32 {
        write_everywhere(&cluster, round).await;
        cluster.converged(CONVERGE).await;
    }
    let mut before = Vec::new();
    for node in &cluster.nodes {
        before.push(received(node).await);
    }
    for round in 2..12u32 {
        write_everywhere(&cluster, round).await;
    }
    cluster.converged(CONVERGE).await;
    for (node, (fresh0, dup0)) in cluster.nodes.iter().zip(before) {
        let (fresh, dup) = received(node).await;
        // 10 rounds of 2 writes on each of the 2 other nodes, each once.
        assert_eq!((fresh - fresh0, dup - dup0), (40.0, 0.0), "{}", node.name);
    }
}

/// A node that comes back is streamed to as soon as it connects: its peer's
/// sender, backing off after failing to reach it, is woken by the returning
/// node's own session instead of sleeping out its backoff. Node 0's backoff
/// here is ten minutes, so without the wake-up nothing would reach node 1
/// within the convergence timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_peer_ends_the_senders_backoff() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    for key in ["reconnect_initial_ms", "reconnect_max_ms"] {
        cluster.nodes[0].set_config("replication", key, "600000");
    }
    cluster.nodes[0].start().await;
    let id = Ulid::generate();
    cluster.nodes[0]
        .put(id, json!({"title": "written while node1 was down"}))
        .await;
    // Node 0 has failed to reach node 1 and backs off for 5 to 10 minutes.
    let deadline = std::time::Instant::now() + CONVERGE;
    while !cluster.nodes[0].log_contains("reconnecting with backoff") {
        assert!(
            std::time::Instant::now() < deadline,
            "node0 never tried node1: {}",
            cluster.nodes[0].log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.nodes[1].start().await;
    let snap = cluster.converged(CONVERGE).await;
    assert!(snap.rows.contains_key(&id.to_string()), "{:?}", snap.rows);
}

/// Peers are added and removed while the nodes run: SIGHUP reloads
/// `[[peers]]`. Node 2 starts unknown to the others and holds nothing; once
/// they list it, it catches up. Once they drop it (it is decommissioned:
/// stopped for good), `synced_at` advances on the others again, its progress
/// and its lag gauges go, and status no longer shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_added_and_removed_on_reload() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite", "sqlite"], Topology::Mesh, "test", "");
    let (id2, port2) = (cluster.nodes[2].id, cluster.nodes[2].port);
    for i in 0..2 {
        cluster.nodes[i].remove_peer(id2);
    }
    for node in cluster.nodes.iter_mut().take(2) {
        node.start().await;
    }
    write_on_first(&cluster, 0, 2).await;
    // Node 2 runs, but the others refuse its sessions and do not send to it.
    cluster.nodes[2].start().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cluster.nodes[2].reader().events().await.is_empty());

    // Added: node 2 catches up, and the others take its writes.
    for i in 0..2 {
        cluster.nodes[i].add_peer(id2, port2);
        cluster.nodes[i].reload();
    }
    write_on_first(&cluster, 1, 3).await;
    let all = cluster.converged(CONVERGE).await;
    // Two rounds: 2 writes on each of 2 nodes, then on each of 3.
    assert_eq!(all.events.len(), 4 + 6);
    let gauge = format!("tidemark_peer_unacked_events{{peer=\"{id2}\"}}");
    // Refreshed every second.
    let deadline = std::time::Instant::now() + CONVERGE;
    while cluster.nodes[0].metric(&gauge).await != Some(0.0) {
        assert!(std::time::Instant::now() < deadline, "{gauge} never 0");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Removed: node 2 stops for good; what the others write next is synced
    // once they no longer wait for it.
    cluster.nodes[2].stop();
    write_on_first(&cluster, 2, 2).await;
    for i in 0..2 {
        cluster.nodes[i].remove_peer(id2);
        cluster.nodes[i].reload();
    }
    let after = cluster.converged(CONVERGE).await;
    assert_eq!(after.events.len(), 10 + 4);
    assert_eq!(after.unsynced, 0);
    for node in cluster.nodes.iter().take(2) {
        let status = node
            .admin()
            .await
            .status(tidemark_replicator::pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let listed: Vec<String> = status.peers.iter().map(|p| p.node_id.clone()).collect();
        assert!(!listed.contains(&id2.to_string()), "{listed:?}");
        assert_eq!(listed.len(), 1, "{listed:?}");
    }
    // Its gauges are dropped once nobody sets them (the exporter's idle time):
    // lag, connection, holds, last ack, its info line. Its counters and
    // histograms stay (they count what happened).
    let peer_label = format!("peer=\"{id2}\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, metrics) = cluster.nodes[0].http_get("/metrics").await;
        let left: Vec<&str> = metrics
            .lines()
            .filter(|l| l.contains(&peer_label) && !l.contains("_total{"))
            .filter(|l| {
                !["_bucket{", "_sum{", "_count{"]
                    .iter()
                    .any(|h| l.contains(h))
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node0 still exports gauges of node2: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(cluster.nodes[0].metric(&gauge).await, None);
}
