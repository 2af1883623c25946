//! Every service answers `/live`, `/ready` (naming its checks),
//! `grpc.health.v1` and gRPC reflection.

use gantry_tests::stack::{ProjectSpec, SERVICES};
use gantry_tests::{SampleRepo, Stack, StackOptions};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn every_service_reports_liveness_readiness_and_grpc_health() {
    let repo = SampleRepo::new();
    let stack = Stack::start(StackOptions {
        projects: vec![ProjectSpec::new("hello", &repo.url())],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let http = gantry_tests::http();
    for service in SERVICES {
        let base = format!("http://127.0.0.1:{}", stack.http_port(service));
        assert_eq!(
            http.get(format!("{base}/live"))
                .send()
                .await
                .expect("live")
                .status(),
            200
        );
        let ready = http
            .get(format!("{base}/ready"))
            .send()
            .await
            .expect("ready");
        assert_eq!(ready.status(), 200, "{service}");
        let body: serde_json::Value = ready.json().await.expect("json");
        assert_eq!(body["checks"]["database"], true, "{service}: {body}");
        assert_eq!(body["checks"]["broker"], true, "{service}: {body}");
        // Only the services that use the Docker engine depend on it.
        let docker = if ["builder", "deployer"].contains(&service) {
            serde_json::Value::Bool(true)
        } else {
            serde_json::Value::Null
        };
        assert_eq!(body["checks"]["docker"], docker, "{service}: {body}");

        let channel = stack.grpc(service).await;
        let mut health = HealthClient::new(channel.clone());
        // gRPC health follows readiness within a second.
        let mut status = ServingStatus::Unknown;
        for _ in 0..30 {
            status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("health check")
                .into_inner()
                .status();
            if status == ServingStatus::Serving {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert_eq!(status, ServingStatus::Serving, "{service}");

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("reflection")
            .into_inner();
        let Some(Ok(answer)) = futures::StreamExt::next(&mut answers).await else {
            panic!("{service}: no reflection answer");
        };
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("{service}: unexpected reflection answer");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{service}: {names:?}"
        );
        let own: &[&str] = match service {
            "webhook-ingest" => &["gantry.v1.Ingest"],
            "builder" => &["gantry.v1.Builds", "gantry.v1.Secrets"],
            "deployer" => &[
                "gantry.v1.Deployments",
                "gantry.v1.Stacks",
                "gantry.v1.EnvironmentConfig",
            ],
            "notifier" => &["gantry.v1.Pipelines"],
            _ => &[],
        };
        for own in own {
            assert!(names.iter().any(|n| n == own), "{service}: {names:?}");
        }
        // Only what the service serves is advertised.
        let foreign: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with("gantry.v1.") && !own.contains(&n.as_str()))
            .collect();
        assert!(foreign.is_empty(), "{service} advertises {foreign:?}");
    }
}
