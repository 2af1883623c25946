//! Push and merge request deliveries shaped as GitLab, GitHub and Gitea send
//! them (fields from their webhook documentation), with their signatures.

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

/// A GitLab "Merge Request Hook" body (fields from GitLab's webhook
/// documentation). `source` is the project the changes come from (the
/// target for a merge request inside one project, a fork otherwise), with
/// its clone URL; `action` is `open`, `update` (with `oldrev` when commits
/// were pushed), `reopen`, `close`…
#[allow(clippy::too_many_arguments)]
pub fn gitlab_merge_request(
    target: &str,
    source: (&str, &str),
    iid: u64,
    source_branch: &str,
    sha: &str,
    action: &str,
    oldrev: Option<&str>,
) -> Value {
    let (source_path, source_clone) = source;
    let from_fork = source_path != target;
    let project = |path: &str, id: u64, clone: &str| {
        json!({
            "id": id,
            "name": path.rsplit('/').next().unwrap_or(path),
            "description": "",
            "web_url": format!("https://gitlab.example.com/{path}"),
            "git_ssh_url": format!("git@gitlab.example.com:{path}.git"),
            "git_http_url": clone,
            "namespace": path.split('/').next().unwrap_or_default(),
            "visibility_level": 0,
            "path_with_namespace": path,
            "default_branch": "main",
            "homepage": format!("https://gitlab.example.com/{path}"),
            "url": format!("git@gitlab.example.com:{path}.git"),
            "ssh_url": format!("git@gitlab.example.com:{path}.git"),
            "http_url": clone
        })
    };
    let target_clone = format!("https://gitlab.example.com/{target}.git");
    let mut attributes = json!({
        "id": 99,
        "iid": iid,
        "target_branch": "main",
        "source_branch": source_branch,
        "source_project_id": if from_fork { 16 } else { 15 },
        "target_project_id": 15,
        "author_id": 51,
        "title": "Zoë's change: the page greets in Ελληνικά",
        "created_at": "2026-11-28 10:00:00 UTC",
        "updated_at": "2026-11-28 10:05:00 UTC",
        "state": if action == "close" { "closed" } else { "opened" },
        "merge_status": "unchecked",
        "url": format!("https://gitlab.example.com/{target}/-/merge_requests/{iid}"),
        "source": project(source_path, if from_fork { 16 } else { 15 }, source_clone),
        "target": project(target, 15, &target_clone),
        "last_commit": {
            "id": sha,
            "message": "Grüße aus Zürich\n",
            "title": "Grüße aus Zürich",
            "timestamp": "2026-11-28T10:05:00+00:00",
            "url": format!("https://gitlab.example.com/{source_path}/-/commit/{sha}"),
            "author": { "name": "Zoë Ångström", "email": "zoe@example.com" }
        },
        "work_in_progress": false,
        "draft": false,
        "action": action
    });
    if let Some(old) = oldrev {
        attributes["oldrev"] = json!(old);
    }
    json!({
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {
            "id": 1, "name": "Zoë Ångström", "username": "zoe",
            "avatar_url": "https://gitlab.example.com/uploads/user/avatar/1/zoe.png",
            "email": "zoe@example.com"
        },
        "project": project(target, 15, &target_clone),
        "repository": {
            "name": target.rsplit('/').next().unwrap_or(target),
            "url": format!("git@gitlab.example.com:{target}.git"),
            "description": "",
            "homepage": format!("https://gitlab.example.com/{target}")
        },
        "object_attributes": attributes,
        "labels": [],
        "changes": {}
    })
}

