//! From envoy ratelimit descriptor trees to quotaflow limits, with what does
//! not carry over. docs/envoy-import.md explains every rule here.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::{Map, Value};

use quotaflow_core::rules::path::canonical_path;
use quotaflow_core::rules::{Dimension, LimitDoc, MatchDoc, OneOrMany, RulesDoc};

use super::yaml::{Domain, Loc, Node, Unit};
use super::{Item, Kind, Mapping, Report};

/// One descriptor with a `rate_limit`, with the path that leads to it.
struct Leaf<'a> {
    domain: &'a Domain,
    /// The nodes from the top level down to the leaf.
    path: Vec<&'a Node>,
    /// The list each node of `path` is one of (its siblings and itself).
    lists: Vec<&'a [Node]>,
}

impl Leaf<'_> {
    fn node(&self) -> &Node {
        self.path[self.path.len() - 1]
    }

    /// `domain: key > key=value > ...`, for messages.
    fn describe(&self) -> String {
        let parts: Vec<String> = self.path.iter().map(|n| entry(n)).collect();
        format!("{}: {}", self.domain.name, parts.join(" > "))
    }
}

fn entry(n: &Node) -> String {
    match &n.value {
        Some(v) => format!("{}={v}", n.key),
        None => n.key.clone(),
    }
}

/// Values a whitelist could exempt: (dimension name, value) to the
/// dimension, the limits that must not count it, and the unlimited descriptor.
type Allow = BTreeMap<(&'static str, String), (Dimension, BTreeSet<String>, Loc)>;

/// A leaf that became a quotaflow limit.
struct Built {
    leaf: usize,
    doc: LimitDoc,
    limit: u64,
    window_s: u64,
    shadow: bool,
}

/// The converted document, its report, and one comment per limit (where it
/// came from) in the order of `doc.limits`.
pub struct Converted {
    pub doc: RulesDoc,
    pub report: Report,
    pub origins: Vec<String>,
}

pub fn convert(domains: &[Domain], mapping: &Mapping, mut report: Report) -> Converted {
    let mut leaves = Vec::new();
    for d in domains {
        collect(
            d,
            &d.descriptors,
            &mut Vec::new(),
            &mut Vec::new(),
            &mut leaves,
        );
    }
    if domains.len() > 1 {
        let names: Vec<&str> = domains.iter().map(|d| d.name.as_str()).collect();
        report.note(
            &domains[0].at,
            format!(
                "{} domains ({}) become one config: quotaflow has no domains, so every limit applies \
                 to each request that carries its dimensions, as if the gateway asked every domain \
                 about every request",
                names.len(),
                names.join(", ")
            ),
        );
    }

    let mut built: Vec<Built> = Vec::new();
    let mut dead = BTreeSet::new();
    for (i, leaf) in leaves.iter().enumerate() {
        if unreachable(leaf) {
            dead.insert(i);
            report.note(
                &leaf.node().at,
                format!(
                    "`{}` is never reached in envoy ratelimit (an earlier wildcard takes every value it \
                     could match); left out",
                    leaf.describe()
                ),
            );
            continue;
        }
        let Some(rl) = &leaf.node().rate_limit else {
            continue;
        };
        if rl.unlimited {
            continue;
        }
        if let Some(b) = build(i, leaf, mapping, &mut report) {
            built.push(b);
        }
    }

    assign_names(&leaves, &mut built);
    // A whitelist exempts from shadow limits too, which changes no verdict.
    let names: BTreeSet<String> = built
        .iter()
        .filter(|b| !b.shadow)
        .map(|b| b.doc.name.clone())
        .collect();

    // Requests a more specific sibling takes away from a limit in envoy,
    // which quotaflow cannot take away.
    let mut allow = Allow::new();
    for b in &built {
        check_captures(b, &leaves, &built, mapping, &mut report, &mut allow);
    }
    let mut whitelist = quotaflow_core::rules::WhitelistDoc::default();
    for ((_, value), (dim, needed_by, at)) in allow {
        let others: Vec<&String> = names.difference(&needed_by).collect();
        if others.is_empty() {
            report.note(
                &at,
                format!(
                    "{}={value} is unlimited in envoy ratelimit where {} would count it; whitelisted \
                     (envoy applies no other non-shadow limit of this config to it)",
                    dim.as_str(),
                    list(&needed_by)
                ),
            );
            match dim {
                Dimension::UserId => whitelist.user_ids.push(value),
                Dimension::ApiKey => whitelist.api_keys.push(value),
                _ => whitelist.client_ips.push(value),
            }
        } else {
            report.not_expressed(
                &at,
                format!(
                    "{}={value} is unlimited in envoy ratelimit instead of {}; a whitelist would also \
                     exempt it from {}, which envoy applies to it, so it is not whitelisted and \
                     quotaflow limits it",
                    dim.as_str(),
                    list(&needed_by),
                    list(others)
                ),
            );
        }
    }

    check_replaces(&leaves, &built, &dead, &mut report);

    let origins = built
        .iter()
        .map(|b| {
            let leaf = &leaves[b.leaf];
            format!("envoy {} ({})", leaf.describe(), leaf.node().at)
        })
        .collect();
    let doc = RulesDoc {
        limits: built.into_iter().map(|b| b.doc).collect(),
        whitelist,
        path_case_sensitive: false,
    };
    Converted {
        doc,
        report,
        origins,
    }
}

fn list<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    names
        .into_iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn collect<'a>(
    domain: &'a Domain,
    list: &'a [Node],
    path: &mut Vec<&'a Node>,
    lists: &mut Vec<&'a [Node]>,
    out: &mut Vec<Leaf<'a>>,
) {
    for n in list {
        path.push(n);
        lists.push(list);
        if n.rate_limit.is_some() {
            out.push(Leaf {
                domain,
                path: path.clone(),
                lists: lists.clone(),
            });
        }
        collect(domain, &n.descriptors, path, lists, out);
        path.pop();
        lists.pop();
    }
}

