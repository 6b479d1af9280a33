//! Avro encoding of the pipeline records (`schemas/*.avsc`).
//!
//! Two framings are supported (see [`Encoding`]): Avro single-object
//! encoding, self-describing through the Rabin fingerprint of the writer
//! schema, and the Confluent wire format with configured schema ids.
//!
//! Decoding is on the hot path and reads untrusted bytes. The schemas are
//! parsed once per process; each message is decoded into an
//! [`apache_avro::types::Value`] with the writer schema (resolved to the
//! current reader schema when it was written with an older one) and mapped by
//! hand into the record struct. Anything malformed — empty, oversized, bad
//! header, unknown schema, truncated, trailing bytes, wrong shapes — is a
//! [`DecodeError`] whose `Display` is a one-line reason fit for the
//! dead-letter header, never a panic.
//!
//! Schema evolution: request events written with any schema kept in
//! `schemas/history/` decode with the current schema, fields added since then
//! taking their defaults. See `schemas/README.md` for the rules.

mod fast;

use std::fmt;
use std::io::{self, Read};
use std::sync::OnceLock;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;

use crate::pipeline::records::{
    Action, BreachAlert, DecisionRecord, Dim, Offender, RequestEvent, Severity,
};

/// The current request event schema (`schemas/request_event.avsc`).
pub const REQUEST_EVENT_SCHEMA: &str = include_str!("../../schemas/request_event.avsc");
/// The current decision schema (`schemas/decision.avsc`).
pub const DECISION_SCHEMA: &str = include_str!("../../schemas/decision.avsc");
/// The current breach alert schema (`schemas/breach_alert.avsc`).
pub const BREACH_ALERT_SCHEMA: &str = include_str!("../../schemas/breach_alert.avsc");

/// Older request event writer schemas (`schemas/history/`), oldest first. The
/// single-object decoder recognises their fingerprints and resolves them to
/// the current schema. When the current schema changes, copy it here first.
const REQUEST_EVENT_HISTORY: &[&str] =
    &[include_str!("../../schemas/history/request_event.v0.avsc")];

/// Messages longer than this are refused before decoding.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Process-wide cap on what apache-avro allocates for one length read from
/// the input (a string, or an array block), set on the first [`Codec::new`].
/// Garbage can claim any length; the library's default cap is 512 MiB.
pub const MAX_ALLOCATION_BYTES: usize = 10 * 1024 * 1024;

/// Single-object encoding marker.
const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const SINGLE_OBJECT_HEADER_LEN: usize = 10;
const CONFLUENT_MAGIC: u8 = 0;
const CONFLUENT_HEADER_LEN: usize = 5;

/// How records are framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// Avro single-object encoding: 0xC3 0x01, 8-byte little-endian
    /// CRC-64-AVRO (Rabin) fingerprint of the writer schema's canonical form,
    /// then the binary body. Needs no registry.
    SingleObject,
    /// Confluent wire format: byte 0, 4-byte big-endian schema id, then the
    /// binary body. The ids are the ones the shop's schema registry assigned
    /// to our schemas (configured, no registry call).
    Confluent {
        request_event_id: u32,
        decision_id: u32,
        breach_alert_id: u32,
    },
}

/// Identifies the writer schema of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterSchema {
    /// Rabin fingerprint of the canonical form, as the 64-bit number whose
    /// little-endian bytes follow the single-object marker.
    Fingerprint(u64),
    /// Confluent schema registry id.
    Id(u32),
}

impl fmt::Display for WriterSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriterSchema::Fingerprint(fp) => write!(f, "Rabin fingerprint {fp:#018x}"),
            WriterSchema::Id(id) => write!(f, "schema id {id}"),
        }
    }
}

/// Why a message could not be decoded. `Display` is a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message of {len} bytes exceeds the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("bad header: {0}")]
    BadHeader(String),
    #[error("unknown writer schema for {record}: {schema}")]
    UnknownSchema {
        record: &'static str,
        schema: WriterSchema,
    },
    /// The Avro body is truncated, malformed or followed by extra bytes.
    #[error("malformed {record} body: {reason}")]
    Body {
        record: &'static str,
        reason: String,
    },
    /// Well-formed Avro that does not map onto the record.
    #[error("invalid {record}: {reason}")]
    Invalid {
        record: &'static str,
        reason: String,
    },
}

/// Why a record could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("avro encoding of {record} failed: {reason}")]
    Avro {
        record: &'static str,
        reason: String,
    },
    #[error("encoded {record} of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        record: &'static str,
        len: usize,
        max: usize,
    },
}

/// The parsed schemas, once per process (they are compile-time constants).
/// `'static` so the datum readers and writers, which borrow their schemas,
/// can live in a [`Codec`].
struct Schemas {
    request: Schema,
    request_history: Vec<Schema>,
    decision: Schema,
    alert: Schema,
}

static SCHEMAS: OnceLock<Schemas> = OnceLock::new();

fn schemas() -> Result<&'static Schemas, apache_avro::Error> {
    if let Some(schemas) = SCHEMAS.get() {
        return Ok(schemas);
    }
    let parsed = Schemas {
        request: Schema::parse_str(REQUEST_EVENT_SCHEMA)?,
        request_history: REQUEST_EVENT_HISTORY
            .iter()
            .map(|text| Schema::parse_str(text))
            .collect::<Result<_, _>>()?,
        decision: Schema::parse_str(DECISION_SCHEMA)?,
        alert: Schema::parse_str(BREACH_ALERT_SCHEMA)?,
    };
    // A concurrent first call may have won the race; its copy is identical.
    Ok(SCHEMAS.get_or_init(|| parsed))
}

