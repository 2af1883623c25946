//! An HTTP server that speaks the part of the Kubernetes API a Deployment
//! rollout uses (what cannot run here), as the API reference describes it,
//! and records every call:
//!
//! - `GET /apis/apps/v1/namespaces/{ns}/deployments/{name}`: the Deployment,
//!   with `metadata.generation`, the `deployment.kubernetes.io/revision`
//!   annotation and a `status` a controller keeps;
//! - `PATCH` of it as `application/strategic-merge-patch+json` (maps merged,
//!   `containers` and `env` merged by `name`, `$patch: delete` and
//!   `$patch: replace`, `null` removes) or `application/json-patch+json`
//!   (RFC 6902 `add`, `replace`, `remove`, `test`); a result without a
//!   container image, or an `env` entry with both `value` and `valueFrom`,
//!   is 422 `Invalid`;
//! - `GET /apis/apps/v1/namespaces/{ns}/replicasets?labelSelector=…`: the
//!   Deployment's ReplicaSets (owner references, revision annotations,
//!   templates with the `pod-template-hash` label).
//!
//! The controller, as Kubernetes runs it: a changed pod template makes a
//! new generation and a new revision (a template equal to an older
//! ReplicaSet's takes that ReplicaSet back, with the new revision number);
//! the reads after it show the rollout's progress — observed, one replica
//! updated with a surge, then all updated and available, or (after
//! [`FakeKubernetes::fail_next_rollout`]) the `Progressing` condition's
//! `ProgressDeadlineExceeded` ([`FakeKubernetes::stall_next_rollout`]: it
//! stays under way). Every write makes a new `resourceVersion`; a strategic
//! merge patch naming an older one is 409 `Conflict`. Every call needs
//! `Authorization: Bearer <token>` (401 `Status` otherwise).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH: &str = "pod-template-hash";

/// One call as it arrived.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    deployment: Value,
    replica_sets: Vec<Value>,
    /// Reads of the rollout under way left to go through (0: settled).
    rollout_step: u32,
    /// The rollout under way ends in ProgressDeadlineExceeded.
    rollout_fails: bool,
    /// The next rollout will.
    fail_next: bool,
    /// The rollout under way never completes (nor fails).
    rollout_stalls: bool,
    /// The next rollout will.
    stall_next: bool,
}

#[derive(Clone)]
pub struct FakeKubernetes {
    /// `http://127.0.0.1:PORT`, the API server's URL.
    pub url: String,
    pub token: String,
    pub namespace: String,
    inner: Arc<Mutex<Inner>>,
}

type Shared = (Arc<Mutex<Inner>>, String);

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

/// Records the call; the 401 the API server answers without the token.
fn admit(
    (inner, token): &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    inner.lock().expect("kubernetes lock").calls.push(Call {
        method: method.to_string(),
        uri: uri.to_string(),
        content_type: header("content-type"),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    });
    (header("authorization") != format!("Bearer {token}"))
        .then(|| status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized"))
}

/// A strategic merge patch: maps merged, lists with a merge key merged by
/// it, other lists replaced, `null` removes, `$patch` directives.
fn strategic_merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if fields.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        if let Some(o) = replaced.as_object_mut() {
            o.remove("$patch");
        }
        *target = replaced;
        return;
    }
    if !target.is_object() {
        *target = json!({});
    }
    let Some(into) = target.as_object_mut() else {
        return;
    };
    for (key, value) in fields {
        if value.is_null() {
            into.remove(key);
            continue;
        }
        let slot = into.entry(key.clone()).or_insert(Value::Null);
        match (key.as_str(), value) {
            ("containers" | "initContainers" | "env" | "volumes", Value::Array(items)) => {
                if !slot.is_array() {
                    *slot = json!([]);
                }
                let Some(list) = slot.as_array_mut() else {
                    continue;
                };
                for item in items {
                    let name = &item["name"];
                    let at = list.iter().position(|e| e["name"] == *name);
                    match (item["$patch"].as_str(), at) {
                        (Some("delete"), Some(i)) => {
                            list.remove(i);
                        }
                        (Some("delete"), None) => {}
                        (_, Some(i)) => strategic_merge(&mut list[i], item),
                        (_, None) => list.push(item.clone()),
                    }
                }
            }
            (_, Value::Object(_)) if slot.is_object() => strategic_merge(slot, value),
            _ => *slot = value.clone(),
        }
    }
}

