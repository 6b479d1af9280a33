//! Reading an envoyproxy/ratelimit config file: one domain and its
//! descriptor tree, with the line of every node, checked as envoy ratelimit
//! checks it (a file it refuses is refused here too, with the place).

use std::fmt;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

/// A place in a source file (line 1-based, column 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// Why a file cannot be imported at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{at}: {message}")]
    Invalid { at: Loc, message: String },
    /// A bad `--map`, or more limits than one config holds.
    #[error("{0}")]
    Refused(String),
    /// The converted document failed quotaflow's own validation: a bug of
    /// the importer, reported rather than printed as a config.
    #[error("internal error: the converted config is invalid: {0}")]
    Internal(String),
}

/// A time unit of envoy ratelimit; windows are aligned to multiples of it
/// since the Unix epoch (`now / unit * unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    /// 30 days, as envoy ratelimit counts it (not a calendar month).
    Month,
    /// 365 days.
    Year,
}

impl Unit {
    fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_uppercase().as_str() {
            "SECOND" => Unit::Second,
            "MINUTE" => Unit::Minute,
            "HOUR" => Unit::Hour,
            "DAY" => Unit::Day,
            "WEEK" => Unit::Week,
            "MONTH" => Unit::Month,
            "YEAR" => Unit::Year,
            _ => return None,
        })
    }

    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// The same length as a quotaflow duration.
    pub fn window(self) -> &'static str {
        match self {
            Unit::Second => "1s",
            Unit::Minute => "1m",
            Unit::Hour => "1h",
            Unit::Day => "1d",
            Unit::Week => "7d",
            Unit::Month => "30d",
            Unit::Year => "365d",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

/// A `rate_limit` block.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// `None` only when unlimited.
    pub unit: Option<Unit>,
    pub requests_per_unit: u32,
    pub unlimited: bool,
    pub name: Option<String>,
    pub replaces: Vec<String>,
    pub at: Loc,
}

/// One descriptor of the tree.
#[derive(Debug, Clone)]
pub struct Node {
    pub key: String,
    /// `None`: any value, counted per value.
    pub value: Option<String>,
    pub rate_limit: Option<RateLimit>,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    pub detailed_metric: bool,
    pub value_to_metric: bool,
    pub share_threshold: bool,
    pub descriptors: Vec<Node>,
    pub at: Loc,
}

impl Node {
    /// The prefix of a wildcard value (`/api/*` -> `/api/`).
    pub fn wildcard(&self) -> Option<&str> {
        self.value.as_deref().and_then(|v| v.strip_suffix('*'))
    }

    /// `key` or `key_value`, as envoy ratelimit names the node.
    pub fn composite(&self) -> String {
        match &self.value {
            Some(v) => format!("{}_{v}", self.key),
            None => self.key.clone(),
        }
    }
}

/// One file: a domain and its descriptors.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub descriptors: Vec<Node>,
    pub at: Loc,
}

/// Every key envoy ratelimit accepts anywhere in a file; any other key makes
/// it refuse the file.
const KNOWN_KEYS: &[&str] = &[
    "domain",
    "key",
    "value",
    "descriptors",
    "rate_limit",
    "unit",
    "requests_per_unit",
    "unlimited",
    "shadow_mode",
    "quota_mode",
    "name",
    "replaces",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
];

/// Reads `text` (the contents of `file`). Keys envoy accepts but ignores at
/// the place they are written are returned as notes.
pub fn parse(file: &str, text: &str) -> Result<(Domain, Vec<(Loc, String)>), ImportError> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| ImportError::Invalid {
        at: Loc {
            file: file.to_owned(),
            line: e.marker().line(),
            col: e.marker().col() + 1,
        },
        message: format!("not valid YAML: {}", e.info()),
    })?;
    let mut r = Reader {
        file,
        text,
        notes: Vec::new(),
    };
    let Some(root) = docs.first() else {
        return Err(r.invalid_at(
            1,
            1,
            "empty file: expected a mapping with `domain` and `descriptors`",
        ));
    };
    if docs.len() > 1 {
        let at = r.loc(&docs[1]);
        r.notes.push((
            at,
            "a second YAML document: envoy ratelimit reads only the first, and so does this import"
                .into(),
        ));
    }
    let domain = r.domain(root)?;
    Ok((domain, r.notes))
}

struct Reader<'a> {
    file: &'a str,
    text: &'a str,
    notes: Vec<(Loc, String)>,
}

type Fields<'n, 'i> = Vec<(String, &'n MarkedYaml<'i>, Loc)>;