/// What a sibling takes from a node: one exact value or a value prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Taken {
    Exact(String),
    Prefix(String),
}

impl Taken {
    fn describe(&self) -> String {
        match self {
            Taken::Exact(v) => format!("is `{v}`"),
            Taken::Prefix(p) => format!("starts with `{p}`"),
        }
    }
}

/// The siblings that envoy ratelimit tries before `n` for a request value
/// `n` could match, and what they take. Envoy looks a value up as
/// `key_value` first, then in the wildcards in the order written, then as
/// the key alone, and never comes back to try another.
fn takers<'a>(n: &Node, list: &'a [Node]) -> Vec<(&'a Node, Taken)> {
    let mut out = Vec::new();
    let mine = n.wildcard();
    for s in list {
        if std::ptr::eq(s, n) || s.key != n.key {
            continue;
        }
        match (&n.value, mine, &s.value, s.wildcard()) {
            // An exact value is tried first: nothing takes from it.
            (Some(_), None, _, _) => {}
            // The key alone loses to every value and wildcard.
            (None, _, Some(v), None) => out.push((s, Taken::Exact(v.clone()))),
            (None, _, Some(_), Some(q)) => out.push((s, Taken::Prefix(q.to_owned()))),
            // A wildcard loses to exact values it covers and to wildcards
            // written before it.
            (Some(_), Some(p), Some(v), None) if v.starts_with(p) => {
                out.push((s, Taken::Exact(v.clone())))
            }
            (Some(_), Some(p), Some(_), Some(q)) if q.starts_with(p) && before(s, n, list) => {
                out.push((s, Taken::Prefix(q.to_owned())))
            }
            _ => {}
        }
    }
    out
}

fn before(a: &Node, b: &Node, list: &[Node]) -> bool {
    let pos = |x: &Node| list.iter().position(|y| std::ptr::eq(x, y));
    matches!((pos(a), pos(b)), (Some(i), Some(j)) if i < j)
}

/// A wildcard node whose every value an earlier wildcard takes.
fn unreachable(leaf: &Leaf<'_>) -> bool {
    leaf.path.iter().zip(&leaf.lists).any(|(n, list)| {
        let Some(p) = n.wildcard() else { return false };
        list.iter().any(|s| {
            s.key == n.key && before(s, n, list) && s.wildcard().is_some_and(|q| p.starts_with(q))
        })
    })
}

