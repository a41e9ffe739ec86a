ALTER TABLE tidemark_capture_queue DROP COLUMN if_gone;