impl Reader<'_> {
    fn loc(&self, node: &MarkedYaml<'_>) -> Loc {
        Loc {
            file: self.file.to_owned(),
            line: node.span.start.line(),
            col: node.span.start.col() + 1,
        }
    }

    fn invalid(&self, node: &MarkedYaml<'_>, message: impl Into<String>) -> ImportError {
        ImportError::Invalid {
            at: self.loc(node),
            message: message.into(),
        }
    }

    fn invalid_at(&self, line: usize, col: usize, message: &str) -> ImportError {
        ImportError::Invalid {
            at: Loc {
                file: self.file.to_owned(),
                line,
                col,
            },
            message: message.to_owned(),
        }
    }

    /// The entries of a mapping, every key checked against envoy's list;
    /// keys valid elsewhere but not in `here` become notes.
    fn fields<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        what: &str,
        here: &[&str],
    ) -> Result<Fields<'n, 'i>, ImportError> {
        let node = untag(node);
        let YamlData::Mapping(map) = &node.data else {
            return Err(self.invalid(node, format!("{what} must be a mapping")));
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let Some(name) = scalar_text(self.text, k) else {
                return Err(self.invalid(k, "a key must be a string"));
            };
            if !KNOWN_KEYS.contains(&name.as_str()) {
                return Err(self.invalid(
                    k,
                    format!("unknown key `{name}` (envoy ratelimit refuses the file)"),
                ));
            }
            if !here.contains(&name.as_str()) {
                self.notes.push((
                    self.loc(k),
                    format!("`{name}` has no meaning in {what}; envoy ratelimit ignores it here"),
                ));
                continue;
            }
            out.push((name, v, self.loc(k)));
        }
        Ok(out)
    }

    fn domain(&mut self, root: &MarkedYaml<'_>) -> Result<Domain, ImportError> {
        let fields = self.fields(root, "the top level", &["domain", "descriptors"])?;
        let mut name = None;
        let mut descriptors = Vec::new();
        for (k, v, _) in fields {
            match k.as_str() {
                "domain" => name = Some(self.string(v, "domain")?),
                _ => descriptors = self.descriptors(v)?,
            }
        }
        match name {
            Some(n) if !n.is_empty() => Ok(Domain {
                name: n,
                descriptors,
                at: self.loc(root),
            }),
            _ => Err(self.invalid(
                root,
                "the file has no `domain` (envoy ratelimit refuses it)",
            )),
        }
    }

    fn descriptors(&mut self, node: &MarkedYaml<'_>) -> Result<Vec<Node>, ImportError> {
        let node = untag(node);
        let items = match &node.data {
            YamlData::Value(Scalar::Null) => return Ok(Vec::new()),
            YamlData::Sequence(items) => items,
            _ => return Err(self.invalid(node, "`descriptors` must be a list")),
        };
        let mut out: Vec<Node> = Vec::new();
        for item in items {
            let d = self.descriptor(item)?;
            if let Some(twin) = out.iter().find(|o| o.composite() == d.composite()) {
                return Err(self.invalid(
                    item,
                    format!(
                        "duplicate descriptor `{}` (also at line {}; envoy ratelimit refuses the file)",
                        d.composite(),
                        twin.at.line
                    ),
                ));
            }
            out.push(d);
        }
        Ok(out)
    }

    fn descriptor(&mut self, node: &MarkedYaml<'_>) -> Result<Node, ImportError> {
        let fields = self.fields(
            node,
            "a descriptor",
            &[
                "key",
                "value",
                "rate_limit",
                "descriptors",
                "shadow_mode",
                "quota_mode",
                "detailed_metric",
                "value_to_metric",
                "share_threshold",
            ],
        )?;
        let mut d = Node {
            key: String::new(),
            value: None,
            rate_limit: None,
            shadow_mode: false,
            quota_mode: false,
            detailed_metric: false,
            value_to_metric: false,
            share_threshold: false,
            descriptors: Vec::new(),
            at: self.loc(node),
        };
        for (k, v, _) in fields {
            match k.as_str() {
                "key" => d.key = self.string(v, "key")?,
                "value" => d.value = Some(self.string(v, "value")?).filter(|s| !s.is_empty()),
                "rate_limit" => d.rate_limit = self.rate_limit(v)?,
                "descriptors" => d.descriptors = self.descriptors(v)?,
                "shadow_mode" => d.shadow_mode = self.boolean(v, &k)?,
                "quota_mode" => d.quota_mode = self.boolean(v, &k)?,
                "detailed_metric" => d.detailed_metric = self.boolean(v, &k)?,
                "value_to_metric" => d.value_to_metric = self.boolean(v, &k)?,
                _ => d.share_threshold = self.boolean(v, &k)?,
            }
        }
        if d.key.is_empty() {
            return Err(self.invalid(
                node,
                "descriptor has no `key` (envoy ratelimit refuses the file)",
            ));
        }
        if d.share_threshold && d.wildcard().is_none() {
            return Err(self.invalid(
                node,
                "share_threshold needs a wildcard value ending in `*` (envoy ratelimit refuses the file)",
            ));
        }
        Ok(d)
    }

    fn rate_limit(&mut self, node: &MarkedYaml<'_>) -> Result<Option<RateLimit>, ImportError> {
        if matches!(untag(node).data, YamlData::Value(Scalar::Null)) {
            return Ok(None);
        }
        let fields = self.fields(
            node,
            "a rate_limit",
            &["unit", "requests_per_unit", "unlimited", "name", "replaces"],
        )?;
        let mut unit_text = None;
        let mut rl = RateLimit {
            unit: None,
            requests_per_unit: 0,
            unlimited: false,
            name: None,
            replaces: Vec::new(),
            at: self.loc(node),
        };
        for (k, v, _) in fields {
            match k.as_str() {
                "unit" => unit_text = Some((self.string(v, "unit")?, v)),
                "requests_per_unit" => rl.requests_per_unit = self.count(v)?,
                "unlimited" => rl.unlimited = self.boolean(v, &k)?,
                "name" => rl.name = Some(self.string(v, "name")?).filter(|s| !s.is_empty()),
                _ => rl.replaces = self.replaces(v)?,
            }
        }
        let unit = unit_text
            .as_ref()
            .and_then(|(t, _)| Unit::parse(t).map(|u| (u, t)));
        match (&unit_text, unit, rl.unlimited) {
            (Some((_, at)), Some(_), true) => {
                return Err(self.invalid(
                    at,
                    "a rate_limit with `unlimited: true` must not name a unit (envoy ratelimit refuses the file)",
                ))
            }
            (_, _, true) => {}
            (_, Some((u, _)), false) => rl.unit = Some(u),
            (Some((t, at)), None, false) => {
                return Err(self.invalid(
                    at,
                    format!("invalid unit `{t}`: expected second, minute, hour, day, week, month or year"),
                ))
            }
            (None, None, false) => {
                return Err(self.invalid(node, "rate_limit has no `unit`"));
            }
        }
        for r in &rl.replaces {
            if rl.name.as_deref() == Some(r.as_str()) {
                return Err(self.invalid(
                    node,
                    "`replaces` names the limit itself (envoy ratelimit refuses the file)",
                ));
            }
        }
        Ok(Some(rl))
    }

    fn replaces(&mut self, node: &MarkedYaml<'_>) -> Result<Vec<String>, ImportError> {
        let node = untag(node);
        let items = match &node.data {
            YamlData::Value(Scalar::Null) => return Ok(Vec::new()),
            YamlData::Sequence(items) => items,
            _ => return Err(self.invalid(node, "`replaces` must be a list of `- name: ...`")),
        };
        let mut out = Vec::new();
        for item in items {
            let mut name = String::new();
            for (_, v, _) in self.fields(item, "a replaces entry", &["name"])? {
                name = self.string(v, "name")?;
            }
            if name.is_empty() {
                return Err(self.invalid(
                    item,
                    "empty `replaces` entry (envoy ratelimit refuses the file)",
                ));
            }
            out.push(name);
        }
        Ok(out)
    }

    /// A scalar as text, the way envoy's YAML library fills a string field:
    /// `123` and `true` are the strings "123" and "true".
    fn string(&self, node: &MarkedYaml<'_>, what: &str) -> Result<String, ImportError> {
        scalar_text(self.text, node)
            .ok_or_else(|| self.invalid(node, format!("`{what}` must be a single value")))
    }

    /// YAML 1.1 booleans, as envoy's YAML library reads them (`yes`, `on`...).
    fn boolean(&self, node: &MarkedYaml<'_>, what: &str) -> Result<bool, ImportError> {
        if let YamlData::Value(Scalar::Boolean(b)) = untag(node).data {
            return Ok(b);
        }
        let text = self.string(node, what)?;
        match text.as_str() {
            "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
                Ok(true)
            }
            "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False"
            | "FALSE" => Ok(false),
            _ => Err(self.invalid(
                node,
                format!("`{what}` must be true or false, got `{text}`"),
            )),
        }
    }

    fn count(&self, node: &MarkedYaml<'_>) -> Result<u32, ImportError> {
        match untag(node).data {
            YamlData::Value(Scalar::Integer(n)) => u32::try_from(n).map_err(|_| {
                self.invalid(
                    node,
                    format!(
                        "requests_per_unit must be between 0 and {}, got {n}",
                        u32::MAX
                    ),
                )
            }),
            _ => Err(self.invalid(node, "requests_per_unit must be a whole number")),
        }
    }
}

fn untag<'n, 'i>(node: &'n MarkedYaml<'i>) -> &'n MarkedYaml<'i> {
    match &node.data {
        YamlData::Tagged(_, inner) => untag(inner),
        _ => node,
    }
}

/// A scalar's text: strings as parsed, other scalars as written in the
/// source (so `1.10` stays `1.10`); `None` for collections.
fn scalar_text(source: &str, node: &MarkedYaml<'_>) -> Option<String> {
    let node = untag(node);
    match &node.data {
        YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
        YamlData::Value(Scalar::Null) => Some(String::new()),
        YamlData::Value(_) | YamlData::Representation(..) => {
            let (from, to) = (node.span.start.index(), node.span.end.index());
            let text: String = source
                .chars()
                .skip(from)
                .take(to.saturating_sub(from))
                .collect();
            Some(text.trim().to_owned())
        }
        _ => None,
    }
}
