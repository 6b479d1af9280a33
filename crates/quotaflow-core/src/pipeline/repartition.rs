//! Repartition records: an event sent from the partition it arrived on to
//! the home partition of one of its unaligned key shapes (see
//! [`super::routing`]), to be counted there against the limits of that
//! shape.
//!
//! A record carries what the home needs to count the event exactly once
//! and at the same time whoever replays it:
//! - the source coordinates (arrival partition, offset) and the record's
//!   place `seq` among that event's repartition records: the home applies,
//!   per source partition, only records past the last `(offset, seq)` it
//!   applied, so copies published again by a replaying source are skipped;
//! - the effective event time, already clamped at the arrival partition
//!   (clock skew, sweep horizon), so the home does not depend on the
//!   broker timestamps of its own topic;
//! - the key shape (the limit key's dimensions, in the limit's order);
//! - the original payload, decoded again at the home.
//!
//! The encoding is a small fixed header and the payload as is, so the
//! arrival side copies bytes and never re-encodes the event.

use crate::rules::Dimension;

/// First byte of every encoded record: its format.
const FORMAT: u8 = 1;
/// First byte of a batch: records of one source partition for one home,
/// each as `u32` big-endian length + the record. Records travel in batches
/// because the per-record cost of a Kafka message (produce, delivery
/// report, fetch) is several times the cost of counting the event.
const BATCH_FORMAT: u8 = 2;

/// One event on its way to a home partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repartitioned {
    pub source_partition: i32,
    pub source_offset: i64,
    /// Place among the repartition records of one source event (one per
    /// key shape), in the order the source emits them.
    pub seq: u16,
    /// Event time the arrival partition applied (skew-clamped).
    pub event_time_ms: u64,
    /// The limit key's dimensions this record counts against.
    pub shape: Vec<Dimension>,
    /// The request event as it arrived (the requests topic's encoding).
    pub payload: Vec<u8>,
}

/// A repartition record that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("repartition record: {0}")]
pub struct DecodeError(pub &'static str);

const HEADER: usize = 1 + 4 + 8 + 2 + 8 + 1;

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
        let mut out = Vec::with_capacity(HEADER + self.shape.len() + self.payload.len());
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(FORMAT);
        out.extend_from_slice(&self.source_partition.to_be_bytes());
        out.extend_from_slice(&self.source_offset.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.event_time_ms.to_be_bytes());
        // At most five dimensions: a limit key holds each at most once.
        out.push(self.shape.len().min(u8::MAX as usize) as u8);
        out.extend(self.shape.iter().map(|&d| dimension_code(d)));
        out.extend_from_slice(&self.payload);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&format, rest) = bytes.split_first().ok_or(DecodeError("empty"))?;
        if format != FORMAT {
            return Err(DecodeError("unknown format"));
        }
        let (p, rest) = take::<4>(rest)?;
        let (o, rest) = take::<8>(rest)?;
        let (s, rest) = take::<2>(rest)?;
        let (t, rest) = take::<8>(rest)?;
        let (&n, rest) = rest.split_first().ok_or(DecodeError("truncated shape"))?;
        let n = usize::from(n);
        if rest.len() < n {
            return Err(DecodeError("truncated shape"));
        }
        let (dims, payload) = rest.split_at(n);
        let shape = dims
            .iter()
            .map(|&c| dimension_of(c).ok_or(DecodeError("unknown dimension")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            source_partition: i32::from_be_bytes(p),
            source_offset: i64::from_be_bytes(o),
            seq: u16::from_be_bytes(s),
            event_time_ms: u64::from_be_bytes(t),
            shape,
            payload: payload.to_vec(),
        })
    }
}

/// Append `r` to `batch` (started if empty).
pub fn append_to_batch(batch: &mut Vec<u8>, r: &Repartitioned) {
    if batch.is_empty() {
        batch.push(BATCH_FORMAT);
    }
    let at = batch.len();
    batch.extend_from_slice(&[0; 4]);
    r.encode_into(batch);
    let len = u32::try_from(batch.len() - at - 4).unwrap_or(u32::MAX);
    batch[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// The records of a batch, or of a single record, in order.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Repartitioned>, DecodeError> {
    match bytes.split_first() {
        Some((&FORMAT, _)) => Ok(vec![Repartitioned::decode(bytes)?]),
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
                out.push(Repartitioned::decode(one)?);
                rest = tail;
            }
            Ok(out)
        }
        Some(_) => Err(DecodeError("unknown format")),
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

    proptest! {
        #[test]
        fn round_trips(p in any::<i32>(), o in any::<i64>(), seq in any::<u16>(), t in any::<u64>(),
                       shape in proptest::sample::subsequence(vec![Dimension::ClientIp, Dimension::Path, Dimension::ApiKey], 0..3),
                       payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let r = Repartitioned { source_partition: p, source_offset: o, seq, event_time_ms: t, shape, payload };
            prop_assert_eq!(Repartitioned::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Repartitioned::decode(&bytes);
            let _ = decode_batch(&bytes);
        }

        #[test]
        fn batches_round_trip(records in proptest::collection::vec((any::<i64>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..32)), 1..20)) {
            let records: Vec<Repartitioned> = records
                .into_iter()
                .map(|(o, seq, payload)| Repartitioned { source_partition: 3, source_offset: o, seq, event_time_ms: 9, shape: vec![Dimension::ApiKey], payload })
                .collect();
            let mut batch = Vec::new();
            for r in &records {
                append_to_batch(&mut batch, r);
            }
            prop_assert_eq!(decode_batch(&batch), Ok(records.clone()));
            prop_assert_eq!(decode_batch(&records[0].encode()), Ok(vec![records[0].clone()]));
        }
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
