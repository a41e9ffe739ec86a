//! Whole `tidemark` daemons as real processes on 127.0.0.1, their databases, and
//! convergence checks.
//!
//! The binary is built once per test process with `cargo build -p tidemark` (or
//! taken from `$TIDEMARK_BIN`). Each node gets its own database (SQLite file or a
//! fresh PostgreSQL database), a config file, a log file and a gRPC port. When a
//! test panics, the last lines of every node's log are printed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};
use tidemark_replicator::pb::{self, admin_client::AdminClient, records_client::RecordsClient};
use tonic::transport::Channel;
use ulid::Ulid;

use crate::TestDb;

/// Path of the `tidemark` binary, built on first use.
pub fn tidemark_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("TIDEMARK_BIN") {
            return PathBuf::from(bin);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "tidemark", "--bin", "tidemark"])
            .current_dir(&workspace)
            .status()
            .expect("run cargo build -p tidemark");
        assert!(status.success(), "cargo build -p tidemark failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace.join("target"));
        target.join("debug").join("tidemark")
    })
}

/// A free loopback port below the kernel's ephemeral range (see
/// [`tidemark::ports::free_port`]).
pub fn free_port() -> u16 {
    tidemark::ports::free_port().expect("a free loopback port")
}

/// The test application's table, as created on every node.
pub fn notes_ddl(db: &TestDb) -> String {
    format!(
        "CREATE TABLE notes (id {} PRIMARY KEY, title TEXT, body TEXT, stars {})",
        db.ulid_type(),
        db.int_type()
    )
}

/// The schema a sender announces for the test's `notes` table on SQLite, for tests
/// that speak the replication protocol by hand.
pub fn notes_schema() -> Vec<tidemark_replicator::pb::TableSchema> {
    vec![tidemark_replicator::pb::TableSchema {
        name: "notes".into(),
        columns: ["id", "title", "body", "stars"].map(String::from).to_vec(),
        column_types: ["text", "text", "text", "int64"].map(String::from).to_vec(),
        declared_types: ["TEXT", "TEXT", "TEXT", "INTEGER"]
            .map(String::from)
            .to_vec(),
        backend: "sqlite".into(),
        constraints: Vec::new(),
    }]
}

/// A read-side connection to a node's database for checks.
#[derive(Debug, Clone)]
pub enum Reader {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A node's state as the checks compare it: rows by id, event ids, unsynced count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub rows: BTreeMap<String, String>,
    pub events: Vec<String>,
    pub unsynced: i64,
}

