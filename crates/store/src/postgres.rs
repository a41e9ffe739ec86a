//! PostgreSQL backend. The daemon's write transactions run with
//! `SET LOCAL tidemark.applying = 'on'` (capture triggers skip them) and start by
//! locking the capture queue in SHARE ROW EXCLUSIVE mode, which waits for in-flight
//! writers that captured a change and holds off new ones until commit (see the
//! migration for why that cannot deadlock on a row the daemon writes).
//!
//! `CHAR(26)` parameters are cast to `bpchar` so comparisons use the indexes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use tidemark_hlc::Hlc;
use ulid::Ulid;

use crate::backend::{
    Backend, Compacted, FirstEvent, RowWrite, TableShape, Tombstones, TxScope, tombstone_goes_sql,
};
use crate::error::{Result, StoreError};
use crate::ident::{Ident, q};
use crate::model::{
    Blocked, Capture, ChangeEvent, Conflict, ConflictFilter, ConflictPolicy, EventExtras,
    ForeignKey, LoggedEvent, Quarantined, Rejected, Sequences, SetAside, TableInfo, Values,
    Version, VersionVector, values_text,
};
use crate::rows::{
    BlockedRow, CONFLICT_COLUMNS, CaptureRow, ConflictRow, EventRow, TableRow, ULID_FIRST,
    ULID_REST, VersionRow, hlc as decode_hlc, rows_to_values, sequences_from_rows,
    vector_from_rows,
};
use crate::value::ColumnType;

const MIGRATIONS_TABLE: &str = "tidemark_schema_migrations";

/// The SQL of the first PostgreSQL migration (the whole schema), for tools that
/// build a bare database of the same shape (the raw baseline of `tidemark bench`).
pub const SCHEMA_SQL: &str = include_str!("../migrations/postgres/0001_init.up.sql");
/// Most rows one bulk (UNNEST) statement carries.
const BULK_CHUNK: usize = 1000;
/// The NOTIFY channel capture triggers signal.
pub const CAPTURE_CHANNEL: &str = "tidemark_capture";
/// A record's events in the total order (`$1` table, `$2` record).
fn record_events_sql() -> String {
    format!(
        "SELECT {PG_EVENT_COLUMNS}, {WALL_MS} FROM change_events \
         WHERE table_name = $1 AND record_id = $2::bpchar ORDER BY hlc_timestamp, node_id, event_id"
    )
}

const PG_CONFLICT_TIMES: &str = "to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS detected_at, \
     to_char(resolved_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS resolved_at";
const WALL_MS: &str = "CAST(round(extract(epoch FROM wall_timestamp) * 1000) AS BIGINT) AS wall_ms";
/// [`crate::rows::EVENT_COLUMNS`] with the JSONB columns as their text: an event read
/// for a sender is streamed as stored, and every other read parses it once.
const PG_EVENT_COLUMNS: &str = "event_id, hlc_timestamp, node_id, table_name, record_id, operation, action, user_id, \
     old_values::text AS old_values, new_values::text AS new_values, metadata::text AS metadata";
const PG_BLOCKED: &str = "table_name::text AS table_name, record_id::text AS record_id, \
     event_id::text AS event_id, kind::text AS kind, reason, blocker_table::text AS blocker_table, \
     blocker_id::text AS blocker_id, \
     to_char(blocked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS blocked_at";

fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations/postgres");
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}

/// The URL with its password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(query) = query {
        // libpq-style parameters may carry the password too (`?password=...`).
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Connection settings of the PostgreSQL backend.
#[derive(Clone)]
pub struct PostgresOptions {
    pub url: String,
    pub max_connections: u32,
    pub connect_timeout: Duration,
    /// How long a daemon write transaction waits for writers holding the capture
    /// queue before giving up (and retrying later).
    pub lock_timeout: Duration,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &redact(&self.url))
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .finish()
    }
}

impl FromStr for PostgresOptions {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self> {
        PgConnectOptions::from_str(url).map_err(|e| StoreError::BadUrl {
            url: redact(url),
            reason: e.to_string(),
        })?;
        Ok(PostgresOptions {
            url: url.to_owned(),
            max_connections: 8,
            connect_timeout: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(10),
        })
    }
}

#[derive(Debug)]
pub struct PostgresBackend {
    pool: PgPool,
    lock_timeout_ms: u64,
    /// A session holding the database's advisory writer lock: one daemon per
    /// database (the lock goes with the session).
    writer_lock: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    lock_options: PgConnectOptions,
    target: String,
}

/// The advisory lock key of a Tidemark daemon (per database).
const WRITER_LOCK_KEY: i64 = 0x7469_6465_6d61_726b; // "tidemark"

/// Takes the advisory writer lock on a session of its own, or says who holds it.
async fn take_writer_lock(options: &PgConnectOptions, target: &str) -> Result<sqlx::PgConnection> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(options)
        .await
        .map_err(|source| StoreError::Connect {
            target: target.to_owned(),
            source: source.into(),
        })?;
    // A session that just ended (a daemon killed or restarting) may hold the
    // lock for a moment more: a free lock is taken, a held one asked about
    // twice more before it counts as another daemon's.
    for attempt in 0..3 {
        let (taken,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(WRITER_LOCK_KEY)
            .fetch_one(&mut conn)
            .await?;
        if taken {
            return Ok(conn);
        }
        if attempt < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let holder: Option<(i32, String, String)> = sqlx::query_as(
        "SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'a local socket') \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.database = \
         (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND ((l.classid::bigint << 32) | l.objid::bigint) = $1 LIMIT 1",
    )
    .bind(WRITER_LOCK_KEY)
    .fetch_optional(&mut conn)
    .await?;
    Err(StoreError::AlreadyRunning {
        target: target.to_owned(),
        holder: match holder {
            Some((pid, app, addr)) => format!(
                "PostgreSQL session pid {pid} ({}) from {addr} holds its advisory lock",
                if app.is_empty() {
                    "no application name"
                } else {
                    app.as_str()
                }
            ),
            None => "another session holds its advisory lock".into(),
        },
    })
}

fn ids_text(ids: &[Ulid]) -> Vec<String> {
    ids.iter().map(Ulid::to_string).collect()
}

async fn exec(tx: &mut Transaction<'static, Postgres>, sql: String) -> Result<()> {
    sqlx::query(AssertSqlSafe(sql)).execute(&mut **tx).await?;
    Ok(())
}

/// The cast that makes a key parameter match the primary key's type (so the
/// index is used): `bpchar` for `character(n)` keys.
fn key_cast(table: &TableInfo) -> &'static str {
    if table
        .declared
        .first()
        .is_some_and(|t| t.starts_with("character("))
    {
        "bpchar"
    } else {
        "text"
    }
}

