ALTER TABLE tidemark_nodes DROP COLUMN compacted_hlc;
