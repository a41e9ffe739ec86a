//! Whole `tidemark` daemons on the realistic schema of `tidemark_tests::schema`
//! (users with a UNIQUE email and a CHECK on age, orders referencing users),
//! written by applications through the databases' own clients and the APIs, over
//! chains where the end nodes meet only through relaying. What is proven:
//!
//! * `unique_clash_across_sqlite_sqlite_postgres_through_a_chain`: two users
//!   with one email, written directly on SQLite and on PostgreSQL while the
//!   chain is cut, end up alike on every node once it heals: the greater write
//!   holds the email, the other user is blocked with the one open UNIQUE
//!   conflict (same id everywhere), and its order is blocked behind it; an
//!   operator's merged resolution at one end places both users and the order
//!   on every node.
//! * `a_child_relayed_ahead_of_its_parent_waits`: the daemon refuses an order
//!   for a user its node lacks, but an application's sqlite3 connection (no
//!   foreign key checks) writes it; relayed ahead of its user, the order waits
//!   on the next node (blocked, no conflict) and is placed everywhere once the
//!   user arrives.
//! * `a_twenty_megabyte_write_never_stalls_a_link`: a 20 MB API write is refused
//!   naming `store.max_event_bytes`, a 20 MB direct write is set aside (log line,
//!   metric, the row stays local), and later writes, 6 MB updates among them,
//!   replicate promptly, the lag gauges back at 0.
//! * `an_origin_two_minutes_ahead_holds_only_itself_in_a_chain`: a node whose
//!   clock runs two minutes ahead is held by its peer (reported to it, shown in
//!   its metrics) while the other origins flow both ways; its writes stay in its
//!   log, unsynced, and flow once the peers accept its clock.
//! * `mixed_cluster_carries_exact_values`: doubles (0.1 + 0.2, infinities,
//!   subnormals), 40-digit decimals, extreme integers, text, dates, instants,
//!   UUIDs, JSON and bytes written on SQLite and PostgreSQL read back identical,
//!   by type and bit, on both; an infinite double does not stop the node.
//!
//! Every test ends the same way: once every node says it has nothing unsynced,
//! the nodes must already agree: the same events per origin (every
//! acknowledged write among them), the same rows, typed (a row set aside
//! excepted), the same record versions, blocked records and conflicts, intact
//! databases, and peer lag gauges at 0.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tidemark_replicator::pb;
use tidemark_tests::check;
use tidemark_tests::daemon::{Cluster, Table, TestNode, Topology};
use tidemark_tests::proxy::{Links, fault_seed};
use tidemark_tests::schema;
use tidemark_tests::typed::{self, Class, Val};
use time::macros::{date, datetime};
use tonic::Code;
use ulid::Ulid;

/// Longest wait for anything the cluster should do.
const WAIT: Duration = Duration::from_secs(40);
/// What "promptly" means for a write to reach a peer.
const PROMPTLY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Tables

const USERS: Table = Table {
    name: "users",
    ddl: schema::users_ddl,
    policy: "manual",
    sqlite_types: "",
};

const ORDERS: Table = Table {
    name: "orders",
    ddl: |db| schema::mixed_child_ddl(db, "orders"),
    policy: "manual",
    sqlite_types: "",
};

const USER_COLUMNS: &[(&str, Class)] = &[
    ("email", Class::Text),
    ("name", Class::Text),
    ("age", Class::Int),
];

const ORDER_COLUMNS: &[(&str, Class)] = &[("user_id", Class::Text), ("amount", Class::Int)];

const DOCS: Table = Table {
    name: "docs",
    ddl: |_| "CREATE TABLE docs (id TEXT PRIMARY KEY, body TEXT)".into(),
    policy: "lww",
    sqlite_types: "",
};

const DOC_COLUMNS: &[(&str, Class)] = &[("body", Class::Text)];

// ---------------------------------------------------------------------------------
// Clusters

