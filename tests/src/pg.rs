//! A throwaway PostgreSQL cluster for tests: `initdb` into a temp dir, started on a
//! free loopback port as an unprivileged user (the `postgres` user when the tests
//! run as root, since the server refuses to run as root), stopped and removed by a
//! small reaper process once the test process exits.
//!
//! Binaries are looked up in `$TIDEMARK_PG_BIN`, then `PATH`, then Debian's
//! `/usr/lib/postgresql/<version>/bin`. A missing PostgreSQL is a test failure with
//! instructions, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running cluster shared by all tests of one test process.
#[derive(Debug)]
pub struct PgCluster {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
}

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
static DB_SEQ: AtomicU32 = AtomicU32::new(0);

const SUPERUSER: &str = "tidemark";

fn find_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("TIDEMARK_PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return dir;
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in $TIDEMARK_PG_BIN, PATH or \
             /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql) — the \
             store suite runs against a real PostgreSQL and is never skipped"
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    crate::daemon::free_port()
}

impl PgCluster {
    /// The cluster of this test process, started on first use.
    pub fn shared() -> &'static PgCluster {
        CLUSTER.get_or_init(PgCluster::start)
    }

    fn cmd(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn start() -> PgCluster {
        let bin = find_bin();
        let run_as = is_root().then(|| "postgres".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("tidemark-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir for PostgreSQL")
            .keep();
        if let Some(user) = &run_as {
            let ok = Command::new("chown")
                .args(["-R", &format!("{user}:")])
                .arg(&dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown {} to {user} failed", dir.display());
        }
        let port = free_port();
        let cluster = PgCluster {
            port,
            dir: dir.clone(),
            bin,
            run_as,
        };
        let data = dir.join("data");
        let out = cluster
            .cmd("initdb")
            .current_dir("/tmp")
            .args(["-D"])
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            dir.display()
        );
        let out = cluster
            .cmd("pg_ctl")
            .current_dir("/tmp")
            .args(["-D"])
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        );
        cluster.spawn_reaper(&data);
        cluster
    }

    /// Stops the server and removes its directory once this process has exited.
    fn spawn_reaper(&self, data: &Path) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = match &self.run_as {
            Some(u) => format!(
                "runuser -u {u} -- {} -D {} -m immediate stop",
                pg_ctl.display(),
                data.display()
            ),
            None => format!(
                "{} -D {} -m immediate stop",
                pg_ctl.display(),
                data.display()
            ),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; cd /tmp; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh, empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.url(&name)
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
