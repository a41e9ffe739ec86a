//! `tidemark`: the replication daemon and its tools.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidemark::config::Config;
use tracing_subscriber::EnvFilter;

/// The glibc malloc tunable `tidemark run` starts under: every allocation of
/// 4 MiB or more gets its own mapping, returned to the system when freed.
/// glibc otherwise raises that threshold (up to 32 MiB) after the first large
/// free, and the large values of a burst of writes then stay in its arenas for
/// good. 4 MiB keeps the buffers of a few MiB that bulk statements build in
/// the arenas rather than mapping each anew; `tidemark bench` showed no
/// difference between 256 KiB, 4 MiB and 32 MiB beyond its run-to-run noise
/// (docs/BENCHMARKS.md).
const MALLOC_TUNABLE: &str = "glibc.malloc.mmap_threshold=4194304";

/// Runs this same command again (same process id, same arguments) with
/// [`MALLOC_TUNABLE`] in `GLIBC_TUNABLES`, which glibc reads only at start;
/// returns only if it is already set or the exec failed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn exec_with_malloc_tunable() {
    use std::os::unix::process::CommandExt as _;
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("glibc.malloc.mmap_threshold") {
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!(
                "tidemark: running without the malloc tunable (cannot find this binary: {e})"
            );
            return;
        }
    };
    let tunables = if current.is_empty() {
        MALLOC_TUNABLE.to_owned()
    } else {
        format!("{current}:{MALLOC_TUNABLE}")
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("GLIBC_TUNABLES", tunables)
        .exec();
    eprintln!("tidemark: running without the malloc tunable ({err})");
}

