//! Which partition owns a key: Kafka's default partitioner, murmur2 of the
//! key as Java clients compute it (librdkafka's `murmur2_random`), so the
//! embedded bus, the sidecar and every producer agree on a key's owner.

/// The partition of `partitions` that `key` belongs to.
pub fn partition_for(key: &[u8], partitions: u32) -> i32 {
    let p = (murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff) % partitions.max(1);
    // `p < partitions <= u32::MAX`, and Kafka counts partitions in i32.
    i32::try_from(p).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_like_java_clients() {
        // Kafka's own test vectors for Utils.murmur2.
        assert_eq!(
            murmur2::murmur2(b"21", murmur2::KAFKA_SEED) as i32,
            -973_932_308
        );
        assert_eq!(
            murmur2::murmur2(b"foobar", murmur2::KAFKA_SEED) as i32,
            -790_332_482
        );
        assert_eq!(partition_for(b"21", 1), 0);
        // 0x7fff_ffff & -973932308 = 1173551340.
        assert_eq!(partition_for(b"21", 7), 1_173_551_340 % 7);
    }
}
