//! The in-memory key index: which log entries may hold a key's record.
//!
//! Records live in a log table keyed by a sequence number ([`crate::storage`]), so a write
//! appends at the log's end instead of landing at a random place of a tree keyed by the
//! (random) idempotency key. This index maps a key's hash to the sequence numbers of the
//! records whose keys have that hash: almost always one. The log entry holds the full key,
//! and every lookup compares it, so a hash collision costs an extra read, never a wrong
//! answer. The hash is SipHash-1-3 with keys drawn at random when the index is first built,
//! so clients cannot choose keys that collide; the keys are saved with an index snapshot
//! ([`crate::storage`]) and come back with it.
//!
//! # Layout
//!
//! Open addressing with 12-byte slots (a 32-bit tag from the hash, a 64-bit sequence number),
//! Robin Hood ordered, in 1,024 segments chosen by the tag's top bits. Within a segment a
//! slot's home is the rest of the tag scaled to the segment's size, and an entry never sits
//! further from its home than the entries after it: a lookup walks from its home and stops at
//! an empty slot or at an entry closer to its own home, so an absent key costs a few slots
//! even at high load. The table is sized from the log's length when it is built (no growth
//! while it fills); each segment then grows on its own, by a quarter, when it is
//! [`MAX_LOAD`] full, so a segment stays between [`MIN_LOAD`] and [`MAX_LOAD`] full and the
//! table costs 14 to 18 bytes per record, with no moment at which two copies of the whole
//! table exist (growing copies one segment, a thousandth of it). Deletions shift the entries
//! after them back (no tombstones).
//!
//! Only 32 bits of the hash are kept: two keys share a tag with probability 2⁻³² per pair
//! of entries near the same home, which costs one extra read of the log when it happens.
//!
//! # Publication
//!
//! The index is rebuilt from the log, or loaded from a snapshot, when the store opens. The
//! committer changes it only after a batch has committed, and the read path looks it up
//! *before* starting its read transaction, so every sequence number a reader finds is in its
//! snapshot unless a later commit removed it (the reader then reads the key as absent, a
//! state it passed through).

use std::hash::{BuildHasher, Hasher, RandomState};

use parking_lot::RwLock;
use siphasher::sip::SipHasher13;

/// The load above which the table grows.
const MAX_LOAD: f64 = 0.875;
/// The load of a table just built or just grown (the table grows by a quarter).
const MIN_LOAD: f64 = 0.7;
/// The load a table is built at from a known number of records.
const BUILD_LOAD: f64 = 0.8;
/// Bytes of one slot in a snapshot: tag (`u32`), sequence number (`u64`), little-endian.
pub(crate) const SLOT_BYTES: usize = 12;

/// One change of the index: the record of a key (with hash `hash`) moved from log entry
/// `old` to `new` (`None`: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Change {
    pub hash: u64,
    pub old: Option<u64>,
    pub new: Option<u64>,
}

/// A slot: `tag` 0 is empty.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(C)]
struct Slot {
    tag: u32,
    lo: u32,
    hi: u32,
}

impl Slot {
    fn new(tag: u32, seq: u64) -> Slot {
        Slot {
            tag,
            lo: seq as u32,
            hi: (seq >> 32) as u32,
        }
    }

    fn seq(&self) -> u64 {
        u64::from(self.lo) | (u64::from(self.hi) << 32)
    }

    fn is_empty(&self) -> bool {
        self.tag == 0
    }
}

/// The tag of a hash: its high 32 bits, never 0 (the empty slot).
fn tag_of(hash: u64) -> u32 {
    ((hash >> 32) as u32).max(1)
}

/// The digest of one entry of the index: the key with hash `hash` at log entry `seq`. Summed
/// (wrapping) over a set of entries it is the set's digest: a snapshot's slots
/// ([`Loader::digest`]) and the log entries they index give the same sum, and entries moved
/// to another sequence number, or rewritten under another key, give another one (but for a
/// chance of 2⁻⁶⁴).
pub(crate) fn entry_digest(hash: u64, seq: u64) -> u64 {
    slot_digest(tag_of(hash), seq)
}

/// [`entry_digest`] of a slot: its tag and sequence number.
fn slot_digest(tag: u32, seq: u64) -> u64 {
    // SplitMix64's finalizer, of the sequence number and of the pair.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(mix(seq.wrapping_add(0x9E37_79B9_7F4A_7C15)) ^ u64::from(tag))
}

