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
//!   `rolling-back` → `active` with the previous launch configuration;
//! - stacks: `POST …/stacks` (`name`, `dockerCompose`, `rancherCompose`,
//!   `startOnCreate`; 422 `NotUnique` for a name taken, `InvalidCharacters`
//!   for a bad one): `activating` → `active`, healthy unless the test said
//!   otherwise ([`FakeRancher::fail_next_stack`]); `GET …/stacks/{id}`;
//!   the same actions as a service's, an upgrade taking `dockerCompose` and
//!   `rancherCompose` (a compose file that is not YAML, or a service
//!   without an image, is 422).
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

/// A service or a stack: both upgrade, finish, cancel and roll back alike.
#[derive(Clone, Debug)]
struct Resource {
    id: String,
    name: String,
    /// A service's stack.
    stack_id: String,
    state: String,
    health: String,
    /// What an upgrade changes: a service's `launchConfig` and
    /// `secondaryLaunchConfigs`, a stack's `dockerCompose` and `rancherCompose`.
    config: serde_json::Map<String, Value>,
    previous: Option<serde_json::Map<String, Value>>,
    /// Reads left before a transitional state moves on.
    reads_left: u32,
    /// The next upgrade's containers fail Rancher's health checks.
    fail_next: bool,
    /// The next upgrade never leaves `upgrading`.
    stall_next: bool,
}

impl Resource {
    fn service_json(&self) -> Value {
        let mut v = json!({
            "id": self.id, "type": "service", "baseType": "service", "name": self.name,
            "stackId": self.stack_id, "state": self.state, "healthState": self.health,
            "scale": 2, "kind": "service",
            "links": { "self": format!("/v2-beta/projects/1a5/services/{}", self.id) },
            "actions": {},
        });
        for (k, val) in &self.config {
            v[k] = val.clone();
        }
        v
    }

    fn stack_json(&self) -> Value {
        let mut v = json!({
            "id": self.id, "type": "stack", "baseType": "stack", "name": self.name,
            "state": self.state, "healthState": self.health, "kind": "stack",
            "environment": {}, "startOnCreate": true, "system": false,
            "links": { "self": format!("/v2-beta/projects/1a5/stacks/{}", self.id) },
            "actions": {},
        });
        for (k, val) in &self.config {
            v[k] = val.clone();
        }
        v
    }

    /// Moves a transitional state on after a couple of reads.
    fn advance(&mut self) {
        if self.reads_left > 0 {
            self.reads_left -= 1;
            return;
        }
        let outcome = |fail: &mut bool| {
            if std::mem::take(fail) {
                "unhealthy".to_owned()
            } else {
                "healthy".to_owned()
            }
        };
        let next = match self.state.as_str() {
            "activating" => {
                self.health = outcome(&mut self.fail_next);
                "active"
            }
            "upgrading" => {
                self.health = outcome(&mut self.fail_next);
                "upgraded"
            }
            "canceling-upgrade" => "canceled-upgrade",
            "finishing-upgrade" => {
                self.previous = None;
                "active"
            }
            "rolling-back" => {
                if let Some(previous) = self.previous.take() {
                    self.config = previous;
                }
                self.health = "healthy".into();
                "active"
            }
            _ => return,
        };
        self.state = next.into();
        self.reads_left = 1;
    }

    /// An action on it, as Cattle allows it from each state; a refusal is
    /// Rancher's 422 code and message.
    fn act(
        &mut self,
        action: &str,
        config: Option<serde_json::Map<String, Value>>,
    ) -> Result<(), (&'static str, String)> {
        let invalid = |r: &Resource| Err(("InvalidState", format!("{} is {}", r.name, r.state)));
        match action {
            "upgrade" => {
                if self.state != "active" && self.state != "canceled-upgrade" {
                    return invalid(self);
                }
                let Some(config) = config else {
                    return Err(("MissingRequired", "the upgrade's input".into()));
                };
                self.previous = Some(std::mem::replace(&mut self.config, config));
                self.state = "upgrading".into();
                self.health = "initializing".into();
                self.reads_left = if std::mem::take(&mut self.stall_next) {
                    u32::MAX
                } else {
                    1
                };
            }
            "finishupgrade" => {
                if self.state != "upgraded" {
                    return invalid(self);
                }
                self.state = "finishing-upgrade".into();
                self.reads_left = 1;
            }
            "cancelupgrade" => {
                if self.state != "upgrading" {
                    return invalid(self);
                }
                self.state = "canceling-upgrade".into();
                self.reads_left = 1;
            }
            "rollback" => {
                // Cattle rolls back an upgraded or canceled upgrade only.
                if self.state != "upgraded" && self.state != "canceled-upgrade" {
                    return invalid(self);
                }
                self.state = "rolling-back".into();
                self.reads_left = 1;
            }
            other => {
                return Err(("InvalidAction", format!("Invalid action: {other}")));
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    /// The next upgrade is refused with 422 and this code and message.
    refuse_next: Option<(String, String)>,
    services: HashMap<String, Resource>,
    stacks: Vec<Resource>,
    /// The next stack created or upgraded turns unhealthy.
    fail_next_stack: bool,
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
        .filter(|st| q.get("name").is_none_or(|n| *n == st.name))
        .map(Resource::stack_json)
        .collect();
    axum::Json(json!({ "type": "collection", "resourceType": "stack", "data": data }))
        .into_response()
}

/// Whether `text` is a compose file Rancher could read: YAML with services
/// that each have an image.
fn compose_problem(text: &str) -> Option<String> {
    let file: Value = match serde_saphyr::from_str(text) {
        Ok(v) => v,
        Err(e) => return Some(format!("dockerCompose is not YAML: {e}")),
    };
    let services = file["services"].as_object()?;
    services
        .iter()
        .find(|(_, s)| !s["image"].is_string())
        .map(|(name, _)| format!("service {name} has no image"))
}

/// `POST …/stacks`: a new stack from its compose files.
async fn create_stack(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, &body) {
        return refused;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !valid {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "InvalidCharacters",
            "name",
        );
    }
    if let Some(problem) = compose_problem(body["dockerCompose"].as_str().unwrap_or_default()) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "InvalidReference",
            &problem,
        );
    }
    let mut s = shared.0.lock().expect("rancher lock");
    if s.stacks.iter().any(|st| st.name == name) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "NotUnique", "name");
    }
    let fail = std::mem::take(&mut s.fail_next_stack);
    let stack = Resource {
        id: format!("1st{}", 8 + s.stacks.len()),
        name,
        stack_id: String::new(),
        state: "activating".into(),
        health: "initializing".into(),
        config: stack_config(&body),
        previous: None,
        reads_left: 1,
        fail_next: fail,
        stall_next: false,
    };
    let view = stack.stack_json();
    s.stacks.push(stack);
    (StatusCode::CREATED, axum::Json(view)).into_response()
}