/// RFC 6902, the operations kubectl's rollback uses.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let unescape = |s: &str| s.replace("~1", "/").replace("~0", "~");
    for op in ops.as_array().ok_or("a JSON patch is an array")? {
        let path = op["path"].as_str().ok_or("an operation needs a path")?;
        let (parent, last) = path.rsplit_once('/').ok_or("bad path")?;
        let last = unescape(last);
        let kind = op["op"].as_str().unwrap_or_default();
        if kind == "test" {
            if target.pointer(path) != Some(&op["value"]) {
                return Err(format!("test failed at {path}"));
            }
            continue;
        }
        let holder = target
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .ok_or_else(|| format!("no object at {parent}"))?;
        match kind {
            "add" => {
                holder.insert(last, op["value"].clone());
            }
            "replace" => {
                if !holder.contains_key(&last) {
                    return Err(format!("replace: nothing at {path}"));
                }
                holder.insert(last, op["value"].clone());
            }
            "remove" => {
                holder
                    .remove(&last)
                    .ok_or_else(|| format!("remove: nothing at {path}"))?;
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

/// What the API server's validation would refuse.
fn invalid(d: &Value) -> Option<String> {
    for c in d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if !c["image"].is_string() {
            return Some(format!(
                "spec.template.spec.containers[{}].image: Required value",
                c["name"]
            ));
        }
        for e in c["env"].as_array().into_iter().flatten() {
            if e.get("value").is_some() && e.get("valueFrom").is_some() {
                return Some(format!(
                    "spec.template.spec.containers[{}].env[{}].valueFrom: Invalid value: may not be specified when `value` is not empty",
                    c["name"], e["name"]
                ));
            }
        }
    }
    None
}

fn without_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(labels) = t["metadata"]["labels"].as_object_mut() {
        labels.remove(HASH);
    }
    t
}

impl Inner {
    /// The Deployment controller's reaction to a changed pod template.
    fn new_revision(&mut self) {
        let d = &mut self.deployment;
        d["metadata"]["generation"] = json!(d["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
        let revision = self
            .replica_sets
            .iter()
            .filter_map(|rs| {
                rs["metadata"]["annotations"][REVISION]
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0)
            + 1;
        let template = d["spec"]["template"].clone();
        let existing = self
            .replica_sets
            .iter_mut()
            .find(|rs| without_hash(&rs["spec"]["template"]) == template);
        match existing {
            Some(rs) => rs["metadata"]["annotations"][REVISION] = json!(revision.to_string()),
            None => {
                let hash = format!("{:x}", fxhash(&template.to_string()) & 0xff_ffff_ffff);
                self.replica_sets.push(replica_set(d, &hash, revision));
            }
        }
        self.deployment["metadata"]["annotations"][REVISION] = json!(revision.to_string());
        self.rollout_step = 2;
        self.rollout_fails = std::mem::take(&mut self.fail_next);
        self.rollout_stalls = std::mem::take(&mut self.stall_next);
    }

    /// Every write makes a new resourceVersion.
    fn bump(&mut self) {
        let rv = &mut self.deployment["metadata"]["resourceVersion"];
        let next = rv.as_str().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
        *rv = json!(next.to_string());
    }

    /// A read moves the rollout under way on.
    fn advance(&mut self) {
        let d = &mut self.deployment;
        let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
        match self.rollout_step {
            0 => return,
            1 if self.rollout_stalls => return,
            2 => {
                d["status"]["observedGeneration"] = d["metadata"]["generation"].clone();
                d["status"]["replicas"] = json!(replicas + 1);
                d["status"]["updatedReplicas"] = json!(1);
                d["status"]["availableReplicas"] = json!(replicas);
                d["status"]["conditions"] = json!([
                    { "type": "Available", "status": "True", "reason": "MinimumReplicasAvailable" },
                    { "type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                      "message": "ReplicaSet is progressing." },
                ]);
            }
            _ if self.rollout_fails => {
                d["status"]["conditions"][1] = json!({
                    "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                    "message": "ReplicaSet has timed out progressing.",
                });
            }
            _ => {
                d["status"]["replicas"] = json!(replicas);
                d["status"]["updatedReplicas"] = json!(replicas);
                d["status"]["availableReplicas"] = json!(replicas);
                d["status"]["readyReplicas"] = json!(replicas);
                d["status"]["conditions"][1] = json!({
                    "type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                    "message": "ReplicaSet has successfully progressed.",
                });
            }
        }
        self.rollout_step -= 1;
        self.bump();
    }
}

/// A small stable hash (the controller's own is FNV of the template).
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn replica_set(d: &Value, hash: &str, revision: u64) -> Value {
    let name = d["metadata"]["name"].as_str().unwrap_or_default();
    let mut template = d["spec"]["template"].clone();
    template["metadata"]["labels"][HASH] = json!(hash);
    let mut selector = d["spec"]["selector"].clone();
    selector["matchLabels"][HASH] = json!(hash);
    json!({
        "metadata": {
            "name": format!("{name}-{hash}"), "namespace": d["metadata"]["namespace"],
            "uid": format!("rs-{hash}"),
            "labels": template["metadata"]["labels"],
            "annotations": { REVISION: revision.to_string() },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                "uid": d["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": { "replicas": d["spec"]["replicas"], "selector": selector, "template": template },
        "status": { "replicas": 0 },
    })
}

fn matches_selector(labels: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|kv| match kv.split_once('=') {
            Some((k, v)) => labels[k] == v,
            None => false,
        })
}

async fn deployment_call(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, &body) {
        return refused;
    }
    let mut s = shared.0.lock().expect("kubernetes lock");
    if s.deployment["metadata"]["namespace"] != ns.as_str()
        || s.deployment["metadata"]["name"] != name.as_str()
    {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("deployments.apps {name:?} not found"),
        );
    }
    if method == Method::GET {
        s.advance();
        return axum::Json(s.deployment.clone()).into_response();
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not JSON",
        );
    };
    let mut changed = s.deployment.clone();
    match content_type {
        "application/strategic-merge-patch+json" => {
            let wanted = &patch["metadata"]["resourceVersion"];
            if !wanted.is_null() && *wanted != s.deployment["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on deployments.apps {name:?}: the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            strategic_merge(&mut changed, &patch);
            changed["metadata"]["resourceVersion"] =
                s.deployment["metadata"]["resourceVersion"].clone();
        }
        "application/json-patch+json" => {
            if let Err(e) = json_patch(&mut changed, &patch) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e);
            }
        }
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                ),
            );
        }
    }
    if let Some(problem) = invalid(&changed) {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!("Deployment.apps {name:?} is invalid: {problem}"),
        );
    }
    let template_changed = changed["spec"]["template"] != s.deployment["spec"]["template"];
    let any_change = changed != s.deployment;
    s.deployment = changed;
    if template_changed {
        s.new_revision();
    }
    if any_change {
        s.bump();
    }
    axum::Json(s.deployment.clone()).into_response()
}