impl Reader {
    pub async fn connect(db: &TestDb) -> Reader {
        match db {
            TestDb::Sqlite { path, .. } => Reader::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(
                        SqliteConnectOptions::new()
                            .filename(path)
                            .busy_timeout(Duration::from_secs(10)),
                    )
                    .await
                    .expect("open sqlite for checks"),
            ),
            TestDb::Postgres { url } => Reader::Postgres(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect(url)
                    .await
                    .expect("open postgres for checks"),
            ),
            TestDb::Memory { .. } => {
                panic!("daemons run on SQL databases; the memory backend has no daemon")
            }
        }
    }

    /// The rows of any query, on either backend.
    pub async fn fetch_all<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        let safe = || sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Reader::Sqlite(p) => sqlx::query_as(safe()).fetch_all(p).await,
            Reader::Postgres(p) => sqlx::query_as(safe()).fetch_all(p).await,
        }
        .unwrap_or_else(|e| panic!("query failed: {e}\n{sql}"))
    }

    /// Rows of `notes` normalised to JSON text, by id.
    pub async fn rows(&self) -> BTreeMap<String, String> {
        const SQL: &str = "SELECT id, title, body, CAST(stars AS BIGINT) FROM notes ORDER BY id";
        type Row = (String, Option<String>, Option<String>, Option<i64>);
        let rows: Vec<Row> = match self {
            Reader::Sqlite(p) => sqlx::query_as(SQL).fetch_all(p).await,
            Reader::Postgres(p) => sqlx::query_as(SQL).fetch_all(p).await,
        }
        .expect("read notes");
        rows.into_iter()
            .map(|(id, title, body, stars)| {
                let v = json!({"id": id, "title": title, "body": body, "stars": stars});
                (id, v.to_string())
            })
            .collect()
    }

    pub async fn snapshot(&self) -> Snapshot {
        const EVENTS: &str = "SELECT event_id FROM change_events ORDER BY event_id";
        const UNSYNCED: &str = "SELECT COUNT(*) FROM change_events WHERE synced_at IS NULL";
        let (events, (unsynced,)): (Vec<(String,)>, (i64,)) = match self {
            Reader::Sqlite(p) => (
                sqlx::query_as(EVENTS).fetch_all(p).await.expect("events"),
                sqlx::query_as(UNSYNCED)
                    .fetch_one(p)
                    .await
                    .expect("unsynced"),
            ),
            Reader::Postgres(p) => (
                sqlx::query_as(EVENTS).fetch_all(p).await.expect("events"),
                sqlx::query_as(UNSYNCED)
                    .fetch_one(p)
                    .await
                    .expect("unsynced"),
            ),
        };
        Snapshot {
            rows: self.rows().await,
            events: events.into_iter().map(|e| e.0).collect(),
            unsynced,
        }
    }

    /// Every event of `notes` as (record, hlc, node, event, operation, new values).
    pub async fn events(&self) -> Vec<(String, i64, String, String, String, Option<String>)> {
        const SQL: &str = "SELECT record_id, hlc_timestamp, node_id, event_id, operation, CAST(new_values AS TEXT) \
                           FROM change_events WHERE table_name = 'notes' ORDER BY hlc_timestamp, node_id, event_id";
        match self {
            Reader::Sqlite(p) => sqlx::query_as(SQL).fetch_all(p).await,
            Reader::Postgres(p) => sqlx::query_as(SQL).fetch_all(p).await,
        }
        .expect("read events")
    }

    /// Whether a given event id is still unsynced.
    pub async fn is_unsynced(&self, event_id: &str) -> bool {
        const SQL: &str =
            "SELECT COUNT(*) FROM change_events WHERE event_id = $1 AND synced_at IS NULL";
        let (n,): (i64,) = match self {
            Reader::Sqlite(p) => sqlx::query_as(SQL).bind(event_id).fetch_one(p).await,
            Reader::Postgres(p) => sqlx::query_as(SQL).bind(event_id).fetch_one(p).await,
        }
        .expect("unsynced check");
        n == 1
    }

    /// The last-writer-wins state implied by the log: per record, the event that is
    /// greatest by `(hlc, node_id, event_id)`; deleted records are absent.
    pub async fn lww_from_log(&self) -> BTreeMap<String, Value> {
        let mut last: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
        for (record, _hlc, _node, _event, op, new_values) in self.events().await {
            // Events come in the total order: the last one per record wins.
            last.insert(record.trim().to_owned(), (op, new_values));
        }
        last.into_iter()
            .filter_map(|(record, (op, new))| {
                (op != "DELETE").then(|| {
                    let v: Value = serde_json::from_str(new.as_deref().unwrap_or("null"))
                        .expect("new_values JSON");
                    (record, v)
                })
            })
            .collect()
    }
}

/// One daemon of a test cluster.
#[derive(Debug)]
pub struct TestNode {
    pub name: String,
    pub id: Ulid,
    pub port: u16,
    pub metrics_port: u16,
    pub db: TestDb,
    pub dir: PathBuf,
    /// Extra environment for the daemon process (e.g. test-only pauses), applied
    /// at every start.
    pub env: Vec<(String, String)>,
    /// `[[tables]]` entries replicated besides `notes` (see [`Table`]), written
    /// into the config by [`TestNode::write_config`].
    pub tables: String,
    child: Option<Child>,
    reader: Option<Reader>,
}

