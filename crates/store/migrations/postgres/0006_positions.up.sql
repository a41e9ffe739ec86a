-- Positions: every event an origin stamps carries its gap-free sequence number
-- (metadata.seq: 1, 2, 3... per origin). max_seq is the number of the last
-- event of each origin this node holds; it never rewinds, compaction leaves it.
-- Events stamped before this migration carry no number; numbered ones already
-- received (from an origin that was upgraded first) count from the log.
ALTER TABLE tidemark_nodes ADD COLUMN max_seq BIGINT NOT NULL DEFAULT 0;
UPDATE tidemark_nodes SET max_seq = coalesce((
    SELECT max((e.metadata->>'seq')::bigint)
    FROM change_events e
    WHERE e.node_id = tidemark_nodes.node_id AND jsonb_typeof(e.metadata->'seq') = 'number'
), 0);
