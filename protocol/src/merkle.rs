//! Merkle root over a list of digests, for task receipts.
//!
//! Leaves and inner nodes are hashed with different prefixes (as in
//! RFC 6962), so an inner node can never be passed off as a leaf. An odd
//! node at the end of a level is promoted unchanged. The empty list has the
//! root `SHA-256("")`.

use crate::Digest;

const LEAF: u8 = 0;
const NODE: u8 = 1;

/// The root over `leaves` in order.
pub fn root(leaves: &[Digest]) -> Digest {
    if leaves.is_empty() {
        return Digest::of(&[]);
    }
    let mut level: Vec<Digest> = leaves.iter().map(|l| Digest::of_parts(&[&[LEAF], &l.0])).collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => Digest::of_parts(&[&[NODE], &a.0, &b.0]),
                [a] => *a,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    level[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: u8) -> Vec<Digest> {
        (0..n).map(|i| Digest::of(&[i])).collect()
    }

    #[test]
    fn root_depends_on_every_leaf_and_order() {
        for n in 1..9 {
            let base = root(&leaves(n));
            for i in 0..n as usize {
                let mut changed = leaves(n);
                changed[i] = Digest::of(b"other");
                assert_ne!(root(&changed), base, "n={n} i={i}");
            }
            if n > 1 {
                let mut swapped = leaves(n);
                swapped.swap(0, 1);
                assert_ne!(root(&swapped), base);
            }
        }
    }

    #[test]
    fn leaf_is_not_its_own_root_preimage() {
        // A one-leaf tree's root is the hashed leaf, not the leaf itself.
        let l = Digest::of(b"x");
        assert_ne!(root(&[l]), l);
        assert_eq!(root(&[]), Digest::of(&[]));
    }
}