async fn replica_sets(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = admit(&shared, &method, &uri, &headers, b"") {
        return refused;
    }
    let s = shared.0.lock().expect("kubernetes lock");
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    // As the API server lists them: items without kind and apiVersion.
    let items: Vec<Value> = s
        .replica_sets
        .iter()
        .filter(|rs| rs["metadata"]["namespace"] == ns.as_str())
        .filter(|rs| matches_selector(&rs["metadata"]["labels"], &selector))
        .cloned()
        .collect();
    axum::Json(json!({
        "kind": "ReplicaSetList", "apiVersion": "apps/v1",
        "metadata": { "resourceVersion": "4711" }, "items": items,
    }))
    .into_response()
}

impl FakeKubernetes {
    /// An API server holding Deployment `namespace/name` (2 replicas, at
    /// revision 1, rolled out) whose pod template is `template`.
    pub async fn start(namespace: &str, name: &str, template: Value) -> Self {
        let token = "eyJhbGciOiJSUzI1NiJ9.gantry-deployer.c2lnbmF0dXJl".to_owned();
        let mut deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": name, "namespace": namespace, "uid": "0c5e1f9a-7d1b-4a53-9f3e-1d2c3b4a5f60",
                "generation": 1, "resourceVersion": "4711",
                "annotations": { REVISION: "1" }, "labels": { "app": name },
            },
            "spec": {
                "replicas": 2, "progressDeadlineSeconds": 600, "revisionHistoryLimit": 10,
                "selector": { "matchLabels": { "app": name } },
                "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxSurge": "25%", "maxUnavailable": "25%" } },
                "template": template,
            },
            "status": {
                "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                "readyReplicas": 2, "availableReplicas": 2,
                "conditions": [
                    { "type": "Available", "status": "True", "reason": "MinimumReplicasAvailable" },
                    { "type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable" },
                ],
            },
        });
        let first = replica_set(&deployment, "6d8f7c9b5", 1);
        deployment["metadata"]["annotations"][REVISION] = json!("1");
        let inner = Arc::new(Mutex::new(Inner {
            deployment,
            replica_sets: vec![first],
            ..Default::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake kubernetes");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .route(
                "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
                get(deployment_call).patch(deployment_call),
            )
            .route(
                "/apis/apps/v1/namespaces/{ns}/replicasets",
                get(replica_sets),
            )
            .with_state((inner.clone(), token.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            token,
            namespace: namespace.to_owned(),
            inner,
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().expect("kubernetes lock").calls.clone()
    }

    /// The Deployment as it is now (without moving its rollout on).
    pub fn deployment(&self) -> Value {
        self.inner
            .lock()
            .expect("kubernetes lock")
            .deployment
            .clone()
    }

    /// The Deployment's ReplicaSets.
    pub fn replica_sets(&self) -> Vec<Value> {
        self.inner
            .lock()
            .expect("kubernetes lock")
            .replica_sets
            .clone()
    }

    /// The next rollout ends in `ProgressDeadlineExceeded`.
    pub fn fail_next_rollout(&self) {
        self.inner.lock().expect("kubernetes lock").fail_next = true;
    }

    /// The next rollout never completes (until someone changes the
    /// Deployment again).
    pub fn stall_next_rollout(&self) {
        self.inner.lock().expect("kubernetes lock").stall_next = true;
    }

    /// Another client (a person's `kubectl set image`) sets `container`'s
    /// image: a new revision, rolled out.
    pub fn set_image(&self, container: &str, image: &str) {
        let mut s = self.inner.lock().expect("kubernetes lock");
        if let Some(c) = s.deployment["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .and_then(|cs| cs.iter_mut().find(|c| c["name"] == container))
        {
            c["image"] = json!(image);
        }
        s.new_revision();
        s.bump();
    }

    /// A kubeconfig (YAML) for this server, its context named `context`.
    pub fn kubeconfig(&self, context: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\ncontexts:\n- name: other\n  context: {{cluster: fake, user: nobody}}\n- name: {context}\n  context: {{cluster: fake, user: deployer, namespace: {ns}}}\ncurrent-context: other\nusers:\n- name: nobody\n  user: {{token: wrong}}\n- name: deployer\n  user: {{token: {token}}}\n",
            url = self.url,
            ns = self.namespace,
            token = self.token,
        )
    }
}
