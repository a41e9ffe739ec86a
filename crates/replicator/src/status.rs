//! The one place errors become `tonic::Status`. Client mistakes keep their message
//! (it names what was wrong); internal failures are logged here and reach the
//! client as a generic message, never with database details.

use tidemark_hlc::ClockError;
use tidemark_store::StoreError;
use tonic::{Code, Status};

use crate::convert::FieldError;

/// Maps a store error to a status for a client.
pub fn from_store(err: &StoreError) -> Status {
    match err {
        StoreError::UnknownTable { .. } | StoreError::NoSuchConflict { .. } => {
            Status::not_found(err.to_string())
        }
        StoreError::ConflictClosed { .. } => Status::failed_precondition(err.to_string()),
        StoreError::StaleResolution { .. } => Status::aborted(err.to_string()),
        StoreError::Invalid { .. }
        | StoreError::UnknownColumn { .. }
        | StoreError::InvalidValue { .. }
        | StoreError::TooLarge { .. } => Status::invalid_argument(err.to_string()),
        StoreError::Clock(ClockError::DriftExceeded { .. }) => {
            Status::out_of_range(err.to_string())
        }
        StoreError::Unregistrable { .. } => Status::failed_precondition(err.to_string()),
        StoreError::Db(_) if err.constraint_message().is_some() => {
            Status::failed_precondition(format!(
                "the write violates a constraint of the table: {}",
                err.constraint_message().unwrap_or_default()
            ))
        }
        StoreError::Constraint { reason, .. } => Status::failed_precondition(format!(
            "the write violates a constraint of the table: {reason}"
        )),
        e if e.is_transient() => {
            tracing::warn!(error = %e, "store busy or unreachable");
            Status::unavailable("store is busy or unreachable; retry")
        }
        e => {
            tracing::error!(error = %e, "store failure");
            Status::internal("internal store error (see the node's log)")
        }
    }
}

pub fn from_field(err: &FieldError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// Whether a status a peer sent means "try again later" rather than "this input is
/// wrong".
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
    )
}
