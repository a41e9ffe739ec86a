//! The replication protocol against a real daemon, driven by a raw gRPC client
//! playing the sender: handshake refusals, replayed and reordered batches,
//! malformed and oversized input.

use std::time::Duration;

use serde_json::json;
use tidemark_hlc::Hlc;
use tidemark_replicator::pb::{
    self, receiver_message, replication_client::ReplicationClient, sender_message,
};
use tidemark_tests::daemon::{Cluster, TestNode, Topology, notes_schema};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use ulid::Ulid;

/// A session opened by the test as a sender.
struct RawSession {
    tx: mpsc::Sender<pb::SenderMessage>,
    rx: Streaming<pb::ReceiverMessage>,
    welcome: pb::Welcome,
    next_batch: u64,
}

/// The node id the test's raw sessions claim: every node under test lists it in
/// `[[peers]]` (a node refuses sessions from ids it does not list).
const RAW_SENDER: Ulid = Ulid::from_parts(0x0190_0000_0000, 0x7e57);

fn hello(node: &TestNode) -> pb::Hello {
    pb::Hello {
        protocol_version: tidemark_replicator::PROTOCOL_VERSION,
        cluster_id: "test".into(),
        sender_node_id: RAW_SENDER.to_string(),
        receiver_node_id: node.id.to_string(),
        tables: notes_schema(),
        hlc: Hlc::at_wall_ms(tidemark_hlc::system_wall_ms())
            .expect("hlc")
            .encode(),
        // One instance, like one daemon process: its sessions may overlap.
        instance_id: RAW_SENDER.to_string(),
        receiver_origin_hlc: 0,
        compacted: None,
    }
}

async fn open(node: &TestNode, hello: pb::Hello) -> Result<RawSession, Status> {
    let mut client = ReplicationClient::connect(node.grpc_url())
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::SenderMessage {
        kind: Some(sender_message::Kind::Hello(hello)),
    })
    .await
    .expect("queue hello");
    let mut rx = client
        .replicate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let welcome = match rx.message().await?.and_then(|m| m.kind) {
        Some(receiver_message::Kind::Welcome(w)) => w,
        other => panic!("expected welcome, got {other:?}"),
    };
    Ok(RawSession {
        tx,
        rx,
        welcome,
        next_batch: 0,
    })
}

impl RawSession {
    async fn send(&mut self, events: Vec<pb::Event>) -> Result<pb::Ack, Status> {
        self.next_batch += 1;
        self.tx
            .send(pb::SenderMessage {
                kind: Some(sender_message::Kind::Batch(pb::Batch {
                    batch_id: self.next_batch,
                    events,
                })),
            })
            .await
            .expect("queue batch");
        match self.rx.message().await?.and_then(|m| m.kind) {
            Some(receiver_message::Kind::Ack(a)) => {
                assert_eq!(a.batch_id, self.next_batch);
                Ok(a)
            }
            other => panic!("expected ack for batch {}, got {other:?}", self.next_batch),
        }
    }
}

fn event(
    origin: Ulid,
    offset_ms: i64,
    counter: u16,
    record: Ulid,
    op: pb::Operation,
    values: Option<serde_json::Value>,
) -> pb::Event {
    let hlc = Hlc::from_parts(tidemark_hlc::system_wall_ms() + offset_ms, counter).expect("hlc");
    pb::Event {
        event_id: Ulid::generate().to_string(),
        hlc: hlc.encode(),
        wall_ms: hlc.wall_ms(),
        node_id: origin.to_string(),
        table_name: "notes".into(),
        record_id: record.to_string(),
        operation: op as i32,
        action: None,
        user_id: None,
        old_values_json: None,
        // An event carries the whole row: columns not given are NULL.
        new_values_json: values.map(|given| {
            let mut row =
                json!({"id": record.to_string(), "title": null, "body": null, "stars": null});
            if let (Some(row), Some(given)) = (row.as_object_mut(), given.as_object()) {
                row.extend(given.clone());
            }
            row.to_string()
        }),
        metadata_json: Some(json!({"vv": {origin.to_string(): hlc.encode()}}).to_string()),
    }
}

