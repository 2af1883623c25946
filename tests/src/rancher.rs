//! An HTTP server that speaks the part of Rancher 1.6's v2-beta API that an
//! in-service upgrade uses (what cannot run here), as its documentation
//! describes it, and records every call:
//!
//! - `GET /v2-beta/projects/{project}/stacks?name=…` and
//!   `…/services?name=…&stackId=…`: collections (`{"type":"collection","data":[…]}`);
//! - `GET …/services/{id}`: the service, with `state`, `healthState`,
//!   `launchConfig` and `secondaryLaunchConfigs`;
//! - `POST …/services/{id}?action=upgrade` with an `inServiceStrategy`:
//!   `active` → `upgrading` → `upgraded` (after a read or two), the new
//!   containers healthy unless the test said the next upgrade fails its
//!   health checks ([`FakeRancher::fail_next_upgrade`]); 422
//!   `InvalidState` when the service is not `active`, or the 422 a test
//!   asked for ([`FakeRancher::refuse_next_upgrade`]);
//! - `?action=finishupgrade`: `upgraded` → `finishing-upgrade` → `active`;
//! - `?action=cancelupgrade`: `upgrading` → `canceling-upgrade` →
//!   `canceled-upgrade`;
//! - `?action=rollback` (from `upgraded` or `canceled-upgrade` only): →
//!   `rolling-back` → `active` with the previous launch configuration.
//!
//! Every call needs Basic authentication with the access and secret key
//! (401 otherwise, as Rancher answers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use serde_json::{Value, json};

/// One call as it arrived.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub body: Value,
}

#[derive(Clone, Debug)]
struct Service {
    id: String,
    name: String,
    stack_id: String,
    state: String,
    health: String,
    launch_config: Value,
    secondary: Value,
    previous: Option<(Value, Value)>,
    /// Reads left before a transitional state moves on.
    reads_left: u32,
    /// The next upgrade's containers fail Rancher's health checks.
    fail_next: bool,
    /// The next upgrade never leaves `upgrading`.
    stall_next: bool,
}

impl Service {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "type": "service", "baseType": "service", "name": self.name,
            "stackId": self.stack_id, "state": self.state, "healthState": self.health,
            "scale": 2, "kind": "service",
            "launchConfig": self.launch_config,
            "secondaryLaunchConfigs": self.secondary,
            "links": { "self": format!("/v2-beta/projects/1a5/services/{}", self.id) },
            "actions": {},
        })
    }

    /// Moves a transitional state on after a couple of reads.
    fn advance(&mut self) {
        if self.reads_left > 0 {
            self.reads_left -= 1;
            return;
        }
        let next = match self.state.as_str() {
            "upgrading" => {
                self.health = if std::mem::take(&mut self.fail_next) {
                    "unhealthy".into()
                } else {
                    "healthy".into()
                };
                "upgraded"
            }
            "canceling-upgrade" => "canceled-upgrade",
            "finishing-upgrade" => {
                self.previous = None;
                "active"
            }
            "rolling-back" => {
                if let Some((launch, secondary)) = self.previous.take() {
                    self.launch_config = launch;
                    self.secondary = secondary;
                }
                self.health = "healthy".into();
                "active"
            }
            _ => return,
        };
        self.state = next.into();
        self.reads_left = 1;
    }
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    /// The next upgrade is refused with 422 and this code and message.
    refuse_next: Option<(String, String)>,
    services: HashMap<String, Service>,
    stacks: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct FakeRancher {
    /// `http://127.0.0.1:PORT` (the API is under `/v2-beta`).
    pub url: String,
    pub access_key: String,
    pub secret_key: String,
    inner: Arc<Mutex<Inner>>,
}

type Shared = (Arc<Mutex<Inner>>, String);

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "id": "error", "type": "error", "baseType": "error", "links": {}, "actions": {},
            "status": status.as_u16(), "code": code, "message": message, "detail": null,
        })),
    )
        .into_response()
}

fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected)
}

/// Records the call; the 401 Rancher answers when it lacks the API key, if it does.
fn admit(
    (inner, auth): &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
    inner.lock().expect("rancher lock").calls.push(Call {
        method: method.to_string(),
        uri: uri.to_string(),
        body,
    });
    (!authorized(headers, auth))
        .then(|| error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized"))
}

async fn list_stacks(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, b"") {
        return refused;
    }
    let inner = shared.0;
    let s = inner.lock().expect("rancher lock");
    let data: Vec<Value> = s
        .stacks
        .iter()
        .filter(|(_, name)| q.get("name").is_none_or(|n| n == name))
        .map(|(id, name)| json!({ "id": id, "type": "stack", "name": name, "state": "active" }))
        .collect();
    axum::Json(json!({ "type": "collection", "resourceType": "stack", "data": data }))
        .into_response()
}

async fn list_services(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, b"") {
        return refused;
    }
    let inner = shared.0;
    let s = inner.lock().expect("rancher lock");
    let data: Vec<Value> = s
        .services
        .values()
        .filter(|svc| q.get("name").is_none_or(|n| *n == svc.name))
        .filter(|svc| q.get("stackId").is_none_or(|n| *n == svc.stack_id))
        .map(Service::json)
        .collect();
    axum::Json(json!({ "type": "collection", "resourceType": "service", "data": data }))
        .into_response()
}

async fn get_service(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((_project, id)): Path<(String, String)>,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, b"") {
        return refused;
    }
    let inner = shared.0;
    let mut s = inner.lock().expect("rancher lock");
    match s.services.get_mut(&id) {
        Some(svc) => {
            svc.advance();
            axum::Json(svc.json()).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "NotFound", "Not Found"),
    }
}

