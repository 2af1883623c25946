//! An HTTP server that stands in for what cannot run here — GitLab's,
//! GitHub's and Gitea's commit status and merge request comment APIs,
//! Slack-compatible and generic chat webhooks — and records every call it
//! gets. It answers as those services do: 201 with the created status, 201
//! with the new comment and its `id`, 200 with an edited comment (404 for
//! one it never created), 200 `ok` for Slack.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;

/// One call as it arrived.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// Answer 500 to this many calls whose path starts with the prefix.
    failures: Vec<(String, usize)>,
    /// The id of the last comment created.
    next_id: u64,
}

#[derive(Clone)]
pub struct Recorder {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl Recorder {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state: Arc<Mutex<State>> = Default::default();
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move {
                    let path = uri.path().to_owned();
                    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    let mut s = shared.lock().expect("recorder lock");
                    if let Some((_, left)) = s
                        .failures
                        .iter_mut()
                        .find(|(prefix, left)| *left > 0 && path.starts_with(prefix.as_str()))
                    {
                        *left -= 1;
                        return (StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response();
                    }
                    s.calls.push(Call {
                        method: method.to_string(),
                        path: path.clone(),
                        headers,
                        body: body.clone(),
                    });
                    let comment = path.ends_with("/notes") || path.ends_with("/comments");
                    if path.contains("/statuses/") {
                        (StatusCode::CREATED, axum::Json(body)).into_response()
                    } else if comment && method == Method::POST {
                        // A created note (GitLab) or issue comment (GitHub,
                        // Gitea): 201 with its id.
                        s.next_id += 1;
                        let mut created = body;
                        created["id"] = serde_json::json!(s.next_id);
                        (StatusCode::CREATED, axum::Json(created)).into_response()
                    } else if method == Method::PUT || method == Method::PATCH {
                        // An edited note or comment: 200 with it.
                        let id: u64 = path
                            .rsplit('/')
                            .next()
                            .and_then(|i| i.parse().ok())
                            .unwrap_or(0);
                        if id == 0 || id > s.next_id {
                            return (
                                StatusCode::NOT_FOUND,
                                axum::Json(serde_json::json!({"message": "Not Found"})),
                            )
                                .into_response();
                        }
                        let mut edited = body;
                        edited["id"] = serde_json::json!(id);
                        (StatusCode::OK, axum::Json(edited)).into_response()
                    } else {
                        (StatusCode::OK, "ok").into_response()
                    }
                }
            },
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state }
    }

    /// Answers 500 to the next `n` calls under `prefix`.
    pub fn fail_next(&self, prefix: &str, n: usize) {
        self.state
            .lock()
            .expect("recorder lock")
            .failures
            .push((prefix.to_owned(), n));
    }

    /// Every call so far under `prefix`.
    pub fn calls(&self, prefix: &str) -> Vec<Call> {
        self.state
            .lock()
            .expect("recorder lock")
            .calls
            .iter()
            .filter(|c| c.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds for the calls under `prefix`.
    pub async fn wait_for(
        &self,
        prefix: &str,
        timeout: Duration,
        pred: impl Fn(&[Call]) -> bool,
    ) -> Vec<Call> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let calls = self.calls(prefix);
            if pred(&calls) {
                return calls;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the calls under {prefix} never matched; got {:#?}",
                calls.iter().map(|c| (&c.path, &c.body)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
