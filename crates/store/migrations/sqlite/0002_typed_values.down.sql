DROP TABLE tidemark_unreplicated;
ALTER TABLE tidemark_datatypes DROP COLUMN column_types;
ALTER TABLE tidemark_datatypes DROP COLUMN declared_types;
-- Rebuild the capture queue without the value columns registration added.
CREATE TABLE tidemark_capture_queue_v1 (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name TEXT NOT NULL,
    record_id TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    old_values TEXT,
    new_values TEXT,
    captured_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
INSERT INTO tidemark_capture_queue_v1 (seq, table_name, record_id, operation, old_values, new_values, captured_at)
    SELECT seq, table_name, record_id, operation, old_values, new_values, captured_at FROM tidemark_capture_queue;
DROP TABLE tidemark_capture_queue;
ALTER TABLE tidemark_capture_queue_v1 RENAME TO tidemark_capture_queue;
