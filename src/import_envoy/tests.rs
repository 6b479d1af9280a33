//! The mapping on real-world shaped envoy ratelimit files (envoy's README
//! examples, Istio's, an edge proxy's), and the report of what is lost.

use super::*;
use quotaflow_core::algorithms::State;
use quotaflow_core::rules::{LimitDoc, OneOrMany, Request};
use serde_json::json;

fn import_all(files: &[(&str, &str)], maps: &[&str]) -> Import {
    let mut mapping = Mapping::default();
    for m in maps {
        mapping.add(m).unwrap();
    }
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
        .collect();
    import(&files, &mapping).unwrap_or_else(|e| panic!("{e}"))
}

fn one(text: &str) -> Import {
    import_all(&[("f.yaml", text)], &[])
}

fn err(text: &str) -> String {
    import(&[("f.yaml".into(), text.into())], &Mapping::default())
        .err()
        .expect("refused")
        .to_string()
}

fn limit<'a>(i: &'a Import, name: &str) -> &'a LimitDoc {
    i.doc
        .limits
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no limit {name} in {:#?}", i.doc.limits))
}

fn params(l: &LimitDoc) -> serde_json::Value {
    json!({"algorithm": l.algorithm, "key": l.key, "limit": l.params["limit"],
           "window": l.params["window"], "shadow": l.shadow,
           "match": l.matcher.as_ref().map(|m| json!({
               "method": m.method.as_ref().map(|x| match x { OneOrMany::One(s) => s.clone(), OneOrMany::Many(v) => v.join(",") }),
               "path": m.path, "path_prefix": m.path_prefix}))})
}

fn missing(i: &Import) -> Vec<String> {
    i.report.missing().map(ToString::to_string).collect()
}

fn notes(i: &Import) -> Vec<String> {
    i.report
        .items
        .iter()
        .filter(|x| x.kind == Kind::Note)
        .map(ToString::to_string)
        .collect()
}

#[test]
fn every_unit_becomes_a_fixed_window_of_its_length_aligned_like_envoys() {
    let mut text = String::from("domain: units\ndescriptors:\n");
    let units = [
        ("second", 1u64, "1s"),
        ("minute", 60, "1m"),
        ("hour", 3600, "1h"),
        ("day", 86_400, "1d"),
        ("week", 7 * 86_400, "7d"),
        ("month", 30 * 86_400, "30d"),
        ("year", 365 * 86_400, "365d"),
    ];
    for (u, _, _) in units {
        text.push_str(&format!(
            "  - key: path\n    value: /{u}\n    descriptors:\n      - key: remote_address\n        \
             rate_limit:\n          unit: {}\n          requests_per_unit: 3\n",
            u.to_uppercase()
        ));
    }
    let i = one(&text);
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    let rules = Rules::compile(i.doc.clone(), 1, &Fingerprinter::from_secret("t")).unwrap();
    for (u, secs, window) in units {
        let name = format!("units.path__{u}.remote_address");
        assert_eq!(
            params(limit(&i, &name)),
            json!({"algorithm": "fixed_window", "key": ["client_ip"], "limit": 3, "window": window,
                   "shadow": false, "match": {"method": null, "path": format!("/{u}"), "path_prefix": null}})
        );
        // envoy ratelimit's window holds `now / unit * unit`: a window that
        // started at a multiple of the unit since the epoch ends one unit
        // later. quotaflow's resets at the same instant.
        let compiled = rules.limits.iter().find(|l| l.name == name).unwrap();
        let start_ms = 1_700_000_000_000 / (secs * 1000) * (secs * 1000) + secs * 1000;
        let now_ms = start_ms + secs * 1000 / 3;
        let o = compiled.algorithm.decide(&State::default(), now_ms, 1);
        assert_eq!(o.verdict.reset_ms, start_ms + secs * 1000 - now_ms, "{u}");
        assert_eq!(o.state[0], start_ms, "{u}: window start");
    }
}

