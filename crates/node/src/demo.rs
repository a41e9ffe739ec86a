//! `tidemark demo`: a three-node cluster on local SQLite files. It writes the
//! nodes' configs, starts three real `tidemark run` daemons (child processes of
//! this binary, each with its own metrics and log), writes through the API and
//! directly with SQL (as an application would), makes two nodes update the same
//! record concurrently and shows that conflict (both versions, the winner and
//! why), and prints what converged.
//!
//! * Normal mode stops the cluster at the end; `--keep-running` leaves it
//!   running on fixed loopback ports (gRPC 7171-7173, metrics 9571-9573 by
//!   default), prints commands to try against it, and stops it on Ctrl-C,
//!   SIGTERM or SIGHUP.
//! * The daemons run in their own process group: a terminal's Ctrl-C reaches
//!   only the demo, which then stops them in order (SIGTERM each, wait for a
//!   clean exit). They are killed if the demo fails; a demo killed with SIGKILL
//!   leaves them running.
//! * Output into a closed pipe (`tidemark demo | head -3`) ends the run quietly:
//!   the nodes are stopped, a temporary directory is removed, exit 0.
//!   [`write_line`] does this for `bench` too.
//! * Without `--dir` everything lives in a temporary directory, removed at the
//!   end; `--dir` keeps the databases, configs and logs (a directory that
//!   already holds a demo cluster is refused: its databases belong to other
//!   node ids).

use crate::cli::rfc3339;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::json;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tidemark_hlc::{Hlc, WriteOrder};
use tidemark_replicator::pb::{self, admin_client::AdminClient, records_client::RecordsClient};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use ulid::Ulid;

const NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];
const NOTES_DDL: &str = "CREATE TABLE IF NOT EXISTS notes (\
    id TEXT PRIMARY KEY CHECK (length(id) = 26), \
    title TEXT NOT NULL, \
    body TEXT, \
    author TEXT)";
/// First gRPC (and Admin) port of `--keep-running`: node-a, node-b, node-c
/// listen on it and the next two.
const DEFAULT_GRPC_PORT: u16 = 7171;
/// First metrics port of `--keep-running` (`/metrics`, `/healthz`, `/readyz`).
const DEFAULT_METRICS_PORT: u16 = 9571;
/// How long a stopped daemon may take to exit (its own grace is 30 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// Attempts at two concurrent updates before the demo gives up on a conflict.
const CONFLICT_TRIES: u32 = 3;

/// Arguments of `tidemark demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Keep the databases, configs and daemon logs in this directory (new or
    /// without a demo cluster in it).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the three nodes running after the demo, on fixed loopback ports with
    /// metrics, print commands to try, and stop them on Ctrl-C or SIGTERM.
    #[arg(long)]
    pub keep_running: bool,
    /// With --keep-running: node-a, node-b and node-c listen for gRPC (peers,
    /// the write API, Admin) on this port and the next two [default: 7171].
    #[arg(long, value_name = "PORT", requires = "keep_running")]
    pub grpc_port: Option<u16>,
    /// With --keep-running: their metrics listeners (/metrics, /readyz) are on
    /// this port and the next two [default: 9571].
    #[arg(long, value_name = "PORT", requires = "keep_running")]
    pub metrics_port: Option<u16>,
}

// ---------------------------------------------------------------------------
// Output that ends quietly at a closed pipe.

/// Stdout or stderr is a pipe whose reader has gone (`tidemark demo | head -3`).
/// The run ends without another word and the process exits 0, as `tidemark
/// admin status | head` does; unlike that one, the run first cleans up (stops
/// its daemons, removes its temporary directory).
#[derive(Debug, thiserror::Error)]
#[error("output closed")]
pub(crate) struct OutputClosed;

/// Where [`write_line`] writes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Writes one line: a closed pipe is [`OutputClosed`] (see
/// [`closed_output_is_success`]), any other failure an error naming the stream.
pub(crate) fn write_line(stream: Stream, line: fmt::Arguments<'_>) -> anyhow::Result<()> {
    fn put(mut w: impl std::io::Write, line: fmt::Arguments<'_>) -> std::io::Result<()> {
        w.write_fmt(line).and_then(|()| w.write_all(b"\n"))
    }
    let (written, name) = match stream {
        Stream::Stdout => (put(std::io::stdout().lock(), line), "stdout"),
        Stream::Stderr => (put(std::io::stderr().lock(), line), "stderr"),
    };
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow!("cannot write to {name}: {e}")),
    }
}

