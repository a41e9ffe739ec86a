-- Records whose winning event is in change_events but whose row cannot be placed
-- here (a UNIQUE clash with a greater write, a missing parent, a refusal by the
-- table); see the SQLite migration for the full story.
CREATE TABLE tidemark_blocked (
    table_name VARCHAR(64) NOT NULL,
    record_id CHAR(26) NOT NULL,
    event_id CHAR(26) NOT NULL,
    kind VARCHAR(20) NOT NULL CHECK (kind IN ('unique', 'foreign_key', 'refused')),
    reason TEXT NOT NULL,
    blocker_table VARCHAR(64),
    blocker_id CHAR(26),
    blocked_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (table_name, record_id)
);
CREATE INDEX idx_blocked_blocker ON tidemark_blocked(blocker_table, blocker_id);

ALTER TABLE tidemark_conflicts
    ADD COLUMN kind VARCHAR(20) NOT NULL DEFAULT 'version' CHECK (kind IN ('version', 'unique', 'foreign_key')),
    ADD COLUMN detail TEXT,
    ADD COLUMN winner_table VARCHAR(64),
    ADD COLUMN winner_record_id CHAR(26);