#[test]
fn nested_descriptors_three_deep_become_one_key_and_a_match() {
    let i = one(r#"
domain: api
descriptors:
  - key: user_id
    descriptors:
      # writes: 2 a second per user and path
      - key: method
        value: POST
        descriptors:
          - key: path
            rate_limit:
              unit: second
              requests_per_unit: 2
      # reads: 50 a minute per user
      - key: method
        value: GET
        rate_limit: {unit: minute, requests_per_unit: 50}
"#);
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    assert_eq!(
        params(limit(&i, "api.user_id.method_GET")),
        json!({"algorithm": "fixed_window", "key": ["user_id"], "limit": 50, "window": "1m",
               "shadow": false, "match": {"method": "GET", "path": null, "path_prefix": null}})
    );
    assert_eq!(
        params(limit(&i, "api.user_id.method_POST.path")),
        json!({"algorithm": "fixed_window", "key": ["user_id", "path"], "limit": 2, "window": "1s",
               "shadow": false, "match": {"method": "POST", "path": null, "path_prefix": null}})
    );
    // The key-only `method` loses POST to its sibling in envoy, but the
    // POST branch has no limit at that depth: reported.
    let i2 = one(r#"
domain: api
descriptors:
  - key: user_id
    descriptors:
      - key: method
        value: POST
        descriptors:
          - key: path
            rate_limit: {unit: second, requests_per_unit: 2}
      - key: method
        rate_limit: {unit: minute, requests_per_unit: 50}
"#);
    let m = missing(&i2);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains("f.yaml:6:9")
            && m[0].contains("`method` is `POST`")
            && m[0].contains("`api.user_id.method`"),
        "{m:?}"
    );
    assert_eq!(i2.exit_code(), 2);
    // The whole document is still there.
    assert_eq!(i2.doc.limits.len(), 2);
}

#[test]
fn several_domains_merge_with_distinct_names_and_say_so() {
    let edge = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {name: per_ip, unit: second, requests_per_unit: 10}
"#;
    let api = r#"
domain: api
descriptors:
  - key: remote_address
    rate_limit: {name: per_ip, unit: minute, requests_per_unit: 100}
  - key: x-api-key
    rate_limit: {unit: hour, requests_per_unit: 1000}
"#;
    let i = import_all(&[("edge.yaml", edge), ("api.yaml", api)], &[]);
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    let names: Vec<&str> = i.doc.limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["per_ip", "per_ip-2", "api.x-api-key"]);
    assert_eq!(limit(&i, "per_ip-2").params["window"], "1m");
    assert_eq!(limit(&i, "api.x-api-key").key, [Dimension::ApiKey]);
    assert!(
        notes(&i)
            .iter()
            .any(|n| n.contains("2 domains (edge, api) become one config")),
        "{:?}",
        notes(&i)
    );
    // Two files of one domain are refused, as envoy ratelimit does.
    let e = import(
        &[
            ("a.yaml".into(), edge.into()),
            ("b.yaml".into(), edge.into()),
        ],
        &Mapping::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("b.yaml:2:1") && e.contains("domain `edge` again"),
        "{e}"
    );
}

#[test]
fn an_unlimited_descriptor_alone_is_left_out() {
    // Envoy's README example 5, with mapped keys.
    let i = one(r#"
domain: internal
descriptors:
  - key: path
    value: /healthz
    rate_limit:
      unlimited: true
  - key: path
    rate_limit:
      unit: minute
      requests_per_unit: 100
"#);
    // `/healthz` is unlimited where the per-path limit would count it: the
    // path is no whitelist dimension, so that is reported.
    let m = missing(&i);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains("`path` is `/healthz`") && m[0].contains("are unlimited"),
        "{m:?}"
    );
    let alone = one(
        "domain: internal\ndescriptors:\n  - key: path\n    value: /healthz\n    rate_limit: {unlimited: true}\n",
    );
    assert_eq!(alone.exit_code(), 0);
    assert!(alone.doc.limits.is_empty());
}

#[test]
fn an_unlimited_address_under_a_per_ip_limit_is_whitelisted_when_nothing_else_counts_it() {
    let text = r#"
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10
  # the monitoring probe
  - key: remote_address
    value: 10.0.0.5
    rate_limit:
      unlimited: true
"#;
    let i = one(text);
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    assert_eq!(i.doc.whitelist.client_ips, ["10.0.0.5"]);
    // With a second limit envoy applies to that address, a whitelist would
    // exempt it from that one too: not whitelisted, reported.
    let more =
        format!("{text}  - key: path\n    rate_limit: {{unit: second, requests_per_unit: 5}}\n");
    let i = one(&more);
    assert!(i.doc.whitelist.client_ips.is_empty());
    let m = missing(&i);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains("client_ip=10.0.0.5 is unlimited")
            && m[0].contains("`edge_proxy_per_ip.path`"),
        "{m:?}"
    );
    // A shadow limit beside it refuses nothing: the whitelist stays exact.
    let shadowed = format!(
        "{text}  - key: path\n    shadow_mode: true\n    rate_limit: {{unit: second, requests_per_unit: 5}}\n"
    );
    let i = one(&shadowed);
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    assert_eq!(i.doc.whitelist.client_ips, ["10.0.0.5"]);
}

