//! SQLite backend (WAL mode). One writer at a time is SQLite's own rule; the
//! daemon's write transactions start with `BEGIN IMMEDIATE` and raise the capture
//! guard so triggers skip the daemon's own writes.
//!
//! Two ways in: the daemon's write transactions (every method taking a
//! [`SqliteTx`], and `begin`/`commit`/`rollback`) run on one dedicated write
//! connection, inline on the calling task ([`writer`]); everything else (reads
//! for senders, admin and metrics, progress, migrations) goes through sqlx's
//! pool. Both open the same file with the same settings.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rusqlite::params;
use serde_json::{Value, json};
use sqlx::sqlite::SqliteRow;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction, TypeInfo, ValueRef};
use tidemark_hlc::Hlc;
use ulid::Ulid;

mod checkpoint;
mod writer;

pub use writer::SqliteTx;
use writer::{Writer, db_error, execute, query};

/// Most rows one bulk statement carries.
const BULK_CHUNK: usize = 1000;
/// Most parameters one statement binds (SQLite's SQLITE_MAX_VARIABLE_NUMBER is 32766).
const MAX_BINDS: usize = 32_000;
/// Most rows of one multi-row upsert. Every upsert runs in statements of a
/// power of two rows up to this (32, 16, ..., 1), so a table and column set
/// needs at most six shapes, all kept prepared on the write connection: a
/// larger statement made for each batch was compiled at every use.
const UPSERT_ROWS: usize = 32;

/// The SQL of the first SQLite migration (the whole schema), for tools that build
/// a bare database of the same shape (the raw baseline of `tidemark bench`).
pub const SCHEMA_SQL: &str = include_str!("../migrations/sqlite/0001_init.up.sql");

use crate::backend::{
    Backend, Compacted, FirstEvent, RowWrite, TableShape, Tombstones, TxScope, tombstone_goes_sql,
};
use crate::error::{Result, StoreError};
use crate::ident::{Ident, q};
use crate::model::{
    Blocked, Capture, CapturedRow, ChangeEvent, Conflict, ConflictFilter, ConflictPolicy,
    EventExtras, ForeignKey, LoggedEvent, Operation, Quarantined, Rejected, Sequences, SetAside,
    TableInfo, Values, Version, VersionVector, values_text,
};
use crate::rows::{
    BLOCKED_COLUMNS, BlockedRow, CONFLICT_COLUMNS, ConflictRow, EVENT_COLUMNS, EventRow, TableRow,
    ULID_FIRST, ULID_REST, VersionRow, hlc as decode_hlc, rows_to_values, sequences_from_rows,
    vector_from_rows,
};
use crate::value::{ColumnType, SqlCell};

const MIGRATIONS_TABLE: &str = "tidemark_schema_migrations";
const WALL_MS: &str =
    "CAST(round(unixepoch(wall_timestamp, 'subsec') * 1000) AS INTEGER) AS wall_ms";

fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations/sqlite");
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}

/// Connection settings of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub path: PathBuf,
    pub busy_timeout: Duration,
    pub max_connections: u32,
    /// `PRAGMA synchronous`: NORMAL (default; durable against process crashes) or FULL
    /// (also against power loss).
    pub synchronous_full: bool,
    /// `PRAGMA max_page_count` on every connection: the database file cannot grow
    /// beyond this many pages (writes past it fail with "database or disk is
    /// full"). `None` leaves SQLite's default (no practical limit).
    pub max_page_count: Option<u32>,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteOptions {
            path: path.into(),
            busy_timeout: Duration::from_secs(5),
            max_connections: 4,
            synchronous_full: false,
            max_page_count: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SqliteBackend {
    pool: SqlitePool,
    /// The write connection of the daemon's write transactions.
    writer: Writer,
    /// The read connection of the sender's pages (see [`writer::Reader`]).
    reader: writer::Reader,
    busy_timeout: Duration,
    synchronous_full: bool,
    /// `<database>-tidemark.lock`, locked while this backend is open: one
    /// daemon per database.
    lock: std::sync::Arc<std::sync::Mutex<Option<std::fs::File>>>,
    /// Checkpoints the WAL shortly after commits, off the commit path.
    checkpoint: std::sync::Arc<std::sync::Mutex<Option<checkpoint::Checkpointer>>>,
}

/// Who holds a lock, as written into the lock file.
fn lock_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown host".into());
    format!(
        "pid {} on {host}, since {} ms after the epoch",
        std::process::id(),
        tidemark_hlc::system_wall_ms()
    )
}

/// How long opening waits for a held lock file before refusing.
const LOCK_GRACE: Duration = Duration::from_secs(1);