/// The slots a segment of `count` entries is given, at load `load`.
fn capacity_for(count: usize, load: f64) -> usize {
    ((count as f64 / load).ceil() as usize)
        .max(count + 1)
        .max(MIN_SEGMENT)
}

/// Segments of the table: the top [`SEGMENT_BITS`] bits of a tag choose one. Each grows on
/// its own, so growing costs a copy of one segment, not of the whole table.
const SEGMENT_BITS: u32 = 10;
const SEGMENTS: usize = 1 << SEGMENT_BITS;
/// The fewest slots a segment has.
const MIN_SEGMENT: usize = 4;

/// The segment of a tag.
fn segment_of(tag: u32) -> usize {
    (tag >> (32 - SEGMENT_BITS)) as usize
}

/// One open-addressing table: slots and the number of entries.
#[derive(Debug)]
struct Segment {
    slots: Vec<Slot>,
    len: usize,
}

/// The index's table: its segments, the number of entries, and the highest sequence number
/// ever added.
#[derive(Debug)]
struct Table {
    segments: Vec<Segment>,
    len: usize,
    /// The highest sequence number ever added (`None`: nothing was).
    max_added: Option<u64>,
    /// Changes applied since the table was built or loaded.
    generation: u64,
}

impl Table {
    /// A table sized for `count` entries (spread evenly over the segments, as hashes are).
    fn with_capacity(count: usize) -> Table {
        let per = capacity_for(count.div_ceil(SEGMENTS), BUILD_LOAD);
        Table {
            segments: (0..SEGMENTS)
                .map(|_| Segment {
                    slots: vec![Slot::default(); per],
                    len: 0,
                })
                .collect(),
            len: 0,
            max_added: None,
            generation: 0,
        }
    }

    fn slots(&self) -> usize {
        self.segments.iter().map(|s| s.slots.len()).sum()
    }

    fn candidates(&self, hash: u64) -> Candidates {
        let tag = tag_of(hash);
        self.segments[segment_of(tag)].candidates(tag)
    }

    fn apply(&mut self, c: Change) {
        self.generation += 1;
        let tag = tag_of(c.hash);
        let segment = &mut self.segments[segment_of(tag)];
        if let Some(old) = c.old
            && segment.remove(tag, old)
        {
            self.len -= 1;
        }
        if let Some(new) = c.new {
            segment.add(tag, new);
            self.len += 1;
            self.max_added = Some(self.max_added.map_or(new, |m| m.max(new)));
        }
    }

    fn shared(&self) -> Vec<Vec<u64>> {
        self.segments.iter().flat_map(Segment::shared).collect()
    }
}

impl Segment {
    fn cap(&self) -> usize {
        self.slots.len()
    }

    /// The home of a tag: the bits below the segment's, scaled to the segment's size.
    fn home(&self, tag: u32) -> usize {
        let local = tag << SEGMENT_BITS;
        ((u64::from(local) * self.cap() as u64) >> 32) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.cap() { 0 } else { i + 1 }
    }

    /// How far the entry in slot `i` sits from its home.
    fn displacement(&self, i: usize) -> usize {
        let home = self.home(self.slots[i].tag);
        if i >= home {
            i - home
        } else {
            i + self.cap() - home
        }
    }

    /// Calls `f` on the slot index of every entry with tag `tag`, in probe order, until it
    /// returns `true`; returns that index.
    fn probe(&self, tag: u32, mut f: impl FnMut(usize) -> bool) -> Option<usize> {
        let mut i = self.home(tag);
        // Bounded by the table's size: a loaded snapshot is checked for empty slots, never for
        // its order, and a lookup must end whatever the order.
        for d in 0..self.cap() {
            let slot = self.slots[i];
            if slot.is_empty() || self.displacement(i) < d {
                return None;
            }
            if slot.tag == tag && f(i) {
                return Some(i);
            }
            i = self.next(i);
        }
        None
    }

    fn candidates(&self, tag: u32) -> Candidates {
        let mut found = Candidates::default();
        self.probe(tag, |i| {
            let seq = self.slots[i].seq();
            match found.first {
                None => found.first = Some(seq),
                Some(_) => found.more.push(seq),
            }
            false
        });
        found
    }