async fn action(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((_project, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, &body) {
        return refused;
    }
    let inner = shared.0;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut s = inner.lock().expect("rancher lock");
    let refuse = if q.get("action").is_some_and(|a| a == "upgrade") {
        s.refuse_next.take()
    } else {
        None
    };
    if let Some((code, message)) = refuse {
        return error(StatusCode::UNPROCESSABLE_ENTITY, &code, &message);
    }
    let Some(svc) = s.services.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "Not Found");
    };
    let action = q.get("action").map(String::as_str).unwrap_or_default();
    let invalid = |svc: &Service| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "InvalidState",
            &format!("Service is {}", svc.state),
        )
    };
    match action {
        "upgrade" => {
            if svc.state != "active" {
                return invalid(svc);
            }
            let strategy = &body["inServiceStrategy"];
            if !strategy.is_object() || !strategy["launchConfig"].is_object() {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "MissingRequired",
                    "inServiceStrategy.launchConfig",
                );
            }
            svc.previous = Some((svc.launch_config.clone(), svc.secondary.clone()));
            svc.launch_config = strategy["launchConfig"].clone();
            if let Some(secondary) = strategy.get("secondaryLaunchConfigs") {
                svc.secondary = secondary.clone();
            }
            svc.state = "upgrading".into();
            svc.health = "initializing".into();
            svc.reads_left = if std::mem::take(&mut svc.stall_next) {
                u32::MAX
            } else {
                1
            };
        }
        "finishupgrade" => {
            if svc.state != "upgraded" {
                return invalid(svc);
            }
            svc.state = "finishing-upgrade".into();
            svc.reads_left = 1;
        }
        "cancelupgrade" => {
            if svc.state != "upgrading" {
                return invalid(svc);
            }
            svc.state = "canceling-upgrade".into();
            svc.reads_left = 1;
        }
        "rollback" => {
            // Cattle rolls back an upgraded or canceled upgrade only.
            if svc.state != "upgraded" && svc.state != "canceled-upgrade" {
                return invalid(svc);
            }
            svc.state = "rolling-back".into();
            svc.reads_left = 1;
        }
        other => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "InvalidAction",
                &format!("Invalid action: {other}"),
            );
        }
    }
    (StatusCode::ACCEPTED, axum::Json(svc.json())).into_response()
}

impl FakeRancher {
    /// A Rancher with one stack `stack` holding one service `service`, whose
    /// launch configuration is `launch_config` (with a sidekick).
    pub async fn start(stack: &str, service: &str, launch_config: Value) -> Self {
        let access_key = "8C2F1E0A9B7D6C5E4F3A".to_owned();
        let secret_key = "qL2mN8pR4sT6vX0zB3dF5hJ7kW9yA1cE".to_owned();
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{access_key}:{secret_key}"))
        );
        let inner: Arc<Mutex<Inner>> = Default::default();
        {
            let mut s = inner.lock().expect("rancher lock");
            s.stacks.push(("1st7".into(), stack.into()));
            s.services.insert(
                "1s12".into(),
                Service {
                    id: "1s12".into(),
                    name: service.into(),
                    stack_id: "1st7".into(),
                    state: "active".into(),
                    health: "healthy".into(),
                    launch_config,
                    secondary: json!([{
                        "name": "log-shipper", "imageUuid": "docker:team/log-shipper:2.1",
                        "environment": { "SHIP_TO": "logs.internal" }
                    }]),
                    previous: None,
                    reads_left: 0,
                    fail_next: false,
                    stall_next: false,
                },
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake rancher");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .route("/v2-beta/projects/{project}/stacks", get(list_stacks))
            .route("/v2-beta/projects/{project}/services", get(list_services))
            .route(
                "/v2-beta/projects/{project}/services/{id}",
                get(get_service).post(action),
            )
            .with_state((inner.clone(), auth));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            access_key,
            secret_key,
            inner,
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().expect("rancher lock").calls.clone()
    }

    /// The service as it is now (without moving its state on).
    pub fn service(&self) -> Value {
        let s = self.inner.lock().expect("rancher lock");
        s.services
            .values()
            .next()
            .map(Service::json)
            .unwrap_or_default()
    }

    /// The next upgrade's containers fail Rancher's health checks.
    pub fn fail_next_upgrade(&self) {
        let mut s = self.inner.lock().expect("rancher lock");
        if let Some(svc) = s.services.values_mut().next() {
            svc.fail_next = true;
        }
    }

    /// The next upgrade stays `upgrading` until it is canceled.
    pub fn stall_next_upgrade(&self) {
        let mut s = self.inner.lock().expect("rancher lock");
        if let Some(svc) = s.services.values_mut().next() {
            svc.stall_next = true;
        }
    }

    /// The next upgrade is refused: 422 with this `code` and `message`.
    pub fn refuse_next_upgrade(&self, code: &str, message: &str) {
        self.inner.lock().expect("rancher lock").refuse_next = Some((code.into(), message.into()));
    }

    /// Puts the service in `state` and keeps it there (e.g. `upgrading`:
    /// someone else's upgrade), until the next call of this.
    pub fn set_state(&self, state: &str) {
        let mut s = self.inner.lock().expect("rancher lock");
        if let Some(svc) = s.services.values_mut().next() {
            svc.state = state.into();
            svc.reads_left = if state == "active" { 0 } else { u32::MAX };
        }
    }
}
