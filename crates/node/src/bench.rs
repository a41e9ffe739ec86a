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
//! * on PostgreSQL (a throwaway server started the way the tests start one,
//!   `synchronous_commit = off` like SQLite's `synchronous = NORMAL`): the
//!   same raw limits, 2 nodes on PostgreSQL (API single-row writes and 100-row
//!   transactions) and a mixed pair (one SQLite node, one PostgreSQL node);
//! * catch-up: a node that was down receives a backlog;
//! * end-to-end lag on 3 nodes at a fixed write rate: from the moment a write is
//!   sent to a node's API until the event is committed on every other node
//!   (observed by polling each node's `change_events` by rowid every millisecond,
//!   so the figures carry up to ~1 ms of observation delay);
//! * peak and steady RSS and the CPU time of every daemon.
//!
//! Ratios are to the raw limits measured in the same run, so they hold on any box.
//! A run ends when every node holds a marker row written on every writing node
//! after its workload: events of one origin are applied in order, so a node that
//! holds an origin's marker holds every event the origin wrote before it.

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
use crate::pgserver::{Durability, PgServer};

/// Arguments of `tidemark bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Writes per single-row throughput run (spread over the writing nodes).
    #[arg(long, default_value_t = 20_000)]
    pub writes: u64,
    /// Writes per 100-row-transaction run and per raw batched baseline.
    #[arg(long, default_value_t = 100_000)]
    pub batched_writes: u64,
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
    /// Run only these runs (comma-separated names from the results table);
    /// the raw baselines of the backends they use always run. Default: all.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(RUNS))]
    pub only: Vec<String>,
    /// Leave out the PostgreSQL runs (they are left out, with the reason, when
    /// no PostgreSQL server binaries are found; see `$TIDEMARK_PG_BIN`).
    #[arg(long)]
    pub no_postgres: bool,
}

/// How a throughput run writes, on every node.
#[derive(Debug, Clone, Copy)]
enum Workload {
    /// Single-row puts through the API (`--clients` per node).
    Api,
    /// Rows inserted with direct SQL, `per_tx` per transaction (the
    /// `--batched-writes` size when more than one).
    Sql { per_tx: usize },
}

/// A throughput run: a fresh cluster of one node per entry of `kinds`.
struct ThroughputRun {
    name: &'static str,
    label: &'static str,
    kinds: &'static [Kind],
    workload: Workload,
}

/// The throughput runs, in the order they run (PostgreSQL ones only with a
/// server).
const THROUGHPUT_RUNS: [ThroughputRun; 7] = [
    ThroughputRun {
        name: "api-single-2",
        label: "2 nodes, single-row writes through the API",
        kinds: &[Kind::Sqlite; 2],
        workload: Workload::Api,
    },
    ThroughputRun {
        name: "sql-single-2",
        label: "2 nodes, single-row writes with direct SQL",
        kinds: &[Kind::Sqlite; 2],
        workload: Workload::Sql { per_tx: 1 },
    },
    ThroughputRun {
        name: "sql-batch100-2",
        label: "2 nodes, 100-row transactions with direct SQL",
        kinds: &[Kind::Sqlite; 2],
        workload: Workload::Sql { per_tx: 100 },
    },
    ThroughputRun {
        name: "api-single-3",
        label: "3 nodes, single-row writes through the API",
        kinds: &[Kind::Sqlite; 3],
        workload: Workload::Api,
    },
    ThroughputRun {
        name: "pg-api-single-2",
        label: "2 PostgreSQL nodes, single-row writes through the API",
        kinds: &[Kind::Postgres; 2],
        workload: Workload::Api,
    },
    ThroughputRun {
        name: "pg-batch100-2",
        label: "2 PostgreSQL nodes, 100-row transactions with direct SQL",
        kinds: &[Kind::Postgres; 2],
        workload: Workload::Sql { per_tx: 100 },
    },
    ThroughputRun {
        name: "mixed-batch100-2",
        label: "a SQLite and a PostgreSQL node, 100-row transactions with direct SQL",
        kinds: &[Kind::Sqlite, Kind::Postgres],
        workload: Workload::Sql { per_tx: 100 },
    },
];