/// Takes the lock file next to the database (see [`SqliteBackend`]), or says
/// who holds it.
fn take_lock(db: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-tidemark.lock");
    let path = db.with_file_name(name);
    let target = format!("SQLite database {}", db.display());
    let io = |e: std::io::Error| StoreError::AlreadyRunning {
        target: target.clone(),
        holder: format!("cannot take the lock file {}: {e}", path.display()),
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            file.write_all(lock_holder().as_bytes()).map_err(io)?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(StoreError::AlreadyRunning {
                target,
                holder: format!("{}, lock file {}", holder.trim(), path.display()),
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

impl SqliteBackend {
    /// Opens (creating if missing) the database file. The directory must exist.
    pub async fn connect(opts: &SqliteOptions) -> Result<Self> {
        let dir = match opts.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(StoreError::MissingDirectory {
                dir,
                file: opts.path.clone(),
            });
        }
        // A lock released a moment ago can still be held by a process forked
        // while it was open (until that child execs or exits): a short grace
        // before saying another daemon runs.
        let grace = std::time::Instant::now() + LOCK_GRACE;
        let lock = loop {
            match take_lock(&opts.path) {
                Err(StoreError::AlreadyRunning { .. }) if std::time::Instant::now() < grace => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                taken => break taken?,
            }
        };
        let mut connect = SqliteConnectOptions::new()
            .filename(&opts.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if opts.synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true)
            .pragma("wal_autocheckpoint", checkpoint::BACKSTOP_PAGES.to_string());
        if let Some(pages) = opts.max_page_count {
            connect = connect.pragma("max_page_count", pages.to_string());
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.max(2))
            .connect_with(connect)
            .await
            .map_err(|source| StoreError::Connect {
                target: format!("SQLite database {}", opts.path.display()),
                source: source.into(),
            })?;
        // After the pool, which created the file.
        let writer = writer::open(opts).map_err(|e| StoreError::Connect {
            target: format!("SQLite database {}", opts.path.display()),
            source: writer::sqlx_error(e).into(),
        })?;
        let reader = writer::open_reader(opts).map_err(|e| StoreError::Connect {
            target: format!("SQLite database {}", opts.path.display()),
            source: writer::sqlx_error(e).into(),
        })?;
        let checkpoint =
            checkpoint::Checkpointer::start(&opts.path, opts.busy_timeout).map_err(|source| {
                StoreError::Connect {
                    target: format!("SQLite database {}", opts.path.display()),
                    source: source.into(),
                }
            })?;
        Ok(SqliteBackend {
            pool,
            writer: std::sync::Arc::new(tokio::sync::Mutex::new(Some(writer))),
            reader: std::sync::Arc::new(tokio::sync::Mutex::new(Some(reader))),
            busy_timeout: opts.busy_timeout,
            synchronous_full: opts.synchronous_full,
            lock: std::sync::Arc::new(std::sync::Mutex::new(Some(lock))),
            checkpoint: std::sync::Arc::new(std::sync::Mutex::new(Some(checkpoint))),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn path_of(url: &str) -> Option<&Path> {
        url.strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .map(Path::new)
    }
}

/// Most ids a lookup binds one by one; more travel as one JSON array.
const SMALL_ID_SET: usize = 8;

/// The `IN` set of a lookup by id whose first id parameter is `?{first}`, and
/// its binds: one parameter per id for a few ids (the usual API and live
/// replication case: a cached statement per count, no temporary table), a JSON
/// array read by `json_each` for more.
fn id_set(first: usize, ids: &[Ulid]) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    if ids.len() <= SMALL_ID_SET {
        let params: Vec<String> = (first..first + ids.len().max(1))
            .map(|i| format!("?{i}"))
            .collect();
        let mut binds: Vec<V> = ids.iter().map(|i| V::Text(i.to_string())).collect();
        if ids.is_empty() {
            // `IN ()` is not SQL: one NULL matches nothing.
            binds.push(V::Null);
        }
        (format!("({})", params.join(", ")), binds)
    } else {
        (
            format!("(SELECT value FROM json_each(?{first}))"),
            vec![V::Text(ids_json(ids))],
        )
    }
}

fn ids_json(ids: &[Ulid]) -> String {
    Value::Array(ids.iter().map(|i| Value::String(i.to_string())).collect()).to_string()
}

fn ulid_glob() -> String {
    let mut g = format!("[{ULID_FIRST}]");
    for _ in 0..25 {
        g.push_str(&format!("[{ULID_REST}]"));
    }
    g
}

fn trigger_names(table: &str) -> [String; 5] {
    [
        format!("tidemark_capture_{table}_insert"),
        format!("tidemark_capture_{table}_update"),
        format!("tidemark_capture_{table}_delete"),
        format!("tidemark_capture_{table}_insert_replaces"),
        format!("tidemark_capture_{table}_update_replaces"),
    ]
}

// Rows a write may delete by the REPLACE conflict resolution (`INSERT OR
// REPLACE`, `REPLACE INTO`, `UPDATE OR REPLACE`, `ON CONFLICT REPLACE` in the
// schema) fire no delete trigger: a trigger *before* the write queues every row
// it clashes with as a DELETE with `if_gone = 1`, and draining stamps it only if
// the row is gone by then (an `OR IGNORE` write left it in place).

/// The queue column holding the value of the table's `i`-th replicated column.
fn value_column(i: usize) -> String {
    format!("v{i}")
}

/// What a column's values must be, checked by the capture trigger before a
/// direct write commits: `(condition that refuses, what it must hold)`.
fn class_check(column: &str, ty: ColumnType) -> (String, String) {
    let c = format!("NEW.{}", q(column));
    let typed = |classes: &str| format!("typeof({c}) NOT IN ({classes}, 'null')");
    let text = |extra: String| {
        format!(
            "{} OR instr(CAST({c} AS BLOB), x'00') > 0{extra}",
            typed("'text'")
        )
    };
    match ty {
        ColumnType::Int16 | ColumnType::Int32 => {
            let (lo, hi) = if ty == ColumnType::Int16 {
                (i64::from(i16::MIN), i64::from(i16::MAX))
            } else {
                (i64::from(i32::MIN), i64::from(i32::MAX))
            };
            (
                format!("{} OR {c} NOT BETWEEN {lo} AND {hi}", typed("'integer'")),
                format!("an integer from {lo} to {hi}"),
            )
        }
        ColumnType::Int64 => (typed("'integer'"), "an integer".into()),
        ColumnType::Float32 | ColumnType::Float64 => {
            (typed("'real', 'integer'"), "a number".into())
        }
        ColumnType::Bool => (
            format!("{} OR {c} NOT IN (0, 1)", typed("'integer'")),
            "0 or 1 (false or true)".into(),
        ),
        ColumnType::Bytes => (typed("'blob'"), "a blob".into()),
        ColumnType::Text { max_chars: Some(n) } | ColumnType::Char { len: n } => (
            text(format!(" OR length({c}) > {n}")),
            format!("text of at most {n} characters without NUL"),
        ),
        ColumnType::Text { max_chars: None } => (text(String::new()), "text without NUL".into()),
        ColumnType::Json => (typed("'text', 'integer', 'real'"), "JSON text".into()),
        _ => (typed("'text'"), "text".into()),
    }
}

fn trigger_sql(info: &TableInfo) -> Vec<String> {
    let t = &info.table_name;
    let pk = q(&info.primary_key);
    let guard = "(SELECT active FROM tidemark_capture_guard WHERE id = 1) = 0";
    let mut checks = format!(
        "SELECT RAISE(ABORT, 'tidemark: {t}.{} must be a ULID in canonical form (26 uppercase Crockford base32 characters)') WHERE NEW.{pk} IS NULL OR NOT (NEW.{pk} GLOB '{}');",
        info.primary_key,
        ulid_glob()
    );
    for (col, ty) in info.columns.iter().zip(&info.types).skip(1) {
        let (refuse, what) = class_check(col, *ty);
        checks.push_str(&format!(
            " SELECT RAISE(ABORT, 'tidemark: {t}.{col} is replicated as {ty}: it must hold {what} or NULL') WHERE {refuse};"
        ));
    }
    let value_cols: Vec<String> = (0..info.columns.len()).map(value_column).collect();
    let new_vals: Vec<String> = info
        .columns
        .iter()
        .map(|c| format!("NEW.{}", q(c)))
        .collect();
    let insert_row = format!(
        "INSERT INTO tidemark_capture_queue (table_name, record_id, operation, {}) SELECT '{t}', NEW.{pk}, '%OP%', {}",
        value_cols.join(", "),
        new_vals.join(", ")
    );
    let insert_delete = format!(
        "INSERT INTO tidemark_capture_queue (table_name, record_id, operation) SELECT '{t}', OLD.{pk}, 'DELETE'"
    );
    let changed: Vec<String> = info
        .columns
        .iter()
        .map(|c| format!("OLD.{0} IS NOT NEW.{0}", q(c)))
        .collect();
    let [ins, upd, del, ins_replaces, upd_replaces] = trigger_names(t);
    // Rows the new values clash with on a UNIQUE constraint (NULLs never clash).
    let clashes: Vec<String> = info
        .uniques
        .iter()
        .map(|cols| {
            let each: Vec<String> = cols
                .iter()
                .map(|c| format!("{0} = NEW.{0}", q(c)))
                .collect();
            format!("({})", each.join(" AND "))
        })
        .collect();
    let maybe_replaced = |condition: String| {
        format!(
            "INSERT INTO tidemark_capture_queue (table_name, record_id, operation, if_gone) \
             SELECT '{t}', {pk}, 'DELETE', 1 FROM {} WHERE {condition}",
            q(t)
        )
    };
    let mut replaces = Vec::new();
    if !clashes.is_empty() {
        replaces.push(format!(
            "CREATE TRIGGER {} BEFORE INSERT ON {} WHEN {guard} BEGIN {}; END",
            q(&ins_replaces),
            q(t),
            maybe_replaced(format!(
                "{pk} IS NOT NEW.{pk} AND ({})",
                clashes.join(" OR ")
            ))
        ));
    }
    let mut targets = vec![format!("{pk} = NEW.{pk}")];
    targets.extend(clashes);
    // Update triggers name their columns (`UPDATE OF`): SQLite leaves a
    // trigger out of an UPDATE that sets none of them when it compiles the
    // statement, so the daemon's stamp of `node_id` and `hlc_modified` on a
    // captured row runs no trigger at all. An update that sets none of the
    // replicated columns changes none of them: it was never captured.
    let mut of: Vec<String> = info.columns.iter().map(|c| q(c)).collect();
    for col in info.uniques.iter().flatten() {
        if !info.has_column(col) {
            of.push(q(col));
        }
    }
    let of = of.join(", ");
    replaces.push(format!(
        "CREATE TRIGGER {} BEFORE UPDATE OF {of} ON {} WHEN {guard} BEGIN {}; END",
        q(&upd_replaces),
        q(t),
        maybe_replaced(format!(
            "{pk} IS NOT OLD.{pk} AND ({})",
            targets.join(" OR ")
        ))
    ));
    let mut all = vec![
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {} WHEN {guard} BEGIN {checks} {}; END",
            q(&ins),
            q(t),
            insert_row.replace("%OP%", "INSERT")
        ),
        // An update that changes no replicated column is not captured.
        format!(
            "CREATE TRIGGER {} AFTER UPDATE OF {of} ON {} WHEN {guard} AND ({}) BEGIN {checks} \
             {} WHERE OLD.{pk} IS NEW.{pk}; \
             {insert_delete} WHERE OLD.{pk} IS NOT NEW.{pk}; \
             {} WHERE OLD.{pk} IS NOT NEW.{pk}; END",
            q(&upd),
            q(t),
            changed.join(" OR "),
            insert_row.replace("%OP%", "UPDATE"),
            insert_row.replace("%OP%", "INSERT"),
        ),
        format!(
            "CREATE TRIGGER {} AFTER DELETE ON {} WHEN {guard} BEGIN {insert_delete}; END",
            q(&del),
            q(t)
        ),
    ];
    all.extend(replaces);
    all
}

/// One value of a pool row as SQLite stores it.
fn cell(row: &SqliteRow, i: usize) -> Result<SqlCell> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(SqlCell::Null);
    }
    let kind = raw.type_info().name().to_owned();
    Ok(match kind.as_str() {
        "INTEGER" => SqlCell::Int(row.try_get_unchecked(i)?),
        "REAL" => SqlCell::Real(row.try_get_unchecked(i)?),
        "BLOB" => SqlCell::Blob(row.try_get_unchecked(i)?),
        _ => match row.try_get_unchecked::<String, _>(i) {
            Ok(text) => SqlCell::Text(text),
            // Text that is not UTF-8: its bytes, refused by every text class.
            Err(_) => SqlCell::Blob(row.try_get_unchecked(i)?),
        },
    })
}

/// The cells of a row of `SELECT <table.columns...>` on the write connection.
fn row_cells(row: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Vec<SqlCell>> {
    (0..n).map(|i| row.get_ref(i).map(writer::cell)).collect()
}

/// Reads rows of `SELECT <table.columns...>` into canonical values, by id.
fn decode_rows(
    table: &TableInfo,
    rows: impl IntoIterator<Item = Vec<SqlCell>>,
) -> Result<HashMap<Ulid, Values>> {
    let mut out = HashMap::new();
    for row in rows {
        let mut values = Values::new();
        for ((col, ty), cell) in table.columns.iter().zip(&table.types).zip(row) {
            let v = ty
                .from_sqlite(cell)
                .map_err(|reason| StoreError::InvalidValue {
                    table: table.table_name.clone(),
                    column: col.clone(),
                    class: ty.to_string(),
                    reason,
                })?;
            values.insert(col.clone(), v);
        }
        let id = values
            .get(&table.primary_key)
            .and_then(Value::as_str)
            .and_then(|k| Ulid::from_string(k).ok())
            .ok_or_else(|| StoreError::corrupt(&table.table_name, "a row's key is not a ULID"))?;
        out.insert(id, values);
    }
    Ok(out)
}

/// A row of `SELECT record_id, hlc, node_id, event_id, deleted, vv, frontier`.
fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        record_id: r.get("record_id")?,
        hlc: r.get("hlc")?,
        node_id: r.get("node_id")?,
        event_id: r.get("event_id")?,
        deleted: r.get("deleted")?,
        vv: writer::json_not_null(r, "vv")?,
        frontier: writer::json_not_null(r, "frontier")?,
    })
}