async fn single_node(extra: &str) -> Cluster {
    let mut c = Cluster::prepare(&["sqlite"], Topology::Mesh, "test", extra);
    c.nodes[0].add_raw_peer(RAW_SENDER);
    c.nodes[0].start().await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_mismatches_are_refused_with_clear_errors() {
    let c = single_node("").await;
    let node = &c.nodes[0];
    type Mutation = Box<dyn Fn(&mut pb::Hello)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|h| h.cluster_id = "other".into()),
            "cluster id mismatch: sender is in cluster \"other\"",
        ),
        (
            Box::new(|h| h.protocol_version = tidemark_replicator::PROTOCOL_VERSION + 1),
            "is not supported: node",
        ),
        (
            Box::new(|h| h.receiver_node_id = Ulid::generate().to_string()),
            "wrong node: sender expected node",
        ),
        (
            Box::new(|h| h.tables.clear()),
            "table notes is replicated here but not by the peer",
        ),
        (
            Box::new(|h| h.tables[0].columns.push("extra".into())),
            "table notes has columns (id, title, body, stars) here but (id, title, body, stars, extra) at the peer",
        ),
        (
            Box::new(|h| {
                h.tables[0].column_types[3] = "int32".into();
                h.tables[0].declared_types[3] = "integer".into();
                h.tables[0].backend = "postgres".into();
            }),
            "table notes column stars is int64 (INTEGER on sqlite) here but int32 (integer on postgres) at the peer",
        ),
    ];
    for (mutate, expect) in cases {
        let mut h = hello(node);
        mutate(&mut h);
        let status = open(node, h)
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted: {expect}"));
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(expect),
            "{expect}: {}",
            status.message()
        );
    }
    let mut h = hello(node);
    h.sender_node_id = "not-a-ulid".into();
    let status = open(node, h).await.err().expect("bad sender id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("hello.sender_node_id"),
        "{}",
        status.message()
    );
    // In plaintext too, a node id not in [[peers]] is refused.
    let stranger = Ulid::generate();
    let mut h = hello(node);
    h.sender_node_id = stranger.to_string();
    let status = open(node, h).await.err().expect("unconfigured sender");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "node {stranger} is not a configured peer of node {}",
            node.id
        )),
        "{}",
        status.message()
    );
    // The node logged why and stayed up.
    assert!(node.log_contains("handshake refused"));
    open(node, hello(node))
        .await
        .expect("a correct hello is still accepted");
}

