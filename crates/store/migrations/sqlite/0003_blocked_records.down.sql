ALTER TABLE tidemark_conflicts DROP COLUMN winner_record_id;
ALTER TABLE tidemark_conflicts DROP COLUMN winner_table;
ALTER TABLE tidemark_conflicts DROP COLUMN detail;
ALTER TABLE tidemark_conflicts DROP COLUMN kind;
DROP TABLE tidemark_blocked;
