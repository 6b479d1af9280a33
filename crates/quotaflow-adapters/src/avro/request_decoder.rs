//! A decoder specialised to the current `RequestEvent` writer schema.
//!
//! apache-avro decodes through a generic `Value` tree with a name per field;
//! for the request topic — every event the processor reads — that costs
//! 1–1.7 µs an event, several times the cost of the bytes themselves
//! (docs/benchmarks.md). Records written with the current schema (the
//! header says so) are read here directly into a [`RequestEvent`]. This is
//! only a shortcut: it accepts nothing apache-avro would refuse and answers
//! `None` on anything unusual (a malformed body, trailing bytes, an
//! overlong varint), in which case the caller decodes the record the
//! general way, which also gives the precise error. A property test checks
//! both decoders agree on every encoded event and on arbitrary bytes.

use quotaflow_core::pipeline::records::RequestEvent;

/// Decode a body written with `schemas/request_event.avsc` as it is now
/// into `e`, reusing its strings' buffers: the worker decodes every event
/// into the same one, so a steady stream allocates nothing here. On `None`
/// `e` holds a partial record and the caller decodes the general way.
pub(super) fn request_body_into(body: &[u8], e: &mut RequestEvent) -> Option<()> {
    let mut c = Cursor(body);
    c.string_into(&mut e.event_id)?;
    e.timestamp_ms = c.long()?;
    c.optional_string_into(&mut e.user_id)?;
    c.optional_string_into(&mut e.api_key)?;
    c.optional_string_into(&mut e.client_ip)?;
    c.optional_string_into(&mut e.method)?;
    c.optional_string_into(&mut e.path)?;
    e.cost = c.long()?;
    c.optional_string_into(&mut e.gateway_id)?;
    c.0.is_empty().then_some(())
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    /// A zig-zag varint of at most 10 bytes whose value fits 64 bits.
    fn long(&mut self) -> Option<i64> {
        let mut value: u64 = 0;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        None
    }

    fn string_into(&mut self, out: &mut String) -> Option<()> {
        let len = usize::try_from(self.long()?).ok()?;
        let bytes = self.0.get(..len)?;
        self.0 = &self.0[len..];
        out.clear();
        out.push_str(std::str::from_utf8(bytes).ok()?);
        Some(())
    }

    /// `["null", "string"]`: branch 0 is null, branch 1 a string.
    fn optional_string_into(&mut self, out: &mut Option<String>) -> Option<()> {
        match self.long()? {
            0 => {
                *out = None;
                Some(())
            }
            1 => self.string_into(out.get_or_insert_with(String::new)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode_like_the_spec() {
        let long = |bytes: &[u8]| Cursor(bytes).long();
        assert_eq!(long(&[0x00]), Some(0));
        assert_eq!(long(&[0x01]), Some(-1));
        assert_eq!(long(&[0x02]), Some(1));
        assert_eq!(long(&[0x7f]), Some(-64));
        assert_eq!(long(&[0x80, 0x01]), Some(64));
        let max = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(long(&max), Some(i64::MAX));
        let min = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(long(&min), Some(i64::MIN));
        // Truncated, overlong, overflowing.
        assert_eq!(long(&[0x80]), None);
        assert_eq!(long(&[0x80; 11]), None);
        let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(long(&overflow), None);
    }
}
