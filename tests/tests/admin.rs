//! What operators see and act on, through the Admin RPC and `tidemark admin`
//! run as a separate process against real daemons:
//!
//! * `check_finds_equal_nodes_equal_and_names_each_record_that_differs`: a
//!   SQLite and a PostgreSQL node converge and `admin check` reports equal
//!   digests; then direct writes too large to replicate leave rows on one node
//!   only (an update and an insert on each side) and `admin check` exits 1
//!   naming exactly those records, and `admin unreplicated` lists the writes;
//! * `blocked_lists_the_losers_of_unique_clashes`: two users per email written
//!   on two nodes, the earlier write of each is blocked on both, listed (a page
//!   at a time, by table) and counted in status, per node and per peer;
//! * `status_shows_held_writes_held_origins_and_quarantined_events`: a node
//!   waiting for its peer before stamping writes, a peer holding the origin of a
//!   node whose clock is ahead beyond the drift bound, a quarantined event;
//! * `digests_of_identical_rows_are_identical_on_every_backend`: the store's
//!   digests and row hashes on SQLite, PostgreSQL and in memory, split ranges,
//!   more rows than one read, and a changed value found in its range.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidemark_hlc::{Clock, Hlc, WallClock};
use tidemark_replicator::pb::{
    self, admin_client::AdminClient, receiver_message, replication_client::ReplicationClient,
    sender_message,
};
use tidemark_store::memory::Column;
use tidemark_store::{ConflictPolicy, Store, StoreError, Values};
use tidemark_tests::TestDb;
use tidemark_tests::daemon::{Cluster, TestNode, Topology, notes_schema, tidemark_bin};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(60);

