//! The Kubernetes target against a server that speaks the Deployment and
//! ReplicaSet API (`gantry_tests::kubernetes`): a rollout is a strategic
//! merge patch of the container's image only (every other field of the
//! pod template kept, the other container untouched) followed until
//! kubectl's rollout rule says done; `ProgressDeadlineExceeded` undoes it to
//! the previous ReplicaSet's template; refused credentials (401) and a
//! missing Deployment (404) are failures that say so; the environment's
//! configuration becomes the container's `env`; a kubeconfig's context is
//! used with its user and namespace; a change someone else makes during the
//! rollout is left alone, and a Deployment still rolling out or stuck is
//! not touched.

use gantry_tests::kubernetes::FakeKubernetes;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{SampleRepo, Stack, StackOptions};
use serde_json::{Value, json};

/// The Deployment's pod template before Gantry touches it.
fn template() -> Value {
    json!({
        "metadata": {
            "labels": { "app": "hello", "tier": "web" },
            "annotations": { "prometheus.io/scrape": "true" }
        },
        "spec": {
            "containers": [
                {
                    "name": "hello", "image": "registry.example.com/team/hello:2026-11-01",
                    "ports": [{ "containerPort": 8080, "protocol": "TCP" }],
                    "env": [
                        { "name": "DATABASE_URL", "value": "postgres://db/hello" },
                        { "name": "API_KEY", "valueFrom": { "secretKeyRef": { "name": "hello", "key": "api-key" } } }
                    ],
                    "resources": { "limits": { "memory": "256Mi" }, "requests": { "cpu": "100m" } },
                    "readinessProbe": { "httpGet": { "path": "/health", "port": 8080 }, "periodSeconds": 2 }
                },
                {
                    "name": "log-shipper", "image": "team/log-shipper:2.1",
                    "env": [{ "name": "SHIP_TO", "value": "logs.internal" }]
                }
            ],
            "imagePullSecrets": [{ "name": "registry" }],
            "securityContext": { "runAsNonRoot": true }
        }
    })
}

