//! Repartition records: an event sent from the partition it arrived on to
//! the home partition of its unaligned key shapes (see [`super::routing`]),
//! to be counted there against the limits of those shapes.
//!
//! A record carries what the home needs to count the event exactly once
//! and at the same time whoever replays it:
//! - the source coordinates (arrival partition, offset) and, per key shape
//!   it carries, the shape's `seq`, its place among that event's key shapes
//!   in the rules' order: the home applies, per source partition, only
//!   shapes past the last `(offset, seq)` it applied, so copies published
//!   again by a replaying source are skipped;
//! - the effective event time, already clamped at the arrival partition
//!   (clock skew, sweep horizon), so the home does not depend on the
//!   broker timestamps of its own topic;
//! - the key shapes homed at this partition (the limit keys' dimensions, in
//!   each limit's order): every shape of one event with the same home
//!   travels in one record;
//! - the request: since format 4 the fields the arrival partition decoded
//!   and validated (identity, method, the path as sent, cost), so the home
//!   neither decodes the Avro payload again nor validates it again; format
//!   1, still read, carried the original payload (one shape a record).
//!
//! The request travels whole, not only the shape's key values: a refused
//! key's alert names its most frequent offenders in the other dimensions
//! (user, API key, address, path), and limits may match on method and path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smallvec::SmallVec;

use crate::rules::{Dimension, Request};

/// First byte of a record of the first format: one key shape, the
/// original payload. Read, no longer written.
const FORMAT: u8 = 1;
/// First byte of a batch: records of one source partition for one home,
/// each as `u32` big-endian length + the record. Records travel in batches
/// because the per-record cost of a Kafka message (produce, delivery
/// report, fetch) is several times the cost of counting the event.
const BATCH_FORMAT: u8 = 2;
// 3 is taken by another record kind of the same topic.
/// First byte of a record carrying the validated request and every key
/// shape of the event homed at one partition.
const REQUEST_FORMAT: u8 = 4;

/// Flags of a format-4 request: which fields are present.
const HAS_USER_ID: u8 = 1;
const HAS_API_KEY: u8 = 1 << 1;
const HAS_IPV4: u8 = 1 << 2;
const HAS_IPV6: u8 = 1 << 3;
const HAS_METHOD: u8 = 1 << 4;
const HAS_PATH: u8 = 1 << 5;

/// A limit key's dimensions: at most five (each dimension at most once).
pub type ShapeDims = SmallVec<[Dimension; 5]>;

/// One key shape of a record and its place among its event's shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedShape {
    /// Place among the key shapes of one source event, in the rules' order:
    /// with the source offset, what copies are recognised by.
    pub seq: u16,
    /// The limit key's dimensions this shape counts against.
    pub dims: ShapeDims,
}

/// An event on its way to a home partition, as the arrival side writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repartitioned {
    pub source_partition: i32,
    pub source_offset: i64,
    /// Event time the arrival partition applied (skew-clamped).
    pub event_time_ms: u64,
    /// The event's key shapes homed at the record's home, `seq` ascending.
    pub shapes: SmallVec<[RoutedShape; 2]>,
    pub body: Body,
}

/// What a record says about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The request event as it arrived (format 1; tests and old writers).
    Payload(Vec<u8>),
    /// The validated request, encoded once per event ([`EncodedRequest`]).
    Request(EncodedRequest),
}

/// A validated request's fields in the format-4 layout: cost (`u64`), a
/// byte of presence flags, the address (4 or 16 bytes), then user id, API
/// key, method and path, each `u16` length + UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRequest(Vec<u8>);

