//! Faults on real daemon processes: kill -9 in the middle of streaming, kill -9
//! at precise points of the protocol (after a batch committed but before its ack
//! was sent; after the ack was recorded but before `synced_at` was set), a
//! receiver whose database is locked by another writer, and a receiver whose
//! disk is full. Checked after every fault (tests/src/check.rs): every event
//! committed anywhere reaches every node exactly once, per origin with no gaps;
//! every node holds the same state; rows equal the last-writer-wins result of
//! the union of all events; the database passes its integrity check.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tidemark_replicator::pb::{self, records_client::RecordsClient};
use tidemark_tests::daemon::{Cluster, Reader, TestNode, Topology};
use tidemark_tests::{TestDb, check};
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(90);

/// What a writer learned: the event ids of the writes a node acknowledged, and
/// the titles of the writes whose outcome it never learned (the call failed,
/// possibly after the node committed the write but before it answered).
#[derive(Default)]
struct Written {
    acknowledged: Vec<String>,
    unknown: Vec<String>,
}

/// Puts `n` records through `url`, skipping writes the node refuses while down.
async fn writer(url: String, n: usize, tag: &'static str) -> Written {
    let mut out = Written::default();
    let mut client = None;
    for i in 0..n {
        if client.is_none() {
            client = RecordsClient::connect(url.clone()).await.ok();
        }
        let Some(c) = client.as_mut() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        // A few records written many times: updates race across nodes.
        let id = Ulid::from_parts(1_764_000_000_000, (i % 7) as u128 + 1);
        let title = format!("{tag} {i}");
        match c
            .put(pb::PutRequest {
                table: "notes".into(),
                id: id.to_string(),
                values_json: json!({"title": title, "stars": i}).to_string(),
            })
            .await
        {
            Ok(r) => out.acknowledged.push(r.into_inner().event_id),
            Err(_) => {
                out.unknown.push(title);
                client = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_streaming_loses_and_doubles_nothing() {
    let mut cluster = Cluster::start(&["sqlite", "sqlite", "sqlite"], Topology::Mesh).await;
    let w0 = tokio::spawn(writer(cluster.nodes[0].grpc_url(), 300, "node0"));
    let w1 = tokio::spawn(writer(cluster.nodes[1].grpc_url(), 300, "node1"));
    // Kill node2 (a receiver) and node1 (a writer and receiver) at varying points
    // of the stream: between applying and acknowledging, between acknowledging and
    // marking synced, in the middle of a batch.
    for round in 0..4u64 {
        tokio::time::sleep(Duration::from_millis(150 + 97 * round)).await;
        let victim = if round % 2 == 0 { 2 } else { 1 };
        cluster.nodes[victim].kill();
        check::assert_integrity(&cluster.nodes[victim]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.nodes[victim].start().await;
    }
    let w0 = w0.await.expect("writer 0");
    let w1 = w1.await.expect("writer 1");
    let mut written = w0.acknowledged;
    written.extend(w1.acknowledged);
    let unknown: Vec<String> = w0.unknown.into_iter().chain(w1.unknown).collect();
    let snap = cluster.converged(CONVERGE).await;
    // Every acknowledged write is an event on every node, exactly once.
    let mut expected = written.clone();
    expected.sort();
    expected.dedup();
    assert_eq!(
        expected.len(),
        written.len(),
        "an event id was issued twice"
    );
    let lost: Vec<&String> = expected
        .iter()
        .filter(|e| snap.events.binary_search(e).is_err())
        .collect();
    assert!(lost.is_empty(), "acknowledged events lost: {lost:?}");
    // Nothing else, except a write committed by a node killed before it could
    // answer: at most one event for each write whose call failed.
    let mut extras = Vec::new();
    for (_, _, _, event, _, values) in cluster.nodes[0].reader().events().await {
        if expected.binary_search(&event).is_ok() {
            continue;
        }
        let values = values.unwrap_or_default();
        let title = unknown
            .iter()
            .find(|t| values.contains(&format!("\"{t}\"")))
            .unwrap_or_else(|| panic!("event {event} invented: {values}"));
        extras.push(title.clone());
    }
    let n = extras.len();
    extras.sort();
    extras.dedup();
    assert_eq!(n, extras.len(), "a write whose call failed applied twice");
    assert_eq!(
        snap.events.len(),
        expected.len() + n,
        "events outside notes"
    );
    check::after_heal(&cluster, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_receiver_rolls_back_backs_off_and_catches_up() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    // node1 gives up quickly on a locked database.
    let path = cluster.nodes[1].config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        text.replacen("[store]\n", "[store]\nbusy_timeout_ms = 100\n", 1),
    )
    .expect("config");
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let TestDb::Sqlite { path: db_path, .. } = &cluster.nodes[1].db else {
        unreachable!("sqlite");
    };
    // Another writer holds node1's database.
    let mut holder = Command::new("sqlite3")
        .arg(db_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sqlite3");
    let mut stdin = holder.stdin.take().expect("stdin");
    writeln!(stdin, "BEGIN EXCLUSIVE;").expect("lock");
    stdin.flush().expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = Ulid::generate();
        cluster.nodes[0]
            .put(id, json!({"title": format!("while locked {i}")}))
            .await;
        ids.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.nodes[1].log_contains("database is locked") {
        assert!(Instant::now() < deadline, "node1 never hit the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still up, nothing applied while locked.
    assert!(cluster.nodes[1].http_get("/healthz").await.0 == 200);
    writeln!(stdin, "COMMIT;").expect("unlock");
    drop(stdin);
    let _ = holder.wait();
    let snap = cluster.converged(CONVERGE).await;
    for id in ids {
        assert!(snap.rows.contains_key(&id.to_string()));
    }
    check::after_heal(&cluster, &[]).await;
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scalar(reader: &Reader, sql: &'static str, binds: &[&str]) -> Option<i64> {
    match reader {
        Reader::Sqlite(p) => {
            let mut q = sqlx::query_as::<_, (i64,)>(sql);
            for b in binds {
                q = q.bind(b.to_string());
            }
            q.fetch_optional(p).await
        }
        Reader::Postgres(p) => {
            let mut q = sqlx::query_as::<_, (i64,)>(sql);
            for b in binds {
                q = q.bind(b.to_string());
            }
            q.fetch_optional(p).await
        }
    }
    .expect("query")
    .map(|r| r.0)
}

/// How many of its events `node` counts `peer` as lacking: from the acks it
/// holds in memory, persisted or not yet (Admin status reads them live).
async fn unacked(node: &TestNode, peer: &TestNode) -> u64 {
    let status = node
        .admin()
        .await
        .status(pb::StatusRequest {})
        .await
        .unwrap_or_else(|s| panic!("status of {}: {s}", node.name))
        .into_inner();
    let peer = peer.id.to_string();
    status
        .peers
        .iter()
        .find(|p| p.node_id == peer)
        .unwrap_or_else(|| panic!("{peer} in the status of {}", node.name))
        .unacked_events
}

async fn holds(node: &TestNode, event_id: &str) -> bool {
    scalar(
        node.reader(),
        "SELECT COUNT(*) FROM change_events WHERE event_id = $1",
        &[event_id],
    )
    .await
        == Some(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_apply_and_ack_redelivery_is_a_no_op() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite", "sqlite"], Topology::Mesh, "test", "");
    // node1 stops after committing each batch, before acknowledging it.
    cluster.nodes[1].env = vec![("TIDEMARK_TEST_PAUSE_AFTER_APPLY_MS".into(), "120000".into())];
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let mut written = Vec::new();
    for i in 0..5 {
        let r = cluster.nodes[0]
            .put(
                Ulid::generate(),
                json!({"title": format!("before kill {i}")}),
            )
            .await;
        written.push((r.event_id, r.hlc));
    }
    let (first, _) = written[0].clone();
    // node1 committed node0's first event (from node0, or relayed by node2
    // before it learned that node0 reaches node1 itself) ...
    wait_for("node1 applies node0's first event", async || {
        holds(&cluster.nodes[1], &first).await
    })
    .await;
    // ... but no ack left node1: node0 does not count node1 as having the events.
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(
        unacked(n0, n1).await,
        5,
        "node0 recorded an ack node1 never sent"
    );
    assert!(n0.reader().is_unsynced(&first).await);
    cluster.nodes[1].kill();
    check::assert_integrity(&cluster.nodes[1]).await;
    cluster.nodes[1].env.clear();
    cluster.nodes[1].start().await;
    let snap = cluster.converged(CONVERGE).await;
    // node1's vector told every sender it has the events: nothing lost, nothing
    // doubled, and node0 marked them synced from node1's new welcome.
    let mut expected: Vec<String> = written.iter().map(|w| w.0.clone()).collect();
    expected.sort();
    assert_eq!(snap.events, expected, "events lost or doubled");
    assert_eq!(snap.rows.len(), 5);
    let ids: Vec<String> = written.into_iter().map(|w| w.0).collect();
    check::after_heal(&cluster, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_ack_and_synced_at_loses_nothing() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    // node0 holds acks in memory at once but waits before the pass that
    // persists them and marks synced_at.
    cluster.nodes[0].env = vec![(
        "TIDEMARK_TEST_PAUSE_BEFORE_SYNC_MARK_MS".into(),
        "120000".into(),
    )];
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = cluster.nodes[0]
            .put(Ulid::generate(), json!({"title": format!("acked {i}")}))
            .await;
        ids.push(r.event_id);
    }
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    wait_for("node0 records node1's ack", async || {
        unacked(n0, n1).await == 0
    })
    .await;
    for id in &ids {
        assert!(
            n0.reader().is_unsynced(id).await,
            "{id} synced during the pause"
        );
    }
    cluster.nodes[0].kill();
    check::assert_integrity(&cluster.nodes[0]).await;
    cluster.nodes[0].env.clear();
    cluster.nodes[0].start().await;
    let snap = cluster.converged(CONVERGE).await;
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(snap.events, expected, "events lost or doubled");
    check::after_heal(&cluster, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_receiver_rolls_back_backs_off_and_catches_up() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    cluster.nodes[0]
        .put(Ulid::generate(), json!({"title": "before the disk fills"}))
        .await;
    cluster.converged(CONVERGE).await;
    // node1's database may not grow by a single page.
    cluster.nodes[1].stop();
    let pages: u32 = cluster.nodes[1]
        .db
        .sql("PRAGMA page_count")
        .parse()
        .expect("page count");
    cluster.nodes[1].set_config("store", "sqlite_max_page_count", &pages.to_string());
    cluster.nodes[1].start().await;
    let body = "x".repeat(4000);
    let mut ids = Vec::new();
    for i in 0..40 {
        let r = cluster.nodes[0]
            .put(
                Ulid::generate(),
                json!({"title": format!("big {i}"), "body": body}),
            )
            .await;
        ids.push(r.event_id);
    }
    wait_for("node1 runs out of space", async || {
        cluster.nodes[1].log_contains("disk is full")
    })
    .await;
    wait_for("node0 backs off", async || {
        cluster.nodes[0].log_contains("reconnecting with backoff")
    })
    .await;
    // Up, nothing of the refused batches half-applied, nothing quarantined.
    let n1 = &cluster.nodes[1];
    assert_eq!(n1.http_get("/healthz").await.0, 200);
    for id in &ids {
        assert!(!holds(n1, id).await, "{id} applied on a full disk");
        assert!(cluster.nodes[0].reader().is_unsynced(id).await);
    }
    assert_eq!(n1.db.sql("SELECT COUNT(*) FROM tidemark_quarantine"), "0");
    assert_eq!(n1.db.sql("SELECT COUNT(*) FROM notes"), "1");
    check::assert_integrity(n1).await;
    check::assert_prefixes(&cluster.nodes).await;
    // Room again: node1 catches up.
    cluster.nodes[1].stop();
    cluster.nodes[1].set_config("store", "sqlite_max_page_count", "0");
    cluster.nodes[1].start().await;
    let snap = cluster.converged(CONVERGE).await;
    assert_eq!(snap.rows.len(), 41);
    check::after_heal(&cluster, &ids).await;
}

/// A node whose database is restored from an older copy (its latest events
/// exist only at its peers) gets them back from its peers, stamps its new
/// events after them, and the cluster converges with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_an_older_copy_gets_its_events_back() {
    let mut c = Cluster::start(&["sqlite", "sqlite"], Topology::Mesh).await;
    let put = async |node: &TestNode, title: &str| {
        node.put(Ulid::generate(), json!({"title": title})).await;
    };
    for i in 0..5 {
        put(&c.nodes[0], &format!("before {i}")).await;
    }
    c.converged(CONVERGE).await;
    let backup = c.nodes[0].dir.join("node0-backup.db");
    c.nodes[0].db.sql(&format!(".backup {}", backup.display()));
    // Events made after the copy: they reach the peer, then the node's database
    // is rolled back to the copy.
    for i in 0..5 {
        put(&c.nodes[0], &format!("after {i}")).await;
    }
    let full = c.converged(CONVERGE).await;
    assert_eq!(full.rows.len(), 10);
    c.nodes[0].stop();
    c.nodes[0].db.sql(&format!(".restore {}", backup.display()));
    assert_eq!(c.nodes[0].reader().rows().await.len(), 5, "restored copy");
    c.nodes[0].start().await;
    put(&c.nodes[0], "restored").await;
    let end = c.converged(CONVERGE).await;
    assert_eq!(end.rows.len(), 11, "{:?}", end.rows);
    assert_eq!(end.events.len(), full.events.len() + 1, "one new event");
    assert!(
        full.events.iter().all(|e| end.events.contains(e)),
        "an event was lost"
    );
    assert!(c.nodes[0].log_contains("the peer holds events of this node that its own log lacks"));
    c.assert_lww().await;
}
