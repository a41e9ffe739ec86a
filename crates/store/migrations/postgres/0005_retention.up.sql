-- Retention: the highest HLC of each origin whose events compaction deleted
-- (superseded events every peer acknowledged). Such an event was held here, so
-- a peer saying it holds this node's origin up to it is no sign of a lost log.
ALTER TABLE tidemark_nodes ADD COLUMN compacted_hlc BIGINT NOT NULL DEFAULT 0;
