//! Limits, their matching rules and the whitelist: the config document and
//! its compiled, validated form.
//!
//! The same document travels as TOML (`config/default.toml`), as JSON over
//! `/rate_limit/config`, and later inside checkpoints, so it is one serde
//! type. Validation collects every problem with its field path instead of
//! stopping at the first, because an operator fixing a config wants the
//! whole list at once.

pub mod history;
pub mod path;
mod request;

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::algorithms::{self, Algorithm, PolicyShape};
use crate::fingerprint::Fingerprinter;
use crate::state::KeyId;

pub use request::{Request, RequestError};

/// A request attribute a limit can be keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    UserId,
    ApiKey,
    ClientIp,
    Method,
    Path,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::UserId => "user_id",
            Dimension::ApiKey => "api_key",
            Dimension::ClientIp => "client_ip",
            Dimension::Method => "method",
            Dimension::Path => "path",
        }
    }
}

/// What a limit answers when the state it is counted in cannot answer in
/// time (a shared backend down or slow): let the request through, or refuse
/// it. Which one is right depends on what the limit protects, so it is set
/// per limit, with a default for all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Allow: an outage of the limiter is not an outage of the service.
    #[default]
    Open,
    /// Refuse: for limits guarding something that must not be overrun
    /// (a paid upstream, a login endpoint under attack).
    Closed,
    /// Count in this instance's own state meanwhile: the limit holds per
    /// instance while the owner is away, and is exact again once it is back.
    Local,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
            FailureMode::Local => "local",
        }
    }
}

/// `"POST"` or `["GET", "POST"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// Which requests a limit applies to, beyond carrying its key's dimensions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchDoc {
    /// HTTP method or methods, case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<OneOrMany>,
    /// Exact path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Path prefix, such as `/api/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Glob over the path: `*` matches within one segment, `**` across segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_pattern: Option<String>,
}

/// One limit as written in config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitDoc {
    pub name: String,
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Dimensions the limit is keyed by; empty means one global counter.
    #[serde(default)]
    pub key: Vec<Dimension>,
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub matcher: Option<MatchDoc>,
    #[serde(default)]
    pub shadow: bool,
    /// What to answer when the state backend cannot; `None` takes the
    /// instance's default (`[state] failure_mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// The algorithm's parameters (`capacity`, `refill_per_sec`, `limit`, `window`).
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

fn default_algorithm() -> String {
    "token_bucket".to_owned()
}

/// Requests that bypass every limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhitelistDoc {
    #[serde(default)]
    pub user_ids: Vec<String>,
    /// API keys in clear or as `fp:<fingerprint>`; always shown as fingerprints.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Addresses or CIDR blocks.
    #[serde(default)]
    pub client_ips: Vec<String>,
}

/// The rate-limit document: `{ "limits": [...], "whitelist": {...} }`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesDoc {
    #[serde(default)]
    pub limits: Vec<LimitDoc>,
    #[serde(default)]
    pub whitelist: WhitelistDoc,
    /// Whether `/Login` and `/login` are different paths. Off by default:
    /// most backends treat them alike, and a limit must not be dodged by
    /// letter case (see `rules::path`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub path_case_sensitive: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One problem in a config document, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Path such as `limits[1].capacity` or `whitelist.client_ips[0]`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in a config document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidConfig(pub Vec<FieldError>);

impl RulesDoc {
    /// Parse a JSON document, naming the field of the first type error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, InvalidConfig> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            InvalidConfig(vec![FieldError::new(field, e.into_inner().to_string())])
        })
    }
}

/// Longest accepted limit name: names go into headers and metric labels.
const MAX_NAME_LEN: usize = 64;
/// Limits in one config: every request is matched against all of them, so
/// their number bounds the work (and headers) an accepted config can cause.
pub const MAX_LIMITS: usize = 1000;
/// Separator between the parts of a state key; rejected in request fields.
pub(crate) const KEY_SEP: char = '\u{1f}';

enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Pattern(String),
}

struct Matcher {
    /// Upper-case methods; empty matches any.
    methods: Vec<String>,
    path: PathMatch,
}