/// A run that ended because its output was closed succeeded.
pub(crate) fn closed_output_is_success(result: anyhow::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.downcast_ref::<OutputClosed>().is_some() => Ok(()),
        other => other,
    }
}

/// `println!` through [`write_line`]: `say!(...)?`.
macro_rules! say {
    ($($arg:tt)*) => {
        write_line(Stream::Stdout, format_args!($($arg)*))
    };
}

// ---------------------------------------------------------------------------
// The cluster: configs, ports, daemons.

/// One node of the demo cluster.
#[derive(Debug)]
struct DemoNode {
    name: &'static str,
    id: Ulid,
    grpc: SocketAddr,
    metrics: SocketAddr,
    db: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl DemoNode {
    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// The gRPC and metrics port of each node.
fn pick_ports(args: &DemoArgs) -> anyhow::Result<Vec<(u16, u16)>> {
    let bindable = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    if args.keep_running {
        let grpc = args.grpc_port.unwrap_or(DEFAULT_GRPC_PORT);
        let metrics = args.metrics_port.unwrap_or(DEFAULT_METRICS_PORT);
        let range = |first: u16, flag: &str| -> anyhow::Result<Vec<u16>> {
            if first == 0 || first > u16::MAX - 2 {
                bail!("--{flag} {first}: the three nodes need {first} and the next two ports");
            }
            Ok((first..first + 3).collect())
        };
        let (g, m) = (range(grpc, "grpc-port")?, range(metrics, "metrics-port")?);
        if g.iter().any(|p| m.contains(p)) {
            bail!(
                "--grpc-port {grpc} and --metrics-port {metrics}: the two ranges of three ports overlap"
            );
        }
        for port in g.iter().chain(&m) {
            if !bindable(*port) {
                bail!(
                    "port {port} on 127.0.0.1 is taken (another `tidemark demo --keep-running`?); \
                     choose others with --grpc-port and --metrics-port"
                );
            }
        }
        return Ok(g.into_iter().zip(m).collect());
    }
    // Free ports below the kernel's ephemeral range (32768 and up): a port
    // picked there could be taken by a daemon's outgoing connection to its
    // peer before the daemon meant to listen on it starts.
    use std::hash::BuildHasher as _;
    let random = std::collections::hash_map::RandomState::new();
    let mut ports: Vec<u16> = Vec::new();
    for i in 0u32..10_000 {
        let port = 20_000 + (random.hash_one(i) % 12_000) as u16;
        if !ports.contains(&port) && bindable(port) {
            ports.push(port);
            if ports.len() == 6 {
                return Ok(ports[..3]
                    .iter()
                    .copied()
                    .zip(ports[3..].iter().copied())
                    .collect());
            }
        }
    }
    bail!("no free ports on 127.0.0.1 between 20000 and 32000")
}

/// The nodes, their ids in the order of their names: node-c's is the greatest,
/// so an exact HLC tie between node-a and node-c always goes to node-c.
fn plan(dir: &Path, ports: &[(u16, u16)]) -> Vec<DemoNode> {
    let mut ids: Vec<Ulid> = NAMES.iter().map(|_| Ulid::generate()).collect();
    ids.sort();
    NAMES
        .iter()
        .zip(ports)
        .zip(ids)
        .map(|((name, (grpc, metrics)), id)| DemoNode {
            name,
            id,
            grpc: SocketAddr::from(([127, 0, 0, 1], *grpc)),
            metrics: SocketAddr::from(([127, 0, 0, 1], *metrics)),
            db: dir.join(format!("{name}.db")),
            config: dir.join(format!("{name}.toml")),
            log: dir.join(format!("{name}.log")),
        })
        .collect()
}

/// Writes each node's config (a full mesh, plaintext on loopback).
fn write_configs(nodes: &[DemoNode]) -> anyhow::Result<()> {
    for node in nodes {
        let mut peers = String::new();
        for peer in nodes.iter().filter(|p| p.name != node.name) {
            peers.push_str(&format!(
                "\n[[peers]]\nname = \"{}\"\nnode_id = \"{}\"\naddress = \"{}\"\n",
                peer.name,
                peer.id,
                peer.url()
            ));
        }
        let text = format!(
            "# {name} of the tidemark demo cluster (`tidemark run --config {config}`)\n\n\
             [node]\nid = \"{id}\"\nname = \"{name}\"\ncluster_id = \"demo\"\n\n\
             [store]\nurl = \"sqlite://{db}\"\n\n\
             [server]\nlisten_addr = \"{grpc}\"\nmetrics_listen_addr = \"{metrics}\"\n\n\
             # Peers in plaintext: loopback only.\n[tls]\ninsecure = true\n\n\
             [[tables]]\nname = \"notes\"\nconflict_policy = \"lww\"\n{peers}",
            name = node.name,
            config = node.config.display(),
            id = node.id,
            db = node.db.display(),
            grpc = node.grpc,
            metrics = node.metrics,
        );
        std::fs::write(&node.config, text)
            .with_context(|| format!("writing {}", node.config.display()))?;
    }
    Ok(())
}

async fn open_db(path: &Path) -> anyhow::Result<SqliteConnection> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(Duration::from_secs(10));
    SqliteConnection::connect_with(&opts)
        .await
        .with_context(|| format!("opening {}", path.display()))
}

/// Starts `tidemark run --config` for `node`, its output in its log file.
fn spawn(exe: &Path, node: &DemoNode) -> anyhow::Result<Child> {
    let mut cmd = Command::from(crate::bench::daemon_command(exe, &node.config, &node.log)?);
    // Ctrl-C at a terminal reaches the demo only; it stops the daemons in order.
    cmd.process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} ({})", node.name, exe.display()))
}

