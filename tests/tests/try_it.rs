//! The README's "Try it", followed as written: its first block
//! (`scripts/run.sh`) runs in the background until it says the demo is
//! ready, then the lines of its second block run one by one in a shell, in
//! the repository's folder — the demo push answers the new version on
//! staging, the broken push leaves it answering and says it was rolled back.

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The `sh` code blocks of the README's "Try it" section.
fn try_it_blocks() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let start = readme.find("\n## Try it\n").expect("a Try it section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in section.lines() {
        match (&mut current, line.trim()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), l) if !l.is_empty() => block.push(l.to_owned()),
            _ => {}
        }
    }
    blocks
}

/// Kills run.sh and everything it started when the test ends.
struct RunSh(std::process::Child);

impl Drop for RunSh {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{pgid}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.0.wait();
        // What the demo deployed outlives the services, as in real life.
        gantry_tests::docker::remove_labelled("io.gantry.project=demo");
    }
}

/// Runs `lines` in one bash, each framed by markers: (line, exit code, output).
fn run_lines(lines: &[String]) -> Vec<(String, i32, String)> {
    let mut script = String::from("set +e\n");
    for (i, line) in lines.iter().enumerate() {
        // What the user sees: standard output and error.
        script.push_str(&format!(
            "echo '::begin {i}'\n{{ {line}\n}} 2>&1\necho \"::end {i} $?\"\n"
        ));
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root())
        .env_remove("GANTRY_TOKEN")
        .env_remove("GANTRY_HOME")
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut results = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let begin = format!("::begin {i}\n");
        let end = format!("::end {i} ");
        let from = text
            .find(&begin)
            .map(|p| p + begin.len())
            .unwrap_or_default();
        let to = text[from..]
            .find(&end)
            .map(|p| p + from)
            .unwrap_or(text.len());
        let code = text[to..]
            .strip_prefix(&end)
            .and_then(|rest| rest.lines().next())
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(-1);
        results.push((line.clone(), code, text[from..to].to_owned()));
    }
    results
}

fn version_in(text: &str) -> Option<u32> {
    let at = text.find("version ")?;
    text[at + 8..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test]
async fn the_readme_try_it_steps_work_as_written() {
    let blocks = try_it_blocks();
    assert_eq!(blocks.len(), 2, "Try it has two sh blocks: {blocks:?}");
    assert_eq!(blocks[0], vec!["scripts/run.sh".to_owned()]);

    // 1. The first command, in the background, until the demo is ready.
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&blocks[0][0])
        .current_dir(root())
        .env_remove("GANTRY_CONFIG")
        .env_remove("GANTRY_HOME")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("scripts/run.sh starts");
    let stderr = child.stderr.take().expect("stderr");
    let run = RunSh(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let ready = line.contains("the demo project is ready");
            seen.push(line);
            if ready {
                let _ = tx.send(Ok(seen.clone()));
            }
        }
        let _ = tx.send(Err(seen));
    });
    match rx.recv_timeout(Duration::from_secs(600)) {
        Ok(Ok(_)) => {}
        Ok(Err(seen)) => panic!("scripts/run.sh ended:\n{}", seen.join("\n")),
        Err(e) => panic!("scripts/run.sh never said the demo is ready: {e}"),
    }

    // 2. The second block, line by line, as a user types it.
    let results = run_lines(&blocks[1]);
    let report = results
        .iter()
        .map(|(l, c, o)| format!("$ {l}\n{o}[exit {c}]"))
        .collect::<Vec<_>>()
        .join("\n");
    let find = |pred: &dyn Fn(&str) -> bool, nth: usize| {
        results
            .iter()
            .filter(|(l, _, _)| pred(l))
            .nth(nth)
            .unwrap_or_else(|| panic!("no such line in Try it:\n{report}"))
            .clone()
    };
    let (_, code, out) = find(&|l| l.ends_with("gantry demo push"), 0);
    assert_eq!(code, 0, "{report}");
    assert!(out.contains("runs in staging"), "{report}");
    let deployed = version_in(&out[out.find("pushed").unwrap_or(0)..]).expect("a version");

    let (_, code, page) = find(&|l| l.starts_with("curl"), 0);
    assert_eq!(code, 0, "{report}");
    assert!(page.contains(&format!("version {deployed}<")), "{report}");

    let (_, code, out) = find(&|l| l.contains("demo push --break"), 0);
    assert_ne!(code, 0, "{report}");
    assert!(out.contains("previous version keeps answering"), "{report}");

    let (_, code, page) = find(&|l| l.starts_with("curl"), 1);
    assert_eq!(code, 0, "{report}");
    assert!(page.contains(&format!("version {deployed}<")), "{report}");

    let (_, code, out) = find(&|l| l.ends_with("gantry pipelines"), 0);
    assert_eq!(code, 0, "{report}");
    assert!(out.contains("rolled_back"), "{report}");
    let (_, code, out) = find(&|l| l.ends_with("gantry envs"), 0);
    assert_eq!(code, 0, "{report}");
    assert!(out.contains("staging") && out.contains("runs "), "{report}");
    drop(run);
}