/// A row of `SELECT {BLOCKED_COLUMNS}, blocked_at`.
fn blocked_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BlockedRow> {
    Ok(BlockedRow {
        table_name: r.get("table_name")?,
        record_id: r.get("record_id")?,
        event_id: r.get("event_id")?,
        kind: r.get("kind")?,
        reason: r.get("reason")?,
        blocker_table: r.get("blocker_table")?,
        blocker_id: r.get("blocker_id")?,
        blocked_at: r.get("blocked_at")?,
    })
}

/// A row of `SELECT {EVENT_COLUMNS}, {WALL_MS}`.
/// Columns are read by position, in [`EVENT_COLUMNS`]' order (the test
/// `event_columns_are_read_in_order` pins it): finding each by name compared
/// column names for every value of every row the sender reads.
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        event_id: r.get(0)?,
        hlc_timestamp: r.get(1)?,
        node_id: r.get(2)?,
        table_name: r.get(3)?,
        record_id: r.get(4)?,
        operation: r.get(5)?,
        action: r.get(6)?,
        user_id: r.get(7)?,
        old_values: r.get(8)?,
        new_values: r.get(9)?,
        metadata: r.get(10)?,
        wall_ms: r.get(11)?,
    })
}

/// A row of `SELECT {CONFLICT_COLUMNS}, detected_at, resolved_at`.
fn conflict_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConflictRow> {
    Ok(ConflictRow {
        conflict_id: r.get("conflict_id")?,
        kind: r.get("kind")?,
        detail: r.get("detail")?,
        winner_table: r.get("winner_table")?,
        winner_record_id: r.get("winner_record_id")?,
        table_name: r.get("table_name")?,
        record_id: r.get("record_id")?,
        policy: r.get("policy")?,
        status: r.get("status")?,
        winner_event_id: r.get("winner_event_id")?,
        winner_hlc: r.get("winner_hlc")?,
        winner_node_id: r.get("winner_node_id")?,
        winner_values: writer::json(r, "winner_values")?,
        loser_event_id: r.get("loser_event_id")?,
        loser_hlc: r.get("loser_hlc")?,
        loser_node_id: r.get("loser_node_id")?,
        loser_values: writer::json(r, "loser_values")?,
        detected_at: r.get("detected_at")?,
        resolved_at: r.get("resolved_at")?,
        resolved_by: r.get("resolved_by")?,
        resolution: r.get("resolution")?,
        resolution_note: r.get("resolution_note")?,
        resolution_event_id: r.get("resolution_event_id")?,
    })
}

/// JSON text of a value bound as a parameter (what sqlx's `Json` binds).
fn json_text(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::from(sqlx::Error::Encode(Box::new(e))))
}

