//! Network faults between real daemons, through a proxy on every directed link
//! (tests/src/proxy.rs): a symmetric partition, a one-way partition and flaky
//! links (random seeded cuts plus latency), each while every node keeps writing
//! through the write API and directly with its database's own client. While
//! the fault lasts, each side keeps a gap-free prefix of every origin and
//! nothing crosses a cut; after it heals, the four checks of tests/src/check.rs
//! hold. Replay a failure with the seed it printed: TIDEMARK_FAULT_SEED=N.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tidemark_replicator::pb::{self, records_client::RecordsClient};
use tidemark_tests::daemon::{Cluster, Topology};
use tidemark_tests::proxy::{Direction, Links, fault_seed};
use tidemark_tests::{TestDb, check, psql, sqlite3};
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(120);

/// Three nodes whose links all go through proxies, started; sessions give up on
/// a silent peer after 3 s so faults are noticed quickly.
async fn proxied_cluster(backends: &[&str]) -> (Cluster, Links) {
    let mut cluster = Cluster::prepare(backends, Topology::Mesh, "test", "");
    let links = Links::mesh(&cluster, "test", "", fault_seed()).await;
    for node in cluster.nodes.iter_mut() {
        node.set_config("replication", "ack_timeout_ms", "3000");
        node.set_config("replication", "connect_timeout_ms", "1000");
        node.start().await;
    }
    (cluster, links)
}

/// Where a writer sends direct SQL: the node's own database client.
#[derive(Clone)]
enum Direct {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Direct {
    fn of(db: &TestDb) -> Direct {
        match db {
            TestDb::Sqlite { path, .. } => Direct::Sqlite(path.clone()),
            TestDb::Postgres { url } => Direct::Postgres(url.clone()),
            TestDb::Memory { .. } => unreachable!("daemons run on SQLite or PostgreSQL"),
        }
    }

    async fn run(&self, sql: String) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || match &me {
            Direct::Sqlite(p) => sqlite3(p, &sql),
            Direct::Postgres(u) => psql(u, &sql),
        })
        .await
        .expect("client task")
        .unwrap_or_else(|e| panic!("direct write failed: {e}"));
    }
}

/// What one writer did: event ids acknowledged by the API, and records it
/// inserted directly.
#[derive(Debug, Default)]
struct Written {
    api_events: Vec<String>,
    direct_records: Vec<String>,
}

