//! The Grafana dashboard, docs/metrics.md and docs/logging.md stay true to
//! the binary: every metric a query uses exists (`quotaflow metrics` is the
//! catalog) with the labels it filters and groups by, promtool parses every
//! query, every exported metric and every logged event is documented as it
//! is, and a run of the real binary logs nothing the document does not list.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

const DASHBOARD: &str = "deploy/grafana/dashboards/quotaflow.json";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

// ------------------------------------------------------------------ catalog

#[derive(Debug, Clone)]
struct Metric {
    kind: String,
    labels: BTreeSet<String>,
}

type Catalog = BTreeMap<String, Metric>;

/// What the binary exports, from `quotaflow metrics`.
fn catalog() -> Catalog {
    let out = Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .arg("metrics")
        .output()
        .expect("run quotaflow metrics");
    assert!(out.status.success(), "quotaflow metrics: {out:?}");
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("catalog is JSON");
    let mut cat = Catalog::new();
    for m in list {
        let name = m["name"].as_str().expect("name").to_owned();
        let kind = m["type"].as_str().expect("type").to_owned();
        let labels = m["labels"]
            .as_array()
            .expect("labels")
            .iter()
            .map(|l| l.as_str().expect("label").to_owned())
            .collect();
        assert!(
            m["help"].as_str().is_some_and(|h| !h.is_empty()),
            "{name} has no help"
        );
        assert!(
            cat.insert(name.clone(), Metric { kind, labels }).is_none(),
            "{name} twice"
        );
    }
    assert!(cat.len() > 30, "a suspiciously short catalog: {cat:?}");
    cat
}

// ------------------------------------------------------------------ PromQL

/// Label values the docs list, per metric and label: a query filtering on
/// another value is a typo that would show nothing.
type Values = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// A number, or a Grafana variable outside a range.
    Lit,
    Open(char),
    Close(char),
    Comma,
    Op(String),
}

