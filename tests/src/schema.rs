//! The schema of the constraint tests (`tests/tests/constraints.rs`) on every
//! backend: `users` (a UNIQUE `email`, a CHECK on `age`) and the tables that
//! reference it, `orders` (ON DELETE CASCADE), `payments` (ON DELETE RESTRICT)
//! and, on PostgreSQL only, `invoices` (a DEFERRABLE INITIALLY DEFERRED key).

use std::sync::Arc;

use serde_json::{Value, json};
use tidemark_hlc::{Clock, WallClock};
use tidemark_store::memory::Column;
use tidemark_store::{ConflictPolicy, MemoryBackend, Store, Values};
use ulid::Ulid;

use crate::TestDb;
use crate::daemon::Table;
use crate::typed::Class;

/// The tables whose `user_id` references `users(id)` on this backend.
pub fn child_tables(db: &TestDb) -> &'static [&'static str] {
    match db {
        TestDb::Postgres { .. } => &["orders", "payments", "invoices"],
        _ => &["orders", "payments"],
    }
}

/// Creates the tables: by DDL through the SQL client, declared in memory.
async fn create(db: &TestDb) {
    match db.memory_db() {
        Some(memory) => declare(db, memory).await,
        None => {
            db.sql(&users_ddl(db));
            for table in child_tables(db) {
                db.sql(&child_ddl(db, table));
            }
        }
    }
}

/// `CREATE TABLE users` on a SQL backend.
pub fn users_ddl(db: &TestDb) -> String {
    let (key, int) = (db.ulid_type(), db.int_type());
    format!(
        "CREATE TABLE users (id {key} PRIMARY KEY, email TEXT UNIQUE, name TEXT, \
         age {int} CHECK (age IS NULL OR age BETWEEN 0 AND 200))"
    )
}

/// `CREATE TABLE` of one of the [`child_tables`] on a SQL backend.
pub fn child_ddl(db: &TestDb, table: &str) -> String {
    child_table_ddl(db, table, db.ulid_type())
}

/// Like [`child_ddl`] with `user_id` declared `CHAR(26)` on every backend, for
/// clusters mixing SQLite and PostgreSQL: nodes must agree on each column's
/// class, and SQLite's TEXT is class `text` where PostgreSQL's CHAR(26) is
/// `char(26)` (primary keys excepted: both hold ULIDs).
pub fn mixed_child_ddl(db: &TestDb, table: &str) -> String {
    child_table_ddl(db, table, "CHAR(26)")
}

fn child_table_ddl(db: &TestDb, table: &str, reference: &str) -> String {
    let (key, int) = (db.ulid_type(), db.int_type());
    let on_delete = match table {
        "orders" => "ON DELETE CASCADE",
        "payments" => "ON DELETE RESTRICT",
        "invoices" => "DEFERRABLE INITIALLY DEFERRED",
        other => panic!("{other} is not a child table of the schema"),
    };
    format!(
        "CREATE TABLE {table} (id {key} PRIMARY KEY, \
         user_id {reference} REFERENCES users(id) {on_delete}, amount {int})"
    )
}

/// The same tables on the in-memory backend.
async fn declare(db: &TestDb, memory: &MemoryBackend) {
    memory
        .create_table(
            "users",
            vec![
                Column::new("id", "TEXT").primary_key(),
                Column::new("email", "TEXT").unique(),
                Column::new("name", "TEXT"),
                Column::new("age", "INTEGER").check_range(0.0, 200.0),
            ],
        )
        .await
        .expect("create users");
    for table in child_tables(db) {
        memory
            .create_table(
                table,
                vec![
                    Column::new("id", "TEXT").primary_key(),
                    Column::new("user_id", "TEXT").references("users", "id"),
                    Column::new("amount", "INTEGER"),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("create {table}: {e}"));
    }
}

/// Creates the tables on `db`, opens a store of a new node on it and registers
/// them, parents first, with `policy`.
pub async fn open(db: &TestDb, policy: ConflictPolicy) -> Store {
    create(db).await;
    let clock = Clock::new(Ulid::generate(), 5_000, WallClock::System).expect("clock");
    let store = db.open(Arc::new(clock)).await.expect("open store");
    for table in std::iter::once(&"users").chain(child_tables(db)) {
        store
            .register_table(table, policy)
            .await
            .unwrap_or_else(|e| panic!("register {table} on {}: {e}", db.kind()));
    }
    store
}

/// A whole `users` row.
pub fn user_row(id: Ulid, email: Option<&str>, name: &str, age: i64) -> Values {
    row(json!({"id": id.to_string(), "email": email, "name": name, "age": age}))
}

/// A whole row of a table referencing `users`.
pub fn child_row(id: Ulid, user: Ulid, amount: i64) -> Values {
    row(json!({"id": id.to_string(), "user_id": user.to_string(), "amount": amount}))
}

fn row(v: Value) -> Values {
    v.as_object().cloned().expect("a row is a JSON object")
}

/// One column of each class, declared as each backend declares it (the SQLite
/// TEXT column `d` holds exact decimals through its type override).
pub const READINGS: Table = Table {
    name: "readings",
    ddl: |db| match db {
        TestDb::Postgres { .. } => "CREATE TABLE readings (id CHAR(26) PRIMARY KEY, i BIGINT, \
            s SMALLINT, f DOUBLE PRECISION, d NUMERIC, t TEXT, b BOOLEAN, dt DATE, \
            ts TIMESTAMPTZ, u UUID, j JSONB, bl BYTEA)"
            .into(),
        _ => "CREATE TABLE readings (id TEXT PRIMARY KEY, i INTEGER, s SMALLINT, f REAL, \
            d TEXT, t TEXT, b BOOLEAN, dt DATE, ts TIMESTAMP, u UUID, j JSON, bl BLOB)"
            .into(),
    },
    policy: "lww",
    sqlite_types: r#"{ d = "decimal" }"#,
};

pub const READING_COLUMNS: &[(&str, Class)] = &[
    ("i", Class::Int),
    ("s", Class::Int),
    ("f", Class::Float),
    ("d", Class::Decimal),
    ("t", Class::Text),
    ("b", Class::Bool),
    ("dt", Class::Date),
    ("ts", Class::Timestamptz),
    ("u", Class::Uuid),
    ("j", Class::Json),
    ("bl", Class::Bytes),
];