    fn add(&mut self, tag: u32, seq: u64) {
        if (self.len + 1) as f64 > self.cap() as f64 * MAX_LOAD {
            self.grow();
        }
        self.insert(Slot::new(tag, seq));
    }

    /// Robin Hood insertion: the entry takes the place of the first one closer to its home.
    fn insert(&mut self, mut entry: Slot) {
        let mut i = self.home(entry.tag);
        let mut d = 0;
        // There is always an empty slot (the load stays below 1), so this ends.
        loop {
            if self.slots[i].is_empty() {
                self.slots[i] = entry;
                self.len += 1;
                return;
            }
            let resident = self.displacement(i);
            if resident < d {
                std::mem::swap(&mut self.slots[i], &mut entry);
                d = resident;
            }
            i = self.next(i);
            d += 1;
        }
    }

    /// Removes the entry (`tag`, `seq`); `false` when there is none.
    fn remove(&mut self, tag: u32, seq: u64) -> bool {
        let Some(mut i) = self.probe(tag, |i| self.slots[i].seq() == seq) else {
            return false;
        };
        // Backward shift: the entries after it move one slot closer to their homes.
        loop {
            let j = self.next(i);
            if self.slots[j].is_empty() || self.displacement(j) == 0 {
                break;
            }
            self.slots[i] = self.slots[j];
            i = j;
        }
        self.slots[i] = Slot::default();
        self.len -= 1;
        true
    }

    /// Rebuilds the segment a quarter larger (to [`MIN_LOAD`] at least).
    fn grow(&mut self) {
        let cap = (self.cap() + self.cap() / 4).max(capacity_for(self.len + 1, MIN_LOAD));
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); cap]);
        self.len = 0;
        for slot in old.into_iter().filter(|s| !s.is_empty()) {
            self.insert(slot);
        }
    }

    /// The sequence numbers of every tag that several entries share.
    fn shared(&self) -> Vec<Vec<u64>> {
        let Some(start) = self.slots.iter().position(Slot::is_empty) else {
            return Vec::new();
        };
        // Entries are in the order of their homes, starting after an empty slot: the entries
        // of one tag are among those of one home, which are consecutive.
        let mut out = Vec::new();
        let mut group: Vec<Slot> = Vec::new();
        let mut flush = |group: &mut Vec<Slot>| {
            if group.len() > 1 {
                group.sort_unstable_by_key(|s| s.tag);
                for run in group.chunk_by(|a, b| a.tag == b.tag) {
                    if run.len() > 1 {
                        out.push(run.iter().map(Slot::seq).collect());
                    }
                }
            }
            group.clear();
        };
        let mut home = None;
        for k in 1..=self.cap() {
            let i = (start + k) % self.cap();
            let slot = self.slots[i];
            if slot.is_empty() {
                flush(&mut group);
                home = None;
                continue;
            }
            let h = self.home(slot.tag);
            if home != Some(h) {
                flush(&mut group);
                home = Some(h);
            }
            group.push(slot);
        }
        flush(&mut group);
        out
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
    /// The SipHash keys.
    keys: (u64, u64),
    table: RwLock<Table>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("entries", &self.table.read().len)
            .finish()
    }
}

/// What a snapshot of the index holds besides its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    /// The SipHash keys.
    pub keys: (u64, u64),
    /// Slots in the table.
    pub capacity: u64,
    /// Entries in the table.
    pub len: u64,
    /// Above every sequence number the table holds: the highest ever added, plus one (0 when
    /// nothing was added).
    pub seq_end: u64,
    /// Changes applied to the index since it was built or loaded (not saved).
    pub generation: u64,
}

impl Index {
    /// An empty index with room for `capacity` keys, and new random hash keys.
    pub fn with_capacity(capacity: usize) -> Index {
        let random = RandomState::new();
        Index {
            keys: (random.hash_one(0u8), random.hash_one(1u8)),
            table: RwLock::new(Table::with_capacity(capacity)),
        }
    }

    /// The hash of an encoded key.
    pub fn hash(&self, key: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write(key);
        h.finish()
    }

    /// The log entries that may hold the record of the key with hash `hash`.
    pub fn candidates(&self, hash: u64) -> Candidates {
        self.table.read().candidates(hash)
    }

