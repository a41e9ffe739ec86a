-- Kept in step with SQLite's migration 0004 (rows deleted by REPLACE); PostgreSQL
-- has no REPLACE conflict resolution and never sets it.
ALTER TABLE tidemark_capture_queue ADD COLUMN if_gone BOOLEAN NOT NULL DEFAULT false;
