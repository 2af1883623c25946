//! Push deliveries shaped as GitLab and GitHub send them (fields from their
//! webhook documentation), with their headers.

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

/// A GitLab "Push Hook" (branch) or "Tag Push Hook" body.
pub fn gitlab_push(project_path: &str, git_ref: &str, sha: &str, default_branch: &str) -> Value {
    let tag = git_ref.starts_with("refs/tags/");
    json!({
        "object_kind": if tag { "tag_push" } else { "push" },
        "event_name": if tag { "tag_push" } else { "push" },
        "before": "0000000000000000000000000000000000000000",
        "after": sha,
        "ref": git_ref,
        "ref_protected": true,
        "checkout_sha": sha,
        "user_id": 4,
        "user_name": "Ada Lovelace",
        "user_username": "ada",
        "user_email": "ada@example.com",
        "project_id": 15,
        "project": {
            "id": 15,
            "name": project_path.rsplit('/').next().unwrap_or(project_path),
            "web_url": format!("https://gitlab.example.com/{project_path}"),
            "git_ssh_url": format!("git@gitlab.example.com:{project_path}.git"),
            "git_http_url": format!("https://gitlab.example.com/{project_path}.git"),
            "namespace": project_path.split('/').next().unwrap_or_default(),
            "visibility_level": 0,
            "path_with_namespace": project_path,
            "default_branch": default_branch
        },
        "commits": [{
            "id": sha,
            "message": "Change the page\n",
            "title": "Change the page",
            "timestamp": "2026-11-28T10:00:00+00:00",
            "url": format!("https://gitlab.example.com/{project_path}/-/commit/{sha}"),
            "author": { "name": "Ada Lovelace", "email": "ada@example.com" },
            "added": [], "modified": ["index.html"], "removed": []
        }],
        "total_commits_count": 1,
        "repository": {
            "name": project_path.rsplit('/').next().unwrap_or(project_path),
            "url": format!("git@gitlab.example.com:{project_path}.git"),
            "homepage": format!("https://gitlab.example.com/{project_path}"),
            "git_http_url": format!("https://gitlab.example.com/{project_path}.git"),
            "visibility_level": 0
        }
    })
}

/// A GitHub `push` body.
pub fn github_push(full_name: &str, git_ref: &str, sha: &str, default_branch: &str) -> Value {
    json!({
        "ref": git_ref,
        "before": "0000000000000000000000000000000000000000",
        "after": sha,
        "created": true,
        "deleted": false,
        "forced": false,
        "base_ref": null,
        "compare": format!("https://github.com/{full_name}/compare/{sha}"),
        "commits": [{
            "id": sha, "tree_id": sha, "distinct": true, "message": "Change the page",
            "timestamp": "2026-11-28T10:00:00Z",
            "url": format!("https://github.com/{full_name}/commit/{sha}"),
            "author": { "name": "Grace Hopper", "email": "grace@example.com", "username": "grace" },
            "committer": { "name": "Grace Hopper", "email": "grace@example.com", "username": "grace" },
            "added": [], "removed": [], "modified": ["index.html"]
        }],
        "head_commit": {
            "id": sha, "tree_id": sha, "distinct": true, "message": "Change the page",
            "timestamp": "2026-11-28T10:00:00Z",
            "url": format!("https://github.com/{full_name}/commit/{sha}"),
            "author": { "name": "Grace Hopper", "email": "grace@example.com", "username": "grace" },
            "committer": { "name": "Grace Hopper", "email": "grace@example.com", "username": "grace" },
            "added": [], "removed": [], "modified": ["index.html"]
        },
        "repository": {
            "id": 1296269,
            "name": full_name.rsplit('/').next().unwrap_or(full_name),
            "full_name": full_name,
            "private": false,
            "clone_url": format!("https://github.com/{full_name}.git"),
            "default_branch": default_branch,
            "master_branch": default_branch
        },
        "pusher": { "name": "grace", "email": "grace@example.com" },
        "sender": { "login": "grace", "id": 1 }
    })
}

/// `X-Hub-Signature-256` of `body` with `secret`.
pub fn github_signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
