-- Tidemark schema, SQLite. change_events is the seed schema verbatim; the seed's
-- partial indexes on unsynced/unconsumed rows are added here too (SQLite supports
-- them), plus indexes the replicator's queries need.

CREATE TABLE change_events (
    event_id TEXT PRIMARY KEY CHECK (length(event_id) = 26),
    hlc_timestamp INTEGER NOT NULL,
    wall_timestamp TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    node_id TEXT NOT NULL CHECK (length(node_id) = 26),
    table_name TEXT NOT NULL,
    record_id TEXT NOT NULL CHECK (length(record_id) = 26),
    operation TEXT NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    action TEXT,
    user_id TEXT CHECK (user_id IS NULL OR length(user_id) = 26),
    old_values TEXT,  -- JSON
    new_values TEXT,  -- JSON
    metadata TEXT,    -- JSON
    synced_at TEXT,
    consumed_at TEXT
);

CREATE INDEX idx_events_record ON change_events(table_name, record_id);
CREATE INDEX idx_events_hlc ON change_events(hlc_timestamp);
CREATE INDEX idx_events_node ON change_events(node_id);
CREATE INDEX idx_events_user ON change_events(user_id);
CREATE INDEX idx_events_unsynced ON change_events(synced_at) WHERE synced_at IS NULL;
CREATE INDEX idx_events_unconsumed ON change_events(consumed_at) WHERE consumed_at IS NULL;
-- Streaming per origin after a version-vector entry, and marking synced_at per origin.
CREATE INDEX idx_events_origin_hlc ON change_events(node_id, hlc_timestamp);
CREATE INDEX idx_events_unsynced_origin ON change_events(node_id, hlc_timestamp) WHERE synced_at IS NULL;

-- This node's identity and cluster, fixed at first start.
CREATE TABLE tidemark_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Every node whose events this database holds; max_hlc is the version-vector entry:
-- every event of that origin with hlc_timestamp <= max_hlc is in change_events.
CREATE TABLE tidemark_nodes (
    node_id TEXT PRIMARY KEY CHECK (length(node_id) = 26),
    max_hlc INTEGER NOT NULL DEFAULT 0,
    first_seen_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

-- Replicated tables ("datatypes") and their conflict policy.
CREATE TABLE tidemark_datatypes (
    datatype_id TEXT PRIMARY KEY CHECK (length(datatype_id) = 26),
    table_name TEXT NOT NULL UNIQUE,
    primary_key TEXT NOT NULL,
    columns TEXT NOT NULL,  -- JSON array of replicated column names, primary key first
    conflict_policy TEXT NOT NULL DEFAULT 'lww' CHECK (conflict_policy IN ('lww', 'manual')),
    registered_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

-- The current version of every record ever written, including deleted ones
-- (tombstones: deleted = 1), so a late older write never resurrects a row.
CREATE TABLE tidemark_record_versions (
    table_name TEXT NOT NULL,
    record_id TEXT NOT NULL CHECK (length(record_id) = 26),
    hlc INTEGER NOT NULL,
    node_id TEXT NOT NULL CHECK (length(node_id) = 26),
    event_id TEXT NOT NULL CHECK (length(event_id) = 26),
    deleted INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
    vv TEXT NOT NULL DEFAULT '{}',  -- JSON: origin node id -> highest hlc seen for this record
    -- JSON array of the record's maximal versions (none causally after another):
    -- [{"e": event_id, "h": hlc, "n": node_id, "d": deleted, "vv": {...}}]. More than
    -- one member means concurrent versions: a conflict.
    frontier TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (table_name, record_id)
);

-- Concurrent versions of a record. One row per losing version (conflict_id is
-- the losing event's id, so every node names a conflict the same way), paired
-- with the version that currently wins. Open while the table's policy is manual
-- and both versions are maximal; resolved by a write that supersedes them.
CREATE TABLE tidemark_conflicts (
    conflict_id TEXT PRIMARY KEY CHECK (length(conflict_id) = 26),
    table_name TEXT NOT NULL,
    record_id TEXT NOT NULL CHECK (length(record_id) = 26),
    policy TEXT NOT NULL CHECK (policy IN ('lww', 'manual')),
    status TEXT NOT NULL CHECK (status IN ('open', 'resolved')),
    winner_event_id TEXT NOT NULL,
    winner_hlc INTEGER NOT NULL,
    winner_node_id TEXT NOT NULL,
    winner_values TEXT,  -- JSON, NULL for a delete
    loser_event_id TEXT NOT NULL,
    loser_hlc INTEGER NOT NULL,
    loser_node_id TEXT NOT NULL,
    loser_values TEXT,   -- JSON, NULL for a delete
    detected_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    resolved_at TEXT,
    resolved_by TEXT,
    resolution TEXT CHECK (resolution IS NULL OR resolution IN ('lww', 'keep_local', 'keep_remote', 'merged', 'superseded')),
    resolution_note TEXT,
    resolution_event_id TEXT
);
CREATE INDEX idx_conflicts_status ON tidemark_conflicts(status, table_name);
CREATE INDEX idx_conflicts_record ON tidemark_conflicts(table_name, record_id);

-- Events from peers that could not be applied (malformed, unknown table or
-- column, values the table refuses, a timestamp far beyond any drift): kept
-- here, as received, for an operator; the stream goes on without them.
CREATE TABLE tidemark_quarantine (
    quarantine_id TEXT PRIMARY KEY CHECK (length(quarantine_id) = 26),
    event_id TEXT NOT NULL UNIQUE,  -- as received (may be malformed)
    peer_id TEXT,
    code TEXT NOT NULL,             -- gRPC status code name
    reason TEXT NOT NULL,
    event TEXT NOT NULL,            -- JSON of the event as received
    received_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Per peer and origin: the highest hlc the peer acknowledged as durably applied.
CREATE TABLE tidemark_peer_progress (
    peer_id TEXT NOT NULL CHECK (length(peer_id) = 26),
    origin_id TEXT NOT NULL CHECK (length(origin_id) = 26),
    acked_hlc INTEGER NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    PRIMARY KEY (peer_id, origin_id)
);

-- Direct writes by any client, recorded by capture triggers in the writer's own
-- transaction and drained (stamped into change_events) by the daemon.
CREATE TABLE tidemark_capture_queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name TEXT NOT NULL,
    record_id TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    old_values TEXT,
    new_values TEXT,
    captured_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Capture guard: the daemon sets active = 1 inside its own write transactions (and
-- back to 0 before commit), so triggers skip the daemon's writes. SQLite has one
-- writer at a time, so no other connection ever observes active = 1.
CREATE TABLE tidemark_capture_guard (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    active INTEGER NOT NULL CHECK (active IN (0, 1))
);
INSERT INTO tidemark_capture_guard (id, active) VALUES (1, 0);
