-- Records whose winning event is in change_events but whose row cannot be placed
-- here: it clashes with a greater write on a UNIQUE constraint, its parent row is
-- missing (a FOREIGN KEY), or the table refuses it (CHECK, NOT NULL ...). The event
-- stays in the log and is relayed like any other; the record has no row until it
-- can be placed, and is retried when its blocker changes.
CREATE TABLE tidemark_blocked (
    table_name TEXT NOT NULL,
    record_id TEXT NOT NULL CHECK (length(record_id) = 26),
    event_id TEXT NOT NULL CHECK (length(event_id) = 26),
    kind TEXT NOT NULL CHECK (kind IN ('unique', 'foreign_key', 'refused')),
    reason TEXT NOT NULL,
    -- The record holding the clashing value, or the missing parent (the table only
    -- when the parent cannot be named by id).
    blocker_table TEXT,
    blocker_id TEXT,
    blocked_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (table_name, record_id)
);
CREATE INDEX idx_blocked_blocker ON tidemark_blocked(blocker_table, blocker_id);

-- Conflicts now also come from constraints: kind says which, detail what clashed,
-- and the winner may be another record (the one holding the value, the deleted parent).
ALTER TABLE tidemark_conflicts ADD COLUMN kind TEXT NOT NULL DEFAULT 'version'
    CHECK (kind IN ('version', 'unique', 'foreign_key'));
ALTER TABLE tidemark_conflicts ADD COLUMN detail TEXT;
ALTER TABLE tidemark_conflicts ADD COLUMN winner_table TEXT;
ALTER TABLE tidemark_conflicts ADD COLUMN winner_record_id TEXT;
