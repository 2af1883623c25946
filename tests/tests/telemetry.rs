//! Traces leave over OTLP when configured, and one pipeline is one trace
//! across every service. The collector here is an OTLP/gRPC server (the
//! protocol of the OpenTelemetry collector) that records what it receives.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_tests::stack::{ProjectSpec, SECRET};
use gantry_tests::{SampleRepo, Stack, StackOptions, forge};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// trace id (hex) → service names that sent spans of it.
type Traces = Arc<Mutex<HashMap<String, BTreeSet<String>>>>;

struct Collector(Traces);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut traces = self.0.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                traces
                    .entry(hex::encode(&span.trace_id))
                    .or_default()
                    .insert(service.clone());
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn one_pipeline_is_one_exported_trace_across_the_services() {
    let traces: Traces = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Collector(traces.clone())))
        .serve_with_incoming(tokio_stream_listener(listener));
    tokio::spawn(server);

    let repo = SampleRepo::new();
    let project = ProjectSpec::new("hello", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://{addr}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
            ("GANTRY_LOG_FORMAT".into(), "json".into()),
        ],
        ..Default::default()
    })
    .await;
    let body = forge::gitlab_push(&project.gitlab, "refs/heads/main", &repo.head(), "main");
    let resp = stack
        .post_gitlab(&body, Some(SECRET), "Push Hook", None)
        .await;
    assert_eq!(resp.status(), 202);
    let answer: serde_json::Value = resp.json().await.expect("json");
    let pipeline = answer["pipeline_id"]
        .as_str()
        .expect("pipeline id")
        .to_owned();
    let published = stack
        .wait_event(&pipeline, "image.published", Duration::from_secs(180))
        .await;
    let tp = published
        .traceparent
        .expect("traceparent on image.published");
    let trace_id = gantry_telemetry::trace_id(&tp).expect("valid").to_owned();

    let expected: BTreeSet<String> = [
        "webhook-ingest",
        "builder",
        "registry-publisher",
        "deployer",
        "notifier",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = traces
            .lock()
            .expect("lock")
            .get(&trace_id)
            .cloned()
            .unwrap_or_default();
        if got == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "trace {trace_id} was exported by {got:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_json_logs(&stack);
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

/// With `GANTRY_LOG_FORMAT=json` every line a service logs is one JSON object.
fn assert_json_logs(stack: &Stack) {
    for service in gantry_tests::stack::SERVICES {
        let text = std::fs::read_to_string(stack.log_path(service)).expect("log");
        let mut lines = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{service}: {e}: {line}"));
            assert!(
                v["level"].is_string() && v["fields"].is_object(),
                "{service}: {line}"
            );
            lines += 1;
        }
        assert!(lines > 0, "{service} logged nothing");
    }
}
