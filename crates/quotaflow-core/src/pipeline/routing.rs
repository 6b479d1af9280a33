//! Where each limit's key is counted: its *home partition*, the one
//! partition of the requests topic whose owner holds that key's state.
//!
//! A limit whose key contains every `partition_key` dimension is
//! *aligned*: all events of one of its keys arrive on one partition (the
//! gateways' message key), so its home is the partition a request arrives
//! on. Any other limit (per IP, per API key, per endpoint, global) is homed
//! by its own key: murmur2 of the key's values as outputs show them (API
//! keys as fingerprints) joined by `|`. The stream sends such events to
//! that partition through the repartition topic, and `/check` asks that
//! partition's owner, so both paths count each key in one place.
//! The rule is written out in docs/stream.md ("Where a key is counted").

use crate::fingerprint::Fingerprinter;
use crate::rules::{Dimension, Limit, Request};

use super::partitioner::partition_for;

/// The routing rule of one group: its partition key and partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    partition_key: Vec<Dimension>,
    partitions: u32,
}

impl Routing {
    pub fn new(partition_key: Vec<Dimension>, partitions: u32) -> Self {
        Self {
            partition_key,
            partitions: partitions.max(1),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn partition_key(&self) -> &[Dimension] {
        &self.partition_key
    }

    /// Whether every event of one key of `limit` arrives on one partition.
    pub fn is_aligned(&self, limit: &Limit) -> bool {
        self.partition_key.iter().all(|d| limit.key.contains(d))
    }

    /// The partition a request arrives on: its `partition_key` values joined
    /// by `|` (absent ones empty), as gateways key their events (see
    /// `RequestEvent::partition_key`).
    pub fn arrival(&self, req: &Request, buf: &mut Vec<u8>) -> i32 {
        buf.clear();
        for (i, &d) in self.partition_key.iter().enumerate() {
            if i > 0 {
                buf.push(b'|');
            }
            write_raw(req, d, buf);
        }
        partition_for(buf, self.partitions)
    }

    /// The partition whose owner counts `limit`'s key for `req`.
    pub fn home(&self, limit: &Limit, req: &Request, fp: &Fingerprinter, buf: &mut Vec<u8>) -> i32 {
        if self.is_aligned(limit) {
            self.arrival(req, buf)
        } else {
            self.shape_home(&limit.key, req, fp, buf)
        }
    }

    /// The home of an unaligned key of dimensions `dims`: every limit keyed
    /// by the same dimensions shares it, so one repartitioned record serves
    /// them all.
    pub fn shape_home(
        &self,
        dims: &[Dimension],
        req: &Request,
        fp: &Fingerprinter,
        buf: &mut Vec<u8>,
    ) -> i32 {
        let mut text = String::new();
        for (i, &d) in dims.iter().enumerate() {
            if i > 0 {
                text.push('|');
            }
            req.write_dimension(d, fp, &mut text);
        }
        buf.clear();
        buf.extend_from_slice(text.as_bytes());
        partition_for(buf, self.partitions)
    }
}

/// A dimension's value as a gateway writes it into the message key.
fn write_raw(req: &Request, d: Dimension, buf: &mut Vec<u8>) {
    match d {
        Dimension::UserId => buf.extend_from_slice(req.user_id.as_deref().unwrap_or("").as_bytes()),
        Dimension::ApiKey => buf.extend_from_slice(req.api_key.as_deref().unwrap_or("").as_bytes()),
        Dimension::ClientIp => {
            if let Some(ip) = req.client_ip {
                buf.extend_from_slice(ip.to_string().as_bytes());
            }
        }
        Dimension::Method => buf.extend_from_slice(req.method.as_deref().unwrap_or("").as_bytes()),
        Dimension::Path => buf.extend_from_slice(req.path.as_deref().unwrap_or("").as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::records::RequestEvent;
    use crate::rules::{Rules, RulesDoc};
    use proptest::prelude::*;

    fn rules() -> Rules {
        let doc = RulesDoc::from_json(
            br#"{"limits": [
                {"name": "per_user", "key": ["user_id"], "capacity": 5, "refill_per_sec": 1},
                {"name": "per_user_path", "key": ["user_id", "path"], "capacity": 5, "refill_per_sec": 1},
                {"name": "per_ip", "key": ["client_ip"], "capacity": 5, "refill_per_sec": 1},
                {"name": "per_ip_2", "algorithm": "fixed_window", "key": ["client_ip"], "limit": 5, "window": "1s"},
                {"name": "global", "algorithm": "fixed_window", "limit": 5, "window": "1s"}
            ]}"#,
        )
        .unwrap();
        Rules::compile(doc, 0, &Fingerprinter::from_secret("t")).unwrap()
    }

    #[test]
    fn aligned_limits_contain_the_partition_key() {
        let r = rules();
        let routing = Routing::new(vec![Dimension::UserId], 8);
        let aligned: Vec<bool> = r.limits.iter().map(|l| routing.is_aligned(l)).collect();
        assert_eq!(aligned, [true, true, false, false, false]);
    }

    proptest! {
        /// The sidecar finds the partition a gateway's event went to.
        #[test]
        fn arrival_matches_the_gateways_message_key(user in "[a-z0-9]{0,12}", key in proptest::option::of("[a-zA-Z0-9]{1,20}"), parts in 1u32..64) {
            let dims = vec![Dimension::UserId, Dimension::ApiKey];
            let routing = Routing::new(dims.clone(), parts);
            let event = RequestEvent { user_id: Some(user.clone()), api_key: key.clone(), ..RequestEvent::default() };
            let req = Request { user_id: Some(user), api_key: key, ..Request::default() };
            let mut buf = Vec::new();
            prop_assert_eq!(routing.arrival(&req, &mut buf), partition_for(&event.partition_key(&dims), parts));
        }

        /// Limits of one key shape share a home, whatever else the request holds.
        #[test]
        fn one_shape_one_home(ip in any::<[u8; 4]>(), user in "[a-z]{1,8}", other in "[a-z]{1,8}") {
            let r = rules();
            let routing = Routing::new(vec![Dimension::UserId], 16);
            let fp = Fingerprinter::from_secret("t");
            let ip = std::net::IpAddr::from(ip);
            let a = Request { user_id: Some(user), client_ip: Some(ip), ..Request::default() };
            let b = Request { user_id: Some(other), client_ip: Some(ip), ..Request::default() };
            let mut buf = Vec::new();
            let home = routing.home(&r.limits[2], &a, &fp, &mut buf);
            prop_assert_eq!(home, routing.home(&r.limits[3], &a, &fp, &mut buf));
            prop_assert_eq!(home, routing.home(&r.limits[2], &b, &fp, &mut buf));
            let g = routing.home(&r.limits[4], &a, &fp, &mut buf);
            prop_assert_eq!(g, routing.home(&r.limits[4], &b, &fp, &mut buf));
        }
    }

    #[test]
    fn api_keys_route_by_fingerprint() {
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_key", "key": ["api_key"], "capacity": 5, "refill_per_sec": 1}]}"#,
        )
        .unwrap();
        let r = Rules::compile(doc, 0, &Fingerprinter::from_secret("t")).unwrap();
        let routing = Routing::new(vec![Dimension::UserId], 1_000_003);
        let req = Request {
            api_key: Some("sk_live_secret".into()),
            ..Request::default()
        };
        let mut buf = Vec::new();
        let a = routing.home(
            &r.limits[0],
            &req,
            &Fingerprinter::from_secret("t"),
            &mut buf,
        );
        assert!(!String::from_utf8_lossy(&buf).contains("sk_live_secret"));
        let b = routing.home(
            &r.limits[0],
            &req,
            &Fingerprinter::from_secret("u"),
            &mut buf,
        );
        assert_ne!(a, b, "the route depends on the group's secret");
    }
}
