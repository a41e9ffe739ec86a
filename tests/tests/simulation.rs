//! Deterministic network simulation of the replicator (turmoil): three hosts,
//! each an in-memory store behind the real `ReceiverService` and `Sender`, in a
//! mesh and in a chain whose ends meet only through relaying. Clients write at
//! random simulated times to two tables without constraints (`lww_kv`, and
//! `man_kv` under `manual`) and to a constrained schema: `users` (UNIQUE
//! `email` taken from a pool smaller than the users, CHECK on `age`) and
//! `orders` (`user_id` NOT NULL REFERENCES `users(id)`), one of the two under
//! `manual` and the other under `lww` (the seed chooses). Most constrained
//! writes come in bursts on every node at once, so they are concurrent: users
//! clash on emails across nodes, emails change, users are deleted, orders are
//! put for users that exist, that the other nodes do not hold placed yet (a
//! child ahead of its parent: it waits), and that another node deletes
//! concurrently (the delete wins: the order is blocked), and orders are
//! deleted. Writes the local store refuses (UNIQUE, FOREIGN KEY, CHECK) are
//! counted and do not happen. Operators on every node list the open conflicts
//! of the `manual` tables during the faults and after healing and resolve some
//! (keep either side or merge new values, mostly as a compare-and-set on the
//! winner they saw; a stale winner, a conflict closed or gone meanwhile, and a
//! merge the table refuses are outcomes of racing operators, counted).
//! Meanwhile the seeded schedule cuts one node off for a while, partitions
//! links (both ways and one way), holds messages, makes links flaky, isolates
//! nodes, and crashes and restarts them (the store keeps what was committed;
//! the open transaction is lost). Then every fault heals, the operators
//! finish, and once the nodes hold the same events the checks run:
//! 1. every event committed anywhere reaches every node; per origin, each node
//!    holds a gap-free prefix of the origin's log (checked during the faults too)
//!    and, once quiescent, all of it, each event once;
//! 2. every node's tables (stamps included), event ids and HLCs, blocked
//!    records, and conflicts, open and decided, with every field (times
//!    included) are identical: one history;
//! 3. every record's row follows the greatest of its events by
//!    `(hlc, node_id, event_id)`, whatever the policy: a delete leaves no row; a
//!    put leaves exactly its values and stamps, or, on a constrained table, no
//!    row and the record blocked on that very event;
//! 4. no node holds a row that breaks a constraint (two placed users with one
//!    email, a placed order whose user is not placed, an age out of range), and
//!    every open constraint conflict is about a record still blocked on the
//!    write that lost.
//!
//! Everything random (writes, resolutions, faults, turmoil's network, the
//! senders' jitter, event ids, clocks) comes from the seed, so a seed replays
//! exactly. CI runs a fixed list of seeds and checks that, together, they
//! reach UNIQUE, FOREIGN KEY and version conflicts, children ahead of their
//! parents, local refusals of each kind and operator resolutions;
//! `TIDEMARK_SIM_SEEDS=N` runs N random seeds and `TIDEMARK_SIM_SEED=S`
//! replays one. A failure prints its seed and the command that replays it;
//! `--nocapture` shows what each seed exercised.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
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
    Backend, BlockKind, Blocked, ChangeEvent, Conflict, ConflictFilter, ConflictKind,
    ConflictPolicy, ConflictStatus, MemoryBackend, Operation, RawValues, ResolveChoice, Store,
    StoreError, Values, VersionVector,
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
/// Operators resolve conflicts in [RESOLVE_FROM_MS, RESOLVE_UNTIL_MS): during
/// the faults and while the healed nodes catch up.
const RESOLVE_FROM_MS: u64 = 3_000;
const RESOLVE_UNTIL_MS: u64 = HEAL_MS + 6_000;
/// After healing, convergence must come within this much simulated time.
const CONVERGE_MS: u64 = 120_000;
/// Once the nodes hold the same events, their state must agree within this.
const SETTLE_MS: u64 = 5_000;
const KEYS: u128 = 5;
const KV_TABLES: [(&str, ConflictPolicy); 2] = [
    ("lww_kv", ConflictPolicy::Lww),
    ("man_kv", ConflictPolicy::Manual),
];
const USERS: &str = "users";
const ORDERS: &str = "orders";
/// Users and orders the writes pick from; users take their email from a pool
/// smaller than themselves, so UNIQUE clashes are frequent.
const USER_KEYS: u128 = 8;
const ORDER_KEYS: u128 = 8;
const EMAILS: u64 = 6;
/// Moments when every client writes to the constrained tables at once.
const MOMENTS: usize = 6;
/// `CHECK (age BETWEEN 0 AND AGE_MAX)` on `users.age`.
const AGE_MAX: i64 = 200;

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

fn user(k: u128) -> Ulid {
    Ulid::from_parts(BASE_MS as u64, 0xC000 + k)
}

fn order(k: u128) -> Ulid {
    Ulid::from_parts(BASE_MS as u64, 0xD000 + k)
}

fn email(e: u64) -> String {
    format!("e{e}@sim.test")
}

fn sim_ms() -> i64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as i64)
}

fn row(v: Value) -> Values {
    v.as_object().cloned().unwrap_or_default()
}