/// Two live daemons claiming one node id (a copied config) are told apart by
/// their instance ids: the second is refused while the first is connected, and
/// accepted once the first has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_of_a_node_id_is_refused_while_the_first_is_live() {
    let c = single_node("").await;
    let node = &c.nodes[0];
    let first = hello(node);
    let session = open(node, first.clone()).await.expect("first instance");
    // The same instance may open another connection (a reconnect that overlaps).
    let again = open(node, first.clone())
        .await
        .expect("same instance again");
    let mut twin = first.clone();
    twin.instance_id = Ulid::generate().to_string();
    let status = open(node, twin.clone())
        .await
        .err()
        .expect("a second instance is refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "node {} is already connected from another running daemon (instance {}",
            first.sender_node_id, first.instance_id
        )),
        "{}",
        status.message()
    );
    // Once the first instance's connections are closed, the other is accepted.
    drop(session);
    drop(again);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match open(node, twin.clone()).await {
            Ok(_) => break,
            Err(status) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still refused after the first instance left: {status:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_reordered_batches_change_nothing() {
    let mut c = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    for node in c.nodes.iter_mut() {
        node.add_raw_peer(RAW_SENDER);
        node.start().await;
    }
    // The two nodes are peers, but this test feeds them the same events from
    // outside in different orders and compares.
    let (x, y) = (Ulid::from_parts(1, 0xA), Ulid::from_parts(1, 0xB));
    let (r1, r2, r3) = (Ulid::generate(), Ulid::generate(), Ulid::generate());
    let ex = vec![
        event(
            x,
            -3_000,
            0,
            r1,
            pb::Operation::Insert,
            Some(json!({"title": "x1"})),
        ),
        event(
            x,
            -2_000,
            0,
            r1,
            pb::Operation::Update,
            Some(json!({"title": "x2"})),
        ),
        event(
            x,
            -1_500,
            0,
            r2,
            pb::Operation::Insert,
            Some(json!({"title": "x3"})),
        ),
        event(
            x,
            -1_000,
            0,
            r3,
            pb::Operation::Insert,
            Some(json!({"title": "x4"})),
        ),
    ];
    let ey = vec![
        event(
            y,
            -2_500,
            0,
            r1,
            pb::Operation::Update,
            Some(json!({"title": "y1"})),
        ),
        event(y, -1_200, 0, r2, pb::Operation::Delete, None),
        event(
            y,
            -500,
            0,
            r3,
            pb::Operation::Update,
            Some(json!({"title": "y3"})),
        ),
    ];
    let a = &c.nodes[0];
    let mut s = open(a, hello(a)).await.expect("session a");
    let ack = s.send(ex.clone()).await.expect("x batch");
    assert_eq!((ack.applied, ack.duplicates), (4, 0));
    let ack = s.send(ey.clone()).await.expect("y batch");
    assert_eq!(ack.applied + ack.superseded, 3);
    let before = a.reader().rows().await;
    // Replays: the same batches again, and overlapping ones.
    let ack = s.send(ex.clone()).await.expect("replay");
    assert_eq!((ack.applied, ack.superseded, ack.duplicates), (0, 0, 4));
    let ack = s
        .send(vec![ex[2].clone(), ex[3].clone(), ey[0].clone()])
        .await
        .expect("overlap");
    assert_eq!(ack.duplicates, 3);
    assert_eq!(a.reader().rows().await, before);

    // Node b: origin y first, then x, in small overlapping batches.
    let b = &c.nodes[1];
    let mut s = open(b, hello(b)).await.expect("session b");
    s.send(ey.clone()).await.expect("y");
    s.send(vec![ex[0].clone()]).await.expect("x0");
    s.send(vec![ex[0].clone(), ex[1].clone()])
        .await
        .expect("x0-1");
    s.send(vec![ex[1].clone(), ex[2].clone(), ex[3].clone()])
        .await
        .expect("x1-3");
    assert_eq!(b.reader().rows().await, before);
    // Expected winners: r1 = x2 (newest), r2 deleted by y, r3 = y3.
    assert!(before[&r1.to_string()].contains("\"x2\""));
    assert!(!before.contains_key(&r2.to_string()));
    assert!(before[&r3.to_string()].contains("\"y3\""));
    // The raw sender leaves the cluster; the nodes then settle with each other.
    for node in c.nodes.iter_mut() {
        node.stop();
        node.remove_peer(RAW_SENDER);
        node.start().await;
    }
    c.converged(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_hold_only_their_origin_and_the_stream_goes_on() {
    let c = single_node("[clock]\nmax_drift_ms = 1000\n").await;
    let node = &c.nodes[0];
    let x = Ulid::from_parts(1, 0xA);
    let r = Ulid::generate();
    let good = event(
        x,
        -100,
        0,
        r,
        pb::Operation::Insert,
        Some(json!({"title": "ok"})),
    );

    let mut bad_id = event(
        x,
        -95,
        0,
        r,
        pb::Operation::Update,
        Some(json!({"title": "x"})),
    );
    bad_id.record_id = "01ARZ3NDEK".into();
    let mut bad_json = event(x, -90, 0, r, pb::Operation::Update, None);
    bad_json.new_values_json = Some("{\"title\": ".into());
    let mut bad_op = event(
        x,
        -80,
        0,
        r,
        pb::Operation::Update,
        Some(json!({"title": "x"})),
    );
    bad_op.operation = 7;
    let unknown_table = {
        let mut e = event(
            x,
            -70,
            0,
            r,
            pb::Operation::Update,
            Some(json!({"title": "x"})),
        );
        e.table_name = "secrets".into();
        e
    };
    let unknown_column = event(
        x,
        -60,
        0,
        r,
        pb::Operation::Update,
        Some(json!({"title": "x", "is_admin": true})),
    );
    let sql_column = event(
        x,
        -55,
        0,
        r,
        pb::Operation::Update,
        Some(json!({"title\" = 'x'; DROP TABLE notes; --": 1})),
    );
    let wrong_type = event(
        x,
        -50,
        0,
        r,
        pb::Operation::Update,
        Some(json!({"title": {"nested": [1, 2, 3]}, "stars": "many"})),
    );
    let mut deep = event(x, -45, 0, r, pb::Operation::Update, None);
    deep.new_values_json = Some(format!(
        "{{\"title\": {}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    ));
    let mut max_hlc = event(
        x,
        -40,
        0,
        Ulid::generate(),
        pb::Operation::Insert,
        Some(json!({"title": "max"})),
    );
    max_hlc.hlc = i64::MAX;
    let mut no_origin = event(
        x,
        -35,
        0,
        r,
        pb::Operation::Update,
        Some(json!({"title": "x"})),
    );
    no_origin.node_id = "not an origin".into();
    let cases: Vec<(pb::Event, &str, &str)> = vec![
        (
            bad_id,
            "INVALID_ARGUMENT",
            "record_id: \"01ARZ3NDEK\" is not a ULID",
        ),
        (
            bad_json,
            "INVALID_ARGUMENT",
            "new_values_json: malformed JSON",
        ),
        (bad_op, "INVALID_ARGUMENT", "operation: 7 is not one of"),
        (
            unknown_table,
            "NOT_FOUND",
            "table \"secrets\" is not a replicated table",
        ),
        (
            unknown_column,
            "INVALID_ARGUMENT",
            "has no replicated column \"is_admin\"",
        ),
        (sql_column, "INVALID_ARGUMENT", "has no replicated column"),
        (
            deep,
            "INVALID_ARGUMENT",
            "new_values_json: malformed JSON: recursion limit exceeded",
        ),
        (max_hlc, "OUT_OF_RANGE", "no clock drift explains it"),
        // A value outside its column's class holds its origin on SQLite too (as
        // on PostgreSQL), never stored as SQLite's dynamic typing would take it.
        (
            wrong_type,
            "INVALID_ARGUMENT",
            "table notes column stars (int64): expected an integer, found a string",
        ),
    ];
    let mut s = open(node, hello(node)).await.expect("session");
    let ack = s.send(vec![good.clone()]).await.expect("good");
    assert_eq!(ack.applied, 1);
    let schema_before = node.db.sql("SELECT sql FROM sqlite_master ORDER BY name");
    let rows_before = node.reader().rows().await;
    for (n, (mut bad, code, expect)) in cases.into_iter().enumerate() {
        // Each bad event from an origin of its own: a held origin's later events
        // in the same session wait with it. The session goes on after each.
        bad.node_id = Ulid::from_parts(2, n as u128).to_string();
        let ack = s.send(vec![bad.clone()]).await.expect(expect);
        assert!(ack.rejected.is_empty(), "{expect}: {:?}", ack.rejected);
        assert_eq!(ack.held.len(), 1, "{expect}");
        let h = &ack.held[0];
        assert_eq!(
            (h.origin.as_str(), h.event_id.as_str(), h.code.as_str()),
            (bad.node_id.as_str(), bad.event_id.as_str(), code),
            "{expect}"
        );
        assert!(h.message.contains(expect), "{expect}: {}", h.message);
        assert!(h.retry_after_ms > 0);
        assert_eq!(ack.applied, 0, "{expect}");
    }
    // An event with no origin to hold is set aside in the quarantine.
    let ack = s.send(vec![no_origin.clone()]).await.expect("no origin");
    assert_eq!(ack.rejected.len(), 1, "{:?}", ack.rejected);
    assert_eq!(
        (
            ack.rejected[0].event_id.as_str(),
            ack.rejected[0].code.as_str()
        ),
        (no_origin.event_id.as_str(), "INVALID_ARGUMENT")
    );
    // Schema untouched, nothing lost or half-applied.
    assert_eq!(
        node.db.sql("SELECT sql FROM sqlite_master ORDER BY name"),
        schema_before
    );
    assert_eq!(node.reader().rows().await, rows_before);
    assert_eq!(rows_before.len(), 1);
    assert_eq!(node.db.sql("SELECT COUNT(*) FROM tidemark_quarantine"), "1");
    assert!(node.log_contains("origin held"));
    assert!(node.log_contains("event quarantined"));

    // A timestamp beyond the max drift (but not absurd) holds its origin: what
    // came before it applies, its later events wait in this session (the sender
    // may have sent them before it learned of the hold), and the stream goes on.
    let y = Ulid::from_parts(3, 1);
    let (r1, r2) = (Ulid::generate(), Ulid::generate());
    let before = event(
        y,
        -20,
        0,
        r1,
        pb::Operation::Insert,
        Some(json!({"title": "y1"})),
    );
    let future = event(
        y,
        3_600_000,
        0,
        r1,
        pb::Operation::Update,
        Some(json!({"title": "future"})),
    );
    let after = event(
        y,
        3_600_001,
        0,
        r2,
        pb::Operation::Insert,
        Some(json!({"title": "y3"})),
    );
    let ack = s
        .send(vec![before.clone(), future.clone()])
        .await
        .expect("drift holds, no error");
    assert_eq!(ack.applied, 1);
    assert_eq!(ack.held.len(), 1);
    assert_eq!(
        (ack.held[0].event_id.as_str(), ack.held[0].code.as_str()),
        (future.event_id.as_str(), "OUT_OF_RANGE")
    );
    assert!(
        ack.held[0].message.contains("beyond the max drift"),
        "{}",
        ack.held[0].message
    );
    let ack = s.send(vec![after]).await.expect("skipped");
    assert_eq!((ack.applied, ack.held.len()), (0, 0));
    // Resent from the held event (as a sender does): evaluated again, held again.
    let ack = s.send(vec![future.clone()]).await.expect("again");
    assert_eq!(ack.held.len(), 1);
    assert!(node.reader().rows().await.contains_key(&r1.to_string()));
    assert!(!node.reader().rows().await.contains_key(&r2.to_string()));

    // A batch over the event limit.
    let mut s = open(node, hello(node)).await.expect("session");
    let many: Vec<pb::Event> = (0..10_001u32)
        .map(|i| {
            event(
                x,
                -30,
                (i % 60_000) as u16,
                Ulid::generate(),
                pb::Operation::Insert,
                Some(json!({"title": "n"})),
            )
        })
        .collect();
    let status = s.send(many).await.expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("10001 events, more than the limit of 10000"),
        "{}",
        status.message()
    );

    // A 50 MB event is over the message limit: refused by the transport.
    let mut s = open(node, hello(node)).await.expect("session");
    let big = event(
        x,
        -20,
        0,
        Ulid::generate(),
        pb::Operation::Insert,
        Some(json!({"title": "x".repeat(50 << 20)})),
    );
    let status = s.send(vec![big]).await.expect_err("too big");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{}",
        status.message()
    );

    // The node is still up and applies what is good.
    let mut s = open(node, hello(node)).await.expect("session");
    let ack = s
        .send(vec![event(
            x,
            -10,
            0,
            Ulid::generate(),
            pb::Operation::Insert,
            Some(json!({"title": "still up"})),
        )])
        .await
        .expect("good");
    assert_eq!(ack.applied, 1);
    assert!(s.welcome.vector.is_some());
}

/// `e` with the version vectors of `seen` merged into its own: it has seen them.
fn after(mut e: pb::Event, seen: &[&pb::Event]) -> pb::Event {
    let mut vv: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for s in seen.iter().copied().chain([&e]) {
        let meta: serde_json::Value =
            serde_json::from_str(s.metadata_json.as_deref().unwrap_or("{}")).expect("meta");
        for (k, v) in meta["vv"].as_object().cloned().unwrap_or_default() {
            let cur = vv.get(&k).and_then(serde_json::Value::as_i64).unwrap_or(0);
            vv.insert(k, json!(cur.max(v.as_i64().unwrap_or(0))));
        }
    }
    e.metadata_json = Some(json!({ "vv": vv }).to_string());
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_chain_delivered_out_of_order_opens_no_conflict() {
    let c = single_node("").await;
    let node = &c.nodes[0];
    tidemark_replicator::pb::admin_client::AdminClient::connect(node.grpc_url())
        .await
        .expect("admin")
        .set_policy(pb::SetPolicyRequest {
            table: "notes".into(),
            conflict_policy: "manual".into(),
        })
        .await
        .expect("manual");
    let (p1, p2, p3) = (
        Ulid::from_parts(1, 1),
        Ulid::from_parts(1, 2),
        Ulid::from_parts(1, 3),
    );
    let r = Ulid::generate();
    let a = event(
        p1,
        -3_000,
        0,
        r,
        pb::Operation::Insert,
        Some(json!({"title": "a"})),
    );
    let b = after(
        event(
            p2,
            -2_000,
            0,
            r,
            pb::Operation::Update,
            Some(json!({"title": "b"})),
        ),
        &[&a],
    );
    let d = after(
        event(
            p3,
            -1_000,
            0,
            r,
            pb::Operation::Update,
            Some(json!({"title": "c"})),
        ),
        &[&b],
    );
    let mut s = open(node, hello(node)).await.expect("session");
    for e in [&d, &a, &b] {
        let ack = s.send(vec![e.clone()]).await.expect("batch");
        assert_eq!(ack.duplicates, 0);
    }
    let conflicts = tidemark_replicator::pb::admin_client::AdminClient::connect(node.grpc_url())
        .await
        .expect("admin")
        .list_conflicts(pb::ListConflictsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .conflicts;
    assert!(conflicts.is_empty(), "false conflict: {conflicts:?}");
    assert!(node.reader().rows().await[&r.to_string()].contains("\"c\""));
}

/// `e` numbered `seq` in its origin's sequence (metadata "seq").
fn numbered(mut e: pb::Event, seq: u64) -> pb::Event {
    let mut meta: serde_json::Value =
        serde_json::from_str(e.metadata_json.as_deref().unwrap_or("{}")).expect("meta");
    meta["seq"] = json!(seq);
    e.metadata_json = Some(meta.to_string());
    e
}

/// Positions over the wire: a numbered event that skips numbers of its origin
/// holds the origin (code FAILED_PRECONDITION, naming the missing numbers)
/// with its later events, until the missing ones come; `admin status` then
/// shows the position. A sender that compacted events of the origin newer
/// than the receiver holds (Hello.compacted) may skip numbers: it streams the
/// superseded history's survivors, from which the records converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_past_a_gap_holds_its_origin_until_the_missing_ones_come() {
    let c = single_node("").await;
    let node = &c.nodes[0];
    let (x, y) = (Ulid::from_parts(1, 0xA), Ulid::from_parts(1, 0xB));
    let insert = |origin: Ulid, offset_ms: i64, seq: u64| {
        numbered(
            event(
                origin,
                offset_ms,
                0,
                Ulid::generate(),
                pb::Operation::Insert,
                Some(json!({"title": format!("number {seq}")})),
            ),
            seq,
        )
    };
    let (x1, x2, x3, x4) = (
        insert(x, -4_000, 1),
        insert(x, -3_000, 2),
        insert(x, -2_000, 3),
        insert(x, -1_000, 4),
    );
    let y1 = insert(y, -1_500, 1);
    let mut s = open(node, hello(node)).await.expect("session");
    let ack = s
        .send(vec![x1.clone(), x3.clone(), y1.clone(), x4.clone()])
        .await
        .expect("ack");
    assert_eq!(ack.applied, 2, "x1 and y1: {ack:?}");
    assert_eq!(ack.held.len(), 1, "{ack:?}");
    let h = &ack.held[0];
    assert_eq!(
        (h.origin.as_str(), h.event_id.as_str(), h.code.as_str()),
        (
            x.to_string().as_str(),
            x3.event_id.as_str(),
            "FAILED_PRECONDITION"
        )
    );
    assert!(
        h.message.contains("numbers 2 to 2 are missing"),
        "{}",
        h.message
    );
    // The sender resends from the held event, after the missing one.
    let ack = s
        .send(vec![x2.clone(), x3.clone(), x4.clone()])
        .await
        .expect("ack");
    assert!(ack.held.is_empty(), "{ack:?}");
    assert_eq!(ack.applied, 3);
    let status = node
        .admin()
        .await
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let position = |origin: Ulid| {
        status
            .positions
            .iter()
            .find(|p| p.origin == origin.to_string())
            .map(|p| (p.seq, p.hlc))
    };
    assert_eq!(position(x), Some((4, x4.hlc)));
    assert_eq!(position(y), Some((1, y1.hlc)));
    // And on /metrics, refreshed every second.
    let gauge = format!("tidemark_origin_position{{origin=\"{x}\"}}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node.metric(&gauge).await != Some(4.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{gauge} is {:?}, not 4",
            node.metric(&gauge).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(s);

    // A sender that compacted x's events past number 4 skips to number 7.
    let z = Ulid::from_parts(1, 0xC);
    let (z1, z3) = (insert(z, -900, 1), insert(z, -500, 3));
    let (x7, x8) = (insert(x, -800, 7), insert(x, -700, 8));
    let mut compacting = hello(node);
    compacting.compacted = Some(pb::VersionVector {
        entries: vec![pb::VectorEntry {
            node_id: x.to_string(),
            hlc: x8.hlc - 1,
        }],
    });
    let mut s = open(node, compacting).await.expect("session");
    let ack = s
        .send(vec![x7.clone(), x8.clone(), z1.clone(), z3.clone()])
        .await
        .expect("ack");
    assert_eq!(ack.applied, 3, "x7, x8 and z1: {ack:?}");
    assert_eq!(ack.held.len(), 1, "z compacted nothing: {ack:?}");
    assert_eq!(ack.held[0].event_id, z3.event_id);
}
