//! The states of Gantry's things, one enum each, defined here once: their
//! names (the text stored in Postgres and sent in the gRPC API), and the
//! order in which the projection lets them move forward.
//!
//! - [`PipelineState`]: pending → running → success | failed | canceled |
//!   skipped (the notifier's projection; it only moves forward,
//!   [`PipelineState::rank`]).
//! - [`Stage`]: where a pipeline is: requested, build, publish, deploy.
//! - [`BuildState`]: queued → running → succeeded | failed | skipped, or canceled
//!   from queued or running (the builder's queue; a build given back or
//!   taken over goes from running to queued).
//! - [`DeploymentState`]: (awaiting_approval → rejected, or approved →)
//!   waiting → running → succeeded | failed | rolled_back, or superseded
//!   while awaiting or waiting (the deployer's queue); the
//!   notifier keeps the latest per pipeline and environment, moving forward
//!   by [`DeploymentState::rank`].
//!
//! With the `sqlx` feature each is a Postgres `TEXT` value.

use std::fmt;
use std::str::FromStr;

/// A name that is none of a state type's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownState {
    pub kind: &'static str,
    pub text: String,
}

impl fmt::Display for UnknownState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a {} state", self.text, self.kind)
    }
}

impl std::error::Error for UnknownState {}

/// Defines a state enum with its names, `as_str`, `FromStr`, `Display`,
/// `ALL`, and (with `sqlx`) its Postgres TEXT encoding.
macro_rules! states {
    ($(#[$meta:meta])* $name:ident, $kind:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The state's name, as stored and sent.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState { kind: $kind, text: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$name> for String {
            fn from(s: $name) -> String {
                s.as_str().to_owned()
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        #[cfg(feature = "sqlx")]
        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }
    };
}

states! {
    /// A pipeline as the team sees it.
    PipelineState, "pipeline" {
        /// Requested, not started yet.
        Pending = "pending",
        /// Being built, tested or published.
        Running = "running",
        /// Its image is published (deployments are followed on their own).
        Success = "success",
        /// A step failed, or publishing did.
        Failed = "failed",
        /// Its build was stopped: superseded by a newer push, or by hand.
        Canceled = "canceled",
        /// Its pipeline file's `only`/`except` rules exclude the push.
        Skipped = "skipped",
    }
}

impl PipelineState {
    /// The order in which a pipeline's state moves: it never goes back, and
    /// the first end it reaches is its end.
    pub const fn rank(self) -> i32 {
        match self {
            PipelineState::Pending => 0,
            PipelineState::Running => 1,
            PipelineState::Success
            | PipelineState::Failed
            | PipelineState::Canceled
            | PipelineState::Skipped => 2,
        }
    }

    pub const fn is_finished(self) -> bool {
        matches!(
            self,
            PipelineState::Success
                | PipelineState::Failed
                | PipelineState::Canceled
                | PipelineState::Skipped
        )
    }
}

states! {
    /// Where a pipeline is.
    Stage, "stage" {
        Requested = "requested",
        Build = "build",
        Publish = "publish",
        Deploy = "deploy",
    }
}

states! {
    /// A build in the builder's queue.
    BuildState, "build" {
        /// Waiting for a worker (again, after a give-back or a takeover).
        Queued = "queued",
        /// Held by a worker under a lease.
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// Stopped before its end: superseded by a newer push, or by hand.
        Canceled = "canceled",
        /// Ended without building: the pipeline file's rules exclude the push.
        Skipped = "skipped",
    }
}

impl BuildState {
    /// The states a build ends in.
    pub const FINISHED: [BuildState; 3] = [
        BuildState::Succeeded,
        BuildState::Failed,
        BuildState::Canceled,
    ];

    pub const fn is_finished(self) -> bool {
        matches!(
            self,
            BuildState::Succeeded | BuildState::Failed | BuildState::Canceled | BuildState::Skipped
        )
    }
}

states! {
    /// A deployment in the deployer's queue.
    DeploymentState, "deployment" {
        /// Its environment requires approval: waits for a person.
        AwaitingApproval = "awaiting_approval",
        /// Queued; waits for its environment to be free.
        Waiting = "waiting",
        /// Held by a deployer under a lease.
        Running = "running",
        /// Its version took over.
        Succeeded = "succeeded",
        /// Its version never ran (nothing to go back to, or not its fault).
        Failed = "failed",
        /// Its version failed and the previous one kept running.
        RolledBack = "rolled_back",
        /// A newer image was queued for the environment before it ran.
        Superseded = "superseded",
        /// Someone rejected it while it awaited approval.
        Rejected = "rejected",
    }
}

impl DeploymentState {
    /// The order in which a pipeline's deployment moves in the notifier's
    /// projection: running, then its end, and a rollback after a failure
    /// (the two events of one failed deployment may arrive in any order).
    pub const fn rank(self) -> i32 {
        match self {
            DeploymentState::AwaitingApproval => -2,
            DeploymentState::Waiting => -1,
            DeploymentState::Running => 0,
            DeploymentState::Succeeded
            | DeploymentState::Failed
            | DeploymentState::Superseded
            | DeploymentState::Rejected => 1,
            DeploymentState::RolledBack => 2,
        }
    }

    /// Awaiting approval, waiting or running: not over yet.
    pub const fn is_pending(self) -> bool {
        matches!(
            self,
            DeploymentState::AwaitingApproval | DeploymentState::Waiting | DeploymentState::Running
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in PipelineState::ALL {
            assert_eq!(s.as_str().parse::<PipelineState>(), Ok(*s));
        }
        for s in DeploymentState::ALL {
            assert_eq!(s.to_string().parse::<DeploymentState>(), Ok(*s));
        }
        for s in BuildState::ALL {
            assert_eq!(s.as_str().parse::<BuildState>(), Ok(*s));
        }
        let e = "done".parse::<BuildState>().expect_err("unknown");
        assert_eq!(e.to_string(), "\"done\" is not a build state");
    }

    #[test]
    fn states_only_move_forward() {
        use PipelineState::*;
        assert!(Pending.rank() < Running.rank() && Running.rank() < Success.rank());
        assert_eq!(Success.rank(), Failed.rank(), "the first end is the end");
        use DeploymentState as D;
        assert!(D::Running.rank() < D::Failed.rank() && D::Failed.rank() < D::RolledBack.rank());
    }
}
