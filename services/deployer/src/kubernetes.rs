//! The Kubernetes target: an environment names a Deployment (namespace,
//! name, and the container that runs the project's image) and how to reach
//! its API server — a kubeconfig file and context, a URL and a bearer token
//! (also Rancher 2's proxy `https://rancher…/k8s/clusters/<id>`), or the
//! service account of the pod the deployer runs in. A rollout:
//!
//! 1. read the Deployment; a paused one, one still rolling out or stuck
//!    (unless it already has this image: an earlier attempt's rollout,
//!    taken over), or a container that is not there, is refused (nothing
//!    changed);
//! 2. a strategic merge patch that sets only the container's `image` to
//!    `<repository>@<digest>` (and its `env` entries, by name, to the
//!    environment's variables — the keys Gantry sets are named in the pod
//!    template annotation `gantry.io/environment-keys`, so one it no longer
//!    sets is deleted) and the `kubernetes.io/change-cause` annotation,
//!    naming the `resourceVersion` read (a change made meanwhile: 409);
//! 3. wait by kubectl's rollout rule: the controller observed the new
//!    generation, every replica is updated, no old replica is left, every
//!    updated one is available — and fail on the `Progressing` condition's
//!    `ProgressDeadlineExceeded`, or when the environment's timeout runs
//!    out; a generation past Gantry's is someone else's change, left alone;
//! 4. on failure undo as `kubectl rollout undo` does: the pod template of the
//!    ReplicaSet of the revision that ran before (owned by this Deployment;
//!    after a takeover, the highest revision below the current one)
//!    replaces the Deployment's — a JSON patch that first tests the
//!    generation is still Gantry's —, and that rollout is waited for in turn.
//!
//! Every call is bounded by `CALL_TIMEOUT` as a whole; a change whose
//! answer is lost is looked for before it is called refused.
//!
//! The old pods are the Deployment controller's to retire; the image must be
//! pullable by the cluster (its `imagePullSecrets`).

use std::collections::BTreeMap;
use std::time::Duration;

use gantry_config::{Environment, KubeCredentials, Kubernetes, Registry};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

use crate::queue::{Live, Row};
use crate::target::{Failure, ManagedEnv, Running, Target, clip};

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two reads of the Deployment while it rolls out.
const POLL: Duration = Duration::from_millis(500);
/// How long rolling back may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The pod template annotation naming the variables Gantry sets.
pub const MANAGED_ENV: &str = "gantry.io/environment-keys";
/// The annotation `kubectl rollout history` shows.
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
/// The Deployment controller's revision annotation (on the Deployment and
/// on each of its ReplicaSets).
const REVISION: &str = "deployment.kubernetes.io/revision";
/// The label the controller adds to each ReplicaSet's template.
const TEMPLATE_HASH: &str = "pod-template-hash";

pub struct KubernetesTarget;

/// One environment's Deployment, through an authenticated client.
struct Cluster<'a> {
    deployments: Api<Deployment>,
    replica_sets: Api<ReplicaSet>,
    k: &'a Kubernetes,
    namespace: String,
}

/// Where a rollout is, by kubectl's rule.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Done,
    Waiting(String),
    Failed(String),
}

/// kubectl's `rollout status` rule for a Deployment.
pub fn progress(d: &Deployment) -> Progress {
    let generation = d.metadata.generation.unwrap_or_default();
    let Some(status) = &d.status else {
        return Progress::Waiting("no status yet".into());
    };
    if status.observed_generation.unwrap_or_default() < generation {
        return Progress::Waiting("the controller has not seen the change yet".into());
    }
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")
        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    {
        return Progress::Failed(format!(
            "ProgressDeadlineExceeded: {}",
            c.message
                .as_deref()
                .unwrap_or("the rollout made no progress")
        ));
    }
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or_default();
    let total = status.replicas.unwrap_or_default();
    let available = status.available_replicas.unwrap_or_default();
    if updated < wanted {
        Progress::Waiting(format!("{updated} of {wanted} replicas updated"))
    } else if total > updated {
        Progress::Waiting(format!(
            "{} old replicas are pending termination",
            total.saturating_sub(updated)
        ))
    } else if available < updated {
        Progress::Waiting(format!(
            "{available} of {updated} updated replicas available"
        ))
    } else {
        Progress::Done
    }
}

fn revision(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations.as_ref()?.get(REVISION).map(String::as_str)
}

