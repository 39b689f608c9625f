//! The in-memory key index: which log entries may hold a key's record.
//!
//! Records live in a log table keyed by a sequence number ([`crate::storage`]), so a write
//! appends at the log's end instead of landing at a random place of a tree keyed by the
//! (random) idempotency key. This index maps a key's 64-bit hash to the sequence numbers of
//! the records whose keys have that hash: almost always one. The log entry holds the full
//! key, and every lookup compares it, so a hash collision costs an extra read, never a wrong
//! answer. The hash is SipHash with keys drawn at random when the store opens, so clients
//! cannot choose keys that collide.
//!
//! The index is rebuilt from the log when the store opens. The committer changes it only
//! after a batch has committed, and the read path looks it up *before* starting its read
//! transaction, so every sequence number a reader finds is in its snapshot unless a later
//! commit removed it (the reader then reads the key as absent, a state it passed through).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use parking_lot::RwLock;

/// A hasher for keys that are already uniformly distributed hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in rather than panicking.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Hashed<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// One change of the index: the record of a key (with hash `hash`) moved from log entry
/// `old` to `new` (`None`: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Change {
    pub hash: u64,
    pub old: Option<u64>,
    pub new: Option<u64>,
}

/// Hash → sequence numbers. `first` holds one sequence number per hash; `more` the others of
/// hashes shared by several keys (empty unless keys collide).
#[derive(Default, Debug)]
struct Map {
    first: Hashed<u64>,
    more: Hashed<Vec<u64>>,
}

impl Map {
    fn candidates(&self, hash: u64) -> Candidates {
        Candidates {
            first: self.first.get(&hash).copied(),
            more: self.more.get(&hash).cloned().unwrap_or_default(),
        }
    }

    fn apply(&mut self, c: Change) {
        match (c.old, c.new) {
            (None, None) => {}
            (None, Some(new)) => self.add(c.hash, new),
            (Some(old), new) => {
                self.remove(c.hash, old);
                if let Some(new) = new {
                    self.add(c.hash, new);
                }
            }
        }
    }

    fn add(&mut self, hash: u64, seq: u64) {
        match self.first.entry(hash) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(seq);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(hash).or_default().push(seq);
            }
        }
    }

    fn remove(&mut self, hash: u64, seq: u64) {
        if self.first.get(&hash) == Some(&seq) {
            let promoted = self.more.get_mut(&hash).and_then(Vec::pop);
            if self.more.get(&hash).is_some_and(Vec::is_empty) {
                self.more.remove(&hash);
            }
            match promoted {
                Some(next) => {
                    self.first.insert(hash, next);
                }
                None => {
                    self.first.remove(&hash);
                }
            }
        } else if let Some(others) = self.more.get_mut(&hash) {
            others.retain(|&s| s != seq);
            if others.is_empty() {
                self.more.remove(&hash);
            }
        }
    }

    fn len(&self) -> usize {
        self.first.len() + self.more.values().map(Vec::len).sum::<usize>()
    }
}

/// The log entries that may hold a key's record.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Candidates {
    first: Option<u64>,
    more: Vec<u64>,
}

impl Candidates {
    /// The sequence numbers, most likely first.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.first.into_iter().chain(self.more.iter().copied())
    }
}

/// The shared index of a store.
pub(crate) struct Index {
    hasher: RandomState,
    map: RwLock<Map>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("entries", &self.map.read().len())
            .finish()
    }
}

impl Index {
    /// An empty index with room for `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Index {
        Index {
            hasher: RandomState::new(),
            map: RwLock::new(Map {
                first: Hashed::with_capacity_and_hasher(capacity, Default::default()),
                more: Hashed::default(),
            }),
        }
    }

    /// The hash of an encoded key.
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The log entries that may hold the record of the key with hash `hash`.
    pub fn candidates(&self, hash: u64) -> Candidates {
        self.map.read().candidates(hash)
    }

    /// Applies the changes of one committed batch, in order.
    pub fn apply(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut map = self.map.write();
        for &c in changes {
            map.apply(c);
        }
    }

    /// The sequence numbers of every hash that several log entries share (hash collisions,
    /// and duplicated entries of one key in a damaged or crafted file).
    pub fn shared(&self) -> Vec<Vec<u64>> {
        let map = self.map.read();
        map.more
            .keys()
            .map(|&hash| map.candidates(hash).iter().collect())
            .collect()
    }

    /// Number of indexed records.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(map: &Map, hash: u64) -> Vec<u64> {
        let mut v: Vec<u64> = map.candidates(hash).iter().collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn add_move_remove() {
        let mut m = Map::default();
        m.apply(Change {
            hash: 1,
            old: None,
            new: Some(10),
        });
        assert_eq!(seqs(&m, 1), [10]);
        m.apply(Change {
            hash: 1,
            old: Some(10),
            new: Some(11),
        });
        assert_eq!(seqs(&m, 1), [11]);
        m.apply(Change {
            hash: 1,
            old: Some(11),
            new: None,
        });
        assert_eq!(seqs(&m, 1), Vec::<u64>::new());
        assert_eq!(m.len(), 0);
        assert!(m.more.is_empty() && m.first.is_empty());
    }

    #[test]
    fn colliding_keys_keep_every_entry() {
        let mut m = Map::default();
        for seq in [1, 2, 3] {
            m.apply(Change {
                hash: 7,
                old: None,
                new: Some(seq),
            });
        }
        assert_eq!(seqs(&m, 7), [1, 2, 3]);
        // Move the one in `first`, then remove entries from both places.
        m.apply(Change {
            hash: 7,
            old: Some(1),
            new: Some(4),
        });
        assert_eq!(seqs(&m, 7), [2, 3, 4]);
        m.apply(Change {
            hash: 7,
            old: Some(2),
            new: None,
        });
        assert_eq!(seqs(&m, 7), [3, 4]);
        m.apply(Change {
            hash: 7,
            old: Some(3),
            new: None,
        });
        m.apply(Change {
            hash: 7,
            old: Some(4),
            new: None,
        });
        assert_eq!(m.len(), 0);
        assert!(m.more.is_empty() && m.first.is_empty());
    }

    #[test]
    fn the_hash_depends_on_the_store() {
        let (a, b) = (Index::with_capacity(0), Index::with_capacity(0));
        // Random keys per index: equal keys hash equally within one, not across (with
        // overwhelming probability).
        assert_eq!(a.hash(b"k"), a.hash(b"k"));
        assert_ne!(a.hash(b"k"), b.hash(b"k"));
    }
}
