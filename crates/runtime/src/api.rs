//! The errors of Gantry's gRPC API, one enum for every service, turned into
//! a `tonic::Status` in one place ([`From<ApiError> for Status`]). What the
//! caller must act on says what to fix; a part that is away (the database)
//! is `UNAVAILABLE` with a generic message, and its cause chain goes to the
//! log, never to the caller.

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is right, but the system is not in a state to do it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something outside Gantry (a forge, a repository) failed; the message
    /// says how, and holds nothing secret.
    #[error("{0}")]
    Upstream(String),
    /// A part the service needs is away; retrying later may work.
    #[error("{what} is unavailable")]
    Unavailable {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
}

impl ApiError {
    /// The service's own store (its database) failed.
    pub fn store(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Unavailable {
            what: "the store",
            source: e.into(),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(m) => tonic::Status::not_found(m),
            ApiError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ApiError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ApiError::Upstream(m) => tonic::Status::unavailable(m),
            ApiError::Unavailable { what, source } => {
                tracing::error!(error = format!("{source:#}"), "{what} is unavailable");
                tonic::Status::unavailable(format!("{what} is unavailable; retry later"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_stays_in_the_log() {
        let cause = anyhow::anyhow!("connection refused at 10.0.0.5:5432 user=gantry");
        let status = tonic::Status::from(ApiError::store(cause));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            !status.message().contains("10.0.0.5"),
            "{}",
            status.message()
        );
        let status = tonic::Status::from(ApiError::NotFound("no pipeline x".into()));
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::NotFound, "no pipeline x")
        );
    }
}
