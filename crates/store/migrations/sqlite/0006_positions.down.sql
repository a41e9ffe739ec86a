ALTER TABLE tidemark_nodes DROP COLUMN max_seq;