impl Matcher {
    fn matches(&self, req: &Request) -> bool {
        if !self.methods.is_empty() {
            match &req.method {
                Some(m) if self.methods.iter().any(|x| x.eq_ignore_ascii_case(m)) => {}
                _ => return false,
            }
        }
        let path = || req.path.as_deref();
        match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => path() == Some(p.as_str()),
            PathMatch::Prefix(p) => path().is_some_and(|x| x.starts_with(p.as_str())),
            PathMatch::Pattern(p) => path().is_some_and(|x| glob_match::glob_match(p, x)),
        }
    }
}

/// A compiled limit.
pub struct Limit {
    pub name: String,
    pub algorithm: Box<dyn Algorithm>,
    pub key: Vec<Dimension>,
    pub shadow: bool,
    pub shape: PolicyShape,
    /// See [`LimitDoc::failure_mode`].
    pub failure_mode: Option<FailureMode>,
    matcher: Matcher,
    /// `name SEP algorithm`: the start of every state key of this limit, so a
    /// limit keeps its state across config changes unless renamed or given
    /// another algorithm (whose state would mean something else).
    key_prefix: String,
    /// Hashes key texts into state ids; the one the rule set was compiled
    /// with, so [`Limit::key_id`] and `fixed_key` always agree.
    fingerprinter: Fingerprinter,
    /// The id of a keyless (global) limit's only key, hashed once at compile
    /// time instead of on every request.
    fixed_key: Option<KeyId>,
}

impl fmt::Debug for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm)
            .field("key", &self.key)
            .field("shadow", &self.shadow)
            .finish()
    }
}

impl Limit {
    /// Append this limit's state key for `req` to `out`, or return `false`
    /// if the request does not carry every dimension of the key or the
    /// limit's match does not select it.
    pub fn key_for(&self, req: &Request, out: &mut String) -> bool {
        if !self.applies(req) {
            return false;
        }
        out.push_str(&self.key_prefix);
        for dim in &self.key {
            out.push(KEY_SEP);
            req.write_key_part(*dim, out);
        }
        true
    }

    /// This limit's state key for `req` (the keyed hash of [`Limit::key_for`]'s
    /// text), or `None` if the limit does not apply. `buf` is scratch space
    /// for the text, reused so that a request allocates nothing.
    pub fn key_id(&self, req: &Request, buf: &mut String) -> Option<KeyId> {
        if let Some(id) = self.fixed_key {
            return self.applies(req).then_some(id);
        }
        buf.clear();
        self.key_for(req, buf)
            .then(|| self.fingerprinter.key_id(buf.as_bytes()))
    }

    /// Whether the limit counts `req`: its match selects it and it carries
    /// every dimension of the key.
    pub fn applies(&self, req: &Request) -> bool {
        self.matcher.matches(req) && self.key.iter().all(|d| req.has(*d))
    }
}

/// Looked up on every request. Its sets use hashbrown's fast hasher rather
/// than std's SipHash: their content comes from the operator, not from
/// requests, so a flooding attack has nothing to insert.
struct Whitelist {
    user_ids: hashbrown::HashSet<String>,
    api_keys: hashbrown::HashSet<String>,
    client_ips: Vec<IpNet>,
}