impl EncodedRequest {
    /// `req`'s fields, with `path` as the event sent it (the home
    /// canonicalizes it under its own rules, as it did the payload's).
    /// `req` has passed [`Request::validate`]: each text is at most 1,024
    /// characters, so its length fits the `u16` (a longer one would be cut
    /// and fail as invalid UTF-8 or mismatch, never panic).
    pub fn new(req: &Request, path: Option<&str>) -> Self {
        let texts = [
            req.user_id.as_deref(),
            req.api_key.as_deref(),
            req.method.as_deref(),
            path,
        ];
        let mut out = Vec::with_capacity(
            8 + 1 + 16 + texts.iter().flatten().map(|t| 2 + t.len()).sum::<usize>(),
        );
        out.extend_from_slice(&req.cost.to_be_bytes());
        let mut flags = 0;
        for (text, flag) in texts
            .iter()
            .zip([HAS_USER_ID, HAS_API_KEY, HAS_METHOD, HAS_PATH])
        {
            if text.is_some() {
                flags |= flag;
            }
        }
        flags |= match req.client_ip {
            None => 0,
            Some(IpAddr::V4(_)) => HAS_IPV4,
            Some(IpAddr::V6(_)) => HAS_IPV6,
        };
        out.push(flags);
        match req.client_ip {
            None => {}
            Some(IpAddr::V4(ip)) => out.extend_from_slice(&ip.octets()),
            Some(IpAddr::V6(ip)) => out.extend_from_slice(&ip.octets()),
        }
        for text in texts.into_iter().flatten() {
            let len = text.len().min(usize::from(u16::MAX));
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&text.as_bytes()[..len]);
        }
        Self(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A request as a format-4 record carries it, borrowed from the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRef<'a> {
    pub user_id: Option<&'a str>,
    pub api_key: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
    pub method: Option<&'a str>,
    /// As the event sent it, not canonicalized.
    pub path: Option<&'a str>,
    pub cost: u64,
}

impl RequestRef<'_> {
    /// Write these fields into `req`, reusing its strings' buffers.
    pub fn fill(&self, req: &mut Request) {
        fn set(dst: &mut Option<String>, src: Option<&str>) {
            match (dst.as_mut(), src) {
                (Some(d), Some(s)) => {
                    d.clear();
                    d.push_str(s);
                }
                (None, Some(s)) => *dst = Some(s.to_owned()),
                (_, None) => *dst = None,
            }
        }
        set(&mut req.user_id, self.user_id);
        set(&mut req.api_key, self.api_key);
        set(&mut req.method, self.method);
        set(&mut req.path, self.path);
        req.client_ip = self.client_ip;
        req.cost = self.cost;
    }
}

/// The request part of a format-4 record.
fn decode_request(bytes: &[u8]) -> Result<RequestRef<'_>, DecodeError> {
    let (cost, rest) = take::<8>(bytes)?;
    let (&flags, mut rest) = rest.split_first().ok_or(DecodeError("truncated request"))?;
    if flags & !(HAS_USER_ID | HAS_API_KEY | HAS_IPV4 | HAS_IPV6 | HAS_METHOD | HAS_PATH) != 0
        || flags & (HAS_IPV4 | HAS_IPV6) == HAS_IPV4 | HAS_IPV6
    {
        return Err(DecodeError("unknown request fields"));
    }
    let client_ip = if flags & HAS_IPV4 != 0 {
        let (ip, tail) = take::<4>(rest)?;
        rest = tail;
        Some(IpAddr::V4(Ipv4Addr::from(ip)))
    } else if flags & HAS_IPV6 != 0 {
        let (ip, tail) = take::<16>(rest)?;
        rest = tail;
        Some(IpAddr::V6(Ipv6Addr::from(ip)))
    } else {
        None
    };
    let mut text = |flag: u8| -> Result<Option<&str>, DecodeError> {
        if flags & flag == 0 {
            return Ok(None);
        }
        let (len, tail) = take::<2>(rest)?;
        let len = usize::from(u16::from_be_bytes(len));
        if tail.len() < len {
            return Err(DecodeError("truncated request"));
        }
        let (t, tail) = tail.split_at(len);
        rest = tail;
        std::str::from_utf8(t)
            .map(Some)
            .map_err(|_| DecodeError("request text is not UTF-8"))
    };
    let user_id = text(HAS_USER_ID)?;
    let api_key = text(HAS_API_KEY)?;
    let method = text(HAS_METHOD)?;
    let path = text(HAS_PATH)?;
    if !rest.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(RequestRef {
        user_id,
        api_key,
        client_ip,
        method,
        path,
        cost: u64::from_be_bytes(cost),
    })
}

/// A record as the home reads it, borrowed from the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedRecord<'a> {
    pub source_partition: i32,
    pub source_offset: i64,
    pub event_time_ms: u64,
    /// `seq` ascending as written; one shape in a format-1 record.
    pub shapes: SmallVec<[RoutedShape; 2]>,
    pub body: BodyRef<'a>,
}

