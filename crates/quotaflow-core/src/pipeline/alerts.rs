//! Breach-alert windows: refusals of one key aggregated over an event-time
//! window, with its most frequent offending values. Kept apart from the
//! partition processor that fills them and the checkpoint that saves them,
//! so neither of those two imports the other.

use serde::{Deserialize, Serialize};

use super::records::KeyPart;
use crate::fingerprint::Fingerprinter;
use crate::rules::{Dimension, Request};

/// Refusals of one key in one alert window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertAgg {
    /// The key as alerts show it ([`render_key`]).
    pub key: String,
    pub limit: String,
    pub shadow: bool,
    pub dimensions: Vec<KeyPart>,
    pub refused: u64,
    pub refused_cost: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// (dimension, value, count), first `MAX_OFFENDERS` distinct values.
    pub offenders: Vec<(Dimension, String, u64)>,
}

/// An alert window's aggregate for one key while the window is open, with
/// a hash per offender: counting a refusal then compares 64-bit hashes, not
/// up to `MAX_OFFENDERS` strings per dimension. The hashes are not
/// checkpointed; they are recomputed from the values on restore.
pub(super) struct OpenAlert {
    pub(super) agg: AlertAgg,
    pub(super) offender_hashes: Vec<u64>,
}

impl AlertAgg {
    /// Add `other`'s refusals (same rendered key, same window) to these.
    pub(super) fn absorb(&mut self, other: AlertAgg) {
        self.refused += other.refused;
        self.refused_cost += other.refused_cost;
        self.first_seen_ms = self.first_seen_ms.min(other.first_seen_ms);
        self.last_seen_ms = self.last_seen_ms.max(other.last_seen_ms);
        self.shadow &= other.shadow;
        for (dim, value, count) in other.offenders {
            let known = self
                .offenders
                .iter()
                .position(|(d, v, _)| *d == dim && *v == value);
            match known {
                Some(i) => self.offenders[i].2 += count,
                None if self.offenders.len() < MAX_OFFENDERS => {
                    self.offenders.push((dim, value, count))
                }
                None => {}
            }
        }
    }
}

impl OpenAlert {
    pub(super) fn new(agg: AlertAgg, hasher: &hashbrown::DefaultHashBuilder) -> Self {
        let offender_hashes: Vec<u64> = agg
            .offenders
            .iter()
            .map(|(d, v, _)| offender_hash(hasher, *d, v))
            .collect();
        Self {
            agg,
            offender_hashes,
        }
    }
}

pub(super) fn offender_hash(
    hasher: &hashbrown::DefaultHashBuilder,
    dim: Dimension,
    value: &str,
) -> u64 {
    use std::hash::BuildHasher as _;
    hasher.hash_one((dim, value))
}

/// The dimensions an alert reports offending values of (method is too
/// coarse to tell offenders apart).
pub(super) const OFFENDER_DIMENSIONS: [Dimension; 4] = [
    Dimension::UserId,
    Dimension::ApiKey,
    Dimension::ClientIp,
    Dimension::Path,
];

/// Offender values of one record as alerts show them, with their hashes,
/// each made on first use: a record refused by three limits reports the
/// same offenders three times, and an API key's fingerprint is a keyed hash.
#[derive(Default)]
pub(super) struct DimValues {
    values: [String; OFFENDER_DIMENSIONS.len()],
    hashes: [u64; OFFENDER_DIMENSIONS.len()],
    made: [bool; OFFENDER_DIMENSIONS.len()],
}

impl DimValues {
    pub(super) fn clear(&mut self) {
        self.made = [false; OFFENDER_DIMENSIONS.len()];
    }

    /// The value and hash of `OFFENDER_DIMENSIONS[i]`.
    pub(super) fn get(
        &mut self,
        i: usize,
        req: &Request,
        fp: &Fingerprinter,
        hasher: &hashbrown::DefaultHashBuilder,
    ) -> (&str, u64) {
        let dim = OFFENDER_DIMENSIONS[i];
        if !self.made[i] {
            let value = &mut self.values[i];
            value.clear();
            write_dim_value(value, req, dim, fp);
            self.hashes[i] = offender_hash(hasher, dim, value);
            self.made[i] = true;
        }
        (&self.values[i], self.hashes[i])
    }
}

/// Distinct offending values tracked per alert (bounded memory per key).
pub(super) const MAX_OFFENDERS: usize = 32;
/// Offenders reported per alert.
pub(super) const TOP_OFFENDERS: usize = 5;

/// A dimension's value as outputs show it: API keys as `fp:<hex>`.
pub(super) fn write_dim_value(out: &mut String, req: &Request, dim: Dimension, fp: &Fingerprinter) {
    if dim == Dimension::ApiKey {
        out.push_str("fp:");
    }
    req.write_dimension(dim, fp, out);
}

pub(super) fn dim_value(req: &Request, dim: Dimension, fp: &Fingerprinter) -> String {
    let mut s = String::new();
    write_dim_value(&mut s, req, dim, fp);
    s
}