/// `alias.col AS col, ...` over the replicated columns, JSON columns as text (so
/// SQL NULL and the JSON document `null` stay apart in `row_to_json`).
fn select_list(table: &TableInfo, alias: &str) -> String {
    table
        .columns
        .iter()
        .zip(&table.types)
        .map(|(c, t)| {
            let cast = if *t == ColumnType::Json { "::text" } else { "" };
            format!("{alias}.{0}{cast} AS {0}", q(c))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A type name from `format_type`, safe to put after `::` (it comes from the
/// catalog; checked anyway, as it is spliced into SQL).
fn cast_type(declared: &str) -> Result<&str> {
    if !declared.is_empty()
        && declared
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" (),_".contains(&b))
    {
        Ok(declared)
    } else {
        Err(StoreError::corrupt(
            "tidemark_datatypes",
            format!("declared type {declared:?} is not a plain type name"),
        ))
    }
}

/// Reads `row_to_json` texts of [`select_list`] rows into canonical values, by id.
fn decode_rows(table: &TableInfo, rows: Vec<(String,)>) -> Result<HashMap<Ulid, Values>> {
    let mut out = HashMap::with_capacity(rows.len());
    for (text,) in rows {
        let raw: BTreeMap<String, Box<serde_json::value::RawValue>> =
            serde_json::from_str(&text)
                .map_err(|e| StoreError::corrupt(&table.table_name, e.to_string()))?;
        let mut values = Values::new();
        for (col, ty) in table.columns.iter().zip(&table.types) {
            let v = match raw.get(col) {
                Some(r) => ty
                    .from_pg_json(r)
                    .map_err(|reason| StoreError::InvalidValue {
                        table: table.table_name.clone(),
                        column: col.clone(),
                        class: ty.to_string(),
                        reason,
                    })?,
                None => Value::Null,
            };
            values.insert(col.clone(), v);
        }
        let id = values
            .get(&table.primary_key)
            .and_then(Value::as_str)
            .and_then(|k| Ulid::from_string(k.trim()).ok())
            .ok_or_else(|| StoreError::corrupt(&table.table_name, "a row's key is not a ULID"))?;
        out.insert(id, values);
    }
    Ok(out)
}

/// The name of a table's capture function: from its datatype id, so any table
/// name fits PostgreSQL's 63-byte identifiers.
fn capture_function(info: &TableInfo) -> String {
    format!(
        "tidemark_capture_{}",
        info.datatype_id.to_string().to_lowercase()
    )
}

/// The capture triggers of every replicated table: statement-level, one per
/// kind of write (a trigger with transition tables has one event), so a
/// statement writing many rows is captured by one `INSERT ... SELECT` and one
/// notify instead of a call per row.
const CAPTURE_TRIGGERS: [(&str, &str, &str); 3] = [
    (
        "tidemark_capture_insert",
        "INSERT",
        "REFERENCING NEW TABLE AS tidemark_new",
    ),
    (
        "tidemark_capture_update",
        "UPDATE",
        "REFERENCING OLD TABLE AS tidemark_old NEW TABLE AS tidemark_new",
    ),
    (
        "tidemark_capture_delete",
        "DELETE",
        "REFERENCING OLD TABLE AS tidemark_old",
    ),
];

/// Every trigger Tidemark puts on a replicated table: the capture triggers,
/// the lock taken before any row of a statement, the TRUNCATE refusal.
const OUR_TRIGGERS: [&str; 5] = [
    CAPTURE_TRIGGERS[0].0,
    CAPTURE_TRIGGERS[1].0,
    CAPTURE_TRIGGERS[2].0,
    "tidemark_capture_lock",
    "tidemark_refuse_truncate",
];

/// The table's capture trigger function, run once per statement by each of
/// [`CAPTURE_TRIGGERS`]: records the rows the statement wrote (JSON text from
/// `row_to_json`, run with settings that make it exact) in statement order,
/// refuses keys that are not ULIDs, and wakes the daemon. An UPDATE pairs old
/// and new rows by key: a row whose replicated columns did not change is
/// skipped, a changed key is a delete of the old key and an insert of the new.
fn capture_function_sql(info: &TableInfo) -> String {
    let t_lit = info.table_name.replace('\'', "''");
    let pk = q(&info.primary_key);
    format!(
        r#"CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql
SET extra_float_digits = 3 SET "TimeZone" = 'UTC' SET bytea_output = 'hex' AS $tidemark$
DECLARE
    bad text;
    captured bigint;
BEGIN
    IF current_setting('tidemark.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT coalesce(quote_literal(n.{pk}::text), 'NULL') INTO bad FROM tidemark_new n
        WHERE n.{pk} IS NULL OR n.{pk}::text !~ '^[0-7][0-9A-HJKMNP-TV-Z]{{25}}$' LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'tidemark: %.% must be a ULID in canonical form (26 uppercase Crockford base32 characters), got %', TG_TABLE_NAME, '{pk_lit}', bad
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO tidemark_capture_queue (table_name, record_id, operation, new_values)
        SELECT '{t_lit}', n.{pk}::text, 'INSERT', (SELECT row_to_json(r) FROM (SELECT {new_list}) r)
        FROM tidemark_new n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO tidemark_capture_queue (table_name, record_id, operation, new_values)
        SELECT '{t_lit}', o.{pk}::text, 'DELETE', NULL FROM tidemark_old o;
    ELSE
        INSERT INTO tidemark_capture_queue (table_name, record_id, operation, new_values)
        SELECT '{t_lit}', coalesce(w.id, v.id),
               CASE WHEN w.id IS NULL THEN 'DELETE' WHEN v.id IS NULL THEN 'INSERT' ELSE 'UPDATE' END,
               w.vals
        FROM (SELECT o.{pk}::text AS id, (SELECT row_to_json(r) FROM (SELECT {old_list}) r) AS vals
              FROM tidemark_old o) v
        FULL JOIN (SELECT n.{pk}::text AS id, (SELECT row_to_json(r) FROM (SELECT {new_list}) r) AS vals
              FROM tidemark_new n) w ON w.id = v.id
        WHERE v.id IS NULL OR w.id IS NULL OR v.vals::text <> w.vals::text
        -- Keys a statement gave up first, so a value they held is free again.
        ORDER BY w.id IS NOT NULL, coalesce(w.id, v.id);
    END IF;
    GET DIAGNOSTICS captured = ROW_COUNT;
    IF captured > 0 THEN
        PERFORM pg_notify('tidemark_capture', '');
    END IF;
    RETURN NULL;
END
$tidemark$"#,
        func = q(&capture_function(info)),
        pk_lit = info.primary_key.replace('\'', "''"),
        new_list = select_list(info, "n"),
        old_list = select_list(info, "o"),
    )
}

impl PostgresBackend {
    /// A read transaction for a range of an origin's events read in
    /// `(node_id, hlc_timestamp)` index order, with bitmap scans off: while a
    /// table grows faster than autovacuum re-analyses it, the planner takes the
    /// range behind a lagging peer for a few hundred rows and reads it all as
    /// a bitmap, sorted afterwards for the first rows; that took 70-150 ms
    /// for each page of 500 (30,000 rows behind), against 1 ms from the index.
    async fn index_order_read(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL enable_bitmapscan = off")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    pub async fn connect(opts: &PostgresOptions) -> Result<Self> {
        let connect = PgConnectOptions::from_str(&opts.url).map_err(|e| StoreError::BadUrl {
            url: redact(&opts.url),
            reason: e.to_string(),
        })?;
        let target = format!(
            "PostgreSQL at {}:{} (database {:?})",
            connect.get_host(),
            connect.get_port(),
            connect.get_database().unwrap_or("")
        );
        // Exact text for floats, timestamps in UTC, bytea in hex: what the
        // daemon reads and writes as text means one value only.
        //
        // Every statement is planned for its parameters and the tables' size
        // now: the daemon's statements stay prepared for the connection's
        // life, and a generic plan made while the tables were nearly empty
        // (the first batches into a new database) kept scanning a whole index
        // range per lookup once they had grown (a `record_id = ANY($2)` used
        // as a filter, not an index condition): a 100k-row load slowed to
        // about 2k rows/s.
        let connect = connect
            .options([
                ("extra_float_digits", "3"),
                ("TimeZone", "UTC"),
                ("bytea_output", "hex"),
                ("plan_cache_mode", "force_custom_plan"),
            ])
            .application_name("tidemark");
        let writer_lock = take_writer_lock(&connect, &target).await?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(2))
            .acquire_timeout(opts.connect_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(|source| StoreError::Connect {
                target: target.clone(),
                source: source.into(),
            })?;
        Ok(PostgresBackend {
            pool,
            lock_timeout_ms: opts.lock_timeout.as_millis().max(1) as u64,
            writer_lock: tokio::sync::Mutex::new(Some(writer_lock)),
            lock_options: connect,
            target,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Backend for PostgresBackend {
    type Tx = Transaction<'static, Postgres>;

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn column_type(&self, declared: &str) -> std::result::Result<ColumnType, String> {
        ColumnType::of_postgres(declared)
    }

    async fn migrate(&self) -> Result<()> {
        migrator().run(&self.pool).await?;
        Ok(())
    }

    async fn migrate_down(&self) -> Result<()> {
        migrator().undo(&self.pool, 0).await?;
        Ok(())
    }

    async fn applied_migrations(&self) -> Result<Vec<i64>> {
        let exists: (bool,) =
            sqlx::query_as("SELECT to_regclass('tidemark_schema_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await?;
        if !exists.0 {
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
        let rel: Option<(String,)> = sqlx::query_as(
            "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1) AND c.relkind = 'r'",
        )
        .bind(name.quoted())
        .fetch_optional(&self.pool)
        .await?;
        if rel.is_none() {
            return Ok(None);
        }
        let cols: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        )
        .bind(name.quoted())
        .fetch_all(&self.pool)
        .await?;
        let pk: Vec<(String,)> = sqlx::query_as(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
             ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY a.attnum",
        )
        .bind(name.quoted())
        .fetch_all(&self.pool)
        .await?;
        let uniques: Vec<(Vec<String>,)> = sqlx::query_as(
            "SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                     FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                     WHERE k.ord <= i.indnkeyatts) \
             FROM pg_index i WHERE i.indrelid = to_regclass($1) AND i.indisunique \
             AND NOT i.indisprimary AND i.indpred IS NULL AND i.indexprs IS NULL \
             ORDER BY i.indexrelid",
        )
        .bind(name.quoted())
        .fetch_all(&self.pool)
        .await?;
        let mut unique_cols: Vec<Vec<String>> = Vec::new();
        for (cols,) in uniques {
            if !unique_cols.contains(&cols) {
                unique_cols.push(cols);
            }
        }
        let fks: Vec<(Vec<String>, Vec<String>, String)> = sqlx::query_as(
            "SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                     FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum), \
                    (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                     FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum), \
                    (SELECT c.relname::text FROM pg_class c WHERE c.oid = con.confrelid) \
             FROM pg_constraint con WHERE con.conrelid = to_regclass($1) AND con.contype = 'f' \
             ORDER BY con.conname",
        )
        .bind(name.quoted())
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(TableShape {
            name: name.clone(),
            columns: cols,
            primary_key: pk.into_iter().map(|p| p.0).collect(),
            uniques: unique_cols,
            foreign_keys: fks
                .into_iter()
                .map(|(columns, parent_columns, parent)| ForeignKey {
                    columns,
                    parent,
                    parent_columns,
                })
                .collect(),
        }))
    }

    async fn register(&self, info: &TableInfo, first_time: bool) -> Result<()> {
        let t = q(&info.table_name);
        let pk = q(&info.primary_key);
        let mut tx = self.begin(TxScope::Rows).await?;
        exec(
            &mut tx,
            format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS node_id CHAR(26)"),
        )
        .await?;
        exec(
            &mut tx,
            format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS hlc_modified BIGINT NOT NULL DEFAULT 0"
            ),
        )
        .await?;
        exec(
            &mut tx,
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {t}(node_id)",
                q(&format!("idx_{}_node", info.table_name))
            ),
        )
        .await?;
        let bad: Option<(Option<String>,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {pk}::text FROM {t} WHERE {pk} IS NULL OR {pk}::text !~ '^[{ULID_FIRST}][{ULID_REST}]{{25}}$' LIMIT 1"
        )))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((value,)) = bad {
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
        let mut ddl = vec![
            capture_function_sql(info),
            // The row trigger earlier versions installed.
            format!("DROP TRIGGER IF EXISTS tidemark_capture ON {t}"),
        ];
        for (name, event, referencing) in CAPTURE_TRIGGERS {
            ddl.push(format!("DROP TRIGGER IF EXISTS {name} ON {t}"));
            ddl.push(format!(
                "CREATE TRIGGER {name} AFTER {event} ON {t} {referencing} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {}()",
                q(&capture_function(info))
            ));
            // Fired in sessions with session_replication_role = replica too
            // (bulk loaders and other replication tools set it): no write to a
            // replicated table goes around capture.
            ddl.push(format!("ALTER TABLE {t} ENABLE ALWAYS TRIGGER {name}"));
        }
        for sql in ddl.into_iter().chain([
            format!("DROP TRIGGER IF EXISTS tidemark_capture_lock ON {t}"),
            format!(
                "CREATE TRIGGER tidemark_capture_lock BEFORE INSERT OR UPDATE OR DELETE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION tidemark_capture_lock()"
            ),
            format!("DROP TRIGGER IF EXISTS tidemark_refuse_truncate ON {t}"),
            format!(
                "CREATE TRIGGER tidemark_refuse_truncate BEFORE TRUNCATE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION tidemark_refuse_truncate()"
            ),
            format!("ALTER TABLE {t} ENABLE ALWAYS TRIGGER tidemark_capture_lock"),
            format!("ALTER TABLE {t} ENABLE ALWAYS TRIGGER tidemark_refuse_truncate"),
        ]) {
            exec(&mut tx, sql).await?;
        }
        let classes: Vec<String> = info.types.iter().map(ToString::to_string).collect();
        sqlx::query(
            "INSERT INTO tidemark_datatypes (datatype_id, table_name, primary_key, columns, column_types, declared_types, conflict_policy) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (table_name) DO UPDATE SET \
             primary_key = excluded.primary_key, columns = excluded.columns, column_types = excluded.column_types, \
             declared_types = excluded.declared_types, conflict_policy = excluded.conflict_policy",
        )
        .bind(info.datatype_id.to_string())
        .bind(&info.table_name)
        .bind(&info.primary_key)
        .bind(Json(&info.columns))
        .bind(Json(&classes))
        .bind(Json(&info.declared))
        .bind(info.conflict_policy.as_str())
        .execute(&mut *tx)
        .await?;
        if first_time {
            exec(
                &mut tx,
                format!(
                    "INSERT INTO tidemark_capture_queue (table_name, record_id, operation, new_values) \
                     SELECT '{}', x.{pk}::text, 'INSERT', row_to_json(r) \
                     FROM {t} AS x, LATERAL (SELECT {}) AS r ORDER BY x.{pk}",
                    info.table_name.replace('\'', "''"),
                    select_list(info, "x"),
                ),
            )
            .await?;
        }
        self.commit(tx).await
    }

    async fn set_policy(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        policy: ConflictPolicy,
    ) -> Result<()> {
        sqlx::query("UPDATE tidemark_datatypes SET conflict_policy = $1 WHERE table_name = $2")
            .bind(policy.as_str())
            .bind(table)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn load_tables(&self) -> Result<Vec<TableInfo>> {
        let rows: Vec<TableRow> = sqlx::query_as(
            "SELECT datatype_id::text AS datatype_id, table_name::text AS table_name, \
             primary_key::text AS primary_key, columns, column_types, declared_types, \
             conflict_policy::text AS conflict_policy \
             FROM tidemark_datatypes ORDER BY table_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TableInfo::try_from).collect()
    }

    async fn begin(&self, scope: TxScope) -> Result<Self::Tx> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('tidemark.applying', 'on', true), set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", self.lock_timeout_ms))
            .execute(&mut *tx)
            .await?;
        // Direct writes take the queue's ROW EXCLUSIVE lock before their first
        // row (`tidemark_capture_lock`): this waits for those in flight to
        // commit and holds back new ones until this transaction ends, so the
        // queue read here is complete and in commit order, and no direct write
        // interleaves with the rows this transaction writes. Bookkeeping
        // touches none of that and lets applications go on.
        if scope == TxScope::Rows {
            sqlx::query("LOCK TABLE tidemark_capture_queue IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        // A deferred constraint fails at the statement that breaks it, inside the
        // savepoint that can set the event aside, not at commit.
        sqlx::query("SET CONSTRAINTS ALL IMMEDIATE")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit().await?;
        Ok(())
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        tx.rollback().await?;
        Ok(())
    }

    async fn take_captures(&self, tx: &mut Self::Tx, limit: u32) -> Result<Vec<Capture>> {
        let rows: Vec<CaptureRow> = sqlx::query_as(
            "SELECT seq, table_name::text AS table_name, record_id, operation::text AS operation, \
             new_values::text AS new_values FROM tidemark_capture_queue ORDER BY seq LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut **tx)
        .await?;
        rows.into_iter().map(Capture::try_from).collect()
    }

    async fn delete_captures(&self, tx: &mut Self::Tx, seqs: &[i64]) -> Result<()> {
        sqlx::query("DELETE FROM tidemark_capture_queue WHERE seq = ANY($1)")
            .bind(seqs)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn set_aside(&self, tx: &mut Self::Tx, rows: &[SetAside]) -> Result<()> {
        for r in rows {
            sqlx::query(
                "INSERT INTO tidemark_unreplicated (seq, table_name, record_id, operation, reason) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
            )
            .bind(r.seq)
            .bind(&r.table_name)
            .bind(crate::model::truncate(&r.record_id))
            .bind(&r.operation)
            .bind(&r.reason)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn list_set_aside(&self, limit: u32) -> Result<Vec<SetAside>> {
        let rows: Vec<(i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, table_name::text, record_id, operation::text, reason, \
             to_char(set_aside_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
             FROM tidemark_unreplicated ORDER BY seq LIMIT $1",
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

    async fn discard_set_aside(&self, seqs: Option<&[i64]>) -> Result<u64> {
        let done = match seqs {
            None => {
                sqlx::query("DELETE FROM tidemark_unreplicated")
                    .execute(&self.pool)
                    .await?
            }
            Some(seqs) => {
                sqlx::query("DELETE FROM tidemark_unreplicated WHERE seq IN (SELECT jsonb_array_elements_text($1::jsonb)::bigint)")
                    .bind(serde_json::to_string(seqs).map_err(|e| StoreError::corrupt("tidemark_unreplicated", e.to_string()))?)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    async fn versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Version>> {
        // One index probe per id, whatever the statistics say. With
        // `record_id = ANY($2)` the planner may scan the whole table's range
        // of the key and filter the ids row by row; it chose that for a few
        // hundred ids once a table grew faster than autovacuum re-analysed
        // it (120 ms per lookup at 150k versions, against 10 ms probing).
        // A LIMIT keeps the lateral subquery from being flattened into a
        // join the planner could turn into the same scan.
        let rows: Vec<VersionRow> = sqlx::query_as(
            "SELECT v.record_id::text AS record_id, v.hlc, v.node_id::text AS node_id, v.event_id::text AS event_id, \
             v.deleted, v.vv, v.frontier \
             FROM unnest($2::bpchar[]) AS k(id) CROSS JOIN LATERAL (SELECT * FROM tidemark_record_versions r \
             WHERE r.table_name = $1 AND r.record_id = k.id LIMIT 1) AS v",
        )
        .bind(table)
        .bind(ids_text(ids))
        .fetch_all(&mut **tx)
        .await?;
        rows.into_iter().map(VersionRow::into_version).collect()
    }

    async fn rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Values>> {
        let sql = format!(
            "SELECT row_to_json(r)::text FROM {t} AS x, LATERAL (SELECT {list}) AS r \
             WHERE x.{pk} = ANY($1::{cast}[])",
            t = q(&table.table_name),
            list = select_list(table, "x"),
            pk = q(&table.primary_key),
            cast = key_cast(table),
        );
        let rows: Vec<(String,)> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(ids_text(ids))
            .fetch_all(&mut **tx)
            .await?;
        decode_rows(table, rows)
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
        // ON CONFLICT cannot touch a row twice in one statement: the last write
        // of an id is the one that counts (the rows share their columns).
        let mut last: HashMap<Ulid, usize> = HashMap::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            last.insert(r.id, i);
        }
        let rows: Vec<&RowWrite> = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| last.get(&r.id) == Some(i))
            .map(|(_, r)| r)
            .collect();
        let cols: Vec<usize> = (0..table.columns.len())
            .filter(|&i| i == 0 || first.values.contains_key(&table.columns[i]))
            .collect();
        let names: Vec<String> = cols.iter().map(|&i| q(&table.columns[i])).collect();
        let mut casts = Vec::with_capacity(cols.len());
        for (n, &i) in cols.iter().enumerate() {
            casts.push(format!("x.a{n}::{}", cast_type(&table.declared[i])?));
        }
        let arrays: Vec<String> = (1..=cols.len()).map(|p| format!("${p}::text[]")).collect();
        let aliases: Vec<String> = (0..cols.len()).map(|n| format!("a{n}")).collect();
        let updates: Vec<String> = cols
            .iter()
            .skip(1)
            .map(|&i| format!("{0} = excluded.{0}", q(&table.columns[i])))
            .chain([
                "node_id = excluded.node_id".to_owned(),
                "hlc_modified = excluded.hlc_modified".to_owned(),
            ])
            .collect();
        let sql = format!(
            "INSERT INTO {t} ({names}, node_id, hlc_modified) \
             SELECT {casts}, x.n, x.h FROM UNNEST({arrays}, ${np}::text[], ${nh}::bigint[]) \
             AS x({aliases}, n, h) ON CONFLICT ({pk}) DO UPDATE SET {updates}",
            t = q(&table.table_name),
            names = names.join(", "),
            casts = casts.join(", "),
            arrays = arrays.join(", "),
            np = cols.len() + 1,
            nh = cols.len() + 2,
            aliases = aliases.join(", "),
            pk = q(&table.primary_key),
            updates = updates.join(", "),
        );
        for chunk in rows.chunks(BULK_CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(sql.clone()));
            for &i in &cols {
                let (col, ty) = (&table.columns[i], table.types[i]);
                let column: Vec<Option<String>> = chunk
                    .iter()
                    .map(|r| {
                        if i == 0 {
                            Some(r.id.to_string())
                        } else {
                            r.values.get(col).and_then(|v| ty.to_pg_text(v))
                        }
                    })
                    .collect();
                query = query.bind(column);
            }
            let nodes: Vec<String> = chunk.iter().map(|r| r.node_id.to_string()).collect();
            let hlcs: Vec<i64> = chunk.iter().map(|r| r.hlc.encode()).collect();
            query.bind(nodes).bind(hlcs).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn delete_rows(&self, tx: &mut Self::Tx, table: &TableInfo, ids: &[Ulid]) -> Result<()> {
        let sql = format!(
            "DELETE FROM {} WHERE {} = ANY($1::{}[])",
            q(&table.table_name),
            q(&table.primary_key),
            key_cast(table)
        );
        for chunk in ids.chunks(BULK_CHUNK) {
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(ids_text(chunk))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    async fn stamp_rows(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        stamps: &[(Ulid, Hlc, Ulid)],
    ) -> Result<()> {
        let sql = format!(
            "UPDATE {t} SET node_id = s.n, hlc_modified = s.h \
             FROM UNNEST($1::text[], $2::bigint[], $3::text[]) AS s(id, h, n) \
             WHERE {t}.{pk} = s.id::{cast}",
            t = q(&table.table_name),
            pk = q(&table.primary_key),
            cast = key_cast(table),
        );
        // Each stamp is a probe of the key index. While a table is young (no
        // ANALYZE yet: a bulk load into a fresh database), the planner took a
        // few hundred stamps against a table it thought small for a hash join
        // over a scan of the whole table, at every drain, and the scans grew
        // with the table (1.7M rows read by 79 stamps of one 200k-row run).
        // Only the stamp's plan is steered: the settings go back after it.
        for setting in [
            "SET LOCAL enable_hashjoin = off",
            "SET LOCAL enable_mergejoin = off",
        ] {
            sqlx::query(setting).execute(&mut **tx).await?;
        }
        for chunk in stamps.chunks(BULK_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|(id, _, _)| id.to_string()).collect();
            let hlcs: Vec<i64> = chunk.iter().map(|(_, h, _)| h.encode()).collect();
            let nodes: Vec<String> = chunk.iter().map(|(_, _, n)| n.to_string()).collect();
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(ids)
                .bind(hlcs)
                .bind(nodes)
                .execute(&mut **tx)
                .await?;
        }
        for setting in ["RESET enable_hashjoin", "RESET enable_mergejoin"] {
            sqlx::query(setting).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn put_versions(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        versions: &[(Ulid, Version)],
    ) -> Result<()> {
        for chunk in versions.chunks(BULK_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|(id, _)| id.to_string()).collect();
            let hlcs: Vec<i64> = chunk.iter().map(|(_, v)| v.hlc.encode()).collect();
            let nodes: Vec<String> = chunk.iter().map(|(_, v)| v.node_id.to_string()).collect();
            let events: Vec<String> = chunk.iter().map(|(_, v)| v.event_id.to_string()).collect();
            let deleted: Vec<bool> = chunk.iter().map(|(_, v)| v.deleted).collect();
            let vvs: Vec<String> = chunk.iter().map(|(_, v)| v.vv.to_json_text()).collect();
            let frontiers: Vec<String> = chunk
                .iter()
                .map(|(_, v)| v.stored_frontier_text())
                .collect();
            sqlx::query(
                "INSERT INTO tidemark_record_versions (table_name, record_id, hlc, node_id, event_id, deleted, vv, frontier) \
                 SELECT $1, r, h, n, e, d, vv::jsonb, f::jsonb \
                 FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[], $6::bool[], $7::text[], $8::text[]) \
                 AS x(r, h, n, e, d, vv, f) \
                 ON CONFLICT (table_name, record_id) DO UPDATE SET \
                 hlc = excluded.hlc, node_id = excluded.node_id, event_id = excluded.event_id, \
                 deleted = excluded.deleted, vv = excluded.vv, frontier = excluded.frontier",
            )
            .bind(table)
            .bind(ids)
            .bind(hlcs)
            .bind(nodes)
            .bind(events)
            .bind(deleted)
            .bind(vvs)
            .bind(frontiers)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn existing_events(&self, tx: &mut Self::Tx, ids: &[Ulid]) -> Result<HashSet<Ulid>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT event_id::text FROM change_events WHERE event_id = ANY($1::bpchar[])",
        )
        .bind(ids_text(ids))
        .fetch_all(&mut **tx)
        .await?;
        rows.into_iter()
            .map(|(id,)| {
                Ulid::from_string(id.trim())
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
        // One statement per chunk: a column array each, UNNEST-ed into rows.
        for chunk in events.chunks(BULK_CHUNK) {
            let mut cols: [Vec<Option<String>>; 10] = Default::default();
            let mut hlcs = Vec::with_capacity(chunk.len());
            let mut walls = Vec::with_capacity(chunk.len());
            let mut synceds = Vec::with_capacity(chunk.len());
            for e in chunk {
                synceds.push(extras.synced(e.event_id));
                let text = extras.text(e).into_owned();
                hlcs.push(e.hlc.encode());
                walls.push(e.wall_ms);
                let row = [
                    Some(e.event_id.to_string()),
                    Some(e.node_id.to_string()),
                    Some(e.table_name.clone()),
                    Some(e.record_id.to_string()),
                    Some(e.operation.as_str().to_owned()),
                    e.action.clone(),
                    e.user_id.map(|u| u.to_string()),
                    e.old_values.as_ref().map(values_text),
                    text.new_values,
                    text.metadata,
                ];
                for (col, v) in cols.iter_mut().zip(row) {
                    col.push(v);
                }
            }
            let [
                ids,
                nodes,
                tables,
                records,
                ops,
                actions,
                users,
                olds,
                news,
                metas,
            ] = cols;
            sqlx::query(
                "INSERT INTO change_events (event_id, hlc_timestamp, wall_timestamp, node_id, table_name, record_id, \
                 operation, action, user_id, old_values, new_values, metadata, synced_at) \
                 SELECT e, h, to_timestamp(w::double precision / 1000.0), n, t, r, o, a, u, ov::jsonb, nv::jsonb, m::jsonb, \
                 CASE WHEN s THEN CURRENT_TIMESTAMP END \
                 FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], \
                 $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bool[]) \
                 AS x(e, h, w, n, t, r, o, a, u, ov, nv, m, s) \
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(ids)
            .bind(hlcs)
            .bind(walls)
            .bind(nodes)
            .bind(tables)
            .bind(records)
            .bind(ops)
            .bind(actions)
            .bind(users)
            .bind(olds)
            .bind(news)
            .bind(metas)
            .bind(synceds)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn raise_vector(&self, tx: &mut Self::Tx, vector: &VersionVector) -> Result<()> {
        for (origin, hlc) in &vector.0 {
            sqlx::query(
                "INSERT INTO tidemark_nodes (node_id, max_hlc) VALUES ($1, $2) \
                 ON CONFLICT (node_id) DO UPDATE SET max_hlc = GREATEST(tidemark_nodes.max_hlc, excluded.max_hlc)",
            )
            .bind(origin.to_string())
            .bind(hlc.encode())
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn raise_sequences(&self, tx: &mut Self::Tx, seqs: &Sequences) -> Result<()> {
        for (origin, seq) in seqs {
            sqlx::query(
                "INSERT INTO tidemark_nodes (node_id, max_seq) VALUES ($1, $2) \
                 ON CONFLICT (node_id) DO UPDATE SET max_seq = GREATEST(tidemark_nodes.max_seq, excluded.max_seq)",
            )
            .bind(origin.to_string())
            .bind(i64::try_from(*seq).unwrap_or(i64::MAX))
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn event_values(
        &self,
        tx: &mut Self::Tx,
        ids: &[Ulid],
    ) -> Result<HashMap<Ulid, Option<Values>>> {
        let rows: Vec<(String, Option<Json<Value>>)> = sqlx::query_as(
            "SELECT event_id::text, new_values FROM change_events WHERE event_id = ANY($1::bpchar[])",
        )
        .bind(ids_text(ids))
        .fetch_all(&mut **tx)
        .await?;
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
        let mut conds = Vec::with_capacity(columns.len() + 1);
        for (n, &i) in columns.iter().enumerate() {
            conds.push(format!(
                "x.{} = ${}::{}",
                q(&table.columns[i]),
                n + 1,
                cast_type(&table.declared[i])?
            ));
        }
        if except.is_some() {
            conds.push(format!(
                "x.{} <> ${}::{}",
                q(&table.primary_key),
                columns.len() + 1,
                key_cast(table)
            ));
        }
        let sql = format!(
            "SELECT x.{}::text FROM {} AS x WHERE {}",
            q(&table.primary_key),
            q(&table.table_name),
            conds.join(" AND ")
        );
        let mut query = sqlx::query_as::<_, (String,)>(AssertSqlSafe(sql));
        for (&i, v) in columns.iter().zip(values) {
            query = query.bind(table.types[i].to_pg_text(v));
        }
        if let Some(e) = except {
            query = query.bind(e.to_string());
        }
        query
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .map(|(id,)| {
                Ulid::from_string(id.trim())
                    .map_err(|e| StoreError::corrupt(&table.table_name, e.to_string()))
            })
            .collect()
    }

    async fn put_blocked(&self, tx: &mut Self::Tx, b: &Blocked) -> Result<()> {
        sqlx::query(
            "INSERT INTO tidemark_blocked (table_name, record_id, event_id, kind, reason, blocker_table, blocker_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (table_name, record_id) DO UPDATE SET \
             event_id = excluded.event_id, kind = excluded.kind, reason = excluded.reason, \
             blocker_table = excluded.blocker_table, blocker_id = excluded.blocker_id",
        )
        .bind(&b.table_name)
        .bind(b.record_id.to_string())
        .bind(b.event_id.to_string())
        .bind(b.kind.as_str())
        .bind(&b.reason)
        .bind(b.blocker_table.as_deref())
        .bind(b.blocker_id.map(|i| i.to_string()))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn remove_blocked(&self, tx: &mut Self::Tx, table: &str, id: Ulid) -> Result<()> {
        sqlx::query(
            "DELETE FROM tidemark_blocked WHERE table_name = $1 AND record_id = $2::bpchar",
        )
        .bind(table)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn blocked(&self, tx: &mut Self::Tx, table: &str, id: Ulid) -> Result<Option<Blocked>> {
        let row: Option<BlockedRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {PG_BLOCKED} FROM tidemark_blocked WHERE table_name = $1 AND record_id = $2::bpchar"
        )))
        .bind(table)
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        row.map(Blocked::try_from).transpose()
    }

    async fn blocked_by_any(
        &self,
        tx: &mut Self::Tx,
        blockers: &[(String, Ulid)],
    ) -> Result<Vec<Blocked>> {
        let tables: Vec<String> = blockers.iter().map(|(t, _)| t.clone()).collect();
        let ids: Vec<String> = blockers.iter().map(|(_, id)| id.to_string()).collect();
        let rows: Vec<BlockedRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {PG_BLOCKED} FROM tidemark_blocked WHERE \
             (blocker_table::text, blocker_id::text) IN (SELECT * FROM UNNEST($1::text[], $2::text[])) \
             OR (blocker_id IS NULL AND blocker_table::text = ANY($1::text[]))"
        )))
        .bind(tables)
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
        rows.into_iter().map(Blocked::try_from).collect()
    }

    async fn has_blocked(&self, tx: &mut Self::Tx) -> Result<bool> {
        let (b,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM tidemark_blocked)")
            .fetch_one(&mut **tx)
            .await?;
        Ok(b)
    }

    async fn list_blocked(
        &self,
        after: Option<(String, Ulid)>,
        limit: u32,
    ) -> Result<Vec<Blocked>> {
        let (t, r) = after.map_or((String::new(), String::new()), |(t, r)| (t, r.to_string()));
        let rows: Vec<BlockedRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {PG_BLOCKED} FROM tidemark_blocked \
             WHERE (table_name::text, record_id::text) > ($1, $2) ORDER BY table_name, record_id LIMIT $3"
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
        sqlx::query(
            "DELETE FROM tidemark_conflicts WHERE conflict_id = $1::bpchar AND kind <> 'version'",
        )
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn delete_version_conflict(&self, tx: &mut Self::Tx, id: Ulid) -> Result<()> {
        sqlx::query(
            "DELETE FROM tidemark_conflicts WHERE conflict_id = $1::bpchar AND kind = 'version'",
        )
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn put_conflicts(&self, tx: &mut Self::Tx, conflicts: &[Conflict]) -> Result<()> {
        for c in conflicts {
            sqlx::query(
                "INSERT INTO tidemark_conflicts (conflict_id, table_name, record_id, policy, status, \
                 winner_event_id, winner_hlc, winner_node_id, winner_values, \
                 loser_event_id, loser_hlc, loser_node_id, loser_values, detected_at, resolved_at, \
                 resolved_by, resolution, resolution_note, resolution_event_id, \
                 kind, detail, winner_table, winner_record_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::timestamptz, \
                 $15::timestamptz, $16, $17, $18, $19, $20, $21, $22, $23) \
                 ON CONFLICT (conflict_id) DO UPDATE SET table_name = excluded.table_name, \
                 record_id = excluded.record_id, policy = excluded.policy, status = excluded.status, \
                 winner_event_id = excluded.winner_event_id, winner_hlc = excluded.winner_hlc, \
                 winner_node_id = excluded.winner_node_id, winner_values = excluded.winner_values, \
                 loser_event_id = excluded.loser_event_id, loser_hlc = excluded.loser_hlc, \
                 loser_node_id = excluded.loser_node_id, loser_values = excluded.loser_values, \
                 detected_at = excluded.detected_at, resolved_at = excluded.resolved_at, \
                 resolved_by = excluded.resolved_by, resolution = excluded.resolution, \
                 resolution_note = excluded.resolution_note, resolution_event_id = excluded.resolution_event_id, \
                 kind = excluded.kind, detail = excluded.detail, winner_table = excluded.winner_table, \
                 winner_record_id = excluded.winner_record_id",
            )
            .bind(c.conflict_id.to_string())
            .bind(&c.table_name)
            .bind(c.record_id.to_string())
            .bind(c.policy.as_str())
            .bind(c.status.as_str())
            .bind(c.winner.event_id.to_string())
            .bind(c.winner.hlc.encode())
            .bind(c.winner.node_id.to_string())
            .bind(c.winner.values.as_ref().map(Json))
            .bind(c.loser.event_id.to_string())
            .bind(c.loser.hlc.encode())
            .bind(c.loser.node_id.to_string())
            .bind(c.loser.values.as_ref().map(Json))
            .bind(&c.detected_at)
            .bind(c.resolved_at.as_deref())
            .bind(c.resolved_by.as_deref())
            .bind(c.resolution.as_deref())
            .bind(c.resolution_note.as_deref())
            .bind(c.resolution_event_id.map(|i| i.to_string()))
            .bind(c.kind.as_str())
            .bind(c.detail.as_deref())
            .bind(c.winner_table.as_deref())
            .bind(c.winner_record_id.map(|i| i.to_string()))
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn record_conflicts(
        &self,
        tx: &mut Self::Tx,
        table: &str,
        id: Ulid,
    ) -> Result<Vec<Conflict>> {
        let rows: Vec<ConflictRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CONFLICT_COLUMNS}, {PG_CONFLICT_TIMES} FROM tidemark_conflicts \
             WHERE table_name = $1 AND record_id = $2::bpchar"
        )))
        .bind(table)
        .bind(id.to_string())
        .fetch_all(&mut **tx)
        .await?;
        rows.into_iter().map(Conflict::try_from).collect()
    }

    async fn table_conflicts(&self, tx: &mut Self::Tx, table: &str) -> Result<Vec<Conflict>> {
        let rows: Vec<ConflictRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CONFLICT_COLUMNS}, {PG_CONFLICT_TIMES} FROM tidemark_conflicts WHERE table_name = $1"
        )))
        .bind(table)
        .fetch_all(&mut **tx)
        .await?;
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
            sqlx::query(
                "INSERT INTO tidemark_quarantine (quarantine_id, event_id, peer_id, code, reason, event) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(ids.generate().unwrap_or_else(|_| Ulid::generate()).to_string())
            .bind(crate::model::truncate(&r.event_id))
            .bind(peer.map(|p| p.to_string()))
            .bind(r.kind.code())
            .bind(&r.reason)
            .bind(Json(&r.event))
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn savepoint(&self, tx: &mut Self::Tx, op: crate::backend::SavepointOp) -> Result<()> {
        sqlx::query(op.sql()).execute(&mut **tx).await?;
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
            "SELECT event_id, peer_id, code, reason, event::text, \
             to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
             FROM tidemark_quarantine ORDER BY quarantine_id LIMIT $1",
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
            Some(ids) => {
                sqlx::query("DELETE FROM tidemark_quarantine WHERE event_id = ANY($1)")
                    .bind(ids.to_vec())
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    async fn expire_quarantined(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM tidemark_quarantine WHERE received_at < to_timestamp($1 / 1000.0)",
        )
        .bind(before_ms as f64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn conflict(&self, id: Ulid) -> Result<Option<Conflict>> {
        let row: Option<ConflictRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CONFLICT_COLUMNS}, {PG_CONFLICT_TIMES} FROM tidemark_conflicts WHERE conflict_id = $1::bpchar"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Conflict::try_from).transpose()
    }

    async fn conflict_in(&self, tx: &mut Self::Tx, id: Ulid) -> Result<Option<Conflict>> {
        let row: Option<ConflictRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CONFLICT_COLUMNS}, {PG_CONFLICT_TIMES} FROM tidemark_conflicts WHERE conflict_id = $1::bpchar"
        )))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        row.map(Conflict::try_from).transpose()
    }

    async fn list_conflicts(&self, filter: &ConflictFilter) -> Result<Vec<Conflict>> {
        let rows: Vec<ConflictRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CONFLICT_COLUMNS}, {PG_CONFLICT_TIMES} FROM tidemark_conflicts \
             WHERE ($1::text IS NULL OR table_name = $1) AND ($2::text IS NULL OR status = $2) \
             AND ($3::text IS NULL OR conflict_id > $3::bpchar) ORDER BY conflict_id LIMIT $4"
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
            "SELECT table_name::text, COUNT(*) FROM tidemark_conflicts WHERE status = 'open' GROUP BY table_name",
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
            "SELECT row_to_json(r)::text FROM {t} AS x, LATERAL (SELECT {list}) AS r \
             WHERE x.{pk} = $1::{cast}",
            t = q(&table.table_name),
            list = select_list(table, "x"),
            pk = q(&table.primary_key),
            cast = key_cast(table),
        );
        let rows: Vec<(String,)> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
        Ok(decode_rows(table, rows)?.remove(&id))
    }

    async fn get_version(&self, table: &str, id: Ulid) -> Result<Option<Version>> {
        let row: Option<VersionRow> = sqlx::query_as(
            "SELECT record_id::text AS record_id, hlc, node_id::text AS node_id, event_id::text AS event_id, deleted, vv, frontier \
             FROM tidemark_record_versions WHERE table_name = $1 AND record_id = $2::bpchar",
        )
        .bind(table)
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.into_version().map(|(_, v)| v)).transpose()
    }

    async fn vector(&self) -> Result<VersionVector> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT node_id::text, max_hlc FROM tidemark_nodes WHERE max_hlc > 0")
                .fetch_all(&self.pool)
                .await?;
        vector_from_rows(rows, "tidemark_nodes")
    }

    async fn sequences(&self) -> Result<Sequences> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT node_id::text, max_seq FROM tidemark_nodes WHERE max_seq > 0")
                .fetch_all(&self.pool)
                .await?;
        sequences_from_rows(rows)
    }

    async fn max_hlc(&self) -> Result<Hlc> {
        let (raw,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(hlc_timestamp), 0)::bigint FROM change_events")
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
        // An origin's HLCs are unique in the log (each origin stamps strictly
        // increasing, and apply holds an origin whose events are not), so the
        // (node_id, hlc_timestamp) index gives the order and the page ends.
        let sql = format!(
            "SELECT {PG_EVENT_COLUMNS}, {WALL_MS} FROM change_events \
             WHERE node_id = $1::bpchar AND hlc_timestamp > $2 ORDER BY hlc_timestamp LIMIT $3"
        );
        let mut tx = self.index_order_read().await?;
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(origin.to_string())
            .bind(after.encode())
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.into_iter().map(LoggedEvent::try_from).collect()
    }

    async fn first_of_origin_after(&self, origin: Ulid, after: Hlc) -> Result<Option<FirstEvent>> {
        let mut tx = self.index_order_read().await?;
        let first: Option<(i64, Option<i64>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {WALL_MS}, CASE WHEN jsonb_typeof(metadata -> 'seq') = 'number' \
             THEN trunc((metadata ->> 'seq')::numeric)::bigint END \
             FROM change_events WHERE node_id = $1::bpchar AND hlc_timestamp > $2 \
             ORDER BY hlc_timestamp LIMIT 1"
        )))
        .bind(origin.to_string())
        .bind(after.encode())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(first.map(|(wall_ms, seq)| FirstEvent {
            wall_ms,
            seq: seq.and_then(|s| u64::try_from(s).ok()),
        }))
    }

    async fn count_of_origin_after(&self, origin: Ulid, after: Hlc) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM change_events WHERE node_id = $1::bpchar AND hlc_timestamp > $2",
        )
        .bind(origin.to_string())
        .bind(after.encode())
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    async fn record_events(&self, table: &str, id: Ulid) -> Result<Vec<ChangeEvent>> {
        let sql = record_events_sql();
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
        let sql = record_events_sql();
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(table)
            .bind(id.to_string())
            .fetch_all(&mut **tx)
            .await?;
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
            sqlx::query(
                "INSERT INTO tidemark_peer_progress (peer_id, origin_id, acked_hlc) VALUES ($1, $2, $3) \
                 ON CONFLICT (peer_id, origin_id) DO UPDATE SET \
                 acked_hlc = GREATEST(tidemark_peer_progress.acked_hlc, excluded.acked_hlc), updated_at = CURRENT_TIMESTAMP",
            )
            .bind(peer.to_string())
            .bind(origin.to_string())
            .bind(hlc.encode())
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn peer_progress(&self, peer: Ulid) -> Result<VersionVector> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT origin_id::text, acked_hlc FROM tidemark_peer_progress WHERE peer_id = $1::bpchar",
        )
        .bind(peer.to_string())
        .fetch_all(&self.pool)
        .await?;
        vector_from_rows(rows, "tidemark_peer_progress")
    }

    async fn forget_peers(&self, tx: &mut Self::Tx, keep: &[Ulid]) -> Result<u64> {
        let keep: Vec<String> = keep.iter().map(Ulid::to_string).collect();
        let gone: Vec<(String,)> = sqlx::query_as(
            "DELETE FROM tidemark_peer_progress WHERE NOT (peer_id = ANY($1::bpchar[])) \
             RETURNING peer_id::text",
        )
        .bind(&keep)
        .fetch_all(&mut **tx)
        .await?;
        let peers: HashSet<String> = gone.into_iter().map(|g| g.0).collect();
        Ok(peers.len() as u64)
    }

    async fn mark_synced(&self, tx: &mut Self::Tx, origin: Ulid, upto: Hlc) -> Result<u64> {
        let res = sqlx::query(
            "UPDATE change_events SET synced_at = CURRENT_TIMESTAMP \
             WHERE synced_at IS NULL AND node_id = $1::bpchar AND hlc_timestamp <= $2",
        )
        .bind(origin.to_string())
        .bind(upto.encode())
        .execute(&mut **tx)
        .await?;
        Ok(res.rows_affected())
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
            Some(t) => (t.before.encode(), t.acked.to_json()),
            None => (0, serde_json::json!({})),
        };
        let tombstone_goes = tombstone_goes_sql(
            "$4",
            "coalesce(($5::jsonb ->> e.node_id::text)::bigint, 0)",
            "jsonb_array_length(v.frontier)",
        );
        let rows: Vec<(String, String, i64, bool, String, String, bool)> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT e.event_id::text, e.node_id::text, e.hlc_timestamp, \
                   e.hlc_timestamp < (SELECT n.max_hlc FROM tidemark_nodes n WHERE n.node_id = e.node_id) \
                   AND NOT EXISTS (SELECT 1 FROM tidemark_record_versions v \
                     WHERE v.table_name = e.table_name AND v.record_id = e.record_id \
                     AND (v.event_id = e.event_id OR strpos(v.frontier::text, e.event_id::text) > 0)) \
                   AND NOT EXISTS (SELECT 1 FROM tidemark_blocked b WHERE b.event_id = e.event_id), \
                   e.table_name::text, e.record_id::text, {tombstone_goes} \
                 FROM change_events e \
                 WHERE e.hlc_timestamp > $1 AND e.hlc_timestamp < $2 AND e.synced_at IS NOT NULL \
                 ORDER BY e.hlc_timestamp LIMIT $3"
            )))
            .bind(after.encode())
            .bind(before.encode())
            .bind(i64::from(limit))
            .bind(tomb_before)
            .bind(&peers)
            .fetch_all(&mut **tx)
            .await?;
        let mut done = Compacted {
            scanned: rows.len() as u64,
            ..Compacted::default()
        };
        let mut gone: Vec<String> = Vec::new();
        let (mut tables, mut records) = (Vec::new(), Vec::new());
        let mut forgotten: Vec<usize> = Vec::new();
        let mut upto: HashMap<String, i64> = HashMap::new();
        for (event_id, origin, hlc, superseded, table, record, tombstone) in rows {
            done.last = Some(decode_hlc("change_events", hlc)?);
            if superseded || tombstone {
                if tombstone {
                    forgotten.push(gone.len());
                }
                gone.push(event_id);
                tables.push(table);
                records.push(record);
                let top = upto.entry(origin).or_insert(hlc);
                *top = (*top).max(hlc);
            }
        }
        if !gone.is_empty() {
            done.deleted =
                sqlx::query("DELETE FROM change_events WHERE event_id = ANY($1::bpchar[])")
                    .bind(&gone)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
            done.conflicts = sqlx::query(
                "DELETE FROM tidemark_conflicts c \
                 USING UNNEST($1::text[], $2::bpchar[], $3::bpchar[]) AS g(t, r, e) \
                 WHERE c.table_name = g.t AND c.record_id = g.r AND c.status = 'resolved' \
                 AND (c.loser_event_id = g.e OR c.winner_event_id = g.e)",
            )
            .bind(&tables)
            .bind(&records)
            .bind(&gone)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        }
        if !forgotten.is_empty() {
            let pick =
                |v: &[String]| -> Vec<String> { forgotten.iter().map(|&i| v[i].clone()).collect() };
            done.tombstones = sqlx::query(
                "DELETE FROM tidemark_record_versions v \
                 USING UNNEST($1::text[], $2::bpchar[], $3::bpchar[]) AS g(t, r, e) \
                 WHERE v.table_name = g.t AND v.record_id = g.r AND v.event_id = g.e",
            )
            .bind(pick(&tables))
            .bind(pick(&records))
            .bind(pick(&gone))
            .execute(&mut **tx)
            .await?
            .rows_affected();
        }
        for (origin, hlc) in upto {
            sqlx::query(
                "UPDATE tidemark_nodes SET compacted_hlc = GREATEST(compacted_hlc, $2) WHERE node_id = $1::bpchar",
            )
            .bind(origin)
            .bind(hlc)
            .execute(&mut **tx)
            .await?;
        }
        Ok(done)
    }

    async fn compacted_upto(&self, origin: Ulid) -> Result<Hlc> {
        let raw: Option<(i64,)> =
            sqlx::query_as("SELECT compacted_hlc FROM tidemark_nodes WHERE node_id = $1::bpchar")
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
        const NEEDED: [&str; 5] = OUR_TRIGGERS;
        let mut problems = Vec::new();
        for info in tables {
            let found: Vec<(String, String)> = sqlx::query_as(
                "SELECT tgname::text, tgenabled::text FROM pg_trigger \
                 WHERE tgrelid = to_regclass(quote_ident($1)) AND tgname = ANY($2)",
            )
            .bind(&info.table_name)
            .bind(NEEDED.map(str::to_owned).to_vec())
            .fetch_all(&self.pool)
            .await?;
            for name in NEEDED {
                let t = &info.table_name;
                match found
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, e)| e.chars().next().unwrap_or('?'))
                {
                    None => problems.push(format!(
                        "table {t}: capture trigger {name} is missing, so direct writes go uncaptured; restart the daemon to recreate it"
                    )),
                    Some('A') => {}
                    Some(state) => problems.push(format!(
                        "table {t}: capture trigger {name} is {} (pg_trigger.tgenabled = {state:?}), so some direct writes go uncaptured; run ALTER TABLE {t} ENABLE ALWAYS TRIGGER {name}",
                        if state == 'D' { "disabled" } else { "not enabled ALWAYS" }
                    )),
                }
            }
        }
        Ok(problems)
    }

    async fn application_triggers(
        &self,
        tables: &[std::sync::Arc<TableInfo>],
    ) -> Result<Vec<(String, String)>> {
        const OURS: [&str; 5] = OUR_TRIGGERS;
        let names: Vec<String> = tables.iter().map(|t| t.table_name.clone()).collect();
        // Internal triggers (those behind foreign keys) are the database's own.
        let found: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, t.tgname::text FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid \
             WHERE NOT t.tgisinternal AND t.tgrelid = ANY (SELECT to_regclass(quote_ident(n)) FROM unnest($1::text[]) AS n) \
             AND NOT (t.tgname = ANY($2)) ORDER BY 1, 2",
        )
        .bind(names)
        .bind(OURS.map(str::to_owned).to_vec())
        .fetch_all(&self.pool)
        .await?;
        Ok(found)
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
        use sqlx::Connection;
        let mut held = self.writer_lock.lock().await;
        if let Some(conn) = held.as_mut()
            && conn.ping().await.is_ok()
        {
            return Ok(());
        }
        // The session (and the lock with it) is gone: take it again, unless
        // another daemon took it meanwhile.
        match take_writer_lock(&self.lock_options, &self.target).await {
            Ok(conn) => {
                *held = Some(conn);
                tracing::warn!(target = %self.target, "the writer lock's session broke; lock taken again");
                Ok(())
            }
            Err(e) => {
                *held = None;
                Err(StoreError::LockLost {
                    target: self.target.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }

    async fn close(&self) {
        self.pool.close().await;
        if let Some(mut conn) = self.writer_lock.lock().await.take() {
            use sqlx::Connection;
            // Released before the session ends: the server drops a closed
            // session's locks a moment after the client has gone, and a
            // daemon restarting at once would find the lock still held.
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(WRITER_LOCK_KEY)
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }

    async fn row_ids(
        &self,
        tx: &mut Self::Tx,
        table: &TableInfo,
        from: Option<Ulid>,
        to: Option<Ulid>,
        limit: u32,
    ) -> Result<Vec<Ulid>> {
        let (pk, cast) = (q(&table.primary_key), key_cast(table));
        let mut conds = Vec::new();
        if from.is_some() {
            conds.push(format!("x.{pk} >= ${}::{cast}", conds.len() + 1));
        }
        if to.is_some() {
            conds.push(format!("x.{pk} < ${}::{cast}", conds.len() + 1));
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "SELECT x.{pk}::text FROM {} AS x{filter} ORDER BY x.{pk} LIMIT ${}",
            q(&table.table_name),
            conds.len() + 1
        );
        let mut query = sqlx::query_as::<_, (String,)>(AssertSqlSafe(sql));
        for bound in [from, to].into_iter().flatten() {
            query = query.bind(bound.to_string());
        }
        query
            .bind(i64::from(limit))
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .map(|(id,)| {
                Ulid::from_string(id.trim_end())
                    .map_err(|e| StoreError::corrupt(&table.table_name, e.to_string()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(
            redact("postgres://app@db/app?sslmode=require&password=s3cret"),
            "postgres://app@db/app?sslmode=require&password=***"
        );
        assert_eq!(
            redact("postgresql://u:p@h/d?PASSWORD=x&application_name=t"),
            "postgresql://u:***@h/d?PASSWORD=***&application_name=t"
        );
        assert_eq!(redact("postgres://h/d"), "postgres://h/d");
    }
}