/// A GitHub (or Gitea) `pull_request` body (fields from GitHub's webhook
/// documentation). `head` is the repository the changes come from (the
/// base itself, or a fork) with its clone URL; `action` is `opened`,
/// `synchronize` (Gitea: `synchronized`), `reopened`, `edited`…
pub fn pull_request(
    base: &str,
    head: (&str, &str),
    number: u64,
    head_branch: &str,
    sha: &str,
    action: &str,
) -> Value {
    let (head_name, head_clone) = head;
    let repo = |full_name: &str, id: u64, clone: &str| {
        json!({
            "id": id,
            "name": full_name.rsplit('/').next().unwrap_or(full_name),
            "full_name": full_name,
            "private": false,
            "owner": { "login": full_name.split('/').next().unwrap_or_default(), "id": id },
            "html_url": format!("https://github.com/{full_name}"),
            "fork": full_name != base,
            "clone_url": clone,
            "ssh_url": format!("git@github.com:{full_name}.git"),
            "default_branch": "main"
        })
    };
    let base_clone = format!("https://github.com/{base}.git");
    let mut body = json!({
        "action": action,
        "number": number,
        "pull_request": {
            "url": format!("https://api.github.com/repos/{base}/pulls/{number}"),
            "id": 279147437,
            "html_url": format!("https://github.com/{base}/pull/{number}"),
            "number": number,
            "state": "open",
            "locked": false,
            "title": "Zoë's change: the page greets in Ελληνικά",
            "user": { "login": "zoë-ångström", "id": 21031067, "type": "User" },
            "body": "Grüße",
            "head": {
                "label": format!("{}:{head_branch}", head_name.split('/').next().unwrap_or_default()),
                "ref": head_branch,
                "sha": sha,
                "repo": repo(head_name, 186853003, head_clone)
            },
            "base": {
                "label": format!("{}:main", base.split('/').next().unwrap_or_default()),
                "ref": "main",
                "sha": "f95f852bd8fca8fcc58a9a2d6c842781e32a215e",
                "repo": repo(base, 186853002, &base_clone)
            },
            "draft": false,
            "merged": false
        },
        "repository": repo(base, 186853002, &base_clone),
        "sender": { "login": "zoë-ångström", "id": 21031067, "type": "User" }
    });
    if action.starts_with("synchronize") {
        body["before"] = json!("6113728f27ae82c7b1a177c8d03f9e96e0adf246");
        body["after"] = json!(sha);
    }
    body
}

/// A Gitea `push` body (fields from Gitea's webhook documentation).
pub fn gitea_push(full_name: &str, git_ref: &str, sha: &str) -> Value {
    json!({
        "ref": git_ref,
        "before": "0000000000000000000000000000000000000000",
        "after": sha,
        "compare_url": format!("https://gitea.example.com/{full_name}/compare/{sha}"),
        "commits": [{
            "id": sha,
            "message": "Grüße aus Zürich\n",
            "url": format!("https://gitea.example.com/{full_name}/commit/{sha}"),
            "author": { "name": "Zoë Ångström", "email": "zoe@example.com", "username": "zoe" },
            "committer": { "name": "Zoë Ångström", "email": "zoe@example.com", "username": "zoe" },
            "verification": null,
            "timestamp": "2026-11-28T10:00:00+01:00",
            "added": [], "removed": [], "modified": ["index.html"]
        }],
        "head_commit": {
            "id": sha,
            "message": "Grüße aus Zürich\n",
            "url": format!("https://gitea.example.com/{full_name}/commit/{sha}"),
            "author": { "name": "Zoë Ångström", "email": "zoe@example.com", "username": "zoe" },
            "committer": { "name": "Zoë Ångström", "email": "zoe@example.com", "username": "zoe" },
            "timestamp": "2026-11-28T10:00:00+01:00",
            "added": [], "removed": [], "modified": ["index.html"]
        },
        "repository": {
            "id": 140,
            "owner": { "id": 1, "login": full_name.split('/').next().unwrap_or_default(), "full_name": "", "email": "" },
            "name": full_name.rsplit('/').next().unwrap_or(full_name),
            "full_name": full_name,
            "private": false,
            "fork": false,
            "html_url": format!("https://gitea.example.com/{full_name}"),
            "clone_url": format!("https://gitea.example.com/{full_name}.git"),
            "ssh_url": format!("git@gitea.example.com:{full_name}.git"),
            "default_branch": "main"
        },
        "pusher": { "id": 1, "login": "zoe", "full_name": "Zoë Ångström", "email": "zoe@example.com", "username": "zoe" },
        "sender": { "id": 1, "login": "zoe", "full_name": "Zoë Ångström", "email": "zoe@example.com", "username": "zoe" }
    })
}

/// `X-Gitea-Signature` of `body` with `secret`: the HMAC-SHA256 in hex.
pub fn gitea_signature(secret: &str, body: &[u8]) -> String {
    github_signature(secret, body)
        .trim_start_matches("sha256=")
        .to_owned()
}
