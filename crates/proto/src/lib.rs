//! Generated code for the `gantry.v1` protobuf package: the bus event envelope
//! ([`v1::Event`]) and the gRPC services, plus small helpers every service uses
//! to name and build events.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// Encoded `FileDescriptorSet` of `gantry.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gantry_descriptor.bin"));

use v1::event::Payload;

/// Routing keys (and AMQP `type`) of the events.
pub mod routing {
    pub const PIPELINE_REQUESTED: &str = "pipeline.requested";
    pub const BUILD_STARTED: &str = "build.started";
    pub const BUILD_SUCCEEDED: &str = "build.succeeded";
    pub const BUILD_FAILED: &str = "build.failed";
    pub const BUILD_CANCELED: &str = "build.canceled";
    pub const BUILD_SKIPPED: &str = "build.skipped";
    pub const IMAGE_PUBLISHED: &str = "image.published";
    pub const PUBLISH_FAILED: &str = "image.publish_failed";
    pub const DEPLOY_STARTED: &str = "deploy.started";
    pub const DEPLOY_SUCCEEDED: &str = "deploy.succeeded";
    pub const DEPLOY_FAILED: &str = "deploy.failed";
    pub const DEPLOY_ROLLED_BACK: &str = "deploy.rolled_back";
    pub const DEPLOY_AWAITING_APPROVAL: &str = "deploy.awaiting_approval";
    pub const DEPLOY_APPROVED: &str = "deploy.approved";
    pub const DEPLOY_REJECTED: &str = "deploy.rejected";
    pub const ENVIRONMENT_UNHEALTHY: &str = "environment.unhealthy";
    pub const ENVIRONMENT_RECOVERED: &str = "environment.recovered";
    pub const STACK_RUN_REQUESTED: &str = "stack.run_requested";
    pub const STACK_RUN_STARTED: &str = "stack.run_started";
    pub const STACK_RUN_PASSED: &str = "stack.run_passed";
    pub const STACK_RUN_FAILED: &str = "stack.run_failed";
    pub const STACK_RELEASED: &str = "stack.released";
    pub const STACK_DEPLOY_STARTED: &str = "stack.deploy_started";
    pub const STACK_DEPLOY_SUCCEEDED: &str = "stack.deploy_succeeded";
    pub const STACK_DEPLOY_FAILED: &str = "stack.deploy_failed";
    pub const STACK_DEPLOY_ROLLED_BACK: &str = "stack.deploy_rolled_back";
}

/// The routing key of a payload.
pub fn routing_key(payload: &Payload) -> &'static str {
    match payload {
        Payload::PipelineRequested(_) => routing::PIPELINE_REQUESTED,
        Payload::BuildStarted(_) => routing::BUILD_STARTED,
        Payload::BuildSucceeded(_) => routing::BUILD_SUCCEEDED,
        Payload::BuildFailed(_) => routing::BUILD_FAILED,
        Payload::ImagePublished(_) => routing::IMAGE_PUBLISHED,
        Payload::PublishFailed(_) => routing::PUBLISH_FAILED,
        Payload::DeployStarted(_) => routing::DEPLOY_STARTED,
        Payload::DeploySucceeded(_) => routing::DEPLOY_SUCCEEDED,
        Payload::DeployFailed(_) => routing::DEPLOY_FAILED,
        Payload::DeployRolledBack(_) => routing::DEPLOY_ROLLED_BACK,
        Payload::StackRunRequested(_) => routing::STACK_RUN_REQUESTED,
        Payload::StackRunStarted(_) => routing::STACK_RUN_STARTED,
        Payload::StackRunPassed(_) => routing::STACK_RUN_PASSED,
        Payload::StackRunFailed(_) => routing::STACK_RUN_FAILED,
        Payload::StackReleased(_) => routing::STACK_RELEASED,
        Payload::StackDeployStarted(_) => routing::STACK_DEPLOY_STARTED,
        Payload::StackDeploySucceeded(_) => routing::STACK_DEPLOY_SUCCEEDED,
        Payload::StackDeployFailed(_) => routing::STACK_DEPLOY_FAILED,
        Payload::StackDeployRolledBack(_) => routing::STACK_DEPLOY_ROLLED_BACK,
        Payload::BuildCanceled(_) => routing::BUILD_CANCELED,
        Payload::BuildSkipped(_) => routing::BUILD_SKIPPED,
        Payload::DeployAwaitingApproval(_) => routing::DEPLOY_AWAITING_APPROVAL,
        Payload::DeployApproved(_) => routing::DEPLOY_APPROVED,
        Payload::DeployRejected(_) => routing::DEPLOY_REJECTED,
        Payload::EnvironmentUnhealthy(_) => routing::ENVIRONMENT_UNHEALTHY,
        Payload::EnvironmentRecovered(_) => routing::ENVIRONMENT_RECOVERED,
    }
}

impl v1::Event {
    /// A new event with a fresh time-ordered id, stamped now.
    pub fn new(pipeline_id: &str, project: &str, payload: Payload) -> Self {
        let now = std::time::SystemTime::now();
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            pipeline_id: pipeline_id.to_owned(),
            occurred_at: Some(prost_types::Timestamp::from(now)),
            project: project.to_owned(),
            payload: Some(payload),
        }
    }

    /// The routing key of this event, or `None` if it carries no payload.
    pub fn routing_key(&self) -> Option<&'static str> {
        self.payload.as_ref().map(routing_key)
    }
}

/// Connecting to Gantry's gRPC API as a client: TLS for `https://` URLs
/// (the system's roots, plus a CA certificate if given) and the bearer token
/// on every call.
/// A time as the API's `google.protobuf.Timestamp`.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub mod client {
    use tonic::metadata::{Ascii, MetadataValue};
    use tonic::service::interceptor::InterceptedService;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    /// Adds `authorization: Bearer <token>` to every request.
    #[derive(Clone, Default)]
    pub struct Bearer(Option<MetadataValue<Ascii>>);

    impl Bearer {
        /// `None` sends no token. A token that is not printable ASCII is an error.
        pub fn new(token: Option<&str>) -> Result<Self, String> {
            match token.map(str::trim).filter(|t| !t.is_empty()) {
                None => Ok(Self(None)),
                Some(t) => format!("Bearer {t}")
                    .parse()
                    .map(|v| Self(Some(v)))
                    .map_err(|_| "the token must be printable ASCII".to_owned()),
            }
        }
    }

    impl tonic::service::Interceptor for Bearer {
        fn call(
            &mut self,
            mut request: tonic::Request<()>,
        ) -> Result<tonic::Request<()>, tonic::Status> {
            if let Some(v) = &self.0 {
                request.metadata_mut().insert("authorization", v.clone());
            }
            Ok(request)
        }
    }

    /// A channel that sends the token with every call.
    pub type Authed = InterceptedService<Channel, Bearer>;

    /// An endpoint for `url`, with TLS when it is `https://`; `ca_pem` adds a
    /// trusted CA (e.g. of a self-signed certificate).
    pub fn endpoint(
        url: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<tonic::transport::Endpoint, Box<dyn std::error::Error + Send + Sync>> {
        let mut endpoint = Channel::from_shared(url.to_owned())?;
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint)
    }

    /// Wraps a connected channel so that every call carries the token.
    pub fn authed(channel: Channel, bearer: Bearer) -> Authed {
        InterceptedService::new(channel, bearer)
    }
}
