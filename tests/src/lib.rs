//! Test support for Tidemark's black-box tests: databases on both backends (a
//! throwaway PostgreSQL cluster, SQLite files in temp dirs) and their real command
//! line clients (`psql`, `sqlite3`); whole daemons ([`daemon`]), a fault-injecting
//! proxy for the links between them ([`proxy`]), and the checks every fault
//! scenario ends with ([`check`]).

pub mod backlog;
pub mod check;
pub mod daemon;
pub mod pg;
pub mod proxy;

use std::path::PathBuf;

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

    pub fn kind(&self) -> &'static str {
        match self {
            TestDb::Sqlite { .. } => "sqlite",
            TestDb::Postgres { .. } => "postgres",
        }
    }

    /// The store URL of this database.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
            TestDb::Postgres { url } => url.clone(),
        }
    }

    /// Runs SQL through the backend's real command-line client, as an application
    /// or an operator would.
    pub fn client(&self, sql: &str) -> Result<String, String> {
        match self {
            TestDb::Sqlite { path, .. } => sqlite3(path, sql),
            TestDb::Postgres { url } => psql(url, sql),
        }
    }

    /// Like [`TestDb::client`], panicking with the client's message on error.
    pub fn sql(&self, sql: &str) -> String {
        self.client(sql)
            .unwrap_or_else(|e| panic!("{} client failed on {sql:?}: {e}", self.kind()))
    }

    /// The SQL type of a ULID key column on this backend.
    pub fn ulid_type(&self) -> &'static str {
        match self {
            TestDb::Sqlite { .. } => "TEXT",
            TestDb::Postgres { .. } => "CHAR(26)",
        }
    }
}
