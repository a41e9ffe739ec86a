//! `tidemark bench`: the replication benchmark a user runs on their own machine.
//!
//! One run measures, on loopback, with real `tidemark` daemons (child processes of
//! this binary, so each has its own RSS and CPU counters):
//! * the raw limit: the same rows (entity row + `change_events` row per write)
//!   inserted into a bare local SQLite database with prepared statements, one per
//!   transaction and 100 per transaction;
//! * replicated throughput between 2 nodes: single-row writes through the write API
//!   and through direct SQL, and 100-row transactions through direct SQL; a run
//!   ends when every node holds every event;
//! * catch-up: a node that was down receives a backlog;
//! * end-to-end lag on 3 nodes at a fixed write rate: from the moment a write is
//!   sent to a node's API until the event is committed on every other node
//!   (observed by polling each node's `change_events` by rowid every millisecond,
//!   so the figures carry up to ~1 ms of observation delay);
//! * peak and steady RSS and the CPU time of every daemon.
//!
//! Ratios are to the raw limits measured in the same run, so they hold on any box.
//! Only SQLite stores are benchmarked here.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::{Connection, params};
use serde_json::json;
use tidemark_replicator::pb::{self, records_client::RecordsClient};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use ulid::Ulid;

use crate::demo::{Stream, write_line};

/// Arguments of `tidemark bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Writes per throughput run (spread over the writing nodes).
    #[arg(long, default_value_t = 20_000)]
    pub writes: u64,
    /// Events in the catch-up backlog.
    #[arg(long, default_value_t = 100_000)]
    pub backlog: u64,
    /// Total write rate (writes/s, over all nodes) of the lag run.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Duration of the lag run, seconds.
    #[arg(long, default_value_t = 10)]
    pub lag_secs: u64,
    /// Concurrent clients per node in the flat-out API runs.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Keep the databases, configs and daemon logs in this directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const NOTES_DDL: &str = "CREATE TABLE IF NOT EXISTS notes (\
    id TEXT PRIMARY KEY CHECK (length(id) = 26), \
    title TEXT NOT NULL, \
    body TEXT, \
    author TEXT)";