fn stack_config(body: &Value) -> serde_json::Map<String, Value> {
    ["dockerCompose", "rancherCompose"]
        .into_iter()
        .map(|k| (k.to_owned(), body[k].clone()))
        .collect()
}

async fn get_stack(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((_project, id)): Path<(String, String)>,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, b"") {
        return refused;
    }
    let mut s = shared.0.lock().expect("rancher lock");
    match s.stacks.iter_mut().find(|st| st.id == id) {
        Some(st) => {
            st.advance();
            axum::Json(st.stack_json()).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "NotFound", "Not Found"),
    }
}

async fn stack_action(
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
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let action = q.get("action").map(String::as_str).unwrap_or_default();
    let mut config = None;
    if action == "upgrade" {
        if let Some(problem) = compose_problem(body["dockerCompose"].as_str().unwrap_or_default()) {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "InvalidReference",
                &problem,
            );
        }
        config = Some(stack_config(&body));
    }
    let mut s = shared.0.lock().expect("rancher lock");
    let fail = action == "upgrade" && std::mem::take(&mut s.fail_next_stack);
    let Some(st) = s.stacks.iter_mut().find(|st| st.id == id) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "Not Found");
    };
    if let Err((code, message)) = st.act(action, config) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, code, &message);
    }
    st.fail_next |= fail;
    (StatusCode::ACCEPTED, axum::Json(st.stack_json())).into_response()
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
        .map(Resource::service_json)
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
            axum::Json(svc.service_json()).into_response()
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
    let action = q.get("action").map(String::as_str).unwrap_or_default();
    let refuse = if action == "upgrade" {
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
    let mut config = None;
    if action == "upgrade" {
        let strategy = &body["inServiceStrategy"];
        if !strategy.is_object() || !strategy["launchConfig"].is_object() {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "MissingRequired",
                "inServiceStrategy.launchConfig",
            );
        }
        let mut next = svc.config.clone();
        next.insert("launchConfig".into(), strategy["launchConfig"].clone());
        if let Some(secondary) = strategy.get("secondaryLaunchConfigs") {
            next.insert("secondaryLaunchConfigs".into(), secondary.clone());
        }
        config = Some(next);
    }
    if let Err((code, message)) = svc.act(action, config) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, code, &message);
    }
    (StatusCode::ACCEPTED, axum::Json(svc.service_json())).into_response()
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
            let resource = |id: &str, name: &str, stack_id: &str, config: Value| Resource {
                id: id.into(),
                name: name.into(),
                stack_id: stack_id.into(),
                state: "active".into(),
                health: "healthy".into(),
                config: config.as_object().cloned().unwrap_or_default(),
                previous: None,
                reads_left: 0,
                fail_next: false,
                stall_next: false,
            };
            s.stacks.push(resource(
                "1st7",
                stack,
                "",
                json!({ "dockerCompose": "", "rancherCompose": "" }),
            ));
            s.services.insert(
                "1s12".into(),
                resource(
                    "1s12",
                    service,
                    "1st7",
                    json!({
                        "launchConfig": launch_config,
                        "secondaryLaunchConfigs": [{
                            "name": "log-shipper", "imageUuid": "docker:team/log-shipper:2.1",
                            "environment": { "SHIP_TO": "logs.internal" }
                        }],
                    }),
                ),
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake rancher");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .route(
                "/v2-beta/projects/{project}/stacks",
                get(list_stacks).post(create_stack),
            )
            .route(
                "/v2-beta/projects/{project}/stacks/{id}",
                get(get_stack).post(stack_action),
            )
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
            .map(Resource::service_json)
            .unwrap_or_default()
    }

    /// The stack named `name` as it is now, if there is one.
    pub fn stack(&self, name: &str) -> Option<Value> {
        let s = self.inner.lock().expect("rancher lock");
        s.stacks
            .iter()
            .find(|st| st.name == name)
            .map(Resource::stack_json)
    }

    /// The next stack created or upgraded turns unhealthy.
    pub fn fail_next_stack(&self) {
        self.inner.lock().expect("rancher lock").fail_next_stack = true;
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
