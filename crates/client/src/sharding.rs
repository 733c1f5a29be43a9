//! Partitioning within a site: which partition node holds a key.
//!
//! A site runs `P` partition nodes (`partitions` in the site configuration, the same in every
//! file). Key `k` belongs to partition `crc32(k) mod P`, where `crc32` is the IEEE CRC-32 of the
//! key's bytes (the checksum of zlib, Ethernet and PNG; `crc32fast` here), read as an unsigned
//! 32-bit integer. The client library uses the same function to send each request straight to
//! the node that holds its key, and a node refuses a key that is not its own.
//!
//! Partition `p` of site `i` replicates with partition `p` of every other site over its own
//! ordered stream, so loss on one partition's stream never blocks another's. Causality across
//! partitions follows Cure: the partitions of a site exchange their contributions to the site's
//! stable vector every few milliseconds, and a remote update becomes visible only once the
//! stable vector covers its dependencies (see [`crate::replica::Replica::site_stable`]).

/// The partition of `P = partitions` that holds `key`: `crc32(key) mod P` (0 when `P` is 0 or 1).
///
/// ```
/// use causalkv_client::sharding::partition_of;
/// assert_eq!(partition_of(b"anything", 1), 0);
/// assert_eq!(partition_of(b"123456789", 1 << 31), 0xCBF4_3926 % (1 << 31));
/// ```
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    crc32fast::hash(key) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_keys_over_partitions() {
        let mut count = [0usize; 4];
        for i in 0..4000 {
            count[partition_of(format!("key{i:08}").as_bytes(), 4) as usize] += 1;
        }
        for c in count {
            assert!((800..1200).contains(&c), "uneven split: {count:?}");
        }
    }
}
