//! The daemon's configuration: a TOML file, every key overridable by an
//! environment variable `TIDEMARK_<SECTION>__<KEY>` (e.g. `TIDEMARK_STORE__URL`,
//! `TIDEMARK_SERVER__LISTEN_ADDR`), validated at start with errors that name the
//! key and the bad value.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value as FigValue;
use serde::Deserialize;
use tidemark_replicator::{LocalNode, Peer, ReplicationOptions};
use tidemark_store::model::parse_ulid;
use tidemark_store::{ColumnType, ConflictPolicy, StoreUrl};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "TIDEMARK_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// Mutual TLS between peers (and for the write API and Admin on the peer listener).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM of the cluster CA that signs every node certificate.
    pub ca_file: String,
    /// PEM of this node's certificate (its common name is the node id).
    pub cert_file: String,
    /// PEM of this node's private key.
    pub key_file: String,
    /// Run peers in plaintext, without authentication. Required when no
    /// certificates are configured; a warning is logged at start.
    pub insecure: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// A separate listener for the Admin service (and health, reflection); empty
    /// serves it on server.listen_addr.
    pub listen_addr: String,
    /// A file holding the bearer token Admin callers must present
    /// (`authorization: Bearer <token>`); empty leaves the Admin RPC open.
    pub token_file: String,
}

/// Roles for callers that present a client certificate (mutual TLS), by the
/// certificate's common name (`tidemark cert client --name NAME`); `"*"` gives
/// the role to every certificate of the cluster CA. See `crate::access`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// May write through the Records service.
    pub writers: Vec<String>,
    /// May call the Admin service (so may the Admin token's bearer).
    pub operators: Vec<String>,
}

/// A secret that never shows in logs or Debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id, a ULID (`tidemark new-id` prints one).
    pub id: String,
    /// A human-readable name, for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Nodes only replicate with nodes of the same cluster.
    pub cluster_id: String,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub url: String,
    #[serde(default = "StoreConfig::default_max_connections")]
    pub max_connections: u32,
    /// SQLite: how long to wait for another writer's lock.
    #[serde(default = "StoreConfig::default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    /// SQLite `PRAGMA synchronous`: `normal` (durable across process crashes) or
    /// `full` (also across power loss).
    #[serde(default = "StoreConfig::default_sqlite_synchronous")]
    pub sqlite_synchronous: String,
    /// SQLite `PRAGMA max_page_count`: the database cannot grow beyond this many
    /// pages (0: no limit). Caps the disk a node may use; a write past it fails
    /// like a full disk.
    #[serde(default)]
    pub sqlite_max_page_count: u32,
    /// PostgreSQL: how long to wait for a connection.
    #[serde(default = "StoreConfig::default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// PostgreSQL: how long a daemon transaction waits for application writers
    /// holding the capture queue before it is retried.
    #[serde(default = "StoreConfig::default_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
    /// Largest event a write may produce (the row's values as JSON): a larger API
    /// write is refused, a larger direct write is set aside and reported. Must
    /// leave room in replication.max_message_bytes.
    #[serde(default = "StoreConfig::default_max_event_bytes")]
    pub max_event_bytes: u64,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &tidemark_store::postgres::redact(&self.url))
            .field("max_connections", &self.max_connections)
            .field("busy_timeout_ms", &self.busy_timeout_ms)
            .field("sqlite_synchronous", &self.sqlite_synchronous)
            .field("sqlite_max_page_count", &self.sqlite_max_page_count)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("lock_timeout_ms", &self.lock_timeout_ms)
            .field("max_event_bytes", &self.max_event_bytes)
            .finish()
    }
}

