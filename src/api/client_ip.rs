//! The client address behind trusted reverse proxies.
//!
//! `X-Forwarded-For` is client-controlled: anyone can send one. It is read
//! only when the direct peer is a configured trusted proxy, and then from the
//! right, skipping further trusted hops, so the first untrusted address is
//! the one a trusted proxy actually saw.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Whether `peer` is one of the `trusted` proxies. An IPv4 peer seen
/// through an IPv6 socket (`::ffff:a.b.c.d`) counts as its IPv4 address.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = peer.to_canonical();
    trusted.iter().any(|n| n.contains(&peer))
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`203.0.113.7:51234`, `[2001:db8::1]:443`) or in brackets, as some
/// proxies write them.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = hop.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
}

/// The address to rate limit for a request that arrived from `peer`.
pub fn resolve(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?.to_canonical();
    let is_trusted = |ip: &IpAddr| is_trusted(*ip, trusted);
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            // A garbled hop was written by someone we cannot vouch for:
            // stop at the last address a trusted proxy reported.
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&ip) {
            break;
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {

    #[test]
    fn hops_with_ports_or_brackets_name_their_address() {
        for (hop, ip) in [
            ("203.0.113.7", "203.0.113.7"),
            ("203.0.113.7:51234", "203.0.113.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
        ] {
            assert_eq!(parse_hop(hop), ip.parse().ok(), "{hop}");
        }
        assert_eq!(parse_hop("unknown"), None);
        assert_eq!(parse_hop("[203.0.113.7"), None);
    }

    #[test]
    fn an_ipv4_mapped_peer_is_trusted_as_its_ipv4_address() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(is_trusted(peer, &trusted));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.9:4444".parse().unwrap());
        assert_eq!(
            resolve(Some(peer), &h, &trusted),
            "198.51.100.9".parse().ok()
        );
    }

    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn untrusted_peer_cannot_spoof() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(ip("203.0.113.9"), &xff("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_chain_yields_first_untrusted_from_the_right() {
        let trusted = nets(&["10.0.0.0/8"]);
        // Spoofed first hop, then the real client, then an inner proxy.
        let h = xff("6.6.6.6, 198.51.100.7, 10.0.0.2");
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("198.51.100.7"));
        assert_eq!(
            resolve(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(
            resolve(ip("10.0.0.1"), &xff("garbage, 10.0.0.3"), &trusted),
            ip("10.0.0.3")
        );
        assert_eq!(resolve(None, &xff("1.1.1.1"), &trusted), None);
    }
}
