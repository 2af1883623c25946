//! The registry is the build cache: a build reuses the layers of the last
//! published image of its branch (or of the default branch), even though
//! the builder's engine kept nothing of the earlier build.

use std::time::Duration;

use gantry_tests::repo::SERVE;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{SampleRepo, Stack, StackOptions};

const TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn a_build_reuses_the_layers_of_the_last_published_image() {
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    // A step no other image in the engine has: only this project's own
    // published image can hold its layer.
    let stamp = uuid::Uuid::new_v4().simple().to_string();
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nRUN echo {stamp} > /stamp\nCOPY index.html /www/index.html\nCMD {SERVE}\n"
    );
    let c1 = repo.commit_file("Dockerfile", &dockerfile, "a step of its own");
    let p1 = stack.push(&project, "refs/heads/main", &c1).await;
    let end = stack.wait_outcome(&p1, TIMEOUT).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}");
    let first = String::from_utf8_lossy(&stack.cli(&["logs", &p1]).stdout).into_owned();
    let stamp_step = format!("RUN echo {stamp} > /stamp\n ---> Running in");
    assert!(
        first.contains(&stamp_step),
        "the first build ran the step:\n{first}"
    );

    // Only the page changes: the stamp's layer comes from the registry.
    std::fs::write(repo.path().join("index.html"), "hello again\n").expect("page");
    let c2 = repo.commit("page only");
    let p2 = stack.push(&project, "refs/heads/main", &c2).await;
    let end = stack.wait_outcome(&p2, TIMEOUT).await;
    let second = String::from_utf8_lossy(&stack.cli(&["logs", &p2]).stdout).into_owned();
    assert_eq!(end.routing_key, "image.published", "{end:?}\n{second}");
    assert!(
        second.contains(&format!("build cache: {}:main", project.image())),
        "{second}"
    );
    assert!(
        second.contains(&format!("RUN echo {stamp} > /stamp\n ---> Using cache")),
        "the second build reused the step:\n{second}"
    );
}
