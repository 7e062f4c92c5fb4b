//! The domain error of every berth operation. Services turn it into a `tonic::Status` in one
//! place (`services::grpc`); nothing below the service layer knows about gRPC.

/// Why an operation was refused or failed. Each message names the field or resource concerned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// Well formed, but does not fit; says what was short.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The host cannot run it (missing interpreter, script, program or workdir).
    #[error("{0}")]
    FailedPrecondition(String),
    /// An unknown worker or session id.
    #[error("{0}")]
    NotFound(String),
    /// A host cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Not offered by this server (yet).
    #[error("{0}")]
    Unimplemented(String),
    /// The caller cannot be identified (no peer credentials, no valid client certificate).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller names a worker or session it does not own, or asks for what its role does
    /// not allow.
    #[error("{0}")]
    PermissionDenied(String),
    /// A failure of the host itself (a cgroup or file that cannot be written).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
