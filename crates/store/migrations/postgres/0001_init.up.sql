-- Tidemark schema, PostgreSQL. change_events is the seed schema verbatim, plus
-- indexes the replicator's queries need.

CREATE TABLE change_events (
    event_id CHAR(26) PRIMARY KEY,           -- ULID
    hlc_timestamp BIGINT NOT NULL,           -- Hybrid Logical Clock (for ordering)
    wall_timestamp TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    node_id CHAR(26) NOT NULL,               -- Which node generated this event
    table_name VARCHAR(64) NOT NULL,
    record_id CHAR(26) NOT NULL,             -- ULID of affected record
    operation VARCHAR(20) NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    action VARCHAR(20),                       -- Business action: 'publish', 'archive', etc.
    user_id CHAR(26),                         -- Who performed the action (ULID)
    old_values JSONB,
    new_values JSONB,
    metadata JSONB,                           -- Webhook data, conflict info, etc.
    synced_at TIMESTAMP WITH TIME ZONE,      -- NULL = not yet synced to other nodes
    consumed_at TIMESTAMP WITH TIME ZONE     -- NULL = not yet processed by webhooks
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

CREATE TABLE tidemark_meta (
    key VARCHAR(64) PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE tidemark_nodes (
    node_id CHAR(26) PRIMARY KEY CHECK (length(node_id) = 26),
    max_hlc BIGINT NOT NULL DEFAULT 0,
    first_seen_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE tidemark_datatypes (
    datatype_id CHAR(26) PRIMARY KEY,
    table_name VARCHAR(64) NOT NULL UNIQUE,
    primary_key VARCHAR(64) NOT NULL,
    columns JSONB NOT NULL,
    conflict_policy VARCHAR(20) NOT NULL DEFAULT 'lww' CHECK (conflict_policy IN ('lww', 'manual')),
    registered_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE tidemark_record_versions (
    table_name VARCHAR(64) NOT NULL,
    record_id CHAR(26) NOT NULL,
    hlc BIGINT NOT NULL,
    node_id CHAR(26) NOT NULL,
    event_id CHAR(26) NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    vv JSONB NOT NULL DEFAULT '{}'::jsonb,
    frontier JSONB NOT NULL DEFAULT '[]'::jsonb,
    PRIMARY KEY (table_name, record_id)
);

CREATE TABLE tidemark_conflicts (
    conflict_id CHAR(26) PRIMARY KEY,
    table_name VARCHAR(64) NOT NULL,
    record_id CHAR(26) NOT NULL,
    policy VARCHAR(20) NOT NULL CHECK (policy IN ('lww', 'manual')),
    status VARCHAR(20) NOT NULL CHECK (status IN ('open', 'resolved')),
    winner_event_id CHAR(26) NOT NULL,
    winner_hlc BIGINT NOT NULL,
    winner_node_id CHAR(26) NOT NULL,
    winner_values JSONB,
    loser_event_id CHAR(26) NOT NULL,
    loser_hlc BIGINT NOT NULL,
    loser_node_id CHAR(26) NOT NULL,
    loser_values JSONB,
    detected_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    resolved_at TIMESTAMP WITH TIME ZONE,
    resolved_by TEXT,
    resolution VARCHAR(20) CHECK (resolution IS NULL OR resolution IN ('lww', 'keep_local', 'keep_remote', 'merged', 'superseded')),
    resolution_note TEXT,
    resolution_event_id CHAR(26)
);
CREATE INDEX idx_conflicts_status ON tidemark_conflicts(status, table_name);
CREATE INDEX idx_conflicts_record ON tidemark_conflicts(table_name, record_id);

CREATE TABLE tidemark_quarantine (
    quarantine_id CHAR(26) PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    peer_id TEXT,
    code VARCHAR(32) NOT NULL,
    reason TEXT NOT NULL,
    event JSONB NOT NULL,
    received_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE tidemark_peer_progress (
    peer_id CHAR(26) NOT NULL,
    origin_id CHAR(26) NOT NULL,
    acked_hlc BIGINT NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (peer_id, origin_id)
);

CREATE TABLE tidemark_capture_queue (
    seq BIGSERIAL PRIMARY KEY,
    table_name VARCHAR(64) NOT NULL,
    record_id TEXT NOT NULL,
    operation VARCHAR(20) NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    old_values JSONB,
    new_values JSONB,
    captured_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT clock_timestamp()
);

-- Row trigger of every replicated table. TG_ARGV[0] is the primary key column.
-- Writes made by the daemon itself run with SET LOCAL tidemark.applying = 'on' and
-- are not captured again. A capture wakes the daemon through NOTIFY (PostgreSQL
-- folds identical notifications within one transaction into one).
CREATE FUNCTION tidemark_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    pk TEXT := TG_ARGV[0];
    old_row JSONB;
    new_row JSONB;
    old_id TEXT;
    new_id TEXT;
BEGIN
    IF current_setting('tidemark.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_row := to_jsonb(NEW) - 'hlc_modified' - 'node_id';
        new_id := new_row ->> pk;
        IF new_id IS NULL OR new_id !~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$' THEN
            RAISE EXCEPTION 'tidemark: %.% must be a ULID in canonical form (26 uppercase Crockford base32 characters), got %', TG_TABLE_NAME, pk, coalesce(quote_literal(new_id), 'NULL')
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_row := to_jsonb(OLD) - 'hlc_modified' - 'node_id';
        old_id := old_row ->> pk;
    END IF;
    IF TG_OP = 'UPDATE' AND old_id IS DISTINCT FROM new_id THEN
        INSERT INTO tidemark_capture_queue (table_name, record_id, operation, old_values, new_values)
        VALUES (TG_TABLE_NAME, old_id, 'DELETE', old_row, NULL),
               (TG_TABLE_NAME, new_id, 'INSERT', NULL, new_row);
    ELSE
        INSERT INTO tidemark_capture_queue (table_name, record_id, operation, old_values, new_values)
        VALUES (TG_TABLE_NAME, coalesce(new_id, old_id), TG_OP, old_row, new_row);
    END IF;
    PERFORM pg_notify('tidemark_capture', '');
    RETURN NULL;
END
$$;

-- Statement trigger of every replicated table, run BEFORE any row of the statement
-- is locked: it takes the capture queue's ROW EXCLUSIVE lock up front. The daemon's
-- write transactions take SHARE ROW EXCLUSIVE on the queue first thing, so they wait
-- for in-flight writers that captured and hold off new ones until they commit; a
-- writer never holds a row lock the daemon needs while waiting for the queue.
CREATE FUNCTION tidemark_capture_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('tidemark.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    LOCK TABLE tidemark_capture_queue IN ROW EXCLUSIVE MODE;
    RETURN NULL;
END
$$;

-- TRUNCATE fires no row triggers, so it cannot be captured: refuse it on replicated tables.
CREATE FUNCTION tidemark_refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('tidemark.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'tidemark: TRUNCATE of replicated table % is not replicated; use DELETE', TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported';
END
$$;