/// The request part of a [`RoutedRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRef<'a> {
    /// Format 1: the request event's payload, to decode.
    Payload(&'a [u8]),
    /// Format 4: the validated request.
    Request(RequestRef<'a>),
}

/// A repartition record that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("repartition record: {0}")]
pub struct DecodeError(pub &'static str);

impl Repartitioned {
    /// `shape` as ids and names show it: dimensions joined by `+`, or
    /// `global` for a keyless limit.
    pub fn shape_name(shape: &[Dimension]) -> String {
        if shape.is_empty() {
            return "global".to_owned();
        }
        let mut s = String::new();
        for (i, d) in shape.iter().enumerate() {
            if i > 0 {
                s.push('+');
            }
            s.push_str(d.as_str());
        }
        s
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Format 4 for a request body. A payload body is written in format 1,
    /// one record per shape (what a writer before format 4 wrote; tests of
    /// the upgrade path make such records with it).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match &self.body {
            Body::Request(req) => {
                out.push(REQUEST_FORMAT);
                self.encode_coordinates(out);
                // At most one shape per distinct limit key: far below 256.
                out.push(self.shapes.len().min(usize::from(u8::MAX)) as u8);
                for s in self.shapes.iter().take(usize::from(u8::MAX)) {
                    out.extend_from_slice(&s.seq.to_be_bytes());
                    encode_dims(&s.dims, out);
                }
                out.extend_from_slice(req.as_bytes());
            }
            Body::Payload(payload) => {
                for s in &self.shapes {
                    out.push(FORMAT);
                    out.extend_from_slice(&self.source_partition.to_be_bytes());
                    out.extend_from_slice(&self.source_offset.to_be_bytes());
                    out.extend_from_slice(&s.seq.to_be_bytes());
                    out.extend_from_slice(&self.event_time_ms.to_be_bytes());
                    encode_dims(&s.dims, out);
                    out.extend_from_slice(payload);
                }
            }
        }
    }

    fn encode_coordinates(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.source_partition.to_be_bytes());
        out.extend_from_slice(&self.source_offset.to_be_bytes());
        out.extend_from_slice(&self.event_time_ms.to_be_bytes());
    }
}

fn encode_dims(dims: &[Dimension], out: &mut Vec<u8>) {
    // At most five dimensions: a limit key holds each at most once.
    out.push(dims.len().min(usize::from(u8::MAX)) as u8);
    out.extend(
        dims.iter()
            .take(usize::from(u8::MAX))
            .map(|&d| dimension_code(d)),
    );
}

fn decode_dims(bytes: &[u8]) -> Result<(ShapeDims, &[u8]), DecodeError> {
    let (&n, rest) = bytes.split_first().ok_or(DecodeError("truncated shape"))?;
    let n = usize::from(n);
    if rest.len() < n {
        return Err(DecodeError("truncated shape"));
    }
    let (dims, rest) = rest.split_at(n);
    let dims = dims
        .iter()
        .map(|&c| dimension_of(c).ok_or(DecodeError("unknown dimension")))
        .collect::<Result<ShapeDims, _>>()?;
    Ok((dims, rest))
}

impl<'a> RoutedRecord<'a> {
    /// One record (format 1 or 4).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let (&format, rest) = bytes.split_first().ok_or(DecodeError("empty"))?;
        match format {
            FORMAT => {
                let (p, rest) = take::<4>(rest)?;
                let (o, rest) = take::<8>(rest)?;
                let (s, rest) = take::<2>(rest)?;
                let (t, rest) = take::<8>(rest)?;
                let (dims, payload) = decode_dims(rest)?;
                let mut shapes = SmallVec::new();
                shapes.push(RoutedShape {
                    seq: u16::from_be_bytes(s),
                    dims,
                });
                Ok(Self {
                    source_partition: i32::from_be_bytes(p),
                    source_offset: i64::from_be_bytes(o),
                    event_time_ms: u64::from_be_bytes(t),
                    shapes,
                    body: BodyRef::Payload(payload),
                })
            }
            REQUEST_FORMAT => {
                let (p, rest) = take::<4>(rest)?;
                let (o, rest) = take::<8>(rest)?;
                let (t, rest) = take::<8>(rest)?;
                let (&n, mut rest) = rest.split_first().ok_or(DecodeError("truncated shapes"))?;
                if n == 0 {
                    return Err(DecodeError("no key shape"));
                }
                let mut shapes = SmallVec::new();
                for _ in 0..n {
                    let (seq, tail) = take::<2>(rest)?;
                    let (dims, tail) = decode_dims(tail)?;
                    shapes.push(RoutedShape {
                        seq: u16::from_be_bytes(seq),
                        dims,
                    });
                    rest = tail;
                }
                Ok(Self {
                    source_partition: i32::from_be_bytes(p),
                    source_offset: i64::from_be_bytes(o),
                    event_time_ms: u64::from_be_bytes(t),
                    shapes,
                    body: BodyRef::Request(decode_request(rest)?),
                })
            }
            _ => Err(DecodeError("unknown format")),
        }
    }
}