    /// Applies the changes of one committed batch, in order.
    pub fn apply(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut table = self.table.write();
        for &c in changes {
            table.apply(c);
        }
    }

    /// The sequence numbers of every tag that several log entries share (hash collisions,
    /// and duplicated entries of one key in a damaged or crafted file).
    pub fn shared(&self) -> Vec<Vec<u64>> {
        self.table.read().shared()
    }

    /// Number of indexed records.
    pub fn len(&self) -> usize {
        self.table.read().len
    }

    /// Bytes the table's slots take.
    pub fn heap_bytes(&self) -> usize {
        self.table.read().slots() * std::mem::size_of::<Slot>()
    }

    /// Runs `f` with the index's shape and a view of its segments, under the index's read
    /// lock: the shape and the slots agree.
    pub fn with_snapshot<T>(&self, f: impl FnOnce(Shape, &View<'_>) -> T) -> T {
        let table = self.table.read();
        let shape = Shape {
            keys: self.keys,
            capacity: table.slots() as u64,
            len: table.len as u64,
            seq_end: table.max_added.map_or(0, |m| m + 1),
            generation: table.generation,
        };
        f(shape, &View { table: &table })
    }

    /// Changes applied since the index was built or loaded.
    pub fn generation(&self) -> u64 {
        self.table.read().generation
    }
}

/// The segments of an index, for its snapshot: one chunk of slots each.
pub(crate) struct View<'t> {
    table: &'t Table,
}

impl View<'_> {
    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.table.segments.len()
    }

    /// Bytes of segment `i`'s slots ([`SLOT_BYTES`] each).
    pub fn segment_bytes(&self, i: usize) -> usize {
        self.table.segments[i].slots.len() * SLOT_BYTES
    }

    /// Writes segment `i`'s slots into `out`, [`View::segment_bytes`] long.
    pub fn write_segment(&self, i: usize, out: &mut [u8]) {
        for (slot, bytes) in self.table.segments[i]
            .slots
            .iter()
            .zip(out.chunks_exact_mut(SLOT_BYTES))
        {
            bytes[..4].copy_from_slice(&slot.tag.to_le_bytes());
            bytes[4..].copy_from_slice(&slot.seq().to_le_bytes());
        }
    }
}

/// Reads an index back from a snapshot: its shape, then each segment's slots in order.
pub(crate) struct Loader {
    shape: Shape,
    segments: Vec<Segment>,
    slots: u64,
    entries: u64,
    /// The digest of the entries loaded so far ([`entry_digest`]).
    digest: u64,
}

impl Loader {
    /// A loader of an index of shape `shape`; `None` for a shape no index has (more entries
    /// than slots).
    pub fn new(shape: Shape) -> Option<Loader> {
        if shape.len >= shape.capacity {
            return None;
        }
        Some(Loader {
            shape,
            segments: Vec::with_capacity(SEGMENTS),
            slots: 0,
            entries: 0,
            digest: 0,
        })
    }

