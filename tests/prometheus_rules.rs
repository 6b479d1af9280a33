//! The rules in `deploy/prometheus/` are valid and fire when they should:
//! `promtool check rules` and `promtool test rules` (the cases in
//! `quotaflow-rules.test.yml`: input series in, expected alerts out), and
//! every alert's runbook is an entry of docs/operations.md.
//! `scripts/services.sh up` installs promtool (Debian's prometheus package).

use std::path::Path;
use std::process::Command;

/// Recording and alerting rules in quotaflow-rules.yml.
const RULES: usize = 24;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}); install it with `scripts/services.sh up` \
                 (Debian's prometheus package), or run `scripts/test.sh`"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// One rule of the rules file: its alert or record name and, for an
/// alert, its `runbook` annotation.
struct Rule {
    alert: bool,
    name: String,
    runbook: Option<String>,
}

/// The rules, read line by line (the file is written one key a line);
/// `rules_file_is_read_whole` holds this reading to promtool's count.
fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(root().join("deploy/prometheus/quotaflow-rules.yml"))
        .expect("read quotaflow-rules.yml");
    let mut rules: Vec<Rule> = Vec::new();
    for line in text.lines().map(str::trim) {
        let value = |key: &str| {
            line.strip_prefix(key)
                .map(|v| v.trim().trim_matches('"').to_owned())
        };
        if let Some(name) = value("- alert:") {
            rules.push(Rule {
                alert: true,
                name,
                runbook: None,
            });
        } else if let Some(name) = value("- record:") {
            rules.push(Rule {
                alert: false,
                name,
                runbook: None,
            });
        } else if let Some(runbook) = value("runbook:") {
            let rule = rules.last_mut().expect("a runbook before any rule");
            assert!(rule.runbook.is_none(), "{}: two runbooks", rule.name);
            rule.runbook = Some(runbook);
        }
    }
    rules
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn alert_rules_are_valid() {
    let text = promtool(&["check", "rules", "quotaflow-rules.yml"]);
    assert!(
        text.contains(&format!("SUCCESS: {RULES} rules found")),
        "{text}"
    );
}

#[test]
fn rules_file_is_read_whole() {
    let rules = rules();
    assert_eq!(
        rules.len(),
        RULES,
        "the line reading of the rules file found other rules than promtool"
    );
    assert!(rules.iter().filter(|r| r.alert).count() >= 18);
}

#[test]
fn alert_rules_fire_on_the_series_they_are_written_for() {
    let text = promtool(&["test", "rules", "quotaflow-rules.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Every alert points at its own entry under "Alerts and runbooks" in
/// docs/operations.md, and every entry there is an alert's.
#[test]
fn every_alert_has_a_runbook_entry_in_operations_md() {
    let doc = std::fs::read_to_string(root().join("docs/operations.md")).expect("operations.md");
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Alerts and runbooks"))
        .expect("docs/operations.md has a section \"## Alerts and runbooks\"");
    let entries: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .collect();
    let alerts: Vec<Rule> = rules().into_iter().filter(|r| r.alert).collect();
    let mut problems = Vec::new();
    for rule in &alerts {
        let Some(runbook) = &rule.runbook else {
            problems.push(format!("{}: no runbook annotation", rule.name));
            continue;
        };
        let Some(target) = runbook.strip_prefix("docs/operations.md#") else {
            problems.push(format!(
                "{}: runbook {runbook:?} is not docs/operations.md#…",
                rule.name
            ));
            continue;
        };
        match entries.iter().find(|h| anchor(h) == target) {
            None => problems.push(format!(
                "{}: no heading in \"Alerts and runbooks\" has the anchor #{target}",
                rule.name
            )),
            Some(h) if !h.contains(&rule.name) => problems.push(format!(
                "{}: its runbook #{target} is the entry of {h:?}",
                rule.name
            )),
            Some(_) => {}
        }
    }
    for entry in &entries {
        if !alerts.iter().any(|r| entry.contains(&r.name)) {
            problems.push(format!(
                "runbook entry {entry:?} names no alert of the rules file"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every `quotaflow_*` metric that the rules and their test series name is
/// one the binary exports (`quotaflow metrics`), with labels it has: a name
/// misspelt alike in a rule and in its cases passes promtool and never fires.
#[test]
fn rules_name_only_metrics_the_binary_exports() {
    let out = Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .arg("metrics")
        .output()
        .expect("run quotaflow metrics");
    assert!(out.status.success(), "quotaflow metrics failed");
    let catalog: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("quotaflow metrics prints JSON");
    let labels_of = |name: &str| -> Option<Vec<String>> {
        let m = catalog.iter().find(|m| m["name"] == name)?;
        let mut labels: Vec<String> = m["labels"]
            .as_array()?
            .iter()
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect();
        // Added by Prometheus to every scraped series.
        labels.extend(["job".to_owned(), "instance".to_owned()]);
        Some(labels)
    };
    let mut problems = Vec::new();
    let mut seen = 0;
    for file in ["quotaflow-rules.yml", "quotaflow-rules.test.yml"] {
        let text = std::fs::read_to_string(root().join("deploy/prometheus").join(file))
            .expect("read rules");
        for (at, _) in text.match_indices("quotaflow_") {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // a recording rule's name, e.g. job:quotaflow_checks:rate5m
            }
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| labels_of(b).is_some()))
                .unwrap_or(name);
            seen += 1;
            let Some(labels) = labels_of(base) else {
                problems.push(format!("{file}: {name} is not exported by quotaflow"));
                continue;
            };
            let Some(selector) = rest[end..].strip_prefix('{') else {
                continue;
            };
            let selector = &selector[..selector.find('}').expect("a closed selector")];
            for matcher in selector.split(',').filter(|m| !m.trim().is_empty()) {
                let label = matcher
                    .split(['=', '!', '~'])
                    .next()
                    .unwrap_or_default()
                    .trim();
                if !labels.iter().any(|l| l == label) {
                    problems.push(format!("{file}: {name} has no label {label:?}"));
                }
            }
        }
    }
    assert!(seen > 50, "only {seen} metric names found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn anchors_are_githubs() {
    assert_eq!(anchor("QuotaflowNotReady"), "quotaflownotready");
    assert_eq!(anchor(" Redis for checkpoints "), "redis-for-checkpoints");
    assert_eq!(anchor("`a.b` (c)"), "ab-c");
}
