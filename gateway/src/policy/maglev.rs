//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, as Envoy and
//! Katran use it): a lookup table of a prime size in which each backend
//! takes near-equal shares, filled from each backend's own permutation of
//! the slots. Two tables built from the same backends are the same table,
//! whichever node builds them and in whatever order the backends are
//! listed, so every gateway of a fleet sends a key to the same backend with
//! no shared state; when one of N backends goes, about 1/N of the keys move.
//!
//! The hash is this module's own (FNV-1a, then a 64-bit finaliser), so the
//! table does not change with the Rust release a node was built with.

/// Envoy's default size: a prime well above 100 x the backends of a pool.
pub const DEFAULT_TABLE_SIZE: usize = 65_537;
/// Largest `maglev_table_size` accepted (each slot is 4 bytes, per pool).
pub const MAX_TABLE_SIZE: usize = 5_000_011;

/// A stable 64-bit hash of `bytes`.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // The murmur3 finaliser: every input bit reaches every output bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

pub fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// The lookup table over some backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Slot -> index into the `names` the table was built from.
    slots: Vec<u32>,
}

impl Table {
    /// Builds the table for backends named `names` (their addresses), with
    /// `size` slots (a prime). Empty when there is no backend.
    pub fn new(names: &[String], size: usize) -> Table {
        debug_assert!(is_prime(size));
        let n = names.len();
        if n == 0 {
            return Table { slots: Vec::new() };
        }
        // Filled in the order of the names sorted, so the list's own order
        // does not matter; `slots` still holds indices into `names`.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]));
        let m = size as u64;
        let perm: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| {
                let offset = hash(format!("offset {}", names[i]).as_bytes()) % m;
                let skip = hash(format!("skip {}", names[i]).as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut slots = vec![u32::MAX; size];
        let mut next = vec![0u64; n];
        let mut filled = 0;
        'fill: loop {
            for (k, &(offset, skip)) in perm.iter().enumerate() {
                let mut c = ((offset + next[k] * skip) % m) as usize;
                while slots[c] != u32::MAX {
                    next[k] += 1;
                    c = ((offset + next[k] * skip) % m) as usize;
                }
                slots[c] = order[k] as u32;
                next[k] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Table { slots }
    }

    /// The backend (index into the names) for a key's hash.
    pub fn pick(&self, key_hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(key_hash % self.slots.len() as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:9000", i + 1)).collect()
    }

    fn picks(t: &Table, names: &[String], keys: usize) -> Vec<String> {
        (0..keys).map(|k| names[t.pick(hash(format!("user-{k}").as_bytes())).unwrap()].clone()).collect()
    }

    #[test]
    fn the_hash_is_fixed() {
        // A node built with another Rust release must pick the same.
        assert_eq!((hash(b""), hash(b"user-1")), (0xefd0_1f60_ba99_2926, 0x41a2_fca5_c684_01c5));
        assert_ne!(hash(b"a"), hash(b"b"));
    }

    #[test]
    fn shares_are_near_equal_and_the_list_order_does_not_matter() {
        let n = names(7);
        let t = Table::new(&n, DEFAULT_TABLE_SIZE);
        let mut count = vec![0usize; n.len()];
        for s in &t.slots {
            count[*s as usize] += 1;
        }
        let (lo, hi) = (count.iter().min().unwrap(), count.iter().max().unwrap());
        assert!(hi - lo <= 1, "{count:?}");
        let mut shuffled = n.clone();
        shuffled.reverse();
        let u = Table::new(&shuffled, DEFAULT_TABLE_SIZE);
        assert_eq!(picks(&t, &n, 10_000), picks(&u, &shuffled, 10_000));
    }

    /// Over 100,000 keys: one of N backends goes, and the keys that move are
    /// its own plus a small share of the others'; it comes back, and every
    /// key is where it was.
    #[test]
    fn one_backend_going_moves_about_one_nth_of_the_keys() {
        const KEYS: usize = 100_000;
        for n in [3, 5, 10, 20] {
            let all = names(n);
            let before = picks(&Table::new(&all, DEFAULT_TABLE_SIZE), &all, KEYS);
            for gone in [0, n / 2, n - 1] {
                let rest: Vec<String> =
                    all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
                let during = picks(&Table::new(&rest, DEFAULT_TABLE_SIZE), &rest, KEYS);
                let moved = before.iter().zip(&during).filter(|(a, b)| a != b).count();
                let its_own = before.iter().filter(|b| **b == all[gone]).count();
                let others_moved = moved - its_own;
                let share = moved as f64 / KEYS as f64;
                eprintln!(
                    "maglev: {n} backends, one goes: {:.2}% of 100,000 keys move (1/N = {:.2}%), {others_moved} of them not the gone backend's",
                    100.0 * share,
                    100.0 / n as f64
                );
                assert!((share - 1.0 / n as f64).abs() < 0.02, "{n} backends: {share}");
                assert!(others_moved * 100 < KEYS, "{n} backends: {others_moved} keys of others moved");
                let back = picks(&Table::new(&all, DEFAULT_TABLE_SIZE), &all, KEYS);
                assert_eq!(back, before, "a backend came back and keys did not");
            }
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(2) && is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(9));
    }
}