fn revision(d: &Value) -> String {
    d["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn env_of(d: &Value) -> Value {
    d["spec"]["template"]["spec"]["containers"][0]["env"].clone()
}

#[tokio::test]
async fn kubernetes_deployments_are_patched_followed_and_undone() {
    let k8s = FakeKubernetes::start("shop", "hello", template()).await;
    let kubeconfig = tempfile::NamedTempFile::new().expect("kubeconfig file");
    std::fs::write(kubeconfig.path(), k8s.kubeconfig("gantry")).expect("write kubeconfig");
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let env = |name: &str, rules: &str, settings: &str| {
        format!(
            "  - name: {name}\n    project: web\n    target: kubernetes\n    rules: {rules}\n    health: {{timeout_secs: 20}}\n    kubernetes: {{deployment: hello, container: hello, {settings}}}\n"
        )
    };
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        config_extra: format!(
            "environments:\n{}{}{}{}",
            env(
                "production",
                "[{branch: main}]",
                &format!(
                    "namespace: shop, url: '{}', token: {{value: '{}'}}",
                    k8s.url, k8s.token
                )
            ),
            env(
                "wrong-token",
                "[{tag: 'v*'}]",
                &format!(
                    "namespace: shop, url: '{}', token: {{value: not-the-token}}",
                    k8s.url
                )
            ),
            env(
                "elsewhere",
                "[{tag: 'v*'}]",
                &format!(
                    "namespace: elsewhere, url: '{}', token: {{value: '{}'}}",
                    k8s.url, k8s.token
                )
            ),
            env(
                "from-kubeconfig",
                "[{tag: 'v*'}]",
                &format!(
                    "kubeconfig: '{}', context: gantry",
                    kubeconfig.path().display()
                )
            ),
        ),
        ..Default::default()
    })
    .await;

    // 1. A rollout: the image only, by digest; followed until done.
    let c1 = repo.head();
    let p1 = stack.push(&project, "refs/heads/main", &c1).await;
    let end = stack.deploy_end("production", 0, "deploy.succeeded").await;
    assert_eq!(end.event.pipeline_id, p1);
    let deployment = end.deployment().unwrap_or_default();
    assert_eq!(deployment.target, "kubernetes");
    let image = format!("{}@{}", project.image(), deployment.digest);
    let patches: Vec<_> = k8s
        .calls()
        .into_iter()
        .filter(|c| c.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 1, "{patches:#?}");
    assert_eq!(
        patches[0].uri.split('?').next(),
        Some("/apis/apps/v1/namespaces/shop/deployments/hello")
    );
    assert_eq!(
        patches[0].content_type,
        "application/strategic-merge-patch+json"
    );
    assert_eq!(
        patches[0].body["spec"],
        json!({ "template": { "spec": { "containers": [{ "name": "hello", "image": image }] } } }),
        "a strategic merge of the image only"
    );
    let cause = patches[0].body["metadata"]["annotations"]["kubernetes.io/change-cause"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(cause.contains(&image) && cause.contains(&p1), "{cause}");
    let now = k8s.deployment();
    let mut expected = template();
    expected["spec"]["containers"][0]["image"] = json!(image);
    assert_eq!(now["spec"]["template"], expected, "every other field kept");
    assert_eq!(revision(&now), "2");
    assert_eq!(k8s.replica_sets().len(), 2);

    // 2. The new pods never become available: the deadline is exceeded,
    // and the Deployment goes back to revision 2's template.
    k8s.fail_next_rollout();
    let c2 = repo.commit_file("index.html", "hello v2\n", "v2");
    stack.push(&project, "refs/heads/main", &c2).await;
    let end = stack
        .deploy_end("production", 1, "deploy.rolled_back")
        .await;
    assert!(end.reason().contains("ProgressDeadlineExceeded"), "{end:?}");
    assert!(end.reason().contains("back to revision 2"), "{end:?}");
    let calls = k8s.calls();
    assert!(
        calls.iter().any(|c| c.method == "GET"
            && c.uri
                .starts_with("/apis/apps/v1/namespaces/shop/replicasets?")
            && c.uri.contains("labelSelector=app%3Dhello")),
        "{calls:#?}"
    );
    let undo = calls
        .iter()
        .rev()
        .find(|c| c.method == "PATCH")
        .expect("an undo patch");
    assert_eq!(undo.content_type, "application/json-patch+json");
    assert_eq!(
        (&undo.body[0]["op"], &undo.body[0]["path"]),
        (&json!("test"), &json!("/metadata/generation")),
        "only if nobody changed it since"
    );
    assert_eq!(undo.body[1]["op"], "replace");
    assert_eq!(undo.body[1]["path"], "/spec/template");
    let now = k8s.deployment();
    assert_eq!(
        now["spec"]["template"], expected,
        "revision 2's template runs again"
    );
    assert_eq!(revision(&now), "4", "revision 2's ReplicaSet, renumbered");
    assert_eq!(k8s.replica_sets().len(), 3);

    // 3. Refused credentials and a missing Deployment: failures that say so.
    let deploy = stack.cli(&["deploy", "wrong-token", &c1]);
    assert!(deploy.status.success(), "{deploy:?}");
    let end = stack.deploy_end("wrong-token", 0, "deploy.failed").await;
    assert!(
        end.reason().contains("refused the credentials (401"),
        "{end:?}"
    );
    let deploy = stack.cli(&["deploy", "elsewhere", &c1]);
    assert!(deploy.status.success(), "{deploy:?}");
    let end = stack.deploy_end("elsewhere", 0, "deploy.failed").await;
    assert!(
        end.reason()
            .contains("has no Deployment elsewhere/hello (404)"),
        "{end:?}"
    );

    // 4. The environment's configuration becomes the container's env; a key
    // unset is removed, the Deployment's own ones stay.
    let set = stack.cli(&["config", "set", "production", "FEATURE=on"]);
    assert!(set.status.success(), "{set:?}");
    stack.deploy_end("production", 2, "deploy.succeeded").await;
    let env = env_of(&k8s.deployment());
    assert!(
        env.as_array()
            .is_some_and(|e| e.contains(&json!({ "name": "FEATURE", "value": "on" }))),
        "{env}"
    );
    assert_eq!(env[0]["name"], "DATABASE_URL");
    assert_eq!(env[1]["name"], "API_KEY");
    let unset = stack.cli(&["config", "unset", "production", "FEATURE"]);
    assert!(unset.status.success(), "{unset:?}");
    stack.deploy_end("production", 3, "deploy.succeeded").await;
    let now = k8s.deployment();
    assert_eq!(env_of(&now), template()["spec"]["containers"][0]["env"]);
    assert_eq!(
        now["spec"]["template"]["spec"]["containers"][0]["image"],
        image
    );

    // 5. A kubeconfig: its named context (not the current one) with that
    // context's user and namespace.
    let deploy = stack.cli(&["deploy", "from-kubeconfig", &c1]);
    assert!(deploy.status.success(), "{deploy:?}");
    stack
        .deploy_end("from-kubeconfig", 0, "deploy.succeeded")
        .await;

    // 6. Someone sets another image while Gantry's rollout is under way:
    // theirs is left alone, not undone.
    k8s.stall_next_rollout();
    let patches = |k8s: &FakeKubernetes| k8s.calls().iter().filter(|c| c.method == "PATCH").count();
    let before = patches(&k8s);
    let c3 = repo.commit_file("index.html", "hello v3\n", "v3");
    stack.push(&project, "refs/heads/main", &c3).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(180);
    while patches(&k8s) == before {
        assert!(tokio::time::Instant::now() < deadline, "no rollout of v3");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let hotfix = "registry.example.com/team/hello:hotfix";
    k8s.set_image("hello", hotfix);
    let end = stack.deploy_end("production", 4, "deploy.failed").await;
    assert!(end.reason().contains("changed by someone else"), "{end:?}");
    let now = k8s.deployment();
    assert_eq!(
        now["spec"]["template"]["spec"]["containers"][0]["image"],
        hotfix
    );
    assert_eq!(patches(&k8s), before + 1, "nothing undone");

    // 7. A Deployment that is not settled is not touched.
    k8s.fail_next_rollout();
    k8s.set_image("hello", "registry.example.com/team/hello:broken");
    let deploy = stack.cli(&["deploy", "production", &c1]);
    assert!(deploy.status.success(), "{deploy:?}");
    let end = stack.deploy_end("production", 5, "deploy.failed").await;
    assert!(
        end.reason().contains("still rolling out") || end.reason().contains("is stuck"),
        "{end:?}"
    );
    assert_eq!(patches(&k8s), before + 1, "nothing changed");
}