fn tokenize(expr: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let ident_char = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '"' || ch == '\'' || ch == '`' {
            let mut s = String::new();
            i += 1;
            loop {
                match c.get(i) {
                    None => return Err(format!("unterminated string in `{expr}`")),
                    Some('\\') if ch != '`' => {
                        s.extend(c.get(i + 1));
                        i += 2;
                    }
                    Some(&q) if q == ch => break,
                    Some(&x) => {
                        s.push(x);
                        i += 1;
                    }
                }
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if ch == '[' {
            // Ranges and subqueries hold durations and variables only.
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            if i == c.len() {
                return Err(format!("unclosed `[` in `{expr}`"));
            }
            i += 1;
        } else if ch == '$' {
            i += 1;
            if c.get(i) == Some(&'{') {
                while i < c.len() && c[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
            out.push(Tok::Lit);
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len()
                && (c[i].is_ascii_alphanumeric()
                    || c[i] == '.'
                    || c[i] == '_'
                    || ((c[i] == '+' || c[i] == '-') && matches!(c[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
            out.push(Tok::Lit);
        } else if ident_start(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else if "({".contains(ch) {
            out.push(Tok::Open(ch));
            i += 1;
        } else if ")}".contains(ch) {
            out.push(Tok::Close(ch));
            i += 1;
        } else if ch == ',' {
            out.push(Tok::Comma);
            i += 1;
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                out.push(Tok::Op(two));
                i += 2;
            } else if "=<>+-*/%^@".contains(ch) {
                out.push(Tok::Op(ch.to_string()));
                i += 1;
            } else {
                return Err(format!("unexpected `{ch}` in `{expr}`"));
            }
        }
    }
    Ok(out)
}

const AGGREGATORS: &str = "\
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk \
    limit_ratio";

const FUNCTIONS: &str = "\
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes \
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year \
    days_in_month deg delta deriv double_exponential_smoothing exp floor histogram_avg \
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar \
    histogram_sum holt_winters hour idelta increase irate label_join label_replace \
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi \
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin \
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time \
    stdvar_over_time sum_over_time tan tanh time timestamp vector year start end";

/// Words that are neither metrics nor functions.
const KEYWORDS: &str = "\
    by without on ignoring group_left group_right bool offset and or unless atan2 inf nan";

/// Functions that make labels of their string arguments.
const LABEL_MAKERS: &str = "label_replace label_join count_values";

fn is_one_of(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|w| w == word)
}

/// A metric as a query names it, resolved against the catalog.
#[derive(Debug)]
struct Ref {
    at: usize,
    name: String,
    /// Labels a series of it has: the catalog's, plus what Prometheus adds.
    labels: BTreeSet<String>,
}

fn resolve(name: &str, cat: &Catalog) -> Result<Ref, String> {
    let scraped = ["instance", "job"].map(String::from);
    if let Some(m) = cat.get(name) {
        if m.kind == "histogram" {
            return Err(format!(
                "`{name}` is a histogram: query {name}_bucket, _sum or _count"
            ));
        }
        let labels = m.labels.iter().cloned().chain(scraped).collect();
        return Ok(Ref {
            at: 0,
            name: name.into(),
            labels,
        });
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some(m) = cat.get(base).filter(|m| m.kind == "histogram") {
                let mut labels: BTreeSet<String> =
                    m.labels.iter().cloned().chain(scraped.clone()).collect();
                if suffix == "_bucket" {
                    labels.insert("le".into());
                }
                return Ok(Ref {
                    at: 0,
                    name: name.into(),
                    labels,
                });
            }
        }
    }
    Err(format!("unknown metric `{name}`"))
}

/// The index of the token closing the group opened at `open`.
fn closing(toks: &[Tok], open: usize) -> Option<usize> {
    if !matches!(toks.get(open), Some(Tok::Open(_))) {
        return None;
    }
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The index of the token opening the group closed at `close`.
fn opening(toks: &[Tok], close: usize) -> Option<usize> {
    if !matches!(toks.get(close), Some(Tok::Close(_))) {
        return None;
    }
    let mut depth = 0usize;
    for i in (0..=close).rev() {
        match toks[i] {
            Tok::Close(_) => depth += 1,
            Tok::Open(_) => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Identifiers of a `(a, b)` list starting at `open`, and its end.
fn ident_list(toks: &[Tok], open: usize) -> Result<(Vec<String>, usize), String> {
    let close = closing(toks, open).ok_or("unclosed label list")?;
    let mut names = Vec::new();
    for t in &toks[open + 1..close] {
        match t {
            Tok::Ident(n) => names.push(n.clone()),
            Tok::Comma => {}
            other => return Err(format!("unexpected {other:?} in a label list")),
        }
    }
    Ok((names, close))
}

fn plain_values(op: &str, value: &str) -> Option<Vec<String>> {
    let plain = |v: &str| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    match op {
        "=" | "!=" if plain(value) => Some(vec![value.to_owned()]),
        "=~" | "!~" if value.split('|').all(plain) => {
            Some(value.split('|').map(String::from).collect())
        }
        _ => None,
    }
}

/// Every problem of one PromQL expression against the catalog: unknown
/// metrics and functions, labels a metric does not have, label values the
/// docs do not list.
fn check_promql(expr: &str, cat: &Catalog, values: &Values) -> Vec<String> {
    let toks = match tokenize(expr) {
        Ok(t) => t,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let mut refs: Vec<Ref> = Vec::new();
    // (clause keyword, its labels, index of the keyword)
    let mut clauses: Vec<(String, Vec<String>, usize)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(w) => {
                let lower = w.to_ascii_lowercase();
                let next_open = toks.get(i + 1) == Some(&Tok::Open('('));
                if is_one_of(KEYWORDS, &lower) {
                    if next_open && lower != "bool" && lower != "atan2" {
                        match ident_list(&toks, i + 1) {
                            Ok((labels, close)) => {
                                clauses.push((lower, labels, i));
                                i = close;
                            }
                            Err(e) => problems.push(e),
                        }
                    }
                } else if is_one_of(AGGREGATORS, w) || is_one_of(FUNCTIONS, w) {
                    // `sum by (x) (...)`: an aggregation, not a metric.
                } else if next_open {
                    problems.push(format!("unknown function `{w}`"));
                } else {
                    match resolve(w, cat) {
                        Ok(mut r) => {
                            r.at = i;
                            refs.push(r);
                        }
                        Err(e) => problems.push(e),
                    }
                    if toks.get(i + 1) == Some(&Tok::Open('{')) {
                        i += 1;
                        continue;
                    }
                }
            }
            Tok::Open('{') => {
                let Some(close) = closing(&toks, i) else {
                    problems.push("unclosed `{`".into());
                    break;
                };
                let metric = refs.last().filter(|r| r.at + 1 == i);
                let mut j = i + 1;
                while j < close {
                    match (&toks[j], toks.get(j + 1), toks.get(j + 2)) {
                        (Tok::Ident(label), Some(Tok::Op(op)), Some(Tok::Str(value))) => {
                            if let Some(r) = metric {
                                if !r.labels.contains(label) && label != "__name__" {
                                    problems.push(format!(
                                        "`{label}` is not a label of {} (it has: {})",
                                        r.name,
                                        r.labels.iter().cloned().collect::<Vec<_>>().join(", ")
                                    ));
                                }
                                let base = r.name.trim_end_matches("_bucket");
                                let known = values.get(&r.name).or_else(|| values.get(base));
                                if let (Some(known), Some(vals)) =
                                    (known.and_then(|k| k.get(label)), plain_values(op, value))
                                {
                                    for v in vals.iter().filter(|v| !known.contains(*v)) {
                                        problems.push(format!(
                                            "{}{{{label}}} has no value `{v}` in docs/metrics.md",
                                            r.name
                                        ));
                                    }
                                }
                            }
                            j += 3;
                            if toks.get(j) == Some(&Tok::Comma) {
                                j += 1;
                            }
                        }
                        _ => {
                            problems.push(format!("cannot read the matchers of `{expr}`"));
                            break;
                        }
                    }
                }
                i = close;
            }
            _ => {}
        }
        i += 1;
    }
    for (kind, labels, at) in &clauses {
        // The series a clause groups: an aggregation's argument; for
        // vector matching (on, ignoring, group_*), the whole expression.
        // Labels an inner aggregation drops are not tracked.
        let span = if kind == "by" || kind == "without" {
            let after_aggregator = at
                .checked_sub(1)
                .and_then(|p| match &toks[p] {
                    Tok::Ident(a) if is_one_of(AGGREGATORS, a) => Some(()),
                    _ => None,
                })
                .is_some();
            if after_aggregator {
                let list_end = closing(&toks, at + 1).unwrap_or(*at);
                let open = list_end + 1;
                closing(&toks, open).map(|close| (open, close))
            } else {
                at.checked_sub(1)
                    .and_then(|close| opening(&toks, close).map(|open| (open, close)))
            }
        } else {
            Some((0, toks.len()))
        };
        let Some((from, to)) = span else {
            problems.push(format!("cannot tell what `{kind}` groups in `{expr}`"));
            continue;
        };
        let inside: Vec<&Ref> = refs.iter().filter(|r| r.at >= from && r.at < to).collect();
        // label_replace and friends make labels a catalog cannot know.
        let made: BTreeSet<String> = if toks[from..to]
            .iter()
            .any(|t| matches!(t, Tok::Ident(f) if is_one_of(LABEL_MAKERS, f)))
        {
            toks[from..to]
                .iter()
                .filter_map(|t| match t {
                    Tok::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        for label in labels.iter().filter(|l| !made.contains(*l)) {
            let missing: Vec<&str> = inside
                .iter()
                .filter(|r| !r.labels.contains(label))
                .map(|r| r.name.as_str())
                .collect();
            let unknown = if kind == "by" || kind == "without" {
                !missing.is_empty()
            } else {
                !inside.is_empty() && missing.len() == inside.len()
            };
            if unknown {
                problems.push(format!(
                    "`{kind} ({label})`: `{label}` is not a label of {}",
                    missing.join(", ")
                ));
            }
        }
    }
    problems
}

/// Every panel of a dashboard: rows, and the panels nested in collapsed rows.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn is_row(p: &Value) -> bool {
    p["type"] == "row"
}

fn panel_name(p: &Value) -> String {
    format!(
        "panel \"{}\" (id {})",
        p["title"].as_str().unwrap_or("?"),
        p["id"]
    )
}

/// Every query of the dashboard, named by where it is: panel targets and
/// the template variables' queries.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash).into_iter().filter(|p| !is_row(p)) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_owned();
            out.push((format!("{}, query {}", panel_name(p), t["refId"]), expr));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or_default();
        let name = format!("variable `{}`", v["name"].as_str().unwrap_or("?"));
        // label_values(selector, label): the selector is PromQL, the label
        // is checked by grouping on it.
        if let Some(args) = q
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            if let Some((selector, label)) = args.rsplit_once(',') {
                out.push((name, format!("count by ({}) ({selector})", label.trim())));
            }
        } else if let Some(inner) = q
            .strip_prefix("query_result(")
            .and_then(|a| a.strip_suffix(')'))
        {
            out.push((name, inner.to_owned()));
        }
    }
    out
}

fn check_dashboard_queries(dash: &Value, cat: &Catalog, values: &Values) -> Vec<String> {
    let mut problems = Vec::new();
    for (at, expr) in dashboard_queries(dash) {
        if expr.trim().is_empty() {
            problems.push(format!("{at}: empty query"));
        }
        for p in check_promql(&expr, cat, values) {
            problems.push(format!("{at}: {p}"));
        }
    }
    problems
}

/// The dashboard's JSON model: what Grafana needs to load it as intended.
fn check_dashboard_shape(dash: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ["uid", "title"] {
        if dash[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("dashboard `{key}` missing"));
        }
    }
    if dash["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
        problems.push("schemaVersion missing or older than Grafana 10".into());
    }
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    if !var("datasource").is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus") {
        problems.push("no `datasource` variable of type datasource for prometheus".into());
    }
    if !var("instance").is_some_and(|v| v["type"] == "query") {
        problems.push("no `instance` query variable".into());
    }
    let ds_ok = |ds: &Value| {
        ds["type"] == "prometheus" && (ds["uid"] == "${datasource}" || ds["uid"] == "prometheus")
    };
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    let all = panels(dash);
    if all.iter().filter(|p| !is_row(p)).count() == 0 {
        problems.push("no panels".into());
    }
    for p in all {
        let name = panel_name(p);
        match p["id"].as_u64() {
            Some(id) if !ids.insert(id) => problems.push(format!("{name}: duplicate id")),
            Some(_) => {}
            None => problems.push(format!("{name}: no numeric id")),
        }
        if p["type"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{name}: no type"));
        }
        let g = &p["gridPos"];
        let pos = ["x", "y", "w", "h"].map(|k| g[k].as_u64());
        match pos {
            [Some(x), Some(y), Some(w), Some(h)] if w >= 1 && h >= 1 && x + w <= 24 => {
                boxes.push((name.clone(), [x, y, w, h]));
            }
            _ => problems.push(format!(
                "{name}: gridPos missing or outside 24 columns: {g}"
            )),
        }
        if is_row(p) {
            continue;
        }
        if !ds_ok(&p["datasource"]) {
            problems.push(format!(
                "{name}: datasource is not the prometheus variable: {}",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{name}: no targets"));
        }
        let mut refs = BTreeSet::new();
        for t in &targets {
            if !t["refId"]
                .as_str()
                .is_some_and(|r| refs.insert(r.to_owned()))
            {
                problems.push(format!("{name}: missing or duplicate refId {}", t["refId"]));
            }
            if !t["datasource"].is_null() && !ds_ok(&t["datasource"]) {
                problems.push(format!("{name}: target datasource {}", t["datasource"]));
            }
            let expr = t["expr"].as_str().unwrap_or_default();
            if !expr.contains("$instance") {
                problems.push(format!(
                    "{name}: query {} ignores $instance: `{expr}`",
                    t["refId"]
                ));
            }
        }
    }
    for (n, (a, [ax, ay, aw, ah])) in boxes.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &boxes[n + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            if !apart {
                problems.push(format!("{a} overlaps {b}"));
            }
        }
    }
    problems
}

// ------------------------------------------------------------------ markdown

/// The cells of a table row (`| a | b |`), with `\|` unescaped.
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("a cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("a cell").push(c),
        }
    }
    Some(out.into_iter().map(|c| c.trim().to_owned()).collect())
}

/// The rows of every table whose header starts with `first`.
fn table_rows(text: &str, first: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        match cells(line) {
            Some(c) if c.first().is_some_and(|h| h == first) => inside = true,
            Some(c) if inside => {
                if !c.iter().all(|x| x.chars().all(|ch| ch == '-' || ch == ':')) {
                    rows.push(c);
                }
            }
            _ => inside = false,
        }
    }
    rows
}

/// `a` (`x`, `y`), `b`: the backticked names outside parentheses, each
/// with the backticked words in the parentheses that follow it.
fn names_with_values(cell: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut depth = 0;
    let mut rest = cell;
    while let Some(c) = rest.chars().next() {
        if c == '`' {
            let end = rest[1..].find('`').map_or(rest.len(), |e| e + 1);
            let word = rest[1..end].to_owned();
            if depth == 0 {
                out.push((word, Vec::new()));
            } else if let Some(last) = out.last_mut() {
                last.1.push(word);
            }
            rest = rest.get(end + 1..).unwrap_or("");
            continue;
        }
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn unticked(cell: &str) -> Option<String> {
    Some(cell.strip_prefix('`')?.strip_suffix('`')?.to_owned())
}

// ------------------------------------------------------------------ metrics doc

#[derive(Debug)]
struct DocMetric {
    kind: String,
    labels: BTreeMap<String, BTreeSet<String>>,
    unit: String,
    meaning: String,
    example: String,
}

fn parse_metrics_doc(text: &str) -> (BTreeMap<String, DocMetric>, Vec<String>) {
    let mut doc = BTreeMap::new();
    let mut problems = Vec::new();
    for row in table_rows(text, "metric") {
        let [name, kind, labels, unit, meaning, example] = row.as_slice() else {
            problems.push(format!("docs/metrics.md: a row without 6 cells: {row:?}"));
            continue;
        };
        let Some(name) = unticked(name) else {
            problems.push(format!("docs/metrics.md: metric not in backticks: {name}"));
            continue;
        };
        let m = DocMetric {
            kind: kind.clone(),
            labels: names_with_values(labels)
                .into_iter()
                .map(|(l, v)| (l, v.into_iter().collect()))
                .collect(),
            unit: unit.clone(),
            meaning: meaning.clone(),
            example: unticked(example).unwrap_or_default(),
        };
        if doc.insert(name.clone(), m).is_some() {
            problems.push(format!("docs/metrics.md: {name} documented twice"));
        }
    }
    (doc, problems)
}

fn doc_values(doc: &BTreeMap<String, DocMetric>) -> Values {
    doc.iter()
        .map(|(name, m)| {
            let with_values = m
                .labels
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(l, v)| (l.clone(), v.clone()))
                .collect();
            (name.clone(), with_values)
        })
        .collect()
}

/// Both ways: every exported metric documented with its type and labels,
/// no documented metric that the binary does not export, and every
/// example query valid.
fn check_metrics_doc(text: &str, cat: &Catalog) -> Vec<String> {
    let (doc, mut problems) = parse_metrics_doc(text);
    let values = doc_values(&doc);
    for (name, m) in cat {
        let Some(d) = doc.get(name) else {
            problems.push(format!(
                "{name} ({}) is exported but not in docs/metrics.md",
                m.kind
            ));
            continue;
        };
        if d.kind != m.kind {
            problems.push(format!(
                "{name}: documented as {}, exported as {}",
                d.kind, m.kind
            ));
        }
        let documented: BTreeSet<String> = d.labels.keys().cloned().collect();
        if documented != m.labels {
            problems.push(format!(
                "{name}: documented labels {documented:?}, exported {:?}",
                m.labels
            ));
        }
        if d.unit.is_empty() || d.meaning.is_empty() {
            problems.push(format!(
                "{name}: unit or meaning missing in docs/metrics.md"
            ));
        }
        if !d.example.contains(name.as_str()) {
            problems.push(format!("{name}: its example query does not use it"));
        }
        for p in check_promql(&d.example, cat, &values) {
            problems.push(format!("{name}: example `{}`: {p}", d.example));
        }
    }
    for name in doc.keys().filter(|n| !cat.contains_key(*n)) {
        problems.push(format!(
            "{name} is in docs/metrics.md but the binary does not export it"
        ));
    }
    problems
}

// ------------------------------------------------------------------ promtool

/// Grafana variables replaced by what Prometheus accepts in their place.
fn without_grafana_vars(expr: &str) -> String {
    let mut out = String::new();
    let mut in_range = false;
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '[' => in_range = true,
            ']' => in_range = false,
            '$' => {
                if chars.peek() == Some(&'{') {
                    for x in chars.by_ref() {
                        if x == '}' {
                            break;
                        }
                    }
                } else {
                    while chars
                        .peek()
                        .is_some_and(|x| x.is_ascii_alphanumeric() || *x == '_')
                    {
                        chars.next();
                    }
                }
                out.push_str(if in_range { "5m" } else { ".*" });
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// `promtool check rules` over a file with one recording rule per
/// expression: it parses each as PromQL. Returns promtool's output.
fn promtool_check(exprs: &[String]) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = String::from("groups:\n  - name: queries\n    rules:\n");
    for (n, e) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(&without_grafana_vars(e)).expect("json string");
        rules.push_str(&format!(
            "      - record: query:n{n}\n        expr: {quoted}\n"
        ));
    }
    let path = dir.path().join("queries.yml");
    std::fs::write(&path, rules).expect("write rules");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
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
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

// ------------------------------------------------------------------ logs

#[derive(Debug)]
struct LogCall {
    at: String,
    level: String,
    event: Option<String>,
    fields: BTreeSet<String>,
    message: Option<String>,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level arguments of a macro call whose `(` is at `open`, and the
/// index after its `)`. Strings and comments are skipped over.
fn macro_args(src: &[char], open: usize) -> Option<(Vec<String>, usize)> {
    let mut args = vec![String::new()];
    let mut depth = 0;
    let mut i = open;
    while i < src.len() {
        let c = src[i];
        if c == '"' {
            let start = i;
            i += 1;
            while i < src.len() && src[i] != '"' {
                i += if src[i] == '\\' { 2 } else { 1 };
            }
            args.last_mut()?.extend(&src[start..=i.min(src.len() - 1)]);
        } else if c == '/' && src.get(i + 1) == Some(&'/') {
            while i < src.len() && src[i] != '\n' {
                i += 1;
            }
        } else if "([{".contains(c) {
            depth += 1;
            if depth > 1 {
                args.last_mut()?.push(c);
            }
        } else if ")]}".contains(c) {
            depth -= 1;
            if depth == 0 {
                return Some((args, i + 1));
            }
            args.last_mut()?.push(c);
        } else if c == ',' && depth == 1 {
            args.push(String::new());
        } else {
            args.last_mut()?.push(c);
        }
        i += 1;
    }
    None
}

/// Every tracing macro call in `src/` and `crates/`: its level, `event`,
/// field names and message.
fn scan_log_calls() -> (Vec<LogCall>, Vec<String>) {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("crates"), &mut files);
    assert!(files.len() > 20, "source scan found {} files", files.len());
    let mut calls = Vec::new();
    let mut problems = Vec::new();
    let mut event_fields = 0;
    let macros: Vec<(String, Vec<char>)> = ["trace", "debug", "info", "warn", "error"]
        .iter()
        .map(|l| (l.to_string(), format!("{l}!(").chars().collect()))
        .collect();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read source");
        event_fields += text.matches("event = \"").count();
        let src: Vec<char> = text.chars().collect();
        let rel = file
            .strip_prefix(root())
            .unwrap_or(&file)
            .display()
            .to_string();
        let mut i = 0;
        while i < src.len() {
            let word_start = i == 0 || !(src[i - 1].is_alphanumeric() || src[i - 1] == '_');
            let Some((level, open)) = macros.iter().find_map(|(l, pat)| {
                (word_start && src[i..].starts_with(pat)).then(|| (l.clone(), i + pat.len() - 1))
            }) else {
                i += 1;
                continue;
            };
            let line_start = src[..i]
                .iter()
                .rposition(|c| *c == '\n')
                .map_or(0, |p| p + 1);
            let line: String = src[line_start..i].iter().collect();
            let line_no = src[..i].iter().filter(|c| **c == '\n').count() + 1;
            let at = format!("{rel}:{line_no}");
            let bare = !line.trim_end().ends_with("tracing::");
            if line.contains("//") || (bare && !text.contains("use tracing::")) {
                i += 1;
                continue;
            }
            let Some((args, end)) = macro_args(&src, open) else {
                problems.push(format!("{at}: cannot read the {level}! call"));
                i += 1;
                continue;
            };
            let mut call = LogCall {
                at: at.clone(),
                level,
                event: None,
                fields: BTreeSet::new(),
                message: None,
            };
            for arg in args.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
                if arg.starts_with('"') {
                    // The message; any further arguments format it.
                    call.message = Some(arg.trim_matches('"').to_owned());
                    break;
                }
                let body = arg.trim_start_matches(['%', '?']);
                let name_len = body
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .unwrap_or(body.len());
                let (name, rest) = body.split_at(name_len);
                let rest = rest.trim_start();
                let value = rest.strip_prefix('=').filter(|v| !v.starts_with('='));
                if name.is_empty() || (value.is_none() && !rest.is_empty()) {
                    problems.push(format!("{at}: cannot read the argument `{arg}`"));
                    continue;
                }
                if name == "event" {
                    match value
                        .map(str::trim)
                        .and_then(|v| v.strip_prefix('"')?.strip_suffix('"'))
                    {
                        Some(e) => call.event = Some(e.to_owned()),
                        None => problems.push(format!("{at}: `event` is not a string literal")),
                    }
                } else {
                    call.fields.insert(name.to_owned());
                }
            }
            calls.push(call);
            i = end;
        }
    }
    // An `event` the scan did not see (another macro, a comment) would go
    // unchecked.
    let seen = calls.iter().filter(|c| c.event.is_some()).count();
    if seen != event_fields {
        problems.push(format!(
            "{event_fields} `event = \"` in the source, {seen} in the log calls read"
        ));
    }
    (calls, problems)
}

#[derive(Debug, Default)]
struct DocEvent {
    levels: BTreeSet<String>,
    fields: BTreeSet<String>,
}

/// Fields on every line, documented once.
const COMMON_FIELDS: &[&str] = &["timestamp", "level", "message", "target", "event"];

fn parse_logging_doc(text: &str) -> (BTreeMap<String, DocEvent>, Vec<String>) {
    let mut doc = BTreeMap::new();
    let mut problems = Vec::new();
    for row in table_rows(text, "`event`") {
        let [event, levels, fields, when] = row.as_slice() else {
            problems.push(format!("docs/logging.md: a row without 4 cells: {row:?}"));
            continue;
        };
        let Some(event) = unticked(event) else {
            problems.push(format!("docs/logging.md: event not in backticks: {event}"));
            continue;
        };
        if when.is_empty() {
            problems.push(format!(
                "docs/logging.md: {event} does not say when it is logged"
            ));
        }
        let d = DocEvent {
            levels: levels
                .split(|c: char| !c.is_ascii_alphabetic())
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            fields: names_with_values(fields)
                .into_iter()
                .map(|(f, _)| f)
                .collect(),
        };
        if doc.insert(event.clone(), d).is_some() {
            problems.push(format!("docs/logging.md: {event} documented twice"));
        }
    }
    (doc, problems)
}

/// The part of a message a document quotes for a line without an event.
fn message_head(m: &str) -> &str {
    m.split(';').next().unwrap_or(m).trim()
}

/// Both ways: every event in the code documented with exactly its levels
/// and fields, no documented event that the code no longer logs; lines
/// without an event quoted in the document.
fn check_logging_doc(text: &str, calls: &[LogCall]) -> Vec<String> {
    let (doc, mut problems) = parse_logging_doc(text);
    let mut code: BTreeMap<String, DocEvent> = BTreeMap::new();
    for c in calls {
        let Some(event) = &c.event else {
            let quoted = c
                .message
                .as_deref()
                .is_some_and(|m| text.contains(message_head(m)));
            if !quoted {
                problems.push(format!(
                    "{}: a {} line without an `event` field, not listed in docs/logging.md: {:?}",
                    c.at, c.level, c.message
                ));
            }
            continue;
        };
        let e = code.entry(event.clone()).or_default();
        e.levels.insert(c.level.clone());
        e.fields.extend(c.fields.iter().cloned());
    }
    for (event, c) in &code {
        let Some(d) = doc.get(event) else {
            problems.push(format!(
                "`{event}` ({:?}, fields {:?}) is logged but not in docs/logging.md",
                c.levels, c.fields
            ));
            continue;
        };
        if d.levels != c.levels {
            problems.push(format!(
                "`{event}`: documented levels {:?}, logged at {:?}",
                d.levels, c.levels
            ));
        }
        for f in c.fields.difference(&d.fields) {
            problems.push(format!(
                "`{event}`: field `{f}` is logged but not documented"
            ));
        }
        for f in d.fields.difference(&c.fields) {
            problems.push(format!("`{event}`: documented field `{f}` is never logged"));
        }
    }
    for event in doc.keys().filter(|e| !code.contains_key(*e)) {
        problems.push(format!(
            "`{event}` is in docs/logging.md but nothing logs it"
        ));
    }
    problems
}

/// Lines a binary printed, against the document: JSON, with a documented
/// event at a documented level, and only documented fields.
fn check_log_lines(lines: &[String], text: &str) -> Vec<String> {
    let (doc, mut problems) = parse_logging_doc(text);
    for line in lines {
        let Ok(Value::Object(v)) = serde_json::from_str::<Value>(line) else {
            problems.push(format!("not a JSON object: {line}"));
            continue;
        };
        let Some(event) = v.get("event").and_then(Value::as_str) else {
            let quoted = v
                .get("message")
                .and_then(Value::as_str)
                .is_some_and(|m| text.contains(message_head(m)));
            if !quoted {
                problems.push(format!("a line without a documented event: {line}"));
            }
            continue;
        };
        let Some(d) = doc.get(event) else {
            problems.push(format!(
                "`{event}` is logged but not in docs/logging.md: {line}"
            ));
            continue;
        };
        let level = v
            .get("level")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !d.levels.contains(&level) {
            problems.push(format!(
                "`{event}` logged at {level}, documented at {:?}",
                d.levels
            ));
        }
        for f in v.keys().filter(|k| !COMMON_FIELDS.contains(&k.as_str())) {
            if !d.fields.contains(f) {
                problems.push(format!("`{event}`: field `{f}` is not documented: {line}"));
            }
        }
    }
    problems
}

// ------------------------------------------------------------------ tests

#[test]
fn every_dashboard_query_uses_exported_metrics_and_labels() {
    let cat = catalog();
    let (doc, _) = parse_metrics_doc(&read("docs/metrics.md"));
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() > 30, "{} queries", queries.len());
    let problems = check_dashboard_queries(&dash, &cat, &doc_values(&doc));
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));
}

