//! `tidemark admin ...`: a client of a node's Admin service, printing readable
//! tables, or JSON with `--json` for scripts; `tidemark admin check` compares
//! the rows of several nodes through their digests.
//!
//! What an operator types and reads: `--addr` takes `host:port` (http, or https
//! when client certificates are given) or a URL; a failed connection names the
//! address and the whole cause chain; the shared flags (`--addr`, the TLS files,
//! `--token-file`, `--json`) go before or after the subcommand; `--json` prints
//! HLCs and 64-bit ids as strings (as gRPC's JSON mapping does: jq and
//! JavaScript round integers beyond 2^53); output into a closed pipe ends the
//! process quietly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tidemark_replicator::pb::{self, admin_client::AdminClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// `println!` that ends the process quietly (exit 0, as ripgrep does) when
/// stdout is a closed pipe (`tidemark admin status | head -1`) instead of
/// panicking.
macro_rules! out {
    () => {
        $crate::cli::write_stdout(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

mod cluster;

/// Writes one line to stdout; a closed pipe exits 0, any other write error
/// exits 1 with the reason.
pub(crate) fn write_stdout(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("tidemark: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Client certificate options, for a node whose listener requires mutual TLS
/// (use `https://` addresses then).
#[derive(Debug, Args, Clone, Default)]
pub struct ClientTlsArgs {
    /// The cluster CA (PEM).
    #[arg(long, global = true, requires_all = ["cert_file", "key_file"])]
    pub ca_file: Option<std::path::PathBuf>,
    /// A certificate signed by the cluster CA (PEM).
    #[arg(long, global = true)]
    pub cert_file: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, global = true)]
    pub key_file: Option<std::path::PathBuf>,
}

impl ClientTlsArgs {
    fn given(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// `addr` as a URL: as given when it has a scheme, else `https://` when client
/// certificates are given and `http://` when not.
pub fn with_scheme(addr: &str, tls: &ClientTlsArgs) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else if tls.given() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// An error and every error it came from, as one line (`transport error: error
/// trying to connect: tcp connect error: Connection refused (os error 111)`).
pub fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their source in their own message.
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// The address a client reaches a listener on: an unspecified IP
/// (`0.0.0.0`, `[::]`) is reached on loopback.
fn reachable(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, addr.port()).to_string()
}

/// Where a command connects: flags first, then the node's config file
/// (`--config`), then the default address.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub tls: ClientTlsArgs,
    pub token_file: Option<std::path::PathBuf>,
}

impl Target {
    /// `admin`: true for the Admin listener (admin.listen_addr when set), false
    /// for the main one (server.listen_addr).
    pub fn resolve(
        addr: Option<&str>,
        tls: &ClientTlsArgs,
        token_file: Option<&std::path::Path>,
        config: Option<&std::path::Path>,
        admin: bool,
    ) -> anyhow::Result<Target> {
        let mut target = Target {
            addr: addr.unwrap_or("127.0.0.1:7070").to_owned(),
            tls: tls.clone(),
            token_file: token_file.map(ToOwned::to_owned),
        };
        let Some(path) = config else {
            return Ok(target);
        };
        let cfg = crate::Config::load(path)
            .map_err(|e| anyhow::anyhow!("--config {}:\n{e}", path.display()))?;
        if addr.is_none() {
            let listen = if admin && !cfg.admin.listen_addr.is_empty() {
                ("admin.listen_addr", &cfg.admin.listen_addr)
            } else {
                ("server.listen_addr", &cfg.server.listen_addr)
            };
            let parsed: std::net::SocketAddr = listen.1.parse().map_err(|e| {
                anyhow::anyhow!(
                    "--config {}: {} {:?}: {e}",
                    path.display(),
                    listen.0,
                    listen.1
                )
            })?;
            target.addr = reachable(parsed);
        }
        if !tls.given() && !cfg.tls.insecure {
            let file = |f: &str| (!f.is_empty()).then(|| std::path::PathBuf::from(f));
            target.tls = ClientTlsArgs {
                ca_file: file(&cfg.tls.ca_file),
                cert_file: file(&cfg.tls.cert_file),
                key_file: file(&cfg.tls.key_file),
            };
        }
        if admin && token_file.is_none() && !cfg.admin.token_file.is_empty() {
            target.token_file = Some(cfg.admin.token_file.clone().into());
        }
        Ok(target)
    }
}

/// Connects to `addr`, with mutual TLS when certificates are given.
pub async fn connect(addr: &str, tls: &ClientTlsArgs) -> anyhow::Result<Channel> {
    let url = with_scheme(addr, tls);
    let mut endpoint = Channel::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("address {addr:?} is not a host:port or URL: {e}"))?;
    match (endpoint.uri().scheme_str(), tls.given()) {
        (Some("http"), true) => anyhow::bail!(
            "{url}: client certificates are given, so the node listens with TLS: use https:// (or no scheme)"
        ),
        (Some("https"), false) => anyhow::bail!(
            "{url}: https needs the cluster's certificates: give --ca-file, --cert-file and --key-file (or use http:// for a plaintext node)"
        ),
        (Some("http" | "https"), _) => {}
        (other, _) => anyhow::bail!(
            "{url}: unsupported scheme {:?}: use http:// or https://, or host:port",
            other.unwrap_or_default()
        ),
    }
    if let (Some(ca), Some(cert), Some(key)) = (&tls.ca_file, &tls.cert_file, &tls.key_file) {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        };
        let material = tidemark_replicator::PeerTls {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        let host = endpoint.uri().host().unwrap_or_default().to_owned();
        endpoint = endpoint
            .tls_config(material.client(&host))
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {url}: {}", cause_chain(&e)))
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The node's Admin address: admin.listen_addr when the node sets it, else
    /// server.listen_addr. host:port (http://, or https:// with certificates)
    /// or a URL. Default: from --config, else 127.0.0.1:7070.
    #[arg(long, global = true)]
    pub addr: Option<String>,
    /// A node's config file: the Admin address, the TLS files and the token
    /// file come from it (flags given beside it win).
    #[arg(long, global = true)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// A file holding the node's admin bearer token (admin.token_file).
    #[arg(long, global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// The node, its peers and their progress, its tables.
    Status,
    /// List, show and resolve conflicts.
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// Conflict policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Every event of one record, oldest first.
    History {
        table: String,
        /// The record's ULID.
        id: String,
    },
    /// Records whose winning event this node keeps but whose row it cannot
    /// place (a UNIQUE clash, a missing parent, a row the table refuses).
    Blocked {
        #[arg(long)]
        table: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this page token (printed at the end of a full page).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Direct writes captured on this node and set aside because they cannot be
    /// replicated (their rows stay on this node only), oldest first.
    Unreplicated {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Try blocked records again now (after changing a constraint that refused
    /// them; records also retry by themselves when a row they wait on changes).
    RetryBlocked {
        #[arg(long)]
        table: Option<String>,
    },
    /// Remove entries of the unreplicated list once dealt with (the rows stay).
    DiscardUnreplicated {
        /// The entries' seq numbers, as `unreplicated` lists them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        seqs: Vec<i64>,
        /// Every entry.
        #[arg(long)]
        all: bool,
    },
    /// Events peers sent that this node could not even identify, kept as
    /// received, oldest first.
    Quarantined {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Remove quarantined events once looked at.
    DiscardQuarantined {
        /// The events' ids, as `quarantined` lists them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        event_ids: Vec<String>,
        /// Every quarantined event.
        #[arg(long)]
        all: bool,
    },
    /// Every node reachable from this one (through its peers' addresses, and
    /// any --node): state, open conflicts, stuck records, and each link's lag in
    /// events and seconds. Exit 1 when some node cannot be reached.
    Cluster {
        /// Also ask the node at this address (repeat): for peers whose
        /// configured address this machine cannot reach.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Refresh every this many seconds (Ctrl-C stops), showing how fast
        /// each link's backlog drains.
        #[arg(long)]
        watch: Option<u64>,
        /// With --watch: stop after this many rounds.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Compare the rows of several nodes (exit 1 when they differ): per-table
    /// digests, then the ranges and records that differ. Ignores --addr.
    Check {
        /// A node's gRPC address (repeat: at least two).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Only this table (default: every table any of the nodes replicates).
        #[arg(long)]
        table: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusFilter {
    Open,
    Resolved,
    All,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Keep {
    /// The version every node shows now.
    Local,
    /// The concurrent version that lost.
    Remote,
}

#[derive(Debug, Subcommand)]
pub enum ConflictsCommand {
    /// Conflicts, oldest first.
    List {
        #[arg(long)]
        table: Option<String>,
        #[arg(long, value_enum, default_value = "open")]
        status: StatusFilter,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this page token (printed at the end of a full page).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// One conflict with both versions.
    Show { id: String },
    /// Resolve an open conflict: keep one version, or write merged values.
    Resolve {
        id: String,
        /// Keep this version.
        #[arg(
            long,
            value_enum,
            conflicts_with = "values",
            required_unless_present = "values"
        )]
        keep: Option<Keep>,
        /// Write these values instead (a JSON object of columns).
        #[arg(long)]
        values: Option<String>,
        /// Who resolves (recorded on every node).
        #[arg(long)]
        by: String,
        /// Why.
        #[arg(long)]
        note: Option<String>,
        /// Resolve only if the winner is still this event (default: the winner
        /// the conflict shows when the command starts).
        #[arg(long)]
        expect_winner: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Set a table's conflict policy on every node.
    Set {
        table: String,
        #[arg(value_parser = ["lww", "manual"])]
        policy: String,
    },
}

/// Prints rows under headers, columns padded to their widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn parse_json(text: &Option<String>) -> Value {
    text.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

fn vector_json(v: &Option<pb::VersionVector>) -> Value {
    Value::Object(
        v.iter()
            .flat_map(|v| &v.entries)
            .map(|e| (e.node_id.clone(), int64_json(e.hlc)))
            .collect(),
    )
}

fn version_json(v: &Option<pb::ConflictVersion>) -> Value {
    match v {
        Some(v) => json!({
            "event_id": v.event_id,
            "hlc": int64_json(v.hlc),
            "node_id": v.node_id,
            "values": parse_json(&v.values_json),
        }),
        None => Value::Null,
    }
}

fn conflict_json(c: &pb::ConflictInfo) -> Value {
    json!({
        "conflict_id": c.conflict_id,
        "table": c.table,
        "record_id": c.record_id,
        "policy": c.policy,
        "status": c.status,
        "local": version_json(&c.local),
        "remote": version_json(&c.remote),
        "detected_at": c.detected_at,
        "resolved_at": c.resolved_at,
        "resolved_by": c.resolved_by,
        "resolution": c.resolution,
        "resolution_note": c.resolution_note,
        "resolution_event_id": c.resolution_event_id,
    })
}

fn event_json(e: &pb::Event) -> Value {
    json!({
        "event_id": e.event_id,
        "hlc": int64_json(e.hlc),
        "wall_ms": e.wall_ms,
        "node_id": e.node_id,
        "operation": pb::Operation::try_from(e.operation).map(|o| o.as_str_name()).unwrap_or("?"),
        "action": e.action,
        "old_values": parse_json(&e.old_values_json),
        "new_values": parse_json(&e.new_values_json),
    })
}

fn short(id: &str) -> String {
    id.chars().take(26).collect()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn print_json(v: &Value) {
    out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Presents the admin bearer token (`--token-file`) on every call, when given.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BearerToken")
            .field(&self.0.as_ref().map(|_| "***"))
            .finish()
    }
}

impl BearerToken {
    /// The token in `path` (none without a path).
    pub fn read(path: Option<&std::path::Path>) -> anyhow::Result<BearerToken> {
        let Some(path) = path else {
            return Ok(BearerToken(None));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
        let header = format!("Bearer {}", text.trim()).parse().map_err(|_| {
            anyhow::anyhow!(
                "--token-file {}: the token is not printable ASCII",
                path.display()
            )
        })?;
        Ok(BearerToken(Some(header)))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// A client of a node's Admin service.
pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;

/// Connects an Admin client to `addr`.
pub async fn admin_client(
    addr: &str,
    tls: &ClientTlsArgs,
    token: &BearerToken,
) -> anyhow::Result<Admin> {
    Ok(AdminClient::with_interceptor(
        connect(addr, tls).await?,
        token.clone(),
    ))
}

/// How a node's answer to an Admin call reads when it is an error.
fn rpc_error(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unimplemented {
        return anyhow::anyhow!(
            "{}: this address does not serve the Admin service: a node with admin.listen_addr set serves Admin on that address only; pass it with --addr",
            status_text(&s)
        );
    }
    anyhow::anyhow!("{}", status_text(&s))
}

/// How a node's answer to a Records call reads when it is an error.
fn records_error(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unimplemented {
        return anyhow::anyhow!(
            "{}: this address does not serve the write API: Records is served on the node's server.listen_addr (not on admin.listen_addr)",
            status_text(&s)
        );
    }
    anyhow::anyhow!("{}", status_text(&s))
}

/// A status as `Code: message`, with the transport's cause chain when the
/// status came from the client side (the node never answered).
fn status_text(s: &tonic::Status) -> String {
    let mut text = format!("{:?}", s.code());
    if !s.message().is_empty() {
        text = format!("{text}: {}", s.message());
    }
    if let Some(cause) = std::error::Error::source(s) {
        text = format!("{text}: {}", cause_chain(cause));
    }
    text
}

/// A 64-bit HLC or id as a JSON string (gRPC's JSON mapping of int64):
/// numbers beyond 2^53 lose digits in jq and JavaScript.
fn int64_json(v: i64) -> Value {
    Value::String(v.to_string())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A wall time (ms since the Unix epoch) in RFC 3339, UTC, to the millisecond.
pub(crate) fn rfc3339(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// How long ago (or ahead, for a clock in the future) a wall time is, roughly.
fn ago(ms: i64, now: i64) -> String {
    let (d, suffix) = if now >= ms {
        (now - ms, "ago")
    } else {
        (ms - now, "ahead")
    };
    let secs = d / 1000;
    let span = match secs {
        0 => return "just now".to_owned(),
        1..=119 => format!("{secs} s"),
        120..=7_199 => format!("{} min", secs / 60),
        7_200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    };
    format!("{span} {suffix}")
}

/// A wall time for an operator: RFC 3339 and how long ago.
fn when(ms: i64) -> String {
    format!("{} ({})", rfc3339(ms), ago(ms, now_ms()))
}

/// An HLC as its wall time in RFC 3339 and, when not 0, its logical counter.
fn hlc_text(raw: i64) -> String {
    match tidemark_hlc::Hlc::decode(raw) {
        Ok(h) if h.counter() > 0 => format!("{} #{}", rfc3339(h.wall_ms()), h.counter()),
        Ok(h) => rfc3339(h.wall_ms()),
        Err(_) => raw.to_string(),
    }
}

/// Runs one admin command against the node at `args.addr` (`check`: against
/// every `--node`). False when `check` found the nodes differ.
pub async fn run(args: AdminArgs) -> anyhow::Result<bool> {
    let target = Target::resolve(
        args.addr.as_deref(),
        &args.tls,
        args.token_file.as_deref(),
        args.config.as_deref(),
        true,
    )?;
    let token = BearerToken::read(target.token_file.as_deref())?;
    if let AdminCommand::Check { nodes, table } = &args.command {
        return check(nodes, table.as_deref(), &target.tls, &token, args.json).await;
    }
    if let AdminCommand::Cluster {
        nodes,
        watch,
        count,
    } = &args.command
    {
        let starts: Vec<String> = std::iter::once(target.addr.clone())
            .chain(nodes.iter().cloned())
            .collect();
        return cluster::run(&starts, &target.tls, &token, args.json, *watch, *count).await;
    }
    let mut client = admin_client(&target.addr, &target.tls, &token).await?;
    let status = rpc_error;
    match args.command {
        AdminCommand::Status => {
            let s = client
                .status(pb::StatusRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({
                    "node_id": s.node_id, "name": s.name, "cluster_id": s.cluster_id,
                    "store": s.store, "hlc": int64_json(s.hlc), "vector": vector_json(&s.vector),
                    "unsynced_events": s.unsynced_events, "pending_captures": s.pending_captures,
                    "blocked_records": s.blocked_records,
                    "unreplicated_captures": s.unreplicated_captures,
                    "quarantined_events": s.quarantined_events,
                    "writes_held": s.writes_held,
                    "state": s.state,
                    "catchup_remaining_events": s.catchup_remaining_events,
                    "catchup_held_origins": s.catchup_held_origins,
                    "positions": s.positions.iter().map(|p| json!({
                        "origin": p.origin, "hlc": int64_json(p.hlc), "seq": p.seq,
                    })).collect::<Vec<_>>(),
                    "peers": s.peers.iter().map(|p| json!({
                        "node_id": p.node_id, "name": p.name, "address": p.address, "connected": p.connected,
                        "released": p.released,
                        "unacked_events": p.unacked_events,
                        "oldest_unacked_ms": p.oldest_unacked_ms, "last_ack_ms": p.last_ack_ms,
                        "last_error": p.last_error, "acked": vector_json(&p.acked),
                        "blocked_records": p.blocked_records,
                        "held": p.held.iter().map(|h| json!({
                            "origin": h.origin, "code": h.code, "reason": h.reason,
                            "retry_at_ms": h.retry_at_ms,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "tables": s.tables.iter().map(|t| json!({
                        "name": t.name, "conflict_policy": t.conflict_policy,
                        "columns": t.columns, "open_conflicts": t.open_conflicts,
                    })).collect::<Vec<_>>(),
                }));
                return Ok(true);
            }
            out!("node     {} ({})", s.node_id, s.name);
            // The node's HLC against this machine's clock: skew shows as "ahead".
            match tidemark_hlc::Hlc::decode(s.hlc) {
                Ok(h) => out!("clock    {}", when(h.wall_ms())),
                Err(_) => out!("clock    hlc {}", s.hlc),
            }
            out!("cluster  {}", s.cluster_id);
            out!("store    {}", s.store);
            out!("{}", state_line(&s));
            out!(
                "unsynced {} events, {} captured writes pending",
                s.unsynced_events,
                s.pending_captures
            );
            out!(
                "stuck    {} blocked records (admin blocked), {} unreplicated captures (admin unreplicated), {} quarantined events",
                s.blocked_records,
                s.unreplicated_captures,
                s.quarantined_events
            );
            if s.writes_held {
                out!(
                    "writes   held: new writes wait until the peers say how far they hold this node's events"
                );
            }
            out!();
            let rows: Vec<Vec<String>> = s
                .peers
                .iter()
                .map(|p| {
                    vec![
                        if p.name.is_empty() {
                            p.node_id.clone()
                        } else {
                            format!("{} {}", p.name, p.node_id)
                        },
                        p.address.clone(),
                        if p.connected {
                            "connected".into()
                        } else if p.released {
                            "down, released".into()
                        } else {
                            "down".into()
                        },
                        p.unacked_events.to_string(),
                        if p.oldest_unacked_ms > 0 {
                            format!(
                                "{:.1} s",
                                (now_ms() - p.oldest_unacked_ms).max(0) as f64 / 1000.0
                            )
                        } else {
                            "-".into()
                        },
                        if p.last_ack_ms > 0 {
                            ago(p.last_ack_ms, now_ms())
                        } else {
                            "-".into()
                        },
                        p.blocked_records.to_string(),
                        p.held.len().to_string(),
                        or_dash(&p.last_error),
                    ]
                })
                .collect();
            print_table(
                &[
                    "peer",
                    "address",
                    "state",
                    "unacked",
                    "lag",
                    "last ack",
                    "blocked",
                    "held origins",
                    "last error",
                ],
                &rows,
            );
            let now = now_ms();
            for p in &s.peers {
                for h in &p.held {
                    out!(
                        "  {} holds origin {}: {} {} (resent in {} s)",
                        p.node_id,
                        h.origin,
                        h.code,
                        h.reason,
                        (h.retry_at_ms - now).max(0).unsigned_abs().div_ceil(1000)
                    );
                }
            }
            out!();
            let rows: Vec<Vec<String>> = s
                .tables
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.conflict_policy.clone(),
                        t.open_conflicts.to_string(),
                        t.columns.join(","),
                    ]
                })
                .collect();
            print_table(&["table", "policy", "open conflicts", "columns"], &rows);
            out!();
            // Each origin's position: its events numbered 1 to `seq` are
            // held, the newest at `hlc`.
            let rows: Vec<Vec<String>> = s
                .positions
                .iter()
                .map(|p| {
                    vec![
                        p.origin.clone(),
                        if p.seq > 0 {
                            p.seq.to_string()
                        } else {
                            "-".into()
                        },
                        hlc_text(p.hlc),
                        p.hlc.to_string(),
                    ]
                })
                .collect();
            print_table(&["origin", "position", "newest event", "hlc"], &rows);
        }
        AdminCommand::Conflicts(ConflictsCommand::List {
            table,
            status: st,
            limit,
            page_token,
        }) => {
            let resp = client
                .list_conflicts(pb::ListConflictsRequest {
                    table: table.unwrap_or_default(),
                    status: match st {
                        StatusFilter::Open => "open".into(),
                        StatusFilter::Resolved => "resolved".into(),
                        StatusFilter::All => String::new(),
                    },
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({
                    "conflicts": resp.conflicts.iter().map(conflict_json).collect::<Vec<_>>(),
                    "next_page_token": resp.next_page_token,
                }));
                return Ok(true);
            }
            let rows: Vec<Vec<String>> = resp
                .conflicts
                .iter()
                .map(|c| {
                    let node = |v: &Option<pb::ConflictVersion>| {
                        v.as_ref().map(|v| short(&v.node_id)).unwrap_or_default()
                    };
                    vec![
                        c.conflict_id.clone(),
                        c.table.clone(),
                        c.record_id.clone(),
                        c.status.clone(),
                        node(&c.local),
                        node(&c.remote),
                        or_dash(&c.resolution),
                    ]
                })
                .collect();
            print_table(
                &[
                    "conflict",
                    "table",
                    "record",
                    "status",
                    "shown (local) from",
                    "other (remote) from",
                    "resolution",
                ],
                &rows,
            );
            if !resp.next_page_token.is_empty() {
                out!("\nmore: --page-token {}", resp.next_page_token);
            }
        }
        AdminCommand::Conflicts(ConflictsCommand::Show { id }) => {
            let c = client
                .get_conflict(pb::GetConflictRequest { conflict_id: id })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&conflict_json(&c));
                return Ok(true);
            }
            out!("conflict  {}", c.conflict_id);
            out!("record    {} {}", c.table, c.record_id);
            out!("status    {} (policy {})", c.status, c.policy);
            out!("detected  {}", c.detected_at);
            if c.status == "resolved" {
                out!(
                    "resolved  {} by {} at {}{}",
                    c.resolution,
                    or_dash(&c.resolved_by),
                    c.resolved_at,
                    if c.resolution_note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", c.resolution_note)
                    }
                );
            }
            for (label, v) in [("local (shown)", &c.local), ("remote (lost)", &c.remote)] {
                if let Some(v) = v {
                    out!(
                        "\n{label}: event {} from node {} at {} (hlc {})",
                        v.event_id,
                        v.node_id,
                        hlc_text(v.hlc),
                        v.hlc
                    );
                    match &v.values_json {
                        Some(j) => out!(
                            "  {}",
                            serde_json::to_string_pretty(&parse_json(&Some(j.clone())))
                                .unwrap_or_default()
                                .replace('\n', "\n  ")
                        ),
                        None => out!("  (deleted)"),
                    }
                }
            }
        }
        AdminCommand::Conflicts(ConflictsCommand::Resolve {
            id,
            keep,
            values,
            by,
            note,
            expect_winner,
        }) => {
            // Compare-and-set against the winner the operator saw.
            let expected = match expect_winner {
                Some(e) => e,
                None => client
                    .get_conflict(pb::GetConflictRequest {
                        conflict_id: id.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .local
                    .map(|v| v.event_id)
                    .unwrap_or_default(),
            };
            let (choice, values_json) = match (keep, values) {
                (Some(Keep::Local), _) => (pb::ResolveChoice::KeepLocal, String::new()),
                (Some(Keep::Remote), _) => (pb::ResolveChoice::KeepRemote, String::new()),
                (None, Some(v)) => (pb::ResolveChoice::Merged, v),
                (None, None) => anyhow::bail!("say --keep local, --keep remote or --values JSON"),
            };
            let r = client
                .resolve_conflict(pb::ResolveConflictRequest {
                    conflict_id: id.clone(),
                    choice: choice as i32,
                    values_json,
                    resolved_by: by,
                    note: note.unwrap_or_default(),
                    expected_winner_event_id: expected,
                })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(
                    &json!({"conflict_id": id, "event_id": r.event_id, "hlc": int64_json(r.hlc), "values": parse_json(&r.values_json)}),
                );
            } else {
                out!(
                    "resolved {id} with event {}; it replicates to every node",
                    r.event_id
                );
            }
        }
        AdminCommand::Policy(PolicyCommand::Set { table, policy }) => {
            let r = client
                .set_policy(pb::SetPolicyRequest {
                    table: table.clone(),
                    conflict_policy: policy.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(
                    &json!({"table": table, "conflict_policy": policy, "event_id": r.event_id}),
                );
            } else {
                out!(
                    "table {table} now uses {policy} on every node (event {})",
                    r.event_id
                );
            }
        }
        AdminCommand::History { table, id } => {
            let r = client
                .record_history(pb::RecordHistoryRequest { table, id })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&Value::Array(r.events.iter().map(event_json).collect()));
                return Ok(true);
            }
            let rows: Vec<Vec<String>> = r
                .events
                .iter()
                .map(|e| {
                    vec![
                        hlc_text(e.hlc),
                        e.node_id.clone(),
                        pb::Operation::try_from(e.operation)
                            .map(|o| o.as_str_name().trim_start_matches("OPERATION_").to_owned())
                            .unwrap_or_default(),
                        e.action.clone().unwrap_or_else(|| "-".into()),
                        e.new_values_json.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(&["time (hlc)", "node", "op", "action", "new values"], &rows);
        }
        AdminCommand::Blocked {
            table,
            limit,
            page_token,
        } => {
            let r = client
                .list_blocked(pb::ListBlockedRequest {
                    table: table.unwrap_or_default(),
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({
                    "blocked": r.blocked.iter().map(|b| json!({
                        "table": b.table, "record_id": b.record_id, "event_id": b.event_id,
                        "kind": b.kind, "reason": b.reason, "blocker_table": b.blocker_table,
                        "blocker_id": b.blocker_id, "blocked_at": b.blocked_at,
                    })).collect::<Vec<_>>(),
                    "next_page_token": r.next_page_token,
                    "total": r.total,
                }));
                return Ok(true);
            }
            let rows: Vec<Vec<String>> = r
                .blocked
                .iter()
                .map(|b| {
                    let blocker = match (b.blocker_table.as_str(), b.blocker_id.as_str()) {
                        ("", _) => "-".to_owned(),
                        (t, "") => t.to_owned(),
                        (t, id) => format!("{t} {id}"),
                    };
                    vec![
                        b.table.clone(),
                        b.record_id.clone(),
                        b.kind.clone(),
                        blocker,
                        b.blocked_at.clone(),
                        b.reason.clone(),
                    ]
                })
                .collect();
            print_table(
                &["table", "record", "kind", "blocked by", "since", "reason"],
                &rows,
            );
            out!(
                "\n{} blocked records on this node: their winning events are kept and \
                 replicated, their rows are not here",
                r.total
            );
            if !r.next_page_token.is_empty() {
                out!("more: --page-token {}", r.next_page_token);
            }
        }
        AdminCommand::Unreplicated { limit } => {
            let r = client
                .list_unreplicated(pb::ListUnreplicatedRequest { limit })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({
                    "captures": r.captures.iter().map(|c| json!({
                        "seq": int64_json(c.seq), "table": c.table, "record_id": c.record_id,
                        "operation": c.operation, "reason": c.reason,
                        "set_aside_at": c.set_aside_at,
                    })).collect::<Vec<_>>(),
                    "total": r.total,
                }));
                return Ok(true);
            }
            let rows: Vec<Vec<String>> = r
                .captures
                .iter()
                .map(|c| {
                    vec![
                        c.seq.to_string(),
                        c.table.clone(),
                        c.record_id.clone(),
                        c.operation.clone(),
                        c.set_aside_at.clone(),
                        c.reason.clone(),
                    ]
                })
                .collect();
            print_table(
                &["seq", "table", "record", "op", "set aside", "reason"],
                &rows,
            );
            out!(
                "\n{} captured writes set aside on this node: their rows stay here, \
                 no other node has them",
                r.total
            );
        }
        AdminCommand::RetryBlocked { table } => {
            let r = client
                .retry_blocked(pb::RetryBlockedRequest {
                    table: table.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({"tried": r.tried, "placed": r.placed}));
            } else {
                out!(
                    "tried {} blocked records: {} placed, {} still blocked",
                    r.tried,
                    r.placed,
                    r.tried - r.placed.min(r.tried)
                );
            }
        }
        AdminCommand::DiscardUnreplicated { seqs, all } => {
            let r = client
                .discard_unreplicated(pb::DiscardUnreplicatedRequest { seqs, all })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({"discarded": r.discarded}));
            } else {
                out!("discarded {} entries", r.discarded);
            }
        }
        AdminCommand::Quarantined { limit } => {
            let r = client
                .list_quarantined(pb::ListQuarantinedRequest { limit })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({
                    "events": r.events.iter().map(|q| json!({
                        "event_id": q.event_id, "peer_id": q.peer_id, "code": q.code,
                        "reason": q.reason, "event": q.event_json,
                        "received_at": q.received_at,
                    })).collect::<Vec<_>>(),
                    "total": r.total,
                }));
                return Ok(true);
            }
            let rows: Vec<Vec<String>> = r
                .events
                .iter()
                .map(|q| {
                    vec![
                        q.event_id.clone(),
                        or_dash(&q.peer_id),
                        q.code.clone(),
                        or_dash(&q.received_at),
                        q.reason.clone(),
                    ]
                })
                .collect();
            print_table(&["event", "from peer", "code", "received", "reason"], &rows);
            out!(
                "\n{} events in this node's quarantine (`--json` shows each as received)",
                r.total
            );
        }
        AdminCommand::DiscardQuarantined { event_ids, all } => {
            let r = client
                .discard_quarantined(pb::DiscardQuarantinedRequest { event_ids, all })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                print_json(&json!({"discarded": r.discarded}));
            } else {
                out!("discarded {} quarantined events", r.discarded);
            }
        }
        AdminCommand::Check { nodes, table } => {
            return check(&nodes, table.as_deref(), &target.tls, &token, args.json).await;
        }
        AdminCommand::Cluster { .. } => unreachable!("answered above"),
    }
    Ok(true)
}

/// A range whose rows are at most this many on every node is compared record by
/// record.
const CHECK_RECORD_ROWS: u64 = 64;
/// How many parts a range that differs is split into.
const CHECK_PARTS: u32 = 16;

/// One node `admin check` compares.
#[derive(Debug)]
struct CheckNode {
    url: String,
    node_id: String,
    name: String,
    tables: Vec<String>,
    client: Admin,
}

/// A record that is not the same on every node comparing the table.
#[derive(Debug)]
struct RecordDiff {
    id: String,
    /// Per node comparing the table: the row's hash, `None` where it is absent.
    hashes: Vec<Option<String>>,
}

/// What `admin check` found for one table.
#[derive(Debug)]
struct TableCheck {
    table: String,
    /// Per node (in `--node` order): its rows and digest of the whole table;
    /// `None` where the table is not replicated.
    totals: Vec<Option<(u64, String)>>,
    /// The nodes that replicate the table (indexes into the nodes).
    compared: Vec<usize>,
    records: Vec<RecordDiff>,
    /// A node held more rows in a small range than one answer carries (rows
    /// changed during the check): some records were not compared.
    truncated: bool,
}

impl TableCheck {
    fn equal(&self) -> bool {
        let digests: BTreeSet<&String> = self.totals.iter().flatten().map(|(_, d)| d).collect();
        self.totals.iter().all(Option::is_some) && digests.len() <= 1 && self.records.is_empty()
    }
}

/// The short form of a hash in text output.
fn short_hash(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

async fn digest(
    node: &mut CheckNode,
    table: &str,
    range: &(String, String),
    parts: u32,
    records: bool,
) -> anyhow::Result<pb::DigestResponse> {
    node.client
        .digest(pb::DigestRequest {
            table: table.to_owned(),
            from_id: range.0.clone(),
            to_id: range.1.clone(),
            parts,
            records,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| anyhow::anyhow!("{}: {}", node.url, rpc_error(s)))
}

/// Compares one table across `nodes`: whole-table digests, then the parts of
/// each range that differ, split again until they are small, then their rows.
async fn check_table(nodes: &mut [CheckNode], table: &str) -> anyhow::Result<TableCheck> {
    let whole = (String::new(), String::new());
    let mut report = TableCheck {
        table: table.to_owned(),
        totals: vec![None; nodes.len()],
        compared: Vec::new(),
        records: Vec::new(),
        truncated: false,
    };
    for (i, node) in nodes.iter_mut().enumerate() {
        if !node.tables.iter().any(|t| t == table) {
            continue;
        }
        let answer = digest(node, table, &whole, 1, false).await?;
        let [range] = answer.ranges.as_slice() else {
            anyhow::bail!(
                "{}: expected one digest, got {}",
                node.url,
                answer.ranges.len()
            );
        };
        report.totals[i] = Some((range.rows, range.digest.clone()));
        report.compared.push(i);
    }
    let digests: BTreeSet<&String> = report.totals.iter().flatten().map(|(_, d)| d).collect();
    if digests.len() <= 1 {
        return Ok(report);
    }
    let mut differing = VecDeque::from([whole]);
    while let Some(range) = differing.pop_front() {
        let mut answers = Vec::with_capacity(report.compared.len());
        for &i in &report.compared {
            answers.push(digest(&mut nodes[i], table, &range, CHECK_PARTS, false).await?);
        }
        let parts = &answers[0].ranges;
        let same_split = answers.iter().all(|a| {
            a.ranges.len() == parts.len()
                && a.ranges
                    .iter()
                    .zip(parts)
                    .all(|(x, y)| (&x.from_id, &x.to_id) == (&y.from_id, &y.to_id))
        });
        if !same_split {
            anyhow::bail!(
                "{table}: the nodes split [{:?}, {:?}) differently (different versions of tidemark?)",
                range.0,
                range.1
            );
        }
        for (p, part) in parts.iter().enumerate() {
            let ranges: Vec<&pb::RangeDigest> = answers.iter().map(|a| &a.ranges[p]).collect();
            if ranges.iter().all(|r| r.digest == part.digest) {
                continue;
            }
            let sub = (part.from_id.clone(), part.to_id.clone());
            if ranges.iter().all(|r| r.rows <= CHECK_RECORD_ROWS) {
                compare_records(nodes, &mut report, &sub).await?;
            } else {
                differing.push_back(sub);
            }
        }
    }
    Ok(report)
}

/// Compares the rows of a small range record by record.
async fn compare_records(
    nodes: &mut [CheckNode],
    report: &mut TableCheck,
    range: &(String, String),
) -> anyhow::Result<()> {
    let mut by_id: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let n = report.compared.len();
    for (k, &i) in report.compared.iter().enumerate() {
        let answer = digest(&mut nodes[i], &report.table, range, 0, true).await?;
        report.truncated |= answer.truncated;
        for r in answer.records {
            by_id.entry(r.id).or_insert_with(|| vec![None; n])[k] = Some(r.hash);
        }
    }
    for (id, hashes) in by_id {
        let first = &hashes[0];
        if first.is_some() && hashes.iter().all(|h| h == first) {
            continue;
        }
        report.records.push(RecordDiff { id, hashes });
    }
    Ok(())
}

/// `tidemark admin check`: compares the rows of `urls`' nodes; false when they
/// differ.
async fn check(
    urls: &[String],
    table: Option<&str>,
    tls: &ClientTlsArgs,
    token: &BearerToken,
    json: bool,
) -> anyhow::Result<bool> {
    if urls.len() < 2 {
        anyhow::bail!("--node: give at least two nodes to compare");
    }
    let mut nodes = Vec::with_capacity(urls.len());
    for url in urls {
        let mut client = admin_client(url, tls, token).await?;
        let s = client
            .status(pb::StatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{url}: {}", rpc_error(s)))?
            .into_inner();
        nodes.push(CheckNode {
            url: url.clone(),
            node_id: s.node_id,
            name: s.name,
            tables: s.tables.into_iter().map(|t| t.name).collect(),
            client,
        });
    }
    let tables: BTreeSet<String> = match table {
        Some(t) if !nodes.iter().any(|n| n.tables.iter().any(|x| x == t)) => {
            anyhow::bail!("--table: none of the nodes replicates a table {t:?}")
        }
        Some(t) => BTreeSet::from([t.to_owned()]),
        None => nodes.iter().flat_map(|n| n.tables.clone()).collect(),
    };
    let mut reports = Vec::with_capacity(tables.len());
    for t in &tables {
        reports.push(check_table(&mut nodes, t).await?);
    }
    let equal = reports.iter().all(TableCheck::equal);
    if json {
        print_json(&check_json(&nodes, &reports, equal));
    } else {
        print_check(&nodes, &reports, equal);
    }
    Ok(equal)
}

fn check_json(nodes: &[CheckNode], reports: &[TableCheck], equal: bool) -> Value {
    let tables: Vec<Value> = reports
        .iter()
        .map(|r| {
            let per_node: serde_json::Map<String, Value> = nodes
                .iter()
                .zip(&r.totals)
                .map(|(n, t)| {
                    let v = match t {
                        Some((rows, digest)) => json!({"rows": rows, "digest": digest}),
                        None => Value::Null,
                    };
                    (n.url.clone(), v)
                })
                .collect();
            let records: Vec<Value> = r
                .records
                .iter()
                .map(|d| {
                    let urls = r.compared.iter().map(|&i| &nodes[i].url);
                    let hashes: serde_json::Map<String, Value> = urls
                        .clone()
                        .zip(&d.hashes)
                        .map(|(u, h)| (u.clone(), json!(h)))
                        .collect();
                    let missing_on: Vec<&String> = urls
                        .zip(&d.hashes)
                        .filter(|(_, h)| h.is_none())
                        .map(|(u, _)| u)
                        .collect();
                    let values: BTreeSet<&String> = d.hashes.iter().flatten().collect();
                    json!({
                        "id": d.id,
                        "hashes": hashes,
                        "missing_on": missing_on,
                        "values_differ": values.len() > 1,
                    })
                })
                .collect();
            json!({
                "table": r.table,
                "equal": r.equal(),
                "nodes": per_node,
                "not_replicated_on": nodes.iter().zip(&r.totals)
                    .filter(|(_, t)| t.is_none()).map(|(n, _)| &n.url).collect::<Vec<_>>(),
                "records": records,
                "truncated": r.truncated,
            })
        })
        .collect();
    json!({
        "equal": equal,
        "nodes": nodes.iter().map(|n| json!({
            "url": n.url, "node_id": n.node_id, "name": n.name,
        })).collect::<Vec<_>>(),
        "tables": tables,
    })
}

fn print_check(nodes: &[CheckNode], reports: &[TableCheck], equal: bool) {
    for n in nodes {
        out!("node {} ({} {})", n.url, n.name, n.node_id);
    }
    out!();
    for r in reports {
        let absent: Vec<&str> = nodes
            .iter()
            .zip(&r.totals)
            .filter(|(_, t)| t.is_none())
            .map(|(n, _)| n.url.as_str())
            .collect();
        let totals: Vec<&(u64, String)> = r.totals.iter().flatten().collect();
        if r.equal() {
            if let Some((rows, digest)) = totals.first() {
                out!(
                    "{}: equal on every node, {rows} rows, digest {}",
                    r.table,
                    short_hash(digest)
                );
            }
            continue;
        }
        let rows: Vec<String> = r
            .compared
            .iter()
            .zip(&totals)
            .map(|(&i, (rows, digest))| {
                format!("{} {rows} rows ({})", nodes[i].url, short_hash(digest))
            })
            .collect();
        out!("{}: differs: {}", r.table, rows.join(", "));
        if !absent.is_empty() {
            out!("  not replicated on {}", absent.join(", "));
        }
        for d in &r.records {
            let urls: Vec<&str> = r.compared.iter().map(|&i| nodes[i].url.as_str()).collect();
            let missing: Vec<&str> = urls
                .iter()
                .zip(&d.hashes)
                .filter(|(_, h)| h.is_none())
                .map(|(u, _)| *u)
                .collect();
            // Nodes grouped by the value they hold, in --node order.
            let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
            for (u, h) in urls.iter().zip(&d.hashes) {
                let Some(h) = h.as_deref() else { continue };
                match groups.iter_mut().find(|(g, _)| *g == h) {
                    Some((_, us)) => us.push(u),
                    None => groups.push((h, vec![u])),
                }
            }
            let mut said = Vec::new();
            if !missing.is_empty() {
                said.push(format!("missing on {}", missing.join(", ")));
            }
            if groups.len() > 1 {
                let values: Vec<String> = groups
                    .iter()
                    .map(|(h, us)| format!("{} ({})", us.join(", "), short_hash(h)))
                    .collect();
                said.push(format!("different values: {}", values.join(" | ")));
            } else if let Some((_, us)) = groups.first() {
                said.push(format!("present on {}", us.join(", ")));
            }
            out!("  {}  {}", d.id, said.join("; "));
        }
        if r.truncated {
            out!("  (rows changed during the check: some ranges were cut; run it again)");
        }
    }
    out!(
        "\n{}",
        if equal {
            "every table is equal on every node"
        } else {
            "the nodes differ"
        }
    );
}

#[derive(Debug, Args)]
pub struct RecordsArgs {
    /// The node's gRPC address (server.listen_addr): host:port (http://, or
    /// https:// with certificates) or a URL. Default: from --config, else
    /// 127.0.0.1:7070.
    #[arg(long, global = true)]
    pub addr: Option<String>,
    /// A node's config file: the address and the TLS files come from it
    /// (flags given beside it win).
    #[arg(long, global = true)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(subcommand)]
    pub command: RecordsCommand,
}

#[derive(Debug, Subcommand)]
pub enum RecordsCommand {
    /// Insert a record, or update the given columns of an existing one.
    Put {
        table: String,
        /// The record's ULID (`tidemark new-id`).
        id: String,
        /// A JSON object of column values.
        values: String,
    },
    /// Print a record's values as JSON (exit 1 when absent).
    Get { table: String, id: String },
    /// Delete a record.
    Delete { table: String, id: String },
}

/// Runs one write-API command against the node at `args.addr`, printing JSON.
pub async fn records(args: RecordsArgs) -> anyhow::Result<bool> {
    let target = Target::resolve(
        args.addr.as_deref(),
        &args.tls,
        None,
        args.config.as_deref(),
        false,
    )?;
    let mut client =
        pb::records_client::RecordsClient::new(connect(&target.addr, &target.tls).await?);
    let status = records_error;
    let write = |w: pb::WriteResponse| {
        json!({
            "written": w.written, "event_id": w.event_id, "hlc": int64_json(w.hlc),
            "operation": w.operation, "values": parse_json(&w.values_json),
        })
    };
    match args.command {
        RecordsCommand::Put { table, id, values } => {
            let w = client
                .put(pb::PutRequest {
                    table,
                    id,
                    values_json: values,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_json(&write(w));
            Ok(true)
        }
        RecordsCommand::Delete { table, id } => {
            let w = client
                .delete(pb::DeleteRequest { table, id })
                .await
                .map_err(status)?
                .into_inner();
            print_json(&write(w));
            Ok(true)
        }
        RecordsCommand::Get { table, id } => {
            let g = client
                .get(pb::GetRequest { table, id })
                .await
                .map_err(status)?
                .into_inner();
            print_json(&json!({
                "found": g.found, "values": parse_json(&g.values_json), "hlc": int64_json(g.hlc), "node_id": g.node_id,
            }));
            Ok(g.found)
        }
    }
}

/// The status line saying where the node stands since it started.
fn state_line(s: &pb::StatusResponse) -> String {
    let held = if s.catchup_held_origins.is_empty() {
        String::new()
    } else {
        format!(
            " (left out, held here: {})",
            s.catchup_held_origins.join(", ")
        )
    };
    match s.state.as_str() {
        "active" => format!("state    active: ready{held}"),
        "waiting_for_peer" => {
            "state    waiting for a peer: no session welcomed yet, not ready".into()
        }
        "catching_up" => format!(
            "state    catching up: {} events behind what its peers held when it met them, not ready{held}",
            s.catchup_remaining_events
        ),
        other => format!("state    {other}"),
    }
}

/// `tidemark healthcheck`: GET /readyz on the metrics listener; true when it
/// answers 200. For container health checks in images without curl.
pub fn healthcheck(addr: &str, timeout: std::time::Duration) -> anyhow::Result<bool> {
    answers_ok(addr, "/readyz", timeout)
}

/// Whether `GET path` on the metrics listener `addr` answers 200.
pub(crate) fn answers_ok(
    addr: &str,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<bool> {
    let response = http_get(addr, path, timeout)?;
    Ok(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
}

/// The whole response (status line, headers, body) to `GET path` over plain
/// HTTP/1.0 on `addr` (the metrics listener).
pub(crate) fn http_get(
    addr: &str,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| anyhow::anyhow!("--addr {addr}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--addr {addr}: no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc3339_and_ago() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_528_000_123), "2025-11-30T18:40:00.123Z");
        assert_eq!(ago(10_000, 10_400), "just now");
        assert_eq!(ago(10_000, 13_000), "3 s ago");
        assert_eq!(ago(0, 600_000), "10 min ago");
        assert_eq!(ago(0, 3 * 3_600_000), "3 h ago");
        assert_eq!(ago(0, 3 * 86_400_000), "3 d ago");
        assert_eq!(ago(130_000, 10_000), "2 min ahead");
    }

    #[test]
    fn hlcs_read_as_their_wall_time_and_counter() {
        let plain = tidemark_hlc::Hlc::from_parts(1_764_528_000_123, 0).expect("hlc");
        assert_eq!(hlc_text(plain.encode()), "2025-11-30T18:40:00.123Z");
        let counted = tidemark_hlc::Hlc::from_parts(1_764_528_000_123, 7).expect("hlc");
        assert_eq!(hlc_text(counted.encode()), "2025-11-30T18:40:00.123Z #7");
    }
}
