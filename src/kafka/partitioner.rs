//! The partition Kafka's default partitioner gives a key: `murmur2(key) & 0x7fffffff`
//! modulo the partition count, as the Java client computes it and as our producers
//! (`partitioner = murmur2_random`, [`super::clients`]) do. Billing uses it to find
//! the one partition of each topic that holds a tenant's records.

/// Kafka's murmur2 seed (`org.apache.kafka.common.utils.Utils.murmur2`).
const SEED: u32 = 0x9747_b28c;

/// The partition of `key` in a topic of `partitions` partitions.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    let positive = (murmur2::murmur2(key, SEED) & 0x7fff_ffff) as i32;
    positive % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected hashes from Kafka's own `UtilsTest.testMurmur2` (as signed Java ints).
    #[test]
    fn murmur2_matches_the_java_client() {
        for (key, java) in [
            ("21", -973_932_308i32),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2::murmur2(key.as_bytes(), SEED) as i32, java, "{key}");
        }
        // Kafka's toPositive then modulo: "foobar" → -790332482 & 0x7fffffff = 1357151166.
        assert_eq!(partition_of(b"foobar", 6), 1_357_151_166 % 6);
    }
}