/// The checker is not blind: a copy of the dashboard with a bogus metric,
/// label, label value, function and a bare histogram is refused, naming
/// the panel and what is wrong.
#[test]
fn the_query_checker_names_the_panel_and_the_bogus_metric() {
    let cat = catalog();
    let (doc, _) = parse_metrics_doc(&read("docs/metrics.md"));
    let values = doc_values(&doc);
    let mut dash = dashboard();
    let first = dash["panels"]
        .as_array_mut()
        .expect("panels")
        .iter_mut()
        .find(|p| p["type"] != "row")
        .expect("a panel");
    first["title"] = json!("Tampered");
    let bogus = [
        r#"sum(rate(quotaflow_bogus_total{instance=~"$instance"}[5m]))"#,
        r#"sum by (tenant) (rate(quotaflow_checks_total{instance=~"$instance"}[5m]))"#,
        r#"rate(quotaflow_checks_total{instance=~"$instance", verdict="refusd"}[5m])"#,
        r#"rate(quotaflow_checks_total{instance=~"$instance", limit="x"}[5m])"#,
        r#"histogram_quantile(0.9, quotaflow_check_duration_seconds{instance=~"$instance"})"#,
        r#"sum by (le) (rate(quotaflow_checks_total{instance=~"$instance"}[5m]))"#,
        r#"rated(quotaflow_checks_total{instance=~"$instance"}[5m])"#,
    ];
    let targets = first["targets"].as_array_mut().expect("targets");
    targets.clear();
    for (n, e) in bogus.iter().enumerate() {
        targets.push(json!({"refId": format!("Z{n}"), "expr": e}));
    }
    let id = first["id"].clone();
    let problems = check_dashboard_queries(&dash, &cat, &values);
    let at = |n: usize| format!("panel \"Tampered\" (id {id}), query \"Z{n}\": ");
    let expected = [
        format!("{}unknown metric `quotaflow_bogus_total`", at(0)),
        format!(
            "{}`by (tenant)`: `tenant` is not a label of quotaflow_checks_total",
            at(1)
        ),
        format!(
            "{}quotaflow_checks_total{{verdict}} has no value `refusd` in docs/metrics.md",
            at(2)
        ),
        format!("{}`limit` is not a label of quotaflow_checks_total", at(3)),
        format!("{}`quotaflow_check_duration_seconds` is a histogram", at(4)),
        format!(
            "{}`by (le)`: `le` is not a label of quotaflow_checks_total",
            at(5)
        ),
        format!("{}unknown function `rated`", at(6)),
    ];
    for e in &expected {
        assert!(
            problems.iter().any(|p| p.starts_with(e.as_str())),
            "missing `{e}` in:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(problems.len(), expected.len(), "{}", problems.join("\n"));
}

#[test]
fn dashboard_json_is_a_loadable_grafana_model() {
    let dash = dashboard();
    let problems = check_dashboard_shape(&dash);
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));

    // The shape check is not blind either.
    let mut broken = dash.clone();
    let list = broken["panels"].as_array_mut().expect("panels");
    let mut copy = list
        .iter()
        .find(|p| p["type"] == "timeseries")
        .expect("a graph")
        .clone();
    copy["datasource"] = json!({"type": "loki", "uid": "x"});
    copy["gridPos"]["w"] = json!(30);
    copy["targets"][0]["expr"] = json!("sum(rate(quotaflow_checks_total[5m]))");
    list.push(copy);
    let problems = check_dashboard_shape(&broken).join("\n");
    for e in [
        "duplicate id",
        "datasource is not the prometheus variable",
        "outside 24 columns",
        "ignores $instance",
    ] {
        assert!(problems.contains(e), "missing `{e}` in:\n{problems}");
    }
}