    /// Adds the next segment, whose slots are `chunk`; `false` when it does not hold whole
    /// slots, has no empty slot, overflows the table, or holds a tag of another segment or
    /// a sequence number at or above the shape's end.
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        let index = self.segments.len();
        let count = chunk.len() / SLOT_BYTES;
        if !chunk.len().is_multiple_of(SLOT_BYTES)
            || count == 0
            || index == SEGMENTS
            || self.slots + count as u64 > self.shape.capacity
        {
            return false;
        }
        let mut slots = Vec::new();
        if slots.try_reserve_exact(count).is_err() {
            return false;
        }
        let mut len = 0;
        for b in chunk.chunks_exact(SLOT_BYTES) {
            let tag = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let mut seq = [0; 8];
            seq.copy_from_slice(&b[4..]);
            let seq = u64::from_le_bytes(seq);
            if tag != 0 {
                if seq >= self.shape.seq_end || segment_of(tag) != index {
                    return false;
                }
                len += 1;
                self.digest = self.digest.wrapping_add(slot_digest(tag, seq));
            }
            slots.push(Slot::new(tag, seq));
        }
        if len == count {
            return false;
        }
        self.slots += count as u64;
        self.entries += len as u64;
        self.segments.push(Segment { slots, len });
        true
    }

    /// The digest of the entries loaded so far ([`entry_digest`]).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// The index; `None` unless every segment came and they hold the shape's numbers of
    /// slots and entries.
    pub fn finish(self) -> Option<Index> {
        if self.segments.len() != SEGMENTS
            || self.slots != self.shape.capacity
            || self.entries != self.shape.len
        {
            return None;
        }
        Some(Index {
            keys: self.shape.keys,
            table: RwLock::new(Table {
                segments: self.segments,
                len: self.entries as usize,
                max_added: self.shape.seq_end.checked_sub(1),
                generation: 0,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(t: &Table, hash: u64) -> Vec<u64> {
        let mut v: Vec<u64> = t.candidates(hash).iter().collect();
        v.sort_unstable();
        v
    }

    fn change(hash: u64, old: Option<u64>, new: Option<u64>) -> Change {
        Change { hash, old, new }
    }

    /// Every entry sits no further from its home than the one after it (Robin Hood order).
    fn assert_ordered(t: &Table) {
        for t in &t.segments {
            assert_segment_ordered(t);
        }
    }

    fn assert_segment_ordered(t: &Segment) {
        for i in 0..t.cap() {
            let j = t.next(i);
            if !t.slots[j].is_empty() {
                assert!(
                    t.slots[i].is_empty() && t.displacement(j) == 0
                        || !t.slots[i].is_empty() && t.displacement(j) <= t.displacement(i) + 1,
                    "slot {j} is out of order"
                );
            }
        }
    }

    #[test]
    fn add_move_remove() {
        let mut m = Table::with_capacity(0);
        let h = 1 << 40;
        m.apply(change(h, None, Some(10)));
        assert_eq!(seqs(&m, h), [10]);
        m.apply(change(h, Some(10), Some(11)));
        assert_eq!(seqs(&m, h), [11]);
        m.apply(change(h, Some(11), None));
        assert_eq!(seqs(&m, h), Vec::<u64>::new());
        assert_eq!(m.len, 0);
        assert!(
            m.segments
                .iter()
                .all(|s| s.slots.iter().all(Slot::is_empty))
        );
        assert_eq!(m.max_added, Some(11));
    }

    #[test]
    fn colliding_keys_keep_every_entry() {
        let mut m = Table::with_capacity(0);
        let h = 7 << 32;
        for seq in [1, 2, 3] {
            m.apply(change(h, None, Some(seq)));
        }
        assert_eq!(seqs(&m, h), [1, 2, 3]);
        assert_eq!(m.shared(), vec![vec![1, 2, 3]]);
        m.apply(change(h, Some(1), Some(4)));
        assert_eq!(seqs(&m, h), [2, 3, 4]);
        m.apply(change(h, Some(2), None));
        assert_eq!(seqs(&m, h), [3, 4]);
        m.apply(change(h, Some(3), None));
        m.apply(change(h, Some(4), None));
        assert_eq!(m.len, 0);
        assert!(m.shared().is_empty());
    }

    /// Random adds, moves and removals against a plain map of sets, through growth, with
    /// tags crowded into a few homes (so runs are long and wrap around the table's end).
    #[test]
    fn agrees_with_a_plain_map() {
        use std::collections::{BTreeMap, BTreeSet};
        let mut t = Table::with_capacity(0);
        let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut next_seq = 0;
        for step in 0..20_000u64 {
            // Few distinct tags, some at the very top (homes at the table's end).
            let hash = match rand() % 3 {
                0 => (rand() % 40) << 32,
                1 => (u64::from(u32::MAX) - rand() % 8) << 32,
                _ => rand(),
            };
            let held: Vec<u64> = model
                .get(&hash)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            let c = if held.is_empty() || rand() % 3 == 0 {
                next_seq += 1;
                change(hash, None, Some(next_seq))
            } else {
                let old = held[(rand() % held.len() as u64) as usize];
                if rand() % 2 == 0 {
                    next_seq += 1;
                    change(hash, Some(old), Some(next_seq))
                } else {
                    change(hash, Some(old), None)
                }
            };
            t.apply(c);
            let set = model.entry(hash).or_default();
            if let Some(old) = c.old {
                set.remove(&old);
            }
            if let Some(new) = c.new {
                set.insert(new);
            }
            if step % 997 == 0 {
                assert_ordered(&t);
                // Every entry of a hash with the same tag is a candidate.
                let mut by_tag: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
                for (&h, set) in &model {
                    by_tag.entry(tag_of(h)).or_default().extend(set);
                }
                for &hash in model.keys() {
                    let want: Vec<u64> = by_tag[&tag_of(hash)].iter().copied().collect();
                    assert_eq!(seqs(&t, hash), want);
                }
            }
        }
        assert_ordered(&t);
        assert_eq!(t.len, model.values().map(BTreeSet::len).sum::<usize>());
        for s in &t.segments {
            assert!(s.len as f64 <= s.cap() as f64 * MAX_LOAD);
        }
        assert_eq!(t.len, t.segments.iter().map(|s| s.len).sum::<usize>());
    }

    #[test]
    fn the_hash_depends_on_the_index() {
        let (a, b) = (Index::with_capacity(0), Index::with_capacity(0));
        // Random keys per index: equal keys hash equally within one, not across (with
        // overwhelming probability).
        assert_eq!(a.hash(b"k"), a.hash(b"k"));
        assert_ne!(a.hash(b"k"), b.hash(b"k"));
    }

    #[test]
    fn a_snapshot_gives_back_the_same_index() {
        let a = Index::with_capacity(1000);
        let changes: Vec<Change> = (0..1000u64)
            .map(|i| change(a.hash(&i.to_be_bytes()), None, Some(i + 5)))
            .collect();
        a.apply(&changes);
        let (shape, chunks) = a.with_snapshot(|shape, view| {
            let chunks: Vec<Vec<u8>> = (0..view.segments())
                .map(|i| {
                    let mut bytes = vec![0; view.segment_bytes(i)];
                    view.write_segment(i, &mut bytes);
                    bytes
                })
                .collect();
            (shape, chunks)
        });
        assert_eq!((shape.len, shape.seq_end), (1000, 1005));
        let load = |shape: Shape, chunks: &[Vec<u8>]| {
            let mut loader = Loader::new(shape)?;
            chunks
                .iter()
                .all(|c| loader.push(c))
                .then(|| loader.finish())
                .flatten()
        };
        let b = load(shape, &chunks).unwrap();
        for i in 0..1000u64 {
            let h = a.hash(&i.to_be_bytes());
            assert_eq!(b.hash(&i.to_be_bytes()), h);
            assert!(b.candidates(h).iter().any(|s| s == i + 5));
        }
        assert_eq!(b.len(), 1000);
        // A segment missing, torn, or in another's place; another number of entries: refused.
        assert!(load(shape, &chunks[1..]).is_none());
        let mut torn = chunks.clone();
        torn[3].pop();
        assert!(load(shape, &torn).is_none());
        let full = chunks
            .iter()
            .position(|c| c.chunks(SLOT_BYTES).any(|s| s[..4] != [0; 4]));
        let mut moved = chunks.clone();
        moved.swap(full.unwrap(), full.unwrap() + 1);
        assert!(load(shape, &moved).is_none());
        let fewer = Shape { len: 999, ..shape };
        assert!(load(fewer, &chunks).is_none());
        // Sequence numbers at or above the end the shape claims: refused.
        let below = Shape {
            seq_end: 1000,
            ..shape
        };
        assert!(load(below, &chunks).is_none());
    }

    #[test]
    fn a_built_table_costs_under_twenty_bytes_per_entry() {
        // (Small tables cost more: 1,024 segments of at least 4 slots, 48 KiB.)
        for n in [60_000usize, 200_000] {
            let index = Index::with_capacity(n);
            let changes: Vec<Change> = (0..n as u64)
                .map(|i| change(index.hash(&i.to_be_bytes()), None, Some(i)))
                .collect();
            index.apply(&changes);
            assert_eq!(index.len(), n);
            let per_entry = index.heap_bytes() as f64 / n as f64;
            assert!(per_entry <= 20.0, "{per_entry} bytes per entry at {n}");
            // And it stays there as it grows.
            let more: Vec<Change> = (n as u64..3 * n as u64)
                .map(|i| change(index.hash(&i.to_be_bytes()), None, Some(i)))
                .collect();
            index.apply(&more);
            let per_entry = index.heap_bytes() as f64 / (3 * n) as f64;
            assert!(
                per_entry <= 20.0,
                "{per_entry} bytes per entry at {}",
                3 * n
            );
        }
    }
}