/// The runs of a full bench, in the order they run.
const RUNS: [&str; 9] = [
    "api-single-2",
    "sql-single-2",
    "sql-batch100-2",
    "api-single-3",
    "pg-api-single-2",
    "pg-batch100-2",
    "mixed-batch100-2",
    "catch-up",
    "lag",
];

const NOTES_DDL: &str = "CREATE TABLE IF NOT EXISTS notes (\
    id TEXT PRIMARY KEY CHECK (length(id) = 26), \
    title TEXT NOT NULL, \
    body TEXT, \
    author TEXT)";

/// `notes` on PostgreSQL (ULID keys as `CHAR(26)`).
const NOTES_DDL_PG: &str = "CREATE TABLE IF NOT EXISTS notes (\
    id CHAR(26) PRIMARY KEY CHECK (length(id) = 26), \
    title TEXT NOT NULL, \
    body TEXT, \
    author TEXT)";

/// One row of `notes` as an application inserts it.
const INSERT_NOTE: &str =
    "INSERT INTO notes (id, title, body, author) VALUES ($1, $2, $3, 'bench')";

/// A note's body: ~100 bytes, like a small application row.
fn body(i: u64) -> String {
    format!(
        "benchmark row {i:>10} lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod"
    )
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

/// The raw limit on PostgreSQL: the same rows as [`raw_rate`], one
/// connection, `per_tx` writes per transaction written with one statement per
/// table (round trips, not rows, are what limits PostgreSQL from a client), on
/// a fresh database of `server`. CPU is the server's and this process's.
async fn raw_pg_rate(server: &PgServer, name: &str, n: u64, per_tx: u64) -> anyhow::Result<Rate> {
    use sqlx::Connection as _;
    let url = server.create_database(&format!("raw_{name}"))?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(tidemark_store::postgres::SCHEMA_SQL))
        .execute(&mut conn)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE notes (id CHAR(26) PRIMARY KEY CHECK (length(id) = 26), title TEXT NOT NULL, \
         body TEXT, author TEXT, node_id CHAR(26), hlc_modified BIGINT NOT NULL DEFAULT 0)",
    )
    .execute(&mut conn)
    .await?;
    let node = Ulid::generate().to_string();
    let cpu0 = server_cpu(server) + cpu_secs("self").unwrap_or(0.0);
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let take = per_tx.min(n - i);
        let mut cols: [Vec<String>; 4] = Default::default();
        let mut hlcs = Vec::with_capacity(take as usize);
        for _ in 0..take {
            let id = Ulid::generate().to_string();
            let (title, body) = (format!("note {i}"), body(i));
            let values = json!({"id": id, "title": title, "body": body, "author": "bench"});
            hlcs.push((i as i64 + 1) << 16);
            for (col, v) in cols.iter_mut().zip([id, title, body, values.to_string()]) {
                col.push(v);
            }
            i += 1;
        }
        let [ids, titles, bodies, values] = cols;
        let event_ids: Vec<String> = ids.iter().map(|_| Ulid::generate().to_string()).collect();
        // One statement per table: what an application writing in bulk does
        // (one round trip each, not one per row).
        let mut tx = conn.begin().await?;
        sqlx::query(
            "INSERT INTO notes (id, title, body, author, node_id, hlc_modified) \
             SELECT id, title, body, 'bench', $4, hlc FROM UNNEST($1::text[], $2::text[], $3::text[], $5::bigint[]) \
             AS r(id, title, body, hlc)",
        )
        .bind(&ids)
        .bind(&titles)
        .bind(&bodies)
        .bind(&node)
        .bind(&hlcs)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO change_events (event_id, hlc_timestamp, node_id, table_name, \
             record_id, operation, new_values, metadata) \
             SELECT e, h, $3, 'notes', r, 'INSERT', v::jsonb, '{\"vv\":{}}'::jsonb \
             FROM UNNEST($1::text[], $2::bigint[], $4::text[], $5::text[]) AS x(e, h, r, v)",
        )
        .bind(&event_ids)
        .bind(&hlcs)
        .bind(&node)
        .bind(&ids)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = server_cpu(server) + cpu_secs("self").unwrap_or(0.0) - cpu0;
    Ok(Rate::new(n, secs, cpu))
}

