//! The PostgreSQL cluster of a test process (a [`PgServer`], see
//! `tidemark::pgserver`), stopped and removed by a small reaper process once the
//! test process exits, and the `psql` / `sqlite3` shells tests drive databases
//! with. A missing PostgreSQL is a test failure with instructions, never a skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use tidemark::pgserver::{Durability, PgServer};

/// A running cluster shared by all tests of one test process.
#[derive(Debug)]
pub struct PgCluster {
    server: PgServer,
}

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
static DB_SEQ: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// The cluster of this test process, started on first use and stopped
    /// once the process has exited.
    pub fn shared() -> &'static PgCluster {
        CLUSTER.get_or_init(|| {
            let mut server = PgServer::start(Durability::None).unwrap_or_else(|e| {
                panic!(
                    "{e:#} — the store suite runs against a real PostgreSQL and is never skipped"
                )
            });
            server.stop_after_exit(std::process::id());
            PgCluster { server }
        })
    }

    /// URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        self.server.url(db)
    }

    /// Creates a fresh, empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        self.server
            .create_database(&name)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs SQL with the real `psql` client against database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        psql(&self.url(db), sql)
    }
}

/// Runs SQL with the real `psql` client (`ON_ERROR_STOP`, unaligned, tuples only).
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let psql = std::env::var("TIDEMARK_PG_BIN")
        .map(|d| PathBuf::from(d).join("psql"))
        .unwrap_or_else(|_| PathBuf::from("psql"));
    let out = Command::new(psql)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("cannot run psql (install postgresql-client): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Runs SQL with the real `sqlite3` shell against a database file.
pub fn sqlite3(path: &Path, sql: &str) -> Result<String, String> {
    let out = Command::new("sqlite3")
        .args(["-bail", "-batch", "-cmd", ".timeout 10000"])
        .arg(path)
        .arg(sql)
        .output()
        .map_err(|e| format!("cannot run sqlite3 (install sqlite3): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}
