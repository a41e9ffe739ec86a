-- The application table Tidemark replicates. It must exist before the daemon
-- starts; its primary key holds ULIDs (26 characters, canonical form).
CREATE TABLE IF NOT EXISTS notes (
    id    CHAR(26) PRIMARY KEY,
    title TEXT
);