#[test]
fn shadow_mode_and_quota_mode_become_shadow() {
    // Envoy's README example 6, with users as user ids and a per-user key.
    let i = one(r#"
domain: example6
descriptors:
  - key: path
    value: /auth
    descriptors:
      - key: user_id
        shadow_mode: true
        rate_limit: {requests_per_unit: 10, unit: second}
  - key: path
    value: /pay
    descriptors:
      - key: user_id
        quota_mode: yes
        detailed_metric: true
        rate_limit: {requests_per_unit: 20, unit: second}
"#);
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    assert!(limit(&i, "example6.path__auth.user_id").shadow);
    assert!(limit(&i, "example6.path__pay.user_id").shadow);
    let n = notes(&i);
    assert!(n.iter().any(|x| x.contains("quota_mode")), "{n:?}");
    assert!(n.iter().any(|x| x.contains("detailed_metric")), "{n:?}");
}

#[test]
fn replaces_is_reported_unless_the_two_never_meet() {
    // Envoy's README example 7, with paths and methods for its generic keys.
    let i = one(r#"
domain: example7
descriptors:
  - key: path
    value: /orders
    descriptors:
      - key: user_id
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: method
    value: GET
    descriptors:
      - key: user_id
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
"#);
    let m = missing(&i);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains("f.yaml:17:11")
            && m[0].contains("replaces `specific_limit`")
            && m[0].contains("applies both"),
        "{m:?}"
    );
    // Both limits are in the config: the replaced one applies too.
    assert_eq!(i.doc.limits.len(), 2);
    // Different fixed paths: no request carries both, replaces changes nothing.
    let apart = one(r#"
domain: example7
descriptors:
  - key: path
    value: /orders
    descriptors:
      - key: user_id
        rate_limit: {name: specific_limit, requests_per_unit: 5, unit: second}
  - key: path
    value: /refunds
    descriptors:
      - key: user_id
        rate_limit:
          replaces: [{name: specific_limit}]
          requests_per_unit: 10
          unit: second
"#);
    assert_eq!(apart.exit_code(), 0, "{:?}", missing(&apart));
    let nothing = one(
        "domain: d\ndescriptors:\n  - key: user_id\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: ghost}]}\n",
    );
    assert_eq!(nothing.exit_code(), 0);
    assert!(notes(&nothing)
        .iter()
        .any(|n| n.contains("replaces `ghost`")));
}

#[test]
fn keys_without_a_dimension_are_reported_and_can_be_mapped() {
    // Envoy's README examples 1 and 2.
    let mongo = r#"
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit: {unit: second, requests_per_unit: 500}
  - key: database
    value: default
    rate_limit: {unit: second, requests_per_unit: 500}
"#;
    let i = one(mongo);
    assert!(i.doc.limits.is_empty());
    let m = missing(&i);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(
        m[0].contains("descriptor key `database` has no quotaflow dimension"),
        "{m:?}"
    );
    assert!(m[0].contains("--map database=DIMENSION"), "{m:?}");

    let messaging = r#"
domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5
  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
"#;
    let i = import_all(&[("m.yaml", messaging)], &["to_number=user_id"]);
    assert_eq!(
        params(limit(&i, "messaging.to_number")),
        json!({"algorithm": "fixed_window", "key": ["user_id"], "limit": 100, "window": "1d",
               "shadow": false, "match": null})
    );
    let m = missing(&i);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains("`message_type` has no quotaflow dimension"),
        "{m:?}"
    );
    // A fixed value of a dimension quotaflow cannot match on.
    let i = import_all(
        &[("m.yaml", messaging)],
        &["to_number=user_id", "message_type=api_key"],
    );
    let m = missing(&i);
    assert!(m[0].contains("selects one api_key value"), "{m:?}");
    // Defaults can be unmapped, and are found in any letter case.
    let i = import_all(
        &[("p.yaml", "domain: d\ndescriptors:\n  - key: PATH\n    rate_limit: {unit: minute, requests_per_unit: 1}\n")],
        &[],
    );
    assert_eq!(i.doc.limits[0].key, [Dimension::Path]);
    let i = import_all(
        &[("p.yaml", "domain: d\ndescriptors:\n  - key: PATH\n    rate_limit: {unit: minute, requests_per_unit: 1}\n")],
        &["PATH=none"],
    );
    assert!(i.doc.limits.is_empty());
    let mut m = Mapping::default();
    assert!(m
        .add("x=tenant")
        .unwrap_err()
        .to_string()
        .contains("unknown dimension `tenant`"));
    assert!(m.add("nothing").is_err());
}

#[test]
fn a_specific_sibling_that_is_at_least_as_strict_keeps_the_config_exact() {
    // Istio's envoy ratelimit example: one page 1 a minute, every path 100.
    let istio = r#"
domain: ratelimit
descriptors:
  - key: PATH
    value: "/productpage"
    rate_limit:
      unit: minute
      requests_per_unit: 1
  - key: PATH
    rate_limit:
      unit: minute
      requests_per_unit: 100
"#;
    let i = one(istio);
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    assert_eq!(
        params(limit(&i, "ratelimit.PATH__productpage")),
        json!({"algorithm": "fixed_window", "key": [], "limit": 1, "window": "1m",
               "shadow": false, "match": {"method": null, "path": "/productpage", "path_prefix": null}})
    );
    // Looser than the general limit: the general one would refuse sooner.
    let i = one(&istio.replace("requests_per_unit: 1\n", "requests_per_unit: 1000\n"));
    let m = missing(&i);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].contains("does not keep them within"), "{m:?}");
    // Windows of different lengths: 1 a second lets 60 a minute through
    // (within 100), 2 a second lets 120 (not within).
    let per_second = |n: u32| {
        one(&istio.replace(
            "unit: minute\n      requests_per_unit: 1\n",
            &format!("unit: second\n      requests_per_unit: {n}\n"),
        ))
    };
    assert_eq!(per_second(1).exit_code(), 0);
    assert_eq!(per_second(2).exit_code(), 2);
    // The general limit in shadow mode refuses nothing: exact.
    let i = one(&istio.replace(
        "  - key: PATH\n    rate_limit:",
        "  - key: PATH\n    shadow_mode: true\n    rate_limit:",
    ));
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
}

