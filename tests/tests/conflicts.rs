//! Conflicts across whole daemons: a partition-style concurrent update on a
//! `manual` table opens the same conflict on every node, resolving it on one node
//! (with the `tidemark admin` CLI) closes it everywhere, policy switches spread,
//! and bad resolutions change nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidemark_replicator::pb::{self, admin_client::AdminClient};
use tidemark_tests::daemon::{Cluster, TestNode, Topology, tidemark_bin};
use tonic::Code;
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(60);

async fn admin(node: &TestNode) -> AdminClient<tonic::transport::Channel> {
    AdminClient::connect(node.grpc_url())
        .await
        .expect("admin client")
}

async fn open_conflicts(node: &TestNode) -> Vec<pb::ConflictInfo> {
    admin(node)
        .await
        .list_conflicts(pb::ListConflictsRequest {
            status: "open".into(),
            ..Default::default()
        })
        .await
        .expect("list conflicts")
        .into_inner()
        .conflicts
}

async fn policy_of(node: &TestNode, table: &str) -> String {
    let s = admin(node)
        .await
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    s.tables
        .into_iter()
        .find(|t| t.name == table)
        .map(|t| t.conflict_policy)
        .unwrap_or_default()
}

/// Waits until `check` holds on every running node.
async fn eventually(cluster: &Cluster, what: &str, check: impl AsyncFn(&TestNode) -> bool) {
    let deadline = Instant::now() + CONVERGE;
    'outer: loop {
        for node in cluster.nodes.iter().filter(|n| n.is_running()) {
            if !check(node).await {
                assert!(
                    Instant::now() < deadline,
                    "{what}: not on {} within {CONVERGE:?}",
                    node.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'outer;
            }
        }
        return;
    }
}

