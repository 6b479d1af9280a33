//! The alert rules in `deploy/prometheus/` are valid and fire when they
//! should: `promtool check rules` and `promtool test rules` (the cases in
//! `quotaflow-rules.test.yml`: input series in, expected alerts out).
//! `scripts/services.sh up` installs promtool (Debian's prometheus package).

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
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

#[test]
fn alert_rules_are_valid() {
    let text = promtool(&["check", "rules", "quotaflow-rules.yml"]);
    assert!(text.contains("SUCCESS: 5 rules found"), "{text}");
}

#[test]
fn alert_rules_fire_on_the_series_they_are_written_for() {
    let text = promtool(&["test", "rules", "quotaflow-rules.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}