#[test]
fn path_wildcards_become_prefixes_and_share_threshold_one_count() {
    // Envoy's README examples 9 and 11, on paths.
    let i = one(r#"
domain: files
descriptors:
  - key: path
    value: /files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: path
    value: /api/v1/*
    rate_limit: {unit: minute, requests_per_unit: 5}
"#);
    assert_eq!(
        params(limit(&i, "files.path__files__")),
        json!({"algorithm": "fixed_window", "key": [], "limit": 10, "window": "1h",
               "shadow": false, "match": {"method": null, "path": null, "path_prefix": "/files/"}})
    );
    assert_eq!(limit(&i, "files.path__api__").key, [Dimension::Path]);
    // `/api/v1/*` comes after `/api/*`, which takes all its values first.
    assert!(i
        .doc
        .limits
        .iter()
        .all(|l| l.name != "files.path__api_v1__"));
    assert!(
        notes(&i).iter().any(|n| n.contains("never reached")),
        "{:?}",
        notes(&i)
    );
    assert_eq!(i.exit_code(), 0, "{:?}", missing(&i));
    // A wildcard on another dimension has no quotaflow form.
    let i = one("domain: d\ndescriptors:\n  - key: user_id\n    value: bot-*\n    rate_limit: {unit: second, requests_per_unit: 1}\n");
    assert!(missing(&i)[0].contains("quotaflow matches prefixes of paths only"));
}

#[test]
fn a_zero_limit_and_fixed_identities_are_reported() {
    // Envoy's README example 3: a blocked address.
    let i = one(r#"
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit: {unit: second, requests_per_unit: 0}
"#);
    let m = missing(&i);
    assert!(
        m.iter()
            .any(|x| x.contains("requests_per_unit 0 refuses every request")),
        "{m:?}"
    );
    assert!(
        m.iter()
            .any(|x| x.contains("`remote_address` is `50.0.0.5`")),
        "{m:?}"
    );
    assert_eq!(i.doc.limits.len(), 1);
}

#[test]
fn invalid_files_are_refused_with_the_place() {
    let e = err("domain: d\ndescriptors:\n  - key: a\n   value: b\n");
    assert!(
        e.starts_with("f.yaml:4:") && e.contains("not valid YAML"),
        "{e}"
    );
    let e = err("domain: d\ndescriptors:\n  - key: user_id\n    rate_limits: {}\n");
    assert_eq!(
        e,
        "f.yaml:4:5: unknown key `rate_limits` (envoy ratelimit refuses the file)"
    );
    let e = err("domain: d\ndescriptors:\n  - key: user_id\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n");
    assert!(
        e.starts_with("f.yaml:4:24: invalid unit `fortnight`"),
        "{e}"
    );
    let e = err("domain: d\ndescriptors:\n  - key: user_id\n    rate_limit: {unit: second, unlimited: true}\n");
    assert!(e.contains("must not name a unit"), "{e}");
    let e = err("domain: d\ndescriptors:\n  - key: user_id\n  - key: user_id\n");
    assert!(
        e.starts_with("f.yaml:4:5: duplicate descriptor `user_id`"),
        "{e}"
    );
    let e = err("descriptors: []\n");
    assert!(e.contains("no `domain`"), "{e}");
    let e = err("domain: d\ndescriptors:\n  - value: x\n");
    assert!(e.starts_with("f.yaml:3:5") && e.contains("no `key`"), "{e}");
    let e = err("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: -1}\n");
    assert!(e.contains("between 0 and 4294967295"), "{e}");
    let e = err("");
    assert!(e.contains("empty file"), "{e}");
    let e = err("domain: d\ndescriptors:\n  - key: user_id\n    share_threshold: true\n");
    assert!(e.contains("share_threshold needs a wildcard"), "{e}");
    // Keys envoy accepts but ignores where they stand are notes.
    let i = one("domain: d\ndescriptors:\n  - key: user_id\n    unit: second\n");
    assert!(notes(&i)[0].contains("`unit` has no meaning in a descriptor"));
}

#[test]
fn the_outputs_are_a_settings_file_and_a_config_body_quotaflow_accepts() {
    let i = one(r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
    descriptors:
      - key: path
        rate_limit: {unit: minute, requests_per_unit: 30}
  - key: remote_address
    value: 10.0.0.5
    rate_limit: {unlimited: true}
  - key: method
    value: POST
    descriptors:
      - key: path
        value: /login
        descriptors:
          - key: remote_address
            rate_limit: {unit: minute, requests_per_unit: 5}
"#);
    let toml = i.to_toml().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imported.toml");
    std::fs::write(&path, &toml).unwrap();
    let settings = crate::settings::Settings::load_with_env(Some(&path), false).unwrap();
    assert_eq!(settings.rules(), i.doc, "{toml}");
    assert!(toml.contains("# envoy edge: method=POST > path=/login > remote_address (f.yaml:"));
    assert!(toml.contains("# NOT EXPRESSED"), "{toml}");
    let from_json = RulesDoc::from_json(i.to_json().as_bytes()).unwrap();
    assert_eq!(from_json, i.doc);
    // The login limit applies to POST /login only, per address.
    let rules = Rules::compile(i.doc.clone(), 1, &Fingerprinter::from_secret("t")).unwrap();
    let login = rules
        .limits
        .iter()
        .find(|l| l.name == "edge.method_POST.path__login.remote_address")
        .unwrap();
    let mut req = Request {
        client_ip: Some("10.9.9.9".parse().unwrap()),
        method: Some("POST".into()),
        path: Some("/login".into()),
        ..Request::default()
    };
    assert!(login.key_id(&req, &mut String::new()).is_some());
    req.method = Some("GET".into());
    assert!(login.key_id(&req, &mut String::new()).is_none());
}

/// A suffixed name can collide with a name the file already has: the
/// import counts up until the name is free instead of emitting two limits
/// of one name.
#[test]
fn names_stay_unique_when_a_suffix_collides_with_a_given_name() {
    let i = one("domain: d
descriptors:
  - key: user_id
    rate_limit: {unit: minute, requests_per_unit: 1, name: login}
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 2, name: login}
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 3, name: login-2}
");
    let names: Vec<&str> = i.doc.limits.iter().map(|l| l.name.as_str()).collect();
    let distinct: std::collections::BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(distinct.len(), 3, "{names:?}");
    assert!(
        distinct.contains("login") && distinct.contains("login-2"),
        "{names:?}"
    );
}