/// Append `r` to `batch` (started if empty).
pub fn append_to_batch(batch: &mut Vec<u8>, r: &Repartitioned) {
    if batch.is_empty() {
        batch.push(BATCH_FORMAT);
    }
    let append = |batch: &mut Vec<u8>, r: &Repartitioned| {
        let at = batch.len();
        batch.extend_from_slice(&[0; 4]);
        r.encode_into(batch);
        let len = u32::try_from(batch.len() - at - 4).unwrap_or(u32::MAX);
        batch[at..at + 4].copy_from_slice(&len.to_be_bytes());
    };
    match &r.body {
        Body::Request(_) => append(batch, r),
        // Format 1 holds one shape: one record each.
        Body::Payload(_) => {
            for s in &r.shapes {
                let one = Repartitioned {
                    shapes: SmallVec::from_elem(s.clone(), 1),
                    ..r.clone()
                };
                append(batch, &one);
            }
        }
    }
}

/// The records of a batch, or of a single record, in order.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<RoutedRecord<'_>>, DecodeError> {
    match bytes.split_first() {
        Some((&BATCH_FORMAT, mut rest)) => {
            let mut out = Vec::new();
            while !rest.is_empty() {
                let (len, tail) = take::<4>(rest)?;
                let len = usize::try_from(u32::from_be_bytes(len))
                    .map_err(|_| DecodeError("record too long"))?;
                if tail.len() < len {
                    return Err(DecodeError("truncated batch"));
                }
                let (one, tail) = tail.split_at(len);
                out.push(RoutedRecord::decode(one)?);
                rest = tail;
            }
            Ok(out)
        }
        Some(_) => Ok(vec![RoutedRecord::decode(bytes)?]),
        None => Err(DecodeError("empty")),
    }
}

fn take<const N: usize>(bytes: &[u8]) -> Result<([u8; N], &[u8]), DecodeError> {
    if bytes.len() < N {
        return Err(DecodeError("truncated header"));
    }
    let (head, rest) = bytes.split_at(N);
    let mut a = [0u8; N];
    a.copy_from_slice(head);
    Ok((a, rest))
}

fn dimension_code(d: Dimension) -> u8 {
    match d {
        Dimension::UserId => 0,
        Dimension::ApiKey => 1,
        Dimension::ClientIp => 2,
        Dimension::Method => 3,
        Dimension::Path => 4,
    }
}