/// The quotaflow limit for `leaf`, or `None` with the reason reported.
fn build(i: usize, leaf: &Leaf<'_>, mapping: &Mapping, report: &mut Report) -> Option<Built> {
    let node = leaf.node();
    let rl = node.rate_limit.as_ref()?;
    let unit = rl.unit?;
    let fail = |report: &mut Report, why: String| {
        report.not_expressed(&node.at, format!("`{}` left out: {why}", leaf.describe()));
        None
    };
    if rl.requests_per_unit == 0 {
        return fail(
            report,
            "requests_per_unit 0 refuses every request; a quotaflow limit admits at least 1".into(),
        );
    }
    let mut key: Vec<Dimension> = Vec::new();
    let mut methods: Option<String> = None;
    let mut exact_path: Option<String> = None;
    let mut prefix: Option<String> = None;
    for n in &leaf.path {
        let Some(dim) = mapping.dimension(&n.key) else {
            return fail(
                report,
                format!(
                    "descriptor key `{}` has no quotaflow dimension (give one with --map {}=DIMENSION \
                     if a request field carries it)",
                    n.key, n.key
                ),
            );
        };
        match (&n.value, n.wildcard()) {
            (None, _) => {
                if !key.contains(&dim) {
                    key.push(dim);
                }
            }
            (Some(_), Some(p)) => {
                if dim != Dimension::Path && !p.is_empty() {
                    return fail(
                        report,
                        format!(
                            "`{}` is a wildcard on {}; quotaflow matches prefixes of paths only",
                            entry(n),
                            dim.as_str()
                        ),
                    );
                }
                if n.share_threshold {
                    if dim != Dimension::Path {
                        return fail(
                            report,
                            format!(
                                "`{}` shares one count among all {} values; quotaflow cannot require \
                                 the field without counting per value",
                                entry(n),
                                dim.as_str()
                            ),
                        );
                    }
                } else if !key.contains(&dim) {
                    key.push(dim);
                }
                if dim == Dimension::Path {
                    let p = if p.is_empty() { "/" } else { p };
                    if !p.starts_with('/') {
                        return fail(
                            report,
                            format!("`{}`: a path prefix must start with `/`", entry(n)),
                        );
                    }
                    match &prefix {
                        Some(q) if q.starts_with(p) => {}
                        Some(q) if !p.starts_with(q.as_str()) => {
                            return fail(
                                report,
                                format!("path prefixes `{q}` and `{p}` exclude each other"),
                            )
                        }
                        _ => prefix = Some(p.to_owned()),
                    }
                }
            }
            (Some(v), None) => match dim {
                Dimension::Path => {
                    if !v.starts_with('/') {
                        return fail(report, format!("`{}`: a path must start with `/`", entry(n)));
                    }
                    let canonical = canonical_path(v, false).into_owned();
                    if canonical != *v {
                        report.note(
                            &n.at,
                            format!(
                                "path `{v}` is matched in canonical form `{canonical}` (quotaflow \
                                 matches /x, /x/, /X and /x?q alike; envoy compares the value as sent)"
                            ),
                        );
                    }
                    if exact_path.as_ref().is_some_and(|e| *e != canonical) {
                        return fail(report, "two different fixed paths never match one request".into());
                    }
                    exact_path = Some(canonical);
                }
                Dimension::Method => {
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphabetic()) {
                        return fail(report, format!("`{}` is not an HTTP method", entry(n)));
                    }
                    if methods.as_ref().is_some_and(|m| !m.eq_ignore_ascii_case(v)) {
                        return fail(report, "two different fixed methods never match one request".into());
                    }
                    methods = Some(v.to_ascii_uppercase());
                }
                other => {
                    return fail(
                        report,
                        format!(
                            "`{}` selects one {} value; quotaflow's `match` selects by method and path \
                             only",
                            entry(n),
                            other.as_str()
                        ),
                    )
                }
            },
        }
    }
    if let (Some(e), Some(p)) = (&exact_path, &prefix) {
        if !e.starts_with(p.as_str()) {
            return fail(
                report,
                format!("path `{e}` does not start with `{p}`: never matches"),
            );
        }
        prefix = None;
    }
    if node.quota_mode {
        report.note(
            &node.at,
            format!(
                "`{}` is in quota_mode (over the limit still answers OK): imported as shadow",
                leaf.describe()
            ),
        );
    }
    if node.detailed_metric || node.value_to_metric {
        report.note(
            &node.at,
            "detailed_metric / value_to_metric shape envoy's metric names only; quotaflow's metrics \
             are per limit",
        );
    }
    let matcher =
        (methods.is_some() || exact_path.is_some() || prefix.is_some()).then(|| MatchDoc {
            method: methods.map(OneOrMany::One),
            path: exact_path,
            path_prefix: prefix,
            path_pattern: None,
        });
    let mut params = Map::new();
    params.insert("limit".into(), Value::from(rl.requests_per_unit));
    params.insert("window".into(), Value::from(unit.window()));
    let shadow = node.shadow_mode || node.quota_mode;
    Some(Built {
        leaf: i,
        doc: LimitDoc {
            name: String::new(),
            algorithm: "fixed_window".into(),
            key,
            matcher,
            shadow,
            failure_mode: None,
            params,
        },
        limit: u64::from(rl.requests_per_unit),
        window_s: unit.seconds(),
        shadow,
    })
}

