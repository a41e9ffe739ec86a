//! Retention and leaving on whole daemons (SQLite and PostgreSQL): superseded
//! events every peer acknowledged leave the log, each record keeps its current
//! version, an event a stopped peer lacks stays until it has it, and the peer
//! then converges from what stayed; a node removed from `[[peers]]` is no
//! longer waited for; tombstones go, and a forgotten id written again is no
//! conflict anywhere.

use std::time::{Duration, Instant};

use serde_json::json;
use tidemark_replicator::pb;
use tidemark_tests::daemon::{Cluster, Topology};
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(60);

const RETENTION: &str = "[retention]\nenabled = true\nmin_age_secs = 0\nbatch = 50\nstep_pause_ms = 10\ninterval_secs = 1\n";

/// Waits until the running nodes hold the same rows and the same log, of
/// `events` events each.
async fn compacted_to(cluster: &Cluster, events: usize) -> tidemark_tests::daemon::Snapshot {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let snap = cluster.converged(CONVERGE).await;
        if snap.events.len() == events {
            return snap;
        }
        assert!(
            Instant::now() < deadline,
            "logs of {} events, not {events}, within {CONVERGE:?}",
            snap.events.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_events_go_once_every_peer_has_them() {
    let mut cluster = Cluster::prepare(&["sqlite", "postgres"], Topology::Mesh, "test", RETENTION);
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let (hot, other) = (Ulid::generate(), Ulid::generate());
    for i in 0..10 {
        cluster.nodes[0]
            .put(hot, json!({"title": format!("a{i}")}))
            .await;
    }
    for i in 0..3 {
        cluster.nodes[1]
            .put(other, json!({"title": format!("b{i}")}))
            .await;
    }
    let singles: Vec<Ulid> = (0..5).map(|_| Ulid::generate()).collect();
    for (i, id) in singles.iter().enumerate() {
        cluster.nodes[i % 2]
            .put(*id, json!({"title": format!("single {i}")}))
            .await;
    }
    // Seven records, one event each once compacted, identical on both nodes.
    let before = compacted_to(&cluster, 7).await;
    for node in &cluster.nodes {
        let compacted = node
            .metric("tidemark_events_compacted_total")
            .await
            .unwrap_or(0.0);
        assert!(compacted >= 2.0, "{}: {compacted} compacted", node.name);
    }

    // node1 stops: what it lacks stays on node0 however often compaction runs.
    cluster.nodes[1].kill();
    let mut missed = Vec::new();
    for i in 0..5 {
        let r = cluster.nodes[0]
            .put(hot, json!({"title": format!("while down {i}")}))
            .await;
        missed.push(r.event_id);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n0 = cluster.nodes[0].reader();
    for id in &missed {
        assert!(
            n0.is_unsynced(id).await,
            "{id}, which node1 lacks, left node0's log"
        );
    }
    cluster.nodes[1].start().await;
    let after = compacted_to(&cluster, 7).await;
    assert_eq!(after.rows.len(), before.rows.len());
    let hot_row = after
        .rows
        .get(&hot.to_string())
        .unwrap_or_else(|| panic!("{hot} in {:?}", after.rows));
    assert!(hot_row.contains("while down 4"), "{hot_row}");
    cluster.assert_lww().await;
}

/// Removing a node from the others' `[[peers]]` (decommission) stops them
/// waiting for it: `synced_at` advances, its progress and lag series go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_no_longer_waited_for() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite", "sqlite"], Topology::Mesh, "test", "");
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    // node2 acknowledges something before it leaves: the others record it.
    cluster.nodes[0]
        .put(Ulid::generate(), json!({"title": "before the leave"}))
        .await;
    cluster.converged(CONVERGE).await;
    cluster.nodes[2].kill();
    let mut written = Vec::new();
    for i in 0..3 {
        let r = cluster.nodes[0]
            .put(
                Ulid::generate(),
                json!({"title": format!("after the leave {i}")}),
            )
            .await;
        written.push(r.event_id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &written {
        assert!(
            cluster.nodes[0].reader().is_unsynced(id).await,
            "{id} synced while node2 lacks it"
        );
    }
    let gone = cluster.nodes[2].id;
    let series = format!("tidemark_peer_unacked_events{{peer=\"{gone}\"}}");
    let deadline = Instant::now() + CONVERGE;
    while cluster.nodes[0].metric(&series).await != Some(3.0) {
        assert!(Instant::now() < deadline, "node0 counts what node2 lacks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // node2 leaves: the others' configs no longer list it.
    for (i, other) in [(0usize, 1usize), (1, 0)] {
        let peer = (cluster.nodes[other].id, cluster.nodes[other].port);
        cluster.nodes[i].kill();
        cluster.nodes[i].write_config("test", &[peer], "");
        cluster.nodes[i].start().await;
    }
    cluster.nodes.truncate(2);
    let snap = cluster.converged(CONVERGE).await;
    assert_eq!(snap.unsynced, 0);
    for id in &written {
        assert!(snap.events.contains(id), "{id} lost");
    }
    let n0 = &cluster.nodes[0];
    assert!(
        n0.log_contains("forgot the progress of peers no longer configured"),
        "{}",
        n0.log_tail(30)
    );
    assert_eq!(
        n0.metric(&series).await,
        None,
        "a lag series for the removed node"
    );
    let progress: Vec<(i64,)> = n0
        .reader()
        .fetch_all(&format!(
            "SELECT COUNT(*) FROM tidemark_peer_progress WHERE peer_id = '{gone}'"
        ))
        .await;
    assert_eq!(progress, vec![(0,)], "the removed node's progress is kept");
}

/// A peer away longer than `retention.max_peer_absence_secs` is released:
/// `synced_at` and compaction go on without it (a metric and a warning say
/// so); once it is back it is waited for again and converges from what stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_away_too_long_is_released_and_converges_when_back() {
    let extra = format!("{RETENTION}max_peer_absence_secs = 2\n");
    let mut cluster = Cluster::prepare(&["sqlite", "postgres"], Topology::Mesh, "test", &extra);
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let hot = Ulid::generate();
    cluster.nodes[0].put(hot, json!({"title": "before"})).await;
    compacted_to(&cluster, 1).await;
    let away = cluster.nodes[1].id;
    cluster.nodes[1].kill();
    let mut written = Vec::new();
    for i in 0..5 {
        let r = cluster.nodes[0]
            .put(hot, json!({"title": format!("while away {i}")}))
            .await;
        written.push(r.event_id);
    }
    let n0 = &cluster.nodes[0];
    let released = format!("tidemark_peer_released{{peer=\"{away}\"}}");
    let deadline = Instant::now() + CONVERGE;
    loop {
        let log = n0.reader().events().await;
        let synced = {
            let mut all = true;
            for id in &written {
                all &= !n0.reader().is_unsynced(id).await;
            }
            all
        };
        if n0.metric(&released).await == Some(1.0) && synced && log.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node1 released, node0's events synced and compacted to one within {CONVERGE:?}: released {:?}, synced {synced}, log {}",
            n0.metric(&released).await,
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        n0.log_contains("peer disconnected longer than retention.max_peer_absence_secs: released")
    );

    // Back: waited for again, and it converges from the current version.
    cluster.nodes[1].start().await;
    let snap = compacted_to(&cluster, 1).await;
    assert!(
        snap.rows[&hot.to_string()].contains("while away 4"),
        "{:?}",
        snap.rows
    );
    let deadline = Instant::now() + CONVERGE;
    while cluster.nodes[0].metric(&released).await != Some(0.0) {
        assert!(Instant::now() < deadline, "node1 still released once back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = cluster.nodes[0]
        .put(Ulid::generate(), json!({"title": "waited for again"}))
        .await;
    cluster.converged(CONVERGE).await;
    assert!(!cluster.nodes[0].reader().is_unsynced(&after.event_id).await);
    // Waited for again: gone anew, its next event stays unsynced until it has
    // been away the whole limit (2 s) again, however soon node0 looks.
    cluster.nodes[1].kill();
    let lacked = cluster.nodes[0]
        .put(Ulid::generate(), json!({"title": "node1 lacks this"}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        cluster.nodes[0]
            .reader()
            .is_unsynced(&lacked.event_id)
            .await,
        "an event a peer lacks was marked synced before the peer was away for the limit"
    );
}

/// Tombstones go once every peer acknowledged the delete and it is old enough
/// (at once here) on a node that collects them; its peer keeps its own
/// (`keep_tombstones`). A forgotten id written again on the collecting node is
/// the delete's successor on both: no conflict, even under `manual`, and the
/// kept deletes then leave the peer's log as superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_go_and_a_forgotten_id_is_written_again_without_conflict() {
    let extra = format!("{RETENTION}tombstone_min_age_secs = 0\n");
    let mut cluster = Cluster::prepare(&["sqlite", "postgres"], Topology::Mesh, "test", &extra);
    cluster.nodes[1].set_config("retention", "keep_tombstones", "true");
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    cluster.converged(CONVERGE).await;
    cluster.nodes[0]
        .admin()
        .await
        .set_policy(pb::SetPolicyRequest {
            table: "notes".into(),
            conflict_policy: "manual".into(),
        })
        .await
        .expect("set policy");
    let ids: Vec<Ulid> = (0..6).map(|_| Ulid::generate()).collect();
    for (i, id) in ids.iter().enumerate() {
        cluster.nodes[i % 2]
            .put(*id, json!({"title": format!("r{i}"), "stars": i}))
            .await;
    }
    cluster.converged(CONVERGE).await;
    // Each deleted on the node that did not write it, then a live record per
    // node, so no delete is its origin's newest event.
    for (i, id) in ids.iter().enumerate() {
        cluster.nodes[(i + 1) % 2].delete(*id).await;
    }
    for node in &cluster.nodes {
        node.put(Ulid::generate(), json!({"title": "live"})).await;
    }
    // node0: the policy event and the two live records stay; node1 keeps the
    // six deletes besides.
    let deadline = Instant::now() + CONVERGE;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    const TOMBSTONES: &str =
        "SELECT COUNT(*) FROM tidemark_record_versions WHERE table_name = 'notes' AND deleted";
    let count = async |node: &tidemark_tests::daemon::TestNode, sql: &str| {
        let (n,): (i64,) = node.reader().fetch_all(sql).await[0];
        n
    };
    loop {
        let logs = (
            n0.reader().events().await.len(),
            n1.reader().events().await.len(),
        );
        let collected = n0
            .metric("tidemark_tombstones_compacted_total")
            .await
            .unwrap_or(0.0);
        if logs == (2, 8) && collected == 6.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node0 collects the six tombstones, node1 keeps them, within {CONVERGE:?}: logs of notes {logs:?}, collected {collected}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(count(n1, TOMBSTONES).await, 6, "node1 keeps its tombstones");
    assert_eq!(count(n0, TOMBSTONES).await, 0, "node0 forgot them");
    assert_eq!(
        n1.metric("tidemark_tombstones_compacted_total")
            .await
            .unwrap_or(0.0),
        0.0
    );

    // The ids written again where they are forgotten.
    for (i, id) in ids.iter().enumerate() {
        n0.put(*id, json!({"title": format!("again {i}")})).await;
    }
    let snap = compacted_to(&cluster, 2 + 6 + 1).await;
    for (i, id) in ids.iter().enumerate() {
        let row = snap.rows.get(&id.to_string()).expect("written again");
        assert!(row.contains(&format!("again {i}")), "{row}");
    }
    for node in &cluster.nodes {
        assert_eq!(
            count(node, "SELECT COUNT(*) FROM tidemark_conflicts").await,
            0,
            "{}: a forgotten id written again is no conflict",
            node.name
        );
    }
}