impl TestNode {
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(format!("{}.toml", self.name))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Writes this node's config with the given peers and extra TOML. Peers run in
    /// plaintext (`tls.insecure`) unless `extra` has a `[tls]` section of its own.
    pub fn write_config(&self, cluster_id: &str, peers: &[(Ulid, u16)], extra: &str) {
        let extra = extra.replace("{name}", &self.name);
        let (tls, scheme) = if extra.contains("[tls]") {
            ("", "https")
        } else {
            ("[tls]\ninsecure = true\n\n", "http")
        };
        let mut text = format!(
            "[node]\nid = \"{}\"\nname = \"{}\"\ncluster_id = \"{cluster_id}\"\n\n\
             [store]\nurl = \"{}\"\n\n[server]\nlisten_addr = \"127.0.0.1:{}\"\nmetrics_listen_addr = \"127.0.0.1:{}\"\n\n\
             [replication]\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\ncapture_poll_ms = 5\n\n\
             [[tables]]\nname = \"notes\"\n\n{}{tls}{extra}\n",
            self.id,
            self.name,
            self.db.url(),
            self.port,
            self.metrics_port,
            self.tables
        );
        for (id, port) in peers {
            text.push_str(&format!(
                "[[peers]]\nnode_id = \"{id}\"\naddress = \"{scheme}://127.0.0.1:{port}\"\n\n"
            ));
        }
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// Starts the daemon and waits until its gRPC API answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(tidemark_bin());
        // Only this harness's settings: no TIDEMARK_* override from the caller's shell.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TIDEMARK_")) {
            cmd.env_remove(key);
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(self.config_path())
            .env("TIDEMARK_LOG__LEVEL", "info,tidemark_replicator=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tidemark");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited at start with {status}:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            // Serving when /healthz answers (the gRPC listener is bound before
            // it). /readyz waits for the peers too: see `wait_ready`.
            if tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
                .await
                .is_ok()
                && self.http_get("/healthz").await.0 == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.reader.is_none() {
            self.reader = Some(Reader::connect(&self.db).await);
        }
    }

    /// Waits until /readyz answers 200 (the node caught up with its peers),
    /// checking on the way that the body says why it is not.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = self.http_get("/readyz").await;
            if code == 200 {
                return;
            }
            assert_eq!(code, 503, "{}: /readyz answered {code}: {body}", self.name);
            assert!(
                Instant::now() < deadline,
                "{} not ready within {within:?}: {body}\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.success(),
                        "{} exited with {status}:\n{}",
                        self.name,
                        self.log_tail(40)
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "{} did not stop within 30 s:\n{}",
                        self.name,
                        self.log_tail(40)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sets `key = value` in `[section]` of this node's config file, replacing the
    /// key if the section has it and adding the section if missing; takes effect
    /// at the next start.
    pub fn set_config(&self, section: &str, key: &str, value: &str) {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).expect("read config");
        let header = format!("[{section}]");
        let line = format!("{key} = {value}");
        let mut out: Vec<String> = Vec::new();
        let (mut current, mut done) = (String::new(), false);
        for l in text.lines() {
            let t = l.trim();
            if t.starts_with('[') {
                current = t.to_owned();
            }
            let is_key = t.split_once('=').is_some_and(|(k, _)| k.trim() == key);
            if current == header && is_key && !done {
                out.push(line.clone());
                done = true;
                continue;
            }
            out.push(l.to_owned());
            if t == header && !done {
                // Inserted right after the header; a later same key would be a
                // duplicate, so look for it first.
                let rest_has_key = text
                    .split(&format!("{header}\n"))
                    .nth(1)
                    .map(|rest| {
                        rest.lines()
                            .take_while(|r| !r.trim().starts_with('['))
                            .any(|r| r.split_once('=').is_some_and(|(k, _)| k.trim() == key))
                    })
                    .unwrap_or(false);
                if !rest_has_key {
                    out.push(line.clone());
                    done = true;
                }
            }
        }
        if !done {
            out.insert(0, String::new());
            out.insert(0, line);
            out.insert(0, header);
        }
        std::fs::write(&path, out.join("\n") + "\n").expect("write config");
    }

    /// Adds `id` to this node's `[[peers]]` at an address where nothing listens
    /// (a test that plays that peer through a raw gRPC session: the node refuses
    /// sessions from ids it does not list), and stops the node waiting for it at
    /// start. Takes effect at the next start.
    pub fn add_raw_peer(&self, id: Ulid) {
        self.set_config("replication", "startup_check_ms", "0");
        let path = self.config_path();
        let mut text = std::fs::read_to_string(&path).expect("read config");
        text.push_str(&format!(
            "\n[[peers]]\nname = \"raw-{id}\"\nnode_id = \"{id}\"\naddress = \"http://127.0.0.1:1\"\n"
        ));
        std::fs::write(&path, text).expect("write config");
    }

