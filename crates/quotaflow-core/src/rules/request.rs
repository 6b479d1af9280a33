//! A request to be rate limited, in the shared vocabulary.

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{Dimension, KEY_SEP};
use crate::fingerprint::Fingerprinter;

/// Longest accepted value of any request field, so one client cannot grow
/// the state store with megabyte keys.
pub const MAX_FIELD_LEN: usize = 1024;
/// Largest accepted cost of one request.
pub const MAX_COST: u64 = 1_000_000_000;

/// The fields a limit can key or match on, plus the request's cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Units this request consumes; 0 asks without consuming.
    #[serde(default = "one")]
    pub cost: u64,
}

fn one() -> u64 {
    1
}

impl Default for Request {
    fn default() -> Self {
        Self {
            user_id: None,
            api_key: None,
            client_ip: None,
            method: None,
            path: None,
            cost: 1,
        }
    }
}

/// Why a request cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("a request needs at least one of user_id, api_key, client_ip, method, path")]
    Empty,
    #[error("{field} must be at most {MAX_FIELD_LEN} characters")]
    TooLong { field: &'static str },
    #[error("{field} must not contain control characters")]
    ControlCharacter { field: &'static str },
    #[error("cost must be at most {MAX_COST}")]
    CostTooHigh,
    /// An empty id is no identity: every request sending one would share
    /// one bucket.
    #[error("{field} must not be empty (leave it out instead)")]
    EmptyField { field: &'static str },
}

impl Request {
    /// Bring `path` to its canonical form (`rules::path`), as every limit
    /// matches and keys it; allocates only for a path not already in it.
    pub fn canonicalize_path(&mut self, case_sensitive: bool) {
        if let Some(p) = &self.path {
            if let std::borrow::Cow::Owned(c) = super::path::canonical_path(p, case_sensitive) {
                self.path = Some(c);
            }
        }
    }

    /// Check the limits the sidecar and the processor enforce on any input.
    pub fn validate(&self) -> Result<(), RequestError> {
        let texts = [
            ("user_id", &self.user_id),
            ("api_key", &self.api_key),
            ("method", &self.method),
            ("path", &self.path),
        ];
        if texts.iter().all(|(_, v)| v.is_none()) && self.client_ip.is_none() {
            return Err(RequestError::Empty);
        }
        for (field, value) in texts {
            let Some(v) = value else { continue };
            if v.is_empty() {
                return Err(RequestError::EmptyField { field });
            }
            // Characters, not bytes (so the OpenAPI schema can say it); a
            // field short in bytes is short in characters.
            if v.len() > MAX_FIELD_LEN && v.chars().count() > MAX_FIELD_LEN {
                return Err(RequestError::TooLong { field });
            }
            if has_control(v) {
                return Err(RequestError::ControlCharacter { field });
            }
        }
        if self.cost > MAX_COST {
            return Err(RequestError::CostTooHigh);
        }
        Ok(())
    }

    pub fn has(&self, dim: Dimension) -> bool {
        match dim {
            Dimension::UserId => self.user_id.is_some(),
            Dimension::ApiKey => self.api_key.is_some(),
            Dimension::ClientIp => self.client_ip.is_some(),
            Dimension::Method => self.method.is_some(),
            Dimension::Path => self.path.is_some(),
        }
    }

    /// Append the value of `dim` as outputs (decisions, alerts) show it:
    /// API keys as fingerprints, never in clear.
    pub fn write_dimension(&self, dim: Dimension, fp: &Fingerprinter, out: &mut String) {
        match dim {
            Dimension::ApiKey => {
                fp.write_hex(self.api_key.as_deref().unwrap_or_default().as_bytes(), out)
            }
            _ => self.write_key_part(dim, out),
        }
    }

    /// Append the value of `dim` as it goes into the text a state key's id
    /// is hashed from. API keys go in as they are: the text is hashed under
    /// the secret and dropped, so fingerprinting them first would only add a
    /// second hash per request.
    pub fn write_key_part(&self, dim: Dimension, out: &mut String) {
        match dim {
            Dimension::UserId => out.push_str(self.user_id.as_deref().unwrap_or_default()),
            Dimension::ApiKey => out.push_str(self.api_key.as_deref().unwrap_or_default()),
            Dimension::ClientIp => match self.client_ip {
                // The common case, written without `fmt` (hot: every
                // per-IP key); same text as `Display`.
                Some(IpAddr::V4(ip)) => {
                    for (i, octet) in ip.octets().into_iter().enumerate() {
                        if i > 0 {
                            out.push('.');
                        }
                        push_decimal(out, octet);
                    }
                }
                Some(ip) => {
                    let _ = write!(out, "{ip}");
                }
                None => {}
            },
            Dimension::Method => {
                for c in self.method.as_deref().unwrap_or_default().chars() {
                    out.push(c.to_ascii_uppercase());
                }
            }
            Dimension::Path => out.push_str(self.path.as_deref().unwrap_or_default()),
        }
        debug_assert!(!out.ends_with(KEY_SEP));
    }
}

/// `text.chars().any(char::is_control)`, byte by byte for ASCII text (every
/// request is checked, and its fields are nearly always ASCII).
fn has_control(text: &str) -> bool {
    if text.is_ascii() {
        text.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        text.chars().any(char::is_control)
    }
}

fn push_decimal(out: &mut String, n: u8) {
    if n >= 100 {
        out.push(char::from(b'0' + n / 100));
    }
    if n >= 10 {
        out.push(char::from(b'0' + n / 10 % 10));
    }
    out.push(char::from(b'0' + n % 10));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_read_as_display_writes_them() {
        let fp = Fingerprinter::from_secret("t");
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.255",
            "192.168.1.9",
            "255.255.255.255",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let req = Request {
                client_ip: Some(ip),
                ..Request::default()
            };
            let mut out = String::new();
            req.write_dimension(Dimension::ClientIp, &fp, &mut out);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(Request::default().validate(), Err(RequestError::Empty));
        let r = Request {
            user_id: Some("a\u{1f}b".into()),
            ..Request::default()
        };
        assert_eq!(
            r.validate(),
            Err(RequestError::ControlCharacter { field: "user_id" })
        );
        let r = Request {
            path: Some("/".repeat(MAX_FIELD_LEN + 1)),
            ..Request::default()
        };
        assert_eq!(r.validate(), Err(RequestError::TooLong { field: "path" }));
        let r = Request {
            path: Some("/x".into()),
            cost: MAX_COST + 1,
            ..Request::default()
        };
        assert_eq!(r.validate(), Err(RequestError::CostTooHigh));
    }

    #[test]
    fn control_characters_are_found_in_ascii_and_beyond() {
        for c in (0..=0x10ffffu32)
            .filter_map(char::from_u32)
            .step_by(7)
            .chain(['\u{7f}', '\u{85}', '\u{9f}', '\u{a0}', '\u{1f}', ' '])
        {
            let text = format!("a{c}b");
            assert_eq!(has_control(&text), c.is_control(), "{:?}", c);
        }
        assert!(!has_control("/orders/42?q=x"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<Request>(r#"{"usr_id": "a"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `usr_id`"));
    }
}

#[cfg(test)]
mod vocabulary {
    /// The Avro request event and the sync `/check` body share one vocabulary:
    /// every field a check accepts must exist, with the same name, in the
    /// request event schema gateways publish.
    #[test]
    fn check_fields_match_the_request_event_schema() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../../schemas/request_event.avsc")).unwrap();
        let names: Vec<&str> = schema["fields"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["name"].as_str())
            .collect();
        let full = super::Request {
            user_id: Some("u".into()),
            api_key: Some("k".into()),
            client_ip: Some("10.0.0.1".parse().unwrap()),
            method: Some("GET".into()),
            path: Some("/".into()),
            cost: 2,
        };
        let json = serde_json::to_value(full).unwrap();
        for field in json.as_object().unwrap().keys() {
            assert!(
                names.contains(&field.as_str()),
                "`{field}` missing from request_event.avsc"
            );
        }
    }
}
