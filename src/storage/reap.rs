//! The reaper's passes over the expiry index: deleting dead records in bounded steps, and
//! re-filing expiry entries after a clock correction.

use std::cell::Cell;

use super::*;
use crate::index::Change;

/// What one reaping pass did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReapPass {
    /// Records deleted.
    pub deleted: u64,
    /// Index entries the pass examined (its cost).
    pub examined: usize,
    /// Whether the pass stopped at its limit (more records may be dead).
    pub more: bool,
}

impl WriteTables<'_> {
    /// Re-files the expiry entries of records that a clock correction moved back, visiting
    /// at most `limit` index entries from death time `from` upwards. Returns where the next
    /// pass starts, `None` once the index is done. Records written under a clock that ran
    /// ahead are filed under deaths far in the future; this moves each under its death as
    /// read now, so the reaper finds it when it is due. Runs only after a correction, once
    /// over the entries filed above the corrected time.
    pub fn resweep(&mut self, from: u64, limit: usize) -> Result<Option<u64>> {
        let index_error = |e| Error::storage("re-filing the expiry index", e);
        let mut visited = Vec::with_capacity(limit.min(1024));
        for item in self
            .deaths
            .range((from, 0)..)
            .map_err(index_error)?
            .take(limit + 1)
        {
            let (k, _) = item.map_err(index_error)?;
            visited.push(k.value());
        }
        let next = (visited.len() > limit).then(|| visited[limit].0);
        visited.truncate(limit);
        for (filed, seq) in visited {
            let death = match self.log.get(seq).map_err(index_error)? {
                None => None,
                // Damaged: left where it is; readers report it.
                Some(entry) => match entry_dies_at(entry.value(), &self.corrections) {
                    Ok((_, death)) => Some(death),
                    Err(_) => continue,
                },
            };
            if death != Some(filed) {
                self.deaths.remove((filed, seq)).map_err(index_error)?;
                if let Some(death) = death {
                    self.deaths.insert((death, seq), ()).map_err(index_error)?;
                }
            }
        }
        self.set_resweep(next)?;
        Ok(next)
    }

    /// Deletes the records dead at `now`, visiting at most `limit` index entries, oldest death
    /// first. Cost: O(entries visited), never a scan of live records (the index range ends
    /// at `now`).
    pub fn reap(&mut self, now: u64, limit: usize) -> Result<ReapPass> {
        let mut due: Vec<(u64, u64)> = Vec::with_capacity(limit.min(1024));
        let examined = Cell::new(0usize);
        {
            let index_error = |e| Error::storage("draining the expiry index", e);
            let all = |_: (u64, u64), _: ()| {
                examined.set(examined.get() + 1);
                true
            };
            let drained = self
                .deaths
                .extract_from_if::<(u64, u64), _>(..=(now, u64::MAX), all)
                .map_err(index_error)?;
            for entry in drained.take(limit) {
                let (k, _) = entry.map_err(index_error)?;
                due.push(k.value());
            }
        }
        let more = due.len() == limit;
        // The log entries go in runs of nearby sequence numbers, each removed in one pass over
        // its range (redb rebuilds each leaf once, not once per entry). A run never spans more
        // than `MAX_GAP - 1` live entries between two dead ones, so the cost stays proportional
        // to the dead entries.
        const MAX_GAP: u64 = 16;
        due.sort_unstable_by_key(|&(_, seq)| seq);
        let mut removed: Vec<(u64, Vec<u8>)> = Vec::with_capacity(due.len());
        let mut reindex: Vec<(u64, u64)> = Vec::new();
        let mut start = 0;
        while start < due.len() {
            let mut end = start + 1;
            while end < due.len() && due[end].1 - due[end - 1].1 <= MAX_GAP {
                end += 1;
            }
            let run = &due[start..end];
            let (first, last) = (run[0].1, run[run.len() - 1].1);
            let mut next = 0;
            self.log
                .retain_in(first..=last, |seq, entry| {
                    while next < run.len() && run[next].1 < seq {
                        next += 1;
                    }
                    if run.get(next).is_none_or(|&(_, s)| s != seq) {
                        return true; // a live entry between two dead ones
                    }
                    match entry_dies_at(entry, &self.corrections) {
                        Ok((key, at)) if at <= now => {
                            removed.push((seq, key.to_vec()));
                            false
                        }
                        // Not dead after all (an index entry that disagrees with its record):
                        // keep it, indexed at its own death time.
                        Ok((_, at)) => {
                            reindex.push((at, seq));
                            true
                        }
                        // Damaged: keep it (readers report it); its expiry entry is gone.
                        Err(_) => true,
                    }
                })
                .map_err(|e| Error::storage("deleting dead records", e))?;
            start = end;
        }
        for (at, seq) in reindex {
            self.deaths
                .insert((at, seq), ())
                .map_err(|e| Error::storage("restoring an expiry entry", e))?;
        }
        let deleted = removed.len() as u64;
        let hashed: Vec<(u64, u64)> = removed
            .iter()
            .map(|(seq, key)| (*seq, self.stored.index.hash(key)))
            .collect();
        self.journal_deletions(hashed.into_iter())?;
        for (seq, key) in removed {
            self.changes.push(Change {
                hash: self.stored.index.hash(&key),
                old: Some(seq),
                new: None,
            });
            self.located.insert(key, None);
        }
        Ok(ReapPass {
            deleted,
            examined: examined.get(),
            more,
        })
    }
}
