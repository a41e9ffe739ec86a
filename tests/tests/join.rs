//! Adding a node to a running cluster, and what `/readyz` says meanwhile.
//!
//! * `a_fourth_node_joins_under_writes_and_is_never_ready_early`: a PostgreSQL
//!   node joins a running SQLite, SQLite, PostgreSQL mesh that holds a backlog
//!   of 24,000 events and keeps taking API writes of every column class, with
//!   concurrent updates of the same records (conflicts, `manual` ones among
//!   them) and deletes. It is killed (`kill -9`) three times while catching
//!   up; each restart resumes where its last commit left it (its positions
//!   never go back), it is never active (ready) before it holds what every
//!   peer held when it started, and it ends identical to the others: events,
//!   rows (typed, every class), record versions, conflict history, blocked
//!   records. The SQLite donors' WAL stays bounded while it copies (no read
//!   pins it).
//! * `a_node_seeded_from_a_file_snapshot_joins_and_its_clone_cannot_run_as_the_donor`:
//!   `tidemark snapshot create` copies a running SQLite node's database while
//!   API writes go on; started with the donor's id the copy is refused naming
//!   both, started with an id of its own it is ready having received only
//!   what came after the copy (not the log), and the three nodes converge.
//! * `a_postgres_node_seeded_with_pg_dump_and_strip_joins`: the documented
//!   PostgreSQL procedure: `pg_dump` of a running node, `pg_restore` into the
//!   new node's empty database, `tidemark snapshot strip`; the new node starts
//!   on it with its own id and the three nodes end identical.
//! * `a_delete_the_joiner_takes_stays_when_an_older_update_arrives_late`: a
//!   SQLite node joins a SQLite and PostgreSQL pair whose logs are compacted,
//!   while an update the PostgreSQL node made before the SQLite node's delete
//!   (concurrent with it, older) is held back by cut links: the joiner takes
//!   the delete, is not ready while its peer holds the update it lacks, and
//!   when the update arrives the row stays deleted everywhere, one decided
//!   conflict on every node.
//! * `a_node_whose_peers_are_down_is_not_ready`: a node whose only peer is
//!   down answers `/readyz` 503 (waiting for a peer) and says so in status and
//!   metrics; both are ready once the peer is up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tidemark_replicator::pb;
use tidemark_replicator::pb::records_client::RecordsClient;
use tidemark_tests::check;
use tidemark_tests::daemon::{Cluster, Table, TestNode, Topology, free_port, tidemark_bin};
use tidemark_tests::proxy::{Links, fault_seed};
use tidemark_tests::schema;
use tidemark_tests::typed;
use ulid::Ulid;

const USERS: Table = Table {
    name: "users",
    ddl: schema::users_ddl,
    policy: "manual",
    sqlite_types: "",
};

/// Backlog rows each of the first three nodes writes before the fourth starts.
const BACKLOG: usize = 8_000;
/// Longest wait for anything the cluster should do.
const WAIT: Duration = Duration::from_secs(180);

async fn status(node: &TestNode) -> pb::StatusResponse {
    node.admin()
        .await
        .status(pb::StatusRequest {})
        .await
        .expect("admin status")
        .into_inner()
}

/// Per origin, (HLC, number of the last event held).
type Positions = BTreeMap<String, (i64, u64)>;

fn positions(s: &pb::StatusResponse) -> Positions {
    s.positions
        .iter()
        .map(|p| (p.origin.clone(), (p.hlc, p.seq)))
        .collect()
}

/// What every one of `all` holds: per origin, the least position (an origin
/// one of them lacks is left out).
fn common(all: &[Positions]) -> Positions {
    let mut out = all[0].clone();
    out.retain(|origin, _| all.iter().all(|p| p.contains_key(origin)));
    for p in &all[1..] {
        for (origin, (hlc, seq)) in out.iter_mut() {
            let (h, s) = p[origin];
            *hlc = (*hlc).min(h);
            *seq = (*seq).min(s);
        }
    }
    out
}