/// Runs `tidemark admin --json ...` and parses its output.
fn admin_cli(node: &TestNode, args: &[&str]) -> Value {
    let out = Command::new(tidemark_bin())
        .args(["admin", "--addr", &node.grpc_url(), "--json"])
        .args(args)
        .output()
        .expect("run tidemark admin");
    assert!(
        out.status.success(),
        "tidemark admin {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("admin --json prints JSON")
}

/// Chain node0 - node1 - node2 on a manual table, with one open conflict made
/// while node1 (the only link) was down. Returns the record id.
async fn partitioned_conflict() -> (Cluster, Ulid) {
    partitioned_conflict_on(&["sqlite", "sqlite", "sqlite"]).await
}

/// [`partitioned_conflict`] on these backends.
async fn partitioned_conflict_on(backends: &[&str]) -> (Cluster, Ulid) {
    let mut cluster = Cluster::start(backends, Topology::Chain).await;
    admin(&cluster.nodes[0])
        .await
        .set_policy(pb::SetPolicyRequest {
            table: "notes".into(),
            conflict_policy: "manual".into(),
        })
        .await
        .expect("set policy");
    eventually(&cluster, "policy manual", async |n| {
        policy_of(n, "notes").await == "manual"
    })
    .await;
    let id = Ulid::generate();
    cluster.nodes[0]
        .put(id, json!({"title": "original", "stars": 1}))
        .await;
    cluster.converged(CONVERGE).await;
    cluster.nodes[1].stop();
    cluster.nodes[0]
        .put(id, json!({"title": "from node0"}))
        .await;
    cluster.nodes[2]
        .put(id, json!({"title": "from node2", "stars": 5}))
        .await;
    cluster.nodes[1].start().await;
    cluster.converged(CONVERGE).await;
    (cluster, id)
}

/// Every conflict a node lists, open and decided, oldest first.
async fn all_conflicts(node: &TestNode) -> Vec<pb::ConflictInfo> {
    admin(node)
        .await
        .list_conflicts(pb::ListConflictsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list conflicts")
        .into_inner()
        .conflicts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decided_conflicts_are_one_history_on_every_backend() {
    let (mut cluster, id) = partitioned_conflict_on(&["sqlite", "postgres", "sqlite"]).await;
    // The first conflict ends with a write on the middle node, which has seen
    // both versions.
    eventually(&cluster, "one open conflict", async |n| {
        open_conflicts(n).await.len() == 1
    })
    .await;
    cluster.nodes[1]
        .put(id, json!({"title": "after the first", "stars": 2}))
        .await;
    cluster.converged(CONVERGE).await;
    // A second conflict on the same record, resolved by an operator.
    cluster.nodes[1].stop();
    cluster.nodes[0].put(id, json!({"title": "again 0"})).await;
    cluster.nodes[2].put(id, json!({"title": "again 2"})).await;
    cluster.nodes[1].start().await;
    cluster.converged(CONVERGE).await;
    eventually(&cluster, "the second conflict open", async |n| {
        open_conflicts(n).await.len() == 1
    })
    .await;
    let second = open_conflicts(&cluster.nodes[2]).await.remove(0);
    admin(&cluster.nodes[2])
        .await
        .resolve_conflict(pb::ResolveConflictRequest {
            conflict_id: second.conflict_id.clone(),
            choice: pb::ResolveChoice::KeepRemote as i32,
            resolved_by: "carol".into(),
            note: "the other side".into(),
            ..Default::default()
        })
        .await
        .expect("resolve");
    eventually(&cluster, "no open conflict", async |n| {
        open_conflicts(n).await.is_empty()
    })
    .await;
    cluster.converged(CONVERGE).await;
    // One history: the same conflicts, every field equal (times included: HLC
    // times, whichever backend prints them).
    let reference = all_conflicts(&cluster.nodes[0]).await;
    let how: Vec<(&str, &str, &str)> = reference
        .iter()
        .map(|c| {
            (
                c.status.as_str(),
                c.resolution.as_str(),
                c.resolved_by.as_str(),
            )
        })
        .collect();
    assert_eq!(
        how,
        [
            ("resolved", "superseded", ""),
            ("resolved", "keep_remote", "carol")
        ],
        "{reference:#?}"
    );
    for c in &reference {
        assert!(
            !c.detected_at.is_empty() && !c.resolved_at.is_empty(),
            "{c:?}"
        );
        assert!(c.detected_at <= c.resolved_at, "{c:?}");
    }
    for node in &cluster.nodes[1..] {
        assert_eq!(
            all_conflicts(node).await,
            reference,
            "{} against node0",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_conflict_opens_everywhere_and_resolving_once_closes_it_everywhere() {
    let (cluster, id) = partitioned_conflict().await;
    // The same open conflict on all three nodes, and the same provisional winner.
    eventually(&cluster, "one open conflict", async |n| {
        open_conflicts(n).await.len() == 1
    })
    .await;
    let reference = open_conflicts(&cluster.nodes[0]).await.remove(0);
    for node in &cluster.nodes {
        let c = open_conflicts(node).await.remove(0);
        assert_eq!(c.conflict_id, reference.conflict_id, "{}", node.name);
        assert_eq!(
            c.local.as_ref().map(|v| &v.event_id),
            reference.local.as_ref().map(|v| &v.event_id)
        );
        assert_eq!(
            c.remote.as_ref().map(|v| &v.event_id),
            reference.remote.as_ref().map(|v| &v.event_id)
        );
        assert_eq!(c.record_id, id.to_string());
    }
    let titles: Vec<String> = [&reference.local, &reference.remote]
        .iter()
        .map(|v| {
            let j: Value = serde_json::from_str(
                v.as_ref()
                    .and_then(|v| v.values_json.as_deref())
                    .expect("values"),
            )
            .expect("json");
            j["title"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    let mut sorted = titles.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["from node0", "from node2"]);
    // Every node shows the provisional winner.
    let snap = cluster.converged(CONVERGE).await;
    assert!(snap.rows[&id.to_string()].contains(&titles[0]));

    // The CLI sees it too.
    let listed = admin_cli(&cluster.nodes[1], &["conflicts", "list"]);
    assert_eq!(
        listed["conflicts"][0]["conflict_id"],
        json!(reference.conflict_id)
    );

    // Resolve on the middle node with merged values.
    admin_cli(
        &cluster.nodes[1],
        &[
            "conflicts",
            "resolve",
            &reference.conflict_id,
            "--values",
            r#"{"title": "merged", "stars": 7}"#,
            "--by",
            "alice",
            "--note",
            "kept both ideas",
        ],
    );
    let conflict_id = reference.conflict_id.clone();
    eventually(&cluster, "conflict closed", async |n| {
        let c = admin(n)
            .await
            .get_conflict(pb::GetConflictRequest {
                conflict_id: conflict_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        c.status == "resolved" && c.resolution == "merged" && c.resolved_by == "alice"
    })
    .await;
    let snap = cluster.converged(CONVERGE).await;
    let row: Value = serde_json::from_str(&snap.rows[&id.to_string()]).expect("row");
    assert_eq!(
        (row["title"].clone(), row["stars"].clone()),
        (json!("merged"), json!(7))
    );
    for node in &cluster.nodes {
        assert!(open_conflicts(node).await.is_empty(), "{}", node.name);
    }
    // The history shows the resolution as an event of its own.
    let history = admin_cli(&cluster.nodes[2], &["history", "notes", &id.to_string()]);
    let actions: Vec<Value> = history
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["action"].clone())
        .collect();
    assert_eq!(actions.last(), Some(&json!("resolve")));
    assert!(cluster.nodes[1].log_contains("conflict resolved"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_lww_closes_open_conflicts_cluster_wide() {
    let (cluster, _id) = partitioned_conflict().await;
    eventually(&cluster, "one open conflict", async |n| {
        open_conflicts(n).await.len() == 1
    })
    .await;
    admin_cli(&cluster.nodes[2], &["policy", "set", "notes", "lww"]);
    eventually(&cluster, "policy lww and no open conflict", async |n| {
        policy_of(n, "notes").await == "lww" && open_conflicts(n).await.is_empty()
    })
    .await;
    let status = admin_cli(&cluster.nodes[0], &["status"]);
    assert_eq!(status["tables"][0]["conflict_policy"], json!("lww"));
    assert_eq!(status["tables"][0]["open_conflicts"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resolutions_are_refused_and_change_nothing() {
    let (cluster, id) = partitioned_conflict().await;
    eventually(&cluster, "one open conflict", async |n| {
        open_conflicts(n).await.len() == 1
    })
    .await;
    let node = &cluster.nodes[0];
    let c = open_conflicts(node).await.remove(0);
    let before = node.reader().snapshot().await;
    let mut client = admin(node).await;
    let resolve = |conflict_id: &str, choice: pb::ResolveChoice, values: &str, by: &str| {
        pb::ResolveConflictRequest {
            conflict_id: conflict_id.into(),
            choice: choice as i32,
            values_json: values.into(),
            resolved_by: by.into(),
            note: String::new(),
            expected_winner_event_id: String::new(),
        }
    };
    let cases = [
        (
            resolve(
                &Ulid::generate().to_string(),
                pb::ResolveChoice::KeepLocal,
                "",
                "bob",
            ),
            Code::NotFound,
            "no conflict",
        ),
        (
            resolve("nope", pb::ResolveChoice::KeepLocal, "", "bob"),
            Code::InvalidArgument,
            "conflict_id",
        ),
        (
            resolve(
                &c.conflict_id,
                pb::ResolveChoice::Merged,
                r#"{"colour": "red"}"#,
                "bob",
            ),
            Code::InvalidArgument,
            "no replicated column \"colour\"",
        ),
        (
            resolve(&c.conflict_id, pb::ResolveChoice::Merged, "[1]", "bob"),
            Code::InvalidArgument,
            "values_json: expected a JSON object",
        ),
        (
            resolve(&c.conflict_id, pb::ResolveChoice::Unspecified, "", "bob"),
            Code::InvalidArgument,
            "choice: 0 is not one of",
        ),
        (
            resolve(&c.conflict_id, pb::ResolveChoice::KeepLocal, "", " "),
            Code::InvalidArgument,
            "resolved_by",
        ),
        (
            // A compare-and-set against a winner that is not the conflict's.
            pb::ResolveConflictRequest {
                expected_winner_event_id: Ulid::generate().to_string(),
                ..resolve(&c.conflict_id, pb::ResolveChoice::KeepLocal, "", "bob")
            },
            Code::Aborted,
            "changed since you looked",
        ),
    ];
    for (req, code, expect) in cases {
        let status = client.resolve_conflict(req).await.expect_err(expect);
        assert_eq!(status.code(), code, "{expect}: {status:?}");
        assert!(
            status.message().contains(expect),
            "{expect}: {}",
            status.message()
        );
    }
    assert_eq!(
        node.reader().snapshot().await,
        before,
        "a refused resolution changed something"
    );
    assert_eq!(open_conflicts(node).await.len(), 1);
    // Resolving twice: the second is refused.
    client
        .resolve_conflict(resolve(
            &c.conflict_id,
            pb::ResolveChoice::KeepRemote,
            "",
            "carol",
        ))
        .await
        .expect("resolve");
    let status = client
        .resolve_conflict(resolve(
            &c.conflict_id,
            pb::ResolveChoice::KeepLocal,
            "",
            "dave",
        ))
        .await
        .expect_err("twice");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("is already resolved (keep_remote by carol"),
        "{}",
        status.message()
    );
    cluster.converged(CONVERGE).await;
    // Keep remote: every node now holds the version that had lost.
    let loser: Value = serde_json::from_str(
        c.remote
            .as_ref()
            .and_then(|v| v.values_json.as_deref())
            .expect("values"),
    )
    .expect("json");
    let row: Value = serde_json::from_str(&cluster.nodes[2].reader().rows().await[&id.to_string()])
        .expect("row");
    assert_eq!(row["title"], loser["title"]);
}

/// A generic gRPC client (Python's grpc-requests) that knows no .proto file finds
/// the services through reflection, checks health, and resolves a conflict.
/// The interpreter is `$TIDEMARK_PYTHON` (`.ci/run` makes a venv with
/// grpc-requests) or `python3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_grpc_client_resolves_through_reflection() {
    let (cluster, _id) = partitioned_conflict().await;
    eventually(&cluster, "one open conflict", async |n| {
        open_conflicts(n).await.len() == 1
    })
    .await;
    let python = std::env::var("TIDEMARK_PYTHON").unwrap_or_else(|_| "python3".into());
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/admin_reflection.py");
    let node = &cluster.nodes[2];
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("127.0.0.1:{}", node.port))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "{python} {} failed (it needs `pip install grpc-requests`; .ci/run installs it):\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    assert_eq!(summary["node_id"], json!(node.id.to_string()));
    assert_eq!(summary["tables"], json!(["notes"]));
    let conflict_id = summary["conflict_id"].as_str().expect("id").to_owned();
    eventually(&cluster, "closed by the generic client", async |n| {
        let c = admin(n)
            .await
            .get_conflict(pb::GetConflictRequest {
                conflict_id: conflict_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        c.status == "resolved"
            && c.resolved_by == "python-grpc-requests"
            && c.resolution == "keep_local"
    })
    .await;
    cluster.converged(CONVERGE).await;
}
