//! `gantry lint [FILE]`: checks a `.gantry.yml` on this machine with the
//! builder's own parser (`gantry-pipeline`), so a push finds no error that
//! the lint did not. Exit 0 when the file is valid, 1 when it is not (the
//! error as `FILE:LINE:COLUMN: message`), 2 when it cannot be read.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use gantry_pipeline::Checked;
use serde_json::json;

/// The most a pipeline file may weigh (the builder reads no more).
const MAX_BYTES: u64 = 1024 * 1024;

pub(crate) fn run(json: bool, file: Option<PathBuf>) -> ExitCode {
    let path = file.unwrap_or_else(|| PathBuf::from(gantry_pipeline::FILE));
    let text = match read(&path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("gantry: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let shown = path.display().to_string();
    match gantry_pipeline::check(&text) {
        Ok(checked) => {
            let summary = summary(&checked);
            if json {
                println!(
                    "{}",
                    json!({ "file": shown, "valid": true, "summary": summary })
                );
            } else {
                println!("{shown}: valid ({summary})");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({
                        "file": shown, "valid": false,
                        "line": e.line, "column": e.column, "message": e.message,
                    })
                );
            } else {
                eprintln!("{shown}:{}:{}: {}", e.line, e.column, e.message);
            }
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if meta.len() > MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "{} bytes is more than the {MAX_BYTES} a pipeline file may have",
            meta.len()
        )));
    }
    std::fs::read_to_string(path)
}

fn summary(checked: &Checked) -> String {
    match checked {
        Checked::Service(f) => format!(
            "a service: image from {}, {} test step{}",
            f.image.dockerfile,
            f.test.len(),
            if f.test.len() == 1 { "" } else { "s" }
        ),
        Checked::Stack(s) => format!(
            "a stack: {} member{}, tests {}",
            s.members.len(),
            if s.members.len() == 1 { "" } else { "s" },
            s.tests
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