/// `tidemark admin ARGS...` as an operator runs it: (exit code, stdout, stderr).
fn admin_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tidemark_bin())
        .arg("admin")
        .args(args)
        .output()
        .expect("run tidemark admin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tidemark admin ARGS... --json` that must succeed, its output parsed.
fn admin_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = admin_cli(&all);
    assert_eq!(code, 0, "tidemark admin {args:?}: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// A client of the node's Admin service.
async fn admin(node: &TestNode) -> AdminClient<Channel> {
    AdminClient::connect(node.grpc_url())
        .await
        .expect("connect admin api")
}

async fn status(node: &TestNode) -> pb::StatusResponse {
    admin(node)
        .await
        .status(pb::StatusRequest {})
        .await
        .unwrap_or_else(|s| panic!("status of {}: {s}", node.name))
        .into_inner()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SQL for a 2000-character text on this backend (over a 1024-byte event).
fn big_text(db: &TestDb) -> &'static str {
    match db {
        TestDb::Postgres { .. } => "repeat('z', 2000)",
        _ => "replace(hex(zeroblob(1000)), '0', 'z')",
    }
}

// ---------------------------------------------------------------------------------
// admin check, admin unreplicated

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_equal_nodes_equal_and_names_each_record_that_differs() {
    let mut cluster = Cluster::prepare(&["sqlite", "postgres"], Topology::Mesh, "test", "");
    for node in &cluster.nodes {
        node.set_config("store", "max_event_bytes", "1024");
    }
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (url0, url1) = (n0.grpc_url(), n1.grpc_url());
    let ids: Vec<Ulid> = (0..5).map(|_| Ulid::generate()).collect();
    for (i, id) in ids.iter().enumerate() {
        let node = if i % 2 == 0 { n0 } else { n1 };
        node.put(
            *id,
            json!({"title": format!("note {i} — ünïcode"), "body": "b\n\"q\"", "stars": i}),
        )
        .await;
    }
    cluster.converged(CONVERGE).await;

    // Equal: exit 0, the same digest from both nodes.
    let (code, out, err) = admin_cli(&["check", "--node", &url0, "--node", &url1]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("notes: equal on every node, 5 rows"), "{out}");
    let report = admin_json(&[
        "check", "--node", &url0, "--node", &url1, "--table", "notes",
    ]);
    assert_eq!(report["equal"], json!(true), "{report:#}");
    let notes = &report["tables"][0];
    assert_eq!(notes["table"], "notes");
    assert_eq!(notes["nodes"][&url0]["rows"], json!(5), "{report:#}");
    assert_eq!(notes["nodes"][&url0], notes["nodes"][&url1], "{report:#}");
    assert_eq!(notes["records"], json!([]));

    // The RPC's answers part by part, and its refusals.
    let mut a0 = admin(n0).await;
    let digest = |parts, records| pb::DigestRequest {
        table: "notes".into(),
        parts,
        records,
        ..Default::default()
    };
    let d0 = a0
        .digest(digest(4, false))
        .await
        .expect("digest")
        .into_inner();
    let d1 = (admin(n1).await.digest(digest(4, false)).await)
        .expect("digest")
        .into_inner();
    assert_eq!(d0, d1);
    assert_eq!(d0.ranges.len(), 4);
    assert_eq!(d0.ranges.iter().map(|r| r.rows).sum::<u64>(), 5);
    let r0 = a0
        .digest(digest(0, true))
        .await
        .expect("records")
        .into_inner();
    let listed: Vec<&str> = r0.records.iter().map(|r| r.id.as_str()).collect();
    let mut sorted: Vec<String> = ids.iter().map(Ulid::to_string).collect();
    sorted.sort();
    assert_eq!(listed, sorted, "every row, in id order");
    assert!(!r0.truncated);
    for (request, code, needle) in [
        (
            pb::DigestRequest {
                table: "nope".into(),
                ..digest(1, false)
            },
            Code::NotFound,
            "\"nope\"",
        ),
        (
            pb::DigestRequest {
                from_id: "not-a-ulid".into(),
                ..digest(1, false)
            },
            Code::InvalidArgument,
            "from_id",
        ),
        (digest(0, false), Code::InvalidArgument, "parts"),
        (digest(257, false), Code::InvalidArgument, "parts"),
        (
            pb::DigestRequest {
                from_id: ids[1].to_string(),
                to_id: ids[1].to_string(),
                ..digest(1, false)
            },
            Code::InvalidArgument,
            "to_id",
        ),
    ] {
        let refused = a0.digest(request).await.expect_err(needle);
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(needle), "{refused:?}");
    }

    // Direct writes over store.max_event_bytes are set aside: their rows stay
    // on their own node. node0 changes one note and adds one, node1 adds one.
    let (changed, only0, only1) = (ids[2], Ulid::generate(), Ulid::generate());
    n0.db.sql(&format!(
        "UPDATE notes SET body = {} WHERE id = '{changed}'",
        big_text(&n0.db)
    ));
    n0.db.sql(&format!(
        "INSERT INTO notes (id, title, body) VALUES ('{only0}', 'only on node0', {})",
        big_text(&n0.db)
    ));
    n1.db.sql(&format!(
        "INSERT INTO notes (id, title, body) VALUES ('{only1}', 'only on node1', {})",
        big_text(&n1.db)
    ));
    wait_for("both nodes set their writes aside", async || {
        status(n0).await.unreplicated_captures == 2 && status(n1).await.unreplicated_captures == 1
    })
    .await;

    let (code, out, err) = admin_cli(&["check", "--node", &url0, "--node", &url1]);
    assert_eq!(code, 1, "differences exit 1: {err}\n{out}");
    assert!(out.contains("notes: differs"), "{out}");
    let line = |id: Ulid| {
        out.lines()
            .find(|l| l.contains(&id.to_string()))
            .unwrap_or_else(|| panic!("no line for {id}:\n{out}"))
    };
    assert!(line(changed).contains("different values"), "{out}");
    assert!(line(only0).contains(&format!("missing on {url1}")), "{out}");
    assert!(line(only1).contains(&format!("missing on {url0}")), "{out}");
    let (code, out, _) = admin_cli(&["check", "--node", &url0, "--node", &url1, "--json"]);
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(report["equal"], json!(false));
    let notes = &report["tables"][0];
    assert_eq!(notes["nodes"][&url0]["rows"], json!(6), "{report:#}");
    assert_eq!(notes["nodes"][&url1]["rows"], json!(6), "{report:#}");
    let named: BTreeMap<String, (Value, Value)> = (notes["records"].as_array())
        .expect("records")
        .iter()
        .map(|r| {
            let id = r["id"].as_str().expect("id").to_owned();
            (id, (r["missing_on"].clone(), r["values_differ"].clone()))
        })
        .collect();
    assert_eq!(
        named,
        BTreeMap::from([
            (changed.to_string(), (json!([]), json!(true))),
            (only0.to_string(), (json!([url1]), json!(false))),
            (only1.to_string(), (json!([url0]), json!(false))),
        ]),
        "exactly the records that differ: {report:#}"
    );

    // `admin unreplicated` lists what was set aside, oldest first, and why.
    let listed = admin_json(&["--addr", &url0, "unreplicated"]);
    assert_eq!(listed["total"], json!(2), "{listed:#}");
    let captures: Vec<(&str, &str)> = (listed["captures"].as_array())
        .expect("captures")
        .iter()
        .map(|c| {
            assert!(
                c["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("store.max_event_bytes")),
                "{c}"
            );
            assert_eq!(c["table"], "notes");
            (
                c["record_id"].as_str().expect("record"),
                c["operation"].as_str().expect("op"),
            )
        })
        .collect();
    assert_eq!(
        captures,
        [
            (changed.to_string().as_str(), "UPDATE"),
            (only0.to_string().as_str(), "INSERT")
        ]
    );
    let (code, out, err) = admin_cli(&["--addr", &url1, "unreplicated"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&only1.to_string()), "{out}");
    assert!(out.contains("1 captured writes set aside"), "{out}");
    let first = a0
        .list_unreplicated(pb::ListUnreplicatedRequest { limit: 1 })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(first.total, 2);
    assert_eq!(first.captures.len(), 1);
    assert_eq!(first.captures[0].record_id, changed.to_string());

    // Dealt with, an entry is discarded (its row stays); the rest remain.
    let seq = first.captures[0].seq.to_string();
    let (code, out, err) = admin_cli(&["--addr", &url0, "discard-unreplicated", &seq]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("discarded 1 entries"), "{out}");
    let left = admin_json(&["--addr", &url0, "unreplicated"]);
    assert_eq!(left["total"], json!(1), "{left:#}");
    assert_eq!(left["captures"][0]["record_id"], json!(only0.to_string()));
    let (code, _, err) = admin_cli(&["--addr", &url0, "discard-unreplicated"]);
    assert_ne!(code, 0, "nothing named: {err}");
    let (code, out, err) = admin_cli(&["--addr", &url0, "discard-unreplicated", "--all"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("discarded 1 entries"), "{out}");
    assert_eq!(status(n0).await.unreplicated_captures, 0);
    assert!(n0.reader().rows().await.contains_key(&only0.to_string()));
}

// ---------------------------------------------------------------------------------
// admin blocked

/// Users with a UNIQUE email, on either backend (their classes agree).
fn users_ddl(db: &TestDb) -> String {
    format!(
        "CREATE TABLE users (id {} PRIMARY KEY, email TEXT UNIQUE, name TEXT, age {})",
        db.ulid_type(),
        db.int_type()
    )
}

async fn put_user(node: &TestNode, id: Ulid, values: Value) -> pb::WriteResponse {
    node.client()
        .await
        .put(pb::PutRequest {
            table: "users".into(),
            id: id.to_string(),
            values_json: values.to_string(),
        })
        .await
        .unwrap_or_else(|s| panic!("put user on {}: {s}", node.name))
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_lists_the_losers_of_unique_clashes() {
    let mut cluster = Cluster::prepare(&["sqlite", "postgres"], Topology::Mesh, "test", "");
    for node in cluster.nodes.iter_mut() {
        node.db.sql(&users_ddl(&node.db));
        let mut config = std::fs::read_to_string(node.config_path()).expect("config");
        config.push_str("\n[[tables]]\nname = \"users\"\nconflict_policy = \"lww\"\n");
        std::fs::write(node.config_path(), config).expect("config");
        node.start().await;
    }
    // node1 stopped: node0 writes two users through the API, node1's
    // application two others with the same emails directly; stamped when node1
    // starts again, node1's are the greater writes.
    cluster.nodes[1].stop();
    let mut losers = Vec::new();
    let mut winners = Vec::new();
    for email in ["ada@example.test", "grace@example.test"] {
        let (early, late) = (Ulid::generate(), Ulid::generate());
        let put = put_user(
            &cluster.nodes[0],
            early,
            json!({"email": email, "name": "node0", "age": 36}),
        )
        .await;
        cluster.nodes[1].db.sql(&format!(
            "INSERT INTO users (id, email, name, age) VALUES ('{late}', '{email}', 'node1', 37)"
        ));
        losers.push((early, put.event_id));
        winners.push(late);
    }
    cluster.nodes[1].start().await;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    wait_for(
        "both losers blocked on both nodes, counted per peer",
        async || {
            let (s0, s1) = (status(n0).await, status(n1).await);
            [&s0, &s1].iter().all(|s| {
                s.blocked_records == 2 && s.peers.first().is_some_and(|p| p.blocked_records == 2)
            })
        },
    )
    .await;
    cluster.converged(CONVERGE).await;

    let mut expected: Vec<(String, String, String)> = losers
        .iter()
        .zip(&winners)
        .map(|((loser, event), winner)| (loser.to_string(), event.clone(), winner.to_string()))
        .collect();
    expected.sort();
    for node in &cluster.nodes {
        let mut client = admin(node).await;
        let all = client
            .list_blocked(pb::ListBlockedRequest::default())
            .await
            .expect("list blocked")
            .into_inner();
        assert_eq!(all.total, 2);
        assert!(all.next_page_token.is_empty());
        let got: Vec<(String, String, String)> = all
            .blocked
            .iter()
            .map(|b| {
                assert_eq!(
                    (b.table.as_str(), b.kind.as_str(), b.blocker_table.as_str()),
                    ("users", "unique", "users"),
                    "{}: {b:?}",
                    node.name
                );
                assert!(!b.reason.is_empty() && !b.blocked_at.is_empty(), "{b:?}");
                (
                    b.record_id.clone(),
                    b.event_id.clone(),
                    b.blocker_id.clone(),
                )
            })
            .collect();
        assert_eq!(got, expected, "{}", node.name);

        // A page at a time, and by table.
        let page = |table: &str, token: &str| pb::ListBlockedRequest {
            table: table.into(),
            page_size: 1,
            page_token: token.into(),
        };
        let first = client
            .list_blocked(page("users", ""))
            .await
            .expect("page 1");
        let first = first.into_inner();
        assert_eq!(first.blocked.len(), 1);
        assert_eq!(first.blocked[0].record_id, expected[0].0);
        assert!(!first.next_page_token.is_empty());
        let second = (client
            .list_blocked(page("users", &first.next_page_token))
            .await)
            .expect("page 2")
            .into_inner();
        assert_eq!(second.blocked.len(), 1);
        assert_eq!(second.blocked[0].record_id, expected[1].0);
        assert!(second.next_page_token.is_empty(), "{second:?}");
        let notes = (client.list_blocked(page("notes", "")).await)
            .expect("notes")
            .into_inner();
        assert!(notes.blocked.is_empty(), "{notes:?}");
        let unknown = (client.list_blocked(page("nope", "")).await).expect_err("unknown table");
        assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
        let bad = (client.list_blocked(page("users", "users/zzz")).await).expect_err("bad token");
        assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
        assert!(bad.message().contains("page_token"), "{bad:?}");

        // The command line, both ways.
        let url = node.grpc_url();
        let listed = admin_json(&["--addr", &url, "blocked", "--table", "users"]);
        let ids: Vec<&str> = (listed["blocked"].as_array())
            .expect("blocked")
            .iter()
            .map(|b| b["record_id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, [expected[0].0.as_str(), expected[1].0.as_str()]);
        let (code, out, err) = admin_cli(&["--addr", &url, "blocked"]);
        assert_eq!(code, 0, "{err}");
        for (loser, _, winner) in &expected {
            let line = out
                .lines()
                .find(|l| l.contains(loser.as_str()))
                .unwrap_or_else(|| panic!("{loser} not listed:\n{out}"));
            assert!(
                line.contains("unique") && line.contains(&format!("users {winner}")),
                "{line}"
            );
        }
        assert!(out.contains("2 blocked records on this node"), "{out}");
        let (_, out, _) = admin_cli(&["--addr", &url, "status"]);
        assert!(out.contains("2 blocked records"), "{out}");
        // Retrying on demand cannot place a record whose value another holds.
        let (code, out, err) = admin_cli(&["--addr", &url, "retry-blocked", "--table", "users"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("tried 2 blocked records: 0 placed, 2 still blocked"),
            "{out}"
        );
    }
}

// ---------------------------------------------------------------------------------
// admin status

/// A session opened by the test as `sender` (a configured peer of `node` that is
/// stopped), for an event no daemon would send. Retried while `node` still
/// holds the stopped daemon's session.
async fn send_as(node: &TestNode, sender: Ulid, event: pb::Event) -> pb::Ack {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let mut client = ReplicationClient::connect(node.grpc_url())
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(4);
        let hello = pb::Hello {
            protocol_version: tidemark_replicator::PROTOCOL_VERSION,
            cluster_id: "test".into(),
            sender_node_id: sender.to_string(),
            receiver_node_id: node.id.to_string(),
            tables: notes_schema(),
            hlc: Hlc::at_wall_ms(tidemark_hlc::system_wall_ms())
                .expect("hlc")
                .encode(),
            instance_id: Ulid::generate().to_string(),
            receiver_origin_hlc: 0,
            compacted: None,
        };
        for kind in [
            sender_message::Kind::Hello(hello),
            sender_message::Kind::Batch(pb::Batch {
                batch_id: 1,
                events: vec![event.clone()],
            }),
        ] {
            tx.send(pb::SenderMessage { kind: Some(kind) })
                .await
                .expect("queue");
        }
        let mut rx = match client.replicate(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(status) => panic!("session refused: {status:?}"),
        };
        loop {
            match rx.message().await.expect("receive").and_then(|m| m.kind) {
                Some(receiver_message::Kind::Welcome(_)) => continue,
                Some(receiver_message::Kind::Ack(a)) => return a,
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_held_writes_held_origins_and_quarantined_events() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    // node0 waits long for its peer before stamping; node1's clock is 60 s
    // ahead, beyond the 5 s drift bound.
    cluster.nodes[0].set_config("replication", "startup_check_ms", "120000");
    cluster.nodes[1].set_config("clock", "offset_ms", "60000");
    cluster.nodes[0].start().await;
    let url0 = cluster.nodes[0].grpc_url();
    let s = status(&cluster.nodes[0]).await;
    assert!(s.writes_held, "node0 waits for node1: {s:?}");
    assert_eq!(
        admin_json(&["--addr", &url0, "status"])["writes_held"],
        json!(true)
    );
    let (_, out, _) = admin_cli(&["--addr", &url0, "status"]);
    assert!(out.contains("writes   held"), "{out}");

    cluster.nodes[1].start().await;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    wait_for("node0's writes released once node1 answered", async || {
        !status(n0).await.writes_held
    })
    .await;
    let (_, out, _) = admin_cli(&["--addr", &url0, "status"]);
    assert!(!out.contains("writes   held"), "{out}");

    // node1's write is from node0's future: node0 holds node1's origin, and
    // node1 shows it against its peer.
    n1.put(Ulid::generate(), json!({"title": "from the future"}))
        .await;
    let mut s = pb::StatusResponse::default();
    wait_for("node1 sees node0 hold its origin", async || {
        s = status(n1).await;
        !s.peers[0].held.is_empty()
    })
    .await;
    let [held] = s.peers[0].held.as_slice() else {
        panic!("one held origin: {s:?}");
    };
    assert_eq!(
        (held.origin.as_str(), held.code.as_str()),
        (n1.id.to_string().as_str(), "OUT_OF_RANGE"),
        "{held:?}"
    );
    assert!(held.reason.contains("drift"), "{held:?}");
    assert!(held.retry_at_ms > 0, "{held:?}");
    let url1 = n1.grpc_url();
    let json = admin_json(&["--addr", &url1, "status"]);
    assert_eq!(
        json["peers"][0]["held"][0]["origin"],
        json!(n1.id.to_string()),
        "{json:#}"
    );
    assert_eq!(json["peers"][0]["held"][0]["code"], "OUT_OF_RANGE");
    let (_, out, _) = admin_cli(&["--addr", &url1, "status"]);
    assert!(
        out.contains(&format!("holds origin {}: OUT_OF_RANGE", n1.id)),
        "{out}"
    );

    // An event with no origin to hold goes to node0's quarantine (sent in a
    // session claiming node1, stopped now: node0 takes sessions only from its
    // peers).
    let n1_id = n1.id;
    cluster.nodes[1].stop();
    let n0 = &cluster.nodes[0];
    let record = Ulid::generate();
    let hlc = Hlc::at_wall_ms(tidemark_hlc::system_wall_ms()).expect("hlc");
    let ack = send_as(
        n0,
        n1_id,
        pb::Event {
            event_id: Ulid::generate().to_string(),
            hlc: hlc.encode(),
            wall_ms: hlc.wall_ms(),
            node_id: "not an origin".into(),
            table_name: "notes".into(),
            record_id: record.to_string(),
            operation: pb::Operation::Insert as i32,
            new_values_json: Some(
                json!({"id": record.to_string(), "title": "x", "body": null, "stars": null})
                    .to_string(),
            ),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ack.rejected.len(), 1, "{ack:?}");
    let s = status(n0).await;
    assert_eq!(
        (
            s.quarantined_events,
            s.blocked_records,
            s.unreplicated_captures,
            s.writes_held
        ),
        (1, 0, 0, false),
        "{s:?}"
    );
    let json = admin_json(&["--addr", &url0, "status"]);
    assert_eq!(json["quarantined_events"], json!(1), "{json:#}");
    let (_, out, _) = admin_cli(&["--addr", &url0, "status"]);
    assert!(out.contains("1 quarantined events"), "{out}");

    // The operator lists it, as received, with its reason, and discards it.
    let listed = admin_json(&["--addr", &url0, "quarantined"]);
    assert_eq!(listed["total"], json!(1), "{listed:#}");
    let q = &listed["events"][0];
    assert_eq!(q["event_id"], json!(ack.rejected[0].event_id), "{listed:#}");
    assert!(
        q["event"]
            .as_str()
            .unwrap_or_default()
            .contains("not an origin"),
        "{listed:#}"
    );
    assert!(
        !q["reason"].as_str().unwrap_or_default().is_empty(),
        "{listed:#}"
    );
    assert!(
        !q["received_at"].as_str().unwrap_or_default().is_empty(),
        "{listed:#}"
    );
    let (_, out, _) = admin_cli(&["--addr", &url0, "quarantined"]);
    assert!(out.contains("1 events in this node's quarantine"), "{out}");
    let (code, _, err) = admin_cli(&["--addr", &url0, "discard-quarantined"]);
    assert_ne!(code, 0, "nothing named: refused ({err})");
    let event_id = q["event_id"].as_str().unwrap_or_default().to_owned();
    let done = admin_json(&["--addr", &url0, "discard-quarantined", &event_id]);
    assert_eq!(done["discarded"], json!(1), "{done:#}");
    assert_eq!(status(n0).await.quarantined_events, 0);
}

// ---------------------------------------------------------------------------------
// Digests in the store

/// Creates `items` (one column of several classes) on `db` and opens a store.
async fn items_store(db: &TestDb) -> Store {
    match db {
        TestDb::Memory { db: memory } => memory
            .create_table(
                "items",
                vec![
                    Column::new("id", "TEXT").primary_key(),
                    Column::new("name", "TEXT"),
                    Column::new("qty", "INTEGER"),
                    Column::new("price", "REAL"),
                    Column::new("ok", "BOOLEAN"),
                    Column::new("data", "BLOB"),
                ],
            )
            .await
            .expect("create items"),
        TestDb::Postgres { .. } => {
            db.sql(
                "CREATE TABLE items (id CHAR(26) PRIMARY KEY, name TEXT, qty BIGINT, \
                 price DOUBLE PRECISION, ok BOOLEAN, data BYTEA)",
            );
        }
        TestDb::Sqlite { .. } => {
            db.sql(
                "CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT, qty INTEGER, \
                 price REAL, ok BOOLEAN, data BLOB)",
            );
        }
    }
    let clock = Clock::new(Ulid::generate(), 5_000, WallClock::System).expect("clock");
    let store = db.open(Arc::new(clock)).await.expect("open store");
    store
        .register_table("items", ConflictPolicy::Lww)
        .await
        .unwrap_or_else(|e| panic!("register items on {}: {e}", db.kind()));
    store
}

/// Row `k` of `items`, in the log's form: NULLs, text with quotes, newlines and
/// non-ASCII, negative and large numbers, booleans, bytes.
fn item(id: Ulid, k: u128) -> Values {
    let name = match k % 7 {
        0 => Value::Null,
        _ => json!(format!("item {k} — naïve ☃ \"q\"\n")),
    };
    let price = match k % 4 {
        0 => json!(0.1),
        1 => json!(-2.5e300),
        2 => json!(1.0),
        _ => Value::Null,
    };
    let ok = match k % 3 {
        0 => json!(true),
        1 => json!(false),
        _ => Value::Null,
    };
    let data = match k % 5 {
        0 => Value::Null,
        _ => json!("AAEC/w=="),
    };
    let row = json!({
        "id": id.to_string(),
        "name": name,
        "qty": k as i64 * 1_000_003 - 500_000_000,
        "price": price,
        "ok": ok,
        "data": data,
    });
    row.as_object().cloned().expect("object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_of_identical_rows_are_identical_on_every_backend() {
    // Ids spread over the whole id space, more than one read of a digest
    // covers, two of them on either side of the first bound of 16 parts.
    let part = 1u128 << 124;
    let mut ids: BTreeSet<u128> = (1..=1008u128).map(|k| (u128::MAX / 1009) * k + k).collect();
    ids.extend([part - 1, part]);
    let ids: Vec<Ulid> = ids.into_iter().map(Ulid::from).collect();
    let dbs = [TestDb::sqlite(), TestDb::postgres(), TestDb::memory()];
    let mut stores = Vec::new();
    for db in &dbs {
        let store = items_store(db).await;
        for (k, id) in ids.iter().enumerate() {
            store
                .put("items", *id, &item(*id, k as u128))
                .await
                .unwrap_or_else(|e| panic!("put on {}: {e}", db.kind()));
        }
        stores.push(store);
    }

    let digests = async |store: &Store, parts| {
        store
            .digest("items", None, None, parts)
            .await
            .expect("digest")
    };
    let whole = digests(&stores[0], 1).await;
    let split = digests(&stores[0], 16).await;
    assert_eq!(whole[0].rows, ids.len() as u64);
    let per_part: Vec<u64> = (0..16u128)
        .map(|p| {
            let n = ids.iter().filter(|id| u128::from(**id) >> 124 == p).count();
            n as u64
        })
        .collect();
    assert_eq!(
        split.iter().map(|r| r.rows).collect::<Vec<_>>(),
        per_part,
        "each row in the part its id falls in"
    );
    assert_eq!(
        (split[1].from, split[0].to),
        (Some(Ulid::from(part)), Some(Ulid::from(part)))
    );
    let records = stores[0]
        .record_hashes("items", None, None, 1000)
        .await
        .expect("records");
    assert_eq!((records.records.len(), records.truncated), (1000, true));
    for (db, store) in dbs.iter().zip(&stores).skip(1) {
        assert_eq!(digests(store, 1).await, whole, "{}", db.kind());
        assert_eq!(digests(store, 16).await, split, "{}", db.kind());
        let theirs = store
            .record_hashes("items", None, None, 1000)
            .await
            .expect("records");
        assert_eq!(theirs, records, "{}", db.kind());
    }
    // One part asked for alone digests as it did among the 16.
    let alone = stores[1]
        .digest("items", split[1].from, split[1].to, 1)
        .await
        .expect("part");
    assert_eq!(alone, vec![split[1].clone()]);

    // One changed value changes its part's digest and its row's hash only.
    let k = ids.len() / 2;
    let changed = ids[k];
    let mut row = item(changed, k as u128);
    row.insert("qty".into(), json!(7));
    stores[2].put("items", changed, &row).await.expect("put");
    let after = digests(&stores[2], 16).await;
    let differing: Vec<usize> = (0..16)
        .filter(|&p| after[p].digest != split[p].digest)
        .collect();
    let p = (u128::from(changed) >> 124) as usize;
    assert_eq!(differing, vec![p]);
    assert_eq!(after[p].rows, split[p].rows);
    let hashes = async |store: &Store| {
        let r = store
            .record_hashes("items", after[p].from, after[p].to, 1000)
            .await
            .expect("records");
        assert!(!r.truncated);
        r.records
    };
    let (mine, theirs) = (hashes(&stores[2]).await, hashes(&stores[0]).await);
    assert_eq!(mine.len(), theirs.len());
    let named: Vec<Ulid> = (mine.iter().zip(&theirs))
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.id)
        .collect();
    assert_eq!(named, vec![changed]);

    // Refusals name what is wrong.
    let store = &stores[0];
    assert!(matches!(
        store.digest("nope", None, None, 1).await,
        Err(StoreError::UnknownTable { .. })
    ));
    for parts in [0, 257] {
        match store.digest("items", None, None, parts).await {
            Err(StoreError::Invalid { field, .. }) => assert_eq!(field, "parts"),
            other => panic!("parts {parts}: {other:?}"),
        }
    }
    match store.digest("items", Some(ids[3]), Some(ids[2]), 1).await {
        Err(StoreError::Invalid { field, .. }) => assert_eq!(field, "to_id"),
        other => panic!("reversed range: {other:?}"),
    }
    for store in &stores {
        store.close().await;
    }
}

/// `status` counts what a stopped peer lacks from the log, as the lag gauge
/// does, not from the session that is gone with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_what_a_stopped_peer_lacks() {
    let mut cluster = Cluster::start(&["sqlite", "sqlite"], Topology::Mesh).await;
    cluster.nodes[1].kill();
    let n0 = &cluster.nodes[0];
    for i in 0..6 {
        n0.put(
            Ulid::generate(),
            json!({"title": format!("while down {i}")}),
        )
        .await;
    }
    let peer = cluster.nodes[1].id.to_string();
    let s = status(n0).await;
    let p = s
        .peers
        .iter()
        .find(|p| p.node_id == peer)
        .expect("node1 in node0's status");
    assert_eq!(p.unacked_events, 6, "{p:?}");
    assert!(p.oldest_unacked_ms > 0, "{p:?}");
    let gauge = format!("tidemark_peer_unacked_events{{peer=\"{peer}\"}}");
    wait_for("the gauge to agree", async || {
        n0.metric(&gauge).await == Some(6.0)
    })
    .await;
    let url0 = n0.grpc_url();
    let peers = &admin_json(&["--addr", &url0, "status"])["peers"];
    assert_eq!(peers[0]["unacked_events"], json!(6), "{peers}");
}

// ---------------------------------------------------------------------------------
// admin cluster

/// `tidemark admin cluster` from one node finds the others through its peers,
/// shows each node and each link, and a stopped node as unreachable (exit 1)
/// with what its peers hold for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_view_finds_every_node_and_shows_a_stopped_one() {
    let mut cluster = Cluster::start(&["sqlite", "sqlite", "postgres"], Topology::Mesh).await;
    cluster.nodes[0]
        .put(Ulid::generate(), json!({"title": "seen by all"}))
        .await;
    cluster.converged(CONVERGE).await;
    let url0 = cluster.nodes[0].grpc_url();
    let view = admin_json(&["--addr", &url0, "cluster"]);
    let nodes = view["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{view:#}");
    for node in &cluster.nodes {
        let found = nodes
            .iter()
            .find(|n| n["node_id"] == json!(node.id.to_string()))
            .unwrap_or_else(|| panic!("{} missing: {view:#}", node.name));
        assert_eq!(found["state"], "up", "{view:#}");
        assert_eq!(found["name"], json!(node.name), "{view:#}");
    }
    assert_eq!(view["links"].as_array().map(Vec::len), Some(6), "{view:#}");
    assert_eq!(view["cluster_id"], "test");

    // node2 stops; node0 writes: node2 is unreachable, and the links into it
    // show what it lacks.
    let stopped = cluster.nodes[2].id.to_string();
    cluster.nodes[2].stop();
    cluster.nodes[0]
        .put(Ulid::generate(), json!({"title": "node2 lacks this"}))
        .await;
    let (code, out, err) = admin_cli(&["--addr", &url0, "--json", "cluster"]);
    assert_eq!(code, 1, "an unreachable node exits 1: {err}");
    let view: Value = serde_json::from_str(&out).expect("json");
    let down = view["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node_id"] == json!(stopped)))
        .unwrap_or_else(|| panic!("the stopped node is listed: {view:#}"));
    assert_eq!(down["state"], "unreachable", "{view:#}");
    assert!(
        down["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{view:#}"
    );
    let into_stopped = view["links"]
        .as_array()
        .and_then(|ls| {
            ls.iter().find(|l| {
                l["from"] == json!(cluster.nodes[0].id.to_string()) && l["to"] == json!(stopped)
            })
        })
        .unwrap_or_else(|| panic!("link node0 -> node2: {view:#}"))
        .clone();
    assert!(
        into_stopped["unacked_events"].as_u64() >= Some(1),
        "{into_stopped:#}"
    );

    // The text view, refreshed twice.
    let (code, out, _) = admin_cli(&["--addr", &url0, "cluster", "--watch", "1", "--count", "2"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.matches("cluster test: 3 nodes, 2 reachable").count(),
        2,
        "{out}"
    );
    assert!(out.contains("unreachable"), "{out}");
    assert!(out.contains("node0 -> node1"), "{out}");
    assert!(out.contains("refreshing every 1 s"), "{out}");
}
