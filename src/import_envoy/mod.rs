//! `quotaflow import-envoy`: envoyproxy/ratelimit config files (one domain
//! each, nested descriptors) to a quotaflow rate-limit document, with a
//! report of what quotaflow cannot express. No I/O beyond what the caller
//! hands in; docs/envoy-import.md is the user's side of this module.

mod convert;
mod yaml;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;

use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::rules::{Dimension, Rules, RulesDoc, MAX_LIMITS};

pub use yaml::{Domain, ImportError, Loc, Node, RateLimit, Unit};

/// Descriptor keys quotaflow knows without `--map`, looked up in lower case.
/// They are the names envoy's actions and common configs give these fields
/// (`remote_address` is what envoy's remote_address action sends).
pub const DEFAULT_KEYS: &[(&str, Dimension)] = &[
    ("remote_address", Dimension::ClientIp),
    ("client_ip", Dimension::ClientIp),
    ("user_id", Dimension::UserId),
    ("user", Dimension::UserId),
    ("x-user-id", Dimension::UserId),
    ("api_key", Dimension::ApiKey),
    ("x-api-key", Dimension::ApiKey),
    ("path", Dimension::Path),
    (":path", Dimension::Path),
    ("method", Dimension::Method),
    (":method", Dimension::Method),
    ("http_method", Dimension::Method),
];

/// Which quotaflow dimension a descriptor key stands for.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    /// From `--map`: exact key to a dimension, or `None` to unmap a default.
    given: HashMap<String, Option<Dimension>>,
}

impl Mapping {
    /// Adds `KEY=DIMENSION` (`KEY=none` unmaps a default key).
    pub fn add(&mut self, spec: &str) -> Result<(), ImportError> {
        let Some((key, dim)) = spec.rsplit_once('=') else {
            return Err(ImportError::Refused(format!(
                "--map `{spec}`: expected KEY=DIMENSION"
            )));
        };
        let dim = match dim {
            "user_id" => Some(Dimension::UserId),
            "api_key" => Some(Dimension::ApiKey),
            "client_ip" => Some(Dimension::ClientIp),
            "method" => Some(Dimension::Method),
            "path" => Some(Dimension::Path),
            "none" => None,
            other => {
                return Err(ImportError::Refused(format!(
                "--map `{spec}`: unknown dimension `{other}`; expected one of user_id, api_key, \
                     client_ip, method, path, none"
            )))
            }
        };
        if key.is_empty() {
            return Err(ImportError::Refused(format!(
                "--map `{spec}`: the descriptor key is empty"
            )));
        }
        self.given.insert(key.to_owned(), dim);
        Ok(())
    }

    pub fn dimension(&self, key: &str) -> Option<Dimension> {
        if let Some(d) = self.given.get(key) {
            return *d;
        }
        let lower = key.to_ascii_lowercase();
        DEFAULT_KEYS
            .iter()
            .find(|(k, _)| *k == lower)
            .map(|(_, d)| *d)
    }
}

/// How much an item of the report matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Envoy ratelimit would decide some requests differently.
    NotExpressed,
    /// Worth knowing; no verdict changes.
    Note,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub kind: Kind,
    pub at: Loc,
    pub message: String,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::NotExpressed => "not expressed",
            Kind::Note => "note",
        };
        write!(f, "{}: {kind}: {}", self.at, self.message)
    }
}

/// What did not carry over, and notes.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    /// Whether every limit, value and flag was carried over.
    pub fn complete(&self) -> bool {
        self.items.iter().all(|i| i.kind == Kind::Note)
    }

    pub fn missing(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| i.kind == Kind::NotExpressed)
    }
}

/// An imported config.
pub struct Import {
    pub doc: RulesDoc,
    pub report: Report,
    /// Where each limit of `doc` came from, in order.
    pub origins: Vec<String>,
    pub files: Vec<String>,
}

/// Imports `files` (name and contents), one domain each as envoy ratelimit
/// loads them; two files of one domain are refused, as envoy does by
/// default.
pub fn import(files: &[(String, String)], mapping: &Mapping) -> Result<Import, ImportError> {
    let mut report = Report::default();
    let mut domains: Vec<Domain> = Vec::new();
    for (name, text) in files {
        let (domain, notes) = yaml::parse(name, text)?;
        for (at, message) in notes {
            report.note(&at, message);
        }
        if let Some(first) = domains.iter().find(|d| d.name == domain.name) {
            return Err(ImportError::Invalid {
                at: domain.at.clone(),
                message: format!(
                    "domain `{}` again (first in {}); envoy ratelimit refuses a second file of one \
                     domain unless MERGE_DOMAIN_CONFIG is set: merge the files first",
                    domain.name, first.at.file
                ),
            });
        }
        domains.push(domain);
    }
    let converted = convert::convert(&domains, mapping, report);
    if converted.doc.limits.len() > MAX_LIMITS {
        return Err(ImportError::Refused(format!(
            "{} limits: a quotaflow config holds at most {MAX_LIMITS} (every request is matched \
             against all of them)",
            converted.doc.limits.len()
        )));
    }
    // The output must be a config quotaflow accepts; anything else is a bug here.
    Rules::compile(converted.doc.clone(), 1, &Fingerprinter::random())
        .map_err(|e| ImportError::Internal(e.to_string()))?;
    Ok(Import {
        doc: converted.doc,
        report: converted.report,
        origins: converted.origins,
        files: files.iter().map(|(n, _)| n.clone()).collect(),
    })
}

impl Import {
    /// 0 when everything was expressed, 2 when some part was not.
    pub fn exit_code(&self) -> u8 {
        if self.report.complete() {
            0
        } else {
            2
        }
    }

    /// The rate-limit document as JSON: the body of `POST /rate_limit/config`,
    /// and a settings file for `quotaflow serve --config x.json`.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.doc).unwrap_or_default();
        s.push('\n');
        s
    }

    /// A TOML settings file for `quotaflow serve --config` and
    /// `check-config`: the limits and whitelist, each limit under a comment
    /// naming its envoy descriptor, the report's unexpressed parts on top.
    pub fn to_toml(&self) -> Result<String, ImportError> {
        let body = toml::to_string(&self.doc).map_err(|e| ImportError::Internal(e.to_string()))?;
        let mut out = String::new();
        out.push_str("# Imported from envoy ratelimit config by `quotaflow import-envoy`:\n");
        for f in &self.files {
            out.push_str(&format!("#   {f}\n"));
        }
        out.push_str("# Fixed windows aligned to the Unix epoch, as envoy ratelimit's (docs/envoy-import.md).\n");
        let missing: Vec<&Item> = self.report.missing().collect();
        if missing.is_empty() {
            out.push_str("# Everything was expressed.\n");
        } else {
            out.push_str(
                "# NOT EXPRESSED (envoy ratelimit would decide some requests differently):\n",
            );
            for i in missing {
                out.push_str(&format!("#   {}: {}\n", i.at, i.message));
            }
        }
        out.push('\n');
        // Array-of-tables headers are the only such lines unless a string
        // spans lines: then no comments rather than misplaced ones.
        let headers = body.lines().filter(|l| *l == "[[limits]]").count();
        let mut next = self.origins.iter().take(if headers == self.origins.len() {
            headers
        } else {
            0
        });
        for line in body.lines() {
            if line == "[[limits]]" {
                if let Some(o) = next.next() {
                    out.push_str(&format!("# {o}\n"));
                }
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }
}