/// What one client write does.
#[derive(Debug, Clone)]
enum Op {
    /// A put (`Some`) or delete of a key of a table without constraints.
    Kv {
        table: &'static str,
        key: u128,
        value: Option<i64>,
    },
    /// A whole user (`email: None` writes NULL).
    PutUser {
        key: u128,
        email: Option<u64>,
        age: i64,
    },
    /// The email alone (a user not here is inserted with NULL elsewhere).
    SetEmail {
        key: u128,
        email: u64,
    },
    DeleteUser {
        key: u128,
    },
    PutOrder {
        key: u128,
        user: u128,
        amount: i64,
    },
    DeleteOrder {
        key: u128,
    },
}

/// One client write, planned from the seed.
#[derive(Debug, Clone)]
struct Write {
    at_ms: u64,
    op: Op,
}

/// One operator round: at `at_ms`, list the open conflicts of the `manual`
/// tables and resolve some, every choice drawn from `pick`.
#[derive(Debug, Clone, Copy)]
struct Resolve {
    at_ms: u64,
    pick: u64,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Partition(usize, usize),
    PartitionOneway(usize, usize),
    Hold(usize, usize),
    Flaky(usize, usize),
    /// Every link of the node partitioned: its writes meet the others' only
    /// when it heals.
    Isolate(usize),
    Crash(usize),
}

