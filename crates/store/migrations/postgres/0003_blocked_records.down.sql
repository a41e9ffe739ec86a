ALTER TABLE tidemark_conflicts
    DROP COLUMN winner_record_id,
    DROP COLUMN winner_table,
    DROP COLUMN detail,
    DROP COLUMN kind;
DROP TABLE tidemark_blocked;