    /// Adds a `[[peers]]` entry for the node `id` listening on `port` (plaintext).
    pub fn add_peer(&self, id: Ulid, port: u16) {
        let path = self.config_path();
        let mut text = std::fs::read_to_string(&path).expect("read config");
        text.push_str(&format!(
            "\n[[peers]]\nnode_id = \"{id}\"\naddress = \"http://127.0.0.1:{port}\"\n"
        ));
        std::fs::write(&path, text).expect("write config");
    }

    /// Sends SIGHUP: the daemon reloads `[[peers]]` from its config file.
    pub fn reload(&self) {
        let pid = self.pid().expect("node running");
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {pid} failed");
    }

    /// Removes the `[[peers]]` entry of `id` from this node's config (the node
    /// forgets that peer's progress at its next start).
    pub fn remove_peer(&self, id: Ulid) {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).expect("read config");
        let needle = format!("node_id = \"{id}\"");
        let mut out: Vec<&str> = Vec::new();
        let mut block: Vec<&str> = Vec::new();
        let mut in_peer = false;
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                if in_peer && !block.iter().any(|l| l.trim() == needle) {
                    out.append(&mut block);
                }
                block.clear();
                in_peer = t == "[[peers]]";
            }
            if in_peer {
                block.push(line);
            } else {
                out.push(line);
            }
        }
        if in_peer && !block.iter().any(|l| l.trim() == needle) {
            out.append(&mut block);
        }
        std::fs::write(&path, out.join("\n") + "\n").expect("write config");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn reader(&self) -> &Reader {
        self.reader.as_ref().expect("node was started once")
    }

    pub async fn client(&self) -> RecordsClient<Channel> {
        RecordsClient::connect(self.grpc_url())
            .await
            .expect("connect records api")
    }

    pub async fn put(&self, id: Ulid, values: Value) -> pb::WriteResponse {
        self.client()
            .await
            .put(pb::PutRequest {
                table: "notes".into(),
                id: id.to_string(),
                values_json: values.to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("put on {}: {s}", self.name))
            .into_inner()
    }

    pub async fn delete(&self, id: Ulid) -> pb::WriteResponse {
        self.client()
            .await
            .delete(pb::DeleteRequest {
                table: "notes".into(),
                id: id.to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("delete on {}: {s}", self.name))
            .into_inner()
    }

    /// Puts a record of any replicated table; the node's answer as it is. The
    /// answer holds the whole row: it is read whatever its size (a client's
    /// default limit is 4 MiB).
    pub async fn put_to(
        &self,
        table: &str,
        id: Ulid,
        values: Value,
    ) -> Result<pb::WriteResponse, tonic::Status> {
        self.client()
            .await
            .max_decoding_message_size(usize::MAX)
            .put(pb::PutRequest {
                table: table.into(),
                id: id.to_string(),
                values_json: values.to_string(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A client of the node's Admin service (served on the gRPC listener).
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(self.grpc_url())
            .await
            .expect("connect admin api")
    }

    /// GET `path` from the node's HTTP listener: (status code, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .expect("connect to the metrics listener");
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .expect("send request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, body.to_owned())
    }

    /// The value of one sample of `/metrics` (name with labels, as printed), if present.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").await;
        body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(f) = std::fs::File::open(self.log_path()) else {
            return "(no log)".into();
        };
        let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(self.log_path())
            .map(|l| l.contains(needle))
            .unwrap_or(false)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- last log lines of {} -----\n{}",
                self.name,
                self.log_tail(30)
            );
        }
        self.kill();
    }
}

/// How the nodes of a cluster are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every node peers with every other.
    Mesh,
    /// Node i peers with i-1 and i+1.
    Chain,
}

/// A table a cluster replicates besides `notes`: created on every node before
/// it starts and listed in its `[[tables]]`.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    /// The `CREATE TABLE` statement on a node's backend.
    pub ddl: fn(&TestDb) -> String,
    /// `lww` or `manual`.
    pub policy: &'static str,
    /// SQLite only: the `types` override of the entry, e.g. `{ d = "decimal" }`
    /// (empty: none).
    pub sqlite_types: &'static str,
}

impl Table {
    /// The table's `[[tables]]` entry on a node with this database.
    fn entry(&self, db: &TestDb) -> String {
        let mut entry = format!(
            "[[tables]]\nname = \"{}\"\nconflict_policy = \"{}\"\n",
            self.name, self.policy
        );
        if matches!(db, TestDb::Sqlite { .. }) && !self.sqlite_types.is_empty() {
            entry.push_str(&format!("types = {}\n", self.sqlite_types));
        }
        entry + "\n"
    }
}