/// Writes on node `n` until `stop`: API puts racing on `shared` records, and
/// every third step a direct INSERT of a new record or UPDATE of a shared one.
async fn writer(
    n: usize,
    url: String,
    direct: Direct,
    shared: Vec<Ulid>,
    stop: Arc<AtomicBool>,
) -> Written {
    let mut out = Written::default();
    let mut client = RecordsClient::connect(url).await.expect("connect records");
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let id = shared[(i + n) % shared.len()];
        let r = client
            .put(pb::PutRequest {
                table: "notes".into(),
                id: id.to_string(),
                values_json: json!({"title": format!("api n{n} #{i}"), "stars": i}).to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("put on node{n}: {s}"));
        out.api_events.push(r.into_inner().event_id);
        if i.is_multiple_of(3) {
            if i.is_multiple_of(2) {
                let new = Ulid::generate();
                direct
                    .run(format!(
                        "INSERT INTO notes (id, title, body, stars) VALUES ('{new}', 'sql n{n} #{i}', 'direct', {i})"
                    ))
                    .await;
                out.direct_records.push(new.to_string());
            } else {
                let id = shared[(i + 2 * n + 1) % shared.len()];
                direct
                    .run(format!(
                        "UPDATE notes SET body = 'sql n{n} #{i}' WHERE id = '{id}'"
                    ))
                    .await;
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    out
}

/// Runs one writer per node for `period`, returns what each did.
async fn write_for(cluster: &Cluster, shared: &[Ulid], period: Duration) -> Vec<Written> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            tokio::spawn(writer(
                n,
                node.grpc_url(),
                Direct::of(&node.db),
                shared.to_vec(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(period).await;
    stop.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("writer"));
    }
    for (n, w) in out.iter().enumerate() {
        assert!(
            w.api_events.len() >= 3 && !w.direct_records.is_empty(),
            "node{n} wrote too little to test anything: {w:?}"
        );
    }
    out
}

/// Shared records written everywhere first, so later writes race on them.
async fn seed_records(cluster: &Cluster) -> Vec<Ulid> {
    let shared: Vec<Ulid> = (0..5).map(|_| Ulid::generate()).collect();
    for id in &shared {
        cluster.nodes[0]
            .put(*id, json!({"title": "seed", "stars": 0}))
            .await;
    }
    cluster.converged(CONVERGE).await;
    shared
}

async fn has_event(cluster: &Cluster, n: usize, event_id: &str) -> bool {
    cluster.nodes[n]
        .reader()
        .snapshot()
        .await
        .events
        .iter()
        .any(|e| e == event_id)
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After healing: converged, then the four checks, with every API-acknowledged
/// event and every directly inserted record present.
async fn heal_and_check(cluster: &Cluster, links: &Links, written: &[Written]) {
    links.heal();
    let snap = cluster.converged(CONVERGE).await;
    let committed: Vec<String> = written
        .iter()
        .flat_map(|w| w.api_events.iter().cloned())
        .collect();
    let state = check::after_heal(cluster, &committed).await;
    let recorded: std::collections::BTreeSet<&str> =
        state.versions.iter().map(|v| v.1.trim()).collect();
    for w in written {
        for r in &w.direct_records {
            assert!(
                recorded.contains(r.as_str()) && snap.rows.contains_key(r),
                "direct insert {r} lost"
            );
        }
    }
}

/// A peer that goes silent without closing anything (every byte both ways held,
/// as when a network drops packets) is noticed by the HTTP/2 keepalive, not by
/// the ack timeout: nothing is in flight on an idle link, so only the PINGs can
/// tell. The ack timeout is set far beyond the test so it cannot be what ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_idle_peer_shows_as_disconnected_after_the_keepalive() {
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    let links = Links::mesh(&cluster, "test", "", fault_seed()).await;
    for node in cluster.nodes.iter_mut() {
        node.set_config("replication", "ack_timeout_ms", "600000");
        node.set_config("replication", "keepalive_ms", "1000");
        node.start().await;
    }
    let connected = async |from: usize, to: usize| {
        let sample = format!(
            "tidemark_peer_connected{{peer=\"{}\"}}",
            cluster.nodes[to].id
        );
        cluster.nodes[from].metric(&sample).await == Some(1.0)
    };
    wait_for("both sessions up", async || {
        connected(0, 1).await && connected(1, 0).await
    })
    .await;
    for link in links.all() {
        link.stall(Direction::ToServer);
        link.stall(Direction::ToClient);
    }
    let start = Instant::now();
    while connected(0, 1).await || connected(1, 0).await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a silent peer still shows as connected 30 s later (keepalive 1 s: it should close within about 3 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    links.heal();
    wait_for("sessions back after the heal", async || {
        connected(0, 1).await && connected(1, 0).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_partition_then_heal() {
    let (cluster, links) = proxied_cluster(&["sqlite", "sqlite", "sqlite"]).await;
    let shared = seed_records(&cluster).await;
    // node0 | node1 + node2
    links.isolate(0);
    let written = write_for(&cluster, &shared, Duration::from_secs(3)).await;
    // The majority side converges on its own; nothing crossed the cut.
    wait_for("node1 and node2 agree", async || {
        let a = cluster.nodes[1].reader().snapshot().await;
        let b = cluster.nodes[2].reader().snapshot().await;
        a.events == b.events && a.rows == b.rows
    })
    .await;
    let last0 = written[0].api_events.last().expect("node0 wrote");
    let last1 = written[1].api_events.last().expect("node1 wrote");
    assert!(
        !has_event(&cluster, 1, last0).await,
        "node0's write crossed the partition"
    );
    assert!(
        !has_event(&cluster, 0, last1).await,
        "node1's write crossed the partition"
    );
    assert!(cluster.nodes[0].reader().is_unsynced(last0).await);
    assert!(cluster.nodes[1].reader().is_unsynced(last1).await);
    check::assert_prefixes(&cluster.nodes).await;
    for node in &cluster.nodes {
        check::assert_integrity(node).await;
    }
    for (a, b) in [(0, 1), (0, 2), (1, 0), (2, 0)] {
        let stats = links.link(a, b).stats();
        assert!(
            stats.refused > 0,
            "node{a} never redialled node{b}: {stats:?}"
        );
    }
    heal_and_check(&cluster, &links, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_partition_then_heal() {
    let (cluster, links) = proxied_cluster(&["sqlite", "sqlite", "sqlite"]).await;
    let shared = seed_records(&cluster).await;
    // node0 cannot reach node1; node1 still reaches node0.
    links.one_way(0, 1);
    let written = write_for(&cluster, &shared, Duration::from_secs(3)).await;
    let last0 = written[0].api_events.last().expect("node0 wrote").clone();
    let last1 = written[1].api_events.last().expect("node1 wrote").clone();
    // Everything still spreads, node0's writes to node1 through node2's relay.
    wait_for("node1 has node0's writes (relayed)", async || {
        has_event(&cluster, 1, &last0).await
    })
    .await;
    wait_for("node0 has node1's writes", async || {
        has_event(&cluster, 0, &last1).await
    })
    .await;
    // But neither hears the other's acks: node0 gets none from node1 at all, and
    // node1's acks from node0 stall on the way back. Both stay unsynced.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        cluster.nodes[0].reader().is_unsynced(&last0).await,
        "node0's event synced without an ack from node1"
    );
    assert!(
        cluster.nodes[1].reader().is_unsynced(&last1).await,
        "node1's event synced though node0's acks cannot reach it"
    );
    check::assert_prefixes(&cluster.nodes).await;
    heal_and_check(&cluster, &links, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_links_then_heal() {
    // One PostgreSQL node, so the consistency checks run on both backends.
    let (cluster, links) = proxied_cluster(&["sqlite", "postgres", "sqlite"]).await;
    let shared = seed_records(&cluster).await;
    for link in links.all() {
        link.flaky(
            Duration::from_millis(150),
            Duration::from_millis(700),
            Duration::from_millis(3),
        );
    }
    let written = write_for(&cluster, &shared, Duration::from_secs(4)).await;
    check::assert_prefixes(&cluster.nodes).await;
    let cuts: u64 = links.all().map(|l| l.stats().cuts).sum();
    assert!(cuts >= 6, "flaky links cut only {cuts} times");
    heal_and_check(&cluster, &links, &written).await;
}
