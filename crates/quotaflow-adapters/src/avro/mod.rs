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

mod framing;
mod mapping;
mod request_decoder;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::OnceLock;

use apache_avro::Schema;

pub use framing::fingerprint;
use framing::RecordCodec;
use mapping::{
    alert_from_fields, alert_to_value, decision_from_fields, decision_to_value,
    request_from_fields, request_to_value,
};

use quotaflow_core::pipeline::records::{BreachAlert, DecisionRecord, RequestEvent};

/// The current request event schema (`schemas/request_event.avsc`).
pub const REQUEST_EVENT_SCHEMA: &str = include_str!("../../../../schemas/request_event.avsc");
/// The current decision schema (`schemas/decision.avsc`).
pub const DECISION_SCHEMA: &str = include_str!("../../../../schemas/decision.avsc");
/// The current breach alert schema (`schemas/breach_alert.avsc`).
pub const BREACH_ALERT_SCHEMA: &str = include_str!("../../../../schemas/breach_alert.avsc");

/// Older request event writer schemas (`schemas/history/`), oldest first. The
/// single-object decoder recognises their fingerprints and resolves them to
/// the current schema. When the current schema changes, copy it here first.
const REQUEST_EVENT_HISTORY: &[&str] = &[include_str!(
    "../../../../schemas/history/request_event.v0.avsc"
)];

/// Messages longer than this are refused before decoding.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Process-wide cap on what apache-avro allocates for one length read from
/// the input (a string, or an array block), set on the first [`Codec::new`].
/// Garbage can claim any length; the library's default cap is 512 MiB.
pub const MAX_ALLOCATION_BYTES: usize = 10 * 1024 * 1024;

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
                event = "avro_allocation_cap_preset",
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
                if request_decoder::request_body_into(body, e).is_some() {
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
