//! Errors of the store. Variants say what was wrong and name the thing (table,
//! column, field, value) so a caller can show them to an operator as they are.

use std::path::PathBuf;

use tidemark_hlc::ClockError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Input that does not satisfy a contract: a malformed id, operation, JSON...
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },

    /// A value that is not one of its column's class (see [`crate::value`]).
    #[error("table {table} column {column} ({class}): {reason}")]
    InvalidValue {
        table: String,
        column: String,
        class: String,
        reason: String,
    },

    /// A write whose event would be larger than the configured limit.
    #[error(
        "the write to {table} record {record_id} would be an event of {bytes} bytes, over the limit of {limit} bytes (store.max_event_bytes)"
    )]
    TooLarge {
        table: String,
        record_id: String,
        bytes: usize,
        limit: usize,
    },

    /// A table name that is not registered for replication.
    #[error("table {table:?} is not a replicated table (registered: {registered})")]
    UnknownTable { table: String, registered: String },

    /// A column that the replicated table does not have.
    #[error("table {table:?} has no replicated column {column:?}")]
    UnknownColumn { table: String, column: String },

    /// No conflict has this id.
    #[error("no conflict {conflict_id}")]
    NoSuchConflict { conflict_id: ulid::Ulid },

    /// The conflict was already resolved.
    #[error("conflict {conflict_id} is already resolved ({resolution} by {by} at {at})")]
    ConflictClosed {
        conflict_id: ulid::Ulid,
        resolution: String,
        by: String,
        at: String,
    },

    /// A resolution of a conflict whose winner changed since the operator looked.
    #[error(
        "conflict {conflict_id} changed since you looked: its winner is now event {current}, not {expected}; look again and resolve anew"
    )]
    StaleResolution {
        conflict_id: ulid::Ulid,
        expected: ulid::Ulid,
        current: ulid::Ulid,
    },

    /// A table cannot be registered for replication.
    #[error("cannot replicate table {table:?}: {reason}")]
    Unregistrable { table: String, reason: String },

    /// The SQLite database file's directory does not exist.
    #[error("SQLite database directory {} does not exist (database file {})", .dir.display(), .file.display())]
    MissingDirectory { dir: PathBuf, file: PathBuf },

    /// The store URL is not one Tidemark understands.
    #[error("store url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },

    /// The database could not be reached or opened.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: DbError,
    },

    /// Another daemon already writes to this database.
    #[error(
        "another tidemark daemon already writes to {target} ({holder}); stop it first: two daemons on one database would interleave their events out of order"
    )]
    AlreadyRunning { target: String, holder: String },

    /// The lock that keeps a second daemon off the database was lost (its
    /// connection broke and could not be taken again).
    #[error(
        "lost the writer lock on {target}: {reason}; stopping so no second daemon writes beside this one"
    )]
    LockLost { target: String, reason: String },

    /// The database belongs to another node (or cluster) than the configuration says.
    #[error(
        "database identity mismatch: {key} is {stored} in the database but {configured} in the configuration"
    )]
    IdentityMismatch {
        key: &'static str,
        stored: String,
        configured: String,
    },

    /// A database that is a snapshot of this very node (see
    /// [`crate::snapshot`]).
    #[error(
        "this database is a snapshot of node {donor}, the id this node is configured with: a node started from a snapshot needs an id of its own (`tidemark new-id`), or it would write {donor}'s events beside {donor}"
    )]
    SnapshotOfThisNode { donor: String },

    /// A snapshot could not be taken or prepared.
    #[error("snapshot: {0}")]
    Snapshot(String),

    /// A schema migration failed.
    #[error("schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A timestamp was refused by the clock.
    #[error(transparent)]
    Clock(#[from] ClockError),

    /// Stored data that does not decode: the database was changed behind our back.
    #[error("corrupt stored data in {what}: {reason}")]
    Corrupt { what: String, reason: String },

    /// The database refused writing an incoming event's row (a constraint or type
    /// of the table).
    #[error("table {table} refused event {event_id}: {reason}")]
    RowRefused {
        table: String,
        event_id: ulid::Ulid,
        reason: String,
    },

    /// A backend without SQL (the in-memory one) refused a row: a constraint of
    /// the table, named like the SQL databases name it.
    #[error("table {table} refused the row: {reason}")]
    Constraint { table: String, reason: String },

    /// Any other database error.
    #[error("database error: {0}")]
    Db(DbError),
}

/// A database driver's error, kept opaque: the driver's types stay inside the
/// store, and callers ask what they need to know through [`StoreError`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DbError(pub(crate) sqlx::Error);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(DbError(e))
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError(e)
    }
}

impl StoreError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Whether the error is a transient condition of the database (locked, busy,
    /// connection lost, disk full) that a retry after a pause may clear.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db(DbError(e))
            | StoreError::Connect {
                source: DbError(e), ..
            } => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => {
                    let msg = db.message();
                    // SQLite: SQLITE_BUSY / SQLITE_LOCKED / SQLITE_FULL; PostgreSQL:
                    // serialization, deadlock, disk full, admin shutdown classes.
                    msg.contains("database is locked")
                        || msg.contains("database table is locked")
                        || msg.contains("database or disk is full")
                        || matches!(
                            db.code().as_deref(),
                            Some("40001" | "40P01" | "53100" | "57P01" | "57P03")
                        )
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// The database's message when the error is a constraint violation of a
    /// table (NOT NULL, CHECK, UNIQUE, FOREIGN KEY): it names the table and
    /// column and is safe to show to a client.
    pub fn constraint_message(&self) -> Option<String> {
        use sqlx::error::ErrorKind;
        let StoreError::Db(DbError(sqlx::Error::Database(db))) = self else {
            return None;
        };
        match db.kind() {
            ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation => Some(db.message().to_owned()),
            _ => None,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