/// The last lines of a daemon's log, indented, for an error message.
fn log_tail(node: &DemoNode) -> String {
    let text = std::fs::read_to_string(&node.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail: Vec<String> = lines[lines.len().saturating_sub(15)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect();
    format!("{} ends:\n{}", node.log.display(), tail.join("\n"))
}

/// Resolves when a daemon exits by itself, with what happened.
async fn first_exit(nodes: &[DemoNode], children: &mut [Child]) -> String {
    loop {
        for (node, child) in nodes.iter().zip(children.iter_mut()) {
            if let Ok(Some(status)) = child.try_wait() {
                return format!(
                    "{} stopped by itself ({status}); {}",
                    node.name,
                    log_tail(node)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every daemon still running, then waits for each to exit;
/// fails naming those that did not exit cleanly.
async fn stop(nodes: &[DemoNode], children: &mut [Child]) -> anyhow::Result<()> {
    for child in children.iter_mut() {
        if !matches!(child.try_wait(), Ok(None)) {
            continue;
        }
        let Some(pid) = child.id() else { continue };
        // No signal API without unsafe code in this crate: the `kill` command.
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            // Reported below: the exit status shows the kill.
            let _ = child.start_kill();
        }
    }
    let mut problems = Vec::new();
    for (node, child) in nodes.iter().zip(children.iter_mut()) {
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => problems.push(format!(
                "{} exited with {status}; {}",
                node.name,
                log_tail(node)
            )),
            Ok(Err(e)) => problems.push(format!("{}: cannot wait for it: {e}", node.name)),
            Err(_) => {
                let _ = child.kill().await;
                problems.push(format!(
                    "{} did not stop within {} s and was killed; {}",
                    node.name,
                    STOP_TIMEOUT.as_secs(),
                    log_tail(node)
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// The signals that stop the demo. Installed before any daemon starts, so a
/// signal never leaves them behind.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("listening for SIGHUP")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Waits until every node answers its Admin service, is connected to both
/// peers, and stamps writes (a starting node holds them until its peers answer).
async fn wait_ready(nodes: &[DemoNode]) -> anyhow::Result<Vec<AdminClient<Channel>>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut admins = Vec::new();
    for node in nodes {
        let mut last = String::from("not answering");
        loop {
            if let Ok(mut admin) = AdminClient::connect(node.url()).await {
                match admin.status(pb::StatusRequest {}).await {
                    Ok(s) => {
                        let s = s.into_inner();
                        if s.peers.iter().all(|p| p.connected) && !s.writes_held {
                            admins.push(admin);
                            break;
                        }
                        last = "answering, not yet connected to both peers".into();
                    }
                    Err(e) => last = e.message().to_owned(),
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} is not ready after 60 s ({last}); {}",
                    node.name,
                    log_tail(node)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(admins)
}

// ---------------------------------------------------------------------------
// Running it.

/// Runs the demo (see the module docs).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    closed_output_is_success(demo(args).await)
}

/// How the cluster's run ended.
enum End {
    Signal(&'static str),
    DaemonExited(String),
    Finished(anyhow::Result<Outcome>),
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let ports = pick_ports(&args)?;
    let temp = match &args.dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("tidemark-demo-")
                .tempdir()
                .context("creating a temporary directory")?,
        ),
    };
    let dir = match (&args.dir, &temp) {
        (Some(d), _) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory exists without --dir"),
    };
    let nodes = plan(&dir, &ports);
    if let Some(existing) = nodes
        .iter()
        .flat_map(|n| [&n.db, &n.config])
        .find(|p| p.exists())
    {
        bail!(
            "{} already holds a demo cluster ({} exists): run its nodes with `tidemark run --config {}`, \
             or give the demo another directory",
            dir.display(),
            existing.display(),
            nodes[0].config.display()
        );
    }
    write_configs(&nodes)?;
    // The application's table, created on every node before the daemons start.
    for node in &nodes {
        let mut db = open_db(&node.db).await?;
        sqlx::query(NOTES_DDL).execute(&mut db).await?;
        db.close().await?;
    }
    say!(
        "tidemark demo: three tidemark daemons on SQLite in {}{}",
        dir.display(),
        if temp.is_some() {
            " (a temporary directory, removed at the end)"
        } else {
            ""
        }
    )?;

    let exe = std::env::current_exe().context("locating the tidemark binary")?;
    let mut children = Vec::new();
    for node in &nodes {
        match spawn(&exe, node) {
            Ok(child) => children.push(child),
            Err(e) => {
                let _ = stop(&nodes[..children.len()], &mut children).await;
                return Err(e);
            }
        }
    }

    let end = tokio::select! {
        biased;
        sig = signals.recv() => End::Signal(sig),
        why = first_exit(&nodes, &mut children) => End::DaemonExited(why),
        r = script(&nodes) => End::Finished(r),
    };
    let end = match end {
        End::Finished(Ok(outcome)) if args.keep_running => {
            match try_next(&nodes, &dir, temp.is_some(), &outcome) {
                Ok(()) => tokio::select! {
                    biased;
                    sig = signals.recv() => End::Signal(sig),
                    why = first_exit(&nodes, &mut children) => End::DaemonExited(why),
                },
                Err(e) => End::Finished(Err(e)),
            }
        }
        other => other,
    };

    match end {
        End::Signal(sig) => {
            // A closed pipe must not keep the nodes from stopping.
            let said = say!("\n{sig}: stopping the three nodes...");
            stop(&nodes, &mut children).await?;
            said?;
            say!("stopped: node-a, node-b and node-c shut down cleanly")?;
        }
        End::DaemonExited(why) => {
            let _ = stop(&nodes, &mut children).await;
            bail!("{why}");
        }
        End::Finished(Err(e)) => {
            let stopped = stop(&nodes, &mut children).await;
            return match stopped {
                Err(s) if e.downcast_ref::<OutputClosed>().is_none() => {
                    Err(e.context(format!("also: {s:#}")))
                }
                _ => Err(e),
            };
        }
        End::Finished(Ok(_)) => stop(&nodes, &mut children).await?,
    }

    match temp {
        Some(t) => {
            let path = t.path().display().to_string();
            t.close().with_context(|| format!("removing {path}"))?;
            say!(
                "\nremoved {path} (the demo's databases, configs and logs; --dir DIR keeps them)"
            )?;
        }
        None => say!(
            "\nthe databases, configs and logs stay in {}; run the nodes again with `tidemark run --config {}` (and node-b, node-c)",
            dir.display(),
            nodes[0].config.display()
        )?,
    }
    if !args.keep_running {
        say!("to keep the cluster running and explore it: tidemark demo --keep-running")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The script.

/// What the script made, for the commands printed after it.
struct Outcome {
    note1: Ulid,
    conflict_id: String,
}

type Row = (String, String, Option<String>, Option<String>);

async fn rows(db: &mut SqliteConnection) -> anyhow::Result<Vec<Row>> {
    Ok(
        sqlx::query_as("SELECT id, title, body, author FROM notes ORDER BY title, id")
            .fetch_all(db)
            .await?,
    )
}

async fn event_ids(db: &mut SqliteConnection) -> anyhow::Result<Vec<String>> {
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT event_id FROM change_events ORDER BY event_id")
            .fetch_all(db)
            .await?;
    Ok(ids.into_iter().map(|r| r.0).collect())
}

async fn put(
    client: &mut RecordsClient<Channel>,
    id: Ulid,
    values: serde_json::Value,
) -> anyhow::Result<pb::WriteResponse> {
    Ok(client
        .put(pb::PutRequest {
            table: "notes".into(),
            id: id.to_string(),
            values_json: values.to_string(),
        })
        .await?
        .into_inner())
}

async fn script(nodes: &[DemoNode]) -> anyhow::Result<Outcome> {
    let mut admins = wait_ready(nodes).await?;
    for node in nodes {
        say!(
            "  {}  id {}  grpc {}  metrics {}",
            node.name,
            node.id,
            node.grpc,
            node.metrics
        )?;
    }
    let mut dbs = Vec::new();
    let mut clients = Vec::new();
    for node in nodes {
        dbs.push(open_db(&node.db).await?);
        clients.push(RecordsClient::connect(node.url()).await?);
    }

    let started = Instant::now();
    say!("\n1. node-a writes three notes through the Records API")?;
    let ids: Vec<Ulid> = (0..5).map(|_| Ulid::generate()).collect();
    for (i, id) in ids.iter().take(3).enumerate() {
        put(
            &mut clients[0],
            *id,
            json!({"title": format!("note {}", i + 1), "author": "node-a api"}),
        )
        .await?;
    }
    say!("2. node-b's application inserts two notes directly with SQL")?;
    for (i, id) in ids.iter().skip(3).enumerate() {
        sqlx::query("INSERT INTO notes (id, title, author) VALUES ($1, $2, 'node-b sql')")
            .bind(id.to_string())
            .bind(format!("note {}", i + 4))
            .execute(&mut dbs[1])
            .await?;
    }
    // Let note 1 reach every node first, so both updates below are updates.
    let deadline = Instant::now() + Duration::from_secs(30);
    for db in dbs.iter_mut() {
        loop {
            let found: Option<(String,)> = sqlx::query_as("SELECT id FROM notes WHERE id = $1")
                .bind(ids[0].to_string())
                .fetch_optional(&mut *db)
                .await?;
            if found.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("note 1 did not replicate within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    say!(
        "3. node-a and node-c update note 1 at the same moment, each before it has seen the other's update"
    )?;
    let conflict = make_conflict(&mut clients, &mut admins, &mut dbs, ids[0]).await?;
    for line in explain(&conflict, nodes)? {
        say!("{line}")?;
    }

    say!("\n4. node-c deletes note 2; node-b's application edits note 4 with SQL")?;
    clients[2]
        .delete(pb::DeleteRequest {
            table: "notes".into(),
            id: ids[1].to_string(),
        })
        .await?;
    sqlx::query("UPDATE notes SET body = 'edited with sqlite3-style SQL' WHERE id = $1")
        .bind(ids[3].to_string())
        .execute(&mut dbs[1])
        .await?;

    say!("\nwaiting for the three nodes to converge...")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut snapshots = Vec::new();
        for db in dbs.iter_mut() {
            snapshots.push((rows(db).await?, event_ids(db).await?));
        }
        let mut unsynced = 0;
        for admin in admins.iter_mut() {
            let s = admin.status(pb::StatusRequest {}).await?.into_inner();
            unsynced += s.unsynced_events + s.pending_captures;
        }
        let same = snapshots.windows(2).all(|w| w[0] == w[1]);
        if same && unsynced == 0 && snapshots[0].0.len() == 4 {
            say!(
                "converged in {} ms: all three nodes hold the same {} notes and the same {} change events, every event synced\n",
                started.elapsed().as_millis(),
                snapshots[0].0.len(),
                snapshots[0].1.len()
            )?;
            say!("{:<28} {:<8} {:<32} author", "id", "title", "body")?;
            for (id, title, body, author) in &snapshots[0].0 {
                say!(
                    "{id:<28} {title:<8} {:<32} {}",
                    body.as_deref().unwrap_or("-"),
                    author.as_deref().unwrap_or("-")
                )?;
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the nodes did not converge within 60 s (unsynced events: {unsynced})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Outcome {
        note1: ids[0],
        conflict_id: conflict.conflict_id,
    })
}

/// Node-a and node-c update `note` at once. Sent together, neither update has
/// seen the other (they are concurrent: a conflict); should one node have
/// applied the other's first after all (then it is a plain overwrite), they
/// try again.
async fn make_conflict(
    clients: &mut [RecordsClient<Channel>],
    admins: &mut [AdminClient<Channel>],
    dbs: &mut [SqliteConnection],
    note: Ulid,
) -> anyhow::Result<pb::ConflictInfo> {
    for attempt in 1..=CONFLICT_TRIES {
        let again = if attempt == 1 {
            String::new()
        } else {
            format!(", try {attempt}")
        };
        let (a, rest) = clients.split_at_mut(1);
        let (ra, rc) = tokio::join!(
            put(
                &mut a[0],
                note,
                json!({"body": format!("edited on node-a{again}")})
            ),
            put(
                &mut rest[1],
                note,
                json!({"body": format!("edited on node-c{again}")})
            ),
        );
        let events = [ra?.event_id, rc?.event_id];
        if let Some(conflict) = find_conflict(admins, dbs, note, &events).await? {
            return Ok(conflict);
        }
        say!(
            "   (no conflict this time: one node had applied the other's update before it wrote its own, \
             so its update simply replaced it; sending both again)"
        )?;
    }
    bail!("{CONFLICT_TRIES} pairs of simultaneous updates all ended without a conflict")
}

/// The conflict between the two `events` of `note`, once every node records
/// it (and agrees on it); `None` when every node holds both events and none
/// records a conflict (one update had seen the other).
async fn find_conflict(
    admins: &mut [AdminClient<Channel>],
    dbs: &mut [SqliteConnection],
    note: Ulid,
    events: &[String; 2],
) -> anyhow::Result<Option<pb::ConflictInfo>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut everywhere_since: Option<Instant> = None;
    loop {
        let mut found = Vec::new();
        for admin in admins.iter_mut() {
            let list = admin
                .list_conflicts(pb::ListConflictsRequest {
                    table: "notes".into(),
                    status: "all".into(),
                    page_size: 100,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            found.extend(
                list.conflicts
                    .into_iter()
                    .filter(|c| c.record_id == note.to_string() && events.contains(&c.conflict_id)),
            );
        }
        if found.len() == 3 {
            let winner = |c: &pb::ConflictInfo| c.local.as_ref().map(|v| v.event_id.clone());
            if found
                .iter()
                .any(|c| c.conflict_id != found[0].conflict_id || winner(c) != winner(&found[0]))
            {
                bail!("the nodes record the conflict on note 1 differently: {found:?}");
            }
            // As node-b records it: it wrote neither version.
            return Ok(Some(found.swap_remove(1)));
        }
        let mut everywhere = true;
        for db in dbs.iter_mut() {
            let held = event_ids(db).await?;
            everywhere &= events.iter().all(|e| held.contains(e));
        }
        if everywhere {
            let since = *everywhere_since.get_or_insert_with(Instant::now);
            if found.is_empty() && since.elapsed() > Duration::from_secs(2) {
                return Ok(None);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "after 30 s, {} of 3 nodes record a conflict between the two updates of note 1",
                found.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HLC for people: its wall time and its logical counter.
fn hlc_text(h: Hlc) -> String {
    format!("{} + counter {}", rfc3339(h.wall_ms()), h.counter())
}

/// One version of a conflict, parsed.
struct Side {
    order: WriteOrder,
    node: String,
    values: String,
}

impl Side {
    fn parse(v: Option<&pb::ConflictVersion>, nodes: &[DemoNode]) -> anyhow::Result<Side> {
        let v = v.context("a conflict without both versions")?;
        let node_id: Ulid = v
            .node_id
            .parse()
            .with_context(|| format!("node id {:?}", v.node_id))?;
        let node = nodes
            .iter()
            .find(|n| n.id == node_id)
            .map_or_else(|| node_id.to_string(), |n| n.name.to_owned());
        Ok(Side {
            order: WriteOrder {
                hlc: Hlc::decode(v.hlc)?,
                node_id,
                event_id: v
                    .event_id
                    .parse()
                    .with_context(|| format!("event id {:?}", v.event_id))?,
            },
            node,
            values: v.values_json.clone().unwrap_or_else(|| "(deleted)".into()),
        })
    }
}

/// Why `won` beat `lost` under lww: the greater `(hlc, node_id, event_id)`
/// wins, as the store decides (`tidemark_store::rules`). None when it did not.
fn lww_reason(won: &Side, lost: &Side) -> Option<String> {
    if won.order <= lost.order {
        return None;
    }
    let (w, l) = (won.order.hlc, lost.order.hlc);
    Some(if w.wall_ms() > l.wall_ms() {
        format!(
            "{}'s HLC is later, by {} ms",
            won.node,
            w.wall_ms() - l.wall_ms()
        )
    } else if w > l {
        format!(
            "both HLCs are in the same millisecond and {}'s logical counter is higher ({} > {})",
            won.node,
            w.counter(),
            l.counter()
        )
    } else if won.order.node_id != lost.order.node_id {
        format!(
            "the two HLCs are exactly equal, so the greater node id wins: {}'s {} > {}'s {}",
            won.node, won.order.node_id, lost.node, lost.order.node_id
        )
    } else {
        format!(
            "same HLC and node, so the greater event id wins: {} > {}",
            won.order.event_id, lost.order.event_id
        )
    })
}

/// The conflict as lines of text: both versions, the winner and why.
fn explain(c: &pb::ConflictInfo, nodes: &[DemoNode]) -> anyhow::Result<Vec<String>> {
    let won = Side::parse(c.local.as_ref(), nodes)?;
    let lost = Side::parse(c.remote.as_ref(), nodes)?;
    let Some(reason) = lww_reason(&won, &lost) else {
        bail!(
            "node-b shows {}'s version of note 1 although {}'s is greater by (hlc, node id, event id)",
            won.node,
            lost.node
        );
    };
    // In the order they were written: node-a's first.
    let mut sides = [(&won, "won"), (&lost, "lost")];
    sides.sort_by(|x, y| x.0.node.cmp(&y.0.node));
    let mut lines = vec![format!(
        "\nconflict on notes {} (note 1): two concurrent versions (neither had seen the other), as node-b records it",
        c.record_id
    )];
    for (side, verdict) in sides {
        lines.push(format!(
            "  {:<6}  {:<4}  HLC {}  event {}",
            side.node,
            verdict,
            hlc_text(side.order.hlc),
            side.order.event_id
        ));
        lines.push(format!("                values {}", side.values));
    }
    lines.push(format!(
        "  winner: {}. Policy {} (last writer wins): the later HLC wins; on an exact tie the greater node id, then the greater event id.",
        won.node, c.policy
    ));
    lines.push(format!("          Here {reason}."));
    lines.push(format!(
        "  every node now shows {}'s version; {}'s is kept in conflict {} (resolution {}), the same on all three nodes.",
        won.node, lost.node, c.conflict_id, c.resolution
    ));
    lines.push(
        "  Both updates are sent at the same moment, so their HLCs depend on timing and the winner can differ\n  \
         between runs: often the HLCs are equal to the millisecond and node-c wins the tie (the demo gives it\n  \
         the greatest node id); when one is later, it wins, and that may be node-a's. The rule, and the\n  \
         agreement of every node, are the same every time."
            .to_owned(),
    );
    Ok(lines)
}

// ---------------------------------------------------------------------------
// --keep-running: what to try next.

/// `s` as one shell word (quoted only when needed).
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@%+=,".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How to run this binary again: as invoked when that was a path (`cargo run`
/// runs `target/debug/tidemark`), else `tidemark`.
fn program() -> String {
    match std::env::args().next() {
        Some(arg0) if arg0.contains('/') => shell_word(&arg0),
        _ => "tidemark".to_owned(),
    }
}

fn try_next(
    nodes: &[DemoNode],
    dir: &Path,
    temporary: bool,
    outcome: &Outcome,
) -> anyhow::Result<()> {
    let tm = program();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let db = |n: &DemoNode| shell_word(&n.db.display().to_string());
    let (sql_id, api_id) = (Ulid::generate(), Ulid::generate());
    say!("\nthe cluster keeps running (plaintext gRPC, loopback only):")?;
    for n in nodes {
        say!(
            "  {}  grpc {}  metrics http://{}/metrics  db {}  log {}",
            n.name,
            n.url(),
            n.metrics,
            n.db.display(),
            n.log.display()
        )?;
    }
    if temporary {
        say!(
            "  (in a temporary directory, removed when the demo stops; --dir DIR keeps the files)"
        )?;
    }
    say!("\ntry next, in another terminal:")?;
    say!("  # a node: its peers and their lag, its clock, tables and open conflicts")?;
    say!("  {tm} admin --addr {} status", a.url())?;
    say!("  # the conflict above, and every event of note 1")?;
    say!(
        "  {tm} admin --addr {} conflicts list --status all",
        b.url()
    )?;
    say!(
        "  {tm} admin --addr {} conflicts show {}",
        b.url(),
        outcome.conflict_id
    )?;
    say!(
        "  {tm} admin --addr {} history notes {}",
        b.url(),
        outcome.note1
    )?;
    say!("  # per-peer metrics")?;
    say!("  curl -s {}/metrics | grep tidemark_peer", a.metrics)?;
    say!("  # write with SQL on node-b, then read it through node-c's API")?;
    say!(
        "  sqlite3 {} \"INSERT INTO notes (id, title, author) VALUES ('{sql_id}', 'hello from sqlite3', 'you')\"",
        db(b)
    )?;
    say!("  {tm} records --addr {} get notes {sql_id}", c.url())?;
    say!("  # write through node-a's API, then read it with SQL on node-c")?;
    say!(
        "  {tm} records --addr {} put notes {api_id} '{{\"title\": \"hello from the API\"}}'",
        a.url()
    )?;
    say!(
        "  sqlite3 {} \"SELECT id, title, body, author FROM notes\"",
        db(c)
    )?;
    say!("  # compare the three nodes' rows")?;
    say!(
        "  {tm} admin check --node {} --node {} --node {}",
        a.url(),
        b.url(),
        c.url()
    )?;
    say!(
        "\nthe demo (pid {}) runs until Ctrl-C or `kill -TERM {}`; files in {}",
        std::process::id(),
        std::process::id(),
        dir.display()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(node: &str, wall_ms: i64, counter: u16, node_id: u128) -> Side {
        Side {
            order: WriteOrder {
                hlc: Hlc::from_parts(wall_ms, counter).expect("hlc"),
                node_id: Ulid(node_id),
                event_id: Ulid::generate(),
            },
            node: node.into(),
            values: "{}".into(),
        }
    }

    #[test]
    fn the_reason_names_what_decided() {
        let reason = |w: &Side, l: &Side| lww_reason(w, l).expect("won");
        let early = side("node-a", 1_000, 5, 9);
        let late = side("node-c", 1_003, 0, 1);
        assert!(reason(&late, &early).contains("later, by 3 ms"));
        assert_eq!(
            lww_reason(&early, &late),
            None,
            "the earlier HLC never wins"
        );
        let counted = side("node-c", 1_000, 6, 1);
        assert!(reason(&counted, &early).contains("counter is higher (6 > 5)"));
        let tie = side("node-c", 1_000, 5, 10);
        assert!(reason(&tie, &early).contains("greater node id"));
        assert_eq!(
            lww_reason(&early, &tie),
            None,
            "on a tie the smaller node id loses"
        );
    }

    #[test]
    fn hlcs_read_as_rfc3339_and_counter() {
        let h = Hlc::from_parts(1_764_528_000_123, 2).expect("hlc");
        assert_eq!(hlc_text(h), "2025-11-30T18:40:00.123Z + counter 2");
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(
            shell_word("/tmp/tidemark-demo-x/node-b.db"),
            "/tmp/tidemark-demo-x/node-b.db"
        );
        assert_eq!(
            shell_word("/tmp/my demo/it's.db"),
            r"'/tmp/my demo/it'\''s.db'"
        );
    }
}
