//! Where a job goes: the partitions' names (each its own hash tag, spread over the
//! cluster's slot space), and the partition of a job from its placement key or id.
//!
//! Everything here is a pure function of its inputs, so every process (producers,
//! workers, an operator's shell) computes the same answer without asking Redis.

/// Redis Cluster's slot count.
const SLOTS: u32 = 16_384;

/// The most partitions a logical queue may have: enough to spread one queue over any
/// realistic cluster, few enough that a worker over all of them stays cheap.
pub(crate) const MAX_PARTITIONS: u32 = 256;

/// What separates a generated id from the partition it names: `<uuid>@<partition>`.
const ID_MARK: char = '@';

/// CRC16/XMODEM, the checksum Redis Cluster maps keys to slots with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of a hash tag (the text between `{` and `}`).
pub(crate) fn slot(tag: &str) -> u16 {
    crc16(tag.as_bytes()) % SLOTS as u16
}

/// The queue names of the `count` partitions of `name`, in order.
///
/// Partition `i` is `<name>#<i>` when that tag's slot lies in the middle half of the
/// `i`-th of `count` equal stretches of the slot space, and `<name>#<i>.<k>` for the
/// smallest `k` that lands there otherwise. A cluster's masters own even stretches of
/// the slot space (what `redis-cli --cluster create` makes), so with as many
/// partitions as masters each partition lands on its own master; a name's own CRC
/// would put three partitions on three masters only two times in nine.
pub(crate) fn partition_names(name: &str, count: u32) -> Vec<String> {
    (0..count)
        .map(|i| {
            let plain = format!("{name}#{i}");
            if count == 1 {
                return plain;
            }
            // The middle half of the stretch: robust to the rounding of slot ranges.
            let lo = (u64::from(SLOTS) * (4 * u64::from(i) + 1)) / (4 * u64::from(count));
            let hi = (u64::from(SLOTS) * (4 * u64::from(i) + 3)) / (4 * u64::from(count));
            let fits = |tag: &str| (lo..hi.max(lo + 1)).contains(&u64::from(slot(tag)));
            if fits(&plain) {
                return plain;
            }
            // About 2 × count tries on average; the bound only guards a bug.
            (1..1_000_000u32)
                .map(|k| format!("{plain}.{k}"))
                .find(|tag| fits(tag))
                .unwrap_or(plain)
        })
        .collect()
}

/// FNV-1a: a stable hash (the same in every process and version), unlike std's.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The partition a placement key (a dedup key, a caller's id, a rate-limit key)
/// sends its jobs to.
pub(crate) fn by_key(key: &str, count: u32) -> u32 {
    (fnv1a(key.as_bytes()) % u64::from(count)) as u32
}

/// The partition an id names, if it carries one (`...@<i>` with `i < count`).
pub(crate) fn marked(id: &str, count: u32) -> Option<u32> {
    let (_, tail) = id.rsplit_once(ID_MARK)?;
    // Digits only: `u32::from_str` would take a leading `+`, and two spellings of one
    // partition would be two ids.
    if tail.is_empty() || tail.len() > 4 || !tail.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tail.parse().ok().filter(|&p| p < count)
}

/// The home partition of an id: the one it names, or the one its hash picks. An
/// enqueue with a caller's id (and no dedup key) stores the job there, so any id is
/// found in one read.
pub(crate) fn home(id: &str, count: u32) -> u32 {
    marked(id, count).unwrap_or_else(|| by_key(id, count))
}

/// A fresh id that names its partition.
pub(crate) fn generate_id(partition: u32) -> String {
    format!("{}{ID_MARK}{partition}", crate::job::compact_uuid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // CLUSTER KEYSLOT answers, from a Redis 7 server.
        assert_eq!(slot("123456789"), 12_739);
        assert_eq!(slot("alpha"), 865);
        assert_eq!(slot("bravo"), 8623);
        assert_eq!(slot("echo"), 14_438);
    }

    #[test]
    fn partitions_spread_over_the_slot_space() {
        let names = partition_names("speech", 3);
        assert_eq!(names.len(), 3);
        let bands = [(1365, 4096), (6826, 9557), (12_288, 15_018)];
        for (name, (lo, hi)) in names.iter().zip(bands) {
            assert!(name.starts_with("speech#"), "{name}");
            let s = slot(name);
            assert!((lo..hi).contains(&s), "{name} in slot {s}");
        }
        // Deterministic: every process names them alike.
        assert_eq!(names, partition_names("speech", 3));
        assert_eq!(partition_names("speech", 1), vec!["speech#0".to_owned()]);
    }

    #[test]
    fn ids_name_their_partition() {
        let id = generate_id(2);
        assert_eq!(marked(&id, 3), Some(2));
        assert_eq!(home(&id, 3), 2);
        // A mark beyond the count, or not a plain number, is no mark: the hash decides.
        assert_eq!(marked("job@7", 3), None);
        assert_eq!(marked("job@3", 3), None);
        assert_eq!(marked("job@+1", 3), None);
        assert_eq!(marked("job@", 3), None);
        assert_eq!(marked("job", 3), None);
        // Up to four digits (partitions stop at 256); a longer tail is no mark.
        assert_eq!(marked("job@0002", 3), Some(2));
        assert_eq!(marked("job@00002", 3), None);
        assert_eq!(home("job@7", 3), by_key("job@7", 3));
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference's test suite (64-bit FNV-1a): the placement of every
        // keyed job rests on this hash staying what it is.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn each_partition_takes_the_first_name_in_the_middle_of_its_stretch() {
        // The middle half of each of `count` equal stretches of the 16384 slots.
        let cases: [(u32, &[(u16, u16)]); 2] = [
            (3, &[(1365, 4096), (6826, 9557), (12_288, 15_018)]),
            (
                4,
                &[(1024, 3072), (5120, 7168), (9216, 11_264), (13_312, 15_360)],
            ),
        ];
        for (count, bands) in cases {
            let names = partition_names("speech", count);
            assert_eq!(names.len(), bands.len());
            for (i, (name, &(lo, hi))) in names.iter().zip(bands).enumerate() {
                let inside = |tag: &str| (lo..hi).contains(&slot(tag));
                // The plain name if it fits, else the first `.k` that does.
                let plain = format!("speech#{i}");
                let first = std::iter::once(plain.clone())
                    .chain((1..100_000).map(|k| format!("{plain}.{k}")))
                    .find(|tag| inside(tag));
                assert_eq!(first.as_deref(), Some(name.as_str()), "{count} partitions");
            }
        }
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut seen = [0u32; 4];
        for i in 0..400 {
            seen[by_key(&format!("request-{i}"), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
    }
}