/// Names quotaflow accepts (1-64 of `A-Za-z0-9_.-`), unique and stable for
/// the same file: the rate_limit's `name` when it has one, else the domain
/// and the descriptor path.
fn assign_names(leaves: &[Leaf<'_>], built: &mut [Built]) {
    let mut taken: HashSet<String> = HashSet::new();
    for b in built.iter_mut() {
        let leaf = &leaves[b.leaf];
        let raw = match leaf.node().rate_limit.as_ref().and_then(|r| r.name.clone()) {
            Some(n) => n,
            None => {
                let parts: Vec<String> = leaf.path.iter().map(|n| n.composite()).collect();
                format!("{}.{}", leaf.domain.name, parts.join("."))
            }
        };
        let mut name: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.len() > 64 {
            name = format!("{}-{:08x}", &name[..55], fnv(raw.as_bytes()) as u32);
        }
        // A suffixed name may itself be taken (`login`, `login`, `login-2`):
        // count up until the candidate is free.
        let mut candidate = name.clone();
        let mut n = 1;
        while taken.contains(&candidate) {
            n += 1;
            let suffix = format!("-{n}");
            let mut base = name.clone();
            base.truncate(64 - suffix.len());
            candidate = format!("{base}{suffix}");
        }
        taken.insert(candidate.clone());
        b.doc.name = candidate;
    }
}

/// FNV-1a: a hash that stays the same across Rust versions (names must).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// For each sibling that takes requests from `b`'s descriptor in envoy:
/// either what envoy applies to them makes `b` harmless (at least as
/// strict, so `b` never refuses them), or a whitelist can exempt them, or
/// the difference is reported.
fn check_captures(
    b: &Built,
    leaves: &[Leaf<'_>],
    built: &[Built],
    mapping: &Mapping,
    report: &mut Report,
    allow: &mut Allow,
) {
    if b.shadow {
        return; // never refuses: applying it to more requests changes no verdict
    }
    let leaf = &leaves[b.leaf];
    for (level, (n, list)) in leaf.path.iter().zip(&leaf.lists).enumerate() {
        for (sibling, taken) in takers(n, list) {
            let lost = |report: &mut Report, why: String| {
                report.not_expressed(
                    &sibling.at,
                    format!(
                        "in envoy ratelimit, requests whose `{}` {} go to this descriptor instead of \
                         `{}` and {why}; quotaflow cannot exclude them, so `{}` counts and limits them too",
                        n.key,
                        taken.describe(),
                        leaf.describe(),
                        b.doc.name
                    ),
                );
            };
            let Some(twin) =
                counterpart(sibling, &leaf.path[level + 1..], &leaf.lists[level + 1..])
            else {
                lost(report, "meet no limit of the same depth".into());
                continue;
            };
            let Some(rl) = &twin.rate_limit else {
                lost(report, "meet no limit of the same depth".into());
                continue;
            };
            if rl.unlimited {
                let dim = mapping.dimension(&n.key);
                match (&taken, dim) {
                    (
                        Taken::Exact(v),
                        Some(d @ (Dimension::UserId | Dimension::ApiKey | Dimension::ClientIp)),
                    ) if whitelistable(d, v) => {
                        allow
                            .entry((d.as_str(), v.clone()))
                            .or_insert_with(|| (d, BTreeSet::new(), twin.at.clone()))
                            .1
                            .insert(b.doc.name.clone());
                    }
                    _ => lost(report, "are unlimited".into()),
                }
                continue;
            }
            let Some(other) = built
                .iter()
                .find(|o| std::ptr::eq(leaves[o.leaf].node(), twin))
            else {
                lost(
                    report,
                    "meet a limit this import could not express (reported above)".into(),
                );
                continue;
            };
            if other.shadow {
                lost(
                    report,
                    format!("meet only the shadow limit `{}`", other.doc.name),
                );
                continue;
            }
            let coarser = other.doc.key.iter().all(|d| b.doc.key.contains(d));
            if !(coarser && dominates(other, b)) {
                lost(
                    report,
                    format!(
                        "meet `{}` ({} a {}), which does not keep them within `{}` ({} a {})",
                        other.doc.name,
                        other.limit,
                        unit_name(other.window_s),
                        b.doc.name,
                        b.limit,
                        unit_name(b.window_s)
                    ),
                );
            }
        }
    }
}

/// A value the whitelist takes as written: an address for client_ip, and
/// no API key that would read as a fingerprint (`fp:...`).
fn whitelistable(d: Dimension, v: &str) -> bool {
    match d {
        Dimension::ClientIp => v.parse::<std::net::IpAddr>().is_ok(),
        Dimension::ApiKey => !v.starts_with("fp:"),
        _ => true,
    }
}

fn unit_name(seconds: u64) -> &'static str {
    [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ]
    .into_iter()
    .find(|u| u.seconds() == seconds)
    .map_or("window", Unit::name)
}

/// The node in `sibling`'s subtree at the place `rest` leads to below the
/// node it takes from, if every level below matches requests the same way
/// (the same keys and values, and no value taken there that `rest` lets
/// through).
fn counterpart<'a>(sibling: &'a Node, rest: &[&Node], lists: &[&[Node]]) -> Option<&'a Node> {
    let mut at = sibling;
    for (m, m_list) in rest.iter().zip(lists) {
        let next = at
            .descriptors
            .iter()
            .find(|c| c.key == m.key && c.value == m.value)?;
        let theirs: BTreeSet<Taken> = takers(next, &at.descriptors)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let ours: BTreeSet<Taken> = takers(m, m_list).into_iter().map(|(_, t)| t).collect();
        if !theirs.is_subset(&ours) {
            return None;
        }
        at = next;
    }
    Some(at)
}

