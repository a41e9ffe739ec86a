//! The SQLite backend's write connection: one `rusqlite` connection (the same
//! bundled SQLite as sqlx's pool) that runs every statement of the daemon's
//! write transactions inline on the calling task, with no hand-off to a worker
//! thread, its statements prepared once and cached.
//!
//! * [`SqliteTx`] owns the connection for the transaction's lifetime (the
//!   mutex serialises transactions); dropping it open rolls it back.
//! * `BEGIN IMMEDIATE` never blocks the runtime waiting for another writer: it
//!   is tried without SQLite's busy handler and retried after async sleeps
//!   until the busy timeout, as the busy handler would.
//! * Errors become the `sqlx::Error`s sqlx's driver gives for the same failure
//!   (a database error with SQLite's extended code and message, a column
//!   decode error), so everything that classifies `StoreError::Db` (refused
//!   rows, constraint messages, transient conditions) holds for both
//!   connections.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::types::{Type, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags, Row};
use serde_json::Value;
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::types::Json;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::SqliteOptions;
use crate::backend::TxScope;
use crate::error::{Result, StoreError};
use crate::value::SqlCell;

/// Statements the connection keeps prepared.
const STATEMENT_CACHE: usize = 256;

/// SQLite's own busy handler's sleeps, in ms (`sqliteDefaultBusyCallback`); the
/// last one repeats.
const BUSY_DELAYS_MS: [u64; 12] = [1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100];

/// SQLite's busy handler's schedule, slept by the caller on the runtime
/// instead of by SQLite on the calling thread.
struct BusyWait {
    deadline: Instant,
    attempt: usize,
}

impl BusyWait {
    fn new(timeout: Duration) -> Self {
        BusyWait {
            deadline: Instant::now() + timeout,
            attempt: 0,
        }
    }

    /// How long to sleep before trying again after `e`; `None` when `e` is not
    /// SQLITE_BUSY or the timeout has passed.
    fn next_delay(&mut self, e: &rusqlite::Error) -> Option<Duration> {
        let now = Instant::now();
        if e.sqlite_error_code() != Some(rusqlite::ErrorCode::DatabaseBusy) || now >= self.deadline
        {
            return None;
        }
        let delay = BUSY_DELAYS_MS[self.attempt.min(BUSY_DELAYS_MS.len() - 1)];
        self.attempt += 1;
        Some(Duration::from_millis(delay).min(self.deadline - now))
    }
}

/// The write connection, `None` once the backend is closed.
pub(super) type Writer = Arc<Mutex<Option<Connection>>>;

/// Opens the write connection with the settings sqlx gives the pool's
/// connections (see [`super::SqliteBackend::connect`]).
pub(super) fn open(opts: &SqliteOptions) -> rusqlite::Result<Connection> {
    // sqlx's flags: read-write, create, no mutex, URI filenames, private cache.
    let conn = Connection::open_with_flags(
        &opts.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE,
    )?;
    conn.busy_timeout(busy_timeout(opts.busy_timeout))?;
    keep_plans(&conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(
        None,
        "synchronous",
        if opts.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        },
    )?;
    if let Some(pages) = opts.max_page_count {
        conn.pragma_update(None, "max_page_count", pages)?;
    }
    // A statement that writes several rows inside a transaction keeps a
    // statement journal (the pages it changed, to undo just that statement):
    // in memory, not a temp file written and read back through the kernel
    // (about 8% of a catch-up's samples went to that file).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoints run on their own thread (see `checkpoint`); this is the
    // backstop.
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        super::checkpoint::BACKSTOP_PAGES,
    )?;
    Ok(conn)
}

/// The read connection of the reads that follow every commit (the sender's
/// page of an origin's events): read-only, run inline like the write
/// connection's statements, with no hand-off to sqlx's worker thread and no
/// row-by-row channel back from it.
pub(super) type Reader = Arc<Mutex<Option<Connection>>>;

/// Opens the read connection (the write connection made the file and set WAL).
pub(super) fn open_reader(opts: &SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        &opts.path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE,
    )?;
    // Busy is retried in `read` with async sleeps, never by SQLite's handler
    // (which would sleep on a runtime thread).
    conn.busy_timeout(Duration::ZERO)?;
    keep_plans(&conn)?;
    Ok(conn)
}

