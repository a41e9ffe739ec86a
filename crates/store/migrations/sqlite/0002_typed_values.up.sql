-- Column classes in the registry (part of the schema nodes agree on), typed capture,
-- and captured writes set aside because they cannot be replicated.

-- JSON arrays parallel to `columns`: each column's class (int64, float64, text(20),
-- decimal(10,2), ...) and its declared SQL type.
ALTER TABLE tidemark_datatypes ADD COLUMN column_types TEXT;
ALTER TABLE tidemark_datatypes ADD COLUMN declared_types TEXT;

-- Capture triggers now store the row's values natively, one column each (v0, v1,
-- ... in registry column order, added at registration without a declared type so
-- SQLite keeps every value exactly as written); old_values/new_values stay for
-- captures made before this migration.

-- Captured direct writes whose values cannot be replicated (a value outside its
-- column's class, an event over the size limit, an unreadable capture): the row
-- stays local, the reason is kept for an operator, and the queue goes on.
CREATE TABLE tidemark_unreplicated (
    seq INTEGER PRIMARY KEY,
    table_name TEXT NOT NULL,
    record_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    reason TEXT NOT NULL,
    set_aside_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
