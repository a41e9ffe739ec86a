//! A throwaway PostgreSQL server on this machine, for `tidemark bench` and the
//! test suites: `initdb` into a new directory under `/tmp`, started on a free
//! loopback port with trust authentication, as an unprivileged user (`postgres`
//! when this process runs as root: the server refuses to run as root).
//!
//! Server binaries are looked up in `$TIDEMARK_PG_BIN`, then `PATH`, then
//! Debian's `/usr/lib/postgresql/<version>/bin` (the newest version).
//!
//! Dropping a [`PgServer`] stops it and removes its directory; a server kept
//! in a `static` (never dropped) is handed to a reaper with
//! [`PgServer::stop_after_exit`] instead.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The superuser the server is created with.
pub const SUPERUSER: &str = "tidemark";

/// How the server trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous_commit = off`, `fsync` on: a commit returns before its WAL
    /// reaches the disk, as SQLite's `synchronous = NORMAL` in WAL mode does
    /// (what `tidemark bench` compares against).
    Relaxed,
    /// `fsync`, `synchronous_commit` and `full_page_writes` off: nothing is
    /// made durable (test suites, where a crash of the machine loses nothing).
    None,
}

/// A running throwaway server.
#[derive(Debug)]
pub struct PgServer {
    pub port: u16,
    /// The server's directory (data directory, socket, log).
    pub dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
    /// Whether dropping this value stops the server.
    stop_on_drop: bool,
}

/// The directory holding `initdb` and `pg_ctl`.
pub fn find_bin() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("TIDEMARK_PG_BIN") {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").is_file() {
            bail!(
                "TIDEMARK_PG_BIN={} holds no initdb (it should name PostgreSQL's server bin directory)",
                dir.display()
            );
        }
        return Ok(dir);
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Where the links lead: psql sits beside the real binaries.
                let real = std::fs::canonicalize(dir.join("initdb"));
                return Ok(real
                    .ok()
                    .and_then(|p| p.parent().map(PathBuf::from))
                    .unwrap_or(dir));
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
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in $TIDEMARK_PG_BIN, PATH or \
             /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql)"
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

impl PgServer {
    /// Creates and starts a server; fails with the reason (binaries missing,
    /// `initdb` or `pg_ctl` output).
    pub fn start(durability: Durability) -> anyhow::Result<PgServer> {
        let bin = find_bin()?;
        let run_as = is_root().then(|| "postgres".to_owned());
        // Under /tmp: the postgres user cannot enter root's home.
        let dir = tempfile::Builder::new()
            .prefix("tidemark-pg-")
            .tempdir_in("/tmp")
            .context("creating a directory for PostgreSQL under /tmp")?
            .keep();
        let mut server = PgServer {
            port: crate::ports::free_port()?,
            dir,
            bin,
            run_as,
            stop_on_drop: true,
        };
        if let Some(user) = &server.run_as {
            let ok = Command::new("chown")
                .args(["-R", &format!("{user}:")])
                .arg(&server.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("chown {} to {user} failed", server.dir.display());
            }
        }
        let data = server.data();
        let out = server
            .cmd("initdb")
            .current_dir("/tmp")
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let durability = match durability {
            Durability::Relaxed => "-c synchronous_commit=off",
            Durability::None => "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        };
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 {durability}",
            server.port,
            server.dir.display()
        );
        let out = server
            .cmd("pg_ctl")
            .current_dir("/tmp")
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(server.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            // Nothing runs: only the directory is left to remove.
            server.stop_on_drop = false;
            let log = std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&server.dir);
            bail!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
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

    /// The shell command that stops the server.
    fn stop_command(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = format!(
            "{} -D {} -m immediate stop",
            pg_ctl.display(),
            self.data().display()
        );
        match &self.run_as {
            Some(u) => format!("runuser -u {u} -- {stop}"),
            None => stop,
        }
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (an identifier: letters, digits, `_`) and
    /// returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("database name {name:?} is not a plain identifier");
        }
        let psql = Some(self.bin.join("psql"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url("postgres"),
            ])
            .args(["-c", &format!("CREATE DATABASE {name}")])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "creating database {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(self.url(name))
    }

    /// Leaves the server running until process `pid` (this one, usually) has
    /// exited, then stops it and removes its directory: for a server kept in
    /// a `static`, which is never dropped.
    pub fn stop_after_exit(&mut self, pid: u32) {
        self.stop_on_drop = false;
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; cd /tmp; {} >/dev/null 2>&1; rm -rf {}",
            self.stop_command(),
            self.dir.display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if !self.stop_on_drop {
            return;
        }
        let _ = Command::new("sh")
            .current_dir("/tmp")
            .args(["-c", &self.stop_command()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