/// CPU seconds of a PostgreSQL server's processes (the postmaster and its
/// children: backends, WAL writer, checkpointer). A backend that has exited
/// no longer counts, so take both readings while the connections live.
fn server_cpu(server: &PgServer) -> f64 {
    let Some(postmaster) = server.postmaster_pid() else {
        return 0.0;
    };
    let mut total = cpu_secs(&postmaster.to_string()).unwrap_or(0.0);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised name.
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            total += cpu_secs(pid).unwrap_or(0.0);
        }
    }
    total
}

// ---------------------------------------------------------------------------
// A cluster of daemons, each a child process of this binary.

/// Where a bench node keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A node's database, as the bench writes to it and probes it.
#[derive(Debug, Clone)]
enum NodeDb {
    Sqlite(PathBuf),
    Postgres(String),
}

impl NodeDb {
    /// The `[store] url` of the node's config.
    fn store_url(&self) -> String {
        match self {
            NodeDb::Sqlite(path) => format!("sqlite://{}", path.display()),
            NodeDb::Postgres(url) => url.clone(),
        }
    }

    async fn create_notes(&self) -> anyhow::Result<()> {
        match self {
            NodeDb::Sqlite(path) => open(path)?.execute_batch(NOTES_DDL)?,
            NodeDb::Postgres(url) => {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(url).await?;
                sqlx::raw_sql(NOTES_DDL_PG).execute(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// Inserts `ids.len()` notes with direct SQL, `per_tx` per transaction,
    /// as an application writing fast would: on SQLite a prepared statement
    /// per row, on PostgreSQL one statement per transaction.
    async fn insert_notes(&self, ids: Vec<String>, per_tx: usize) -> anyhow::Result<()> {
        match self {
            NodeDb::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    let mut conn = open(&path)?;
                    for (chunk_no, chunk) in ids.chunks(per_tx.max(1)).enumerate() {
                        let tx = conn.transaction()?;
                        {
                            let mut stmt = tx.prepare_cached(INSERT_NOTE)?;
                            for (k, id) in chunk.iter().enumerate() {
                                let i = (chunk_no * per_tx + k) as u64;
                                stmt.execute(params![id, format!("note {i}"), body(i)])?;
                            }
                        }
                        tx.commit()?;
                    }
                    Ok(())
                })
                .await?
            }
            NodeDb::Postgres(url) => {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(url).await?;
                for (chunk_no, chunk) in ids.chunks(per_tx.max(1)).enumerate() {
                    let first = chunk_no * per_tx;
                    let titles: Vec<String> = (first..first + chunk.len())
                        .map(|i| format!("note {i}"))
                        .collect();
                    let bodies: Vec<String> = (first..first + chunk.len())
                        .map(|i| body(i as u64))
                        .collect();
                    // One statement per transaction, as an application
                    // writing in bulk to PostgreSQL does.
                    sqlx::query(
                        "INSERT INTO notes (id, title, body, author) \
                         SELECT id, title, body, 'bench' \
                         FROM UNNEST($1::text[], $2::text[], $3::text[]) AS r(id, title, body)",
                    )
                    .bind(chunk)
                    .bind(&titles)
                    .bind(&bodies)
                    .execute(&mut conn)
                    .await?;
                }
                Ok(())
            }
        }
    }

    async fn probe(&self) -> anyhow::Result<Probe> {
        Ok(match self {
            NodeDb::Sqlite(path) => Probe::Sqlite(open(path)?),
            NodeDb::Postgres(url) => {
                use sqlx::Connection as _;
                Probe::Postgres(sqlx::PgConnection::connect(url).await?)
            }
        })
    }
}

/// A connection that asks a node which marker records' events it holds.
enum Probe {
    Sqlite(Connection),
    Postgres(sqlx::PgConnection),
}

impl Probe {
    /// How many of the marker records have an event in the node's log: two
    /// index lookups per marker, whatever the size of the log.
    async fn held(&mut self, markers: &[String]) -> anyhow::Result<usize> {
        Ok(match self {
            Probe::Sqlite(conn) => {
                // Markers are ULIDs this process made: safe to inline.
                let list: Vec<String> = markers.iter().map(|m| format!("'{m}'")).collect();
                let sql = format!(
                    "SELECT count(DISTINCT record_id) FROM change_events \
                     WHERE table_name = 'notes' AND record_id IN ({})",
                    list.join(",")
                );
                let n: i64 = conn.prepare_cached(&sql)?.query_row([], |r| r.get(0))?;
                n as usize
            }
            Probe::Postgres(conn) => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(DISTINCT record_id) FROM change_events \
                     WHERE table_name = 'notes' AND record_id = ANY($1::char(26)[])",
                )
                .bind(markers)
                .fetch_one(conn)
                .await?;
                n as usize
            }
        })
    }
}

