//! Test support for Tidemark's black-box tests: databases on every backend (a
//! throwaway PostgreSQL cluster, SQLite files in temp dirs, the in-memory backend)
//! and the SQL backends' real command line clients (`psql`, `sqlite3`); whole
//! daemons ([`daemon`]), a fault-injecting proxy for the links between them
//! ([`proxy`]), the checks every fault scenario ends with ([`check`]), the
//! schema of the constraint tests ([`schema`]), and typed reads of any table on
//! either backend ([`typed`]).

pub mod backlog;
pub mod check;
pub mod daemon;
pub mod pg;
pub mod proxy;
pub mod schema;
pub mod typed;

use std::path::PathBuf;
use std::sync::Arc;

use tidemark_hlc::Clock;
use tidemark_store::{MemoryBackend, Store, StoreUrl};

pub use pg::{PgCluster, psql, sqlite3};

/// A fresh, empty database on one backend.
#[derive(Debug)]
pub enum TestDb {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        url: String,
    },
    /// The in-memory backend: no SQL, tables declared programmatically.
    Memory {
        db: MemoryBackend,
    },
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("node.db");
        TestDb::Sqlite { _dir: dir, path }
    }

    pub fn postgres() -> TestDb {
        TestDb::Postgres {
            url: PgCluster::shared().create_database(),
        }
    }

    pub fn memory() -> TestDb {
        TestDb::Memory {
            db: MemoryBackend::new(),
        }
    }

    /// Another fresh database of the same kind.
    pub fn another(&self) -> TestDb {
        match self {
            TestDb::Sqlite { .. } => TestDb::sqlite(),
            TestDb::Postgres { .. } => TestDb::postgres(),
            TestDb::Memory { .. } => TestDb::memory(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TestDb::Sqlite { .. } => "sqlite",
            TestDb::Postgres { .. } => "postgres",
            TestDb::Memory { .. } => "memory",
        }
    }

    /// The in-memory database, for the memory kind.
    pub fn memory_db(&self) -> Option<&MemoryBackend> {
        match self {
            TestDb::Memory { db } => Some(db),
            _ => None,
        }
    }

    /// The store URL of this database. Panics for the memory kind, which has none
    /// (use [`TestDb::open`]).
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
            TestDb::Postgres { url } => url.clone(),
            TestDb::Memory { .. } => panic!("the memory backend has no URL"),
        }
    }

    /// Opens a store on this database (again after a close: a restart).
    pub async fn open(&self, clock: Arc<Clock>) -> tidemark_store::Result<Store> {
        match self {
            TestDb::Memory { db } => Store::open_memory(db.clone(), clock, None).await,
            _ => {
                let url: StoreUrl = self.url().parse()?;
                Store::open(&url, clock).await
            }
        }
    }

    /// Runs SQL through the backend's real command-line client, as an application
    /// or an operator would.
    pub fn client(&self, sql: &str) -> Result<String, String> {
        match self {
            TestDb::Sqlite { path, .. } => sqlite3(path, sql),
            TestDb::Postgres { url } => psql(url, sql),
            TestDb::Memory { .. } => Err(format!(
                "the memory backend has no SQL client (asked to run {sql:?})"
            )),
        }
    }

    /// Like [`TestDb::client`], panicking with the client's message on error.
    pub fn sql(&self, sql: &str) -> String {
        self.client(sql)
            .unwrap_or_else(|e| panic!("{} client failed on {sql:?}: {e}", self.kind()))
    }

    /// The SQL type of a 64-bit integer column on this backend (SQLite's INTEGER
    /// is 64 bits; PostgreSQL's `integer` is 32, and the two are different classes).
    pub fn int_type(&self) -> &'static str {
        match self {
            TestDb::Sqlite { .. } | TestDb::Memory { .. } => "INTEGER",
            TestDb::Postgres { .. } => "BIGINT",
        }
    }

    /// The SQL type of a ULID key column on this backend.
    pub fn ulid_type(&self) -> &'static str {
        match self {
            TestDb::Sqlite { .. } | TestDb::Memory { .. } => "TEXT",
            TestDb::Postgres { .. } => "CHAR(26)",
        }
    }
}
