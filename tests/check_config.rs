//! `quotaflow check-config FILE`: field-level errors and exit status.

use std::process::Command;

fn run(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_default_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (5 limits)"));
}

#[test]
fn every_bad_field_is_named_and_exit_status_is_1() {
    let (ok, _, err) = run(r#"
[[limits]]
name = "a"
algorithm = "token_bucket"
capacity = -1
refill_per_sec = 1

[[limits]]
name = "b"
algorithm = "leaky_bucket"

[whitelist]
client_ips = ["10.0.0.300/8"]
"#);
    assert!(!ok);
    assert!(
        err.contains("limits[0].capacity: must be an integer between 1 and"),
        "{err}"
    );
    assert!(
        err.contains("limits[1].algorithm: unknown algorithm `leaky_bucket`"),
        "{err}"
    );
    assert!(err.contains("whitelist.client_ips[0]"), "{err}");
    assert!(err.contains("3 error(s)"), "{err}");
}

#[test]
fn unknown_sections_and_type_errors_are_refused() {
    let (ok, _, err) = run("[server]\nlisten = 8080\n");
    assert!(!ok);
    assert!(err.contains("listen"), "{err}");
    let (ok, _, err) = run("[sever]\nlisten = \"127.0.0.1:1\"\n");
    assert!(!ok);
    assert!(err.contains("sever"), "{err}");
}

/// The shadow config is checked with the file that names it: serve would
/// refuse to start on it.
#[test]
fn a_broken_shadow_config_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shadow = dir.path().join("shadow.json");
    std::fs::write(
        &shadow,
        r#"{"version": 3, "limits": [{"name": "s", "algorithm": "token_bucket", "capacity": 0, "refill_per_sec": 1}]}"#,
    )
    .expect("write");
    let config = format!(
        "[shadow]\nconfig = \"{}\"\n\n[[limits]]\nname = \"a\"\nalgorithm = \"fixed_window\"\nlimit = 1\nwindow = \"1s\"\n",
        shadow.display()
    );
    let (ok, out, err) = run(&config);
    assert!(!ok);
    assert!(out.contains("c.toml: ok (1 limits)"), "{out}");
    assert!(
        err.contains("shadow.json: limits[0].capacity: must be an integer between 1 and"),
        "{err}"
    );
}