/// Whether `strict` lets through at most what `loose` allows in any of
/// `loose`'s windows, both aligned to the epoch: then `loose` never refuses
/// a request `strict` admits.
fn dominates(strict: &Built, loose: &Built) -> bool {
    let (ws, wl) = (strict.window_s, loose.window_s);
    let windows = if wl % ws == 0 {
        wl / ws
    } else if ws % wl == 0 {
        1
    } else {
        wl.div_ceil(ws) + 1
    };
    strict.limit.saturating_mul(windows) <= loose.limit
}

/// `replaces`: envoy drops a named limit when a request also matches one
/// that replaces it; quotaflow applies both.
fn check_replaces(
    leaves: &[Leaf<'_>],
    built: &[Built],
    dead: &BTreeSet<usize>,
    report: &mut Report,
) {
    for (i, leaf) in leaves.iter().enumerate() {
        let Some(rl) = &leaf.node().rate_limit else {
            continue;
        };
        if rl.replaces.is_empty() || dead.contains(&i) {
            continue;
        }
        let mine = built.iter().find(|b| b.leaf == i);
        if !rl.unlimited && mine.is_none() {
            continue; // left out, reported already
        }
        for target in &rl.replaces {
            let replaced: Vec<&Built> = built
                .iter()
                .filter(|b| {
                    let l = &leaves[b.leaf];
                    b.leaf != i
                        && std::ptr::eq(l.domain, leaf.domain)
                        && l.node().rate_limit.as_ref().and_then(|r| r.name.as_deref())
                            == Some(target.as_str())
                })
                .collect();
            if replaced.is_empty() {
                report.note(
                    &rl.at,
                    format!(
                        "replaces `{target}`: no limit of domain {} has that name; no effect",
                        leaf.domain.name
                    ),
                );
                continue;
            }
            for r in replaced {
                if mine.is_some_and(|m| disjoint(&m.doc, &r.doc)) || r.shadow {
                    continue;
                }
                let what = match mine {
                    Some(m) => format!("`{}`", m.doc.name),
                    None => format!("the unlimited `{}`", leaf.describe()),
                };
                report.not_expressed(
                    &rl.at,
                    format!(
                        "replaces `{target}`: when one request carries both descriptors, envoy ratelimit \
                         applies {what} instead of `{}`; quotaflow has no replaces and applies both",
                        r.doc.name
                    ),
                );
            }
        }
    }
}

/// Two limits no request can match both of (different fixed paths or methods).
fn disjoint(a: &LimitDoc, b: &LimitDoc) -> bool {
    let (Some(ma), Some(mb)) = (&a.matcher, &b.matcher) else {
        return false;
    };
    let paths = matches!((&ma.path, &mb.path), (Some(x), Some(y)) if x != y);
    let methods = match (&ma.method, &mb.method) {
        (Some(OneOrMany::One(x)), Some(OneOrMany::One(y))) => !x.eq_ignore_ascii_case(y),
        _ => false,
    };
    paths || methods
}

impl Report {
    pub(super) fn note(&mut self, at: &Loc, message: impl Into<String>) {
        self.items.push(Item {
            kind: Kind::Note,
            at: at.clone(),
            message: message.into(),
        });
    }

    pub(super) fn not_expressed(&mut self, at: &Loc, message: impl Into<String>) {
        self.items.push(Item {
            kind: Kind::NotExpressed,
            at: at.clone(),
            message: message.into(),
        });
    }
}
