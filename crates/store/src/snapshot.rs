//! File snapshots: a copy of a node's database another node can start from,
//! with the donor's identity stripped so the copy never runs as its donor.
//!
//! A snapshot keeps what the merge needs: the replicated tables, the log
//! (`change_events`), record versions, conflicts, blocked records, per-origin
//! positions and compaction marks, the cluster id. It loses what belongs to
//! the donor as a node ([`crate::backend::STRIP_IDENTITY`]): its node id
//! (recorded as `snapshot_of` instead), its peers' acks and so `synced_at`,
//! and direct writes it had not stamped yet (it stamps them itself; they
//! reach the new node as its events). A node started on it with a new id
//! holds every event the donor held at the copy, so its sessions stream only
//! what came after, and it is ready once it holds what its peers hold
//! (see `tidemark_replicator::catchup`).
//!
//! Invariant: a database whose `snapshot_of` is X and that has no node id is
//! refused by a node configured as X ([`StoreError::SnapshotOfThisNode`]):
//! the copy would write X's origin beside X.
//!
//! * [`create_sqlite`]: `VACUUM INTO` a new file (one read transaction on the
//!   donor for the copy's duration: its WAL cannot be checkpointed past it
//!   meanwhile), then [`strip`] the copy. The donor may be running.
//! * [`strip`]: any database copied by other means (a stopped SQLite file,
//!   `pg_dump` and `pg_restore` into a new PostgreSQL database). Idempotent.

use std::path::Path;

use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use ulid::Ulid;

use crate::backend::Backend;
use crate::{PostgresBackend, Result, SqliteBackend, SqliteOptions, StoreError, StoreUrl};

/// What a snapshot was taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The node whose database was copied.
    pub donor: Ulid,
    /// The cluster it belongs to (`None` for a node never bound to one).
    pub cluster_id: Option<String>,
}

/// Copies the SQLite database of `source` to the new file `out` and strips
/// the copy. `out` must not exist.
pub async fn create_sqlite(source: &SqliteOptions, out: &Path) -> Result<SnapshotInfo> {
    let refuse = |reason: String| StoreError::Snapshot(reason);
    if out.exists() {
        return Err(refuse(format!(
            "{} exists already: a snapshot is written to a new file",
            out.display()
        )));
    }
    if !source.path.is_file() {
        return Err(refuse(format!(
            "{} is not a file: no SQLite database to copy",
            source.path.display()
        )));
    }
    let target = out.to_str().ok_or_else(|| {
        refuse(format!(
            "{}: the path is not UTF-8 (SQLite needs it as text)",
            out.display()
        ))
    })?;
    // A plain read-only connection beside the donor's daemon (which keeps its
    // writer lock): VACUUM INTO reads one consistent state.
    let mut conn = SqliteConnectOptions::new()
        .filename(&source.path)
        .read_only(true)
        .busy_timeout(source.busy_timeout)
        .connect()
        .await
        .map_err(|e| StoreError::Connect {
            target: format!("SQLite database {}", source.path.display()),
            source: e.into(),
        })?;
    sqlx::query("VACUUM INTO $1")
        .bind(target)
        .execute(&mut conn)
        .await?;
    drop(conn);
    let copy = SqliteOptions {
        path: out.to_path_buf(),
        ..source.clone()
    };
    strip(&StoreUrl::Sqlite(copy)).await
}

/// Strips the donor's identity from the database at `url` (see the module
/// docs). A database stripped already is left as it is.
pub async fn strip(url: &StoreUrl) -> Result<SnapshotInfo> {
    match url {
        StoreUrl::Sqlite(o) => strip_backend(SqliteBackend::connect(o).await?).await,
        StoreUrl::Postgres(o) => strip_backend(PostgresBackend::connect(o).await?).await,
    }
}

async fn strip_backend<B: Backend>(backend: B) -> Result<SnapshotInfo> {
    let result = async {
        backend.migrate().await?;
        let cluster_id = backend.meta_get("cluster_id").await?;
        let donor = match (
            backend.meta_get("node_id").await?,
            backend.meta_get("snapshot_of").await?,
        ) {
            (Some(id), _) => {
                let donor = crate::model::parse_ulid("node_id", &id)?;
                backend.strip_identity(donor).await?;
                donor
            }
            (None, Some(of)) => crate::model::parse_ulid("snapshot_of", &of)?,
            (None, None) => {
                return Err(StoreError::Snapshot(
                    "the database holds no node identity: no Tidemark node ran on it".into(),
                ));
            }
        };
        Ok(SnapshotInfo { donor, cluster_id })
    }
    .await;
    backend.close().await;
    result
}