/// A validated, compiled rule set with its version.
pub struct Rules {
    pub version: u64,
    pub limits: Vec<Limit>,
    /// See [`RulesDoc::path_case_sensitive`].
    pub path_case_sensitive: bool,
    whitelist: Whitelist,
    /// The document as accepted, with API keys replaced by fingerprints.
    doc: RulesDoc,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("version", &self.version)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Rules {
    /// Validate and compile `doc`, reporting every problem by field path.
    pub fn compile(doc: RulesDoc, version: u64, fp: &Fingerprinter) -> Result<Self, InvalidConfig> {
        let mut errors = Vec::new();
        if doc.limits.len() > MAX_LIMITS {
            errors.push(FieldError::new(
                "limits",
                format!("at most {MAX_LIMITS} limits, got {}", doc.limits.len()),
            ));
        }
        let mut limits = Vec::with_capacity(doc.limits.len().min(MAX_LIMITS));
        let mut names = HashSet::new();
        for (i, l) in doc.limits.iter().enumerate() {
            let at = |f: &str| format!("limits[{i}].{f}");
            let name_ok = !l.name.is_empty()
                && l.name.len() <= MAX_NAME_LEN
                && l.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !name_ok {
                errors.push(FieldError::new(
                    at("name"),
                    format!(
                        "must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '_', '-', '.'"
                    ),
                ));
            } else if !names.insert(l.name.as_str()) {
                errors.push(FieldError::new(
                    at("name"),
                    format!("duplicate limit name `{}`", l.name),
                ));
            }
            let mut seen = HashSet::new();
            for (j, d) in l.key.iter().enumerate() {
                if !seen.insert(d) {
                    errors.push(FieldError::new(
                        format!("limits[{i}].key[{j}]"),
                        format!("dimension `{}` listed twice", d.as_str()),
                    ));
                }
            }
            let matcher = compile_match(
                l.matcher.as_ref(),
                &at("match"),
                doc.path_case_sensitive,
                &mut errors,
            );
            match algorithms::build(&l.algorithm, &l.params) {
                Ok(algorithm) => {
                    let key_prefix = format!("{}{KEY_SEP}{}", l.name, algorithm.name());
                    limits.push(Limit {
                        fixed_key: l.key.is_empty().then(|| fp.key_id(key_prefix.as_bytes())),
                        fingerprinter: fp.clone(),
                        key_prefix,
                        shape: algorithm.shape(),
                        name: l.name.clone(),
                        algorithm,
                        key: l.key.clone(),
                        shadow: l.shadow,
                        failure_mode: l.failure_mode,
                        matcher,
                    });
                }
                Err(errs) => errors.extend(
                    errs.into_iter()
                        .map(|e| FieldError::new(at(&e.field), e.message)),
                ),
            }
        }
        let (whitelist, wl_doc) = compile_whitelist(&doc.whitelist, fp, &mut errors);
        if !errors.is_empty() {
            return Err(InvalidConfig(errors));
        }
        Ok(Self {
            version,
            limits,
            whitelist,
            path_case_sensitive: doc.path_case_sensitive,
            doc: RulesDoc {
                limits: doc.limits,
                whitelist: wl_doc,
                path_case_sensitive: doc.path_case_sensitive,
            },
        })
    }

    /// The document this rule set was compiled from (API keys fingerprinted).
    pub fn doc(&self) -> &RulesDoc {
        &self.doc
    }

    /// Whether `req` bypasses every limit.
    pub fn is_whitelisted(&self, req: &Request, fp: &Fingerprinter) -> bool {
        let wl = &self.whitelist;
        req.user_id
            .as_ref()
            .is_some_and(|u| wl.user_ids.contains(u))
            || req
                .client_ip
                .is_some_and(|ip| wl.client_ips.iter().any(|n| n.contains(&ip)))
            || (!wl.api_keys.is_empty()
                && req
                    .api_key
                    .as_ref()
                    .is_some_and(|k| wl.api_keys.contains(&fp.hex(k.as_bytes()))))
    }
}

fn compile_match(
    doc: Option<&MatchDoc>,
    at: &str,
    case_sensitive: bool,
    errors: &mut Vec<FieldError>,
) -> Matcher {
    let Some(m) = doc else {
        return Matcher {
            methods: Vec::new(),
            path: PathMatch::Any,
        };
    };
    let mut methods = Vec::new();
    if let Some(ms) = &m.method {
        if ms.items().is_empty() {
            errors.push(FieldError::new(
                format!("{at}.method"),
                "must name at least one method",
            ));
        }
        for (j, name) in ms.items().iter().enumerate() {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphabetic()) {
                errors.push(FieldError::new(
                    format!("{at}.method[{j}]"),
                    format!("`{name}` is not an HTTP method"),
                ));
            }
            methods.push(name.to_ascii_uppercase());
        }
    }
    let given: Vec<_> = [
        ("path", &m.path),
        ("path_prefix", &m.path_prefix),
        ("path_pattern", &m.path_pattern),
    ]
    .into_iter()
    .filter_map(|(f, v)| v.as_ref().map(|v| (f, v.clone())))
    .collect();
    let path = match given.as_slice() {
        [] => PathMatch::Any,
        [(field, p)] => {
            if !p.starts_with('/') {
                errors.push(FieldError::new(
                    format!("{at}.{field}"),
                    "must start with '/'",
                ));
            }
            // Requests' paths are matched in canonical form (`path`), so
            // configured ones are brought to it too: an exact path fully,
            // a prefix or pattern in letter case (their `/` and `*` are
            // meaningful as written).
            let folded = if case_sensitive {
                p.clone()
            } else {
                p.to_ascii_lowercase()
            };
            match *field {
                "path" => PathMatch::Exact(path::canonical_path(p, case_sensitive).into_owned()),
                "path_prefix" => PathMatch::Prefix(folded),
                _ => {
                    if let Err(e) = glob_check(&folded) {
                        errors.push(FieldError::new(format!("{at}.{field}"), e));
                    }
                    PathMatch::Pattern(folded)
                }
            }
        }
        _ => {
            errors.push(FieldError::new(
                at.to_owned(),
                "give at most one of path, path_prefix, path_pattern",
            ));
            PathMatch::Any
        }
    };
    Matcher { methods, path }
}