/// A note's body: ~100 bytes, like a small application row.
fn body(i: u64) -> String {
    format!(
        "benchmark row {i:>10} lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod"
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI.
    Some((utime + stime) / 100.0)
}

/// A `/proc/PID/status` field in kB (VmRSS, VmHWM).
fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// Raw limit: the same rows into a bare SQLite database.

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Rate {
    events: u64,
    secs: f64,
    per_sec: f64,
    /// CPU seconds spent by the processes doing the work.
    cpu_secs: f64,
}

impl Rate {
    fn new(events: u64, secs: f64, cpu_secs: f64) -> Rate {
        Rate {
            events,
            secs,
            per_sec: events as f64 / secs.max(1e-9),
            cpu_secs,
        }
    }
    fn per_cpu_sec(&self) -> f64 {
        self.events as f64 / self.cpu_secs.max(1e-9)
    }
}

/// Inserts `n` writes (entity row + event row each), `per_tx` per transaction,
/// into a fresh database with Tidemark's own schema, using prepared statements.
fn raw_rate(dir: &Path, name: &str, n: u64, per_tx: u64) -> anyhow::Result<Rate> {
    let path = dir.join(format!("raw-{name}.db"));
    let mut conn = open(&path)?;
    conn.execute_batch(tidemark_store::sqlite::SCHEMA_SQL)?;
    conn.execute_batch(
        "CREATE TABLE notes (id TEXT PRIMARY KEY CHECK (length(id) = 26), title TEXT NOT NULL, \
         body TEXT, author TEXT, node_id TEXT, hlc_modified INTEGER)",
    )?;
    let node = Ulid::generate().to_string();
    let cpu0 = cpu_secs("self").unwrap_or(0.0);
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let tx = conn.transaction()?;
        {
            let mut row = tx.prepare_cached(
                "INSERT INTO notes (id, title, body, author, node_id, hlc_modified) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut event = tx.prepare_cached(
                "INSERT INTO change_events (event_id, hlc_timestamp, wall_timestamp, node_id, \
                 table_name, record_id, operation, new_values, metadata) \
                 VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?3, 'notes', ?4, 'INSERT', ?5, ?6)",
            )?;
            for _ in 0..per_tx.min(n - i) {
                let id = Ulid::generate().to_string();
                let title = format!("note {i}");
                let body = body(i);
                let hlc = (i as i64 + 1) << 16;
                row.execute(params![id, title, body, "bench", node, hlc])?;
                let values = json!({"id": id, "title": title, "body": body, "author": "bench"});
                event.execute(params![
                    Ulid::generate().to_string(),
                    hlc,
                    node,
                    id,
                    values.to_string(),
                    r#"{"vv":{}}"#
                ])?;
                i += 1;
            }
        }
        tx.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs("self").unwrap_or(0.0) - cpu0;
    Ok(Rate::new(n, secs, cpu))
}

// ---------------------------------------------------------------------------
// A cluster of daemons, each a child process of this binary.

struct BenchNode {
    id: Ulid,
    grpc_port: u16,
    metrics_port: u16,
    db: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl BenchNode {
    fn pid(&self) -> Option<String> {
        self.child.as_ref().map(|c| c.id().to_string())
    }
    fn cpu(&self) -> f64 {
        self.pid().and_then(|p| cpu_secs(&p)).unwrap_or(0.0)
    }
    fn rss_kb(&self) -> u64 {
        self.pid()
            .and_then(|p| status_kb(&p, "VmRSS:"))
            .unwrap_or(0)
    }
    fn hwm_kb(&self) -> u64 {
        self.pid()
            .and_then(|p| status_kb(&p, "VmHWM:"))
            .unwrap_or(0)
    }
}

/// `tidemark run --config CONFIG` of binary `exe`, its output in a new `log`
/// file (the bench and the demo start their daemons this way).
pub(crate) fn daemon_command(exe: &Path, config: &Path, log: &Path) -> anyhow::Result<Command> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}

struct Cluster {
    nodes: Vec<BenchNode>,
}

impl Cluster {
    /// Writes configs for `n` nodes in a full mesh under `dir/name`.
    fn prepare(dir: &Path, name: &str, n: usize) -> anyhow::Result<Cluster> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let label = format!("node-{}", (b'a' + i as u8) as char);
            let db = dir.join(format!("{label}.db"));
            open(&db)?.execute_batch(NOTES_DDL)?;
            nodes.push(BenchNode {
                id: Ulid::generate(),
                grpc_port: free_port()?,
                metrics_port: free_port()?,
                config: dir.join(format!("{label}.toml")),
                log: dir.join(format!("{label}.log")),
                db,
                child: None,
            });
        }
        for (i, node) in nodes.iter().enumerate() {
            let mut text = format!(
                "[node]\nid = \"{}\"\nname = \"node-{}\"\ncluster_id = \"bench\"\n\n\
                 [store]\nurl = \"sqlite://{}\"\n\n\
                 [server]\nlisten_addr = \"127.0.0.1:{}\"\nmetrics_listen_addr = \"127.0.0.1:{}\"\n\n\
                 [tls]\ninsecure = true\n\n[log]\nlevel = \"warn\"\n\n\
                 \
                 [[tables]]\nname = \"notes\"\n",
                node.id,
                i,
                node.db.display(),
                node.grpc_port,
                node.metrics_port
            );
            for (j, peer) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                write!(
                    text,
                    "\n[[peers]]\nname = \"node-{j}\"\nnode_id = \"{}\"\naddress = \"http://127.0.0.1:{}\"\n",
                    peer.id, peer.grpc_port
                )?;
            }
            std::fs::write(&node.config, text)?;
        }
        Ok(Cluster { nodes })
    }

    async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the tidemark binary")?;
        let node = &mut self.nodes[i];
        let child = daemon_command(&exe, &node.config, &node.log)?
            .spawn()
            .context("starting a daemon")?;
        node.child = Some(child);
        let url = format!("127.0.0.1:{}", node.metrics_port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "daemon {} exited with {status} during start; log: {}",
                    i,
                    node.log.display()
                );
            }
            let url = url.clone();
            let ready = tokio::task::spawn_blocking(move || {
                crate::cli::healthcheck(&url, Duration::from_millis(500)).unwrap_or(false)
            })
            .await?;
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon {i} not ready after 60 s; log: {}",
                    node.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    async fn client(&self, i: usize) -> anyhow::Result<RecordsClient<Channel>> {
        let url = format!("http://127.0.0.1:{}", self.nodes[i].grpc_port);
        Ok(RecordsClient::connect(url).await?)
    }

    fn cpu(&self) -> f64 {
        self.nodes.iter().map(BenchNode::cpu).sum()
    }

    /// The received-event counters of every daemon, summed.
    async fn received(&self) -> anyhow::Result<Received> {
        let mut total = Received::default();
        for node in &self.nodes {
            let addr = format!("127.0.0.1:{}", node.metrics_port);
            let text = tokio::task::spawn_blocking(move || {
                crate::cli::http_get(&addr, "/metrics", Duration::from_secs(5))
            })
            .await??;
            for line in text.lines() {
                let Some((series, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let n = value.parse::<f64>().unwrap_or(0.0) as u64;
                if series.starts_with("tidemark_events_applied_total{") {
                    total.applied += n;
                } else if series.starts_with("tidemark_events_skipped_total{") {
                    if series.contains("reason=\"duplicate\"") {
                        total.duplicates += n;
                    } else if series.contains("reason=\"superseded\"") {
                        total.superseded += n;
                    }
                }
            }
        }
        Ok(total)
    }

    /// Waits until every node holds `events` note events; returns when the last
    /// one got there.
    async fn wait_events(&self, events: u64, timeout: Duration) -> anyhow::Result<Instant> {
        let dbs: Vec<PathBuf> = self.nodes.iter().map(|n| n.db.clone()).collect();
        wait_for_counts(&dbs, events, timeout).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Counts a node's `notes` events as they commit, reading only the rows added
/// since the last look (by rowid), so polling costs the same at 100 events as
/// at 100,000. A full `count(*)` every few milliseconds took about a quarter of
/// the machine's CPU while a large backlog replicated, and so slowed down the
/// very runs it timed.
struct EventCounter {
    conn: Connection,
    rowid: i64,
    count: u64,
}

impl EventCounter {
    fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            conn: open(path)?,
            rowid: 0,
            count: 0,
        })
    }

    /// Events counted so far, after reading what committed since the last call.
    /// Rows are never deleted during a run (retention is off), and rowids only
    /// grow, so each row is counted once.
    fn poll(&mut self) -> anyhow::Result<u64> {
        let (added, top): (i64, Option<i64>) = self.conn.query_row(
            "SELECT count(*) FILTER (WHERE table_name = 'notes'), max(rowid) \
             FROM change_events WHERE rowid > ?1",
            [self.rowid],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        self.count += added as u64;
        if let Some(top) = top {
            self.rowid = top;
        }
        Ok(self.count)
    }
}

async fn wait_for_counts(
    dbs: &[PathBuf],
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let dbs = dbs.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut counters: Vec<EventCounter> = dbs
            .iter()
            .map(|p| EventCounter::open(p))
            .collect::<Result<_, _>>()?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut counts = Vec::new();
            for c in &mut counters {
                counts.push(c.poll()?);
            }
            if counts.iter().all(|c| *c >= events) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("not converged after {timeout:?}: {counts:?} of {events} events");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await?
}

// ---------------------------------------------------------------------------
// Workloads.

/// `n` single-row puts through the API, `clients` concurrent clients per node,
/// over the first `writers` nodes.
async fn api_writes(
    cluster: &Cluster,
    writers: usize,
    n: u64,
    clients: usize,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = n / (writers * clients) as u64;
    let rest = n - per_task * (writers * clients) as u64;
    for w in 0..writers {
        for c in 0..clients {
            let mut client = cluster.client(w).await?;
            let count = per_task + u64::from(w == 0 && c == 0) * rest;
            tasks.spawn(async move {
                for i in 0..count {
                    put(&mut client, i).await?;
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn put(client: &mut RecordsClient<Channel>, i: u64) -> anyhow::Result<()> {
    let values = json!({"title": format!("note {i}"), "body": body(i), "author": "bench"});
    client
        .put(pb::PutRequest {
            table: "notes".into(),
            id: Ulid::generate().to_string(),
            values_json: values.to_string(),
        })
        .await
        .context("put")?;
    Ok(())
}

/// `n` rows inserted with direct SQL into each of the first `writers` nodes'
/// databases, `per_tx` per transaction (an application writing as usual).
async fn sql_writes(cluster: &Cluster, writers: usize, n: u64, per_tx: u64) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let per_writer = n / writers as u64;
    for w in 0..writers {
        let db = cluster.nodes[w].db.clone();
        let count = per_writer + if w == 0 { n % writers as u64 } else { 0 };
        tasks.spawn_blocking(move || -> anyhow::Result<()> {
            let mut conn = open(&db)?;
            let mut i = 0;
            while i < count {
                let tx = conn.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(
                        "INSERT INTO notes (id, title, body, author) VALUES (?1, ?2, ?3, 'bench')",
                    )?;
                    for _ in 0..per_tx.min(count - i) {
                        stmt.execute(params![
                            Ulid::generate().to_string(),
                            format!("note {i}"),
                            body(i)
                        ])?;
                        i += 1;
                    }
                }
                tx.commit()?;
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    name: String,
    nodes: usize,
    rate: Rate,
    /// Peak RSS per daemon, MiB.
    peak_rss_mib: Vec<f64>,
    /// Events received from peers over all daemons, and how many of them were
    /// already held (arrived by another path too), by the time every node held
    /// every event.
    received: Received,
}

/// Events received from peers, summed over a cluster's daemons (their
/// `tidemark_events_applied_total`, `..._skipped_total` counters).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Received {
    applied: u64,
    superseded: u64,
    duplicates: u64,
}

impl Received {
    /// Duplicates per event that was new to its receiver.
    fn duplicate_ratio(&self) -> f64 {
        self.duplicates as f64 / (self.applied + self.superseded).max(1) as f64
    }
}

/// One throughput run on a fresh cluster: writes on every node (or on the first
/// when `writers` is 1), timed until every node holds every event.
async fn throughput(
    dir: &Path,
    name: &str,
    nodes: usize,
    writes: u64,
    workload: impl AsyncFnOnce(&Cluster) -> anyhow::Result<()>,
) -> anyhow::Result<Run> {
    let mut cluster = Cluster::prepare(dir, name, nodes)?;
    cluster.start_all().await?;
    let cpu0 = cluster.cpu();
    let start = Instant::now();
    workload(&cluster).await?;
    let done = cluster
        .wait_events(writes, Duration::from_secs(600))
        .await?;
    let secs = done.duration_since(start).as_secs_f64();
    let cpu = cluster.cpu() - cpu0;
    Ok(Run {
        name: name.into(),
        nodes,
        rate: Rate::new(writes, secs, cpu),
        peak_rss_mib: cluster.nodes.iter().map(|n| mib(n.hwm_kb())).collect(),
        received: cluster.received().await?,
    })
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

#[derive(Debug, Clone, serde::Serialize)]
struct CatchUp {
    backlog: u64,
    secs: f64,
    per_sec: f64,
    /// CPU seconds of both daemons during catch-up.
    cpu_secs: f64,
    peak_rss_mib: Vec<f64>,
}

/// Node a takes a backlog while node b is down; then b starts and catches up.
async fn catch_up(dir: &Path, backlog: u64) -> anyhow::Result<CatchUp> {
    let mut cluster = Cluster::prepare(dir, "catch-up", 2)?;
    cluster.start(0).await?;
    sql_writes(&cluster, 1, backlog, 1000).await?;
    wait_for_counts(
        &[cluster.nodes[0].db.clone()],
        backlog,
        Duration::from_secs(600),
    )
    .await?;
    let cpu0 = cluster.nodes[0].cpu();
    let start = Instant::now();
    cluster.start(1).await?;
    let done = cluster
        .wait_events(backlog, Duration::from_secs(600))
        .await?;
    let secs = done.duration_since(start).as_secs_f64();
    Ok(CatchUp {
        backlog,
        secs,
        per_sec: backlog as f64 / secs,
        cpu_secs: cluster.cpu() - cpu0,
        peak_rss_mib: cluster.nodes.iter().map(|n| mib(n.hwm_kb())).collect(),
    })
}

#[derive(Debug, Clone, serde::Serialize)]
struct Lag {
    nodes: usize,
    target_rate: u64,
    achieved_rate: f64,
    writes: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Highest RSS seen per daemon while writing at the target rate, MiB.
    steady_rss_mib: Vec<f64>,
    received: Received,
}

/// Writes at `rate` per second (round robin over the nodes) for `secs`, while a
/// poller per node records when each event commits there.
async fn lag(dir: &Path, nodes: usize, rate: u64, secs: u64) -> anyhow::Result<Lag> {
    let mut cluster = Cluster::prepare(dir, "lag", nodes)?;
    cluster.start_all().await?;
    // Warm up: connections, statement caches.
    let mut clients = Vec::new();
    for i in 0..nodes {
        clients.push(cluster.client(i).await?);
    }
    for c in &mut clients {
        put(c, 0).await?;
    }
    cluster
        .wait_events(nodes as u64, Duration::from_secs(30))
        .await?;

    let stop = Arc::new(AtomicBool::new(false));
    type Seen = Vec<(String, Instant)>;
    let mut pollers = Vec::new();
    for node in &cluster.nodes {
        let (db, stop, me) = (node.db.clone(), stop.clone(), node.id.to_string());
        // Where each poller starts is read here, before any timed write: a
        // poller thread that started late would otherwise begin after the first
        // events arrived and never see them.
        let conn = open(&db)?;
        let mut last: i64 = conn.query_row(
            "SELECT coalesce(max(rowid), 0) FROM change_events",
            [],
            |r| r.get(0),
        )?;
        pollers.push(std::thread::spawn(move || -> anyhow::Result<Seen> {
            let mut stmt = conn.prepare(
                "SELECT rowid, record_id, node_id FROM change_events WHERE rowid > ?1 ORDER BY rowid",
            )?;
            let mut seen = Vec::new();
            loop {
                // One more pass after the stop: the events that completed the
                // count may have committed after this poller's last query.
                let last_pass = stop.load(Ordering::Acquire);
                let mut rows = stmt.query(params![last])?;
                let now = Instant::now();
                while let Some(row) = rows.next()? {
                    last = row.get(0)?;
                    let origin: String = row.get(2)?;
                    if origin != me {
                        seen.push((row.get(1)?, now));
                    }
                }
                if last_pass {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(seen)
        }));
    }

    let sent: Arc<Mutex<HashMap<String, (usize, Instant)>>> = Arc::default();
    let in_flight = Arc::new(Semaphore::new(256));
    let total = rate * secs;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut rss_peak = vec![0u64; nodes];
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(at).await;
        if i % 100 == 0 {
            for (peak, node) in rss_peak.iter_mut().zip(&cluster.nodes) {
                *peak = (*peak).max(node.rss_kb());
            }
        }
        let origin = (i % nodes as u64) as usize;
        let mut client = clients[origin].clone();
        let permit = in_flight.clone().acquire_owned().await?;
        let sent = sent.clone();
        tasks.spawn(async move {
            let id = Ulid::generate().to_string();
            let values = json!({"title": format!("note {i}"), "body": body(i), "author": "bench"});
            sent.lock()
                .expect("lock")
                .insert(id.clone(), (origin, Instant::now()));
            client
                .put(pb::PutRequest {
                    table: "notes".into(),
                    id,
                    values_json: values.to_string(),
                })
                .await
                .context("put")?;
            drop(permit);
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    cluster
        .wait_events(total + nodes as u64, Duration::from_secs(120))
        .await?;
    stop.store(true, Ordering::Release);
    let received = cluster.received().await?;
    let mut arrivals: HashMap<String, Vec<Instant>> = HashMap::new();
    for p in pollers {
        let seen = p.join().map_err(|_| anyhow::anyhow!("poller panicked"))??;
        for (record, at) in seen {
            arrivals.entry(record).or_default().push(at);
        }
    }
    let sent = sent.lock().expect("lock");
    let mut lags = Vec::with_capacity(sent.len());
    for (record, (_, at)) in sent.iter() {
        let seen = arrivals.get(record).map(Vec::as_slice).unwrap_or_default();
        if seen.len() != nodes - 1 {
            bail!(
                "record {record} reached {} of {} peers",
                seen.len(),
                nodes - 1
            );
        }
        let last = seen.iter().max().copied().unwrap_or(*at);
        lags.push(last.saturating_duration_since(*at).as_secs_f64() * 1000.0);
    }
    lags.sort_by(f64::total_cmp);
    let q = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    Ok(Lag {
        nodes,
        target_rate: rate,
        achieved_rate: achieved,
        writes: total,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: q(1.0),
        steady_rss_mib: rss_peak.into_iter().map(mib).collect(),
        received,
    })
}

#[derive(Debug, Clone, serde::Serialize)]
struct Report {
    machine: String,
    raw_single: Rate,
    raw_batched: Rate,
    runs: Vec<Run>,
    catch_up: CatchUp,
    lag: Lag,
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = status_kb_file("/proc/meminfo", "MemTotal:").map_or(0.0, |kb| kb as f64 / 1048576.0);
    format!(
        "{cpus} CPUs ({model}), {mem:.0} GiB RAM, {}",
        std::env::consts::OS
    )
}

fn status_kb_file(path: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs the whole benchmark and prints the report. Output into a closed pipe
/// (`tidemark bench | head -3`, or `2>&1 | head` during the runs) ends the run
/// quietly: the daemons are killed, the temporary directory removed, exit 0.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::demo::closed_output_is_success(bench(args).await)
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let step = |s: &str| write_line(Stream::Stderr, format_args!("bench: {s}"));
    step("raw SQLite, one write per transaction")?;
    let raw_single = raw_rate(&dir, "single", args.writes.min(20_000), 1)?;
    step("raw SQLite, 100 writes per transaction")?;
    let raw_batched = raw_rate(&dir, "batched", args.writes.max(100_000), 100)?;

    let mut runs = Vec::new();
    let (w, clients) = (args.writes, args.clients);
    step("2 nodes, single-row writes through the API")?;
    runs.push(
        throughput(&dir, "api-single-2", 2, w, async |c: &Cluster| {
            api_writes(c, 2, w, clients).await
        })
        .await?,
    );
    step("2 nodes, single-row writes with direct SQL")?;
    runs.push(
        throughput(&dir, "sql-single-2", 2, w, async |c: &Cluster| {
            sql_writes(c, 2, w, 1).await
        })
        .await?,
    );
    step("2 nodes, 100-row transactions with direct SQL")?;
    let wb = w.max(100_000);
    runs.push(
        throughput(&dir, "sql-batch100-2", 2, wb, async |c: &Cluster| {
            sql_writes(c, 2, wb, 100).await
        })
        .await?,
    );
    step("3 nodes, single-row writes through the API")?;
    runs.push(
        throughput(&dir, "api-single-3", 3, w, async |c: &Cluster| {
            api_writes(c, 3, w, clients).await
        })
        .await?,
    );
    step("catch-up of a backlog")?;
    let catch_up = catch_up(&dir, args.backlog).await?;
    step("lag on 3 nodes at a fixed rate")?;
    let lag = lag(&dir, 3, args.rate, args.lag_secs).await?;

    let report = Report {
        machine: machine(),
        raw_single,
        raw_batched,
        runs,
        catch_up,
        lag,
    };
    // The file first: a closed stdout must not lose it.
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    write_line(Stream::Stdout, format_args!("{}", render(&report)))
}

/// MiB figures of several daemons, as `22 / 23`.
fn mib_list(values: &[f64]) -> String {
    let parts: Vec<String> = values.iter().map(|m| format!("{m:.0}")).collect();
    parts.join(" / ")
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "machine: {}\n", r.machine);
    let _ = writeln!(
        s,
        "| run | nodes | events | seconds | events/s | daemon CPU s | events/CPU s | peak RSS MiB | duplicates received |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for (name, raw) in [
        ("raw SQLite, 1 per tx", &r.raw_single),
        ("raw SQLite, 100 per tx", &r.raw_batched),
    ] {
        let _ = writeln!(
            s,
            "| {name} | - | {} | {:.2} | {:.0} | {:.2} | {:.0} | - | - |",
            raw.events,
            raw.secs,
            raw.per_sec,
            raw.cpu_secs,
            raw.per_cpu_sec()
        );
    }
    for run in &r.runs {
        let rss = mib_list(&run.peak_rss_mib);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.0} | {} | {} ({:.2} per new event) |",
            run.name,
            run.nodes,
            run.rate.events,
            run.rate.secs,
            run.rate.per_sec,
            run.rate.cpu_secs,
            run.rate.per_cpu_sec(),
            rss,
            run.received.duplicates,
            run.received.duplicate_ratio()
        );
    }
    let rss = mib_list(&r.catch_up.peak_rss_mib);
    let _ = writeln!(
        s,
        "| catch-up of a backlog | 2 | {} | {:.2} | {:.0} | {:.2} | {:.0} | {} | - |",
        r.catch_up.backlog,
        r.catch_up.secs,
        r.catch_up.per_sec,
        r.catch_up.cpu_secs,
        r.catch_up.backlog as f64 / r.catch_up.cpu_secs.max(1e-9),
        rss
    );
    let rss = mib_list(&r.lag.steady_rss_mib);
    let _ = writeln!(
        s,
        "\nlag, {} nodes at {} writes/s (achieved {:.0}/s, {} writes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; steady RSS {} MiB; {} duplicates received ({:.2} per new event)",
        r.lag.nodes,
        r.lag.target_rate,
        r.lag.achieved_rate,
        r.lag.writes,
        r.lag.p50_ms,
        r.lag.p99_ms,
        r.lag.max_ms,
        rss,
        r.lag.received.duplicates,
        r.lag.received.duplicate_ratio()
    );
    let ratio = |name: &str| {
        r.runs
            .iter()
            .find(|x| x.name == name)
            .map(|x| x.rate.per_sec)
    };
    let _ = writeln!(s, "\nratios to the raw limits measured in this run:");
    if let Some(v) = ratio("api-single-2") {
        let _ = writeln!(
            s,
            "* single-row API writes, 2 nodes: {:.2}x raw single-row commits (target >= 0.5)",
            v / r.raw_single.per_sec
        );
    }
    if let Some(v) = ratio("sql-single-2") {
        let _ = writeln!(
            s,
            "* single-row SQL writes, 2 nodes: {:.2}x raw single-row commits",
            v / r.raw_single.per_sec
        );
    }
    if let Some(run) = r.runs.iter().find(|x| x.name == "sql-batch100-2") {
        let _ = writeln!(
            s,
            "* 100-row transactions, 2 nodes: {:.2}x raw batched (wall), {:.2}x per CPU second of both daemons (target >= 0.4)",
            run.rate.per_sec / r.raw_batched.per_sec,
            run.rate.per_cpu_sec() / r.raw_batched.per_cpu_sec()
        );
    }
    let _ = writeln!(
        s,
        "* catch-up: {:.2}x raw batched (target >= 0.6)",
        r.catch_up.per_sec / r.raw_batched.per_sec
    );
    s
}
