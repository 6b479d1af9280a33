//! Keyed fingerprints of secrets and keys.
//!
//! API keys must never appear in clear in logs, metrics, alerts, the config
//! API or stored state. A keyed hash (SipHash-1-3, 128 bits) stands in for
//! them: stable for a given secret key, so every instance configured with the
//! same `security.fingerprint_key` agrees, and useless to someone who reads a
//! log line without that key.

use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::state::KeyId;

/// Computes fingerprints with one secret key.
#[derive(Clone)]
pub struct Fingerprinter {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter(<secret>)")
    }
}

impl Fingerprinter {
    /// A fingerprinter whose key is derived from `secret`.
    pub fn from_secret(secret: &str) -> Self {
        let mut h = SipHasher13::new_with_keys(0x7175_6f74_6166_6c6f, 0x7766_696e_6765_7270);
        h.write(secret.as_bytes());
        let d = h.finish128();
        Self { k0: d.h1, k1: d.h2 }
    }

    /// A fingerprinter with a random key: fingerprints are stable only for
    /// this process, which is fine for a single instance.
    pub fn random() -> Self {
        Self {
            k0: rand::random(),
            k1: rand::random(),
        }
    }

    /// 128-bit keyed hash of `data`.
    pub fn hash(&self, data: &[u8]) -> u128 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(data);
        h.finish128().as_u128()
    }

    /// The identity of a state key (see [`KeyId`]): keyed, so nobody without
    /// the secret can choose two keys that share state.
    pub fn key_id(&self, key: &[u8]) -> KeyId {
        KeyId(self.hash(key))
    }

    /// A value that differs, with overwhelming probability, between two
    /// fingerprinters with different secrets, and reveals nothing of the
    /// secret: checkpoints carry it so that state whose key ids were made
    /// under another secret is recognised instead of silently never matching.
    pub fn check_value(&self) -> u64 {
        self.hash(b"quotaflow key-id check value") as u64
    }

    /// Append the 32-hex-digit fingerprint of `data` to `out`. Every output
    /// naming an API key goes through here, so the digits are written
    /// directly rather than through `fmt`.
    pub fn write_hex(&self, data: &[u8], out: &mut String) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let h = self.hash(data);
        out.extend(
            (0..32)
                .rev()
                .map(|i| char::from(DIGITS[(h >> (4 * i)) as usize & 0xf])),
        );
    }

    /// The 32-hex-digit fingerprint of `data`.
    pub fn hex(&self, data: &[u8]) -> String {
        let mut s = String::with_capacity(32);
        self.write_hex(data, &mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_secret_same_fingerprint_different_secret_different() {
        let a = Fingerprinter::from_secret("s3cret");
        let b = Fingerprinter::from_secret("s3cret");
        let c = Fingerprinter::from_secret("other");
        assert_eq!(a.hex(b"key-123"), b.hex(b"key-123"));
        assert_ne!(a.hex(b"key-123"), c.hex(b"key-123"));
        assert_eq!(a.hex(b"x").len(), 32);
        assert!(!format!("{a:?}").contains("s3cret"));
    }

    #[test]
    fn hex_is_the_zero_padded_lowercase_hash() {
        let f = Fingerprinter::from_secret("k");
        for data in [&b""[..], b"sk_live_0123456789abcdef", &[0u8; 64]] {
            assert_eq!(f.hex(data), format!("{:032x}", f.hash(data)));
        }
    }
}