/// A cluster of test daemons sharing a temp dir.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<TestNode>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Creates nodes on the given backends, their `notes` tables and configs, and
    /// starts them all.
    pub async fn start(backends: &[&str], topology: Topology) -> Cluster {
        let mut cluster = Cluster::prepare(backends, topology, "test", "");
        for node in cluster.nodes.iter_mut() {
            node.start().await;
        }
        cluster
    }

    /// Like [`Cluster::start`] without starting anything.
    pub fn prepare(
        backends: &[&str],
        topology: Topology,
        cluster_id: &str,
        extra: &str,
    ) -> Cluster {
        Cluster::prepare_with(backends, topology, cluster_id, extra, &[])
    }

    /// Like [`Cluster::prepare`], each node also creating and replicating
    /// `tables` (in that order: parents first).
    pub fn prepare_with(
        backends: &[&str],
        topology: Topology,
        cluster_id: &str,
        extra: &str,
        tables: &[Table],
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let n = backends.len();
        let mut nodes: Vec<TestNode> = backends
            .iter()
            .enumerate()
            .map(|(i, backend)| {
                let db = match *backend {
                    "sqlite" => TestDb::sqlite(),
                    "postgres" => TestDb::postgres(),
                    other => panic!("unknown backend {other}"),
                };
                db.sql(&notes_ddl(&db));
                for table in tables {
                    db.sql(&(table.ddl)(&db));
                }
                let tables = tables.iter().map(|t| t.entry(&db)).collect();
                TestNode {
                    name: format!("node{i}"),
                    id: Ulid::generate(),
                    port: free_port(),
                    metrics_port: free_port(),
                    db,
                    dir: dir.path().to_path_buf(),
                    tables,
                    env: Vec::new(),
                    child: None,
                    reader: None,
                }
            })
            .collect();
        let addrs: Vec<(Ulid, u16)> = nodes.iter().map(|n| (n.id, n.port)).collect();
        for (i, node) in nodes.iter_mut().enumerate() {
            let peers: Vec<(Ulid, u16)> = (0..n)
                .filter(|j| match topology {
                    Topology::Mesh => *j != i,
                    Topology::Chain => j.abs_diff(i) == 1,
                })
                .map(|j| addrs[j])
                .collect();
            node.write_config(cluster_id, &peers, extra);
        }
        Cluster { nodes, _dir: dir }
    }

    /// Waits until every running node holds the same rows and the same event ids
    /// and no event is unsynced; returns the common snapshot.
    pub async fn converged(&self, timeout: Duration) -> Snapshot {
        let deadline = Instant::now() + timeout;
        loop {
            let mut snaps = Vec::new();
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                snaps.push(node.reader().snapshot().await);
            }
            let same = snaps
                .windows(2)
                .all(|w| w[0].rows == w[1].rows && w[0].events == w[1].events);
            if same && snaps.iter().all(|s| s.unsynced == 0) {
                return snaps.swap_remove(0);
            }
            if Instant::now() > deadline {
                let summary: Vec<String> = self
                    .nodes
                    .iter()
                    .zip(&snaps)
                    .map(|(n, s)| {
                        format!(
                            "{}: {} rows, {} events, {} unsynced",
                            n.name,
                            s.rows.len(),
                            s.events.len(),
                            s.unsynced
                        )
                    })
                    .collect();
                panic!(
                    "cluster did not converge within {timeout:?}: {}",
                    summary.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts every node's rows equal the last-writer-wins result of its own log.
    pub async fn assert_lww(&self) {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let expected = node.reader().lww_from_log().await;
            let rows = node.reader().rows().await;
            assert_eq!(
                rows.len(),
                expected.len(),
                "{}: row count vs log",
                node.name
            );
            for (id, row) in rows {
                let row: Value = serde_json::from_str(&row).expect("row json");
                let want = expected
                    .get(&id)
                    .unwrap_or_else(|| panic!("{}: row {id} not in log", node.name));
                for key in ["title", "body", "stars"] {
                    assert_eq!(
                        row.get(key),
                        want.get(key).or(Some(&Value::Null)),
                        "{}: {id}.{key}",
                        node.name
                    );
                }
            }
        }
    }
}
