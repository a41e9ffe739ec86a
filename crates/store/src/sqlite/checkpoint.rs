//! WAL checkpoints off the commit path.
//!
//! SQLite's automatic checkpoint runs inside the commit that takes the WAL past
//! `wal_autocheckpoint` pages (1,000 by default): that commit copies the WAL
//! into the database file (and, with `synchronous = NORMAL`, syncs it) before
//! it returns, so every few hundred events one apply or write waits for it.
//! Here a thread with its own connection runs the same `PASSIVE` checkpoint
//! shortly after commits instead, while the writer goes on: a passive
//! checkpoint never blocks a writer or a reader, and never runs while one
//! holds a lock it needs (it copies what it can and the next one goes on).
//!
//! The write connection keeps an automatic checkpoint as a backstop, at
//! [`BACKSTOP_PAGES`], so the WAL stays bounded if this thread ever falls
//! behind. Durability does not change: `synchronous` applies to commits as
//! before, and a checkpoint only moves committed pages.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// How long after a commit the checkpoint runs, so a burst of commits shares
/// one.
const DELAY: Duration = Duration::from_millis(50);

/// The write connection's own automatic checkpoint, as a backstop (pages of
/// WAL; 4 KiB pages make this 16 MiB).
pub(super) const BACKSTOP_PAGES: u32 = 4_096;

/// The checkpoint thread; stopped (and joined) when dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    poke: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens the thread's connection to `path` and starts it.
    pub(super) fn start(path: &std::path::Path, busy: Duration) -> Result<Self, sqlx::Error> {
        let open = || -> rusqlite::Result<Connection> {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI
                    | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE,
            )?;
            conn.busy_timeout(busy)?;
            Ok(conn)
        };
        let conn = open().map_err(super::writer::sqlx_error)?;
        // One pending request is enough: a checkpoint copies everything
        // committed before it starts.
        let (poke, rx) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(conn, rx))
            .map_err(sqlx::Error::Io)?;
        Ok(Checkpointer {
            poke: Some(poke),
            thread: Some(thread),
        })
    }

    /// A transaction committed: checkpoint soon. Never blocks.
    pub(super) fn poke(&self) {
        if let Some(poke) = &self.poke {
            let _ = poke.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after any checkpoint under way.
        drop(self.poke.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("the WAL checkpoint thread panicked");
        }
    }
}

fn run(conn: Connection, rx: Receiver<()>) {
    while rx.recv().is_ok() {
        std::thread::sleep(DELAY);
        match rx.try_recv() {
            Ok(()) | Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => break,
        }
        // (busy, WAL frames, frames checkpointed): a busy or partial result
        // is normal under load; the next commit asks again.
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        if let Err(e) = done {
            tracing::debug!(error = %e, "background WAL checkpoint failed; the next commit retries");
        }
    }
}
