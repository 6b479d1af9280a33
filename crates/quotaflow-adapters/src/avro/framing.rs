//! Framing: the single-object header (marker and the writer schema's Rabin
//! fingerprint) or the Confluent one (magic byte and schema id), and one
//! record type's datum writer and readers behind it.

use std::io::{self, Read};

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use digest::Digest as _;

use super::mapping::{kind, Fields};
use super::{DecodeError, EncodeError, Encoding, WriterSchema, MAX_MESSAGE_BYTES};

/// Single-object encoding marker.
const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const SINGLE_OBJECT_HEADER_LEN: usize = 10;
const CONFLUENT_MAGIC: u8 = 0;
const CONFLUENT_HEADER_LEN: usize = 5;

/// The schema's Parsing Canonical Form as the Avro specification defines it.
///
/// apache-avro 0.22 strips `logicalType` but then leaves the primitive in its
/// object form (`{"type":"long"}` for a `timestamp-millis`), where the
/// specification and the Java, Python and Go implementations write `"long"`;
/// its fingerprints of our schemas would not match other producers'. In a
/// canonical form an object holding only `type` can only be a primitive (docs
/// and defaults are stripped, names and symbols cannot contain braces or
/// quotes), so replacing those objects by the bare name is exact.
pub(super) fn canonical_form(schema: &Schema) -> String {
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

/// CRC-64-AVRO, the Rabin fingerprint of the specification, computed by
/// apache-avro's `Rabin` digest (which writes it little-endian).
pub(super) fn crc64_avro(data: &[u8]) -> u64 {
    u64::from_le_bytes(Rabin::digest(data).into())
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
pub(super) fn apache_avro_fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut le = [0u8; 8];
    for (dst, src) in le.iter_mut().zip(bytes) {
        *dst = src;
    }
    u64::from_le_bytes(le)
}

/// Encoder and decoders of one record type.
pub(super) struct RecordCodec {
    record: &'static str,
    writer: GenericDatumWriter<'static>,
    pub(super) header: Vec<u8>,
    /// Known writer schemas, by fingerprint (single object) or id
    /// (Confluent), the current one first.
    readers: Vec<(WriterSchema, GenericDatumReader<'static>)>,
}

impl RecordCodec {
    pub(super) fn new(
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

    pub(super) fn encode(&self, value: &Value) -> Result<Vec<u8>, EncodeError> {
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
    pub(super) fn decode(&self, encoding: &Encoding, bytes: &[u8]) -> Result<Fields, DecodeError> {
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

    pub(super) fn invalid(&self, reason: String) -> DecodeError {
        DecodeError::Invalid {
            record: self.record,
            reason,
        }
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
