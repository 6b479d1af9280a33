//! Pipeline records to and from apache-avro's `Value` trees. Written by
//! hand rather than through serde: a record that does not fit gets a reason
//! naming the field and what was found there (`decision.until_ms: expected
//! a long, found a string`), which is what a dead letter's header carries
//! (docs/benchmarks.md compares the two on the hot path).

use apache_avro::types::Value;

use quotaflow_core::pipeline::records::{
    Action, BreachAlert, DecisionRecord, KeyPart, Offender, RequestEvent, Severity,
};

pub(super) fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

pub(super) fn opt_string(s: &Option<String>) -> Value {
    match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    }
}

fn dims_value(dims: &[KeyPart]) -> Value {
    Value::Array(
        dims.iter()
            .map(|d| {
                Value::Record(vec![
                    ("name".into(), string(&d.name)),
                    ("value".into(), string(&d.value)),
                ])
            })
            .collect(),
    )
}

pub(super) fn request_to_value(e: &RequestEvent) -> Value {
    Value::Record(vec![
        ("event_id".into(), string(&e.event_id)),
        (
            "timestamp_ms".into(),
            Value::TimestampMillis(e.timestamp_ms),
        ),
        ("user_id".into(), opt_string(&e.user_id)),
        ("api_key".into(), opt_string(&e.api_key)),
        ("client_ip".into(), opt_string(&e.client_ip)),
        ("method".into(), opt_string(&e.method)),
        ("path".into(), opt_string(&e.path)),
        ("cost".into(), Value::Long(e.cost)),
        ("gateway_id".into(), opt_string(&e.gateway_id)),
    ])
}

fn action_symbol(a: Action) -> (u32, &'static str) {
    match a {
        Action::Block => (0, "BLOCK"),
        Action::Unblock => (1, "UNBLOCK"),
        Action::Allow => (2, "ALLOW"),
        Action::Deny => (3, "DENY"),
    }
}

fn severity_symbol(s: Severity) -> (u32, &'static str) {
    match s {
        Severity::Warning => (0, "WARNING"),
        Severity::Critical => (1, "CRITICAL"),
    }
}

pub(super) fn decision_to_value(d: &DecisionRecord) -> Value {
    let (index, symbol) = action_symbol(d.action);
    Value::Record(vec![
        ("decision_id".into(), string(&d.decision_id)),
        ("action".into(), Value::Enum(index, symbol.into())),
        ("limit".into(), string(&d.limit)),
        ("key".into(), string(&d.key)),
        ("dimensions".into(), dims_value(&d.dimensions)),
        (
            "until_ms".into(),
            match d.until_ms {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(ms) => Value::Union(1, Box::new(Value::TimestampMillis(ms))),
            },
        ),
        ("reason".into(), string(&d.reason)),
        ("quota".into(), Value::Long(d.quota)),
        (
            "event_time_ms".into(),
            Value::TimestampMillis(d.event_time_ms),
        ),
        ("source_topic".into(), string(&d.source_topic)),
        ("source_partition".into(), Value::Int(d.source_partition)),
        ("source_offset".into(), Value::Long(d.source_offset)),
        ("config_version".into(), Value::Long(d.config_version)),
    ])
}