/// Statements stay prepared, and a prepared statement keeps its plan
/// whatever is bound to it. Without the query planner stability guarantee
/// (QPSG), SQLite (built with STAT4) marks a statement whose plan may depend on
/// a parameter (`LIMIT ?`, `LIKE ?`) expired at every new binding and prepares
/// it again at its next step: the sender's page read (`... LIMIT ?3`) was
/// compiled anew on every call.
fn keep_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// Runs a statement without parameters or rows (transaction control) from the
/// statement cache: `execute_batch` would compile it at every call.
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Runs `f` on the read connection, on the calling task. A database busy
/// for a moment (WAL recovery) is retried after async sleeps until `timeout`,
/// as SQLite's busy handler would.
pub(super) async fn read<T>(
    reader: &Reader,
    timeout: Duration,
    f: impl Fn(&Connection) -> rusqlite::Result<T>,
) -> Result<T> {
    let guard = reader.clone().lock_owned().await;
    let mut busy = BusyWait::new(timeout);
    loop {
        // No borrow of the connection lives across the sleep below.
        let Some(conn) = guard.as_ref() else {
            return Err(sqlx::Error::PoolClosed.into());
        };
        match f(conn) {
            Ok(done) => return Ok(done),
            Err(e) => match busy.next_delay(&e) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(db_error(e)),
            },
        }
    }
}

/// A busy timeout SQLite takes (milliseconds in an `i32`).
fn busy_timeout(d: Duration) -> Duration {
    d.min(Duration::from_millis(i32::MAX as u64))
}

/// A daemon write transaction on the write connection. Dropped while open (not
/// committed or rolled back), it rolls back.
#[derive(Debug)]
pub struct SqliteTx {
    conn: OwnedMutexGuard<Option<Connection>>,
    /// The capture guard is raised (a [`TxScope::Rows`] transaction): lowered
    /// again at commit.
    guarded: bool,
}

impl SqliteTx {
    pub(super) fn conn(&self) -> &Connection {
        // Built only around an open connection, which close() cannot take
        // while the guard is held.
        self.conn
            .as_ref()
            .expect("a transaction holds an open connection")
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_ref()
            && !conn.is_autocommit()
            && let Err(e) = run(conn, "ROLLBACK")
        {
            tracing::warn!(error = %e, "rolling back an abandoned write transaction failed");
        }
    }
}

/// Takes the write connection and begins a write transaction; one that may
/// write replicated tables raises the capture guard. A bookkeeping one leaves
/// it: its commit then writes no page of the guard table.
pub(super) async fn begin(writer: &Writer, timeout: Duration, scope: TxScope) -> Result<SqliteTx> {
    let guard = writer.clone().lock_owned().await;
    if guard.is_none() {
        return Err(sqlx::Error::PoolClosed.into());
    }
    let tx = SqliteTx {
        conn: guard,
        guarded: scope == TxScope::Rows,
    };
    let mut busy = BusyWait::new(timeout);
    loop {
        match try_begin(tx.conn(), timeout) {
            Ok(()) => break,
            Err(e) => match busy.next_delay(&e) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(db_error(e)),
            },
        }
    }
    if tx.guarded {
        run(
            tx.conn(),
            "UPDATE tidemark_capture_guard SET active = 1 WHERE id = 1",
        )
        .map_err(db_error)?;
    }
    Ok(tx)
}

/// `BEGIN IMMEDIATE` without waiting: SQLITE_BUSY at once if another
/// connection writes.
fn try_begin(conn: &Connection, timeout: Duration) -> rusqlite::Result<()> {
    if !conn.is_autocommit() {
        run(conn, "ROLLBACK")?;
    }
    conn.busy_timeout(Duration::ZERO)?;
    let begun = run(conn, "BEGIN IMMEDIATE");
    conn.busy_timeout(busy_timeout(timeout))?;
    begun
}

/// Lowers the capture guard and commits. With `synchronous = FULL` the commit
/// waits for the disk: on a multi-threaded runtime it runs in
/// `block_in_place`, so the worker's other tasks move to another thread.
pub(super) fn commit(tx: SqliteTx, synchronous_full: bool) -> Result<()> {
    let conn = tx.conn();
    if tx.guarded {
        run(
            conn,
            "UPDATE tidemark_capture_guard SET active = 0 WHERE id = 1",
        )
        .map_err(db_error)?;
    }
    let multi_threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let commit = || run(conn, "COMMIT");
    if synchronous_full && multi_threaded {
        tokio::task::block_in_place(commit)
    } else {
        commit()
    }
    .map_err(db_error)
    // A failed COMMIT may leave the transaction open: dropping `tx` rolls it back.
}

pub(super) fn rollback(tx: SqliteTx) -> Result<()> {
    run(tx.conn(), "ROLLBACK").map_err(db_error)
}

// ---- statements ------------------------------------------------------------------

/// Runs a statement (prepared once, then cached); the number of rows changed.
pub(super) fn execute(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<u64> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let n = stmt.execute(params).map_err(db_error)?;
    Ok(n as u64)
}