fn dimension_of(c: u8) -> Option<Dimension> {
    Some(match c {
        0 => Dimension::UserId,
        1 => Dimension::ApiKey,
        2 => Dimension::ClientIp,
        3 => Dimension::Method,
        4 => Dimension::Path,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("\\PC{1,40}")
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            text(),
            text(),
            proptest::option::of(any::<IpAddr>()),
            text(),
            0u64..=1_000_000_000,
        )
            .prop_map(|(user_id, api_key, client_ip, method, cost)| Request {
                user_id,
                api_key,
                client_ip,
                method,
                path: None,
                cost,
            })
    }

    fn shapes() -> impl Strategy<Value = SmallVec<[RoutedShape; 2]>> {
        proptest::collection::vec(
            proptest::sample::subsequence(
                vec![
                    Dimension::UserId,
                    Dimension::ClientIp,
                    Dimension::Path,
                    Dimension::ApiKey,
                ],
                0..4,
            ),
            1..4,
        )
        .prop_map(|all| {
            all.into_iter()
                .enumerate()
                .map(|(seq, dims)| RoutedShape {
                    seq: seq as u16 * 2,
                    dims: dims.into_iter().collect(),
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn request_records_round_trip(p in any::<i32>(), o in any::<i64>(), t in any::<u64>(),
                                      shapes in shapes(), req in request(), path in text()) {
            let r = Repartitioned {
                source_partition: p, source_offset: o, event_time_ms: t, shapes: shapes.clone(),
                body: Body::Request(EncodedRequest::new(&req, path.as_deref())),
            };
            let bytes = r.encode();
            let back = RoutedRecord::decode(&bytes).unwrap();
            prop_assert_eq!((back.source_partition, back.source_offset, back.event_time_ms), (p, o, t));
            prop_assert_eq!(&back.shapes, &shapes);
            let BodyRef::Request(q) = back.body else { panic!("{back:?}") };
            let mut filled = Request { user_id: Some("stale".into()), path: Some("/stale".into()), ..Request::default() };
            q.fill(&mut filled);
            prop_assert_eq!(filled, Request { path: path.clone(), ..req });
            // Every cut short is an error, never a panic or a shorter record.
            for cut in 0..bytes.len() {
                prop_assert!(RoutedRecord::decode(&bytes[..cut]).is_err(), "cut at {}", cut);
            }
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(RoutedRecord::decode(&longer).is_err());
        }

        #[test]
        fn payload_records_round_trip(p in any::<i32>(), o in any::<i64>(), seq in any::<u16>(), t in any::<u64>(),
                       shape in proptest::sample::subsequence(vec![Dimension::ClientIp, Dimension::Path, Dimension::ApiKey], 0..3),
                       payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let dims: ShapeDims = shape.into_iter().collect();
            let r = Repartitioned {
                source_partition: p, source_offset: o, event_time_ms: t,
                shapes: SmallVec::from_elem(RoutedShape { seq, dims: dims.clone() }, 1),
                body: Body::Payload(payload.clone()),
            };
            let bytes = r.encode();
            prop_assert_eq!(bytes[0], FORMAT);
            prop_assert_eq!(RoutedRecord::decode(&bytes), Ok(RoutedRecord {
                source_partition: p, source_offset: o, event_time_ms: t,
                shapes: SmallVec::from_elem(RoutedShape { seq, dims }, 1),
                body: BodyRef::Payload(&payload),
            }));
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = RoutedRecord::decode(&bytes);
            let _ = decode_batch(&bytes);
            for format in [FORMAT, BATCH_FORMAT, REQUEST_FORMAT] {
                let mut b = vec![format];
                b.extend_from_slice(&bytes);
                let _ = RoutedRecord::decode(&b);
                let _ = decode_batch(&b);
            }
        }

        /// A batch may mix both formats (a source upgraded while its
        /// records were in flight): each reads back in order.
        #[test]
        fn batches_round_trip(records in proptest::collection::vec((any::<i64>(), shapes(), request(), any::<bool>()), 1..20)) {
            let records: Vec<Repartitioned> = records
                .into_iter()
                .map(|(o, shapes, req, old)| Repartitioned {
                    source_partition: 3, source_offset: o, event_time_ms: 9, shapes,
                    body: if old { Body::Payload(vec![7; 5]) } else { Body::Request(EncodedRequest::new(&req, Some("/p"))) },
                })
                .collect();
            let mut batch = Vec::new();
            for r in &records {
                append_to_batch(&mut batch, r);
            }
            let back = decode_batch(&batch).unwrap();
            // A payload record of n shapes is written as n records.
            let expected: usize = records.iter().map(|r| match r.body { Body::Payload(_) => r.shapes.len(), Body::Request(_) => 1 }).sum();
            prop_assert_eq!(back.len(), expected);
            let mut i = 0;
            for r in &records {
                let n = if matches!(r.body, Body::Payload(_)) { r.shapes.len() } else { 1 };
                let got: Vec<RoutedShape> = back[i..i + n].iter().flat_map(|b| b.shapes.clone()).collect();
                prop_assert_eq!(&got[..], &r.shapes[..]);
                for b in &back[i..i + n] {
                    prop_assert_eq!((b.source_partition, b.source_offset, b.event_time_ms), (3, r.source_offset, 9));
                }
                i += n;
            }
            // Cut inside a record: an error (cut between records, a shorter batch).
            for cut in 1..batch.len() {
                let _ = decode_batch(&batch[..cut]);
            }
        }
    }

    /// The bytes of a record as the first format's writer (before format 4)
    /// wrote it, kept here as they were: such records still read.
    #[test]
    fn a_first_format_record_still_reads() {
        let mut bytes = vec![1];
        bytes.extend_from_slice(&2i32.to_be_bytes());
        bytes.extend_from_slice(&77i64.to_be_bytes());
        bytes.extend_from_slice(&1u16.to_be_bytes());
        bytes.extend_from_slice(&5_000u64.to_be_bytes());
        bytes.extend_from_slice(&[2, 2, 4]);
        bytes.extend_from_slice(b"avro");
        let r = RoutedRecord::decode(&bytes).unwrap();
        assert_eq!(
            (r.source_partition, r.source_offset, r.event_time_ms),
            (2, 77, 5_000)
        );
        assert_eq!(
            r.shapes[..],
            [RoutedShape {
                seq: 1,
                dims: [Dimension::ClientIp, Dimension::Path].into_iter().collect()
            }]
        );
        assert_eq!(r.body, BodyRef::Payload(b"avro"));
    }

    #[test]
    fn format_three_is_not_taken_for_a_record() {
        assert_eq!(
            RoutedRecord::decode(&[3, 0, 0]),
            Err(DecodeError("unknown format"))
        );
    }

    #[test]
    fn shapes_are_named_for_ids() {
        assert_eq!(Repartitioned::shape_name(&[]), "global");
        assert_eq!(
            Repartitioned::shape_name(&[Dimension::ClientIp, Dimension::Path]),
            "client_ip+path"
        );
    }
}