pub(super) fn alert_to_value(a: &BreachAlert) -> Value {
    let (index, symbol) = severity_symbol(a.severity);
    Value::Record(vec![
        ("alert_id".into(), string(&a.alert_id)),
        ("limit".into(), string(&a.limit)),
        ("key".into(), string(&a.key)),
        ("dimensions".into(), dims_value(&a.dimensions)),
        ("shadow".into(), Value::Boolean(a.shadow)),
        (
            "window_start_ms".into(),
            Value::TimestampMillis(a.window_start_ms),
        ),
        (
            "window_end_ms".into(),
            Value::TimestampMillis(a.window_end_ms),
        ),
        ("refused".into(), Value::Long(a.refused)),
        ("refused_cost".into(), Value::Long(a.refused_cost)),
        (
            "first_seen_ms".into(),
            Value::TimestampMillis(a.first_seen_ms),
        ),
        (
            "last_seen_ms".into(),
            Value::TimestampMillis(a.last_seen_ms),
        ),
        ("severity".into(), Value::Enum(index, symbol.into())),
        (
            "top_offenders".into(),
            Value::Array(
                a.top_offenders
                    .iter()
                    .map(|o| {
                        Value::Record(vec![
                            ("dimension".into(), string(&o.dimension)),
                            ("value".into(), string(&o.value)),
                            ("count".into(), Value::Long(o.count)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("source_topic".into(), string(&a.source_topic)),
        ("source_partition".into(), Value::Int(a.source_partition)),
        ("source_offset".into(), Value::Long(a.source_offset)),
    ])
}

// ---------------------------------------------------------------------------
// Values to records. The decoded value has the reader schema's shape, so a
// mismatch here means a schema and this mapping disagree; it is reported,
// never panicked on. Values are moved out, strings are not copied.

pub(super) type Fields = Vec<(String, Value)>;

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Boolean(_) => "boolean",
        Value::Int(_) => "int",
        Value::Long(_) => "long",
        Value::String(_) => "string",
        Value::Enum(..) => "enum",
        Value::Union(..) => "union",
        Value::Array(_) => "array",
        Value::Record(_) => "record",
        Value::TimestampMillis(_) => "timestamp-millis",
        _ => "another type",
    }
}

fn wrong(field: &str, expected: &str, found: &Value) -> String {
    format!(
        "field `{field}`: expected {expected}, found {}",
        kind(found)
    )
}

fn take_string(field: &str, v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(wrong(field, "string", &other)),
    }
}

fn take_long(field: &str, v: Value) -> Result<i64, String> {
    match v {
        Value::Long(n) | Value::TimestampMillis(n) => Ok(n),
        Value::Int(n) => Ok(i64::from(n)),
        other => Err(wrong(field, "long", &other)),
    }
}

fn take_int(field: &str, v: Value) -> Result<i32, String> {
    match v {
        Value::Int(n) => Ok(n),
        other => Err(wrong(field, "int", &other)),
    }
}

fn take_bool(field: &str, v: Value) -> Result<bool, String> {
    match v {
        Value::Boolean(b) => Ok(b),
        other => Err(wrong(field, "boolean", &other)),
    }
}

/// The branch of a `["null", T]` union: `None` for null.
fn take_optional(field: &str, v: Value) -> Result<Option<Value>, String> {
    match v {
        Value::Union(_, inner) => match *inner {
            Value::Null => Ok(None),
            inner => Ok(Some(inner)),
        },
        other => Err(wrong(field, "union", &other)),
    }
}

fn take_opt_string(field: &str, v: Value) -> Result<Option<String>, String> {
    take_optional(field, v)?
        .map(|inner| take_string(field, inner))
        .transpose()
}

fn take_opt_long(field: &str, v: Value) -> Result<Option<i64>, String> {
    take_optional(field, v)?
        .map(|inner| take_long(field, inner))
        .transpose()
}

fn take_symbol(field: &str, v: Value) -> Result<String, String> {
    match v {
        Value::Enum(_, symbol) => Ok(symbol),
        other => Err(wrong(field, "enum", &other)),
    }
}

fn take_array(field: &str, v: Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(wrong(field, "array", &other)),
    }
}

fn take_record(field: &str, v: Value) -> Result<Fields, String> {
    match v {
        Value::Record(fields) => Ok(fields),
        other => Err(wrong(field, "record", &other)),
    }
}

fn required<T>(field: &str, v: Option<T>) -> Result<T, String> {
    v.ok_or_else(|| format!("missing field `{field}`"))
}

fn take_dims(field: &str, v: Value) -> Result<Vec<KeyPart>, String> {
    take_array(field, v)?
        .into_iter()
        .map(|item| {
            let (mut name, mut value) = (None, None);
            for (f, v) in take_record(field, item)? {
                match f.as_str() {
                    "name" => name = Some(take_string("dimensions.name", v)?),
                    "value" => value = Some(take_string("dimensions.value", v)?),
                    _ => {}
                }
            }
            Ok(KeyPart {
                name: required("dimensions.name", name)?,
                value: required("dimensions.value", value)?,
            })
        })
        .collect()
}

fn take_offenders(field: &str, v: Value) -> Result<Vec<Offender>, String> {
    take_array(field, v)?
        .into_iter()
        .map(|item| {
            let (mut dimension, mut value, mut count) = (None, None, None);
            for (f, v) in take_record(field, item)? {
                match f.as_str() {
                    "dimension" => dimension = Some(take_string("top_offenders.dimension", v)?),
                    "value" => value = Some(take_string("top_offenders.value", v)?),
                    "count" => count = Some(take_long("top_offenders.count", v)?),
                    _ => {}
                }
            }
            Ok(Offender {
                dimension: required("top_offenders.dimension", dimension)?,
                value: required("top_offenders.value", value)?,
                count: required("top_offenders.count", count)?,
            })
        })
        .collect()
}

pub(super) fn request_from_fields(fields: Fields) -> Result<RequestEvent, String> {
    let mut event_id = None;
    let mut timestamp_ms = None;
    let mut user_id = None;
    let mut api_key = None;
    let mut client_ip = None;
    let mut method = None;
    let mut path = None;
    let mut cost = None;
    let mut gateway_id = None;
    for (name, v) in fields {
        let f = name.as_str();
        match f {
            "event_id" => event_id = Some(take_string(f, v)?),
            "timestamp_ms" => timestamp_ms = Some(take_long(f, v)?),
            "user_id" => user_id = Some(take_opt_string(f, v)?),
            "api_key" => api_key = Some(take_opt_string(f, v)?),
            "client_ip" => client_ip = Some(take_opt_string(f, v)?),
            "method" => method = Some(take_opt_string(f, v)?),
            "path" => path = Some(take_opt_string(f, v)?),
            "cost" => cost = Some(take_long(f, v)?),
            "gateway_id" => gateway_id = Some(take_opt_string(f, v)?),
            _ => {}
        }
    }
    Ok(RequestEvent {
        event_id: required("event_id", event_id)?,
        timestamp_ms: required("timestamp_ms", timestamp_ms)?,
        user_id: required("user_id", user_id)?,
        api_key: required("api_key", api_key)?,
        client_ip: required("client_ip", client_ip)?,
        method: required("method", method)?,
        path: required("path", path)?,
        cost: required("cost", cost)?,
        gateway_id: required("gateway_id", gateway_id)?,
    })
}

pub(super) fn decision_from_fields(fields: Fields) -> Result<DecisionRecord, String> {
    let mut decision_id = None;
    let mut action = None;
    let mut limit = None;
    let mut key = None;
    let mut dimensions = None;
    let mut until_ms = None;
    let mut reason = None;
    let mut quota = None;
    let mut event_time_ms = None;
    let mut source_topic = None;
    let mut source_partition = None;
    let mut source_offset = None;
    let mut config_version = None;
    for (name, v) in fields {
        let f = name.as_str();
        match f {
            "decision_id" => decision_id = Some(take_string(f, v)?),
            "action" => {
                action = Some(match take_symbol(f, v)?.as_str() {
                    "BLOCK" => Action::Block,
                    "UNBLOCK" => Action::Unblock,
                    "ALLOW" => Action::Allow,
                    "DENY" => Action::Deny,
                    other => return Err(format!("field `action`: unknown symbol `{other}`")),
                })
            }
            "limit" => limit = Some(take_string(f, v)?),
            "key" => key = Some(take_string(f, v)?),
            "dimensions" => dimensions = Some(take_dims(f, v)?),
            "until_ms" => until_ms = Some(take_opt_long(f, v)?),
            "reason" => reason = Some(take_string(f, v)?),
            "quota" => quota = Some(take_long(f, v)?),
            "event_time_ms" => event_time_ms = Some(take_long(f, v)?),
            "source_topic" => source_topic = Some(take_string(f, v)?),
            "source_partition" => source_partition = Some(take_int(f, v)?),
            "source_offset" => source_offset = Some(take_long(f, v)?),
            "config_version" => config_version = Some(take_long(f, v)?),
            _ => {}
        }
    }
    Ok(DecisionRecord {
        decision_id: required("decision_id", decision_id)?,
        action: required("action", action)?,
        limit: required("limit", limit)?,
        key: required("key", key)?,
        dimensions: required("dimensions", dimensions)?,
        until_ms: required("until_ms", until_ms)?,
        reason: required("reason", reason)?,
        quota: required("quota", quota)?,
        event_time_ms: required("event_time_ms", event_time_ms)?,
        source_topic: required("source_topic", source_topic)?,
        source_partition: required("source_partition", source_partition)?,
        source_offset: required("source_offset", source_offset)?,
        config_version: required("config_version", config_version)?,
    })
}

pub(super) fn alert_from_fields(fields: Fields) -> Result<BreachAlert, String> {
    let mut alert_id = None;
    let mut limit = None;
    let mut key = None;
    let mut dimensions = None;
    let mut shadow = None;
    let mut window_start_ms = None;
    let mut window_end_ms = None;
    let mut refused = None;
    let mut refused_cost = None;
    let mut first_seen_ms = None;
    let mut last_seen_ms = None;
    let mut severity = None;
    let mut top_offenders = None;
    let mut source_topic = None;
    let mut source_partition = None;
    let mut source_offset = None;
    for (name, v) in fields {
        let f = name.as_str();
        match f {
            "alert_id" => alert_id = Some(take_string(f, v)?),
            "limit" => limit = Some(take_string(f, v)?),
            "key" => key = Some(take_string(f, v)?),
            "dimensions" => dimensions = Some(take_dims(f, v)?),
            "shadow" => shadow = Some(take_bool(f, v)?),
            "window_start_ms" => window_start_ms = Some(take_long(f, v)?),
            "window_end_ms" => window_end_ms = Some(take_long(f, v)?),
            "refused" => refused = Some(take_long(f, v)?),
            "refused_cost" => refused_cost = Some(take_long(f, v)?),
            "first_seen_ms" => first_seen_ms = Some(take_long(f, v)?),
            "last_seen_ms" => last_seen_ms = Some(take_long(f, v)?),
            "severity" => {
                severity = Some(match take_symbol(f, v)?.as_str() {
                    "WARNING" => Severity::Warning,
                    "CRITICAL" => Severity::Critical,
                    other => return Err(format!("field `severity`: unknown symbol `{other}`")),
                })
            }
            "top_offenders" => top_offenders = Some(take_offenders(f, v)?),
            "source_topic" => source_topic = Some(take_string(f, v)?),
            "source_partition" => source_partition = Some(take_int(f, v)?),
            "source_offset" => source_offset = Some(take_long(f, v)?),
            _ => {}
        }
    }
    Ok(BreachAlert {
        alert_id: required("alert_id", alert_id)?,
        limit: required("limit", limit)?,
        key: required("key", key)?,
        dimensions: required("dimensions", dimensions)?,
        shadow: required("shadow", shadow)?,
        window_start_ms: required("window_start_ms", window_start_ms)?,
        window_end_ms: required("window_end_ms", window_end_ms)?,
        refused: required("refused", refused)?,
        refused_cost: required("refused_cost", refused_cost)?,
        first_seen_ms: required("first_seen_ms", first_seen_ms)?,
        last_seen_ms: required("last_seen_ms", last_seen_ms)?,
        severity: required("severity", severity)?,
        top_offenders: required("top_offenders", top_offenders)?,
        source_topic: required("source_topic", source_topic)?,
        source_partition: required("source_partition", source_partition)?,
        source_offset: required("source_offset", source_offset)?,
    })
}