/// Origins where `have` is below `want`, with both positions.
fn short_of(have: &Positions, want: &Positions) -> Vec<String> {
    want.iter()
        .filter_map(|(origin, &(hlc, seq))| {
            let (h, s) = have.get(origin).copied().unwrap_or((0, 0));
            (h < hlc || s < seq)
                .then(|| format!("{origin}: holds ({h}, {s}), wants ({hlc}, {seq})"))
        })
        .collect()
}

/// Four times the WAL size at which the write connection's own checkpoint
/// runs (4,096 pages of 4 KiB): its passive checkpoints keep it well below.
const WAL_BOUND: u64 = 64 << 20;

/// Size of a SQLite node's WAL file (0 when there is none).
fn wal_bytes(node: &TestNode) -> u64 {
    let tidemark_tests::TestDb::Sqlite { path, .. } = &node.db else {
        return 0;
    };
    std::fs::metadata(format!("{}-wal", path.display())).map_or(0, |m| m.len())
}

/// Waits until the `/metrics` sample reads `want`.
async fn wait_metric(node: &TestNode, sample: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = node.metric(sample).await;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {sample} is {got:?}, not {want}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn total(p: &Positions) -> u64 {
    p.values().map(|(_, seq)| seq).sum()
}

/// Writes through the APIs of `urls` in turn until `stop`: typed readings,
/// updates of 20 shared notes and 8 shared users (written on several nodes
/// at once: conflicts, `manual` on users), and deletes of notes. Returns the
/// event id of every acknowledged write.
async fn load(urls: Vec<String>, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut clients = Vec::new();
    for url in &urls {
        clients.push(RecordsClient::connect(url.clone()).await.expect("connect"));
    }
    let notes: Vec<Ulid> = (0..20).map(|_| Ulid::generate()).collect();
    let users: Vec<Ulid> = (0..8).map(|_| Ulid::generate()).collect();
    let mut written = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let n = clients.len();
        let client = &mut clients[i % n];
        let mut put = async |table: &str, id: Ulid, values: serde_json::Value| {
            let r = client
                .put(pb::PutRequest {
                    table: table.into(),
                    id: id.to_string(),
                    values_json: values.to_string(),
                })
                .await
                .unwrap_or_else(|e| panic!("put {table} {id}: {e}"));
            r.into_inner().event_id
        };
        let note = notes[i % notes.len()];
        written.push(put("notes", note, json!({"title": format!("t{i}"), "stars": i})).await);
        if i.is_multiple_of(2) {
            written.push(
                put(
                    "readings",
                    Ulid::generate(),
                    json!({"i": i, "s": (i % 300) as i64 - 150, "f": i as f64 * 0.1 + 1e-300,
                           "d": format!("-{i}.0000000000000000000001"), "t": format!("naïve ☃ {i}"),
                           "b": i.is_multiple_of(4), "dt": "2024-02-29",
                           "u": "00112233-4455-6677-8899-aabbccddeeff", "bl": "AAEC/w=="}),
                )
                .await,
            );
        }
        if i.is_multiple_of(3) {
            let k = (i / 3) % users.len();
            written.push(
                put(
                    "users",
                    users[k],
                    json!({"email": format!("user{k}@example.com"), "name": format!("n{i}"), "age": i % 150}),
                )
                .await,
            );
        }
        if i % 10 == 9 {
            let r = client
                .delete(pb::DeleteRequest {
                    table: "notes".into(),
                    id: notes[(i / 10) % notes.len()].to_string(),
                })
                .await
                .expect("delete");
            written.push(r.into_inner().event_id);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    written
}

/// One INSERT of `n` notes through the node's database client (ids: a
/// fresh ULID's first 16 characters and a 10-digit counter).
fn backlog(node: &TestNode, n: usize) {
    let prefix = &Ulid::generate().to_string()[..16];
    let name = &node.name;
    node.db.sql(&match node.db.kind() {
        "postgres" => format!(
            "INSERT INTO notes (id, title, body, stars) SELECT '{prefix}' || lpad(i::text, 10, '0'), \
             'backlog {name} ' || i, 'body', i FROM generate_series(1, {n}) AS i"
        ),
        _ => format!(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) \
             INSERT INTO notes (id, title, body, stars) SELECT '{prefix}' || printf('%010d', i), \
             'backlog {name} ' || i, 'body', i FROM c"
        ),
    });
}

/// A mesh of `backends` replicating notes, users and readings, whose first
/// `started` nodes run: each wrote `backlog_each` notes by SQL, every one of
/// them holds all of those, and [`load`] writes through their APIs until
/// [`Loaded::finish`]. The other nodes are configured and not started.
struct Loaded {
    cluster: Cluster,
    stop: Arc<AtomicBool>,
    writer: tokio::task::JoinHandle<Vec<String>>,
}

impl Loaded {
    async fn start(backends: &[&str], started: usize, backlog_each: usize) -> Loaded {
        let mut cluster = Cluster::prepare_with(
            backends,
            Topology::Mesh,
            "test",
            "",
            &[USERS, schema::READINGS],
        );
        for node in &mut cluster.nodes[..started] {
            node.start().await;
        }
        for node in &cluster.nodes[..started] {
            backlog(node, backlog_each);
        }
        let want = (started * backlog_each) as u64;
        let deadline = Instant::now() + WAIT;
        loop {
            let mut totals = Vec::new();
            for node in &cluster.nodes[..started] {
                totals.push(total(&positions(&status(node).await)));
            }
            if totals.iter().all(|t| *t >= want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the backlog did not spread: {totals:?} of {want}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(load(
            cluster.nodes[..started]
                .iter()
                .map(TestNode::grpc_url)
                .collect(),
            stop.clone(),
        ));
        Loaded {
            cluster,
            stop,
            writer,
        }
    }

    /// Stops the writes; the event id of every acknowledged one.
    async fn finish(self) -> (Cluster, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let written = self.writer.await.expect("writer");
        (self.cluster, written)
    }

    /// Starts node `i` (the one joining), waits until it is ready, stops the
    /// writes, and checks the cluster ends as one: every acknowledged write
    /// everywhere, one state (events, rows, versions, conflicts), blocked
    /// records and typed readings alike.
    async fn join_and_settle(mut self, i: usize) -> Cluster {
        self.cluster.nodes[i].start().await;
        self.cluster.nodes[i].wait_ready(WAIT).await;
        let (cluster, written) = self.finish().await;
        settled(&cluster, &written).await;
        cluster
    }
}

/// The cluster converged with every write in `written`, one state, the same
/// blocked records, and the same readings, typed, on every node.
async fn settled(cluster: &Cluster, written: &[String]) {
    cluster.converged(WAIT).await;
    check::after_heal(cluster, written).await;
    check::assert_same_blocked(&cluster.nodes).await;
    let reference = typed::rows(
        cluster.nodes[0].reader(),
        "readings",
        schema::READING_COLUMNS,
    )
    .await;
    assert!(!reference.is_empty());
    for node in &cluster.nodes[1..] {
        let rows = typed::rows(node.reader(), "readings", schema::READING_COLUMNS).await;
        assert!(
            rows == reference,
            "{}: readings differ from node0's",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_under_writes_and_is_never_ready_early() {
    let mut loaded = Loaded::start(&["sqlite", "sqlite", "postgres", "postgres"], 3, BACKLOG).await;
    let cluster = &mut loaded.cluster;

    let mut last_seen = Positions::new();
    // The SQLite donors' WAL while the joiner copies: a read that pinned it
    // would let it grow with every write meanwhile.
    let mut wal_peak = 0u64;
    for round in 0..4 {
        // What every peer holds now: the joiner may not be active before it
        // holds all of it.
        let mut peers = Vec::new();
        for node in &cluster.nodes[..3] {
            peers.push(positions(&status(node).await));
        }
        let floor = common(&peers);
        cluster.nodes[3].start().await;
        let joiner = &cluster.nodes[3];
        let at_start = positions(&status(joiner).await);
        assert!(
            short_of(&at_start, &last_seen).is_empty(),
            "round {round}: the joiner's positions went back after the restart: {:?}",
            short_of(&at_start, &last_seen)
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let s = status(joiner).await;
            let have = positions(&s);
            if s.state == "active" {
                let short = short_of(&have, &floor);
                assert!(
                    short.is_empty(),
                    "round {round}: active before holding what its peers held at its start: {short:?}"
                );
                assert!(
                    round == 3,
                    "round {round}: caught up before it could be killed mid-way (raise BACKLOG)"
                );
                assert_eq!(joiner.http_get("/readyz").await.0, 200);
                break;
            }
            for donor in &cluster.nodes[..2] {
                wal_peak = wal_peak.max(wal_bytes(donor));
            }
            let (code, body) = joiner.http_get("/readyz").await;
            // Active may have come between the two reads; never the reverse.
            if code == 200 {
                assert_eq!(status(joiner).await.state, "active", "ready but not active");
            } else {
                assert_eq!(code, 503, "{body}");
            }
            if round < 3 && s.state == "catching_up" && total(&have) >= total(&at_start) + 2_000 {
                assert!(
                    s.catchup_remaining_events > 0,
                    "catching up with 0 remaining"
                );
                last_seen = have;
                cluster.nodes[3].kill();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the joiner is still {} ({} events remaining)\n{}",
                s.state,
                s.catchup_remaining_events,
                joiner.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("donors' WAL peak while the joiner copied: {wal_peak} bytes");
    assert!(
        wal_peak < WAL_BOUND,
        "a donor's WAL reached {wal_peak} bytes while the joiner copied (bound {WAL_BOUND})"
    );
    // The gauges follow within a refresh (a second).
    let joiner = &cluster.nodes[3];
    wait_metric(joiner, "tidemark_node_state{state=\"active\"}", 1.0).await;
    wait_metric(joiner, "tidemark_node_state{state=\"catching_up\"}", 0.0).await;
    wait_metric(joiner, "tidemark_catchup_remaining_events", 0.0).await;

    let (cluster, written) = loaded.finish().await;
    settled(&cluster, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_peers_are_down_is_not_ready() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    cluster.nodes[0].start().await;
    let a = &cluster.nodes[0];
    // Its only peer is down: it cannot know what it lacks.
    for _ in 0..10 {
        let (code, body) = a.http_get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body, "waiting for a peer's session\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(a).await.state, "waiting_for_peer");
    wait_metric(a, "tidemark_node_state{state=\"waiting_for_peer\"}", 1.0).await;
    wait_metric(a, "tidemark_node_state{state=\"active\"}", 0.0).await;
    cluster.nodes[1].start().await;
    for node in &cluster.nodes {
        node.wait_ready(Duration::from_secs(60)).await;
        assert_eq!(status(node).await.state, "active");
    }
}

/// Sum of every sample of a counter family in `/metrics`.
async fn counter_sum(node: &TestNode, name: &str) -> f64 {
    let (_, body) = node.http_get("/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Runs `tidemark snapshot create` of `donor`'s database to `out`.
fn snapshot_create(donor: &TestNode, out: &std::path::Path) -> std::process::Output {
    std::process::Command::new(tidemark_bin())
        .args(["snapshot", "create", "--config"])
        .arg(donor.config_path())
        .arg("--out")
        .arg(out)
        .output()
        .expect("run tidemark snapshot create")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_seeded_from_a_file_snapshot_joins_and_its_clone_cannot_run_as_the_donor() {
    let mut loaded = Loaded::start(&["sqlite", "sqlite", "sqlite"], 2, 3_000).await;
    let cluster = &mut loaded.cluster;

    // The new node's database is a copy of node0's, taken while it runs.
    let tidemark_tests::TestDb::Sqlite { path, .. } = &cluster.nodes[2].db else {
        unreachable!()
    };
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let out = snapshot_create(&cluster.nodes[0], path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "snapshot create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("a snapshot of node {}", cluster.nodes[0].id)),
        "{stdout}"
    );
    let copied = cluster.nodes[2]
        .db
        .sql("SELECT COUNT(*) FROM change_events")
        .trim()
        .parse::<u64>()
        .expect("count");
    assert!(copied >= 6_000, "the snapshot holds {copied} events");
    // A second snapshot onto the same file is refused: nothing is overwritten.
    let again = snapshot_create(&cluster.nodes[0], path);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    // Started as its donor (node0's config on the copy), it is refused.
    let clone = cluster.nodes[2].dir.join("clone.toml");
    let text = std::fs::read_to_string(cluster.nodes[0].config_path())
        .expect("read config")
        .replace(&cluster.nodes[0].db.url(), &cluster.nodes[2].db.url())
        .replace(
            &format!("127.0.0.1:{}\"\nmetrics", cluster.nodes[0].port),
            &format!("127.0.0.1:{}\"\nmetrics", free_port()),
        )
        .replace(
            &format!("127.0.0.1:{}\"", cluster.nodes[0].metrics_port),
            &format!("127.0.0.1:{}\"", free_port()),
        );
    std::fs::write(&clone, text).expect("write clone config");
    let refused = std::process::Command::new(tidemark_bin())
        .args(["run", "--config"])
        .arg(&clone)
        .output()
        .expect("run the clone");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the clone ran as its donor");
    assert!(
        stderr.contains(&format!(
            "this database is a snapshot of node {}, the id this node is configured with",
            cluster.nodes[0].id
        )),
        "{stderr}"
    );

    // With an id of its own it needs only what came after the copy.
    let cluster = loaded.join_and_settle(2).await;
    let received = counter_sum(&cluster.nodes[2], "tidemark_events_applied_total").await
        + counter_sum(&cluster.nodes[2], "tidemark_events_skipped_total").await;
    let held = cluster.nodes[2]
        .db
        .sql("SELECT COUNT(*) FROM change_events")
        .trim()
        .parse::<f64>()
        .expect("count");
    assert!(
        received < held - copied as f64 + 1_000.0,
        "node2 received {received} events for a log of {held}, {copied} of them copied"
    );
    let meta = cluster.nodes[2]
        .db
        .sql("SELECT key || '=' || value FROM tidemark_meta WHERE key IN ('node_id', 'snapshot_of') ORDER BY key");
    assert_eq!(
        meta.trim(),
        format!(
            "node_id={}\nsnapshot_of={}",
            cluster.nodes[2].id, cluster.nodes[0].id
        )
    );
}

/// Runs a PostgreSQL client tool, panicking with its output when it fails.
fn run_tool(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (Debian: postgresql-client): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_node_seeded_with_pg_dump_and_strip_joins() {
    let mut loaded = Loaded::start(&["postgres", "postgres", "postgres"], 2, 1_000).await;
    let cluster = &mut loaded.cluster;

    // node2's database: an empty one, restored from a dump of running node0.
    let dump = cluster.nodes[2].dir.join("node0.dump");
    let dump = dump.to_str().expect("utf-8 path");
    let donor_url = cluster.nodes[0].db.url();
    run_tool(
        "pg_dump",
        &["--format=custom", "--file", dump, "--dbname", &donor_url],
    );
    let fresh = tidemark_tests::PgCluster::shared().create_database();
    run_tool("pg_restore", &["--no-owner", "--dbname", &fresh, dump]);
    let config = std::fs::read_to_string(cluster.nodes[2].config_path())
        .expect("read config")
        .replace(&cluster.nodes[2].db.url(), &fresh);
    std::fs::write(cluster.nodes[2].config_path(), config).expect("write config");
    cluster.nodes[2].db = tidemark_tests::TestDb::Postgres { url: fresh.clone() };
    let stripped = run_tool(
        tidemark_bin().to_str().expect("utf-8 path"),
        &["snapshot", "strip", "--url", &fresh],
    );
    assert!(
        stripped.contains(&format!("a snapshot of node {}", cluster.nodes[0].id)),
        "{stripped}"
    );

    loaded.join_and_settle(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_the_joiner_takes_stays_when_an_older_update_arrives_late() {
    const RETENTION: &str = "[retention]\nenabled = true\nmin_age_secs = 0\nbatch = 50\nstep_pause_ms = 10\ninterval_secs = 1\n";
    let mut cluster = Cluster::prepare(
        &["sqlite", "postgres", "sqlite"],
        Topology::Mesh,
        "test",
        "",
    );
    let links = Links::mesh(&cluster, "test", RETENTION, fault_seed()).await;
    // The joiner is added to the others' peers only when it joins (until then
    // they would keep every event for it, uncompacted).
    let joiner_id = cluster.nodes[2].id;
    for node in &mut cluster.nodes[..2] {
        node.remove_peer(joiner_id);
        node.start().await;
    }
    let r = Ulid::generate();
    let events_of_r = async |node: &TestNode| -> Vec<String> {
        node.reader()
            .fetch_all::<(String,)>(&format!(
                "SELECT event_id FROM change_events WHERE record_id = '{r}' ORDER BY event_id"
            ))
            .await
            .into_iter()
            .map(|e| e.0)
            .collect()
    };
    // Three versions on node0; once node1 has them, the first two are
    // compacted on both.
    let mut history = Vec::new();
    for v in ["v1", "v2", "v3"] {
        history.push(cluster.nodes[0].put(r, json!({"title": v})).await.event_id);
    }
    let deadline = Instant::now() + WAIT;
    while events_of_r(&cluster.nodes[0]).await.len() != 1
        || events_of_r(&cluster.nodes[1]).await.len() != 1
    {
        assert!(Instant::now() < deadline, "r's log was not compacted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // node1's own events reach nobody now (its links out are cut), node0's
    // still reach node1.
    links.link(1, 0).partition();
    links.link(1, 2).partition();
    let update = cluster.nodes[1]
        .put(r, json!({"title": "older update from node1"}))
        .await
        .event_id;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let delete = cluster.nodes[0].delete(r).await.event_id;

    // The joiner is added (config, SIGHUP) and started. It takes node0's log
    // (the delete, compacted history) and learns from node1's welcome that
    // node1 holds an event of its own it lacks.
    for i in 0..2 {
        cluster.nodes[i].add_peer(joiner_id, links.link(i, 2).port());
        cluster.nodes[i].reload();
    }
    cluster.nodes[2].start().await;
    let joiner = &cluster.nodes[2];
    let deadline = Instant::now() + WAIT;
    while !events_of_r(joiner).await.contains(&delete) {
        assert!(
            Instant::now() < deadline,
            "the joiner did not get the delete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken = events_of_r(joiner).await;
    assert!(
        !taken.contains(&history[0]) && !taken.contains(&history[1]),
        "the joiner got compacted history: {taken:?} (v1, v2: {:?})",
        &history[..2]
    );
    assert!(!joiner.reader().rows().await.contains_key(&r.to_string()));
    // It knows what it lacks once node1 welcomed it, and stays unready: past
    // the grace for silent peers too (replication.startup_check_ms, 10 s).
    let mut lacking_since = None;
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(joiner).await;
        assert_ne!(s.state, "active", "ready while lacking node1's update");
        assert_eq!(joiner.http_get("/readyz").await.0, 503);
        if s.catchup_remaining_events > 0 {
            let since = *lacking_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(12) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "node1's welcome never came");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    links.heal();
    joiner.wait_ready(WAIT).await;
    cluster.converged(WAIT).await;
    let state = check::after_heal(&cluster, &[update.clone(), delete.clone()]).await;
    for node in &cluster.nodes {
        assert!(
            !node.reader().rows().await.contains_key(&r.to_string()),
            "{}: the older update brought r back",
            node.name
        );
    }
    // The late update lost to the delete: one decided conflict, the same on
    // every node (after_heal compared them).
    let decided: Vec<_> = state
        .conflicts
        .iter()
        .filter(|c| c.2 == r.to_string())
        .collect();
    assert_eq!(decided.len(), 1, "{decided:?}");
    assert_eq!(
        (&decided[0].4, &decided[0].5),
        (&delete, &update),
        "{decided:?}"
    );
}