/// Every replicated table with its policy, parents before children.
type Tables = [(&'static str, ConflictPolicy); 4];

#[derive(Debug, Clone)]
struct Plan {
    tables: Tables,
    writes: Vec<Vec<Write>>,
    resolves: Vec<Vec<Resolve>>,
    /// (start ms, end ms, fault)
    faults: Vec<(u64, u64, Fault)>,
    skew_ms: Vec<i64>,
}

fn kv_op(rng: &mut ChaCha8Rng) -> Op {
    Op::Kv {
        table: KV_TABLES[rng.random_range(0..KV_TABLES.len())].0,
        key: rng.random_range(0..KEYS),
        value: (!rng.random_bool(0.2)).then(|| rng.random_range(0..1000)),
    }
}

fn constrained_op(rng: &mut ChaCha8Rng) -> Op {
    let key = rng.random_range(0..USER_KEYS);
    match rng.random_range(0..20) {
        0..=5 => Op::PutUser {
            key,
            email: (!rng.random_bool(0.1)).then(|| rng.random_range(0..EMAILS)),
            age: if rng.random_bool(0.1) {
                rng.random_range(AGE_MAX + 1..AGE_MAX + 100)
            } else {
                rng.random_range(0..=AGE_MAX)
            },
        },
        6..=9 => Op::SetEmail {
            key,
            email: rng.random_range(0..EMAILS),
        },
        10..=11 => Op::DeleteUser { key },
        12..=17 => Op::PutOrder {
            key: rng.random_range(0..ORDER_KEYS),
            user: key,
            amount: rng.random_range(1..500),
        },
        _ => Op::DeleteOrder {
            key: rng.random_range(0..ORDER_KEYS),
        },
    }
}

fn plan(seed: u64, topology: Topology) -> Plan {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (users_policy, orders_policy) = if rng.random_bool(0.5) {
        (ConflictPolicy::Manual, ConflictPolicy::Lww)
    } else {
        (ConflictPolicy::Lww, ConflictPolicy::Manual)
    };
    let tables = [
        KV_TABLES[0],
        KV_TABLES[1],
        (USERS, users_policy),
        (ORDERS, orders_policy),
    ];
    // Moments when every node's client is busy: constrained writes there meet
    // concurrent ones (within a message latency) on the other nodes.
    let moments: Vec<u64> = (0..MOMENTS)
        .map(|_| rng.random_range(200..WRITE_MS - 50))
        .collect();
    let writes = (0..NODES)
        .map(|_| {
            let kv = rng.random_range(6..14);
            let constrained = rng.random_range(20..36);
            let mut w: Vec<Write> = (0..kv + constrained)
                .map(|n| {
                    if n < kv {
                        Write {
                            at_ms: rng.random_range(50..WRITE_MS),
                            op: kv_op(&mut rng),
                        }
                    } else {
                        let at_ms = if rng.random_bool(0.7) {
                            moments[rng.random_range(0..moments.len())] + rng.random_range(0..20)
                        } else {
                            rng.random_range(50..WRITE_MS)
                        };
                        Write {
                            at_ms,
                            op: constrained_op(&mut rng),
                        }
                    }
                })
                .collect();
            w.sort_by_key(|w| w.at_ms);
            w
        })
        .collect();
    let resolves = (0..NODES)
        .map(|_| {
            let mut r: Vec<Resolve> = (0..rng.random_range(1..4))
                .map(|_| Resolve {
                    at_ms: rng.random_range(RESOLVE_FROM_MS..RESOLVE_UNTIL_MS),
                    pick: rng.random(),
                })
                .collect();
            r.sort_by_key(|r| r.at_ms);
            r
        })
        .collect();
    let links = topology.links();
    // One node cut off from the others for a while: what it writes meanwhile
    // is concurrent with everything they write.
    let split_start = rng.random_range(500..WRITE_MS / 2);
    let split = (
        split_start,
        split_start + rng.random_range(1_500..4_000),
        Fault::Isolate(rng.random_range(0..NODES)),
    );
    let faults = (0..rng.random_range(2..6))
        .map(|_| {
            let start = rng.random_range(0..WRITE_MS);
            let end = (start + rng.random_range(300..4_000)).min(HEAL_MS - 500);
            let (a, b) = links[rng.random_range(0..links.len())];
            let (a, b) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            let fault = match rng.random_range(0..6) {
                0 => Fault::Partition(a, b),
                1 => Fault::PartitionOneway(a, b),
                2 => Fault::Hold(a, b),
                3 => Fault::Flaky(a, b),
                4 => Fault::Isolate(rng.random_range(0..NODES)),
                _ => Fault::Crash(rng.random_range(0..NODES)),
            };
            (start, end, fault)
        })
        .chain(std::iter::once(split))
        .collect();
    let skew_ms = (0..NODES).map(|_| rng.random_range(0..300)).collect();
    Plan {
        tables,
        writes,
        resolves,
        faults,
        skew_ms,
    }
}

/// What the clients and operators did, over every incarnation of every node.
#[derive(Debug, Default)]
struct Tally {
    /// Writes that made an event.
    written: AtomicU64,
    /// Writes the local store refused, by the constraint.
    refused_unique: AtomicU64,
    refused_foreign_key: AtomicU64,
    refused_check: AtomicU64,
    /// Resolutions: done, refused as stale (the winner changed), refused as
    /// already closed, or of a conflict gone by then (its record placed again).
    resolved: AtomicU64,
    stale: AtomicU64,
    closed: AtomicU64,
    gone: AtomicU64,
    refused_resolutions: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What one seed exercised.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stats {
    written: u64,
    /// Writes refused locally: UNIQUE, FOREIGN KEY, CHECK.
    refused: [u64; 3],
    resolved: u64,
    /// Resolutions refused as stale or closed, or of a conflict gone.
    raced: u64,
    /// Resolutions whose values the table refused.
    refused_resolutions: u64,
    /// Distinct (record, write) pairs seen blocked while the nodes ran: by a
    /// UNIQUE clash, and children waiting for a parent that was not there.
    blocked_unique_seen: u64,
    waiting_children_seen: u64,
    /// At the end: conflicts by (kind, status), and blocked records by kind.
    conflicts: BTreeMap<(&'static str, &'static str), u64>,
    blocked: BTreeMap<&'static str, u64>,
}

impl Stats {
    fn conflicts_of(&self, kind: ConflictKind) -> u64 {
        self.conflicts
            .iter()
            .filter(|((k, _), _)| *k == kind.as_str())
            .map(|(_, n)| n)
            .sum()
    }

    fn add(&mut self, other: &Stats) {
        self.written += other.written;
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            *a += b;
        }
        self.resolved += other.resolved;
        self.raced += other.raced;
        self.refused_resolutions += other.refused_resolutions;
        self.blocked_unique_seen += other.blocked_unique_seen;
        self.waiting_children_seen += other.waiting_children_seen;
        for (k, n) in &other.conflicts {
            *self.conflicts.entry(*k).or_default() += n;
        }
        for (k, n) in &other.blocked {
            *self.blocked.entry(*k).or_default() += n;
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} writes (refused locally: {:?} unique, fk, check), {} resolutions ({} raced, {} refused), seen blocked: {} by unique, {} children waiting; conflicts {:?}; blocked at the end {:?}",
            self.written,
            self.refused,
            self.resolved,
            self.raced,
            self.refused_resolutions,
            self.blocked_unique_seen,
            self.waiting_children_seen,
            self.conflicts,
            self.blocked
        )
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

/// Declares every table of the simulation on a node's database (once: a
/// restarted node finds them).
async fn declare_tables(db: &MemoryBackend) -> Result<(), StoreError> {
    for (table, _) in KV_TABLES {
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
    if db.table_rows(USERS).await.is_none() {
        db.create_table(
            USERS,
            vec![
                Column::new("id", "TEXT").primary_key(),
                Column::new("email", "TEXT").unique(),
                Column::new("name", "TEXT"),
                Column::new("age", "INTEGER").check_range(0.0, AGE_MAX as f64),
            ],
        )
        .await?;
    }
    if db.table_rows(ORDERS).await.is_none() {
        db.create_table(
            ORDERS,
            vec![
                Column::new("id", "TEXT").primary_key(),
                Column::new("user_id", "TEXT")
                    .not_null()
                    .references(USERS, "id"),
                Column::new("amount", "INTEGER"),
            ],
        )
        .await?;
    }
    Ok(())
}

/// One client write through the store's API. A write the local store refuses
/// (a UNIQUE, FOREIGN KEY or CHECK violation) is counted and does not happen;
/// any other error fails the node.
async fn client_write(store: &Store, i: usize, op: &Op, tally: &Tally) -> Result<(), StoreError> {
    let outcome = match op {
        Op::Kv {
            table,
            key,
            value: Some(v),
        } => {
            store
                .put(
                    table,
                    record(*key),
                    &row(json!({"val": v, "origin": host(i)})),
                )
                .await?;
            count(&tally.written);
            return Ok(());
        }
        Op::Kv {
            table,
            key,
            value: None,
        } => {
            if store.delete(table, record(*key)).await?.is_some() {
                count(&tally.written);
            }
            return Ok(());
        }
        Op::PutUser { key, email: e, age } => store
            .put(
                USERS,
                user(*key),
                &row(json!({
                    "email": e.map(email),
                    "name": format!("user {key} by {}", host(i)),
                    "age": age,
                })),
            )
            .await
            .map(Some),
        Op::SetEmail { key, email: e } => store
            .put(USERS, user(*key), &row(json!({"email": email(*e)})))
            .await
            .map(Some),
        Op::DeleteUser { key } => store.delete(USERS, user(*key)).await,
        Op::PutOrder {
            key,
            user: u,
            amount,
        } => store
            .put(
                ORDERS,
                order(*key),
                &row(json!({"user_id": user(*u).to_string(), "amount": amount})),
            )
            .await
            .map(Some),
        Op::DeleteOrder { key } => store.delete(ORDERS, order(*key)).await,
    };
    match outcome {
        Ok(event) => {
            if event.is_some() {
                count(&tally.written);
            }
            Ok(())
        }
        Err(StoreError::Constraint { table, reason }) => {
            let counter = if reason.starts_with("UNIQUE") {
                &tally.refused_unique
            } else if reason.starts_with("FOREIGN KEY") {
                &tally.refused_foreign_key
            } else if reason.starts_with("CHECK") {
                &tally.refused_check
            } else {
                return Err(StoreError::Constraint { table, reason });
            };
            count(counter);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn raw(v: Value) -> RawValues {
    row(v)
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::value::to_raw_value(&v).ok()?)))
        .collect()
}

/// New values an operator merges into a conflict's record.
fn merged_values(c: &Conflict, rng: &mut ChaCha8Rng) -> RawValues {
    match c.table_name.as_str() {
        USERS if rng.random_bool(0.5) => raw(json!({"email": email(rng.random_range(0..EMAILS))})),
        USERS => raw(json!({"email": format!("fixed-{}@sim.test", c.conflict_id)})),
        ORDERS if rng.random_bool(0.5) => {
            raw(json!({"user_id": user(rng.random_range(0..USER_KEYS)).to_string()}))
        }
        ORDERS => raw(json!({"amount": rng.random_range(1..500)})),
        _ => raw(json!({"val": rng.random_range(0..1000), "origin": "operator"})),
    }
}

/// One operator round on node `i`: lists the open conflicts of the `manual`
/// tables and resolves up to three of them. A stale winner, a conflict closed
/// meanwhile and one gone meanwhile are outcomes of racing operators and
/// replication, counted; any other error fails the node.
async fn operator_round(
    store: &Store,
    i: usize,
    r: Resolve,
    manual: &[&str],
    tally: &Tally,
) -> Result<(), StoreError> {
    let mut rng = ChaCha8Rng::seed_from_u64(r.pick);
    let mut open = Vec::new();
    for table in manual {
        open.extend(
            store
                .list_conflicts(&ConflictFilter {
                    table: Some((*table).to_owned()),
                    status: Some(ConflictStatus::Open),
                    limit: 1_000,
                    ..Default::default()
                })
                .await?,
        );
    }
    let n = open.len().min(rng.random_range(1..=3));
    for _ in 0..n {
        let c = open.swap_remove(rng.random_range(0..open.len()));
        let choice = match rng.random_range(0..3) {
            0 => ResolveChoice::KeepLocal,
            1 => ResolveChoice::KeepRemote,
            _ => ResolveChoice::Merged(merged_values(&c, &mut rng)),
        };
        let expected = rng.random_bool(0.75).then_some(c.winner.event_id);
        // The operator reads, thinks, then acts: replication goes on meanwhile.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        let by = format!("operator@{}", host(i));
        let note = format!("{} {}", c.kind.as_str(), choice.kind());
        match store
            .resolve_conflict(c.conflict_id, choice, &by, Some(&note), expected)
            .await
        {
            Ok(_) => count(&tally.resolved),
            Err(StoreError::StaleResolution { .. }) => count(&tally.stale),
            Err(StoreError::ConflictClosed { .. }) => count(&tally.closed),
            Err(StoreError::NoSuchConflict { .. }) => count(&tally.gone),
            // Values the table does not take (a merge over a record with no
            // row leaves the columns not given NULL): refused, nothing changes.
            Err(StoreError::RowRefused { .. } | StoreError::Constraint { .. }) => {
                count(&tally.refused_resolutions)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sleeps until `at_ms` of simulated time; false if that is already past.
async fn until(at_ms: u64) -> bool {
    let now = turmoil::sim_elapsed().unwrap_or_default();
    let at = Duration::from_millis(at_ms);
    if at < now {
        return false;
    }
    tokio::time::sleep(at - now).await;
    true
}

/// One node: its database, and what its client and operator do.
#[derive(Clone)]
struct NodeSetup {
    seed: u64,
    i: usize,
    topology: Topology,
    tables: Tables,
    db: MemoryBackend,
    ids: Arc<AtomicU64>,
    writes: Vec<Write>,
    resolves: Vec<Resolve>,
    skew_ms: i64,
    tally: Arc<Tally>,
    /// Set once the operator's last round is behind it.
    operator_done: Arc<AtomicBool>,
}

/// One node's software: everything a daemon runs for replication, plus the
/// client writing its planned writes and the operator resolving conflicts.
/// Called again after each restart.
async fn run_node(node: NodeSetup) -> turmoil::Result {
    let NodeSetup {
        seed,
        i,
        topology,
        tables,
        db,
        ids,
        writes,
        resolves,
        skew_ms,
        tally,
        operator_done,
    } = node;
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
    declare_tables(&db).await?;
    let store = Store::open_memory(db, Arc::new(clock), Some(next_id)).await?;
    store.bind_cluster("sim").await?;
    for (table, policy) in tables {
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
    let connector = Connector::new(|uri: tonic::transport::Uri| async move {
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(PORT);
        turmoil::net::TcpStream::connect((host.as_str(), port)).await
    });
    let peer_set = tidemark_replicator::PeerSet::new(peers.clone());
    let sender = Sender::new(
        store.clone(),
        local.clone(),
        options(),
        peer_set.clone(),
        None,
    )
    .with_connector(connector)
    .with_jitter_seed(seed ^ i as u64);
    let receiver = ReceiverService::new(
        store.clone(),
        local,
        options(),
        cancel.clone(),
        tracker.clone(),
        peer_set,
        false,
    )
    .waking(sender.wake_handle());
    let listener =
        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| SimStream(s));
        Some((next, l))
    });
    tokio::spawn(receiver.serve_incoming(incoming, std::future::pending()));
    for peer in peers {
        tokio::spawn(sender.clone().run_peer(peer, cancel.clone()));
    }
    tokio::spawn(sender.clone().run_sync_marker(cancel.clone()));
    // The operator: each planned round still ahead (those planned while the
    // node was down never happen).
    let operator = {
        let store = store.clone();
        let tally = tally.clone();
        let manual: Vec<&'static str> = tables
            .iter()
            .filter(|(_, p)| *p == ConflictPolicy::Manual)
            .map(|(t, _)| *t)
            .collect();
        tokio::spawn(async move {
            for r in resolves {
                if until(r.at_ms).await {
                    operator_round(&store, i, r, &manual, &tally).await?;
                }
            }
            operator_done.store(true, Ordering::Relaxed);
            Ok::<(), StoreError>(())
        })
    };
    // The client: likewise, each planned write still ahead.
    for w in writes {
        if until(w.at_ms).await {
            client_write(&store, i, &w.op, &tally).await?;
        }
    }
    operator.await??;
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
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(ChangeEvent::try_from)
            .collect::<Result<Vec<_>, _>>()
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

async fn blocked_of(db: &MemoryBackend) -> Result<Vec<Blocked>, String> {
    db.list_blocked(None, u32::MAX)
        .await
        .map_err(|e| e.to_string())
}

async fn conflicts_of(db: &MemoryBackend) -> Result<Vec<Conflict>, String> {
    db.list_conflicts(&ConflictFilter {
        limit: u32::MAX,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())
}

/// Blocked records seen while the nodes run: (record, write) pairs blocked by
/// a UNIQUE clash, and children waiting for a parent that is not there (not
/// deleted: not arrived, or not placed).
#[derive(Debug, Default)]
struct Seen {
    unique: BTreeSet<(Ulid, Ulid)>,
    waiting: BTreeSet<(Ulid, Ulid)>,
}

async fn observe(dbs: &[MemoryBackend], seen: &mut Seen) -> Result<(), String> {
    for db in dbs {
        for b in blocked_of(db).await? {
            match b.kind {
                BlockKind::Unique => {
                    seen.unique.insert((b.record_id, b.event_id));
                }
                BlockKind::ForeignKey if b.reason.contains("which is not here") => {
                    seen.waiting.insert((b.record_id, b.event_id));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// What the nodes' logs must agree on: every event (id, origin, hlc,
/// operation) and the applied vector.
async fn log_digest(db: &MemoryBackend) -> Result<String, String> {
    let mut out = String::new();
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
    let vector = db.vector().await.map_err(|e| e.to_string())?;
    let _ = writeln!(out, "vector {:?}", vector.to_json());
    Ok(out)
}

/// A conflict as text: every field, its times included (they are HLC times,
/// the same on every node).
fn conflict_line(c: &Conflict) -> String {
    format!(
        "conflict {} {} {} {} {} policy {} detail {:?} winner {:?} {:?} {} {} loser {} {} detected {} resolved {:?} resolution {:?} by {:?} note {:?} event {:?}",
        c.conflict_id,
        c.kind.as_str(),
        c.table_name,
        c.record_id,
        c.status.as_str(),
        c.policy,
        c.detail,
        c.winner_table,
        c.winner_record_id,
        c.winner.event_id,
        json!(c.winner.values),
        c.loser.event_id,
        json!(c.loser.values),
        c.detected_at,
        c.resolved_at,
        c.resolution,
        c.resolved_by,
        c.resolution_note,
        c.resolution_event_id,
    )
}

/// What the nodes' state must agree on once they hold the same events: rows
/// with stamps, every conflict (open and decided: one history), and every
/// blocked record (not the local time it was blocked).
async fn state_digest(db: &MemoryBackend, tables: &Tables) -> Result<String, String> {
    let mut out = String::new();
    for (table, _) in tables {
        for r in db.table_rows(table).await.unwrap_or_default() {
            let _ = writeln!(out, "{table} {}", Value::Object(r));
        }
    }
    for c in conflicts_of(db).await? {
        let _ = writeln!(out, "{}", conflict_line(&c));
    }
    for b in blocked_of(db).await? {
        let _ = writeln!(
            out,
            "blocked {} {} {} {} {:?} by {:?} {:?}",
            b.table_name,
            b.record_id,
            b.event_id,
            b.kind.as_str(),
            b.reason,
            b.blocker_table,
            b.blocker_id
        );
    }
    Ok(out)
}

/// The lines of each node's text that the first node's lacks and the reverse
/// (at most a few of each), to say how nodes differ.
fn differences(texts: &[String]) -> String {
    let first: BTreeSet<&str> = texts[0].lines().collect();
    let mut out = String::new();
    for (n, text) in texts.iter().enumerate().skip(1) {
        let other: BTreeSet<&str> = text.lines().collect();
        if first == other {
            continue;
        }
        let _ = writeln!(out, "{} against {}:", host(n), host(0));
        for line in other.difference(&first).take(8) {
            let _ = writeln!(out, "  only on {}: {line}", host(n));
        }
        for line in first.difference(&other).take(8) {
            let _ = writeln!(out, "  only on {}: {line}", host(0));
        }
    }
    out
}

/// Checks 1, 3 and 4 once every node holds the same events and state.
async fn check_final(dbs: &[MemoryBackend], tables: &Tables) -> Result<(), String> {
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
        let ids: BTreeSet<Ulid> = own.iter().map(|e| e.event_id).collect();
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
    // The greatest event of each record by the total order, over every event.
    let mut winners: BTreeMap<(&str, Ulid), &ChangeEvent> = BTreeMap::new();
    for e in logs[0].values().flatten() {
        let w = winners
            .entry((e.table_name.as_str(), e.record_id))
            .or_insert(e);
        if e.order() > w.order() {
            *w = e;
        }
    }
    for (n, db) in dbs.iter().enumerate() {
        let blocked: BTreeMap<(String, Ulid), Blocked> = blocked_of(db)
            .await?
            .into_iter()
            .map(|b| ((b.table_name.clone(), b.record_id), b))
            .collect();
        let mut rows: BTreeMap<&str, BTreeMap<Ulid, Values>> = BTreeMap::new();
        for (table, _) in tables {
            let mut by_id = BTreeMap::new();
            for r in db.table_rows(table).await.unwrap_or_default() {
                let id = r
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|s| Ulid::from_string(s).ok())
                    .ok_or_else(|| format!("{}: a row of {table} without a ULID id", host(n)))?;
                by_id.insert(id, r);
            }
            rows.insert(table, by_id);
        }
        // 3: each record's row follows its greatest event; on a constrained
        // table a put may instead leave the record blocked on that event.
        for ((table, id), w) in &winners {
            let Some(table_rows) = rows.get(table) else {
                continue;
            };
            let constrained = *table == USERS || *table == ORDERS;
            let row = table_rows.get(id);
            let block = blocked.get(&(table.to_string(), *id));
            let ok = match (&w.new_values, row) {
                _ if w.operation == Operation::Delete => row.is_none() && block.is_none(),
                (Some(values), Some(r)) => {
                    values.iter().all(|(c, val)| r.get(c) == Some(val))
                        && r["hlc_modified"] == json!(w.hlc.encode())
                        && r["node_id"] == json!(w.node_id.to_string())
                        && block.is_none()
                }
                (_, None) => constrained && block.is_some_and(|b| b.event_id == w.event_id),
                (None, Some(_)) => false,
            };
            if !ok {
                return Err(format!(
                    "{}: {table} {id} is {:?}, blocked {:?}, but its greatest event is {:?}",
                    host(n),
                    row,
                    block.map(|b| (b.event_id, b.kind.as_str(), &b.reason)),
                    (w.event_id, w.hlc, w.operation, &w.new_values)
                ));
            }
        }
        for (table, table_rows) in &rows {
            if let Some(id) = table_rows
                .keys()
                .find(|id| !winners.contains_key(&(*table, **id)))
            {
                return Err(format!("{}: {table} {id} has a row but no event", host(n)));
            }
        }
        if let Some(((table, id), _)) = blocked
            .iter()
            .find(|(k, _)| !winners.contains_key(&(k.0.as_str(), k.1)))
        {
            return Err(format!(
                "{}: {table} {id} is blocked but has no event",
                host(n)
            ));
        }
        // 4: no placed row breaks a constraint.
        let mut emails: BTreeMap<String, Ulid> = BTreeMap::new();
        for (id, r) in &rows[USERS] {
            let email = r.get("email").filter(|e| !e.is_null());
            if let Some(other) = email.and_then(|e| emails.insert(e.to_string(), *id)) {
                return Err(format!(
                    "{}: users {other} and {id} both hold email {}",
                    host(n),
                    email.map(Value::to_string).unwrap_or_default()
                ));
            }
            let age = r.get("age").filter(|a| !a.is_null());
            if age.is_some_and(|a| a.as_i64().is_none_or(|a| !(0..=AGE_MAX).contains(&a))) {
                return Err(format!("{}: users {id} holds age {age:?}", host(n)));
            }
        }
        for (id, r) in &rows[ORDERS] {
            let parent = r
                .get("user_id")
                .and_then(Value::as_str)
                .and_then(|s| Ulid::from_string(s).ok());
            if parent.is_none_or(|p| !rows[USERS].contains_key(&p)) {
                return Err(format!(
                    "{}: orders {id} is placed but its user {:?} is not",
                    host(n),
                    r.get("user_id")
                ));
            }
        }
        // 4: an open constraint conflict is about a record still blocked on
        // the write that lost.
        for c in conflicts_of(db).await? {
            if c.status != ConflictStatus::Open || c.kind == ConflictKind::Version {
                continue;
            }
            let block = blocked.get(&(c.table_name.clone(), c.record_id));
            if block.is_none_or(|b| b.event_id != c.conflict_id) {
                return Err(format!(
                    "{}: open {} conflict {} on {} {}, but the record is blocked on {:?}",
                    host(n),
                    c.kind.as_str(),
                    c.conflict_id,
                    c.table_name,
                    c.record_id,
                    block.map(|b| b.event_id)
                ));
            }
        }
    }
    Ok(())
}

/// What the converged state holds: conflicts by kind and status, blocked
/// records by kind.
async fn final_stats(db: &MemoryBackend, stats: &mut Stats) -> Result<(), String> {
    for c in conflicts_of(db).await? {
        *stats
            .conflicts
            .entry((c.kind.as_str(), c.status.as_str()))
            .or_default() += 1;
    }
    for b in blocked_of(db).await? {
        *stats.blocked.entry(b.kind.as_str()).or_default() += 1;
    }
    Ok(())
}

/// The checker: prefixes while faults run, then, once healed and the
/// operators are done, waits until every node holds the same events, gives
/// their state a moment to agree, and runs the final checks. Returns the
/// agreed digest and what the run exercised.
async fn check(
    dbs: Vec<MemoryBackend>,
    tables: Tables,
    healed: Arc<AtomicBool>,
    operators_done: Vec<Arc<AtomicBool>>,
    tally: Arc<Tally>,
) -> Result<(String, Stats), String> {
    let mut seen = Seen::default();
    let mut rounds = 0_u64;
    while !healed.load(Ordering::Relaxed) {
        if rounds.is_multiple_of(5) {
            check_prefixes(&dbs).await?;
        }
        rounds += 1;
        observe(&dbs, &mut seen).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while !operators_done.iter().all(|d| d.load(Ordering::Relaxed)) {
        observe(&dbs, &mut seen).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = loop {
        observe(&dbs, &mut seen).await?;
        let mut logs = Vec::new();
        for db in &dbs {
            logs.push(log_digest(db).await?);
        }
        if logs.windows(2).all(|w| w[0] == w[1]) {
            break logs;
        }
        if sim_ms() as u64 > HEAL_MS + CONVERGE_MS {
            return Err(format!(
                "the nodes' logs still differ {CONVERGE_MS} ms after healing:\n{}",
                differences(&logs)
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let settle_by = sim_ms() as u64 + SETTLE_MS;
    loop {
        let mut states = Vec::new();
        for db in &dbs {
            states.push(state_digest(db, &tables).await?);
        }
        if states.windows(2).all(|w| w[0] == w[1]) {
            check_final(&dbs, &tables).await?;
            let mut stats = Stats {
                written: read(&tally.written),
                refused: [
                    read(&tally.refused_unique),
                    read(&tally.refused_foreign_key),
                    read(&tally.refused_check),
                ],
                resolved: read(&tally.resolved),
                raced: read(&tally.stale) + read(&tally.closed) + read(&tally.gone),
                refused_resolutions: read(&tally.refused_resolutions),
                blocked_unique_seen: seen.unique.len() as u64,
                waiting_children_seen: seen.waiting.len() as u64,
                ..Stats::default()
            };
            final_stats(&dbs[0], &mut stats).await?;
            return Ok((logs[0].clone() + &states[0], stats));
        }
        if sim_ms() as u64 > settle_by {
            return Err(format!(
                "the nodes hold the same events but their state still differs {SETTLE_MS} ms later:\n{}",
                differences(&states)
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs one seeded scenario; returns every node's final digest (identical)
/// and what the run exercised.
fn simulate(seed: u64, topology: Topology) -> Result<(String, Stats), String> {
    let plan = plan(seed, topology);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .enable_random_order()
        .simulation_duration(Duration::from_millis(
            HEAL_MS + CONVERGE_MS + SETTLE_MS + 5_000,
        ))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .repair_rate(0.02)
        .build();
    let dbs: Vec<MemoryBackend> = (0..NODES)
        .map(|_| MemoryBackend::with_wall(move || BASE_MS + sim_ms()))
        .collect();
    let tally = Arc::new(Tally::default());
    let operators_done: Vec<Arc<AtomicBool>> = (0..NODES)
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    for (i, db) in dbs.iter().enumerate() {
        let node = NodeSetup {
            seed,
            i,
            topology,
            tables: plan.tables,
            db: db.clone(),
            ids: Arc::new(AtomicU64::new(0)),
            writes: plan.writes[i].clone(),
            resolves: plan.resolves[i].clone(),
            skew_ms: plan.skew_ms[i],
            tally: tally.clone(),
            operator_done: operators_done[i].clone(),
        };
        sim.host(host(i), move || run_node(node.clone()));
    }
    let healed = Arc::new(AtomicBool::new(false));
    type Outcome = Option<Result<(String, Stats), String>>;
    let result: Rc<RefCell<Outcome>> = Rc::new(RefCell::new(None));
    {
        let dbs = dbs.clone();
        let healed = healed.clone();
        let result = result.clone();
        let tables = plan.tables;
        sim.client("checker", async move {
            let outcome = check(dbs, tables, healed, operators_done, tally).await;
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
        while let Some((_, end, fault)) = pending.next_if(|f| f.0 <= now) {
            match fault {
                Fault::Partition(a, b) => sim.partition(host(a), host(b)),
                Fault::PartitionOneway(a, b) => sim.partition_oneway(host(a), host(b)),
                Fault::Hold(a, b) => sim.hold(host(a), host(b)),
                Fault::Flaky(a, b) => sim.set_link_fail_rate(host(a), host(b), 0.01),
                Fault::Isolate(n) => {
                    for j in topology.peers(n) {
                        sim.partition(host(n), host(j));
                    }
                }
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
                Fault::Isolate(n) => {
                    for j in topology.peers(n) {
                        sim.repair(host(n), host(j));
                    }
                }
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
/// seed and how to replay it. On the CI list, also checks that the seeds
/// together reached what the simulation is for.
fn run_seeds(test: &str, topology: Topology, ci_seeds: &[u64]) {
    let (seeds, ci): (Vec<u64>, bool) = if let Ok(s) = std::env::var("TIDEMARK_SIM_SEED") {
        let seed = s
            .trim()
            .parse()
            .expect("TIDEMARK_SIM_SEED must be an unsigned integer");
        (vec![seed], false)
    } else if let Ok(n) = std::env::var("TIDEMARK_SIM_SEEDS") {
        let n: usize = n
            .trim()
            .parse()
            .expect("TIDEMARK_SIM_SEEDS must be a count");
        let mut rng = rand::rng();
        ((0..n).map(|_| rng.random()).collect(), false)
    } else {
        (ci_seeds.to_vec(), true)
    };
    let mut failures = Vec::new();
    let mut total = Stats::default();
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| simulate(seed, topology)).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()))
        });
        match outcome {
            Ok((_, stats)) => {
                eprintln!("seed {seed}, {topology:?}: {stats}");
                total.add(&stats);
            }
            Err(e) => {
                eprintln!(
                    "simulation failed: seed {seed}, {topology:?}: {e}\n{}",
                    replay_hint(test, seed)
                );
                failures.push(seed);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{topology:?} failed for seeds {failures:?}; {}",
        replay_hint(test, failures[0])
    );
    eprintln!("{topology:?}, all seeds: {total}");
    if ci {
        let reached = [
            ("UNIQUE conflicts", total.conflicts_of(ConflictKind::Unique)),
            (
                "FOREIGN KEY conflicts",
                total.conflicts_of(ConflictKind::ForeignKey),
            ),
            (
                "version conflicts",
                total.conflicts_of(ConflictKind::Version),
            ),
            (
                "children ahead of their parents",
                total.waiting_children_seen,
            ),
            (
                "records blocked by a UNIQUE clash",
                total.blocked_unique_seen,
            ),
            ("operator resolutions", total.resolved),
            ("writes refused locally by UNIQUE", total.refused[0]),
            ("writes refused locally by a FOREIGN KEY", total.refused[1]),
            ("writes refused locally by a CHECK", total.refused[2]),
        ];
        for (what, n) in reached {
            assert!(
                n > 0,
                "{topology:?}: the CI seeds reached no {what}: {total}"
            );
        }
    }
}

#[test]
fn mesh_converges_under_faults() {
    run_seeds(
        "mesh_converges_under_faults",
        Topology::Mesh,
        // 1-12, and random seeds that once failed (a UNIQUE clash kept on one
        // node after its blocked write lost to a concurrent write of the same row).
        &(1..=12)
            .chain([15660236415104187183, 5496905070952978096])
            .collect::<Vec<_>>(),
    );
}

#[test]
fn chain_converges_under_faults_through_relaying() {
    run_seeds(
        "chain_converges_under_faults_through_relaying",
        Topology::Chain,
        // 101-108, and random seeds that once failed (as above).
        &(101..=108)
            .chain([10413727624844321904, 9184591442003014216])
            .collect::<Vec<_>>(),
    );
}

#[test]
fn a_seed_replays_identically() {
    // Without it tokio's own random choices are not seeded (.cargo/config.toml).
    if !cfg!(tokio_unstable) {
        panic!(
            "a replay needs `--cfg tokio_unstable` (set in .cargo/config.toml; RUSTFLAGS in the environment replaces it)"
        );
    }
    let seed = std::env::var("TIDEMARK_SIM_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(42);
    let run = |seed: u64| {
        simulate(seed, Topology::Mesh).unwrap_or_else(|e| {
            panic!(
                "seed {seed}: {e}\n{}",
                replay_hint("a_seed_replays_identically", seed)
            )
        })
    };
    let (first, first_stats) = run(seed);
    let (second, second_stats) = run(seed);
    assert!(first.contains("event "), "the run wrote nothing:\n{first}");
    assert!(first.contains("users "), "the run placed no user:\n{first}");
    assert!(
        first == second,
        "seed {seed} did not replay identically (n1 is the second run):\n{}",
        differences(&[first.clone(), second.clone()])
    );
    assert_eq!(
        first_stats, second_stats,
        "seed {seed} did not replay identically"
    );
    let (other, _) = run(seed + 1);
    assert_ne!(first, other, "a different seed gave the same run");
}
