//! Large backlogs on real daemons: a slow peer behind a throttled link must not
//! grow its sender's memory nor slow a healthy peer, and a node restarted with
//! a million unsynced events is ready at once, streams them with flat memory
//! and reads them through its indexes. Memory bounds are generous: they tell a
//! sender that streams with bounded buffers from one that loads its backlog.
//!
//! A debug build applies a few thousand events per second, so by default the
//! million-event test drains part of the backlog; `TIDEMARK_LONG=1` drains all
//! of it and runs the four checks.

use std::time::{Duration, Instant};

use tidemark_tests::backlog::{make_backlog, memory_kib};
use tidemark_tests::check;
use tidemark_tests::daemon::{Cluster, TestNode, Topology};
use tidemark_tests::proxy::{Proxy, fault_seed};

fn long() -> bool {
    std::env::var("TIDEMARK_LONG").is_ok_and(|v| v == "1")
}

fn count(node: &TestNode, sql: &str) -> u64 {
    node.db.sql(sql).parse().expect("a count")
}

fn events(node: &TestNode) -> u64 {
    count(node, "SELECT COUNT(*) FROM change_events")
}

/// Peak resident memory of a running node, in MiB, and the current value.
fn rss_mib(node: &TestNode) -> (u64, u64) {
    let (rss, hwm) = memory_kib(node.pid().expect("node running"));
    (rss / 1024, hwm / 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_peer_bounds_sender_memory_and_does_not_slow_a_healthy_peer() {
    const EVENTS: u64 = 20_000;
    const BODY: usize = 6_000;
    // A star: node0 (the sender) peers with node1 (slow, behind a throttled
    // link) and node2 (healthy); node1 and node2 do not peer, so nothing reaches
    // node1 but through the slow link.
    let mut cluster =
        Cluster::prepare(&["sqlite", "sqlite", "sqlite"], Topology::Chain, "test", "");
    let slow = Proxy::start("node0->node1", cluster.nodes[1].port, fault_seed()).await;
    let (ids, ports): (Vec<_>, Vec<_>) = cluster.nodes.iter().map(|n| (n.id, n.port)).unzip();
    cluster.nodes[0].write_config("test", &[(ids[1], slow.port()), (ids[2], ports[2])], "");
    cluster.nodes[1].write_config("test", &[(ids[0], ports[0])], "");
    cluster.nodes[2].write_config("test", &[(ids[0], ports[0])], "");
    cluster.nodes[0].start().await;
    cluster.nodes[0].stop();
    make_backlog(&cluster.nodes[0], EVENTS, BODY);
    let backlog_mib = count(
        &cluster.nodes[0],
        "SELECT SUM(length(new_values) + length(metadata) + 200) / 1048576 FROM change_events",
    );
    slow.throttle(512 * 1024);
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let (base, _) = rss_mib(&cluster.nodes[0]);
    // The healthy peer gets everything while the slow one still lags.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut peak = base;
    while events(&cluster.nodes[2]) < EVENTS {
        assert!(Instant::now() < deadline, "node2 did not catch up");
        peak = peak.max(rss_mib(&cluster.nodes[0]).0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let slow_has = events(&cluster.nodes[1]);
    assert!(
        slow_has < EVENTS / 2,
        "node1 got {slow_has} of {EVENTS} events: the throttle did not hold it back"
    );
    assert!(
        slow.stats().bytes_to_server > 0,
        "nothing reached node1: it is not slow but cut off"
    );
    // Keep streaming to the slow peer a while longer, sampling the sender.
    for _ in 0..25 {
        peak = peak.max(rss_mib(&cluster.nodes[0]).0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, hwm) = rss_mib(&cluster.nodes[0]);
    eprintln!(
        "sender memory: {base} MiB at start, {peak} MiB peak sampled, {hwm} MiB high-water; \
         backlog about {backlog_mib} MiB; node1 has {} events",
        events(&cluster.nodes[1])
    );
    assert!(
        backlog_mib >= 100,
        "backlog of {backlog_mib} MiB too small to tell"
    );
    assert!(
        hwm < base + 48,
        "the sender's memory grew from {base} MiB to {hwm} MiB while streaming a \
         {backlog_mib} MiB backlog to a slow peer"
    );
    // Full speed again: the slow peer catches up, and the cluster agrees.
    slow.pass();
    let deadline = Instant::now() + Duration::from_secs(300);
    while events(&cluster.nodes[1]) < EVENTS {
        assert!(Instant::now() < deadline, "node1 did not catch up");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let snap = cluster.converged(Duration::from_secs(300)).await;
    assert_eq!(snap.events.len() as u64, EVENTS);
    check::after_heal(&cluster, &[]).await;
}

/// The daemon's queries over a large log, as the store issues them, with the
/// index each must use.
const PLANS: [(&str, &str); 4] = [
    (
        "events of an origin after a vector entry (streaming)",
        "SELECT event_id FROM change_events WHERE node_id = '{origin}' AND hlc_timestamp > 0 \
         ORDER BY hlc_timestamp, event_id LIMIT 500",
    ),
    (
        "marking synced_at",
        "UPDATE change_events SET synced_at = 'now' WHERE synced_at IS NULL AND node_id = '{origin}' \
         AND hlc_timestamp <= 1",
    ),
    (
        "lag per peer",
        "SELECT COUNT(*) FROM change_events WHERE node_id = '{origin}' AND hlc_timestamp > 0",
    ),
    (
        "oldest unacknowledged event",
        "SELECT wall_timestamp FROM change_events WHERE node_id = '{origin}' AND hlc_timestamp > 0 \
         ORDER BY hlc_timestamp LIMIT 1",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_million_unsynced_events() {
    const EVENTS: u64 = 1_000_000;
    let drain = if long() { EVENTS } else { 20_000 };
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", "");
    cluster.nodes[0].start().await;
    cluster.nodes[0].stop();
    let last = make_backlog(&cluster.nodes[0], EVENTS, 0);
    let a = &cluster.nodes[0];
    assert_eq!(
        count(
            a,
            "SELECT COUNT(*) FROM change_events WHERE synced_at IS NULL"
        ),
        EVENTS
    );
    check::assert_integrity(a).await;
    // Every query the daemon runs over the log uses an index.
    for (what, sql) in PLANS {
        let sql = sql.replace("{origin}", &a.id.to_string());
        let plan = a.db.sql(&format!("EXPLAIN QUERY PLAN {sql}"));
        assert!(
            plan.contains("USING INDEX") || plan.contains("USING COVERING INDEX"),
            "{what}: no index in the plan:\n{plan}"
        );
        assert!(
            !plan
                .lines()
                .any(|l| l.contains("SCAN change_events") && !l.contains("INDEX")),
            "{what}: full scan of change_events:\n{plan}"
        );
    }
    cluster.nodes[1].start().await;
    // node0 holds everything node1 holds: ready long before the backlog drained.
    cluster.nodes[0].start().await;
    cluster.nodes[0].wait_ready(Duration::from_secs(60)).await;
    let drained_at_ready = events(&cluster.nodes[1]);
    assert!(
        drained_at_ready < EVENTS / 10,
        "node0 became ready only after {drained_at_ready} events reached its peer"
    );
    assert_eq!(cluster.nodes[0].http_get("/readyz").await.0, 200);
    // Memory stays flat while the backlog streams.
    let (base, _) = rss_mib(&cluster.nodes[0]);
    let mut peak = base;
    let deadline = Instant::now() + Duration::from_secs(if long() { 3600 } else { 300 });
    while events(&cluster.nodes[1]) < drain {
        assert!(
            Instant::now() < deadline,
            "node1 has only {} of {drain} events",
            events(&cluster.nodes[1])
        );
        peak = peak.max(rss_mib(&cluster.nodes[0]).0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, hwm) = rss_mib(&cluster.nodes[0]);
    eprintln!(
        "sender memory while draining: {base} MiB at ready, {peak} MiB peak sampled, {hwm} MiB high-water"
    );
    assert!(
        hwm < base + 48,
        "the sender's memory grew from {base} MiB to {hwm} MiB while draining"
    );
    // Events leave in HLC order: node1 holds a prefix of node0's log.
    check::assert_prefixes(&cluster.nodes).await;
    if long() {
        while events(&cluster.nodes[1]) < EVENTS {
            assert!(Instant::now() < deadline, "node1 did not drain the backlog");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let snap = cluster.converged(Duration::from_secs(1800)).await;
        assert_eq!(snap.events.len() as u64, EVENTS);
        check::after_heal(&cluster, &[]).await;
        let max: i64 = cluster.nodes[1]
            .db
            .sql(&format!(
                "SELECT max_hlc FROM tidemark_nodes WHERE node_id = '{}'",
                cluster.nodes[0].id
            ))
            .parse()
            .expect("max hlc");
        assert_eq!(max, last);
    }
}
