-- Rows a write may have deleted by SQLite's REPLACE conflict resolution, which
-- fires no delete trigger: a trigger before the write queues each row it clashes
-- with as a DELETE with if_gone = 1, and draining stamps it only if the row is
-- gone by then.
ALTER TABLE tidemark_capture_queue ADD COLUMN if_gone INTEGER NOT NULL DEFAULT 0;