/// A pattern glob-match would misread: unbalanced brackets or braces, an
/// empty class. (glob-match treats them literally or never matches, either
/// way silently; a limit that never applies must be refused instead.)
fn glob_check(pattern: &str) -> Result<(), String> {
    let (mut square, mut curly) = (0i32, 0i32);
    let mut prev = None;
    for c in pattern.chars() {
        match c {
            '[' => square += 1,
            ']' if prev == Some('[') => return Err("empty character class `[]`".into()),
            ']' => square -= 1,
            '{' => curly += 1,
            '}' => curly -= 1,
            _ => {}
        }
        if square < 0 || curly < 0 || square > 1 {
            return Err(format!("unbalanced `[]` or `{{}}` in pattern `{pattern}`"));
        }
        prev = Some(c);
    }
    if square != 0 || curly != 0 {
        return Err(format!("unbalanced `[]` or `{{}}` in pattern `{pattern}`"));
    }
    Ok(())
}

/// Prefix marking an API key given as its fingerprint.
const FP_PREFIX: &str = "fp:";

fn compile_whitelist(
    doc: &WhitelistDoc,
    fp: &Fingerprinter,
    errors: &mut Vec<FieldError>,
) -> (Whitelist, WhitelistDoc) {
    let mut client_ips = Vec::new();
    for (i, text) in doc.client_ips.iter().enumerate() {
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => client_ips.push(net.trunc()),
            Err(_) => errors.push(FieldError::new(
                format!("whitelist.client_ips[{i}]"),
                format!("`{text}` is not an IP address or CIDR block"),
            )),
        }
    }
    let mut api_keys = hashbrown::HashSet::new();
    for (i, key) in doc.api_keys.iter().enumerate() {
        let hex = match key.strip_prefix(FP_PREFIX) {
            Some(h) if h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                h.to_ascii_lowercase()
            }
            Some(_) => {
                errors.push(FieldError::new(
                    format!("whitelist.api_keys[{i}]"),
                    "a fingerprint is `fp:` followed by 32 hex digits",
                ));
                continue;
            }
            None if key.is_empty() => {
                errors.push(FieldError::new(
                    format!("whitelist.api_keys[{i}]"),
                    "must not be empty",
                ));
                continue;
            }
            None => fp.hex(key.as_bytes()),
        };
        api_keys.insert(hex);
    }
    let mut shown: Vec<String> = api_keys.iter().map(|h| format!("{FP_PREFIX}{h}")).collect();
    shown.sort();
    let wl_doc = WhitelistDoc {
        user_ids: doc.user_ids.clone(),
        api_keys: shown,
        client_ips: doc.client_ips.clone(),
    };
    let whitelist = Whitelist {
        user_ids: doc.user_ids.iter().cloned().collect(),
        api_keys,
        client_ips,
    };
    (whitelist, wl_doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp() -> Fingerprinter {
        Fingerprinter::from_secret("test")
    }

    fn compile(v: Value) -> Result<Rules, InvalidConfig> {
        let doc = RulesDoc::from_json(v.to_string().as_bytes())?;
        Rules::compile(doc, 1, &fp())
    }

    fn fields(err: InvalidConfig) -> Vec<String> {
        err.0.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_config_with_too_many_limits_is_refused() {
        let limits: Vec<String> = (0..=MAX_LIMITS)
            .map(|i| {
                format!(
                    r#"{{"name": "l{i}", "key": ["user_id"], "capacity": 1, "refill_per_sec": 1}}"#
                )
            })
            .collect();
        let doc =
            RulesDoc::from_json(format!(r#"{{"limits": [{}]}}"#, limits.join(",")).as_bytes())
                .unwrap();
        let err = Rules::compile(doc, 1, &Fingerprinter::random()).unwrap_err();
        assert_eq!(err.0[0].field, "limits");
        assert!(
            err.0[0].message.contains("at most 1000"),
            "{}",
            err.0[0].message
        );
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let err = compile(json!({
            "limits": [
                {"name": "ok", "capacity": 1, "refill_per_sec": 1},
                {"name": "ok", "algorithm": "fixed_window", "limit": 0, "window": "1m"},
                {"name": "bad name!", "algorithm": "sliding_window", "limit": 5, "window": "soon",
                 "match": {"path": "login", "method": "P0ST"}},
            ],
            "whitelist": {"client_ips": ["10.0.0.0/8", "not-an-ip"], "api_keys": ["fp:zz"]}
        }))
        .unwrap_err();
        assert_eq!(
            fields(err),
            vec![
                "limits[1].name",
                "limits[1].limit",
                "limits[2].name",
                "limits[2].match.method[0]",
                "limits[2].match.path",
                "limits[2].window",
                "whitelist.client_ips[1]",
                "whitelist.api_keys[0]",
            ]
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let err = compile(json!({"limits": [{"name": "a", "key": ["user"]}]})).unwrap_err();
        assert_eq!(err.0[0].field, "limits[0].key[0]");
        assert!(err.0[0].message.contains("user_id"), "{}", err.0[0].message);
        let err = compile(json!({"limit": []})).unwrap_err();
        assert!(err.0[0].message.contains("unknown field `limit`"));
    }

    #[test]
    fn keys_need_every_dimension_and_the_match() {
        let rules = compile(json!({"limits": [
            {"name": "login", "algorithm": "fixed_window", "limit": 5, "window": "1m",
             "key": ["client_ip"], "match": {"method": ["post"], "path_pattern": "/login/**"}},
        ]}))
        .unwrap();
        let limit = &rules.limits[0];
        let mut req = Request {
            client_ip: Some("10.1.2.3".parse().unwrap()),
            method: Some("POST".into()),
            path: Some("/login/sso".into()),
            ..Request::default()
        };
        let mut key = String::new();
        assert!(limit.key_for(&req, &mut key));
        assert_eq!(key, "login\u{1f}fixed_window\u{1f}10.1.2.3");
        req.path = Some("/logout".into());
        assert!(!limit.key_for(&req, &mut String::new()));
        req.path = Some("/login/x".into());
        req.client_ip = None;
        assert!(!limit.key_for(&req, &mut String::new()));
    }

    #[test]
    fn key_ids_are_the_keyed_hash_of_the_key_text_also_for_global_limits() {
        let rules = compile(json!({"limits": [
            {"name": "per_user", "key": ["user_id"], "capacity": 5, "refill_per_sec": 1},
            {"name": "global", "algorithm": "sliding_window", "key": [], "limit": 9, "window": "1s",
             "match": {"path_prefix": "/api"}},
        ]}))
        .unwrap();
        let mut req = Request {
            user_id: Some("alice".into()),
            path: Some("/api/x".into()),
            ..Request::default()
        };
        let mut buf = String::from("left over");
        for limit in &rules.limits {
            let mut text = String::new();
            assert!(limit.key_for(&req, &mut text));
            assert_eq!(
                limit.key_id(&req, &mut buf),
                Some(fp().key_id(text.as_bytes()))
            );
        }
        // The precomputed id of the global limit still honours its match.
        req.path = Some("/web".into());
        assert_eq!(rules.limits[1].key_id(&req, &mut buf), None);
        req.user_id = None;
        assert_eq!(rules.limits[0].key_id(&req, &mut buf), None);
    }

    #[test]
    fn api_keys_are_hidden_in_the_whitelist_and_shown_doc() {
        let rules = compile(json!({
            "limits": [{"name": "per_key", "key": ["api_key"], "capacity": 5, "refill_per_sec": 1}],
            "whitelist": {"api_keys": ["sk_live_secret"]}
        }))
        .unwrap();
        let req = Request {
            api_key: Some("sk_live_secret".into()),
            ..Request::default()
        };
        // The state key's text is hashed into its id and never stored
        // (`limiter` tests check the exported state).
        let mut key = String::new();
        assert!(rules.limits[0].key_for(&req, &mut key));
        assert!(rules.is_whitelisted(&req, &fp()));
        let shown = serde_json::to_string(rules.doc()).unwrap();
        assert!(!shown.contains("sk_live_secret"));
        // The shown document compiles back to the same whitelist.
        let again = Rules::compile(rules.doc().clone(), 2, &fp()).unwrap();
        assert!(again.is_whitelisted(&req, &fp()));
    }

    #[test]
    fn whitelist_matches_cidrs_and_users() {
        let rules = compile(
            json!({"whitelist": {"client_ips": ["10.0.0.0/8", "::1"], "user_ids": ["ops"]}}),
        )
        .unwrap();
        let ip = |s: &str| Request {
            client_ip: Some(s.parse().unwrap()),
            ..Request::default()
        };
        assert!(rules.is_whitelisted(&ip("10.200.0.1"), &fp()));
        assert!(rules.is_whitelisted(&ip("::1"), &fp()));
        assert!(!rules.is_whitelisted(&ip("11.0.0.1"), &fp()));
        let user = Request {
            user_id: Some("ops".into()),
            ..Request::default()
        };
        assert!(rules.is_whitelisted(&user, &fp()));
    }

    mod fuzz {
        //! Bounded fuzzing of the config parser and compiler (the suite's
        //! `PROPTEST_CASES`; longer runs: docs/security.md).

        use super::super::*;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                "[ -~]{0,12}".prop_map(Value::from),
                prop::sample::select(vec!["1s", "10ms", "1500us", "0s", "400d", "1h", "-1s"])
                    .prop_map(Value::from),
                prop::sample::select(vec!["/a/*", "/[x", "/{a,b}", "**", "/p[]"])
                    .prop_map(Value::from),
                Just(json!(["user_id", "client_ip"])),
                Just(json!({"method": "POST", "path_prefix": "/a"})),
                Just(Value::Null),
            ]
        }

        fn limit() -> impl Strategy<Value = Value> {
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "name",
                        "algorithm",
                        "key",
                        "capacity",
                        "refill_per_sec",
                        "limit",
                        "window",
                        "match",
                        "shadow",
                        "unknown",
                    ]),
                    value(),
                ),
                0..8,
            )
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
        }

        fn compile(bytes: &[u8]) {
            if let Ok(doc) = RulesDoc::from_json(bytes) {
                let _ = Rules::compile(doc, 1, &Fingerprinter::from_secret("fuzz"));
            }
        }

        proptest! {
            #[test]
            fn config_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
                compile(&bytes);
            }

            #[test]
            fn config_shaped_documents_never_panic(
                limits in prop::collection::vec(limit(), 0..4),
                algorithm in prop::sample::select(vec!["token_bucket", "fixed_window", "sliding_window", "leaky"]),
                ips in prop::collection::vec("[0-9./:a-f]{0,18}", 0..3),
            ) {
                let mut limits = limits;
                for l in &mut limits {
                    if let Some(o) = l.as_object_mut() {
                        o.entry("algorithm").or_insert_with(|| Value::from(algorithm));
                    }
                }
                let doc = json!({"limits": limits, "whitelist": {"client_ips": ips}});
                compile(doc.to_string().as_bytes());
            }
        }
    }
}