#[test]
fn promtool_parses_every_dashboard_and_doc_query() {
    let dash = dashboard();
    let (doc, _) = parse_metrics_doc(&read("docs/metrics.md"));
    let mut exprs: Vec<String> = dashboard_queries(&dash)
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    exprs.extend(doc.values().map(|m| m.example.clone()));
    let out = promtool_check(&exprs).unwrap_or_else(|e| panic!("promtool:\n{e}"));
    let found = format!("SUCCESS: {} rules found", exprs.len());
    assert!(out.contains(&found), "{out}");
    // promtool does parse: a broken query fails.
    let err = promtool_check(&["sum by (le (rate(quotaflow_checks_total[5m]))".into()])
        .expect_err("promtool accepted a broken query");
    assert!(err.contains("parse error"), "{err}");
}

#[test]
fn metrics_doc_matches_the_catalog_both_ways() {
    let cat = catalog();
    let text = read("docs/metrics.md");
    let problems = check_metrics_doc(&text, &cat);
    assert!(
        problems.is_empty(),
        "docs/metrics.md:\n{}",
        problems.join("\n")
    );

    // A document that lost a metric, gained one, or got a type or a label
    // wrong is caught.
    let broken = text
        .lines()
        .filter(|l| !l.starts_with("| `quotaflow_ready` |"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "| `quotaflow_keys_max` | gauge |",
            "| `quotaflow_keys_max` | counter |",
        )
        .replace(
            "`endpoint` (`check`, `forward_auth`), `verdict`",
            "`verdict`",
        )
        + "\n\n| metric | type | labels | unit | meaning | example |\n|---|---|---|---|---|---|\n\
           | `quotaflow_gone_total` | counter | — | x | y | `rate(quotaflow_gone_total[5m])` |\n";
    let problems = check_metrics_doc(&broken, &cat).join("\n");
    for e in [
        "quotaflow_ready (gauge) is exported but not in docs/metrics.md",
        "quotaflow_keys_max: documented as counter, exported as gauge",
        "quotaflow_checks_total: documented labels",
        "quotaflow_gone_total is in docs/metrics.md but the binary does not export it",
    ] {
        assert!(problems.contains(e), "missing `{e}` in:\n{problems}");
    }
}

#[test]
fn logging_doc_matches_the_source_both_ways() {
    let (calls, problems) = scan_log_calls();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(calls.len() > 40, "found only {} log calls", calls.len());
    let text = read("docs/logging.md");
    let problems = check_logging_doc(&text, &calls);
    assert!(
        problems.is_empty(),
        "docs/logging.md:\n{}",
        problems.join("\n")
    );

    // A document that lost an event, lists a gone one or a field the code
    // does not log is caught.
    let broken = text
        .lines()
        .filter(|l| !l.starts_with("| `checkpoint_fenced` |"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("| `fatal` | error | `error` |", "| `fatal` | error | `error`, `cause` |")
        + "\n\n| `event` | level | fields | when |\n|---|---|---|---|\n| `gone_event` | info | | never |\n";
    let problems = check_logging_doc(&broken, &calls).join("\n");
    for e in [
        "`checkpoint_fenced` (",
        "`fatal`: documented field `cause` is never logged",
        "`gone_event` is in docs/logging.md but nothing logs it",
    ] {
        assert!(problems.contains(e), "missing `{e}` in:\n{problems}");
    }
    let lines = [
        r#"{"level":"INFO","event":"made_up","target":"x"}"#.to_owned(),
        r#"{"level":"INFO","event":"listening","addr":"a","secret":"s","target":"x"}"#.to_owned(),
        r#"{"level":"INFO","message":"no event here","target":"x"}"#.to_owned(),
    ];
    let problems = check_log_lines(&lines, &text).join("\n");
    for e in [
        "`made_up` is logged but not",
        "`listening`: field `secret`",
        "without a documented event",
    ] {
        assert!(problems.contains(e), "missing `{e}` in:\n{problems}");
    }
}

const RUN_CONFIG: &str = r#"
[log]
format = "json"
level = "info"

[state]
sweep_interval = "50ms"
shards = 1
max_keys = 4

[alerts]
window = "1s"
min_refused = 1

# Refuses at once and for long: a breach, then a suspicious pattern.
[[limits]]
name = "burst"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 1
refill_per_sec = 0.001
match = { path_prefix = "/api" }

# A one-second window: a breach that ends a second later.
[[limits]]
name = "per_second"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1
window = "1s"
match = { path_prefix = "/web" }
"#;

async fn post(c: &reqwest::Client, url: &str, body: Value) -> u16 {
    c.post(url)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .status()
        .as_u16()
}

/// The real binary, driven through breaches, a suspicious client, config
/// writes (applied, invalid, refused), events with a dead letter and an
/// alert, a full key store and SIGTERM: each JSON line it logs is
/// documented, event, level and fields.
#[tokio::test]
async fn a_running_binary_logs_only_documented_events_and_fields() {
    let mut s = common::Server::start(Some(RUN_CONFIG), &[]);
    let c = common::client();
    let check = s.url("/check");

    // 1 allowed, then 100 refusals in a row.
    for n in 0..101 {
        let status = post(&c, &check, json!({"user_id": "mallory", "path": "/api/x"})).await;
        assert_eq!(status, if n == 0 { 200 } else { 429 });
    }
    assert_eq!(
        post(&c, &check, json!({"user_id": "bob", "path": "/web"})).await,
        200
    );
    assert_eq!(
        post(&c, &check, json!({"user_id": "bob", "path": "/web"})).await,
        429
    );
    let events = s.url("/events");
    let eve = json!({"user_id": "eve", "path": "/web"});
    let batch = json!([eve, eve, eve, {"user_id": "x", "client_ip": "999.0.0.1"}]);
    assert_eq!(post(&c, &events, batch).await, 202);

    let config_url = s.url("/rate_limit/config");
    let mut cfg: Value = c
        .get(&config_url)
        .send()
        .await
        .expect("GET config")
        .json()
        .await
        .expect("config JSON");
    cfg["limits"][0]["capacity"] = json!(2);
    assert_eq!(post(&c, &config_url, cfg.clone()).await, 200);
    let invalid =
        json!({"limits": [{"name": "x", "key": ["user_id"], "capacity": 0, "refill_per_sec": 1}]});
    assert_eq!(post(&c, &config_url, invalid).await, 400);
    let foreign = c
        .post(&config_url)
        .header("host", "quotaflow.example")
        .json(&cfg)
        .send()
        .await
        .expect("POST config");
    assert_eq!(foreign.status(), 403);
    let body = c.post(&check).body("{").send().await.expect("POST /check");
    assert_eq!(body.status(), 400);

    // Past bob's calm spell and eve's alert window.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        post(&c, &check, json!({"user_id": "bob", "path": "/web"})).await,
        200
    );
    assert_eq!(post(&c, &events, json!([eve])).await, 202);
    // More keys than the store holds.
    for n in 0..40 {
        post(
            &c,
            &check,
            json!({"user_id": format!("u{n}"), "path": "/api"}),
        )
        .await;
    }

    let exposition = common::get_text(&c, &s.url("/metrics")).await;
    let cat = catalog();
    for name in exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = name.split_whitespace().next().unwrap_or_default();
        assert!(
            cat.contains_key(name),
            "/metrics exports {name}, the catalog lacks it"
        );
    }

    let wait = Duration::from_secs(10);
    for event in [
        "breach_started",
        "suspicious_pattern",
        "breach_ended",
        "config_applied",
        "config_rejected",
        "write_unauthorized",
        "decision",
        "dead_letter",
        "breach_alert",
        "key_capacity_reached",
    ] {
        s.wait_log(wait, |v| v["event"] == event);
    }
    let status = s.terminate();
    assert!(status.success(), "exit status {status}");
    for event in [
        "shutdown",
        "http_draining",
        "partitions_handed_back",
        "stopped",
    ] {
        s.wait_log(wait, |v| v["event"] == event);
    }

    let lines = s.logs();
    let problems = check_log_lines(&lines, &read("docs/logging.md"));
    assert!(
        problems.is_empty(),
        "undocumented log output:\n{}",
        problems.join("\n")
    );
}