impl StoreConfig {
    const fn default_max_connections() -> u32 {
        4
    }
    const fn default_max_event_bytes() -> u64 {
        tidemark_store::DEFAULT_MAX_EVENT_BYTES as u64
    }
    const fn default_busy_timeout_ms() -> u64 {
        5_000
    }
    fn default_sqlite_synchronous() -> String {
        "normal".into()
    }
    const fn default_connect_timeout_ms() -> u64 {
        10_000
    }
    const fn default_lock_timeout_ms() -> u64 {
        10_000
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// Remote timestamps further ahead of the local wall clock are refused.
    #[serde(default = "ClockConfig::default_max_drift_ms")]
    pub max_drift_ms: u64,
    /// Shifts this node's wall clock by this many ms (for testing clock skew;
    /// leave 0 in production).
    #[serde(default)]
    pub offset_ms: i64,
}

impl ClockConfig {
    const fn default_max_drift_ms() -> u64 {
        tidemark_hlc::Clock::DEFAULT_MAX_DRIFT_MS
    }
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            max_drift_ms: Self::default_max_drift_ms(),
            offset_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listener for peers and the write API.
    #[serde(default = "ServerConfig::default_listen_addr")]
    pub listen_addr: String,
    /// Most concurrent gRPC streams per connection.
    #[serde(default = "ServerConfig::default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Deadline for unary requests (the write API).
    #[serde(default = "ServerConfig::default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// HTTP listener for /metrics, /healthz and /readyz; empty disables it.
    #[serde(default = "ServerConfig::default_metrics_listen_addr")]
    pub metrics_listen_addr: String,
    /// Most bytes of values all write-API requests being processed may carry
    /// together; a write that does not fit is refused with RESOURCE_EXHAUSTED.
    #[serde(default = "ServerConfig::default_max_write_bytes_in_flight")]
    pub max_write_bytes_in_flight: u64,
}

impl ServerConfig {
    fn default_listen_addr() -> String {
        "127.0.0.1:7070".into()
    }
    const fn default_max_concurrent_streams() -> u32 {
        64
    }
    const fn default_request_timeout_ms() -> u64 {
        30_000
    }
    fn default_metrics_listen_addr() -> String {
        "127.0.0.1:9464".into()
    }
    const fn default_max_write_bytes_in_flight() -> u64 {
        64 << 20
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen_addr: Self::default_listen_addr(),
            max_concurrent_streams: Self::default_max_concurrent_streams(),
            request_timeout_ms: Self::default_request_timeout_ms(),
            metrics_listen_addr: Self::default_metrics_listen_addr(),
            max_write_bytes_in_flight: Self::default_max_write_bytes_in_flight(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    pub batch_size: u32,
    pub max_batch_bytes: usize,
    pub max_unacked_batches: usize,
    pub max_batch_events: usize,
    pub max_message_bytes: usize,
    pub connect_timeout_ms: u64,
    pub ack_timeout_ms: u64,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    /// HTTP/2 PING interval on peer connections; an unanswered PING closes the
    /// connection after twice this.
    pub keepalive_ms: u64,
    /// SQLite: how often to look for direct writes to capture (PostgreSQL is woken
    /// by NOTIFY and polls at this interval only as a fallback, at least 1 s).
    pub capture_poll_ms: u64,
    /// At start, how long API writes and capture draining wait for every peer
    /// to say how far it holds this node's own events (a database restored from
    /// an older copy lacks some); 0 starts writing at once. Readiness waits as
    /// long for every peer to answer before it counts only those that did.
    pub startup_check_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        let o = ReplicationOptions::default();
        ReplicationConfig {
            batch_size: o.batch_size,
            max_batch_bytes: o.max_batch_bytes,
            max_unacked_batches: o.max_unacked_batches,
            max_batch_events: o.max_batch_events,
            max_message_bytes: o.max_message_bytes,
            connect_timeout_ms: o.connect_timeout_ms,
            ack_timeout_ms: o.ack_timeout_ms,
            reconnect_initial_ms: o.reconnect_initial_ms,
            reconnect_max_ms: o.reconnect_max_ms,
            keepalive_ms: o.keepalive_ms,
            capture_poll_ms: 10,
            startup_check_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's node id (ULID); the peer must answer with it.
    pub node_id: String,
    /// The peer's gRPC address, `http://HOST:PORT` (`https://` under TLS).
    pub address: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Whether events of other origins are accepted from this peer (relaying).
    /// When false, only events the peer itself originated are.
    #[serde(default = "PeerConfig::default_may_relay")]
    pub may_relay: bool,
}

impl PeerConfig {
    const fn default_may_relay() -> bool {
        true
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// A table with a single-column ULID primary key.
    pub name: String,
    /// `lww` (default) or `manual`.
    #[serde(default = "TableConfig::default_policy")]
    pub conflict_policy: String,
    /// SQLite only: the class of columns whose declared type does not say it,
    /// e.g. `price = "decimal(10,2)"` for a TEXT column holding exact decimals.
    #[serde(default)]
    pub types: BTreeMap<String, String>,
}

impl TableConfig {
    fn default_policy() -> String {
        "lww".into()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `tidemark=debug,info`...
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Log compaction. Off by default: `change_events` then keeps every change
/// ever made (an audit trail).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delete superseded events every peer acknowledged (each record keeps
    /// its current version; see ARCHITECTURE.md, Retention).
    pub enabled: bool,
    /// Keep every event at least this long (seconds), acknowledged or not.
    pub min_age_secs: u64,
    /// Events one compaction step looks at (one short write transaction).
    pub batch: u32,
    /// Pause between compaction steps while there is work, ms.
    pub step_pause_ms: u64,
    /// Pause after a pass over the whole log, seconds.
    pub interval_secs: u64,
    /// A peer this daemon has seen disconnected for this long (seconds) while
    /// it lacks events is released: synced_at, and so compaction, stop waiting
    /// for it until it connects again. 0: a peer is waited for however long it is
    /// away. Applies whether or not compaction is enabled.
    pub max_peer_absence_secs: u64,
    /// Keep tombstones (deleted records' last versions) however old.
    pub keep_tombstones: bool,
    /// A tombstone goes once its delete is this old (seconds; at least
    /// `min_age_secs`) and every configured peer, released ones included,
    /// acknowledged it. A node cut off from every path for longer must rejoin
    /// as a new node (see ARCHITECTURE.md, Retention).
    pub tombstone_min_age_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            enabled: false,
            min_age_secs: 7 * 24 * 3600,
            batch: 5000,
            step_pause_ms: 100,
            interval_secs: 60,
            max_peer_absence_secs: 0,
            keep_tombstones: false,
            tombstone_min_age_secs: 30 * 24 * 3600,
        }
    }
}

/// Retention as the daemon runs it (see [`RetentionConfig`]); `None` when off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    pub min_age: Duration,
    /// `None`: tombstones are kept.
    pub tombstone_min_age: Option<Duration>,
    pub batch: u32,
    pub step_pause: Duration,
    pub interval: Duration,
}

/// Removes the value at `path` (dictionary keys, array indices) from a tree;
/// returns whether there was one.
fn remove_key(tree: &mut FigValue, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = tree;
    for key in parents {
        at = match at {
            FigValue::Dict(_, dict) => match dict.get_mut(key) {
                Some(v) => v,
                None => return false,
            },
            FigValue::Array(_, items) => {
                match key.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(v) => v,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match at {
        FigValue::Dict(_, dict) => dict.remove(last).is_some(),
        FigValue::Array(_, items) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// A configuration problem, naming the key and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The checked form of a configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub local: LocalNode,
    pub name: String,
    pub store_url: StoreUrl,
    pub max_drift_ms: u64,
    pub clock_offset_ms: i64,
    pub listen_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub admin_token: Option<Secret>,
    /// Certificate common names given the writer and operator roles.
    pub writers: Vec<String>,
    pub operators: Vec<String>,
    /// Mutual TLS between peers; `None` runs plaintext (tls.insecure).
    pub tls: Option<tidemark_replicator::PeerTls>,
    pub max_concurrent_streams: u32,
    pub request_timeout: Duration,
    pub replication: ReplicationOptions,
    pub capture_poll: Duration,
    /// See `replication.startup_check_ms`.
    pub startup_check: Duration,
    pub peers: Vec<Peer>,
    /// Peers' names as configured (`[[peers]] name`), for people to read.
    pub peer_names: BTreeMap<ulid::Ulid, String>,
    pub tables: Vec<TableSettings>,
    /// Largest event (a row's values as JSON) a write may produce.
    pub max_event_bytes: usize,
    /// See `server.max_write_bytes_in_flight`.
    pub max_write_bytes_in_flight: usize,
    pub log: LogConfig,
    pub retention: Option<RetentionSettings>,
}

impl Settings {
    /// What `check-config` prints: the settings an operator checks, readable
    /// (ids as ULIDs, no secrets).
    pub fn summary(&self) -> String {
        let listed = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        let on_off = |a: Option<SocketAddr>, what: &str| {
            a.map_or_else(|| format!("off ({what} not set)"), |a| a.to_string())
        };
        let mut out = vec![
            format!("node        {} ({})", self.local.node_id, self.name),
            format!("cluster     {}", self.local.cluster_id),
            format!("store       {}", self.store_url),
            format!("listen      {} (records and replication)", self.listen_addr),
            format!(
                "admin       {}{}",
                self.admin_addr.map_or_else(
                    || format!("{} (the main listener)", self.listen_addr),
                    |a| a.to_string()
                ),
                if self.admin_token.is_some() {
                    ", token required"
                } else {
                    ", no token"
                }
            ),
            format!(
                "access      writers: {}; operators: {} (client certificates by common name)",
                listed(&self.writers),
                listed(&self.operators)
            ),
            format!(
                "metrics     {}",
                on_off(self.metrics_addr, "metrics.listen_addr")
            ),
            format!(
                "peers tls   {}",
                if self.tls.is_some() {
                    "mutual TLS"
                } else {
                    "plaintext (tls.insecure = true)"
                }
            ),
            format!(
                "clock       max drift {} ms, offset {} ms",
                self.max_drift_ms, self.clock_offset_ms
            ),
            format!("log         {} ({})", self.log.level, self.log.format),
            format!(
                "retention   {}",
                self.retention.as_ref().map_or_else(
                    || "off (change_events keeps every change)".to_owned(),
                    |r| format!(
                        "superseded events acknowledged by every peer, after {} s; tombstones {}",
                        r.min_age.as_secs(),
                        r.tombstone_min_age.map_or_else(
                            || "kept".to_owned(),
                            |t| format!("after {} s", t.max(r.min_age).as_secs())
                        )
                    )
                )
            ),
            format!("peers       {}", self.peers.len()),
        ];
        for p in &self.peers {
            out.push(format!(
                "  {} {}{}",
                p.node_id,
                p.address,
                if p.may_relay {
                    ""
                } else {
                    " (its own events only)"
                }
            ));
        }
        out.push(format!("tables      {}", self.tables.len()));
        for t in &self.tables {
            let types: Vec<String> = t.types.iter().map(|(c, ty)| format!("{c} {ty}")).collect();
            out.push(format!(
                "  {} ({}{})",
                t.name,
                t.policy.as_str(),
                if types.is_empty() {
                    String::new()
                } else {
                    format!("; {}", types.join(", "))
                }
            ));
        }
        out.join("\n")
    }
}

/// A replicated table as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSettings {
    pub name: String,
    /// Applies at first registration only (afterwards the replicated registry rules).
    pub policy: ConflictPolicy,
    /// Column class overrides (SQLite).
    pub types: BTreeMap<String, ColumnType>,
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Most keys one read of a configuration reports as unreadable.
const MAX_PARSE_ERRORS: usize = 64;

impl Config {
    /// Reads `path`, then applies `TIDEMARK_*` environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        if !path.is_file() {
            return Err(err(
                "--config",
                format!("{} does not exist or is not a file", path.display()),
            )
            .into());
        }
        Self::from_figment(Figment::from(Toml::file_exact(path)))
    }

    /// Parses TOML text, then applies `TIDEMARK_*` environment overrides.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    /// Extracts the configuration. A key that cannot be read (unknown, or of
    /// the wrong type) is reported and left out, and the rest read again, so
    /// every such key is named at once, followed by what [`Config::validate`]
    /// finds in the rest.
    fn from_figment(f: Figment) -> Result<Config, ConfigErrors> {
        // Only TIDEMARK_<SECTION>__<KEY>: other TIDEMARK_* variables (used by
        // scripts and tests) are not configuration.
        let merged = f.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        let first = match merged.extract::<Config>() {
            Ok(config) => return Ok(config),
            Err(e) => e,
        };
        let Ok(mut tree) = merged.extract::<FigValue>() else {
            // Not even a tree of values (a TOML syntax error): one error.
            return Err(Self::figment_errors(&merged, first).into());
        };
        let mut errors = Vec::new();
        let mut next = first;
        loop {
            let bad = Self::bad_key(&next);
            errors.push(Self::figment_errors(&merged, next));
            if errors.len() >= MAX_PARSE_ERRORS || !bad.is_some_and(|k| remove_key(&mut tree, &k)) {
                return Err(ConfigErrors(errors));
            }
            match Figment::from(Serialized::defaults(&tree)).extract::<Config>() {
                Ok(rest) => {
                    if let Err(more) = rest.validate() {
                        errors.extend(more);
                    }
                    return Err(ConfigErrors(errors));
                }
                Err(e) => next = e,
            }
        }
    }

    /// The key an extraction error is about, when leaving it out may let the
    /// rest be read (not for a missing key).
    fn bad_key(e: &figment::Error) -> Option<Vec<String>> {
        use figment::error::Kind;
        match &e.kind {
            Kind::MissingField(_) => None,
            Kind::UnknownField(field, _) => {
                let mut path = e.path.clone();
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                Some(path)
            }
            _ => (!e.path.is_empty()).then(|| e.path.clone()),
        }
    }

    /// A figment error as a [`ConfigError`] naming the key and where the value
    /// came from (the file or an environment variable).
    fn figment_errors(merged: &Figment, e: figment::Error) -> ConfigError {
        let path = match &e.kind {
            figment::error::Kind::UnknownField(..) => Self::bad_key(&e).unwrap_or_default(),
            _ => e.path.clone(),
        };
        let key = if path.is_empty() {
            "config".to_owned()
        } else {
            path.join(".")
        };
        let source = merged
            .find_metadata(&key)
            .or(e.metadata.as_ref())
            .map(|m| format!(" (from {})", m.name))
            .unwrap_or_default();
        err(key, format!("{}{source}", e.kind))
    }

    /// Checks every value; all problems are reported at once.
    pub fn validate(&self) -> Result<Settings, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let node_id = match parse_ulid("node.id", &self.node.id) {
            Ok(id) if id.0 != 0 => Some(id),
            _ => {
                errors.push(err(
                    "node.id",
                    format!("{:?} is not a ULID (26 Crockford base32 characters; `tidemark new-id` prints one)", self.node.id),
                ));
                None
            }
        };
        if self.node.cluster_id.trim().is_empty() || self.node.cluster_id.len() > 128 {
            errors.push(err(
                "node.cluster_id",
                format!("{:?} must be 1 to 128 characters", self.node.cluster_id),
            ));
        }
        let store_url = match self.store.url.parse::<StoreUrl>() {
            Ok(mut url) => {
                match &mut url {
                    StoreUrl::Sqlite(o) => {
                        o.busy_timeout = Duration::from_millis(self.store.busy_timeout_ms);
                        o.max_connections = self.store.max_connections;
                        o.max_page_count = (self.store.sqlite_max_page_count > 0)
                            .then_some(self.store.sqlite_max_page_count);
                        match self.store.sqlite_synchronous.as_str() {
                            "normal" => o.synchronous_full = false,
                            "full" => o.synchronous_full = true,
                            other => errors.push(err(
                                "store.sqlite_synchronous",
                                format!("{other:?} is not one of normal, full"),
                            )),
                        }
                    }
                    StoreUrl::Postgres(o) => {
                        o.max_connections = self.store.max_connections;
                        o.connect_timeout = Duration::from_millis(self.store.connect_timeout_ms);
                        o.lock_timeout = Duration::from_millis(self.store.lock_timeout_ms);
                    }
                }
                Some(url)
            }
            Err(e) => {
                errors.push(err("store.url", e.to_string()));
                None
            }
        };
        if !(1..=1024).contains(&self.store.max_connections) {
            errors.push(err(
                "store.max_connections",
                format!("{} must be between 1 and 1024", self.store.max_connections),
            ));
        }
        if self.clock.max_drift_ms == 0 || self.clock.max_drift_ms > 86_400_000 {
            errors.push(err(
                "clock.max_drift_ms",
                format!(
                    "{} must be between 1 and 86400000 (one day)",
                    self.clock.max_drift_ms
                ),
            ));
        }
        let listen_addr = match self.server.listen_addr.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(err(
                    "server.listen_addr",
                    format!("{:?} is not an IP:PORT address", self.server.listen_addr),
                ));
                None
            }
        };
        let parse_optional_addr = |key: &str, value: &str, errors: &mut Vec<ConfigError>| {
            if value.is_empty() {
                return None;
            }
            match value.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errors.push(err(
                        key,
                        format!("{value:?} is not an IP:PORT address (or empty to disable)"),
                    ));
                    None
                }
            }
        };
        let metrics_addr = parse_optional_addr(
            "server.metrics_listen_addr",
            &self.server.metrics_listen_addr,
            &mut errors,
        );
        let admin_addr =
            parse_optional_addr("admin.listen_addr", &self.admin.listen_addr, &mut errors);
        for (key, names) in [
            ("access.writers", &self.access.writers),
            ("access.operators", &self.access.operators),
        ] {
            for name in names {
                if name.trim().is_empty() || name.trim() != name {
                    errors.push(err(
                        key,
                        format!("{name:?} is not a certificate common name (nor \"*\")"),
                    ));
                }
            }
        }
        let admin_token = if self.admin.token_file.is_empty() {
            None
        } else {
            match std::fs::read_to_string(&self.admin.token_file) {
                Ok(t) if t.trim().len() >= 16 => Some(Secret(t.trim().to_owned())),
                Ok(_) => {
                    errors.push(err(
                        "admin.token_file",
                        format!(
                            "{} holds a token shorter than 16 characters",
                            self.admin.token_file
                        ),
                    ));
                    None
                }
                Err(e) => {
                    errors.push(err(
                        "admin.token_file",
                        format!("cannot read {}: {e}", self.admin.token_file),
                    ));
                    None
                }
            }
        };
        let tls = {
            let t = &self.tls;
            let files = [
                ("tls.ca_file", &t.ca_file),
                ("tls.cert_file", &t.cert_file),
                ("tls.key_file", &t.key_file),
            ];
            let given = files.iter().filter(|(_, f)| !f.is_empty()).count();
            match (given, t.insecure) {
                (0, true) => None,
                (0, false) => {
                    errors.push(err(
                        "tls",
                        "set ca_file, cert_file and key_file for mutual TLS between peers (tidemark cert makes them), or insecure = true to run peers in plaintext",
                    ));
                    None
                }
                (_, true) => {
                    errors.push(err(
                        "tls.insecure",
                        "true conflicts with the certificate files also set",
                    ));
                    None
                }
                (3, false) => {
                    let mut pems = Vec::new();
                    for (key, path) in files {
                        match std::fs::read_to_string(path) {
                            Ok(p) if p.contains("-----BEGIN") => pems.push(p),
                            Ok(_) => errors.push(err(key, format!("{path} is not a PEM file"))),
                            Err(e) => errors.push(err(key, format!("cannot read {path}: {e}"))),
                        }
                    }
                    match <[String; 3]>::try_from(pems) {
                        Ok([ca_pem, cert_pem, key_pem]) => Some(tidemark_replicator::PeerTls {
                            ca_pem,
                            cert_pem,
                            key_pem,
                        }),
                        Err(_) => None,
                    }
                }
                _ => {
                    for (key, f) in files {
                        if f.is_empty() {
                            errors.push(err(key, "is required when any TLS file is set"));
                        }
                    }
                    None
                }
            }
        };
        if self.clock.offset_ms.unsigned_abs() > 86_400_000 {
            errors.push(err(
                "clock.offset_ms",
                format!(
                    "{} must be within one day (±86400000)",
                    self.clock.offset_ms
                ),
            ));
        }
        if self.server.max_concurrent_streams == 0 {
            errors.push(err("server.max_concurrent_streams", "0 must be at least 1"));
        }
        let r = &self.replication;
        let t = &self.retention;
        let ranges: [(&str, u64, u64, u64); 17] = [
            (
                "retention.min_age_secs",
                t.min_age_secs,
                0,
                100 * 365 * 86_400,
            ),
            (
                "retention.tombstone_min_age_secs",
                t.tombstone_min_age_secs,
                0,
                100 * 365 * 86_400,
            ),
            ("retention.batch", u64::from(t.batch), 1, 1_000_000),
            ("retention.step_pause_ms", t.step_pause_ms, 0, 3_600_000),
            ("retention.interval_secs", t.interval_secs, 1, 86_400),
            (
                "replication.batch_size",
                u64::from(r.batch_size),
                1,
                100_000,
            ),
            (
                "replication.max_batch_bytes",
                r.max_batch_bytes as u64,
                1024,
                256 << 20,
            ),
            (
                "replication.max_unacked_batches",
                r.max_unacked_batches as u64,
                1,
                1024,
            ),
            (
                "replication.max_batch_events",
                r.max_batch_events as u64,
                1,
                1_000_000,
            ),
            (
                "replication.max_message_bytes",
                r.max_message_bytes as u64,
                64 << 10,
                1 << 30,
            ),
            (
                "replication.connect_timeout_ms",
                r.connect_timeout_ms,
                1,
                600_000,
            ),
            ("replication.ack_timeout_ms", r.ack_timeout_ms, 1, 3_600_000),
            (
                "replication.reconnect_initial_ms",
                r.reconnect_initial_ms,
                1,
                600_000,
            ),
            (
                "retention.max_peer_absence_secs",
                self.retention.max_peer_absence_secs,
                0,
                10 * 365 * 86_400,
            ),
            ("replication.keepalive_ms", r.keepalive_ms, 100, 600_000),
            ("replication.capture_poll_ms", r.capture_poll_ms, 1, 60_000),
            (
                "replication.startup_check_ms",
                r.startup_check_ms,
                0,
                600_000,
            ),
        ];
        for (key, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                errors.push(err(key, format!("{value} must be between {lo} and {hi}")));
            }
        }
        if r.reconnect_max_ms < r.reconnect_initial_ms {
            errors.push(err(
                "replication.reconnect_max_ms",
                format!(
                    "{} must be at least replication.reconnect_initial_ms ({})",
                    r.reconnect_max_ms, r.reconnect_initial_ms
                ),
            ));
        }
        // An event travels in one message, with its ids, stamps and metadata.
        let event_room = (r.max_message_bytes as u64).saturating_sub(64 << 10);
        if self.store.max_event_bytes < 1024 || self.store.max_event_bytes > event_room {
            errors.push(err(
                "store.max_event_bytes",
                format!(
                    "{} must be between 1024 and replication.max_message_bytes less 64 KiB ({event_room})",
                    self.store.max_event_bytes
                ),
            ));
        }
        // Any request the event limit admits (values up to twice it, plus the
        // request's own fields) must fit the in-flight budget alone.
        let in_flight = self.server.max_write_bytes_in_flight;
        let largest = self
            .store
            .max_event_bytes
            .saturating_mul(2)
            .saturating_add(64 << 10);
        if in_flight < largest || in_flight > 1 << 40 {
            errors.push(err(
                "server.max_write_bytes_in_flight",
                format!(
                    "{in_flight} must be at least twice store.max_event_bytes plus 64 KiB ({largest}), the largest write request, and at most 1 TiB"
                ),
            ));
        }
        if r.max_batch_bytes >= r.max_message_bytes {
            errors.push(err(
                "replication.max_batch_bytes",
                format!(
                    "{} must be below replication.max_message_bytes ({})",
                    r.max_batch_bytes, r.max_message_bytes
                ),
            ));
        }
        let mut peers = Vec::new();
        let mut peer_names = BTreeMap::new();
        let mut seen = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            let key = format!("peers[{i}]");
            match parse_ulid("node_id", &p.node_id) {
                Ok(id) if Some(id) == node_id => errors.push(err(
                    format!("{key}.node_id"),
                    format!("{} is this node's own id", p.node_id),
                )),
                Ok(id) if !seen.insert(id) => errors.push(err(
                    format!("{key}.node_id"),
                    format!("{} is listed twice", p.node_id),
                )),
                Ok(id) => {
                    let scheme = if self.tls.insecure {
                        "http://"
                    } else {
                        "https://"
                    };
                    if !p.address.starts_with(scheme)
                        || tonic::transport::Endpoint::from_shared(p.address.clone()).is_err()
                    {
                        errors.push(err(
                            format!("{key}.address"),
                            format!(
                                "{:?} is not an {scheme}HOST:PORT address ({})",
                                p.address,
                                if self.tls.insecure {
                                    "tls.insecure = true"
                                } else {
                                    "peers use TLS"
                                }
                            ),
                        ));
                    } else {
                        if let Some(name) = p.name.as_ref().filter(|n| !n.is_empty()) {
                            peer_names.insert(id, name.clone());
                        }
                        peers.push(Peer {
                            node_id: id,
                            address: p.address.clone(),
                            may_relay: p.may_relay,
                        });
                    }
                }
                Err(_) => errors.push(err(
                    format!("{key}.node_id"),
                    format!("{:?} is not a ULID", p.node_id),
                )),
            }
        }
        let mut tables = Vec::new();
        let mut names = HashSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            let key = format!("tables[{i}]");
            if let Err(e) = tidemark_store::ident::Ident::parse("name", &t.name) {
                errors.push(err(format!("{key}.name"), e.to_string()));
                continue;
            }
            if !names.insert(t.name.clone()) {
                errors.push(err(
                    format!("{key}.name"),
                    format!("{} is listed twice", t.name),
                ));
            }
            let mut types = BTreeMap::new();
            for (column, class) in &t.types {
                match class.parse::<ColumnType>() {
                    Ok(c) => {
                        types.insert(column.clone(), c);
                    }
                    Err(e) => errors.push(err(format!("{key}.types.{column}"), e)),
                }
            }
            match t.conflict_policy.parse::<ConflictPolicy>() {
                Ok(policy) => tables.push(TableSettings {
                    name: t.name.clone(),
                    policy,
                    types,
                }),
                Err(_) => errors.push(err(
                    format!("{key}.conflict_policy"),
                    format!("{:?} is not one of lww, manual", t.conflict_policy),
                )),
            }
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            errors.push(err(
                "log.format",
                format!("{:?} is not one of text, json", self.log.format),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            errors.push(err(
                "log.level",
                format!("{:?} is not a valid log filter", self.log.level),
            ));
        }
        let (Some(node_id), Some(store_url), Some(listen_addr), true) =
            (node_id, store_url, listen_addr, errors.is_empty())
        else {
            return Err(errors);
        };
        Ok(Settings {
            local: LocalNode {
                node_id,
                cluster_id: self.node.cluster_id.clone(),
            },
            name: self
                .node
                .name
                .clone()
                .unwrap_or_else(|| node_id.to_string()),
            store_url,
            max_drift_ms: self.clock.max_drift_ms,
            clock_offset_ms: self.clock.offset_ms,
            listen_addr,
            metrics_addr,
            admin_addr,
            admin_token,
            writers: self.access.writers.clone(),
            operators: self.access.operators.clone(),
            tls,
            max_concurrent_streams: self.server.max_concurrent_streams,
            request_timeout: Duration::from_millis(self.server.request_timeout_ms),
            replication: ReplicationOptions {
                batch_size: r.batch_size,
                max_batch_bytes: r.max_batch_bytes,
                max_unacked_batches: r.max_unacked_batches,
                max_batch_events: r.max_batch_events,
                max_message_bytes: r.max_message_bytes,
                connect_timeout_ms: r.connect_timeout_ms,
                ack_timeout_ms: r.ack_timeout_ms,
                reconnect_initial_ms: r.reconnect_initial_ms,
                reconnect_max_ms: r.reconnect_max_ms,
                keepalive_ms: r.keepalive_ms,
                absent_peer_limit_ms: self.retention.max_peer_absence_secs.saturating_mul(1000),
            },
            capture_poll: Duration::from_millis(r.capture_poll_ms),
            startup_check: Duration::from_millis(r.startup_check_ms),
            peers,
            peer_names,
            tables,
            max_event_bytes: self.store.max_event_bytes as usize,
            max_write_bytes_in_flight: self.server.max_write_bytes_in_flight as usize,
            log: self.log.clone(),
            retention: self.retention.enabled.then(|| RetentionSettings {
                min_age: Duration::from_secs(self.retention.min_age_secs),
                tombstone_min_age: (!self.retention.keep_tombstones)
                    .then(|| Duration::from_secs(self.retention.tombstone_min_age_secs)),
                batch: self.retention.batch,
                step_pause: Duration::from_millis(self.retention.step_pause_ms),
                interval: Duration::from_secs(self.retention.interval_secs),
            }),
        })
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    /// Runs a test body while no other test changes the environment (figment's
    /// Jail serialises tests that set variables).
    fn jailed(f: impl FnOnce()) {
        figment::Jail::expect_with(|_| {
            f();
            Ok(())
        });
    }

    const GOOD: &str = r#"
        [node]
        id = "01JD0000000000000000000001"
        cluster_id = "test"
        [store]
        url = "sqlite:///tmp/x.db"
        [[peers]]
        node_id = "01JD0000000000000000000002"
        address = "http://127.0.0.1:7071"
        [[tables]]
        name = "notes"
        [tls]
        insecure = true
    "#;

    #[test]
    fn good_config_validates() {
        jailed(|| {
            let s = Config::from_toml(GOOD)
                .expect("parse")
                .validate()
                .expect("valid");
            assert_eq!(s.peers.len(), 1);
            assert_eq!(
                s.tables,
                vec![TableSettings {
                    name: "notes".to_owned(),
                    policy: ConflictPolicy::Lww,
                    types: BTreeMap::new(),
                }]
            );
            assert_eq!(s.listen_addr.port(), 7070);
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        jailed(|| {
            let e =
                Config::from_toml(&GOOD.replace("cluster_id", "clusterid")).expect_err("unknown");
            assert!(e.to_string().contains("clusterid"), "{e}");
        });
    }

    #[test]
    fn ulids_beyond_128_bits_are_refused() {
        // "8..." decodes (top bits dropped) to the id spelled "0...": accepting it
        // would give one node two names.
        jailed(|| {
            let text = GOOD
                .replace("01JD0000000000000000000001", "81JD0000000000000000000001")
                .replace("01JD0000000000000000000002", "91JD0000000000000000000002");
            let errs = Config::from_toml(&text)
                .expect("parse")
                .validate()
                .expect_err("invalid");
            let joined: Vec<String> = errs.iter().map(ToString::to_string).collect();
            let joined = joined.join("\n");
            assert!(
                joined.contains("node.id: \"81JD0000000000000000000001\" is not a ULID"),
                "{joined}"
            );
            assert!(
                joined.contains("peers[0].node_id: \"91JD0000000000000000000002\" is not a ULID"),
                "{joined}"
            );
        });
    }

    #[test]
    fn bad_values_are_all_named() {
        jailed(|| {
            let text = GOOD
                .replace("01JD0000000000000000000001", "nope")
                .replace("http://127.0.0.1:7071", "127.0.0.1:7071")
                .replace(
                    "name = \"notes\"",
                    "name = \"bad-name\"\nconflict_policy = \"newest\"",
                )
                .replace("sqlite:///tmp/x.db", "mysql://x");
            let errs = Config::from_toml(&text)
                .expect("parse")
                .validate()
                .expect_err("invalid");
            let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
            let joined = all.join("\n");
            for expect in [
                "node.id: \"nope\" is not a ULID",
                "store.url: store url \"mysql://x\"",
                "peers[0].address: \"127.0.0.1:7071\" is not an http://HOST:PORT address (tls.insecure = true)",
                "tables[0].name: invalid name: \"bad-name\" is not a plain SQL identifier",
            ] {
                assert!(joined.contains(expect), "missing {expect:?} in:\n{joined}");
            }
        });
    }

    #[test]
    fn the_example_config_is_valid() {
        jailed(|| {
            // It runs peers on mutual TLS, with the files `tidemark cert` makes.
            let certs = Path::new("certs");
            crate::certs::make_ca(certs, 30).expect("ca");
            let id = "01JD8ZQ3M6Y0V6C2S6PZ6N2Q1A".parse().expect("ulid");
            crate::certs::make_node(certs, id, "node-a", &["localhost".into()], 30)
                .expect("node cert");
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/example.toml");
            let s = Config::load(&path)
                .expect("parse")
                .validate()
                .expect("valid");
            assert!(s.tls.is_some(), "the example runs peers on mutual TLS");
            assert_eq!(
                s.tables,
                vec![TableSettings {
                    name: "notes".to_owned(),
                    policy: ConflictPolicy::Lww,
                    types: BTreeMap::new(),
                }]
            );
        });
    }

    #[test]
    fn environment_overrides_any_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TIDEMARK_STORE__URL", "sqlite:///var/lib/tidemark/n.db");
            jail.set_env("TIDEMARK_SERVER__LISTEN_ADDR", "0.0.0.0:9000");
            jail.set_env("TIDEMARK_REPLICATION__BATCH_SIZE", "64");
            let s = Config::from_toml(GOOD)
                .expect("parse")
                .validate()
                .expect("valid");
            assert_eq!(s.listen_addr.port(), 9000);
            assert_eq!(s.replication.batch_size, 64);
            assert!(
                matches!(s.store_url, StoreUrl::Sqlite(ref o) if o.path == Path::new("/var/lib/tidemark/n.db"))
            );
            jail.set_env("TIDEMARK_REPLICATION__BATCH_SIZE", "0");
            let errs = Config::from_toml(GOOD)
                .expect("parse")
                .validate()
                .expect_err("zero");
            assert_eq!(
                errs[0].to_string(),
                "replication.batch_size: 0 must be between 1 and 100000"
            );
            Ok(())
        });
    }

    #[test]
    fn other_tidemark_variables_are_not_configuration() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TIDEMARK_PYTHON", "/usr/bin/python3");
            jail.set_env("TIDEMARK_BIN", "/tmp/tidemark");
            Config::from_toml(GOOD)
                .expect("parse")
                .validate()
                .expect("valid");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_named() {
        jailed(|| {
            let e = Config::load(Path::new("/nonexistent/tidemark.toml")).expect_err("missing");
            assert_eq!(
                e.to_string(),
                "--config: /nonexistent/tidemark.toml does not exist or is not a file"
            );
        });
    }

    #[test]
    fn peer_names_are_kept_for_people_to_read() {
        jailed(|| {
            let text = GOOD.replace(
                "node_id = \"01JD0000000000000000000002\"",
                "node_id = \"01JD0000000000000000000002\"\n        name = \"node-b\"",
            );
            let s = Config::from_toml(&text)
                .expect("parse")
                .validate()
                .expect("valid");
            let id = parse_ulid("id", "01JD0000000000000000000002").expect("ulid");
            assert_eq!(s.peer_names.get(&id).map(String::as_str), Some("node-b"));
        });
    }

    #[test]
    fn every_bad_key_is_named_at_once() {
        jailed(|| {
            let text = GOOD.replace(
                "cluster_id = \"test\"",
                "cluster_id = \"test\"\n        colour = \"blue\"",
            ) + "\n[replication]\nbatch_size = \"many\"\nack_timeout_ms = 0\n\
                   [server]\nlisten_addr = \"nowhere\"\n[retention]\nbatch = -1\n[extra]\nx = 1\n";
            let e = Config::from_toml(&text).expect_err("bad keys");
            let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
            for key in [
                "node.colour",
                "replication.batch_size",
                "retention.batch",
                "extra",
                "server.listen_addr",
                "replication.ack_timeout_ms",
            ] {
                assert!(keys.contains(&key), "{key} not reported: {e}");
            }
            assert_eq!(keys.len(), 6, "{e}");
        });
    }

    #[test]
    fn type_errors_name_the_key() {
        jailed(|| {
            let e = Config::from_toml(&format!("{GOOD}\n[replication]\nbatch_size = \"many\""))
                .expect_err("type");
            assert!(e.to_string().starts_with("replication.batch_size:"), "{e}");
        });
    }
}
