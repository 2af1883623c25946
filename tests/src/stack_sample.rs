//! The sample stack of the stack tests and the stack benchmark: `api`
//! answers its version, `web` (a CGI page) fetches `api` and says what it
//! saw, and the stack repository's `tests` service checks the answer
//! through `web` — all `FROM scratch` with the static busybox.

use std::time::Duration;

use gantry_proto::v1::event::Payload;

use crate::stack::ProjectSpec;
use crate::{SampleRepo, Stack};

/// The stack's test service: the run's network does not reach the host
/// (RabbitMQ listens on all its addresses), and what `web` says must come
/// from a contract-keeping `api`.
pub const CHECK: &str = "for host in $$(ip route | awk '/default/ {print $$3}') 172.17.0.1; do if nc -w 1 $$host 5672 </dev/null; then echo \"reached $$host\"; exit 3; fi; done; out=$$(wget -qO- http://web:8080/cgi-bin/v) && echo \"$$out\" && echo \"$$out\" | grep -q '^web sees: api v[0-9]'";

/// A member's Dockerfile: busybox httpd serving `/www` on 8080, with
/// `extra` instructions before the `CMD`.
pub fn member_dockerfile(extra: &str) -> String {
    format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCOPY index.html /www/index.html\n{extra}CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
    )
}

/// The `.gantry.yml` of the members: the page is in the image.
pub const MEMBER_PIPELINE: &str =
    "image:\n  dockerfile: Dockerfile\ntest:\n  - name: page\n    run: test -s /www/index.html\n";

/// `api`: answers its version at `/`.
pub fn api_repo() -> SampleRepo {
    let repo = SampleRepo::new();
    repo.write("Dockerfile", &member_dockerfile(""));
    repo.write(".gantry.yml", MEMBER_PIPELINE);
    repo.commit_file("index.html", "api v1\n", "api v1");
    repo
}

/// `web`: a CGI page that fetches `api` and says what it saw.
pub fn web_repo() -> SampleRepo {
    let repo = SampleRepo::new();
    repo.write(
        "Dockerfile",
        &member_dockerfile(
            "COPY v /www/cgi-bin/v\nRUN [\"/bin/chmod\", \"755\", \"/www/cgi-bin/v\"]\n",
        ),
    );
    repo.write(".gantry.yml", MEMBER_PIPELINE);
    repo.write("index.html", "web v1\n");
    repo.write(
        "v",
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"web sees: $(wget -qO- http://api:8080/)\"\n",
    );
    repo.commit("web v1");
    repo
}

/// A compose health check that fetches `url`.
fn healthcheck(url: &str) -> String {
    format!(
        "    healthcheck:\n      test: [CMD, wget, -q, -O, /dev/null, '{url}']\n      interval: 1s\n      timeout: 2s\n      retries: 30\n"
    )
}

/// The stack repository: the team's compose file (with what only makes
/// sense on a laptop: `build`, `ports`) and the `stack:` section.
pub fn stack_repo(tests_image: &str) -> SampleRepo {
    let repo = SampleRepo::new();
    for f in ["Dockerfile", "index.html", "busybox"] {
        let _ = std::fs::remove_file(repo.path().join(f));
    }
    repo.write(
        ".gantry.yml",
        "stack:\n  members: {web: web, api: api}\n  tests: [tests]\n  timeout: 180\n",
    );
    let compose = format!(
        "version: '3.8'\nservices:\n  api:\n    image: example.invalid/team/api:dev\n    build: ../api\n    init: true\n{}  web:\n    image: example.invalid/team/web:dev\n    init: true\n    ports: ['8080:8080']\n    depends_on: [api]\n{}  tests:\n    image: {tests_image}\n    depends_on: [web]\n    command: [sh, -c, \"{}\"]\n",
        healthcheck("http://localhost:8080/"),
        healthcheck("http://localhost:8080/index.html"),
        CHECK.replace('"', "\\\"")
    );
    repo.write("docker-compose.yml", &compose);
    repo.commit("the shop stack");
    repo
}

/// Publishes a new commit of a member and returns (pipeline, digest).
pub async fn release(
    stack: &Stack,
    spec: &ProjectSpec,
    repo: &SampleRepo,
    page: &str,
) -> (String, String) {
    let current = std::fs::read_to_string(repo.path().join("index.html")).unwrap_or_default();
    let sha = if current == page {
        repo.head()
    } else {
        repo.commit_file("index.html", page, page.trim())
    };
    let pipeline = stack.push(spec, "refs/heads/main", &sha).await;
    match stack
        .wait_outcome(&pipeline, Duration::from_secs(240))
        .await
        .event
        .payload
    {
        Some(Payload::ImagePublished(p)) => (pipeline, p.digest),
        other => panic!("{} {page:?} was not published: {other:?}", spec.name),
    }
}

/// The sample stack, ready to declare: the stack repository's test image
/// (built as `<prefix>/stack-tests:<random>`), the members' repositories
/// and the stack repository, with their project specs (the stack `shop`
/// follows `api` and `web`).
pub struct Shop {
    pub tests_image: String,
    pub api: SampleRepo,
    pub web: SampleRepo,
    pub shop: SampleRepo,
    pub api_spec: ProjectSpec,
    pub web_spec: ProjectSpec,
    pub shop_spec: ProjectSpec,
}

impl Shop {
    pub fn new(prefix: &str) -> Self {
        let tests_image = format!(
            "{prefix}/stack-tests:{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        crate::docker::build_busybox_image(&tests_image);
        let (api, web) = (api_repo(), web_repo());
        let shop = stack_repo(&tests_image);
        let api_spec = ProjectSpec::new("api", &api.url());
        let web_spec = ProjectSpec::new("web", &web.url());
        let shop_spec = ProjectSpec::stack("shop", &shop.url(), &["api", "web"]);
        Self {
            tests_image,
            api,
            web,
            shop,
            api_spec,
            web_spec,
            shop_spec,
        }
    }
}