struct BenchNode {
    id: Ulid,
    grpc_port: u16,
    metrics_port: u16,
    db: NodeDb,
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

struct Cluster<'pg> {
    nodes: Vec<BenchNode>,
    /// The PostgreSQL server of the nodes that use one.
    pg: Option<&'pg PgServer>,
}

impl<'pg> Cluster<'pg> {
    /// Writes configs for one node per entry of `kinds`, in a full mesh, under
    /// `dir/name`; PostgreSQL nodes get a new database each on `pg`.
    async fn prepare(
        dir: &Path,
        name: &str,
        kinds: &[Kind],
        pg: Option<&'pg PgServer>,
    ) -> anyhow::Result<Cluster<'pg>> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let mut nodes = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let label = format!("node-{}", (b'a' + i as u8) as char);
            let db = match kind {
                Kind::Sqlite => NodeDb::Sqlite(dir.join(format!("{label}.db"))),
                Kind::Postgres => {
                    let server = pg.context("a PostgreSQL node needs the PostgreSQL server")?;
                    let db_name = format!("{name}_{label}").replace('-', "_");
                    NodeDb::Postgres(server.create_database(&db_name)?)
                }
            };
            db.create_notes().await?;
            nodes.push(BenchNode {
                id: Ulid::generate(),
                grpc_port: crate::ports::free_port()?,
                metrics_port: crate::ports::free_port()?,
                config: dir.join(format!("{label}.toml")),
                log: dir.join(format!("{label}.log")),
                db,
                child: None,
            });
        }
        for (i, node) in nodes.iter().enumerate() {
            let mut text = format!(
                "[node]\nid = \"{}\"\nname = \"node-{}\"\ncluster_id = \"bench\"\n\n\
                 [store]\nurl = \"{}\"\n\n\
                 [server]\nlisten_addr = \"127.0.0.1:{}\"\nmetrics_listen_addr = \"127.0.0.1:{}\"\n\n\
                 [tls]\ninsecure = true\n\n[log]\nlevel = \"warn\"\n\n\
                 \
                 [[tables]]\nname = \"notes\"\n",
                node.id,
                i,
                node.db.store_url(),
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
        Ok(Cluster { nodes, pg })
    }

    /// Starts daemon `i` and waits until it serves (`/healthz`; `/readyz`
    /// also waits for its peers).
    async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the tidemark binary")?;
        let node = &mut self.nodes[i];
        let child = daemon_command(&exe, &node.config, &node.log)?
            .spawn()
            .context("starting a daemon")?;
        node.child = Some(child);
        self.wait_for(i, "/healthz").await
    }

    /// Waits until daemon `i` answers 200 on `path` of its metrics listener.
    async fn wait_for(&mut self, i: usize, path: &'static str) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
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
            let ok = tokio::task::spawn_blocking(move || {
                crate::cli::answers_ok(&url, path, Duration::from_millis(500)).unwrap_or(false)
            })
            .await?;
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon {i}: {path} not answering 200 after 60 s; log: {}",
                    node.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts every daemon, then waits until each is ready (caught up with
    /// its peers).
    async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.start(i).await?;
        }
        for i in 0..self.nodes.len() {
            self.wait_for(i, "/readyz").await?;
        }
        Ok(())
    }

    async fn client(&self, i: usize) -> anyhow::Result<RecordsClient<Channel>> {
        let url = format!("http://127.0.0.1:{}", self.nodes[i].grpc_port);
        Ok(RecordsClient::connect(url).await?)
    }

    /// CPU seconds of the daemons, and of the PostgreSQL server when a node
    /// uses it (its backends do that node's database work).
    fn cpu(&self) -> f64 {
        let daemons: f64 = self.nodes.iter().map(BenchNode::cpu).sum();
        let uses_pg = self
            .nodes
            .iter()
            .any(|n| matches!(n.db, NodeDb::Postgres(_)));
        match self.pg {
            Some(pg) if uses_pg => daemons + server_cpu(pg),
            _ => daemons,
        }
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

    /// Writes one marker note with direct SQL on each of the first `writers`
    /// nodes, after their workload committed: its event is the last of that
    /// origin. Returns the markers' record ids.
    async fn write_markers(&self, writers: usize) -> anyhow::Result<Vec<String>> {
        let mut markers = Vec::new();
        for node in &self.nodes[..writers] {
            let id = Ulid::generate().to_string();
            node.db.insert_notes(vec![id.clone()], 1).await?;
            markers.push(id);
        }
        Ok(markers)
    }

    /// Waits until each of the first `n` nodes holds the events of every
    /// marker (and so every event written before them); returns when the
    /// last one got there.
    async fn wait_markers(
        &self,
        n: usize,
        markers: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let mut probes = Vec::new();
        for node in &self.nodes[..n] {
            probes.push(node.db.probe().await?);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut held = Vec::new();
            for p in &mut probes {
                held.push(p.held(markers).await?);
            }
            if held.iter().all(|h| *h == markers.len()) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "not converged after {timeout:?}: nodes hold {held:?} of {} markers",
                    markers.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes markers on the first `writers` nodes and waits until every node
    /// holds them.
    async fn converge(&self, writers: usize, timeout: Duration) -> anyhow::Result<Instant> {
        let markers = self.write_markers(writers).await?;
        self.wait_markers(self.nodes.len(), &markers, timeout).await
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Workloads.

/// `n` single-row puts through the API, `clients` concurrent clients per node,
/// over the first `writers` nodes.
async fn api_writes(
    cluster: &Cluster<'_>,
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
async fn sql_writes(
    cluster: &Cluster<'_>,
    writers: usize,
    n: u64,
    per_tx: usize,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let per_writer = n / writers as u64;
    for (w, node) in cluster.nodes[..writers].iter().enumerate() {
        let db = node.db.clone();
        let count = per_writer + if w == 0 { n % writers as u64 } else { 0 };
        let ids = (0..count).map(|_| Ulid::generate().to_string()).collect();
        tasks.spawn(async move { db.insert_notes(ids, per_tx).await });
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

/// One throughput run on a fresh cluster of one node per entry of `kinds`,
/// the workload writing on every node, timed until every node holds every
/// event.
async fn throughput(
    dir: &Path,
    name: &str,
    kinds: &[Kind],
    pg: Option<&PgServer>,
    writes: u64,
    workload: impl AsyncFnOnce(&Cluster) -> anyhow::Result<()>,
) -> anyhow::Result<Run> {
    let nodes = kinds.len();
    let mut cluster = Cluster::prepare(dir, name, kinds, pg).await?;
    cluster.start_all().await?;
    let cpu0 = cluster.cpu();
    let start = Instant::now();
    workload(&cluster).await?;
    let done = cluster.converge(nodes, Duration::from_secs(600)).await?;
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
    let mut cluster = Cluster::prepare(dir, "catch-up", &[Kind::Sqlite; 2], None).await?;
    cluster.start(0).await?;
    sql_writes(&cluster, 1, backlog, 1000).await?;
    // The whole backlog captured on node a before b starts.
    let markers = cluster.write_markers(1).await?;
    cluster
        .wait_markers(1, &markers, Duration::from_secs(600))
        .await?;
    let cpu0 = cluster.nodes[0].cpu();
    let start = Instant::now();
    cluster.start(1).await?;
    let done = cluster
        .wait_markers(2, &markers, Duration::from_secs(600))
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
    let mut cluster = Cluster::prepare(dir, "lag", &vec![Kind::Sqlite; nodes], None).await?;
    cluster.start_all().await?;
    // Warm up: connections, statement caches.
    let mut clients = Vec::new();
    for i in 0..nodes {
        clients.push(cluster.client(i).await?);
    }
    for c in &mut clients {
        put(c, 0).await?;
    }
    cluster.converge(nodes, Duration::from_secs(30)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    type Seen = Vec<(String, Instant)>;
    let mut pollers = Vec::new();
    for node in &cluster.nodes {
        let (stop, me) = (stop.clone(), node.id.to_string());
        let NodeDb::Sqlite(db) = &node.db else {
            bail!("the lag run polls SQLite databases");
        };
        // Where each poller starts is read here, before any timed write: a
        // poller thread that started late would otherwise begin after the first
        // events arrived and never see them.
        let conn = open(db)?;
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
    cluster.converge(nodes, Duration::from_secs(120)).await?;
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
    raw_single: Option<Rate>,
    raw_batched: Option<Rate>,
    raw_pg_single: Option<Rate>,
    raw_pg_batched: Option<Rate>,
    /// Why the PostgreSQL runs did not run, when they did not.
    postgres_left_out: Option<String>,
    runs: Vec<Run>,
    catch_up: Option<CatchUp>,
    lag: Option<Lag>,
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
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let wants = |kind: Kind| {
        THROUGHPUT_RUNS
            .iter()
            .any(|r| r.kinds.contains(&kind) && wanted(r.name))
    };
    let (w, clients) = (args.writes, args.clients);
    let wb = args.batched_writes;

    let (mut raw_single, mut raw_batched) = (None, None);
    // Catch-up and lag run on SQLite.
    if wants(Kind::Sqlite) || wanted("catch-up") || wanted("lag") {
        step("raw SQLite, one write per transaction")?;
        raw_single = Some(raw_rate(&dir, "single", w.min(20_000), 1)?);
        step("raw SQLite, 100 writes per transaction")?;
        raw_batched = Some(raw_rate(&dir, "batched", wb, 100)?);
    }
    // The PostgreSQL server, when a PostgreSQL run is wanted and one can start.
    let mut pg_skipped = None;
    let pg = if args.no_postgres {
        pg_skipped = Some("left out (--no-postgres)".to_owned());
        None
    } else if !wants(Kind::Postgres) {
        None
    } else {
        step("starting a throwaway PostgreSQL server")?;
        match PgServer::start(Durability::Relaxed) {
            Ok(server) => Some(server),
            Err(e) => {
                let reason = format!("{e:#}");
                step(&format!("PostgreSQL runs left out: {reason}"))?;
                pg_skipped = Some(reason);
                None
            }
        }
    };
    let (mut raw_pg_single, mut raw_pg_batched) = (None, None);
    if let Some(server) = &pg {
        step("raw PostgreSQL, one write per transaction")?;
        raw_pg_single = Some(raw_pg_rate(server, "single", w.min(20_000), 1).await?);
        step("raw PostgreSQL, 100 writes per transaction")?;
        raw_pg_batched = Some(raw_pg_rate(server, "batched", wb, 100).await?);
    }

    let mut runs = Vec::new();
    for run in &THROUGHPUT_RUNS {
        let uses_pg = run.kinds.contains(&Kind::Postgres);
        if !wanted(run.name) || (uses_pg && pg.is_none()) {
            continue;
        }
        step(run.label)?;
        let nodes = run.kinds.len();
        let writes = match run.workload {
            Workload::Sql { per_tx } if per_tx > 1 => wb,
            _ => w,
        };
        runs.push(
            throughput(
                &dir,
                run.name,
                run.kinds,
                pg.as_ref(),
                writes,
                async |c: &Cluster| match run.workload {
                    Workload::Api => api_writes(c, nodes, writes, clients).await,
                    Workload::Sql { per_tx } => sql_writes(c, nodes, writes, per_tx).await,
                },
            )
            .await?,
        );
    }
    // Stopped before the SQLite runs that follow: a server left running
    // flushes and vacuums the databases the runs above filled, on the same
    // cores and disk as them.
    drop(pg);
    let catch_up = if wanted("catch-up") {
        step("catch-up of a backlog")?;
        Some(catch_up(&dir, args.backlog).await?)
    } else {
        None
    };
    let lag = if wanted("lag") {
        step("lag on 3 nodes at a fixed rate")?;
        Some(lag(&dir, 3, args.rate, args.lag_secs).await?)
    } else {
        None
    };

    let report = Report {
        machine: machine(),
        raw_single,
        raw_batched,
        raw_pg_single,
        raw_pg_batched,
        postgres_left_out: pg_skipped,
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
        ("raw PostgreSQL, 1 per tx", &r.raw_pg_single),
        ("raw PostgreSQL, 100 per tx", &r.raw_pg_batched),
    ] {
        let Some(raw) = raw else { continue };
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
    if let Some(c) = &r.catch_up {
        let rss = mib_list(&c.peak_rss_mib);
        let _ = writeln!(
            s,
            "| catch-up of a backlog | 2 | {} | {:.2} | {:.0} | {:.2} | {:.0} | {} | - |",
            c.backlog,
            c.secs,
            c.per_sec,
            c.cpu_secs,
            c.backlog as f64 / c.cpu_secs.max(1e-9),
            rss
        );
    }
    if let Some(lag) = &r.lag {
        let rss = mib_list(&lag.steady_rss_mib);
        let _ = writeln!(
            s,
            "\nlag, {} nodes at {} writes/s (achieved {:.0}/s, {} writes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; steady RSS {} MiB; {} duplicates received ({:.2} per new event)",
            lag.nodes,
            lag.target_rate,
            lag.achieved_rate,
            lag.writes,
            lag.p50_ms,
            lag.p99_ms,
            lag.max_ms,
            rss,
            lag.received.duplicates,
            lag.received.duplicate_ratio()
        );
    }
    if let Some(reason) = &r.postgres_left_out {
        let _ = writeln!(s, "\nPostgreSQL runs: {reason}");
    }
    let _ = writeln!(
        s,
        "\nCPU of PostgreSQL runs includes the server's processes (the raw rows: the server's and the bench's)."
    );
    let _ = writeln!(s, "\nratios to the raw limits measured in this run:");
    let run = |name: &str| r.runs.iter().find(|x| x.name == name);
    let mut ratio = |name: &str, what: &str, raw: Option<&Rate>, target: &str| {
        if let (Some(run), Some(raw)) = (run(name), raw) {
            let _ = writeln!(
                s,
                "* {what}: {:.2}x raw (wall), {:.2}x per CPU second{target}",
                run.rate.per_sec / raw.per_sec,
                run.rate.per_cpu_sec() / raw.per_cpu_sec()
            );
        }
    };
    let (single, batched) = (r.raw_single.as_ref(), r.raw_batched.as_ref());
    let (pg_single, pg_batched) = (r.raw_pg_single.as_ref(), r.raw_pg_batched.as_ref());
    ratio(
        "api-single-2",
        "single-row API writes, 2 nodes, to raw SQLite single-row commits",
        single,
        " (target >= 0.5 wall)",
    );
    ratio(
        "sql-single-2",
        "single-row SQL writes, 2 nodes, to raw SQLite single-row commits",
        single,
        " (keep >= 0.8 wall)",
    );
    ratio(
        "sql-batch100-2",
        "100-row transactions, 2 nodes, to raw SQLite batched",
        batched,
        " (target >= 0.5 wall)",
    );
    ratio(
        "pg-api-single-2",
        "single-row API writes, 2 PostgreSQL nodes, to raw PostgreSQL single-row commits",
        pg_single,
        "",
    );
    ratio(
        "pg-batch100-2",
        "100-row transactions, 2 PostgreSQL nodes, to raw PostgreSQL batched",
        pg_batched,
        " (target >= 0.5 wall)",
    );
    // A mixed pair goes at the pace of its slower store.
    let slower = [batched, pg_batched]
        .into_iter()
        .flatten()
        .min_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    ratio(
        "mixed-batch100-2",
        "100-row transactions, SQLite + PostgreSQL, to the slower raw batched limit",
        slower,
        "",
    );
    if let (Some(c), Some(batched)) = (&r.catch_up, batched) {
        let _ = writeln!(
            s,
            "* catch-up: {:.2}x raw SQLite batched (target >= 0.6)",
            c.per_sec / batched.per_sec
        );
    }
    s
}