fn select_columns(table: &TableInfo) -> String {
    table
        .columns
        .iter()
        .map(|c| q(c))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn exec(tx: &mut Transaction<'static, Sqlite>, sql: String) -> Result<()> {
    sqlx::query(AssertSqlSafe(sql)).execute(&mut **tx).await?;
    Ok(())
}

/// A statement run once on the write connection (DDL), not kept prepared.
fn exec_once(tx: &SqliteTx, sql: &str) -> Result<()> {
    tx.conn().execute_batch(sql).map_err(db_error)
}

impl Backend for SqliteBackend {
    type Tx = SqliteTx;

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn column_type(&self, declared: &str) -> std::result::Result<ColumnType, String> {
        ColumnType::of_sqlite(declared)
    }

    async fn migrate(&self) -> Result<()> {
        migrator().run(&self.pool).await?;
        Ok(())
    }

    async fn migrate_down(&self) -> Result<()> {
        let has_registry: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'tidemark_datatypes'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if has_registry.is_some() {
            let mut tx = self.pool.begin().await?;
            for t in self.load_tables().await? {
                for name in trigger_names(&t.table_name) {
                    exec(&mut tx, format!("DROP TRIGGER IF EXISTS {}", q(&name))).await?;
                }
            }
            tx.commit().await?;
        }
        migrator().undo(&self.pool, 0).await?;
        Ok(())
    }

    async fn applied_migrations(&self) -> Result<Vec<i64>> {
        let exists: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'tidemark_schema_migrations'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT version FROM tidemark_schema_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT value FROM tidemark_meta WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.0))
    }

    async fn meta_set(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tidemark_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn inspect_table(&self, name: &Ident) -> Result<Option<TableShape>> {
        let kind: Option<(String,)> =
            sqlx::query_as("SELECT type FROM sqlite_master WHERE name = $1 AND type = 'table'")
                .bind(name.as_str())
                .fetch_optional(&self.pool)
                .await?;
        if kind.is_none() {
            return Ok(None);
        }
        let cols: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT name, type, pk FROM pragma_table_info($1) ORDER BY cid")
                .bind(name.as_str())
                .fetch_all(&self.pool)
                .await?;
        let mut pk: Vec<(i64, String)> = cols
            .iter()
            .filter(|c| c.2 > 0)
            .map(|c| (c.2, c.0.clone()))
            .collect();
        pk.sort();
        let primary_key: Vec<String> = pk.into_iter().map(|p| p.1).collect();
        let indexes: Vec<(String, i64, String, i64)> = sqlx::query_as(
            "SELECT name, \"unique\", origin, partial FROM pragma_index_list($1) ORDER BY name",
        )
        .bind(name.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut uniques = Vec::new();
        for (index, unique, origin, partial) in indexes {
            if unique != 1 || origin == "pk" || partial != 0 {
                continue;
            }
            let cols: Vec<(i64, Option<String>)> =
                sqlx::query_as("SELECT cid, name FROM pragma_index_info($1) ORDER BY seqno")
                    .bind(&index)
                    .fetch_all(&self.pool)
                    .await?;
            // An index over an expression is the database's alone to enforce.
            let names: Option<Vec<String>> = cols
                .into_iter()
                .map(|(cid, n)| if cid < 0 { None } else { n })
                .collect();
            if let Some(names) = names
                && names != primary_key
                && !uniques.contains(&names)
            {
                uniques.push(names);
            }
        }
        let fk_rows: Vec<(i64, i64, String, String, Option<String>)> = sqlx::query_as(
            "SELECT id, seq, \"table\", \"from\", \"to\" FROM pragma_foreign_key_list($1) ORDER BY id, seq",
        )
        .bind(name.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut foreign_keys: Vec<ForeignKey> = Vec::new();
        let mut last_id = None;
        for (id, _, parent, from, to) in fk_rows {
            if last_id != Some(id) {
                foreign_keys.push(ForeignKey {
                    columns: Vec::new(),
                    parent,
                    parent_columns: Vec::new(),
                });
                last_id = Some(id);
            }
            if let Some(fk) = foreign_keys.last_mut() {
                fk.columns.push(from);
                if let Some(to) = to {
                    fk.parent_columns.push(to);
                }
            }
        }
        Ok(Some(TableShape {
            name: name.clone(),
            columns: cols.into_iter().map(|(n, t, _)| (n, t)).collect(),
            primary_key,
            uniques,
            foreign_keys,
        }))
    }

    async fn register(&self, info: &TableInfo, first_time: bool) -> Result<()> {
        let t = q(&info.table_name);
        let pk = q(&info.primary_key);
        let existing: Vec<(String,)> = sqlx::query_as("SELECT name FROM pragma_table_info($1)")
            .bind(&info.table_name)
            .fetch_all(&self.pool)
            .await?;
        let has = |c: &str| existing.iter().any(|e| e.0 == c);
        let tx = self.begin(TxScope::Rows).await?;
        if !has("node_id") {
            exec_once(
                &tx,
                &format!(
                    "ALTER TABLE {t} ADD COLUMN node_id TEXT CHECK (node_id IS NULL OR length(node_id) = 26)"
                ),
            )?;
        }
        if !has("hlc_modified") {
            exec_once(
                &tx,
                &format!("ALTER TABLE {t} ADD COLUMN hlc_modified INTEGER NOT NULL DEFAULT 0"),
            )?;
        }
        exec_once(
            &tx,
            &format!(
                "CREATE INDEX IF NOT EXISTS {} ON {t}(node_id)",
                q(&format!("idx_{}_node", info.table_name))
            ),
        )?;
        let bad: Vec<Option<String>> = {
            let mut stmt = tx
                .conn()
                .prepare(&format!(
                    "SELECT {pk} FROM {t} WHERE {pk} IS NULL OR NOT ({pk} GLOB '{}') LIMIT 1",
                    ulid_glob()
                ))
                .map_err(db_error)?;
            stmt.query_map([], |r| r.get(0))
                .and_then(Iterator::collect)
                .map_err(db_error)?
        };
        if let Some(value) = bad.into_iter().next() {
            return Err(StoreError::Unregistrable {
                table: info.table_name.clone(),
                reason: format!(
                    "primary key {} holds {} which is not a ULID in canonical form (26 uppercase Crockford base32 characters)",
                    info.primary_key,
                    value.map_or("NULL".to_owned(), |v| format!(
                        "{:?}",
                        crate::model::truncate(&v)
                    ))
                ),
            });
        }
        // The queue holds one untyped value column per replicated column, so
        // values keep their exact storage (a REAL's bits, a BLOB, ...).
        let queue: Vec<String> = query(
            tx.conn(),
            "SELECT name FROM pragma_table_info('tidemark_capture_queue')",
            [],
            |r| r.get(0),
        )?;
        for i in 0..info.columns.len() {
            let name = value_column(i);
            if !queue.contains(&name) {
                exec_once(
                    &tx,
                    &format!("ALTER TABLE tidemark_capture_queue ADD COLUMN {name}"),
                )?;
            }
        }
        for name in trigger_names(&info.table_name) {
            exec_once(&tx, &format!("DROP TRIGGER IF EXISTS {}", q(&name)))?;
        }
        for sql in trigger_sql(info) {
            exec_once(&tx, &sql)?;
        }
        let classes: Vec<String> = info.types.iter().map(ToString::to_string).collect();
        execute(
            tx.conn(),
            "INSERT INTO tidemark_datatypes (datatype_id, table_name, primary_key, columns, column_types, declared_types, conflict_policy) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (table_name) DO UPDATE SET \
             primary_key = excluded.primary_key, columns = excluded.columns, column_types = excluded.column_types, \
             declared_types = excluded.declared_types, conflict_policy = excluded.conflict_policy",
            params![
                info.datatype_id.to_string(),
                info.table_name,
                info.primary_key,
                json_text(&info.columns)?,
                json_text(&classes)?,
                json_text(&info.declared)?,
                info.conflict_policy.as_str(),
            ],
        )?;
        if first_time {
            let value_cols: Vec<String> = (0..info.columns.len()).map(value_column).collect();
            exec_once(
                &tx,
                &format!(
                    "INSERT INTO tidemark_capture_queue (table_name, record_id, operation, {}) \
                     SELECT '{}', {pk}, 'INSERT', {} FROM {t} ORDER BY {pk}",
                    value_cols.join(", "),
                    info.table_name,
                    select_columns(info)
                ),
            )?;
        }
        self.commit(tx).await
    }

    async fn set_policy(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        policy: ConflictPolicy,
    ) -> Result<()> {
        execute(
            tx.conn(),
            "UPDATE tidemark_datatypes SET conflict_policy = ?1 WHERE table_name = ?2",
            params![policy.as_str(), table],
        )?;
        Ok(())
    }

    async fn load_tables(&self) -> Result<Vec<TableInfo>> {
        let rows: Vec<TableRow> = sqlx::query_as(
            "SELECT datatype_id, table_name, primary_key, columns, column_types, declared_types, conflict_policy \
             FROM tidemark_datatypes ORDER BY table_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TableInfo::try_from).collect()
    }

    async fn begin(&self, scope: TxScope) -> Result<Self::Tx> {
        writer::begin(&self.writer, self.busy_timeout, scope).await
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        writer::commit(tx, self.synchronous_full)?;
        if let Some(checkpoint) = self
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            checkpoint.poke();
        }
        Ok(())
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        writer::rollback(tx)
    }

    async fn take_captures(&self, tx: &mut Self::Tx, limit: u32) -> Result<Vec<Capture>> {
        let conn = tx.conn();
        // Nothing queued (the usual case): no need for the statement below.
        let queued: Vec<bool> = query(
            conn,
            "SELECT EXISTS (SELECT 1 FROM tidemark_capture_queue)",
            [],
            |r| r.get(0),
        )?;
        if queued.first() != Some(&true) {
            return Ok(Vec::new());
        }
        // Registration adds value columns to the queue: a cached statement would
        // keep the column list it was prepared with.
        let mut stmt = conn
            .prepare("SELECT * FROM tidemark_capture_queue ORDER BY seq LIMIT ?1")
            .map_err(db_error)?;
        // v0, v1, ... by index, wherever they sit among the queue's columns.
        let mut value_at: Vec<(usize, usize)> = stmt
            .column_names()
            .iter()
            .enumerate()
            .filter_map(|(ordinal, name)| {
                let i = name.strip_prefix('v')?.parse::<usize>().ok()?;
                Some((i, ordinal))
            })
            .collect();
        value_at.sort_unstable();
        let what = "tidemark_capture_queue";
        let mut rows = stmt.query([i64::from(limit)]).map_err(db_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(db_error)? {
            let operation: Operation = row
                .get::<_, String>("operation")
                .map_err(db_error)?
                .parse()
                .map_err(|e: StoreError| StoreError::corrupt(what, e.to_string()))?;
            let maybe_replaced = row.get::<_, i64>("if_gone").map_err(db_error)? != 0;
            let legacy: Option<String> = row.get("new_values").map_err(db_error)?;
            let captured = if maybe_replaced {
                CapturedRow::IfGone
            } else if operation == Operation::Delete {
                CapturedRow::Gone
            } else if let Some(json) = legacy {
                CapturedRow::Json(json)
            } else {
                CapturedRow::Cells(
                    value_at
                        .iter()
                        .map(|(_, ordinal)| row.get_ref(*ordinal).map(writer::cell))
                        .collect::<rusqlite::Result<_>>()
                        .map_err(db_error)?,
                )
            };
            out.push(Capture {
                seq: row.get("seq").map_err(db_error)?,
                table_name: row.get("table_name").map_err(db_error)?,
                record_id: row
                    .get::<_, String>("record_id")
                    .map_err(db_error)?
                    .trim()
                    .to_owned(),
                operation,
                row: captured,
            });
        }
        Ok(out)
    }

    async fn set_aside(&self, tx: &mut Self::Tx, rows: &[SetAside]) -> Result<()> {
        for r in rows {
            execute(
                tx.conn(),
                "INSERT INTO tidemark_unreplicated (seq, table_name, record_id, operation, reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (seq) DO NOTHING",
                params![
                    r.seq,
                    r.table_name,
                    crate::model::truncate(&r.record_id),
                    r.operation,
                    r.reason,
                ],
            )?;
        }
        Ok(())
    }

    async fn list_set_aside(&self, limit: u32) -> Result<Vec<SetAside>> {
        let rows: Vec<(i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, table_name, record_id, operation, reason, set_aside_at FROM tidemark_unreplicated \
             ORDER BY seq LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, table_name, record_id, operation, reason, set_aside_at)| SetAside {
                    seq,
                    table_name,
                    record_id,
                    operation,
                    reason,
                    set_aside_at,
                },
            )
            .collect())
    }

    async fn count_set_aside(&self) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tidemark_unreplicated")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn delete_captures(&self, tx: &mut Self::Tx, seqs: &[i64]) -> Result<()> {
        execute(
            tx.conn(),
            "DELETE FROM tidemark_capture_queue WHERE seq IN (SELECT value FROM json_each(?1))",
            [json_text(&seqs)?],
        )?;
        Ok(())
    }

    async fn discard_set_aside(&self, seqs: Option<&[i64]>) -> Result<u64> {
        let done = match seqs {
            None => {
                sqlx::query("DELETE FROM tidemark_unreplicated")
                    .execute(&self.pool)
                    .await?
            }
            Some(seqs) => sqlx::query(
                "DELETE FROM tidemark_unreplicated WHERE seq IN (SELECT value FROM json_each($1))",
            )
            .bind(
                serde_json::to_string(seqs)
                    .map_err(|e| StoreError::corrupt("tidemark_unreplicated", e.to_string()))?,
            )
            .execute(&self.pool)
            .await?,
        };
        Ok(done.rows_affected())
    }

    async fn versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Version>> {
        let (set, mut binds) = id_set(2, ids);
        binds.insert(0, rusqlite::types::Value::Text(table.to_owned()));
        let rows = query(
            tx.conn(),
            &format!(
                "SELECT record_id, hlc, node_id, event_id, deleted, vv, frontier FROM tidemark_record_versions \
                 WHERE table_name = ?1 AND record_id IN {set}"
            ),
            rusqlite::params_from_iter(binds),
            version_row,
        )?;
        rows.into_iter().map(VersionRow::into_version).collect()
    }

    async fn rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Values>> {
        let (set, binds) = id_set(1, ids);
        let sql = format!(
            "SELECT {} FROM {} WHERE {} IN {set}",
            select_columns(table),
            q(&table.table_name),
            q(&table.primary_key),
        );
        let n = table.columns.len();
        let rows = query(tx.conn(), &sql, rusqlite::params_from_iter(binds), |r| {
            row_cells(r, n)
        })?;
        decode_rows(table, rows)
    }

    async fn put_versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        versions: &[(Ulid, Version)],
    ) -> Result<()> {
        // One cached statement run per version (see `insert_events`).
        let conn = tx.conn();
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO tidemark_record_versions (table_name, record_id, hlc, node_id, event_id, deleted, vv, frontier) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (table_name, record_id) DO UPDATE SET \
                 hlc = excluded.hlc, node_id = excluded.node_id, event_id = excluded.event_id, \
                 deleted = excluded.deleted, vv = excluded.vv, frontier = excluded.frontier",
            )
            .map_err(db_error)?;
        for (id, v) in versions {
            stmt.execute(params![
                table,
                id.to_string(),
                v.hlc.encode(),
                v.node_id.to_string(),
                v.event_id.to_string(),
                i64::from(v.deleted),
                v.vv.to_json_text(),
                v.stored_frontier_text(),
            ])
            .map_err(db_error)?;
        }
        Ok(())
    }

    async fn upsert_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        rows: &[RowWrite<'_>],
    ) -> Result<()> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let mut cols: Vec<(&String, ColumnType)> = table
            .columns
            .iter()
            .zip(&table.types)
            .filter(|(c, _)| first.values.contains_key(c.as_str()) || **c == table.primary_key)
            .map(|(c, t)| (c, *t))
            .collect();
        // The primary key first.
        cols.sort_by_key(|(c, _)| **c != table.primary_key);
        let names: Vec<String> = cols.iter().map(|(c, _)| q(c)).collect();
        let updates: Vec<String> = cols
            .iter()
            .filter(|(c, _)| **c != table.primary_key)
            .map(|(c, _)| format!("{0} = excluded.{0}", q(c)))
            .chain([
                "node_id = excluded.node_id".to_owned(),
                "hlc_modified = excluded.hlc_modified".to_owned(),
            ])
            .collect();
        let per_row = cols.len() + 2;
        let placeholders = format!("({})", vec!["?"; per_row].join(", "));
        let most_rows = (MAX_BINDS / per_row).clamp(1, UPSERT_ROWS);
        let head = format!(
            "INSERT INTO {t} ({names}, node_id, hlc_modified) VALUES ",
            t = q(&table.table_name),
            names = names.join(", "),
        );
        let tail = format!(
            " ON CONFLICT ({pk}) DO UPDATE SET {updates}",
            pk = q(&table.primary_key),
            updates = updates.join(", "),
        );
        let conn = tx.conn();
        let mut rest = rows;
        while !rest.is_empty() {
            // The largest power of two that fits: a handful of shapes, each cached.
            let n = 1 << rest.len().min(most_rows).ilog2();
            let (chunk, after) = rest.split_at(n);
            rest = after;
            let sql = [
                head.as_str(),
                &vec![placeholders.as_str(); n].join(", "),
                &tail,
            ]
            .concat();
            let mut binds = Vec::with_capacity(chunk.len() * per_row);
            for r in chunk {
                for (c, ty) in &cols {
                    let cell = if **c == table.primary_key {
                        SqlCell::Text(r.id.to_string())
                    } else {
                        r.values
                            .get(c.as_str())
                            .map_or(SqlCell::Null, |v| ty.to_sqlite(v))
                    };
                    binds.push(writer::bind(cell));
                }
                binds.push(rusqlite::types::Value::Text(r.node_id.to_string()));
                binds.push(rusqlite::types::Value::Integer(r.hlc.encode()));
            }
            execute(conn, &sql, rusqlite::params_from_iter(binds))?;
        }
        Ok(())
    }

    async fn delete_rows(&self, tx: &mut Self::Tx, table: &TableInfo, ids: &[Ulid]) -> Result<()> {
        let sql = format!(
            "DELETE FROM {} WHERE {} IN (SELECT value FROM json_each(?1))",
            q(&table.table_name),
            q(&table.primary_key)
        );
        for chunk in ids.chunks(BULK_CHUNK) {
            execute(tx.conn(), &sql, [ids_json(chunk)])?;
        }
        Ok(())
    }

    async fn stamp_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        stamps: &[(Ulid, Hlc, Ulid)],
    ) -> Result<()> {
        // One cached statement run per row (see `insert_events`): cheaper
        // than packing the stamps into JSON for `json_each` and parsing them
        // back.
        let sql = format!(
            "UPDATE {t} SET node_id = ?1, hlc_modified = ?2 WHERE {pk} = ?3",
            t = q(&table.table_name),
            pk = q(&table.primary_key)
        );
        let conn = tx.conn();
        let mut stmt = conn.prepare_cached(&sql).map_err(db_error)?;
        for (id, hlc, node) in stamps {
            stmt.execute(params![node.to_string(), hlc.encode(), id.to_string()])
                .map_err(db_error)?;
        }
        Ok(())
    }

    async fn existing_events(&self, tx: &mut Self::Tx, ids: &[Ulid]) -> Result<HashSet<Ulid>> {
        let rows: Vec<String> = query(
            tx.conn(),
            "SELECT event_id FROM change_events WHERE event_id IN (SELECT value FROM json_each(?1))",
            [ids_json(ids)],
            |r| r.get(0),
        )?;
        rows.into_iter()
            .map(|id| {
                Ulid::from_string(&id)
                    .map_err(|e| StoreError::corrupt("change_events", e.to_string()))
            })
            .collect()
    }

    async fn insert_events(
        &self,
        tx: &mut Self::Tx,
        events: &[&ChangeEvent],
        extras: &EventExtras,
    ) -> Result<()> {
        // One cached statement run per event: on the direct connection a step
        // costs less than packing the batch into JSON for `json_each` and
        // parsing it back (values would be escaped into a string and out again).
        let conn = tx.conn();
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO change_events (event_id, hlc_timestamp, wall_timestamp, node_id, table_name, record_id, \
                 operation, action, user_id, old_values, new_values, metadata, synced_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .map_err(db_error)?;
        // `synced_at` of the events stored already synced: the time of this
        // call, as strftime('%Y-%m-%dT%H:%M:%fZ', 'now') writes it.
        let now = crate::model::iso8601(tidemark_hlc::system_wall_ms());
        for e in events {
            let text = extras.text(e);
            stmt.execute(params![
                e.event_id.to_string(),
                e.hlc.encode(),
                // The text strftime('%Y-%m-%dT%H:%M:%fZ', ms / 1000.0, 'unixepoch')
                // makes (see the tests), without a date function per insert.
                crate::model::iso8601(e.wall_ms),
                e.node_id.to_string(),
                e.table_name,
                e.record_id.to_string(),
                e.operation.as_str(),
                e.action,
                e.user_id.map(|u| u.to_string()),
                e.old_values.as_ref().map(values_text),
                text.new_values.as_deref(),
                text.metadata.as_deref(),
                extras.synced(e.event_id).then_some(now.as_str()),
            ])
            .map_err(db_error)?;
        }
        Ok(())
    }

    async fn raise_vector(&self, tx: &mut Self::Tx, vector: &VersionVector) -> Result<()> {
        for (origin, hlc) in &vector.0 {
            execute(
                tx.conn(),
                "INSERT INTO tidemark_nodes (node_id, max_hlc) VALUES (?1, ?2) \
                 ON CONFLICT (node_id) DO UPDATE SET max_hlc = max(max_hlc, excluded.max_hlc)",
                params![origin.to_string(), hlc.encode()],
            )?;
        }
        Ok(())
    }

    async fn raise_sequences(&self, tx: &mut Self::Tx, seqs: &Sequences) -> Result<()> {
        for (origin, seq) in seqs {
            execute(
                tx.conn(),
                "INSERT INTO tidemark_nodes (node_id, max_seq) VALUES (?1, ?2) \
                 ON CONFLICT (node_id) DO UPDATE SET max_seq = max(max_seq, excluded.max_seq)",
                params![origin.to_string(), i64::try_from(*seq).unwrap_or(i64::MAX)],
            )?;
        }
        Ok(())
    }

    async fn event_values(
        &self,
        tx: &mut Self::Tx,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Option<Values>>> {
        let rows = query(
            tx.conn(),
            "SELECT event_id, new_values FROM change_events WHERE event_id IN (SELECT value FROM json_each(?1))",
            [ids_json(ids)],
            |r| Ok((r.get(0)?, writer::json(r, "new_values")?)),
        )?;
        rows_to_values(rows)
    }

    async fn matching_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        columns: &[usize],
        values: &[Value],
        except: Option<Ulid>,
    ) -> Result<Vec<Ulid>> {
        let mut conds: Vec<String> = columns
            .iter()
            .map(|&i| format!("{} = ?", q(&table.columns[i])))
            .collect();
        if except.is_some() {
            conds.push(format!("{} <> ?", q(&table.primary_key)));
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            q(&table.primary_key),
            q(&table.table_name),
            conds.join(" AND ")
        );
        let mut binds: Vec<rusqlite::types::Value> = columns
            .iter()
            .zip(values)
            .map(|(&i, v)| writer::bind(table.types[i].to_sqlite(v)))
            .collect();
        if let Some(e) = except {
            binds.push(rusqlite::types::Value::Text(e.to_string()));
        }
        let ids: Vec<String> = query(tx.conn(), &sql, rusqlite::params_from_iter(binds), |r| {
            r.get(0)
        })?;
        ids.into_iter()
            .map(|id| {
                Ulid::from_string(&id)
                    .map_err(|e| StoreError::corrupt(&table.table_name, e.to_string()))
            })
            .collect()
    }

    async fn put_blocked(&self, tx: &mut Self::Tx, b: &Blocked) -> Result<()> {
        execute(
            tx.conn(),
            "INSERT INTO tidemark_blocked (table_name, record_id, event_id, kind, reason, blocker_table, blocker_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (table_name, record_id) DO UPDATE SET \
             event_id = excluded.event_id, kind = excluded.kind, reason = excluded.reason, \
             blocker_table = excluded.blocker_table, blocker_id = excluded.blocker_id",
            params![
                b.table_name,
                b.record_id.to_string(),
                b.event_id.to_string(),
                b.kind.as_str(),
                b.reason,
                b.blocker_table.as_deref(),
                b.blocker_id.map(|i| i.to_string()),
            ],
        )?;
        Ok(())
    }

    async fn remove_blocked(&self, tx: &mut Self::Tx, table: &str, id: Ulid) -> Result<()> {
        execute(
            tx.conn(),
            "DELETE FROM tidemark_blocked WHERE table_name = ?1 AND record_id = ?2",
            params![table, id.to_string()],
        )?;
        Ok(())
    }

    async fn blocked(&self, tx: &mut Self::Tx, table: &str, id: Ulid) -> Result<Option<Blocked>> {
        let rows = query(
            tx.conn(),
            &format!(
                "SELECT {BLOCKED_COLUMNS}, blocked_at FROM tidemark_blocked WHERE table_name = ?1 AND record_id = ?2"
            ),
            params![table, id.to_string()],
            blocked_row,
        )?;
        rows.into_iter().next().map(Blocked::try_from).transpose()
    }

    async fn blocked_by_any(
        &self,
        tx: &mut Self::Tx,
        blockers: &[(String, Ulid)],
    ) -> Result<Vec<Blocked>> {
        let keys: Vec<Value> = blockers
            .iter()
            .map(|(t, id)| json!([t, id.to_string()]))
            .collect();
        let rows = query(
            tx.conn(),
            &format!(
                "SELECT {BLOCKED_COLUMNS}, blocked_at FROM tidemark_blocked WHERE \
                 (blocker_table, blocker_id) IN (SELECT value->>0, value->>1 FROM json_each(?1)) \
                 OR (blocker_id IS NULL AND blocker_table IN (SELECT value->>0 FROM json_each(?1)))"
            ),
            [Value::Array(keys).to_string()],
            blocked_row,
        )?;
        rows.into_iter().map(Blocked::try_from).collect()
    }

    async fn has_blocked(&self, tx: &mut Self::Tx) -> Result<bool> {
        let found: Vec<bool> = query(
            tx.conn(),
            "SELECT EXISTS (SELECT 1 FROM tidemark_blocked)",
            [],
            |r| r.get(0),
        )?;
        Ok(found.first() == Some(&true))
    }

    async fn list_blocked(
        &self,
        after: Option<(String, Ulid)>,
        limit: u32,
    ) -> Result<Vec<Blocked>> {
        let (t, r) = after.map_or((String::new(), String::new()), |(t, r)| (t, r.to_string()));
        let rows: Vec<BlockedRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {BLOCKED_COLUMNS}, blocked_at FROM tidemark_blocked \
             WHERE (table_name, record_id) > ($1, $2) ORDER BY table_name, record_id LIMIT $3"
        )))
        .bind(t)
        .bind(r)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Blocked::try_from).collect()
    }

    async fn count_blocked(&self) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tidemark_blocked")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn delete_clash(&self, tx: &mut Self::Tx, id: Ulid) -> Result<()> {
        execute(
            tx.conn(),
            "DELETE FROM tidemark_conflicts WHERE conflict_id = ?1 AND kind <> 'version'",
            [id.to_string()],
        )?;
        Ok(())
    }

    async fn delete_version_conflict(&self, tx: &mut Self::Tx, id: Ulid) -> Result<()> {
        execute(
            tx.conn(),
            "DELETE FROM tidemark_conflicts WHERE conflict_id = ?1 AND kind = 'version'",
            [id.to_string()],
        )?;
        Ok(())
    }

    async fn put_conflicts(&self, tx: &mut Self::Tx, conflicts: &[Conflict]) -> Result<()> {
        let values = |v: Option<&Values>| v.map(json_text).transpose();
        for c in conflicts {
            execute(
                tx.conn(),
                "INSERT OR REPLACE INTO tidemark_conflicts (conflict_id, table_name, record_id, policy, status, \
                 winner_event_id, winner_hlc, winner_node_id, winner_values, \
                 loser_event_id, loser_hlc, loser_node_id, loser_values, detected_at, resolved_at, \
                 resolved_by, resolution, resolution_note, resolution_event_id, \
                 kind, detail, winner_table, winner_record_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18, ?19, ?20, ?21, ?22, ?23)",
                params![
                    c.conflict_id.to_string(),
                    c.table_name,
                    c.record_id.to_string(),
                    c.policy.as_str(),
                    c.status.as_str(),
                    c.winner.event_id.to_string(),
                    c.winner.hlc.encode(),
                    c.winner.node_id.to_string(),
                    values(c.winner.values.as_ref())?,
                    c.loser.event_id.to_string(),
                    c.loser.hlc.encode(),
                    c.loser.node_id.to_string(),
                    values(c.loser.values.as_ref())?,
                    c.detected_at,
                    c.resolved_at,
                    c.resolved_by.as_deref(),
                    c.resolution.as_deref(),
                    c.resolution_note.as_deref(),
                    c.resolution_event_id.map(|i| i.to_string()),
                    c.kind.as_str(),
                    c.detail.as_deref(),
                    c.winner_table.as_deref(),
                    c.winner_record_id.map(|i| i.to_string()),
                ],
            )?;
        }
        Ok(())
    }

    async fn record_conflicts(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> Result<Vec<Conflict>> {
        let rows = query(
            tx.conn(),
            &format!(
                "SELECT {CONFLICT_COLUMNS}, detected_at, resolved_at FROM tidemark_conflicts \
                 WHERE table_name = ?1 AND record_id = ?2"
            ),
            [table.to_owned(), id.to_string()],
            conflict_row,
        )?;
        rows.into_iter().map(Conflict::try_from).collect()
    }

    async fn table_conflicts(&self, tx: &mut Self::Tx, table: &str) -> Result<Vec<Conflict>> {
        let rows = query(
            tx.conn(),
            &format!(
                "SELECT {CONFLICT_COLUMNS}, detected_at, resolved_at FROM tidemark_conflicts \
                 WHERE table_name = ?1"
            ),
            [table],
            conflict_row,
        )?;
        rows.into_iter().map(Conflict::try_from).collect()
    }

    async fn quarantine(
        &self,
        tx: &mut Self::Tx,
        peer: Option<Ulid>,
        rows: &[Rejected],
    ) -> Result<()> {
        // Ids in arrival order within the batch (a listing is oldest first).
        let mut ids = ulid::Generator::new();
        for r in rows {
            execute(
                tx.conn(),
                "INSERT INTO tidemark_quarantine (quarantine_id, event_id, peer_id, code, reason, event) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (event_id) DO NOTHING",
                params![
                    ids.generate()
                        .unwrap_or_else(|_| Ulid::generate())
                        .to_string(),
                    crate::model::truncate(&r.event_id),
                    peer.map(|p| p.to_string()),
                    r.kind.code(),
                    r.reason,
                    json_text(&r.event)?,
                ],
            )?;
        }
        Ok(())
    }

    async fn savepoint(&self, tx: &mut Self::Tx, op: crate::backend::SavepointOp) -> Result<()> {
        execute(tx.conn(), op.sql(), [])?;
        Ok(())
    }

    async fn count_quarantined(&self) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tidemark_quarantine")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn list_quarantined(&self, limit: u32) -> Result<Vec<Quarantined>> {
        type Row = (String, Option<String>, String, String, String, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT event_id, peer_id, code, reason, event, received_at FROM tidemark_quarantine \
             ORDER BY quarantine_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(event_id, peer_id, code, reason, event, received_at)| Quarantined {
                    event_id,
                    peer_id,
                    code,
                    reason,
                    event,
                    received_at,
                },
            )
            .collect())
    }

    async fn discard_quarantined(&self, event_ids: Option<&[String]>) -> Result<u64> {
        let done = match event_ids {
            None => {
                sqlx::query("DELETE FROM tidemark_quarantine")
                    .execute(&self.pool)
                    .await?
            }
            Some(ids) => sqlx::query(
                "DELETE FROM tidemark_quarantine WHERE event_id IN (SELECT value FROM json_each($1))",
            )
            .bind(json_text(&ids)?)
            .execute(&self.pool)
            .await?,
        };
        Ok(done.rows_affected())
    }

    async fn expire_quarantined(&self, before_ms: i64) -> Result<u64> {
        // received_at is RFC 3339 text in one format: ordered as text.
        let done = sqlx::query(
            "DELETE FROM tidemark_quarantine \
             WHERE received_at < strftime('%Y-%m-%dT%H:%M:%fZ', $1 / 1000.0, 'unixepoch')",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn conflict(&self, id: Ulid) -> Result<Option<Conflict>> {
        let row: Option<ConflictRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CONFLICT_COLUMNS}, detected_at, resolved_at FROM tidemark_conflicts WHERE conflict_id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Conflict::try_from).transpose()
    }

    async fn conflict_in(&self, tx: &mut Self::Tx, id: Ulid) -> Result<Option<Conflict>> {
        let rows = query(
            tx.conn(),
            &format!(
                "SELECT {CONFLICT_COLUMNS}, detected_at, resolved_at FROM tidemark_conflicts WHERE conflict_id = ?1"
            ),
            [id.to_string()],
            conflict_row,
        )?;
        rows.into_iter().next().map(Conflict::try_from).transpose()
    }

    async fn list_conflicts(&self, filter: &ConflictFilter) -> Result<Vec<Conflict>> {
        let rows: Vec<ConflictRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CONFLICT_COLUMNS}, detected_at, resolved_at FROM tidemark_conflicts \
             WHERE ($1 IS NULL OR table_name = $1) AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR conflict_id > $3) ORDER BY conflict_id LIMIT $4"
        )))
        .bind(filter.table.as_deref())
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.after.map(|a| a.to_string()))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Conflict::try_from).collect()
    }

    async fn open_conflict_counts(&self) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT table_name, COUNT(*) FROM tidemark_conflicts WHERE status = 'open' GROUP BY table_name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, n)| (t, n.max(0) as u64))
            .collect())
    }

    async fn get_row(&self, table: &TableInfo, id: Ulid) -> Result<Option<Values>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = $1",
            select_columns(table),
            q(&table.table_name),
            q(&table.primary_key),
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
        let n = table.columns.len();
        let cells = rows
            .iter()
            .map(|row| (0..n).map(|i| cell(row, i)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(decode_rows(table, cells)?.remove(&id))
    }

    async fn get_version(&self, table: &str, id: Ulid) -> Result<Option<Version>> {
        let row: Option<VersionRow> = sqlx::query_as(
            "SELECT record_id, hlc, node_id, event_id, deleted, vv, frontier FROM tidemark_record_versions \
             WHERE table_name = $1 AND record_id = $2",
        )
        .bind(table)
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.into_version().map(|(_, v)| v)).transpose()
    }

    async fn vector(&self) -> Result<VersionVector> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT node_id, max_hlc FROM tidemark_nodes WHERE max_hlc > 0")
                .fetch_all(&self.pool)
                .await?;
        vector_from_rows(rows, "tidemark_nodes")
    }

    async fn sequences(&self) -> Result<Sequences> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT node_id, max_seq FROM tidemark_nodes WHERE max_seq > 0")
                .fetch_all(&self.pool)
                .await?;
        sequences_from_rows(rows)
    }

    async fn max_hlc(&self) -> Result<Hlc> {
        let (raw,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(hlc_timestamp), 0) FROM change_events")
                .fetch_one(&self.pool)
                .await?;
        Hlc::decode(raw).map_err(|e| StoreError::corrupt("change_events", e.to_string()))
    }

    async fn events_of_origin_after(
        &self,
        origin: Ulid,
        after: Hlc,
        limit: u32,
    ) -> Result<Vec<LoggedEvent>> {
        // An origin's HLCs are unique in the log, so the (node_id,
        // hlc_timestamp) index gives the order without a sorter.
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, {WALL_MS} FROM change_events \
             WHERE node_id = ?1 AND hlc_timestamp > ?2 ORDER BY hlc_timestamp LIMIT ?3"
        );
        let origin = origin.to_string();
        let rows: Vec<EventRow> = writer::read(&self.reader, self.busy_timeout, |conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            stmt.query_map(params![origin, after.encode(), limit], event_row)?
                .collect()
        })
        .await?;
        rows.into_iter().map(LoggedEvent::try_from).collect()
    }

    async fn first_of_origin_after(&self, origin: Ulid, after: Hlc) -> Result<Option<FirstEvent>> {
        let first: Option<(i64, Option<i64>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {WALL_MS}, CASE WHEN json_valid(metadata) \
             THEN CAST(json_extract(metadata, '$.seq') AS INTEGER) END \
             FROM change_events WHERE node_id = $1 AND hlc_timestamp > $2 \
             ORDER BY hlc_timestamp LIMIT 1"
        )))
        .bind(origin.to_string())
        .bind(after.encode())
        .fetch_optional(&self.pool)
        .await?;
        Ok(first.map(|(wall_ms, seq)| FirstEvent {
            wall_ms,
            seq: seq.and_then(|s| u64::try_from(s).ok()),
        }))
    }

    async fn count_of_origin_after(&self, origin: Ulid, after: Hlc) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM change_events WHERE node_id = $1 AND hlc_timestamp > $2",
        )
        .bind(origin.to_string())
        .bind(after.encode())
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    async fn record_events(&self, table: &str, id: Ulid) -> Result<Vec<ChangeEvent>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, {WALL_MS} FROM change_events \
             WHERE table_name = $1 AND record_id = $2 ORDER BY hlc_timestamp, node_id, event_id"
        );
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(table)
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(ChangeEvent::try_from).collect()
    }

    async fn record_events_in(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> Result<Vec<ChangeEvent>> {
        let rows = query(
            tx.conn(),
            &format!(
                "SELECT {EVENT_COLUMNS}, {WALL_MS} FROM change_events \
                 WHERE table_name = ?1 AND record_id = ?2 ORDER BY hlc_timestamp, node_id, event_id"
            ),
            [table.to_owned(), id.to_string()],
            event_row,
        )?;
        rows.into_iter().map(ChangeEvent::try_from).collect()
    }

    async fn pending_captures(&self) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tidemark_capture_queue")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn has_captures(&self) -> Result<bool> {
        let (b,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM tidemark_capture_queue)")
            .fetch_one(&self.pool)
            .await?;
        Ok(b)
    }

    async fn record_ack(
        &self,
        tx: &mut Self::Tx,
        peer: Ulid,
        vector: &VersionVector,
    ) -> Result<()> {
        for (origin, hlc) in &vector.0 {
            execute(
                tx.conn(),
                "INSERT INTO tidemark_peer_progress (peer_id, origin_id, acked_hlc) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (peer_id, origin_id) DO UPDATE SET acked_hlc = max(acked_hlc, excluded.acked_hlc), \
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                params![peer.to_string(), origin.to_string(), hlc.encode()],
            )?;
        }
        Ok(())
    }

    async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT origin_id, acked_hlc FROM tidemark_peer_progress WHERE peer_id = $1",
        )
        .bind(peer.to_string())
        .fetch_all(&self.pool)
        .await?;
        vector_from_rows(rows, "tidemark_peer_progress")
    }

    async fn forget_peers(&self, tx: &mut Self::Tx, keep: &[Ulid]) -> Result<u64> {
        let gone: Vec<String> = query(
            tx.conn(),
            "SELECT DISTINCT peer_id FROM tidemark_peer_progress",
            [],
            |r| r.get(0),
        )?
        .into_iter()
        .filter(|p: &String| !keep.iter().any(|k| k.to_string() == *p))
        .collect();
        for peer in &gone {
            execute(
                tx.conn(),
                "DELETE FROM tidemark_peer_progress WHERE peer_id = ?1",
                [peer],
            )?;
        }
        Ok(gone.len() as u64)
    }

    async fn mark_synced(&self, tx: &mut Self::Tx, origin: Ulid, upto: Hlc) -> Result<u64> {
        execute(
            tx.conn(),
            "UPDATE change_events SET synced_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
             WHERE synced_at IS NULL AND node_id = ?1 AND hlc_timestamp <= ?2",
            params![origin.to_string(), upto.encode()],
        )
    }

    async fn compact_events(
        &self,
        tx: &mut Self::Tx,
        after: Hlc,
        before: Hlc,
        tombstones: Option<Tombstones<'_>>,
        limit: u32,
    ) -> Result<Compacted> {
        let (tomb_before, peers) = match tombstones {
            Some(t) => (t.before.encode(), t.acked.to_json_text()),
            None => (0, "{}".to_owned()),
        };
        let tombstone_goes = tombstone_goes_sql(
            "?4",
            "coalesce(json_extract(?5, '$.' || e.node_id), 0)",
            "json_array_length(v.frontier)",
        );
        let rows: Vec<(String, String, i64, bool, String, String, bool)> = query(
            tx.conn(),
            &format!(
                "SELECT e.event_id, e.node_id, e.hlc_timestamp, \
                   e.hlc_timestamp < (SELECT n.max_hlc FROM tidemark_nodes n WHERE n.node_id = e.node_id) \
                   AND NOT EXISTS (SELECT 1 FROM tidemark_record_versions v \
                     WHERE v.table_name = e.table_name AND v.record_id = e.record_id \
                     AND (v.event_id = e.event_id OR instr(v.frontier, e.event_id) > 0)) \
                   AND NOT EXISTS (SELECT 1 FROM tidemark_blocked b WHERE b.event_id = e.event_id), \
                   e.table_name, e.record_id, {tombstone_goes} \
                 FROM change_events e \
                 WHERE e.hlc_timestamp > ?1 AND e.hlc_timestamp < ?2 AND e.synced_at IS NOT NULL \
                 ORDER BY e.hlc_timestamp LIMIT ?3"
            ),
            params![
                after.encode(),
                before.encode(),
                i64::from(limit),
                tomb_before,
                peers
            ],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )?;
        let mut done = Compacted {
            scanned: rows.len() as u64,
            ..Compacted::default()
        };
        let mut upto: HashMap<String, i64> = HashMap::new();
        for (event_id, origin, hlc, superseded, table, record, tombstone) in rows {
            done.last = Some(decode_hlc("change_events", hlc)?);
            if !superseded && !tombstone {
                continue;
            }
            done.deleted += execute(
                tx.conn(),
                "DELETE FROM change_events WHERE event_id = ?1",
                [&event_id],
            )?;
            done.conflicts += execute(
                tx.conn(),
                "DELETE FROM tidemark_conflicts WHERE table_name = ?1 AND record_id = ?2 \
                 AND status = 'resolved' AND (loser_event_id = ?3 OR winner_event_id = ?3)",
                params![table, record, event_id],
            )?;
            if tombstone {
                done.tombstones += execute(
                    tx.conn(),
                    "DELETE FROM tidemark_record_versions WHERE table_name = ?1 AND record_id = ?2 \
                     AND event_id = ?3",
                    params![table, record, event_id],
                )?;
            }
            let top = upto.entry(origin).or_insert(hlc);
            *top = (*top).max(hlc);
        }
        for (origin, hlc) in upto {
            execute(
                tx.conn(),
                "UPDATE tidemark_nodes SET compacted_hlc = max(compacted_hlc, ?2) WHERE node_id = ?1",
                params![origin, hlc],
            )?;
        }
        Ok(done)
    }

    async fn compacted_upto(&self, origin: Ulid) -> Result<Hlc> {
        let raw: Option<(i64,)> =
            sqlx::query_as("SELECT compacted_hlc FROM tidemark_nodes WHERE node_id = $1")
                .bind(origin.to_string())
                .fetch_optional(&self.pool)
                .await?;
        decode_hlc("tidemark_nodes", raw.map_or(0, |r| r.0))
    }

    async fn log_extent(&self) -> Result<(u64, Option<i64>)> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM change_events")
            .fetch_one(&self.pool)
            .await?;
        let first: Option<(i64,)> = sqlx::query_as(
            "SELECT hlc_timestamp FROM change_events ORDER BY hlc_timestamp LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        let first = first
            .map(|(h,)| decode_hlc("change_events", h).map(Hlc::wall_ms))
            .transpose()?;
        Ok((n.max(0) as u64, first))
    }

    async fn count_unsynced(&self) -> Result<u64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM change_events WHERE synced_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(n.max(0) as u64)
    }

    async fn check_capture(&self, tables: &[std::sync::Arc<TableInfo>]) -> Result<Vec<String>> {
        let present: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'trigger'")
                .fetch_all(&self.pool)
                .await?;
        let mut problems = Vec::new();
        for info in tables {
            let [ins, upd, del, ins_replaces, upd_replaces] = trigger_names(&info.table_name);
            let mut needed = vec![ins, upd, del, upd_replaces];
            if !info.uniques.is_empty() {
                needed.push(ins_replaces);
            }
            for name in needed {
                if !present.iter().any(|(p,)| *p == name) {
                    problems.push(format!(
                        "table {}: capture trigger {name} is missing, so direct writes go uncaptured; restart the daemon to recreate it",
                        info.table_name
                    ));
                }
            }
        }
        Ok(problems)
    }

    async fn application_triggers(
        &self,
        tables: &[std::sync::Arc<TableInfo>],
    ) -> Result<Vec<(String, String)>> {
        let all: Vec<(String, String)> = sqlx::query_as(
            "SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger' ORDER BY tbl_name, name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(all
            .into_iter()
            .filter(|(table, name)| {
                tables.iter().any(|t| t.table_name == *table)
                    && !trigger_names(table).contains(name)
            })
            .collect())
    }

    async fn strip_identity(&self, donor: Ulid) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for sql in crate::backend::STRIP_IDENTITY {
            let q = sqlx::query(sql);
            let q = if sql.contains("$1") {
                q.bind(donor.to_string())
            } else {
                q
            };
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn check_lock(&self) -> Result<()> {
        // A file lock lasts as long as the open file: nothing can take it away.
        Ok(())
    }

    async fn close(&self) {
        // The write connection first (waiting for its transaction, if one is
        // open), then the checkpoint thread's, so the pool's last connection
        // is the file's last.
        drop(self.writer.lock().await.take());
        drop(self.reader.lock().await.take());
        let checkpoint = self
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Joining waits for a checkpoint under way: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || drop(checkpoint)).await;
        self.pool.close().await;
        // Dropping the file releases the lock.
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    async fn row_ids(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        from: Option<Ulid>,
        to: Option<Ulid>,
        limit: u32,
    ) -> Result<Vec<Ulid>> {
        let pk = q(&table.primary_key);
        let mut conds = Vec::new();
        if from.is_some() {
            conds.push(format!("{pk} >= ?"));
        }
        if to.is_some() {
            conds.push(format!("{pk} < ?"));
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "SELECT {pk} FROM {}{filter} ORDER BY {pk} LIMIT ?",
            q(&table.table_name)
        );
        let mut binds: Vec<rusqlite::types::Value> = [from, to]
            .into_iter()
            .flatten()
            .map(|bound| rusqlite::types::Value::Text(bound.to_string()))
            .collect();
        binds.push(rusqlite::types::Value::Integer(i64::from(limit)));
        let ids: Vec<String> = query(tx.conn(), &sql, rusqlite::params_from_iter(binds), |r| {
            r.get(0)
        })?;
        ids.into_iter()
            .map(|id| {
                Ulid::from_string(&id)
                    .map_err(|e| StoreError::corrupt(&table.table_name, e.to_string()))
            })
            .collect()
    }
}