/// The strategic merge patch of a rollout: the container's image (and the
/// variables Gantry manages), the change cause, nothing else.
pub fn image_patch(
    d: &Deployment,
    container: &str,
    row: &Row,
    vars: &BTreeMap<String, String>,
) -> Value {
    let mut entry = json!({ "name": container, "image": row.reference() });
    let template_meta = d.spec.as_ref().and_then(|s| s.template.metadata.as_ref());
    let label = template_meta
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(MANAGED_ENV))
        .map_or("", String::as_str);
    let managed = ManagedEnv::new(vars, label);
    let mut patch = json!({
        "metadata": { "annotations": { CHANGE_CAUSE: format!(
            "gantry deployment {} of {} ({}, pipeline {})",
            row.id, row.reference(), row.trigger, row.pipeline_id
        ) } },
        "spec": { "template": { "spec": { "containers": [] } } },
    });
    if managed.any() {
        let mut env: Vec<Value> = vars
            .iter()
            .map(|(k, v)| json!({ "name": k, "value": v }))
            .collect();
        env.extend(
            managed
                .gone()
                .map(|k| json!({ "name": k, "$patch": "delete" })),
        );
        entry["env"] = Value::Array(env);
        patch["spec"]["template"]["metadata"] = json!({ "annotations": {
            MANAGED_ENV: managed.label()
        } });
    }
    patch["spec"]["template"]["spec"]["containers"] = json!([entry]);
    patch
}

/// Why a call did not succeed: whether the server answered (a refusal:
/// nothing changed) or not (a change may or may not have been made), and
/// what to tell a person.
struct Said {
    answered: bool,
    text: String,
}

/// What Kubernetes said, for a person.
fn said(e: kube::Error, what: &str) -> Said {
    match e {
        kube::Error::Api(s) => {
            let detail = clip(
                &[s.reason.as_str(), s.message.as_str()]
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
                    .join(": "),
            );
            let text = match s.code {
                401 | 403 => format!(
                    "Kubernetes refused the credentials ({} {detail}) for {what}: check the environment's kubernetes credentials and the account's RBAC (get, patch deployments; list replicasets)",
                    s.code
                ),
                404 => format!("Kubernetes has no {what} (404)"),
                409 => format!(
                    "{what} was changed by someone else meanwhile (409 {detail}): nothing was changed"
                ),
                code => format!("Kubernetes refused {what} ({code} {detail})"),
            };
            Said {
                answered: true,
                text,
            }
        }
        other => Said {
            answered: false,
            text: clip(&format!("Kubernetes cannot be reached ({what}): {other}")),
        },
    }
}

/// One API call, within [`CALL_TIMEOUT`] as a whole (a server that
/// answers byte by byte cannot hold the deployment).
async fn call<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, Said> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(result) => result.map_err(|e| said(e, what)),
        Err(_) => Err(Said {
            answered: false,
            text: format!(
                "Kubernetes did not answer within {}s ({what})",
                CALL_TIMEOUT.as_secs()
            ),
        }),
    }
}

fn refused(why: String) -> Failure {
    Failure::Refused(anyhow::anyhow!(why))
}

/// The image of `container` in the Deployment's pod template.
fn image_of<'d>(d: &'d Deployment, container: &str) -> Option<&'d str> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .image
        .as_deref()
}

/// How following a rollout ended, when it did not succeed.
enum Unfinished {
    /// It failed (deadline exceeded, too slow, not followed): undo it.
    Failed(String),
    /// Someone else changed the Deployment meanwhile: theirs now, left alone.
    Changed(String),
}

impl<'a> Cluster<'a> {
    async fn connect(env: &'a Environment) -> Result<Cluster<'a>, Failure> {
        let k = env.kubernetes.as_ref().ok_or_else(|| {
            refused(format!(
                "environment {} has no kubernetes settings",
                env.name
            ))
        })?;
        let mut config = match &k.credentials {
            KubeCredentials::InCluster => kube::Config::incluster().map_err(|e| {
                refused(format!(
                    "no in-cluster Kubernetes credentials ({e}): give kubernetes.kubeconfig, or url and token"
                ))
            })?,
            KubeCredentials::Kubeconfig { path, context } => {
                let file = Kubeconfig::read_from(path)
                    .map_err(|e| refused(format!("kubeconfig {path}: {e}")))?;
                let options = KubeConfigOptions {
                    context: context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| refused(format!("kubeconfig {path}: {e}")))?
            }
            KubeCredentials::Token {
                url,
                token,
                ca_file,
            } => {
                let token = token.as_ref().ok_or_else(|| {
                    refused(format!("kubernetes.token of {} is not resolved", env.name))
                })?;
                let uri = url
                    .parse()
                    .map_err(|e| refused(format!("kubernetes.url {url}: {e}")))?;
                let mut config = kube::Config::new(uri);
                config.auth_info.token = Some(secrecy::SecretString::from(token.expose()));
                config.root_cert_file = ca_file.as_ref().map(std::path::PathBuf::from);
                config
            }
        };
        config.connect_timeout = Some(CALL_TIMEOUT);
        config.read_timeout = Some(CALL_TIMEOUT);
        config.write_timeout = Some(CALL_TIMEOUT);
        let namespace = k
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config)
            .map_err(|e| refused(format!("Kubernetes client: {e}")))?;
        Ok(Cluster {
            deployments: Api::namespaced(client.clone(), &namespace),
            replica_sets: Api::namespaced(client, &namespace),
            k,
            namespace,
        })
    }