#[derive(Debug, Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Change-data-capture replication for SQLite and PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The node's TOML config; keys can be overridden by TIDEMARK_<SECTION>__<KEY>.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and print the settings it gives, without starting.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a three-node cluster on local SQLite files, write to it, show the
    /// conflict it creates and the cluster converge; --keep-running leaves it up.
    Demo(tidemark::demo::DemoArgs),
    /// Measure replication throughput, lag, catch-up and memory on this machine.
    Bench(tidemark::bench::BenchArgs),
    /// Operate a running node: status, conflicts, policies, record history, blocked
    /// records, unreplicated writes; compare nodes' rows (`admin check`).
    Admin(tidemark::cli::AdminArgs),
    /// Write and read records through a node's write API (JSON output).
    Records(tidemark::cli::RecordsArgs),
    /// Exit 0 when the node's /readyz answers 200 (for container health checks).
    Healthcheck {
        /// The node's metrics listener (server.metrics_listen_addr).
        #[arg(long, default_value = "127.0.0.1:9464")]
        addr: String,
    },
    /// Make a cluster CA and node certificates for mutual TLS between peers.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Copy a node's database for a new node to start from, the node's
    /// identity stripped (a file snapshot).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Print a new ULID (for node.id).
    NewId,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Copy the SQLite database of the node `--config` describes to OUT (one
    /// consistent read; the node may be running) and strip its identity.
    Create {
        #[arg(long, short)]
        config: PathBuf,
        /// The new file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Strip a node's identity from a database copied by other means: a
    /// stopped node's SQLite file, or `pg_dump` / `pg_restore` into a new
    /// PostgreSQL database. No daemon may run on it.
    Strip {
        /// sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB
        #[arg(long)]
        url: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Write DIR/ca.pem and DIR/ca.key.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Write DIR/NAME.pem and DIR/NAME.key for a node, signed by DIR/ca.pem.
    Node {
        #[arg(long)]
        dir: PathBuf,
        /// The node's id (its certificate's common name).
        #[arg(long)]
        node_id: ulid::Ulid,
        /// File name, e.g. node-a.
        #[arg(long)]
        name: String,
        /// Host names and addresses peers dial (repeat); default: NAME, localhost, 127.0.0.1.
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Write DIR/NAME.pem and DIR/NAME.key for a client (an application or an
    /// operator), signed by DIR/ca.pem: its common name is NAME, which a node's
    /// access.writers / access.operators list to give it a role.
    Client {
        #[arg(long)]
        dir: PathBuf,
        /// The client's name (its certificate's common name), e.g. ops or billing-app.
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

fn init_logging(level: &str, json: bool) {
    // The level comes from log.level (override: TIDEMARK_LOG__LEVEL). Failed TLS
    // handshakes (no, expired or foreign client certificate) are only reported by
    // tonic at debug level: keep them visible unless the filter says otherwise.
    let level = if level.contains("tonic") {
        level.to_owned()
    } else {
        format!("{level},tonic::transport::server::io_stream=debug")
    };
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(path: &std::path::Path) -> Result<tidemark::Settings, String> {
    let problems = |errs: Vec<tidemark::config::ConfigError>| {
        let lines: Vec<String> = errs.iter().map(|e| format!("  {e}")).collect();
        format!("invalid config {}:\n{}", path.display(), lines.join("\n"))
    };
    let config = Config::load(path).map_err(|e| problems(e.0))?;
    config.validate().map_err(problems)
}

/// `tidemark snapshot create` and `tidemark snapshot strip`.
async fn snapshot(command: SnapshotCommand) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tidemark_store::{StoreUrl, snapshot};
    let (info, what) = match command {
        SnapshotCommand::Create { config, out } => {
            let settings = load(&config).map_err(anyhow::Error::msg)?;
            let StoreUrl::Sqlite(source) = &settings.store_url else {
                anyhow::bail!(
                    "snapshot create copies SQLite databases; copy a PostgreSQL database with pg_dump and pg_restore into a new database, then run `tidemark snapshot strip --url` on it"
                );
            };
            let info = snapshot::create_sqlite(source, &out)
                .await
                .with_context(|| format!("snapshot of {}", source.path.display()))?;
            (info, out.display().to_string())
        }
        SnapshotCommand::Strip { url } => {
            let url: StoreUrl = url.parse().context("--url")?;
            let info = snapshot::strip(&url)
                .await
                .with_context(|| format!("stripping {url}"))?;
            (info, url.to_string())
        }
    };
    println!(
        "{what}: a snapshot of node {} (cluster {}), its identity stripped.\n\
         Start a new node on it with an id of its own (`tidemark new-id`) and the same\n\
         [[tables]], list the cluster's nodes in its [[peers]], and add it to theirs.",
        info.donor,
        info.cluster_id.as_deref().unwrap_or("not bound yet")
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if matches!(cli.command, Command::Run { .. }) {
        exec_with_malloc_tunable();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = match cli.command {
        Command::Run { config } => match load(&config) {
            Ok(settings) => {
                init_logging(&settings.log.level, settings.log.format == "json");
                let path = config.clone();
                runtime.block_on(tidemark::run(settings, move || load(&path)))
            }
            Err(msg) => {
                eprintln!("tidemark: {msg}");
                return ExitCode::from(2);
            }
        },
        Command::CheckConfig { config } => match load(&config) {
            Ok(settings) => {
                // A closed pipe (`check-config | head`) is not an error.
                let _ = writeln!(std::io::stdout(), "config OK\n{}", settings.summary());
                Ok(())
            }
            Err(msg) => {
                eprintln!("tidemark: {msg}");
                return ExitCode::from(2);
            }
        },
        Command::Demo(args) => {
            init_logging("error", false);
            runtime.block_on(tidemark::demo::run(args))
        }
        Command::Bench(args) => {
            init_logging("error", false);
            runtime.block_on(tidemark::bench::run(args))
        }
        Command::Admin(args) => match runtime.block_on(tidemark::cli::run(args)) {
            Ok(true) => Ok(()),
            // `admin check` found the nodes differ (it printed how).
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Records(args) => match runtime.block_on(tidemark::cli::records(args)) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Healthcheck { addr } => {
            match tidemark::cli::healthcheck(&addr, std::time::Duration::from_secs(3)) {
                Ok(true) => return ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("tidemark: {addr}/readyz is not ready");
                    return ExitCode::FAILURE;
                }
                Err(e) => Err(e),
            }
        }
        Command::Cert(CertCommand::Ca { dir, days }) => tidemark::certs::make_ca(&dir, days)
            .map(|()| println!("wrote {0}/ca.pem and {0}/ca.key", dir.display())),
        Command::Cert(CertCommand::Node {
            dir,
            node_id,
            name,
            hosts,
            days,
        }) => {
            let hosts = if hosts.is_empty() {
                vec![name.clone(), "localhost".into(), "127.0.0.1".into()]
            } else {
                hosts
            };
            tidemark::certs::make_node(&dir, node_id, &name, &hosts, days)
                .map(|()| println!("wrote {0}/{name}.pem and {0}/{name}.key", dir.display()))
        }
        Command::Cert(CertCommand::Client { dir, name, days }) => {
            tidemark::certs::make_client(&dir, &name, days)
                .map(|()| println!("wrote {0}/{name}.pem and {0}/{name}.key", dir.display()))
        }
        Command::Snapshot(command) => runtime.block_on(snapshot(command)),
        Command::NewId => {
            println!("{}", ulid::Ulid::generate());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e:#}");
            ExitCode::FAILURE
        }
    }
}