impl FromStr for SqliteOptions {
    type Err = StoreError;

    /// Parses `sqlite://PATH` or `sqlite:PATH`.
    fn from_str(url: &str) -> Result<Self> {
        let path = SqliteBackend::path_of(url).ok_or_else(|| StoreError::BadUrl {
            url: url.to_owned(),
            reason: "expected sqlite://PATH".into(),
        })?;
        let path = path
            .to_str()
            .map(|p| p.split('?').next().unwrap_or(p))
            .unwrap_or_default();
        if path.is_empty() {
            return Err(StoreError::BadUrl {
                url: url.to_owned(),
                reason: "the database file path is empty".into(),
            });
        }
        Ok(SqliteOptions::new(path))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// `event_row` reads by position: every field comes from its own column.
    #[test]
    fn event_columns_are_read_in_order() {
        use super::{EVENT_COLUMNS, WALL_MS, event_row};
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        conn.execute_batch(super::SCHEMA_SQL).expect("schema");
        conn.execute(
            "INSERT INTO change_events (event_id, hlc_timestamp, wall_timestamp, node_id, table_name, \
             record_id, operation, action, user_id, old_values, new_values, metadata) \
             VALUES ('EEEEEEEEEEEEEEEEEEEEEEEEEE', 77, '2026-12-02T01:02:03.456Z', \
             'NNNNNNNNNNNNNNNNNNNNNNNNNN', 'notes', 'RRRRRRRRRRRRRRRRRRRRRRRRRR', 'UPDATE', 'act', \
             'UUUUUUUUUUUUUUUUUUUUUUUUUU', '{\"old\":1}', '{\"new\":2}', '{\"seq\":3}')",
            [],
        )
        .expect("insert");
        let row = conn
            .query_row(
                &format!("SELECT {EVENT_COLUMNS}, {WALL_MS} FROM change_events"),
                [],
                event_row,
            )
            .expect("row");
        assert_eq!(row.event_id, "EEEEEEEEEEEEEEEEEEEEEEEEEE");
        assert_eq!(row.hlc_timestamp, 77);
        assert_eq!(row.node_id, "NNNNNNNNNNNNNNNNNNNNNNNNNN");
        assert_eq!(row.table_name, "notes");
        assert_eq!(row.record_id, "RRRRRRRRRRRRRRRRRRRRRRRRRR");
        assert_eq!(row.operation, "UPDATE");
        assert_eq!(row.action.as_deref(), Some("act"));
        assert_eq!(row.user_id.as_deref(), Some("UUUUUUUUUUUUUUUUUUUUUUUUUU"));
        assert_eq!(row.old_values.as_deref(), Some(r#"{"old":1}"#));
        assert_eq!(row.new_values.as_deref(), Some(r#"{"new":2}"#));
        assert_eq!(row.metadata.as_deref(), Some(r#"{"seq":3}"#));
        assert_eq!(row.wall_ms, 1_796_173_323_456);
    }

    /// The text SQLite's own date function makes of `ms`.
    fn strftime(conn: &rusqlite::Connection, ms: i64) -> String {
        conn.query_row(
            "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', ?1 / 1000.0, 'unixepoch')",
            [ms],
            |r| r.get(0),
        )
        .expect("strftime")
    }

    #[test]
    fn iso8601_is_what_strftime_writes_at_the_edges() {
        let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
        // The epoch, a leap day, the last ms of a minute, of 9999 (the latest an
        // event may carry), and a time of today.
        for ms in [
            0,
            951_782_400_000,
            1_700_000_059_999,
            253_402_300_799_999,
            1_764_628_808_123,
        ] {
            assert_eq!(crate::model::iso8601(ms), strftime(&conn, ms), "{ms}");
        }
    }

    proptest! {
        #[test]
        fn iso8601_is_what_strftime_writes(ms in 0i64..=253_402_300_799_999) {
            let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
            prop_assert_eq!(crate::model::iso8601(ms), strftime(&conn, ms));
        }
    }
}
