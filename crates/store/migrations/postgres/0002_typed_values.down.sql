DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.proname LIKE 'tidemark\_capture\_%' AND p.proname <> 'tidemark_capture_lock'
    LOOP
        EXECUTE 'DROP FUNCTION ' || f || ' CASCADE';
    END LOOP;
END
$$;
DROP TABLE tidemark_unreplicated;
ALTER TABLE tidemark_capture_queue
    ALTER COLUMN old_values TYPE jsonb USING old_values::jsonb,
    ALTER COLUMN new_values TYPE jsonb USING new_values::jsonb;
ALTER TABLE tidemark_datatypes DROP COLUMN column_types, DROP COLUMN declared_types;
