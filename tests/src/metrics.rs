//! Reads a service's `/metrics` strictly as the Prometheus text format
//! (0.0.4): every line is a comment (`# HELP`, `# TYPE`) or a sample
//! `name{label="value",…} value`, names and labels well formed, values
//! numbers; anything else fails the test that reads it.

use std::collections::BTreeMap;

use crate::Stack;
use crate::stack::tokens;

/// One sample line.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses the text format; the error names the line and what is wrong.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            match words.as_slice() {
                ["TYPE", name, kind]
                    if is_name(name, true)
                        && ["counter", "gauge", "histogram", "summary", "untyped"]
                            .contains(kind) => {}
                ["HELP", name, ..] if is_name(name, true) => {}
                ["HELP" | "TYPE", ..] => return Err(bad("bad HELP or TYPE")),
                _ => {}
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(bad("no value")),
        };
        if !is_name(name, true) {
            return Err(bad("bad metric name"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end;
            loop {
                // label name
                let start = chars
                    .peek()
                    .map(|(i, _)| *i)
                    .ok_or_else(|| bad("unclosed labels"))?;
                if body[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = body[start..]
                    .find('=')
                    .ok_or_else(|| bad("label without '='"))?
                    + start;
                let key = &body[start..eq];
                if !is_name(key, false) {
                    return Err(bad("bad label name"));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            _ => return Err(bad("bad escape")),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => return Err(bad("unclosed label value")),
                    }
                }
                labels.insert(key.to_owned(), value);
                match chars.next() {
                    Some((_, ',')) => {}
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    _ => return Err(bad("expected ',' or '}'")),
                }
            }
            rest = &body[end..];
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let value = match fields.as_slice() {
            [v] | [v, _] => number(v).ok_or_else(|| bad("value is not a number"))?,
            _ => return Err(bad("expected a value (and a timestamp)")),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// `/metrics` of `service`: without a token 401; with a `read` token 200
/// in the text format, parsed.
pub async fn scrape(stack: &Stack, service: &str) -> Vec<Sample> {
    let client = stack.http_client();
    let url = stack.http_url(service, "/metrics");
    let anonymous = client.get(&url).send().await.expect("GET /metrics");
    assert_eq!(
        anonymous.status(),
        401,
        "{service}: /metrics without a token"
    );
    let response = client
        .get(&url)
        .bearer_auth(tokens::READ)
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200, "{service}: /metrics");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{service}: {content_type}"
    );
    let text = response.text().await.expect("body");
    parse(&text)
        .unwrap_or_else(|e| panic!("{service}: /metrics is not Prometheus text: {e}\n{text}"))
}

/// The sum of the samples named `name` whose labels include `labels`.
pub fn total(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_is_read_strictly() {
        let ok = parse(
            "# HELP x_total a counter\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"uote\"} 3\ny 1.5e3 1700000000\nz_bucket{le=\"+Inf\"} 2\n",
        )
        .expect("valid");
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].labels["b"], "q\"uote");
        assert_eq!(total(&ok, "x_total", &[("a", "1")]), 3.0);
        for bad in [
            "x{a=1} 2",
            "1x 2",
            "x{a=\"1\" 2",
            "x two",
            "# TYPE x countr",
            "x{-a=\"1\"} 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
