//! Deterministic network simulation of the replicator (turmoil): three hosts,
//! each an in-memory store behind the real `ReceiverService` and `Sender`, write
//! to a small key set on an `lww` and a `manual` table at random simulated times
//! while the seeded schedule partitions links (both ways and one way), holds
//! messages, makes links flaky, and crashes and restarts nodes (the store keeps
//! what was committed; the open transaction is lost). Then every fault heals and
//! the checks run:
//! 1. every event committed anywhere reaches every node; per origin, each node
//!    holds a gap-free prefix of the origin's log (checked during the faults too)
//!    and, once quiescent, all of it, each event once;
//! 2. every node's tables (stamps included), event ids and HLCs, and open
//!    conflicts are identical;
//! 3. under `lww`, every record equals the maximum of all its events by
//!    `(hlc, node_id, event_id)`.
//!
//! Everything random (writes, faults, turmoil's network, the senders' jitter,
//! event ids, clocks) comes from the seed, so a seed replays exactly.
//! CI runs a fixed list of seeds; `TIDEMARK_SIM_SEEDS=N` runs N random seeds and
//! `TIDEMARK_SIM_SEED=S` replays one. A failure prints its seed and the command
//! that replays it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tidemark_hlc::{Clock, Hlc, WallSource};
use tidemark_replicator::{
    Connector, LocalNode, Peer, ReceiverService, ReplicationOptions, Sender,
};
use tidemark_store::memory::Column;
use tidemark_store::{
    Backend, ChangeEvent, ConflictFilter, ConflictPolicy, ConflictStatus, MemoryBackend, Operation,
    Store, Values, VersionVector,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ulid::Ulid;

const NODES: usize = 3;
const PORT: u16 = 7070;
/// Simulated wall time at the start: 2025-11-24.
const BASE_MS: i64 = 1_764_000_000_000;
/// Writes and faults happen in [0, WRITE_MS); everything heals at HEAL_MS.
const WRITE_MS: u64 = 8_000;
const HEAL_MS: u64 = 10_000;
/// After healing, convergence must come within this much simulated time.
const CONVERGE_MS: u64 = 120_000;
const KEYS: u128 = 5;
const TABLES: [(&str, ConflictPolicy); 2] = [
    ("lww_kv", ConflictPolicy::Lww),
    ("man_kv", ConflictPolicy::Manual),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// Every node is a peer of every other.
    Mesh,
    /// n0 - n1 - n2: the ends only meet through n1's relaying.
    Chain,
}

impl Topology {
    fn peers(self, i: usize) -> Vec<usize> {
        match self {
            Topology::Mesh => (0..NODES).filter(|j| *j != i).collect(),
            Topology::Chain => [i.checked_sub(1), (i + 1 < NODES).then_some(i + 1)]
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    fn links(self) -> Vec<(usize, usize)> {
        (0..NODES)
            .flat_map(|i| {
                self.peers(i)
                    .into_iter()
                    .filter(move |j| *j > i)
                    .map(move |j| (i, j))
            })
            .collect()
    }
}

fn host(i: usize) -> String {
    format!("n{i}")
}

fn node_id(i: usize) -> Ulid {
    Ulid::from_parts(BASE_MS as u64, 0xA000 + i as u128)
}

fn record(k: u128) -> Ulid {
    Ulid::from_parts(BASE_MS as u64, 0xB000 + k)
}

fn sim_ms() -> i64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as i64)
}

/// One client write, planned from the seed.
#[derive(Debug, Clone)]
struct Write {
    at_ms: u64,
    table: &'static str,
    key: u128,
    /// `None`: delete.
    value: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Partition(usize, usize),
    PartitionOneway(usize, usize),
    Hold(usize, usize),
    Flaky(usize, usize),
    Crash(usize),
}

#[derive(Debug, Clone)]
struct Plan {
    writes: Vec<Vec<Write>>,
    /// (start ms, end ms, fault)
    faults: Vec<(u64, u64, Fault)>,
    skew_ms: Vec<i64>,
}

fn plan(seed: u64, topology: Topology) -> Plan {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let writes = (0..NODES)
        .map(|_| {
            let n = rng.random_range(8..20);
            let mut w: Vec<Write> = (0..n)
                .map(|_| Write {
                    at_ms: rng.random_range(50..WRITE_MS),
                    table: TABLES[rng.random_range(0..TABLES.len())].0,
                    key: rng.random_range(0..KEYS),
                    value: (!rng.random_bool(0.2)).then(|| rng.random_range(0..1000)),
                })
                .collect();
            w.sort_by_key(|w| w.at_ms);
            w
        })
        .collect();
    let links = topology.links();
    let faults = (0..rng.random_range(2..6))
        .map(|_| {
            let start = rng.random_range(0..WRITE_MS);
            let end = (start + rng.random_range(300..4_000)).min(HEAL_MS - 500);
            let (a, b) = links[rng.random_range(0..links.len())];
            let (a, b) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            let fault = match rng.random_range(0..5) {
                0 => Fault::Partition(a, b),
                1 => Fault::PartitionOneway(a, b),
                2 => Fault::Hold(a, b),
                3 => Fault::Flaky(a, b),
                _ => Fault::Crash(rng.random_range(0..NODES)),
            };
            (start, end, fault)
        })
        .collect();
    let skew_ms = (0..NODES).map(|_| rng.random_range(0..300)).collect();
    Plan {
        writes,
        faults,
        skew_ms,
    }
}

/// A turmoil stream the tonic server accepts.
struct SimStream(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimStream {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn options() -> ReplicationOptions {
    ReplicationOptions {
        batch_size: 16,
        max_unacked_batches: 2,
        connect_timeout_ms: 1_000,
        ack_timeout_ms: 3_000,
        reconnect_initial_ms: 50,
        reconnect_max_ms: 1_000,
        ..ReplicationOptions::default()
    }
}

/// One node's software: everything a daemon runs for replication, plus the
/// client writing its planned writes. Called again after each restart.
async fn run_node(
    seed: u64,
    i: usize,
    topology: Topology,
    db: MemoryBackend,
    ids: Arc<AtomicU64>,
    writes: Vec<Write>,
    skew_ms: i64,
) -> turmoil::Result {
    let me = node_id(i);
    let clock = Clock::with_source(
        me,
        Clock::DEFAULT_MAX_DRIFT_MS,
        WallSource::new(move || BASE_MS + skew_ms + sim_ms()),
    )?;
    let next_id = Arc::new(move || {
        let n = ids.fetch_add(1, Ordering::Relaxed);
        Ulid::from_parts(
            (BASE_MS + sim_ms()) as u64,
            ((i as u128) << 72) | u128::from(n),
        )
    });
    for (table, _) in TABLES {
        if db.table_rows(table).await.is_none() {
            db.create_table(
                table,
                vec![
                    Column::new("id", "TEXT").primary_key(),
                    Column::new("val", "INTEGER").not_null(),
                    Column::new("origin", "TEXT"),
                ],
            )
            .await?;
        }
    }
    let store = Store::open_memory(db, Arc::new(clock), Some(next_id)).await?;
    store.bind_cluster("sim").await?;
    for (table, policy) in TABLES {
        store.register_table(table, policy).await?;
    }
    let local = LocalNode {
        node_id: me,
        cluster_id: "sim".into(),
    };
    let peers: Vec<Peer> = topology
        .peers(i)
        .into_iter()
        .map(|j| Peer {
            node_id: node_id(j),
            address: format!("http://{}:{PORT}", host(j)),
            may_relay: true,
        })
        .collect();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let receiver = ReceiverService::new(
        store.clone(),
        local.clone(),
        options(),
        cancel.clone(),
        tracker.clone(),
        None,
    );
    let listener =
        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| SimStream(s));
        Some((next, l))
    });
    tokio::spawn(receiver.serve_incoming(incoming, std::future::pending()));
    let connector = Connector::new(|uri: tonic::transport::Uri| async move {
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(PORT);
        turmoil::net::TcpStream::connect((host.as_str(), port)).await
    });
    let sender = Sender::new(store.clone(), local, options(), &peers, None)
        .with_connector(connector)
        .with_jitter_seed(seed ^ i as u64);
    for peer in peers {
        tokio::spawn(sender.clone().run_peer(peer, cancel.clone()));
    }
    tokio::spawn(sender.clone().run_sync_marker(cancel.clone()));
    // The client: each planned write still ahead (those planned while the node
    // was down never happen).
    for w in writes {
        let now = turmoil::sim_elapsed().unwrap_or_default();
        let at = Duration::from_millis(w.at_ms);
        if at < now {
            continue;
        }
        tokio::time::sleep(at - now).await;
        let id = record(w.key);
        match w.value {
            Some(v) => {
                let values: Values = json!({"val": v, "origin": host(i)})
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                store.put(w.table, id, &values).await?;
            }
            None => {
                store.delete(w.table, id).await?;
            }
        }
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// Events of every origin a node holds, per origin in HLC order.
async fn log_of(db: &MemoryBackend) -> Result<BTreeMap<Ulid, Vec<ChangeEvent>>, String> {
    let vector = db.vector().await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for origin in vector.0.keys() {
        let events = db
            .events_of_origin_after(*origin, Hlc::ZERO, u32::MAX)
            .await
            .map_err(|e| e.to_string())?;
        out.insert(*origin, events);
    }
    Ok(out)
}

/// Check 1 while faults run: per origin, each node holds a gap-free prefix of
/// the origin's own log (read after it, so it can only have grown).
async fn check_prefixes(dbs: &[MemoryBackend]) -> Result<(), String> {
    for (n, db) in dbs.iter().enumerate() {
        let log = log_of(db).await?;
        for (o, origin_db) in dbs.iter().enumerate() {
            let held: Vec<Ulid> = log
                .get(&node_id(o))
                .map(|v| v.iter().map(|e| e.event_id).collect())
                .unwrap_or_default();
            let own: Vec<Ulid> = origin_db
                .events_of_origin_after(node_id(o), Hlc::ZERO, u32::MAX)
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .map(|e| e.event_id)
                .collect();
            if own.get(..held.len()) != Some(held.as_slice()) {
                return Err(format!(
                    "{} holds {} events of origin {} that are not a prefix of its {} events",
                    host(n),
                    held.len(),
                    host(o),
                    own.len()
                ));
            }
        }
    }
    Ok(())
}

/// Everything the nodes must agree on, as text: tables with stamps, every event
/// (id, origin, hlc, operation), open conflicts, and the applied vector.
async fn digest(db: &MemoryBackend) -> Result<String, String> {
    let mut out = String::new();
    for (table, _) in TABLES {
        let rows = db.table_rows(table).await.unwrap_or_default();
        for r in rows {
            let _ = writeln!(out, "{table} {}", Value::Object(r));
        }
    }
    for (origin, events) in log_of(db).await? {
        for e in events {
            let _ = writeln!(
                out,
                "event {} {origin} {} {}",
                e.event_id,
                e.hlc.encode(),
                e.operation
            );
        }
    }
    let open = db
        .list_conflicts(&ConflictFilter {
            status: Some(ConflictStatus::Open),
            limit: u32::MAX,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    for c in open {
        let _ = writeln!(
            out,
            "open conflict {} {} {} winner {} loser {}",
            c.conflict_id, c.table_name, c.record_id, c.winner.event_id, c.loser.event_id
        );
    }
    let vector = db.vector().await.map_err(|e| e.to_string())?;
    let _ = writeln!(out, "vector {:?}", vector.to_json());
    Ok(out)
}

/// Checks 1 to 3 once every node has the same digest.
async fn check_final(dbs: &[MemoryBackend]) -> Result<(), String> {
    let logs = {
        let mut v = Vec::new();
        for db in dbs {
            v.push(log_of(db).await?);
        }
        v
    };
    // 1: each origin's whole log everywhere, each event once, and the vector
    // entry is its last HLC.
    for (o, own_log) in logs.iter().enumerate() {
        let own = own_log.get(&node_id(o)).cloned().unwrap_or_default();
        let ids: std::collections::BTreeSet<Ulid> = own.iter().map(|e| e.event_id).collect();
        if ids.len() != own.len() {
            return Err(format!("{} holds one of its own events twice", host(o)));
        }
        for (n, log) in logs.iter().enumerate() {
            let held: Vec<Ulid> = log
                .get(&node_id(o))
                .map(|v| v.iter().map(|e| e.event_id).collect())
                .unwrap_or_default();
            let expected: Vec<Ulid> = own.iter().map(|e| e.event_id).collect();
            if held != expected {
                return Err(format!(
                    "{} holds {} events of origin {}, which has {}",
                    host(n),
                    held.len(),
                    host(o),
                    expected.len()
                ));
            }
            let vector: VersionVector = dbs[n].vector().await.map_err(|e| e.to_string())?;
            let last = own.last().map_or(Hlc::ZERO, |e| e.hlc);
            if vector.get(node_id(o)) != last {
                return Err(format!(
                    "{}'s vector entry for {} is {}, its last event {last}",
                    host(n),
                    host(o),
                    vector.get(node_id(o))
                ));
            }
        }
    }
    // 3: under lww, each record is the greatest of its events by the total order.
    let all: Vec<&ChangeEvent> = logs[0].values().flatten().collect();
    for (n, db) in dbs.iter().enumerate() {
        let rows = db.table_rows("lww_kv").await.unwrap_or_default();
        for k in 0..KEYS {
            let id = record(k);
            let winner = all
                .iter()
                .filter(|e| e.table_name == "lww_kv" && e.record_id == id)
                .max_by_key(|e| e.order());
            let row = rows.iter().find(|r| r["id"] == json!(id.to_string()));
            let ok = match (winner, row) {
                (None, None) => true,
                (Some(w), None) => w.operation == Operation::Delete,
                (Some(w), Some(r)) => {
                    w.operation != Operation::Delete
                        && w.new_values
                            .as_ref()
                            .is_some_and(|v| v.iter().all(|(c, val)| r.get(c) == Some(val)))
                        && r["hlc_modified"] == json!(w.hlc.encode())
                        && r["node_id"] == json!(w.node_id.to_string())
                }
                (None, Some(_)) => false,
            };
            if !ok {
                return Err(format!(
                    "{}: lww_kv {id} is {:?} but the greatest event is {:?}",
                    host(n),
                    row,
                    winner.map(|w| (w.event_id, w.hlc, w.operation, &w.new_values))
                ));
            }
        }
    }
    Ok(())
}

/// Runs one seeded scenario; returns every node's final digest (identical).
fn simulate(seed: u64, topology: Topology) -> Result<String, String> {
    let plan = plan(seed, topology);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .enable_random_order()
        .simulation_duration(Duration::from_millis(HEAL_MS + CONVERGE_MS + 5_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .repair_rate(0.02)
        .build();
    let dbs: Vec<MemoryBackend> = (0..NODES)
        .map(|_| MemoryBackend::with_wall(move || BASE_MS + sim_ms()))
        .collect();
    for (i, db) in dbs.iter().enumerate() {
        let db = db.clone();
        let ids = Arc::new(AtomicU64::new(0));
        let writes = plan.writes[i].clone();
        let skew = plan.skew_ms[i];
        sim.host(host(i), move || {
            run_node(
                seed,
                i,
                topology,
                db.clone(),
                ids.clone(),
                writes.clone(),
                skew,
            )
        });
    }
    let healed = Arc::new(AtomicBool::new(false));
    let result: Rc<RefCell<Option<Result<String, String>>>> = Rc::new(RefCell::new(None));
    {
        let dbs = dbs.clone();
        let healed = healed.clone();
        let result = result.clone();
        sim.client("checker", async move {
            let outcome = async {
                while !healed.load(Ordering::Relaxed) {
                    check_prefixes(&dbs).await?;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                loop {
                    let mut digests = Vec::new();
                    for db in &dbs {
                        digests.push(digest(db).await?);
                    }
                    if digests.windows(2).all(|w| w[0] == w[1]) {
                        check_final(&dbs).await?;
                        return Ok(digests.swap_remove(0));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            .await;
            *result.borrow_mut() = Some(outcome);
            Ok(())
        });
    }
    let mut crashed = [false; NODES];
    let mut active: Vec<(u64, Fault)> = Vec::new();
    let mut pending = plan.faults.clone();
    pending.sort_by_key(|f| f.0);
    let mut pending = pending.into_iter().peekable();
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while let Some((start, end, fault)) = pending.next_if(|f| f.0 <= now) {
            let _ = start;
            match fault {
                Fault::Partition(a, b) => sim.partition(host(a), host(b)),
                Fault::PartitionOneway(a, b) => sim.partition_oneway(host(a), host(b)),
                Fault::Hold(a, b) => sim.hold(host(a), host(b)),
                Fault::Flaky(a, b) => sim.set_link_fail_rate(host(a), host(b), 0.01),
                Fault::Crash(n) if !crashed[n] => {
                    crashed[n] = true;
                    sim.crash(host(n));
                }
                Fault::Crash(_) => continue,
            }
            active.push((end, fault));
        }
        let (due, rest): (Vec<_>, Vec<_>) = active.into_iter().partition(|f| f.0 <= now);
        active = rest;
        for (_, fault) in due {
            match fault {
                Fault::Partition(a, b) | Fault::Flaky(a, b) => {
                    sim.set_link_fail_rate(host(a), host(b), 0.0);
                    sim.repair(host(a), host(b));
                }
                Fault::PartitionOneway(a, b) => sim.repair_oneway(host(a), host(b)),
                Fault::Hold(a, b) => sim.release(host(a), host(b)),
                Fault::Crash(n) => {
                    crashed[n] = false;
                    sim.bounce(host(n));
                }
            }
        }
        if now >= HEAL_MS && !healed.load(Ordering::Relaxed) {
            for (a, b) in topology.links() {
                sim.set_link_fail_rate(host(a), host(b), 0.0);
                sim.repair(host(a), host(b));
                sim.release(host(a), host(b));
            }
            for (n, down) in crashed.iter_mut().enumerate() {
                if *down {
                    *down = false;
                    sim.bounce(host(n));
                }
            }
            healed.store(true, Ordering::Relaxed);
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                return Err(match result.borrow_mut().take() {
                    Some(Err(check)) => check,
                    _ => format!("simulation error: {e}"),
                });
            }
        }
    }
    result
        .borrow_mut()
        .take()
        .unwrap_or_else(|| Err("the checker ended without a result".into()))
}

fn replay_hint(test: &str, seed: u64) -> String {
    format!(
        "replay: TIDEMARK_SIM_SEED={seed} cargo test -p tidemark-tests --test simulation {test}"
    )
}

/// Runs `topology` for the seeds this run asks for; panics naming each failing
/// seed and how to replay it.
fn run_seeds(test: &str, topology: Topology, ci_seeds: &[u64]) {
    let seeds: Vec<u64> = if let Ok(s) = std::env::var("TIDEMARK_SIM_SEED") {
        vec![
            s.trim()
                .parse()
                .expect("TIDEMARK_SIM_SEED must be an unsigned integer"),
        ]
    } else if let Ok(n) = std::env::var("TIDEMARK_SIM_SEEDS") {
        let n: usize = n
            .trim()
            .parse()
            .expect("TIDEMARK_SIM_SEEDS must be a count");
        let mut rng = rand::rng();
        (0..n).map(|_| rng.random()).collect()
    } else {
        ci_seeds.to_vec()
    };
    let mut failures = Vec::new();
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| simulate(seed, topology)).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()))
        });
        if let Err(e) = outcome {
            eprintln!(
                "simulation failed: seed {seed}, {topology:?}: {e}\n{}",
                replay_hint(test, seed)
            );
            failures.push(seed);
        }
    }
    assert!(
        failures.is_empty(),
        "{topology:?} failed for seeds {failures:?}; {}",
        replay_hint(test, failures[0])
    );
}

#[test]
fn mesh_converges_under_faults() {
    run_seeds(
        "mesh_converges_under_faults",
        Topology::Mesh,
        &(1..=12).collect::<Vec<_>>(),
    );
}

#[test]
fn chain_converges_under_faults_through_relaying() {
    run_seeds(
        "chain_converges_under_faults_through_relaying",
        Topology::Chain,
        &(101..=108).collect::<Vec<_>>(),
    );
}

#[test]
fn a_seed_replays_identically() {
    let seed = std::env::var("TIDEMARK_SIM_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(42);
    let first = simulate(seed, Topology::Mesh).unwrap_or_else(|e| {
        panic!(
            "seed {seed}: {e}\n{}",
            replay_hint("a_seed_replays_identically", seed)
        )
    });
    let second = simulate(seed, Topology::Mesh).unwrap_or_else(|e| {
        panic!(
            "seed {seed}: {e}\n{}",
            replay_hint("a_seed_replays_identically", seed)
        )
    });
    assert!(first.contains("event "), "the run wrote nothing:\n{first}");
    assert_eq!(first, second, "seed {seed} did not replay identically");
    let other = simulate(seed + 1, Topology::Mesh).expect("another seed");
    assert_ne!(first, other, "a different seed gave the same run");
}
