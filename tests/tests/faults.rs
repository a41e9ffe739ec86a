//! Faults on real daemon processes: kill -9 in the middle of streaming, and a
//! receiver whose database is locked by another writer. Checked after every
//! fault: every event committed anywhere reaches every node exactly once, every
//! node holds the same rows and the same log, rows equal the last-writer-wins
//! result of the log, and the database passes its integrity check.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tidemark_replicator::pb::{self, records_client::RecordsClient};
use tidemark_tests::TestDb;
use tidemark_tests::daemon::{Cluster, TestNode, Topology};
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(90);

fn integrity_ok(node: &TestNode) {
    if let TestDb::Sqlite { .. } = node.db {
        assert_eq!(
            node.db.sql("PRAGMA integrity_check"),
            "ok",
            "{} integrity",
            node.name
        );
    }
}

/// Puts `n` records through `url`, skipping writes the node refuses while down;
/// returns the event ids of the writes that succeeded.
async fn writer(url: String, n: usize, tag: &'static str) -> Vec<String> {
    let mut done = Vec::new();
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
        match c
            .put(pb::PutRequest {
                table: "notes".into(),
                id: id.to_string(),
                values_json: json!({"title": format!("{tag} {i}"), "stars": i}).to_string(),
            })
            .await
        {
            Ok(r) => done.push(r.into_inner().event_id),
            Err(_) => client = None,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done
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
        integrity_ok(&cluster.nodes[victim]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.nodes[victim].start().await;
    }
    let mut written = w0.await.expect("writer 0");
    written.extend(w1.await.expect("writer 1"));
    let snap = cluster.converged(CONVERGE).await;
    // Every acknowledged write is an event on every node, exactly once; nothing else.
    let mut expected = written.clone();
    expected.sort();
    expected.dedup();
    assert_eq!(
        expected.len(),
        written.len(),
        "an event id was issued twice"
    );
    assert_eq!(snap.events, expected, "events lost or invented");
    cluster.assert_lww().await;
    for node in &cluster.nodes {
        integrity_ok(node);
    }
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
    cluster.assert_lww().await;
    for node in &cluster.nodes {
        integrity_ok(node);
    }
}