    fn what(&self) -> String {
        format!("Deployment {}/{}", self.namespace, self.k.deployment)
    }

    async fn read(&self) -> Result<Deployment, Said> {
        call(&self.what(), self.deployments.get(&self.k.deployment)).await
    }

    /// Reads the Deployment until its rollout is done (Ok) or failed, or
    /// `timeout` runs out, or someone else changes it (its generation goes
    /// past `generation`, the one Gantry's change made). A read that fails
    /// now and then is read again; three in a row end the wait.
    async fn wait(&self, timeout: Duration, generation: i64) -> Result<Deployment, Unfinished> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut errors = 0;
        loop {
            let d = match self.read().await {
                Ok(d) => {
                    errors = 0;
                    d
                }
                Err(why) if errors < 2 && tokio::time::Instant::now() < deadline => {
                    errors += 1;
                    tracing::warn!(
                        why = why.text,
                        "reading the Deployment failed; reading again"
                    );
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                Err(why) => {
                    return Err(Unfinished::Failed(format!(
                        "the rollout could not be followed: {}",
                        why.text
                    )));
                }
            };
            let now = d.metadata.generation.unwrap_or_default();
            if now > generation {
                return Err(Unfinished::Changed(format!(
                    "{} was changed by someone else during the rollout (generation {generation} became {now}): left as it is",
                    self.what()
                )));
            }
            match progress(&d) {
                Progress::Done => return Ok(d),
                Progress::Failed(why) => return Err(Unfinished::Failed(clip(&why))),
                Progress::Waiting(why) if tokio::time::Instant::now() >= deadline => {
                    return Err(Unfinished::Failed(format!(
                        "not rolled out within {}s ({why})",
                        timeout.as_secs()
                    )));
                }
                Progress::Waiting(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// `kubectl rollout undo`: the pod template of the ReplicaSet of
    /// revision `to` (the one that ran before Gantry's change; `None`: the
    /// highest revision below the current one, kubectl's rule), without the
    /// controller's hash label, replaces the Deployment's — only if the
    /// Deployment is still at `generation` (Gantry's change); waits for
    /// that rollout. Returns the revision gone back to.
    async fn undo(&self, to: Option<&str>, generation: i64) -> Result<String, String> {
        let now = self.read().await.map_err(|s| s.text)?;
        let current: u64 = revision(&now.metadata)
            .and_then(|r| r.parse().ok())
            .unwrap_or_default();
        let uid = now.metadata.uid.clone().unwrap_or_default();
        let selector = now
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let sets = call(
            &format!("the ReplicaSets of {}", self.what()),
            self.replica_sets
                .list(&ListParams::default().labels(&selector)),
        )
        .await
        .map_err(|s| s.text)?;
        let owned: Vec<ReplicaSet> = sets
            .items
            .into_iter()
            .filter(|rs| {
                rs.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.kind == "Deployment" && o.uid == uid)
            })
            .collect();
        let numbered = |rs: &ReplicaSet| -> u64 {
            revision(&rs.metadata)
                .and_then(|r| r.parse().ok())
                .unwrap_or_default()
        };
        let previous = match to {
            Some(to) => owned
                .into_iter()
                .find(|rs| revision(&rs.metadata) == Some(to))
                .ok_or_else(|| format!("the ReplicaSet of revision {to} is gone"))?,
            None => owned
                .into_iter()
                .filter(|rs| numbered(rs) < current)
                .max_by_key(numbered)
                .ok_or("the Deployment has no earlier revision to go back to")?,
        };
        let back_to = numbered(&previous);
        if back_to == current {
            return Err(format!(
                "revision {back_to} is still the Deployment's (the change made no new one): nothing to undo"
            ));
        }
        let mut template = serde_json::to_value(
            previous
                .spec
                .map(|s| s.template.unwrap_or_default())
                .unwrap_or_default(),
        )
        .map_err(|e| e.to_string())?;
        if let Some(labels) = template["metadata"]["labels"].as_object_mut() {
            labels.remove(TEMPLATE_HASH);
        }
        let ops = json!([
            { "op": "test", "path": "/metadata/generation", "value": generation },
            { "op": "replace", "path": "/spec/template", "value": template },
            { "op": "add", "path": "/metadata/annotations/kubernetes.io~1change-cause",
              "value": format!("gantry: rolled back to revision {back_to}") },
        ]);
        let patch = serde_json::from_value(ops).map_err(|e| e.to_string())?;
        let undone = call(
            &format!("the rollback of {}", self.what()),
            self.deployments.patch(
                &self.k.deployment,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            ),
        )
        .await
        .map_err(|s| {
            if s.answered {
                format!("{}; someone else may have changed it meanwhile", s.text)
            } else {
                s.text
            }
        })?;
        let generation = undone.metadata.generation.unwrap_or_default();
        self.wait(SETTLE_TIMEOUT, generation)
            .await
            .map_err(|u| match u {
                Unfinished::Failed(why) | Unfinished::Changed(why) => why,
            })?;
        Ok(back_to.to_string())
    }
}

#[tonic::async_trait]
impl Target for KubernetesTarget {
    async fn roll_out(
        &self,
        env: &Environment,
        row: &Row,
        vars: &BTreeMap<String, String>,
        _registry: &Registry,
        _live: Option<&Live>,
    ) -> Result<Running, Failure> {
        let cluster = Cluster::connect(env).await?;
        let what = cluster.what();
        let before = cluster.read().await.map_err(|s| refused(s.text))?;
        let spec = before.spec.as_ref();
        if spec.and_then(|s| s.paused).unwrap_or(false) {
            return Err(refused(format!(
                "{what} is paused: resume it (kubectl rollout resume) first"
            )));
        }
        let containers: Vec<&str> = spec
            .and_then(|s| s.template.spec.as_ref())
            .map(|p| p.containers.iter().map(|c| c.name.as_str()).collect())
            .unwrap_or_default();
        let container = match (&cluster.k.container, containers.as_slice()) {
            (Some(c), names) if names.contains(&c.as_str()) => c.clone(),
            (None, [only]) => (*only).to_owned(),
            (wanted, names) => {
                return Err(refused(format!(
                    "{what} has containers {names:?}: {}",
                    match wanted {
                        Some(c) => format!("none is named {c:?}"),
                        None => "name the one to set with kubernetes.container".to_owned(),
                    }
                )));
            }
        };
        // The image already there: an earlier attempt of this deployment
        // (a deployer that died while following it) patched it; the
        // revision to go back to is then the one below (kubectl's rule).
        // Else the Deployment must be settled, so that what it goes back
        // to on failure is what ran.
        let reference = row.reference();
        let previous = if image_of(&before, &container) == Some(reference.as_str()) {
            None
        } else {
            match progress(&before) {
                Progress::Done => revision(&before.metadata).map(str::to_owned),
                Progress::Waiting(w) => {
                    return Err(refused(format!(
                        "{what} is still rolling out ({w}): let it finish, or undo it, first"
                    )));
                }
                Progress::Failed(w) => {
                    return Err(refused(format!(
                        "{what} is stuck ({}): undo it (kubectl rollout undo) first",
                        clip(&w)
                    )));
                }
            }
        };
        let mut patch = image_patch(&before, &container, row, vars);
        // A change made by someone else since the read makes it a 409.
        patch["metadata"]["resourceVersion"] = json!(before.metadata.resource_version);
        let change = format!("the change of {what}");
        let patched = match call(
            &change,
            cluster.deployments.patch(
                &cluster.k.deployment,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            ),
        )
        .await
        {
            Ok(d) => d,
            Err(s) if s.answered => return Err(refused(s.text)),
            Err(s) => {
                // No answer: the change may have been made. Look.
                let now = cluster.read().await.map_err(|_| refused(s.text.clone()))?;
                let made = image_of(&now, &container) == Some(reference.as_str())
                    && now.metadata.generation > before.metadata.generation;
                if !made {
                    return Err(refused(s.text));
                }
                now
            }
        };
        // From here on the cluster is rolling out: whatever goes wrong is
        // the rollout's, and it is undone.
        let generation = patched.metadata.generation.unwrap_or_default();
        let why = match cluster.wait(env.health.timeout, generation).await {
            Ok(d) => {
                tracing::info!(
                    deployment = %what,
                    revision = revision(&d.metadata).unwrap_or_default(),
                    "rolled out"
                );
                return Ok(Running {
                    id: what,
                    address: None,
                });
            }
            Err(Unfinished::Changed(why)) => {
                return Err(Failure::Failed {
                    error: anyhow::anyhow!(why),
                    rolled_back: false,
                });
            }
            Err(Unfinished::Failed(why)) => why,
        };
        Err(match cluster.undo(previous.as_deref(), generation).await {
            Ok(to) => Failure::Failed {
                error: anyhow::anyhow!("{why}; Kubernetes rolled {what} back to revision {to}"),
                rolled_back: true,
            },
            Err(stuck) => Failure::Failed {
                error: anyhow::anyhow!(
                    "{why}; not rolled back ({stuck}): see kubectl rollout history"
                ),
                rolled_back: false,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(extra: Value) -> Deployment {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": "hello", "namespace": "shop", "generation": 4 },
            "spec": {
                "replicas": 2,
                "selector": { "matchLabels": { "app": "hello" } },
                "template": {
                    "metadata": { "labels": { "app": "hello" } },
                    "spec": { "containers": [{ "name": "hello", "image": "old" }] }
                }
            },
            "status": { "observedGeneration": 4, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2 }
        });
        merge(&mut d, extra);
        serde_json::from_value(d).expect("a Deployment")
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn row() -> Row {
        Row {
            id: uuid::Uuid::nil(),
            environment: "prod".into(),
            project: "hello".into(),
            pipeline_id: "p1".into(),
            repository: "registry.example.com/hello".into(),
            digest: "sha256:ab".into(),
            revision: vec![],
            trigger: "auto".into(),
            state: gantry_states::DeploymentState::Running,
            reason: None,
            previous_digest: None,
            container_id: None,
            traceparent: None,
            attempt: 1,
            created_at: chrono::Utc::now(),
            finished_at: None,
            decided_by: None,
            decided_at: None,
            config_version: None,
            target: "kubernetes".into(),
        }
    }

    #[test]
    fn rollout_status_follows_kubectls_rule() {
        assert_eq!(progress(&deployment(json!({}))), Progress::Done);
        let unseen = deployment(json!({ "metadata": { "generation": 5 } }));
        assert!(matches!(progress(&unseen), Progress::Waiting(_)));
        let partly = deployment(json!({ "status": { "updatedReplicas": 1, "replicas": 3 } }));
        assert_eq!(
            progress(&partly),
            Progress::Waiting("1 of 2 replicas updated".into())
        );
        let old_left = deployment(json!({ "status": { "replicas": 3 } }));
        assert_eq!(
            progress(&old_left),
            Progress::Waiting("1 old replicas are pending termination".into())
        );
        let unavailable = deployment(json!({ "status": { "availableReplicas": 1 } }));
        assert!(matches!(progress(&unavailable), Progress::Waiting(w) if w.contains("1 of 2")));
        let stuck = deployment(json!({ "status": { "availableReplicas": 1, "conditions": [{
            "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet \"hello-5d\" has timed out progressing."
        }] } }));
        assert!(
            matches!(progress(&stuck), Progress::Failed(w) if w.starts_with("ProgressDeadlineExceeded: ReplicaSet"))
        );
    }

    #[test]
    fn the_patch_sets_the_image_and_the_managed_variables_only() {
        let plain = image_patch(&deployment(json!({})), "hello", &row(), &BTreeMap::new());
        assert_eq!(
            plain["spec"],
            json!({ "template": { "spec": { "containers": [
                { "name": "hello", "image": "registry.example.com/hello@sha256:ab" }
            ] } } })
        );
        assert!(
            plain["metadata"]["annotations"][CHANGE_CAUSE]
                .as_str()
                .is_some_and(|c| c.contains("registry.example.com/hello@sha256:ab"))
        );
        let managed = deployment(json!({ "spec": { "template": { "metadata": {
            "annotations": { MANAGED_ENV: "FEATURE,OLD" } } } } }));
        let vars = BTreeMap::from([("FEATURE".to_owned(), "on".to_owned())]);
        let patch = image_patch(&managed, "hello", &row(), &vars);
        let template = &patch["spec"]["template"];
        assert_eq!(
            template["spec"]["containers"][0]["env"],
            json!([{ "name": "FEATURE", "value": "on" }, { "name": "OLD", "$patch": "delete" }])
        );
        assert_eq!(template["metadata"]["annotations"][MANAGED_ENV], "FEATURE");
    }
}