/// The schema's Parsing Canonical Form as the Avro specification defines it.
///
/// apache-avro 0.22 strips `logicalType` but then leaves the primitive in its
/// object form (`{"type":"long"}` for a `timestamp-millis`), where the
/// specification and the Java, Python and Go implementations write `"long"`;
/// its fingerprints of our schemas would not match other producers'. In a
/// canonical form an object holding only `type` can only be a primitive (docs
/// and defaults are stripped, names and symbols cannot contain braces or
/// quotes), so replacing those objects by the bare name is exact.
fn canonical_form(schema: &Schema) -> String {
    const PRIMITIVES: [&str; 8] = [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ];
    let mut pcf = schema.canonical_form();
    for p in PRIMITIVES {
        let object = format!(r#"{{"type":"{p}"}}"#);
        if pcf.contains(&object) {
            pcf = pcf.replace(&object, &format!(r#""{p}""#));
        }
    }
    pcf
}

/// CRC-64-AVRO, the Rabin fingerprint of the specification.
fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    const TABLE: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut fp = i as u64;
            let mut j = 0;
            while j < 8 {
                fp = (fp >> 1) ^ (EMPTY & 0u64.wrapping_sub(fp & 1));
                j += 1;
            }
            table[i] = fp;
            i += 1;
        }
        table
    };
    let mut fp = EMPTY;
    for &b in data {
        fp = (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

/// The Rabin fingerprint of a schema's canonical form, as the number whose
/// little-endian bytes follow the single-object marker (Java's
/// `SchemaNormalization.parsingFingerprint64`).
pub fn fingerprint(schema: &Schema) -> u64 {
    crc64_avro(canonical_form(schema).as_bytes())
}

/// apache-avro's own fingerprint of the schema, which differs from
/// [`fingerprint`] for schemas with logical types (see [`canonical_form`]).
/// Accepted on decode so that data framed by apache-avro's single-object
/// writer reads too.
fn apache_avro_fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut le = [0u8; 8];
    for (dst, src) in le.iter_mut().zip(bytes) {
        *dst = src;
    }
    u64::from_le_bytes(le)
}

/// Encoder and decoders of one record type.
struct RecordCodec {
    record: &'static str,
    writer: GenericDatumWriter<'static>,
    header: Vec<u8>,
    /// Known writer schemas, by fingerprint (single object) or id
    /// (Confluent), the current one first.
    readers: Vec<(WriterSchema, GenericDatumReader<'static>)>,
}

impl RecordCodec {
    fn new(
        record: &'static str,
        confluent_id: Option<u32>,
        current: &'static Schema,
        history: &'static [Schema],
    ) -> Result<Self, apache_avro::Error> {
        let writer = GenericDatumWriter::builder(current).build()?;
        let mut readers = Vec::new();
        let header = match confluent_id {
            Some(id) => {
                readers.push((
                    WriterSchema::Id(id),
                    GenericDatumReader::builder(current).build()?,
                ));
                let mut header = vec![CONFLUENT_MAGIC];
                header.extend_from_slice(&id.to_be_bytes());
                header
            }
            None => {
                // Each known writer schema under its specification
                // fingerprint and under apache-avro's, if that differs.
                for (i, writer_schema) in std::iter::once(current).chain(history).enumerate() {
                    for fp in [
                        fingerprint(writer_schema),
                        apache_avro_fingerprint(writer_schema),
                    ] {
                        let key = WriterSchema::Fingerprint(fp);
                        if readers.iter().any(|(known, _)| *known == key) {
                            continue;
                        }
                        let reader = if i == 0 {
                            GenericDatumReader::builder(current).build()?
                        } else {
                            GenericDatumReader::builder(writer_schema)
                                .reader_schema(current)
                                .build()?
                        };
                        readers.push((key, reader));
                    }
                }
                let mut header = SINGLE_OBJECT_MAGIC.to_vec();
                header.extend_from_slice(&fingerprint(current).to_le_bytes());
                header
            }
        };
        Ok(RecordCodec {
            record,
            writer,
            header,
            readers,
        })
    }

    fn encode(&self, value: &Value) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&self.header);
        self.writer
            .write_value_ref(&mut out, value)
            .map_err(|e| EncodeError::Avro {
                record: self.record,
                reason: one_line(&e.to_string()),
            })?;
        if out.len() > MAX_MESSAGE_BYTES {
            return Err(EncodeError::TooLarge {
                record: self.record,
                len: out.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        Ok(out)
    }

    /// Header check, writer schema lookup, body decode; the fields of the
    /// record in the reader schema.
    fn decode(
        &self,
        encoding: &Encoding,
        bytes: &[u8],
    ) -> Result<Vec<(String, Value)>, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let (schema, body) = match encoding {
            Encoding::SingleObject => {
                let magic_len = bytes.len().min(SINGLE_OBJECT_MAGIC.len());
                if bytes[..magic_len] != SINGLE_OBJECT_MAGIC[..magic_len] {
                    let hint = if bytes[0] == CONFLUENT_MAGIC {
                        " (looks like the Confluent wire format)"
                    } else {
                        ""
                    };
                    return Err(DecodeError::BadHeader(format!(
                        "expected the Avro single-object marker c3 01, found {}{hint}",
                        hex(&bytes[..magic_len])
                    )));
                }
                if bytes.len() < SINGLE_OBJECT_HEADER_LEN {
                    return Err(DecodeError::BadHeader(format!(
                        "single-object header truncated: {} of {SINGLE_OBJECT_HEADER_LEN} bytes",
                        bytes.len()
                    )));
                }
                let mut fp = [0u8; 8];
                fp.copy_from_slice(&bytes[2..SINGLE_OBJECT_HEADER_LEN]);
                (
                    WriterSchema::Fingerprint(u64::from_le_bytes(fp)),
                    &bytes[SINGLE_OBJECT_HEADER_LEN..],
                )
            }
            Encoding::Confluent { .. } => {
                if bytes[0] != CONFLUENT_MAGIC {
                    let hint = if bytes[0] == SINGLE_OBJECT_MAGIC[0] {
                        " (looks like Avro single-object encoding)"
                    } else {
                        ""
                    };
                    return Err(DecodeError::BadHeader(format!(
                        "expected the Confluent magic byte 00, found {:02x}{hint}",
                        bytes[0]
                    )));
                }
                if bytes.len() < CONFLUENT_HEADER_LEN {
                    return Err(DecodeError::BadHeader(format!(
                        "Confluent header truncated: {} of {CONFLUENT_HEADER_LEN} bytes",
                        bytes.len()
                    )));
                }
                let mut id = [0u8; 4];
                id.copy_from_slice(&bytes[1..CONFLUENT_HEADER_LEN]);
                (
                    WriterSchema::Id(u32::from_be_bytes(id)),
                    &bytes[CONFLUENT_HEADER_LEN..],
                )
            }
        };
        let reader = self
            .readers
            .iter()
            .find(|(known, _)| *known == schema)
            .map(|(_, reader)| reader)
            .ok_or(DecodeError::UnknownSchema {
                record: self.record,
                schema,
            })?;

        let mut input = BodyReader {
            rest: body,
            eof: false,
        };
        let result = reader.read_value(&mut input);
        // apache-avro turns end of input inside a string or at a union index
        // into a null value instead of an error; the reader notices it.
        if input.eof {
            return Err(self.body_error(format!("truncated ({} body bytes)", body.len())));
        }
        let value = result.map_err(|e| self.body_error(one_line(&e.to_string())))?;
        if !input.rest.is_empty() {
            return Err(self.body_error(format!(
                "{} trailing bytes after the record",
                input.rest.len()
            )));
        }
        match value {
            Value::Record(fields) => Ok(fields),
            other => Err(self.invalid(format!("expected a record, found {}", kind(&other)))),
        }
    }

    fn body_error(&self, reason: String) -> DecodeError {
        DecodeError::Body {
            record: self.record,
            reason,
        }
    }

    fn invalid(&self, reason: String) -> DecodeError {
        DecodeError::Invalid {
            record: self.record,
            reason,
        }
    }
}

/// Encodes and decodes the pipeline records. Parses the schemas once; cheap
/// to share behind an `Arc`.
pub struct Codec {
    encoding: Encoding,
    request: RecordCodec,
    decision: RecordCodec,
    alert: RecordCodec,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("encoding", &self.encoding)
            .finish_non_exhaustive()
    }
}

impl Codec {
    /// A codec for `encoding`. Also caps apache-avro's per-length allocation
    /// at [`MAX_ALLOCATION_BYTES`] for the process (unless already set).
    pub fn new(encoding: Encoding) -> Result<Self, apache_avro::Error> {
        let cap = apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        if cap > MAX_ALLOCATION_BYTES {
            tracing::warn!(
                cap,
                wanted = MAX_ALLOCATION_BYTES,
                "apache-avro allocation cap was set elsewhere before the codec; garbage input may allocate up to the cap"
            );
        }
        let s = schemas()?;
        let [request_id, decision_id, alert_id] = match &encoding {
            Encoding::SingleObject => [None; 3],
            Encoding::Confluent {
                request_event_id,
                decision_id,
                breach_alert_id,
            } => [
                Some(*request_event_id),
                Some(*decision_id),
                Some(*breach_alert_id),
            ],
        };
        Ok(Codec {
            request: RecordCodec::new("RequestEvent", request_id, &s.request, &s.request_history)?,
            decision: RecordCodec::new("Decision", decision_id, &s.decision, &[])?,
            alert: RecordCodec::new("BreachAlert", alert_id, &s.alert, &[])?,
            encoding,
        })
    }

    pub fn encoding(&self) -> &Encoding {
        &self.encoding
    }

    pub fn encode_request(&self, e: &RequestEvent) -> Result<Vec<u8>, EncodeError> {
        self.request.encode(&request_to_value(e))
    }

    pub fn decode_request(&self, bytes: &[u8]) -> Result<RequestEvent, DecodeError> {
        let mut e = RequestEvent::default();
        self.decode_request_into(bytes, &mut e)?;
        Ok(e)
    }

    /// [`Codec::decode_request`] into `e`, reusing its buffers (the
    /// processor's per-event path). On an error `e` holds nothing useful.
    pub fn decode_request_into(
        &self,
        bytes: &[u8],
        e: &mut RequestEvent,
    ) -> Result<(), DecodeError> {
        // Written with the current schema: the specialised decoder, unless
        // it finds anything unusual (then the general path says what).
        if bytes.len() <= MAX_MESSAGE_BYTES {
            if let Some(body) = bytes.strip_prefix(self.request.header.as_slice()) {
                if fast::request_body_into(body, e).is_some() {
                    return Ok(());
                }
            }
        }
        *e = self.decode_request_generally(bytes)?;
        Ok(())
    }

    /// apache-avro's schema-resolving decode: every writer schema we know.
    fn decode_request_generally(&self, bytes: &[u8]) -> Result<RequestEvent, DecodeError> {
        let fields = self.request.decode(&self.encoding, bytes)?;
        request_from_fields(fields).map_err(|reason| self.request.invalid(reason))
    }

    pub fn encode_decision(&self, d: &DecisionRecord) -> Result<Vec<u8>, EncodeError> {
        self.decision.encode(&decision_to_value(d))
    }

    pub fn decode_decision(&self, bytes: &[u8]) -> Result<DecisionRecord, DecodeError> {
        let fields = self.decision.decode(&self.encoding, bytes)?;
        decision_from_fields(fields).map_err(|reason| self.decision.invalid(reason))
    }

    pub fn encode_alert(&self, a: &BreachAlert) -> Result<Vec<u8>, EncodeError> {
        self.alert.encode(&alert_to_value(a))
    }

    pub fn decode_alert(&self, bytes: &[u8]) -> Result<BreachAlert, DecodeError> {
        let fields = self.alert.decode(&self.encoding, bytes)?;
        alert_from_fields(fields).map_err(|reason| self.alert.invalid(reason))
    }
}

/// A slice reader that remembers whether the decoder ever wanted more bytes
/// than there were.
struct BodyReader<'a> {
    rest: &'a [u8],
    eof: bool,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.rest.is_empty() {
            self.eof = true;
            return Ok(0);
        }
        let n = buf.len().min(self.rest.len());
        let (head, tail) = self.rest.split_at(n);
        buf[..n].copy_from_slice(head);
        self.rest = tail;
        Ok(n)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > self.rest.len() {
            self.eof = true;
            self.rest = &[];
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let (head, tail) = self.rest.split_at(buf.len());
        buf.copy_from_slice(head);
        self.rest = tail;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Records to values (field order as in the schemas).

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn opt_string(s: &Option<String>) -> Value {
    match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    }
}

fn dims_value(dims: &[Dim]) -> Value {
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

fn request_to_value(e: &RequestEvent) -> Value {
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

fn decision_to_value(d: &DecisionRecord) -> Value {
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

fn alert_to_value(a: &BreachAlert) -> Value {
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

type Fields = Vec<(String, Value)>;

fn kind(v: &Value) -> &'static str {
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

fn take_dims(field: &str, v: Value) -> Result<Vec<Dim>, String> {
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
            Ok(Dim {
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

fn request_from_fields(fields: Fields) -> Result<RequestEvent, String> {
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

fn decision_from_fields(fields: Fields) -> Result<DecisionRecord, String> {
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

fn alert_from_fields(fields: Fields) -> Result<BreachAlert, String> {
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

// ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// An error text on one line, not too long for a Kafka header.
fn one_line(text: &str) -> String {
    const MAX: usize = 300;
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX)
        .collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema_compatibility::SchemaCompatibility;
    use std::time::Instant;

    const CONFLUENT: Encoding = Encoding::Confluent {
        request_event_id: 7,
        decision_id: 8,
        breach_alert_id: 0x0102_0304,
    };

    fn codecs() -> Vec<Codec> {
        vec![
            Codec::new(Encoding::SingleObject).unwrap(),
            Codec::new(CONFLUENT).unwrap(),
        ]
    }

    fn request() -> RequestEvent {
        RequestEvent {
            event_id: "gw-1:000042".into(),
            timestamp_ms: 1_718_000_000_123,
            user_id: Some("alice".into()),
            api_key: Some("sk_live_0123456789abcdef".into()),
            client_ip: Some("2001:db8::1".into()),
            method: Some("GET".into()),
            path: Some("/v1/orders/123".into()),
            cost: 3,
            gateway_id: Some("gw-eu-1".into()),
        }
    }

    /// Optional fields absent; `gateway_id`, the last field, is null.
    fn sparse_request() -> RequestEvent {
        RequestEvent {
            event_id: "é-ü-日本".into(),
            timestamp_ms: -5,
            user_id: None,
            api_key: None,
            client_ip: None,
            method: None,
            path: Some(String::new()),
            cost: 0,
            gateway_id: None,
        }
    }

    fn dims() -> Vec<Dim> {
        vec![
            Dim {
                name: "user_id".into(),
                value: "alice".into(),
            },
            Dim {
                name: "api_key".into(),
                value: "fp:1a2b3c".into(),
            },
        ]
    }

    fn decisions() -> Vec<DecisionRecord> {
        let block = DecisionRecord {
            decision_id: "requests:3:1200:decision:0".into(),
            action: Action::Block,
            limit: "per_user".into(),
            key: "per_user/user_id=alice".into(),
            dimensions: dims(),
            until_ms: Some(1_718_000_060_000),
            reason: "100 requests per 60s exceeded".into(),
            quota: 100,
            event_time_ms: 1_718_000_000_123,
            source_topic: "requests".into(),
            source_partition: 3,
            source_offset: 1200,
            config_version: 17,
        };
        let mut out = vec![block.clone()];
        for action in [Action::Unblock, Action::Allow, Action::Deny] {
            out.push(DecisionRecord {
                action,
                until_ms: None,
                dimensions: vec![],
                source_partition: i32::MIN,
                config_version: i64::MAX,
                ..block.clone()
            });
        }
        out
    }

    fn alerts() -> Vec<BreachAlert> {
        let alert = BreachAlert {
            alert_id: "requests:0:99:alert:1".into(),
            limit: "per_ip".into(),
            key: "per_ip/client_ip=10.0.0.1".into(),
            dimensions: dims(),
            shadow: true,
            window_start_ms: 1_718_000_000_000,
            window_end_ms: 1_718_000_060_000,
            refused: 5000,
            refused_cost: 5200,
            first_seen_ms: 1_718_000_000_001,
            last_seen_ms: 1_718_000_059_999,
            severity: Severity::Critical,
            top_offenders: vec![
                Offender {
                    dimension: "path".into(),
                    value: "/login".into(),
                    count: 4000,
                },
                Offender {
                    dimension: "method".into(),
                    value: "POST".into(),
                    count: 1000,
                },
            ],
            source_topic: "requests".into(),
            source_partition: 0,
            source_offset: 99,
        };
        let quiet = BreachAlert {
            shadow: false,
            severity: Severity::Warning,
            top_offenders: vec![],
            dimensions: vec![],
            ..alert.clone()
        };
        vec![alert, quiet]
    }

    /// Every valid encoding the tests have, with a decoder for it.
    #[allow(clippy::type_complexity)]
    fn samples(codec: &Codec) -> Vec<(Vec<u8>, Box<dyn Fn(&[u8]) -> bool + '_>)> {
        let mut out: Vec<(Vec<u8>, Box<dyn Fn(&[u8]) -> bool + '_>)> = Vec::new();
        for e in [request(), sparse_request()] {
            out.push((
                codec.encode_request(&e).unwrap(),
                Box::new(|b| codec.decode_request(b).is_ok()),
            ));
        }
        for d in decisions() {
            out.push((
                codec.encode_decision(&d).unwrap(),
                Box::new(|b| codec.decode_decision(b).is_ok()),
            ));
        }
        for a in alerts() {
            out.push((
                codec.encode_alert(&a).unwrap(),
                Box::new(|b| codec.decode_alert(b).is_ok()),
            ));
        }
        if codec.encoding() == &Encoding::SingleObject {
            for e in [request(), sparse_request()] {
                out.push((encode_v0(&e), Box::new(|b| codec.decode_request(b).is_ok())));
            }
        }
        out
    }

    #[test]
    fn round_trip_every_record_in_both_encodings() {
        for codec in codecs() {
            for e in [request(), sparse_request()] {
                let bytes = codec.encode_request(&e).unwrap();
                assert_eq!(codec.decode_request(&bytes).unwrap(), e);
            }
            for d in decisions() {
                let bytes = codec.encode_decision(&d).unwrap();
                assert_eq!(codec.decode_decision(&bytes).unwrap(), d);
            }
            for a in alerts() {
                let bytes = codec.encode_alert(&a).unwrap();
                assert_eq!(codec.decode_alert(&bytes).unwrap(), a);
            }
        }
    }

    #[test]
    fn crc64_avro_matches_the_specification_test_vectors() {
        // share/test/data/schema-tests.txt of the Avro project (signed i64).
        let vectors: [(&str, i64); 4] = [
            (r#""null""#, 7195948357588979594),
            (r#""long""#, -3434872931120570953),
            (
                r#"{"name":"foo","type":"fixed","size":15}"#,
                1756455273707447556,
            ),
            (
                r#"{"name":"PigValue","type":"record","fields":[{"name":"value","type":["null","int","long","PigValue"]}]}"#,
                -1759257747318642341,
            ),
        ];
        for (pcf, expected) in vectors {
            assert_eq!(crc64_avro(pcf.as_bytes()), expected as u64, "{pcf}");
        }
        // Without logical types apache-avro's canonical form is the
        // specification's, and so is its fingerprint.
        let plain = Schema::parse_str(
            r#"{"type":"record","name":"r","namespace":"n","doc":"d","fields":[
                {"name":"a","type":{"type":"long"},"default":1},
                {"name":"b","type":["null",{"type":"enum","name":"E","symbols":["X"]}]}]}"#,
        )
        .unwrap();
        assert_eq!(fingerprint(&plain), apache_avro_fingerprint(&plain));
    }

    #[test]
    fn single_object_header_is_marker_and_rabin_fingerprint_of_canonical_form() {
        let codec = Codec::new(Encoding::SingleObject).unwrap();
        // The Parsing Canonical Form of the specification: the logical type
        // is stripped and `timestamp_ms` is a bare "long".
        let request_pcf = concat!(
            r#"{"name":"dev.quotaflow.v1.RequestEvent","type":"record","fields":["#,
            r#"{"name":"event_id","type":"string"},{"name":"timestamp_ms","type":"long"},"#,
            r#"{"name":"user_id","type":["null","string"]},{"name":"api_key","type":["null","string"]},"#,
            r#"{"name":"client_ip","type":["null","string"]},{"name":"method","type":["null","string"]},"#,
            r#"{"name":"path","type":["null","string"]},{"name":"cost","type":"long"},"#,
            r#"{"name":"gateway_id","type":["null","string"]}]}"#
        );
        let s = schemas().unwrap();
        assert_eq!(canonical_form(&s.request), request_pcf);

        let cases: [(Vec<u8>, &Schema); 3] = [
            (codec.encode_request(&request()).unwrap(), &s.request),
            (codec.encode_decision(&decisions()[0]).unwrap(), &s.decision),
            (codec.encode_alert(&alerts()[0]).unwrap(), &s.alert),
        ];
        let mut seen = Vec::new();
        for (bytes, schema) in cases {
            let pcf = canonical_form(schema);
            for stripped in ["doc", "logicalType", "default", r#"{"type":"long"}"#] {
                assert!(!pcf.contains(stripped), "{pcf}");
            }
            let fp = crc64_avro(pcf.as_bytes());
            assert_eq!(bytes[..2], [0xC3, 0x01]);
            assert_eq!(bytes[2..10], fp.to_le_bytes());
            assert_eq!(fingerprint(schema), fp);
            seen.push(fp);
        }
        seen.dedup();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn apache_avro_fingerprints_are_accepted_too() {
        let codec = Codec::new(Encoding::SingleObject).unwrap();
        let s = schemas().unwrap();
        // apache-avro keeps `{"type":"long"}` for logical types: a different
        // fingerprint, which its single-object writer would put in the header.
        assert_ne!(apache_avro_fingerprint(&s.request), fingerprint(&s.request));
        let mut bytes = codec.encode_request(&request()).unwrap();
        bytes[2..10].copy_from_slice(&apache_avro_fingerprint(&s.request).to_le_bytes());
        assert_eq!(codec.decode_request(&bytes).unwrap(), request());
        let mut bytes = codec.encode_alert(&alerts()[0]).unwrap();
        bytes[2..10].copy_from_slice(&apache_avro_fingerprint(&s.alert).to_le_bytes());
        assert_eq!(codec.decode_alert(&bytes).unwrap(), alerts()[0]);
        let v0 = &s.request_history[0];
        let mut bytes = encode_v0(&request());
        bytes[2..10].copy_from_slice(&apache_avro_fingerprint(v0).to_le_bytes());
        assert_eq!(codec.decode_request(&bytes).unwrap().cost, 1);
    }

    #[test]
    fn readme_lists_the_current_fingerprints() {
        let readme = include_str!("../../schemas/README.md");
        let s = schemas().unwrap();
        let missing: Vec<String> = [
            ("request_event.avsc", &s.request),
            ("history/request_event.v0.avsc", &s.request_history[0]),
            ("decision.avsc", &s.decision),
            ("breach_alert.avsc", &s.alert),
        ]
        .into_iter()
        .map(|(name, schema)| format!("| `{name}` | `{:#018x}` |", fingerprint(schema)))
        .filter(|line| !readme.contains(line))
        .collect();
        assert!(
            missing.is_empty(),
            "schemas/README.md lacks the lines\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn confluent_header_is_zero_and_big_endian_id() {
        let codec = Codec::new(CONFLUENT).unwrap();
        let r = codec.encode_request(&request()).unwrap();
        assert_eq!(r[..5], [0, 0, 0, 0, 7]);
        let d = codec.encode_decision(&decisions()[0]).unwrap();
        assert_eq!(d[..5], [0, 0, 0, 0, 8]);
        let a = codec.encode_alert(&alerts()[0]).unwrap();
        assert_eq!(a[..5], [0, 1, 2, 3, 4]);
        // Same body as single-object encoding.
        let so = Codec::new(Encoding::SingleObject).unwrap();
        assert_eq!(so.encode_request(&request()).unwrap()[10..], r[5..]);
    }

    /// `e` as an older gateway (schema v0: no `cost`, no `gateway_id`) writes it.
    fn encode_v0(e: &RequestEvent) -> Vec<u8> {
        let v0 = Schema::parse_str(REQUEST_EVENT_HISTORY[0]).unwrap();
        let value = Value::Record(vec![
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
        ]);
        let mut out = vec![0xC3, 0x01];
        out.extend_from_slice(&fingerprint(&v0).to_le_bytes());
        GenericDatumWriter::builder(&v0)
            .build()
            .unwrap()
            .write_value(&mut out, value)
            .unwrap();
        out
    }

    #[test]
    fn v0_request_event_reads_with_current_schema_and_defaults() {
        let codec = Codec::new(Encoding::SingleObject).unwrap();
        let v0 = Schema::parse_str(REQUEST_EVENT_HISTORY[0]).unwrap();
        assert_ne!(fingerprint(&v0), fingerprint(&schemas().unwrap().request));
        for e in [request(), sparse_request()] {
            let bytes = encode_v0(&e);
            let decoded = codec.decode_request(&bytes).unwrap();
            assert_eq!(decoded.cost, 1);
            assert_eq!(decoded.gateway_id, None);
            assert_eq!(
                decoded,
                RequestEvent {
                    cost: 1,
                    gateway_id: None,
                    ..e
                }
            );
        }
    }

    #[test]
    fn history_schemas_are_readable_by_the_current_schema() {
        let s = schemas().unwrap();
        for old in &s.request_history {
            SchemaCompatibility::can_read(old, &s.request).unwrap();
        }
    }

    #[test]
    fn unknown_fingerprint_or_id_is_unknown_schema() {
        let so = Codec::new(Encoding::SingleObject).unwrap();
        let mut bytes = so.encode_request(&request()).unwrap();
        bytes[2..10].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
        let err = so.decode_request(&bytes).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownSchema {
                record: "RequestEvent",
                schema: WriterSchema::Fingerprint(0x0123_4567_89ab_cdef)
            }
        );
        assert_eq!(
            err.to_string(),
            "unknown writer schema for RequestEvent: Rabin fingerprint 0x0123456789abcdef"
        );
        // A decision is not a request event, whatever its bytes.
        let decision = so.encode_decision(&decisions()[0]).unwrap();
        assert!(matches!(
            so.decode_request(&decision),
            Err(DecodeError::UnknownSchema { .. })
        ));

        let cf = Codec::new(CONFLUENT).unwrap();
        let mut bytes = cf.encode_request(&request()).unwrap();
        bytes[1..5].copy_from_slice(&99u32.to_be_bytes());
        let err = cf.decode_request(&bytes).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownSchema {
                record: "RequestEvent",
                schema: WriterSchema::Id(99)
            }
        );
        assert_eq!(
            err.to_string(),
            "unknown writer schema for RequestEvent: schema id 99"
        );
        let alert = cf.encode_alert(&alerts()[0]).unwrap();
        assert!(matches!(
            cf.decode_decision(&alert),
            Err(DecodeError::UnknownSchema { .. })
        ));
    }

    #[test]
    fn empty_oversized_and_bad_headers_are_errors() {
        let so = Codec::new(Encoding::SingleObject).unwrap();
        let cf = Codec::new(CONFLUENT).unwrap();
        assert_eq!(so.decode_request(&[]), Err(DecodeError::Empty));
        assert_eq!(cf.decode_alert(&[]), Err(DecodeError::Empty));
        let huge = vec![0xC3; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            so.decode_request(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
        // JSON where Avro was expected.
        let err = so.decode_request(br#"{"event_id":"x"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad header: expected the Avro single-object marker c3 01, found 7b 22"
        );
        // The other framing gets a hint.
        let cf_bytes = cf.encode_request(&request()).unwrap();
        let so_bytes = so.encode_request(&request()).unwrap();
        assert!(so
            .decode_request(&cf_bytes)
            .unwrap_err()
            .to_string()
            .contains("Confluent"));
        assert!(cf
            .decode_request(&so_bytes)
            .unwrap_err()
            .to_string()
            .contains("single-object"));
        assert!(matches!(
            so.decode_request(&[0xC3, 0x01, 1, 2]),
            Err(DecodeError::BadHeader(_))
        ));
        assert!(matches!(
            cf.decode_request(&[0, 0, 0]),
            Err(DecodeError::BadHeader(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for codec in codecs() {
            for (bytes, decodes) in samples(&codec) {
                assert!(decodes(&bytes));
                for len in 0..bytes.len() {
                    assert!(!decodes(&bytes[..len]), "truncated to {len} of {bytes:?}");
                }
            }
        }
    }

    #[test]
    fn truncation_in_a_trailing_null_union_is_detected() {
        // apache-avro reads end of input at a union index as null; the last
        // field of the request event is such a union.
        let codec = Codec::new(Encoding::SingleObject).unwrap();
        let bytes = codec.encode_request(&sparse_request()).unwrap();
        let err = codec.decode_request(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, DecodeError::Body { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for codec in codecs() {
            for (bytes, decodes) in samples(&codec) {
                for extra in [&[0u8][..], &[1, 2, 3], &bytes[..]] {
                    let mut long = bytes.clone();
                    long.extend_from_slice(extra);
                    assert!(!decodes(&long));
                }
            }
            let mut bytes = codec.encode_request(&request()).unwrap();
            bytes.push(0);
            assert_eq!(
                codec.decode_request(&bytes).unwrap_err().to_string(),
                "malformed RequestEvent body: 1 trailing bytes after the record"
            );
        }
    }

    #[test]
    fn huge_lengths_are_refused_without_allocating() {
        let codec = Codec::new(Encoding::SingleObject).unwrap();
        let valid = codec.encode_request(&request()).unwrap();
        // event_id claims 2^40 bytes, then 9 MiB (under the allocation cap).
        for len in [1i64 << 40, 9 << 20, i64::MAX / 2, -1] {
            let mut bytes = valid[..10].to_vec();
            let mut zz = ((len << 1) ^ (len >> 63)) as u64;
            loop {
                let b = (zz & 0x7f) as u8;
                zz >>= 7;
                if zz == 0 {
                    bytes.push(b);
                    break;
                }
                bytes.push(b | 0x80);
            }
            bytes.extend_from_slice(b"abc");
            let err = codec.decode_request(&bytes).unwrap_err();
            assert!(matches!(err, DecodeError::Body { .. }), "{err}");
        }
        // Arrays claiming billions of dimensions.
        let d = Codec::new(Encoding::SingleObject).unwrap();
        let mut bytes = d.encode_decision(&decisions()[1]).unwrap();
        // decisions()[1] has no dimensions: find the empty array (a 0 byte
        // after `key`) by re-encoding with a marker-free layout.
        let prefix_len = 10
            + 1
            + "requests:3:1200:decision:0".len()
            + 1
            + 1
            + "per_user".len()
            + 1
            + "per_user/user_id=alice".len();
        assert_eq!(bytes[prefix_len], 0);
        bytes.splice(prefix_len..=prefix_len, [0xfe, 0xff, 0xff, 0xff, 0x0f]);
        assert!(d.decode_decision(&bytes).is_err());
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn check_error_is_one_line(r: Result<(), DecodeError>) {
        if let Err(e) = r {
            let text = e.to_string();
            assert!(
                !text.contains('\n') && !text.is_empty() && text.len() < 400,
                "{text:?}"
            );
        }
    }

    fn decode_all(codec: &Codec, bytes: &[u8]) {
        check_error_is_one_line(codec.decode_request(bytes).map(|_| ()));
        check_error_is_one_line(codec.decode_decision(bytes).map(|_| ()));
        check_error_is_one_line(codec.decode_alert(bytes).map(|_| ()));
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for codec in codecs() {
            let valid = samples(&codec);
            let headers: Vec<Vec<u8>> = valid
                .iter()
                .map(|(b, _)| {
                    b[..if codec.encoding() == &Encoding::SingleObject {
                        10
                    } else {
                        5
                    }]
                        .to_vec()
                })
                .collect();
            for _ in 0..20_000 {
                // Pure noise, noise behind a valid header, mutated records.
                let mut bytes: Vec<u8> = (0..rng.below(120)).map(|_| rng.next() as u8).collect();
                decode_all(&codec, &bytes);
                let mut framed = headers[rng.below(headers.len())].clone();
                framed.append(&mut bytes);
                decode_all(&codec, &framed);
                let mut mutated = valid[rng.below(valid.len())].0.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(mutated.len());
                    match rng.below(3) {
                        0 => mutated[i] = rng.next() as u8,
                        1 => mutated[i] ^= 1 << rng.below(8),
                        _ => {
                            mutated.insert(i, rng.next() as u8);
                        }
                    }
                }
                decode_all(&codec, &mutated);
            }
        }
    }

    #[test]
    fn codec_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Codec>();
        check::<DecodeError>();
        check::<EncodeError>();
    }

    #[test]
    fn decode_speed() {
        let codec = Codec::new(Encoding::SingleObject).unwrap();
        let current = codec.encode_request(&request()).unwrap();
        let old = encode_v0(&request());
        let n = if cfg!(debug_assertions) {
            20_000
        } else {
            500_000
        };
        for (what, bytes) in [("current", &current), ("v0 (resolved)", &old)] {
            let start = Instant::now();
            for _ in 0..n {
                std::hint::black_box(codec.decode_request(std::hint::black_box(bytes)).unwrap());
            }
            let per_sec = f64::from(n) / start.elapsed().as_secs_f64();
            println!(
                "decode_request {what}: {per_sec:.0} events/s ({} bytes)",
                bytes.len()
            );
            let floor = if cfg!(debug_assertions) {
                2_000.0
            } else {
                50_000.0
            };
            assert!(per_sec > floor, "{what}: {per_sec:.0} events/s");
        }
        let e = request();
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(codec.encode_request(std::hint::black_box(&e)).unwrap());
        }
        let per_sec = f64::from(n) / start.elapsed().as_secs_f64();
        println!("encode_request: {per_sec:.0} events/s");
    }

    mod fast_path {
        use super::*;
        use proptest::prelude::*;

        /// The shortcut into a fresh event, and into one left dirty by a
        /// different record, which must give the same result.
        fn fast_decode(body: &[u8]) -> Option<RequestEvent> {
            let mut fresh = RequestEvent::default();
            let got = fast::request_body_into(body, &mut fresh).map(|()| fresh);
            let mut dirty = RequestEvent {
                event_id: "previous".into(),
                timestamp_ms: 7,
                user_id: Some("someone-else".into()),
                api_key: None,
                client_ip: Some("192.0.2.1".into()),
                method: Some("DELETE".into()),
                path: None,
                cost: 9,
                gateway_id: Some("gw-old".into()),
            };
            let reused = fast::request_body_into(body, &mut dirty).map(|()| dirty);
            assert_eq!(got, reused, "decoding into a used event differs");
            got
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![Just(String::new()), "[a-z0-9:/._-]{1,24}", "\\PC{0,12}"]
        }

        prop_compose! {
            fn event()(
                event_id in text(),
                timestamp_ms in any::<i64>(),
                user_id in proptest::option::of(text()),
                api_key in proptest::option::of(text()),
                client_ip in proptest::option::of(text()),
                method in proptest::option::of(text()),
                path in proptest::option::of(text()),
                cost in any::<i64>(),
                gateway_id in proptest::option::of(text()),
            ) -> RequestEvent {
                RequestEvent { event_id, timestamp_ms, user_id, api_key, client_ip, method, path, cost, gateway_id }
            }
        }

        proptest! {
            #[test]
            fn reads_every_event_the_writer_writes(e in event()) {
                for codec in codecs() {
                    let bytes = codec.encode_request(&e).unwrap();
                    let body = &bytes[codec.request.header.len()..];
                    prop_assert_eq!(fast_decode(body), Some(e.clone()));
                    prop_assert_eq!(codec.decode_request_generally(&bytes).unwrap(), e.clone());
                }
            }

            /// Damaged records: whatever the shortcut accepts, apache-avro
            /// reads the same way; what it refuses gets the general error.
            #[test]
            fn accepts_nothing_apache_avro_reads_otherwise(
                e in event(),
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                cut in any::<prop::sample::Index>(),
                tail in proptest::collection::vec(any::<u8>(), 0..3),
            ) {
                for codec in codecs() {
                    let mut bytes = codec.encode_request(&e).unwrap();
                    let header = codec.request.header.len();
                    for (at, byte) in &flips {
                        let i = header + at.index(bytes.len() - header);
                        bytes[i] = *byte;
                    }
                    bytes.truncate(header + cut.index(bytes.len() - header + 1));
                    bytes.extend_from_slice(&tail);
                    let general = codec.decode_request_generally(&bytes);
                    match fast_decode(&bytes[header..]) {
                        Some(fast) => prop_assert_eq!(general.unwrap(), fast),
                        None => prop_assert_eq!(
                            codec.decode_request(&bytes).map_err(|e| e.to_string()),
                            general.map_err(|e| e.to_string())
                        ),
                    }
                }
            }
        }
    }
}