/// Nodes on `backends` in a chain whose every link goes through a proxy,
/// replicating `tables`; sessions give up on a silent peer after 3 s. Not
/// started: adjust configs, then [`start`].
async fn chain(backends: &[&str], tables: &[Table]) -> (Cluster, Links) {
    let cluster = Cluster::prepare_with(backends, Topology::Chain, "test", "", tables);
    let links = Links::chain(&cluster, "test", "", fault_seed()).await;
    for node in &cluster.nodes {
        node.set_config("replication", "ack_timeout_ms", "3000");
        node.set_config("replication", "connect_timeout_ms", "1000");
    }
    (cluster, links)
}

/// Two directly connected nodes replicating `tables`, started.
async fn pair(backends: [&str; 2], tables: &[Table]) -> Cluster {
    let mut cluster = Cluster::prepare_with(&backends, Topology::Mesh, "test", "", tables);
    start(&mut cluster).await;
    cluster
}

async fn start(cluster: &mut Cluster) {
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
}

/// Nodes `a` and `b` can no longer reach each other, either way.
fn cut(links: &Links, a: usize, b: usize) {
    links.link(a, b).partition();
    links.link(b, a).partition();
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------
// What a node holds and says

async fn has_event(node: &TestNode, event_id: &str) -> bool {
    let sql = format!("SELECT COUNT(*) FROM change_events WHERE event_id = '{event_id}'");
    node.reader().fetch_all::<(i64,)>(&sql).await[0].0 == 1
}

/// The id of the event that stamped the direct write of `table` record `id`,
/// once the node drained it.
async fn stamped(node: &TestNode, table: &str, id: Ulid) -> String {
    let sql = format!(
        "SELECT event_id FROM change_events WHERE table_name = '{table}' AND record_id = '{id}' \
         ORDER BY hlc_timestamp DESC"
    );
    let mut found = None;
    wait_for(
        &format!("{} stamps {table} {id}", node.name),
        WAIT,
        async || {
            found = node
                .reader()
                .fetch_all::<(String,)>(&sql)
                .await
                .first()
                .cloned();
            found.is_some()
        },
    )
    .await;
    found.expect("stamped").0
}

/// A write's place in the total order: (hlc, node id, event id).
async fn order_of(node: &TestNode, event_id: &str) -> (i64, String, String) {
    let sql = format!(
        "SELECT hlc_timestamp, node_id, event_id FROM change_events WHERE event_id = '{event_id}'"
    );
    let rows = node.reader().fetch_all(&sql).await;
    rows.into_iter().next().expect("event in the log")
}

/// Blocked records of a node, in the shape of [`check::Blocked`].
async fn blocked(node: &TestNode) -> Vec<check::Blocked> {
    node.reader()
        .fetch_all(
            "SELECT table_name, record_id, event_id, kind, blocker_table, blocker_id \
             FROM tidemark_blocked ORDER BY table_name, record_id",
        )
        .await
}

fn blocked_row(
    table: &str,
    record: Ulid,
    event: &str,
    kind: &str,
    blocker: Ulid,
) -> check::Blocked {
    (
        table.into(),
        record.to_string(),
        event.into(),
        kind.into(),
        Some("users".into()),
        Some(blocker.to_string()),
    )
}

/// Open conflicts of a node: (conflict id, kind, table, record).
async fn open_conflicts(node: &TestNode) -> Vec<(String, String, String, String)> {
    node.reader()
        .fetch_all(
            "SELECT conflict_id, kind, table_name, record_id FROM tidemark_conflicts \
             WHERE status = 'open' ORDER BY conflict_id",
        )
        .await
}

/// The values of every sample of metric `name` on `node`, whatever its labels.
async fn samples(node: &TestNode, name: &str) -> Vec<f64> {
    let (_, body) = node.http_get("/metrics").await;
    body.lines()
        .filter_map(|l| {
            let (sample, value) = l.rsplit_once(' ')?;
            let labels = sample.strip_prefix(name)?;
            (labels.is_empty() || labels.starts_with('{'))
                .then(|| value.parse().ok())
                .flatten()
        })
        .collect()
}

/// The sample of metric `name` for `node`'s peer `peer`.
fn per_peer(name: &str, peer: &TestNode) -> String {
    format!("{name}{{peer=\"{}\"}}", peer.id)
}

/// Waits until `node`'s metric sample `sample` reads `want` (gauges are
/// refreshed every second).
async fn wait_metric(node: &TestNode, sample: &str, want: f64) {
    let what = format!("{} reports {sample} = {want}", node.name);
    wait_for(&what, WAIT, async || {
        node.metric(sample).await == Some(want)
    })
    .await;
}

async fn status(node: &TestNode) -> pb::StatusResponse {
    node.admin()
        .await
        .status(pb::StatusRequest {})
        .await
        .unwrap_or_else(|s| panic!("status of {}: {s}", node.name))
        .into_inner()
}

// ---------------------------------------------------------------------------------
// Convergence

/// Rows of one table, typed, by id.
type Rows = BTreeMap<String, Vec<Val>>;

/// Waits until every node says it has nothing unsynced and nothing captured
/// but unstamped; then, with no further wait, the nodes must agree: every event
/// everywhere per origin (`committed` among them), identical notes, versions,
/// blocked records and conflicts, identical `tables` value for value, intact
/// databases. Finally every peer lag gauge returns to 0. Returns the tables.
async fn settled(
    cluster: &Cluster,
    tables: &[(&str, &[(&str, Class)])],
    committed: &[String],
) -> Vec<Rows> {
    wait_for("every node reports nothing unsynced", WAIT, async || {
        for node in &cluster.nodes {
            let s = status(node).await;
            if s.unsynced_events > 0 || s.pending_captures > 0 {
                return false;
            }
        }
        true
    })
    .await;
    check::after_heal(cluster, committed).await;
    check::assert_same_blocked(&cluster.nodes).await;
    let mut all = Vec::new();
    for (table, columns) in tables {
        let first = typed::rows(cluster.nodes[0].reader(), table, columns).await;
        for node in &cluster.nodes[1..] {
            let rows = typed::rows(node.reader(), table, columns).await;
            assert_eq!(rows, first, "{table} on {} and node0", node.name);
        }
        all.push(first);
    }
    for node in &cluster.nodes {
        lag_gauges_at_zero(node).await;
    }
    all
}

/// Waits until every `tidemark_peer_unacked_events` gauge of `node` reads 0.
async fn lag_gauges_at_zero(node: &TestNode) {
    wait_for(
        &format!("{}'s peer lag gauges at 0", node.name),
        WAIT,
        async || {
            let lags = samples(node, "tidemark_peer_unacked_events").await;
            !lags.is_empty() && lags.iter().all(|v| *v == 0.0)
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_clash_across_sqlite_sqlite_postgres_through_a_chain() {
    let (mut cluster, links) = chain(&["sqlite", "sqlite", "postgres"], &[USERS, ORDERS]).await;
    start(&mut cluster).await;
    // node2 (PostgreSQL) is cut off from node1, so from node0 too.
    cut(&links, 1, 2);
    let (n0, n1, n2) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let (early, late, order) = (Ulid::generate(), Ulid::generate(), Ulid::generate());
    let email = "ada@example.test";
    // The applications write directly: node2 first, a user and her order ...
    n2.db.sql(&format!(
        "INSERT INTO users (id, email, name, age) VALUES ('{early}', '{email}', 'Ada (node2)', 36)"
    ));
    n2.db.sql(&format!(
        "INSERT INTO orders (id, user_id, amount) VALUES ('{order}', '{early}', 4200)"
    ));
    let early_event = stamped(n2, "users", early).await;
    let order_event = stamped(n2, "orders", order).await;
    // ... then node0, a user with the same email: the greater write.
    n0.db.sql(&format!(
        "INSERT INTO users (id, email, name, age) VALUES ('{late}', '{email}', 'Ada (node0)', 37)"
    ));
    let late_event = stamped(n0, "users", late).await;
    assert!(
        order_of(n0, &late_event).await > order_of(n2, &early_event).await,
        "node0's user, written after node2's was stamped, must be the greater write"
    );
    wait_for("node1 holds node0's user", PROMPTLY, async || {
        has_event(n1, &late_event).await
    })
    .await;
    assert!(!has_event(n2, &late_event).await && !has_event(n1, &early_event).await);
    assert!(n1.reader().is_unsynced(&late_event).await);
    assert!(n2.reader().is_unsynced(&early_event).await);
    check::assert_prefixes(&cluster.nodes).await;

    links.heal();
    let committed = [early_event.clone(), order_event.clone(), late_event.clone()];
    let tables = settled(
        &cluster,
        &[("users", USER_COLUMNS), ("orders", ORDER_COLUMNS)],
        &committed,
    )
    .await;
    // The greater write holds the email; the other user and, behind her, her
    // order are blocked, on every node.
    let ada = |name: &str, email: &str, age| {
        vec![
            Val::Text(email.into()),
            Val::Text(name.into()),
            Val::Int(age),
        ]
    };
    assert_eq!(
        tables[0],
        Rows::from([(late.to_string(), ada("Ada (node0)", email, 37))])
    );
    assert_eq!(
        tables[1],
        Rows::new(),
        "the order is placed iff its user is"
    );
    for node in &cluster.nodes {
        assert_eq!(
            blocked(node).await,
            [
                blocked_row("orders", order, &order_event, "foreign_key", early),
                blocked_row("users", early, &early_event, "unique", late),
            ],
            "{}",
            node.name
        );
        // One open conflict, the UNIQUE clash, whose id is the losing write's.
        assert_eq!(
            open_conflicts(node).await,
            [(
                early_event.clone(),
                "unique".into(),
                "users".into(),
                early.to_string()
            )],
            "{}",
            node.name
        );
        let listed = node
            .admin()
            .await
            .list_conflicts(pb::ListConflictsRequest {
                status: "open".into(),
                ..Default::default()
            })
            .await
            .expect("list conflicts")
            .into_inner()
            .conflicts;
        let [conflict] = listed.as_slice() else {
            panic!("{}: one open conflict expected: {listed:?}", node.name);
        };
        let (shown, lost) = (conflict.local.as_ref(), conflict.remote.as_ref());
        assert_eq!(
            (
                shown.map(|v| v.event_id.as_str()),
                lost.map(|v| v.event_id.as_str())
            ),
            (Some(late_event.as_str()), Some(early_event.as_str())),
            "{}: {conflict:?}",
            node.name
        );
        wait_metric(node, "tidemark_blocked_records", 2.0).await;
    }
    wait_metric(n1, &per_peer("tidemark_peer_blocked_records", n2), 2.0).await;

    // An operator on node0 keeps both users: the blocked one gets another email.
    let resolved = n0
        .admin()
        .await
        .resolve_conflict(pb::ResolveConflictRequest {
            conflict_id: early_event.clone(),
            choice: pb::ResolveChoice::Merged as i32,
            values_json: json!({"email": "ada.node2@example.test"}).to_string(),
            resolved_by: "ops".into(),
            note: "two people, two emails".into(),
            expected_winner_event_id: late_event.clone(),
        })
        .await
        .expect("resolve")
        .into_inner();
    let mut committed = committed.to_vec();
    committed.push(resolved.event_id);
    let tables = settled(
        &cluster,
        &[("users", USER_COLUMNS), ("orders", ORDER_COLUMNS)],
        &committed,
    )
    .await;
    assert_eq!(
        tables[0],
        Rows::from([
            (late.to_string(), ada("Ada (node0)", email, 37)),
            (
                early.to_string(),
                ada("Ada (node2)", "ada.node2@example.test", 36)
            ),
        ])
    );
    assert_eq!(
        tables[1],
        Rows::from([(
            order.to_string(),
            vec![Val::Text(early.to_string()), Val::Int(4200)]
        )])
    );
    for node in &cluster.nodes {
        assert_eq!(blocked(node).await, [], "{}", node.name);
        assert_eq!(open_conflicts(node).await, [], "{}", node.name);
        let conflict = node
            .admin()
            .await
            .get_conflict(pb::GetConflictRequest {
                conflict_id: early_event.clone(),
            })
            .await
            .expect("get conflict")
            .into_inner();
        assert_eq!(
            (
                conflict.status.as_str(),
                conflict.resolution.as_str(),
                conflict.resolved_by.as_str()
            ),
            ("resolved", "merged", "ops"),
            "{}",
            node.name
        );
        wait_metric(node, "tidemark_blocked_records", 0.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_relayed_ahead_of_its_parent_waits() {
    let (mut cluster, links) = chain(&["sqlite", "sqlite", "sqlite"], &[USERS, ORDERS]).await;
    start(&mut cluster).await;
    cut(&links, 0, 1);
    let (n0, n1, n2) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let (user, order) = (Ulid::generate(), Ulid::generate());
    let parent = n0
        .put_to(
            "users",
            user,
            json!({"email": "grace@example.test", "name": "Grace", "age": 45}),
        )
        .await
        .expect("put the user")
        .event_id;
    // node1 lacks the user. The daemon's own connection enforces the key ...
    let child = json!({"user_id": user.to_string(), "amount": 100});
    let refused = n1
        .put_to("orders", order, child)
        .await
        .expect_err("an order for a user node1 does not have");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("FOREIGN KEY"), "{refused:?}");
    // ... the application's sqlite3 connection does not (SQLite checks foreign
    // keys only when the connection asks): the order is written and captured.
    n1.db.sql(&format!(
        "INSERT INTO orders (id, user_id, amount) VALUES ('{order}', '{user}', 100)"
    ));
    let child_event = stamped(n1, "orders", order).await;
    // node2 gets the order from node1, before its user: it waits, no conflict.
    wait_for("node2 holds the order's event", PROMPTLY, async || {
        has_event(n2, &child_event).await
    })
    .await;
    assert!(!has_event(n2, &parent).await && !has_event(n1, &parent).await);
    assert!(!has_event(n0, &child_event).await);
    assert_eq!(
        typed::rows(n2.reader(), "orders", ORDER_COLUMNS).await,
        Rows::new(),
        "node2 placed an order whose user it does not have"
    );
    assert_eq!(
        blocked(n2).await,
        [blocked_row(
            "orders",
            order,
            &child_event,
            "foreign_key",
            user
        )]
    );
    assert_eq!(open_conflicts(n2).await, []);
    wait_metric(n2, "tidemark_blocked_records", 1.0).await;
    wait_metric(n1, &per_peer("tidemark_peer_blocked_records", n2), 1.0).await;
    assert!(n1.reader().is_unsynced(&child_event).await);
    check::assert_prefixes(&cluster.nodes).await;

    // The user arrives: the order is placed on every node.
    links.heal();
    let tables = settled(
        &cluster,
        &[("users", USER_COLUMNS), ("orders", ORDER_COLUMNS)],
        &[parent, child_event],
    )
    .await;
    assert_eq!(
        tables[1],
        Rows::from([(
            order.to_string(),
            vec![Val::Text(user.to_string()), Val::Int(100)]
        )])
    );
    assert_eq!(
        tables[0],
        Rows::from([(
            user.to_string(),
            vec![
                Val::Text("grace@example.test".into()),
                Val::Text("Grace".into()),
                Val::Int(45)
            ]
        )])
    );
    for node in &cluster.nodes {
        assert_eq!(blocked(node).await, [], "{}", node.name);
        assert_eq!(open_conflicts(node).await, [], "{}", node.name);
        wait_metric(node, "tidemark_blocked_records", 0.0).await;
    }
}

/// SQL for a text of `mib` MiB of `letter`, built inside SQLite (a command
/// line cannot carry 20 MB).
fn sqlite_text(mib: usize, letter: char) -> String {
    format!("replace(hex(zeroblob({})), '0', '{letter}')", mib << 19)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_megabyte_write_never_stalls_a_link() {
    let cluster = pair(["sqlite", "sqlite"], &[DOCS]).await;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mib = |n: usize, letter: char| letter.to_string().repeat(n << 20);
    let (api, direct) = (Ulid::generate(), Ulid::generate());

    // Through the API: refused, naming the limit.
    let refused = n0
        .put_to("docs", api, json!({"body": mib(20, 'a')}))
        .await
        .expect_err("a 20 MB put");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("store.max_event_bytes"),
        "{refused:?}"
    );

    // Directly: set aside (logged, counted, listed), the row stays on node0.
    n0.db.sql(&format!(
        "INSERT INTO docs (id, body) VALUES ('{direct}', {})",
        sqlite_text(20, 'd')
    ));
    wait_metric(n0, "tidemark_captures_set_aside_total", 1.0).await;
    assert!(n0.log_contains("a direct write cannot be replicated: set aside"));
    let aside: Vec<(String, String, String)> = n0
        .reader()
        .fetch_all("SELECT record_id, operation, reason FROM tidemark_unreplicated")
        .await;
    let [(record, operation, reason)] = aside.as_slice() else {
        panic!("one write set aside: {aside:?}");
    };
    assert_eq!(
        (record, operation.as_str()),
        (&direct.to_string(), "INSERT")
    );
    assert!(reason.contains("store.max_event_bytes"), "{reason}");

    // Writes after both replicate promptly, by the API and directly.
    let (small, later) = (Ulid::generate(), Ulid::generate());
    let mut committed = vec![
        n0.put_to("docs", small, json!({"body": "small"}))
            .await
            .expect("small put")
            .event_id,
    ];
    n0.db.sql(&format!(
        "INSERT INTO docs (id, body) VALUES ('{later}', 'later')"
    ));
    wait_for("node1 has both later writes", PROMPTLY, async || {
        typed::rows(n1.reader(), "docs", DOC_COLUMNS).await.len() == 2
    })
    .await;

    // 6 MB updates, under the default limit: one by the API, one directly,
    // then a small insert behind them.
    committed.push(
        n0.put_to("docs", small, json!({"body": mib(6, 'p')}))
            .await
            .expect("6 MB put")
            .event_id,
    );
    n0.db.sql(&format!(
        "UPDATE docs SET body = {} WHERE id = '{small}'",
        sqlite_text(6, 'q')
    ));
    let last = Ulid::generate();
    committed.push(
        n0.put_to("docs", last, json!({"body": "after the big ones"}))
            .await
            .expect("put after")
            .event_id,
    );
    wait_for(
        "node1 has the write behind the 6 MB ones",
        PROMPTLY,
        async || has_event(n1, committed.last().expect("written")).await,
    )
    .await;

    settled(&cluster, &[], &committed).await;
    let mut mine = typed::rows(n0.reader(), "docs", DOC_COLUMNS).await;
    let theirs = typed::rows(n1.reader(), "docs", DOC_COLUMNS).await;
    let kept = mine
        .remove(&direct.to_string())
        .expect("the row set aside stays");
    assert_eq!(kept, [Val::Text(mib(20, 'd'))]);
    assert_eq!(mine, theirs, "docs besides the row set aside");
    let body = |text: String| vec![Val::Text(text)];
    assert_eq!(
        theirs,
        Rows::from([
            (small.to_string(), body(mib(6, 'q'))),
            (later.to_string(), body("later".into())),
            (last.to_string(), body("after the big ones".into())),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_two_minutes_ahead_holds_only_itself_in_a_chain() {
    let (mut cluster, _links) = chain(&["sqlite", "sqlite", "sqlite"], &[]).await;
    cluster.nodes[0].set_config("clock", "offset_ms", "120000");
    start(&mut cluster).await;
    let put = async |node: &TestNode, title: &str| {
        node.put(Ulid::generate(), json!({"title": title}))
            .await
            .event_id
    };
    let mut ahead = Vec::new();
    let mut behind = Vec::new();
    for i in 0..3 {
        ahead.push(put(&cluster.nodes[0], &format!("ahead {i}")).await);
        behind.push(put(&cluster.nodes[2], &format!("behind {i}")).await);
    }
    let (n0, n1, n2) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    // node2's writes reach node1 and, relayed, node0 promptly, and are synced.
    wait_for(
        "node2's writes reach node0 and node1",
        PROMPTLY,
        async || {
            for e in &behind {
                if !has_event(n0, e).await || !has_event(n1, e).await {
                    return false;
                }
            }
            true
        },
    )
    .await;
    wait_for("node2's writes synced", PROMPTLY, async || {
        !n2.reader().is_unsynced(&behind[2]).await
    })
    .await;
    // node1 holds node0's origin and tells node0, which shows it.
    wait_for("node1 holds node0's origin", PROMPTLY, async || {
        n1.log_contains("origin held: its events wait, the others go on")
    })
    .await;
    wait_for("node0 learns of the hold", PROMPTLY, async || {
        n0.log_contains("peer holds an origin: its events wait, the others go on")
    })
    .await;
    let held = n0.metric(&per_peer("tidemark_peer_held_origins", n1)).await;
    assert!(
        held.is_some_and(|h| h > 0.0),
        "node0 shows no hold: {held:?}"
    );
    // node0's writes are kept, unsynced, and nowhere else yet; its lag says so.
    for e in &ahead {
        assert!(n0.reader().is_unsynced(e).await, "{e} synced");
        assert!(!has_event(n1, e).await && !has_event(n2, e).await);
    }
    wait_metric(n0, &per_peer("tidemark_peer_unacked_events", n1), 3.0).await;
    assert_eq!(status(n0).await.unsynced_events, 3);
    for node in [n1, n2] {
        lag_gauges_at_zero(node).await;
    }
    check::assert_prefixes(&cluster.nodes).await;
    for node in &cluster.nodes {
        check::assert_integrity(node).await;
    }

    // The operator lets node1 and node2 accept a clock ten minutes ahead:
    // node0's writes flow, nothing was lost.
    for i in [1, 2] {
        let node = &mut cluster.nodes[i];
        node.stop();
        node.set_config("clock", "max_drift_ms", "600000");
        node.start().await;
    }
    let committed: Vec<String> = ahead.into_iter().chain(behind).collect();
    settled(&cluster, &[], &committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_cluster_carries_exact_values() {
    let cluster = pair(["sqlite", "postgres"], &[schema::READINGS]).await;
    let (lite, pg) = (&cluster.nodes[0], &cluster.nodes[1]);
    let ids: Vec<Ulid> = (0..7).map(|_| Ulid::generate()).collect();
    let insert = "INSERT INTO readings (id, i, s, f, d, t, b, dt, ts, u, j, bl) VALUES";
    // SQLite: arithmetic done by SQLite, extreme integers, a long decimal.
    lite.db.sql(&format!(
        "{insert} ('{}', 9223372036854775807, -32768, 0.1 + 0.2, '-12345678901234567890.123456789', \
         'naïve café ☃ 𝄞', 1, '2024-02-29', '2024-02-29T23:59:59.999999Z', \
         '0189c3f4-8e1a-7b2c-9d3e-4f5a6b7c8d9e', '{{\"a\":[1,2.5,\"x\"],\"b\":null}}', x'00ff7f80')",
        ids[0]
    ));
    // An infinite double, then more writes behind it.
    lite.db.sql(&format!(
        "INSERT INTO readings (id, f) VALUES ('{}', 1e308 * 10)",
        ids[1]
    ));
    lite.db.sql(&format!(
        "{insert} ('{}', -9223372036854775808, 0, 5e-324, '0.000000000000000000000000000000000001', \
         '', 0, '9999-12-31', '1970-01-01T00:00:00Z', '00000000-0000-0000-0000-000000000000', \
         '[]', x'')",
        ids[2]
    ));
    // PostgreSQL: a 40-digit numeric, the smallest normal double, -Infinity.
    pg.db.sql(&format!(
        "{insert} ('{}', -1, 32767, 2.2250738585072014e-308, \
         1234567890123456789012345678901234567890, 'pg ✓', false, '0001-01-01', \
         '0001-01-01 00:00:00.000001+00', 'ffffffff-ffff-ffff-ffff-ffffffffffff', \
         '{{\"z\": {{\"y\": [true, \"ü\"]}}, \"n\": 0.1}}', '\\x00deadbeef00'::bytea)",
        ids[3]
    ));
    pg.db.sql(&format!(
        "INSERT INTO readings (id, f, d) VALUES ('{}', '-Infinity', \
         -98765432109876543210.98765432109876543210)",
        ids[4]
    ));
    // Written on one backend, changed on the other.
    wait_for("PostgreSQL has SQLite's first row", PROMPTLY, async || {
        typed::rows(pg.reader(), "readings", schema::READING_COLUMNS)
            .await
            .contains_key(&ids[0].to_string())
    })
    .await;
    pg.db.sql(&format!(
        "UPDATE readings SET f = f * 3, bl = bl || '\\x01'::bytea WHERE id = '{}'",
        ids[0]
    ));
    lite.db.sql(&format!(
        "INSERT INTO readings (id, f, t) VALUES ('{}', 1.7976931348623157e308, 'last')",
        ids[5]
    ));
    // And through the API: JSON numbers and strings as each class takes them.
    let api = pg
        .put_to(
            "readings",
            ids[6],
            json!({"f": 1e-300, "d": "-0.50", "b": true, "dt": "2000-02-29",
                   "u": "00112233-4455-6677-8899-aabbccddeeff", "bl": "AAEC"}),
        )
        .await
        .expect("API write")
        .event_id;

    let tables = settled(&cluster, &[("readings", schema::READING_COLUMNS)], &[api]).await;
    let rows = &tables[0];
    assert_eq!(rows.len(), ids.len(), "{rows:?}");
    // Row `n` (of `ids`), column `column`.
    let cell = |n: usize, column: &str| {
        let c = schema::READING_COLUMNS
            .iter()
            .position(|(name, _)| *name == column)
            .expect("column");
        rows[&ids[n].to_string()][c].clone()
    };
    let float = |x: f64| Val::Float(x.to_bits());
    let (dec, day, at) = (typed::decimal, typed::date, typed::instant);
    let expected = [
        (0, "i", Val::Int(i64::MAX)),
        (0, "s", Val::Int(-32768)),
        (0, "f", float((0.1 + 0.2) * 3.0)),
        (0, "d", dec("-12345678901234567890.123456789")),
        (0, "t", Val::Text("naïve café ☃ 𝄞".into())),
        (0, "b", Val::Bool(true)),
        (0, "dt", day(date!(2024 - 02 - 29))),
        (0, "ts", at(datetime!(2024-02-29 23:59:59.999999 UTC))),
        (0, "u", Val::Uuid(0x0189c3f4_8e1a_7b2c_9d3e_4f5a6b7c8d9e)),
        (0, "j", Val::Json(json!({"a": [1, 2.5, "x"], "b": null}))),
        (0, "bl", Val::Bytes(vec![0, 0xff, 0x7f, 0x80, 1])),
        (1, "f", float(f64::INFINITY)),
        (2, "f", float(5e-324)),
        (2, "i", Val::Int(i64::MIN)),
        (2, "bl", Val::Bytes(Vec::new())),
        (3, "f", float(2.2250738585072014e-308)),
        (3, "d", dec("1234567890123456789012345678901234567890")),
        (3, "dt", day(date!(0001 - 01 - 01))),
        (3, "ts", at(datetime!(0001-01-01 00:00:00.000001 UTC))),
        (
            3,
            "j",
            Val::Json(json!({"z": {"y": [true, "ü"]}, "n": 0.1})),
        ),
        (3, "bl", Val::Bytes(vec![0, 0xde, 0xad, 0xbe, 0xef, 0])),
        (4, "f", float(f64::NEG_INFINITY)),
        (4, "d", dec("-98765432109876543210.9876543210987654321")),
        (5, "f", float(f64::MAX)),
        (6, "f", float(1e-300)),
        (6, "d", dec("-0.5")),
        (6, "dt", day(date!(2000 - 02 - 29))),
        (6, "bl", Val::Bytes(vec![0, 1, 2])),
    ];
    for (n, column, want) in expected {
        assert_eq!(cell(n, column), want, "row {n} ({}).{column}", ids[n]);
    }
}