/// Runs a query (prepared once, then cached), mapping every row.
pub(super) fn query<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let rows = stmt.query_map(params, f).map_err(db_error)?;
    rows.collect::<rusqlite::Result<Vec<T>>>().map_err(db_error)
}

/// The value that binds a cell as SQLite stores it.
pub(super) fn bind(cell: SqlCell) -> SqlValue {
    match cell {
        SqlCell::Null => SqlValue::Null,
        SqlCell::Int(i) => SqlValue::Integer(i),
        SqlCell::Real(f) => SqlValue::Real(f),
        SqlCell::Text(t) => SqlValue::Text(t),
        SqlCell::Blob(b) => SqlValue::Blob(b),
    }
}

/// One value of a result row as SQLite stores it.
pub(super) fn cell(v: ValueRef<'_>) -> SqlCell {
    match v {
        ValueRef::Null => SqlCell::Null,
        ValueRef::Integer(i) => SqlCell::Int(i),
        ValueRef::Real(f) => SqlCell::Real(f),
        ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => SqlCell::Text(text.to_owned()),
            // Text that is not UTF-8: its bytes, refused by every text class.
            Err(_) => SqlCell::Blob(bytes.to_vec()),
        },
        ValueRef::Blob(bytes) => SqlCell::Blob(bytes.to_vec()),
    }
}

/// A JSON text column, decoded like sqlx decodes `Json<Value>`.
pub(super) fn json(
    row: &Row<'_>,
    column: impl rusqlite::RowIndex,
) -> rusqlite::Result<Option<Json<Value>>> {
    let index = column.idx(row.as_ref())?;
    // Parsed from SQLite's own buffer: no copy of the text first.
    let text = match row.get_ref(index)? {
        ValueRef::Null => return Ok(None),
        ValueRef::Text(text) => text,
        other => {
            let name = row.as_ref().column_name(index)?.to_owned();
            return Err(rusqlite::Error::InvalidColumnType(
                index,
                name,
                other.data_type(),
            ));
        }
    };
    serde_json::from_slice(text)
        .map(|v| Some(Json(v)))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(e)))
}

/// A JSON text column that may not be NULL.
pub(super) fn json_not_null(row: &Row<'_>, name: &str) -> rusqlite::Result<Json<Value>> {
    json(row, name)?.ok_or_else(|| {
        let index = row.as_ref().column_index(name).unwrap_or_default();
        rusqlite::Error::FromSqlConversionFailure(
            index,
            Type::Null,
            Box::new(sqlx::error::UnexpectedNullError),
        )
    })
}

// ---- errors ----------------------------------------------------------------------

/// SQLite's error as sqlx's driver reports it: the extended result code and
/// SQLite's message.
#[derive(Debug)]
struct SqliteDbError {
    code: i32,
    message: String,
}

impl std::fmt::Display for SqliteDbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteDbError {}

impl DatabaseError for SqliteDbError {
    fn message(&self) -> &str {
        &self.message
    }

    /// The extended result code.
    fn code(&self) -> Option<Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        use rusqlite::ffi;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// A rusqlite error as the `sqlx::Error` sqlx's SQLite driver gives for the
/// same failure.
pub(super) fn sqlx_error(e: rusqlite::Error) -> sqlx::Error {
    use rusqlite::Error as E;
    let database = |code: i32, message: String| {
        sqlx::Error::Database(Box::new(SqliteDbError { code, message }))
    };
    match e {
        E::SqliteFailure(err, message) => {
            let message = message.unwrap_or_else(|| err.to_string());
            database(err.extended_code, message)
        }
        E::QueryReturnedNoRows => sqlx::Error::RowNotFound,
        E::FromSqlConversionFailure(i, _, _)
        | E::IntegralValueOutOfRange(i, _)
        | E::Utf8Error(i, _)
        | E::InvalidColumnType(i, _, _) => sqlx::Error::ColumnDecode {
            index: i.to_string(),
            source: Box::new(e),
        },
        E::InvalidColumnIndex(index) => sqlx::Error::ColumnIndexOutOfBounds { index, len: 0 },
        E::InvalidColumnName(name) => sqlx::Error::ColumnNotFound(name),
        E::ToSqlConversionFailure(source) => sqlx::Error::Encode(source),
        other => match other.sqlite_error() {
            Some(err) => database(err.extended_code, other.to_string()),
            None => database(rusqlite::ffi::SQLITE_ERROR, other.to_string()),
        },
    }
}

pub(super) fn db_error(e: rusqlite::Error) -> StoreError {
    sqlx_error(e).into()
}
