-- Column classes in the registry (part of the schema nodes agree on), typed capture,
-- and captured writes set aside because they cannot be replicated.

-- JSON arrays parallel to `columns`: each column's class and its declared type.
ALTER TABLE tidemark_datatypes ADD COLUMN column_types JSONB, ADD COLUMN declared_types JSONB;

-- Captures keep to_json's text as written (jsonb would turn -0 into 0 and reorder);
-- each table gets its own capture function at registration (tidemark_capture_<datatype id>),
-- run with extra_float_digits = 3 and TimeZone = UTC so values are exact.
ALTER TABLE tidemark_capture_queue
    ALTER COLUMN old_values TYPE json USING old_values::json,
    ALTER COLUMN new_values TYPE json USING new_values::json;

CREATE TABLE tidemark_unreplicated (
    seq BIGINT PRIMARY KEY,
    table_name VARCHAR(64) NOT NULL,
    record_id TEXT NOT NULL,
    operation VARCHAR(20) NOT NULL,
    reason TEXT NOT NULL,
    set_aside_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);
