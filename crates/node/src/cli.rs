//! `tidemark admin ...`: a client of a node's Admin service, printing readable
//! tables, or JSON with `--json` for scripts.

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tidemark_replicator::pb::{self, admin_client::AdminClient};
use tonic::transport::Channel;

/// Client certificate options, for a node whose listener requires mutual TLS
/// (use `https://` addresses then).
#[derive(Debug, Args, Clone, Default)]
pub struct ClientTlsArgs {
    /// The cluster CA (PEM).
    #[arg(long, requires_all = ["cert_file", "key_file"])]
    pub ca_file: Option<std::path::PathBuf>,
    /// A certificate signed by the cluster CA (PEM).
    #[arg(long)]
    pub cert_file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub key_file: Option<std::path::PathBuf>,
}

/// Connects to `addr`, with mutual TLS when certificates are given.
pub async fn connect(addr: &str, tls: &ClientTlsArgs) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(addr.to_owned())
        .map_err(|e| anyhow::anyhow!("--addr {addr:?}: {e}"))?;
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
        .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The node's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub addr: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// A file holding the node's admin bearer token (admin.token_file).
    #[arg(long)]
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
        println!("{}", padded.join("  ").trim_end());
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
            .map(|e| (e.node_id.clone(), json!(e.hlc)))
            .collect(),
    )
}

fn version_json(v: &Option<pb::ConflictVersion>) -> Value {
    match v {
        Some(v) => json!({
            "event_id": v.event_id,
            "hlc": v.hlc,
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
        "hlc": e.hlc,
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
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs one admin command against the node at `args.addr`.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let channel = connect(&args.addr, &args.tls).await?;
    let token = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
            let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {}", text.trim()).parse().map_err(|_| {
                    anyhow::anyhow!(
                        "--token-file {}: the token is not printable ASCII",
                        path.display()
                    )
                })?;
            Some(header)
        }
        None => None,
    };
    let mut client = AdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(t) = &token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    });
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
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
                    "store": s.store, "hlc": s.hlc, "vector": vector_json(&s.vector),
                    "unsynced_events": s.unsynced_events, "pending_captures": s.pending_captures,
                    "peers": s.peers.iter().map(|p| json!({
                        "node_id": p.node_id, "address": p.address, "connected": p.connected,
                        "unacked_events": p.unacked_events, "last_ack_ms": p.last_ack_ms,
                        "last_error": p.last_error, "acked": vector_json(&p.acked),
                    })).collect::<Vec<_>>(),
                    "tables": s.tables.iter().map(|t| json!({
                        "name": t.name, "conflict_policy": t.conflict_policy,
                        "columns": t.columns, "open_conflicts": t.open_conflicts,
                    })).collect::<Vec<_>>(),
                }));
                return Ok(());
            }
            println!("node     {} ({})", s.node_id, s.name);
            println!("cluster  {}", s.cluster_id);
            println!("store    {}", s.store);
            println!(
                "unsynced {} events, {} captured writes pending\n",
                s.unsynced_events, s.pending_captures
            );
            let rows: Vec<Vec<String>> = s
                .peers
                .iter()
                .map(|p| {
                    vec![
                        p.node_id.clone(),
                        p.address.clone(),
                        if p.connected {
                            "connected".into()
                        } else {
                            "down".into()
                        },
                        p.unacked_events.to_string(),
                        or_dash(&p.last_error),
                    ]
                })
                .collect();
            print_table(
                &["peer", "address", "state", "unacked", "last error"],
                &rows,
            );
            println!();
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
            println!();
            let rows: Vec<Vec<String>> = s
                .vector
                .iter()
                .flat_map(|v| &v.entries)
                .map(|e| vec![e.node_id.clone(), e.hlc.to_string()])
                .collect();
            print_table(&["origin", "highest hlc"], &rows);
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
                return Ok(());
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
                println!("\nmore: --page-token {}", resp.next_page_token);
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
                return Ok(());
            }
            println!("conflict  {}", c.conflict_id);
            println!("record    {} {}", c.table, c.record_id);
            println!("status    {} (policy {})", c.status, c.policy);
            println!("detected  {}", c.detected_at);
            if c.status == "resolved" {
                println!(
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
                    println!(
                        "\n{label}: event {} from node {} at hlc {}",
                        v.event_id, v.node_id, v.hlc
                    );
                    match &v.values_json {
                        Some(j) => println!(
                            "  {}",
                            serde_json::to_string_pretty(&parse_json(&Some(j.clone())))
                                .unwrap_or_default()
                                .replace('\n', "\n  ")
                        ),
                        None => println!("  (deleted)"),
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
                    &json!({"conflict_id": id, "event_id": r.event_id, "hlc": r.hlc, "values": parse_json(&r.values_json)}),
                );
            } else {
                println!(
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
                println!(
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
                return Ok(());
            }
            let rows: Vec<Vec<String>> = r
                .events
                .iter()
                .map(|e| {
                    vec![
                        e.hlc.to_string(),
                        e.node_id.clone(),
                        pb::Operation::try_from(e.operation)
                            .map(|o| o.as_str_name().trim_start_matches("OPERATION_").to_owned())
                            .unwrap_or_default(),
                        e.action.clone().unwrap_or_else(|| "-".into()),
                        e.new_values_json.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(&["hlc", "node", "op", "action", "new values"], &rows);
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct RecordsArgs {
    /// The node's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub addr: String,
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
    let mut client = pb::records_client::RecordsClient::new(connect(&args.addr, &args.tls).await?);
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    let write = |w: pb::WriteResponse| {
        json!({
            "written": w.written, "event_id": w.event_id, "hlc": w.hlc,
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
                "found": g.found, "values": parse_json(&g.values_json), "hlc": g.hlc, "node_id": g.node_id,
            }));
            Ok(g.found)
        }
    }
}

/// `tidemark healthcheck`: GET /readyz on the metrics listener; true when it
/// answers 200. For container health checks in images without curl.
pub fn healthcheck(addr: &str, timeout: std::time::Duration) -> anyhow::Result<bool> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| anyhow::anyhow!("--addr {addr}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--addr {addr}: no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
}
