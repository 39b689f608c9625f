//! The passes over the whole log at open, split across threads. The log's sequence numbers
//! are cut into ranges of about equal width, one thread reads each, and the findings of the
//! ranges are joined in order, so the outcome, the first bad entry included, is the one a
//! single pass in order gives. The engine serves the threads' reads from its shared page
//! cache; on two cores, a pass over ten million entries takes a little over half its time on one.

use std::ops::Range;

use redb::{ReadOnlyTable, ReadableTable, ReadableTableMetadata};

use super::progress::{LogPass, Tally};
use crate::error::{Error, Result};

/// Entries a thread reads at least: below that a thread costs more than it saves. Under
/// `cfg(test)`, small logs are split too, so the tests exercise the joining.
#[cfg(not(test))]
const MIN_PART: u64 = 1 << 16;
#[cfg(test)]
const MIN_PART: u64 = 2;
/// Threads a pass uses at most.
const MAX_PARTS: usize = 8;

/// The log table as a pass reads it.
pub(super) type LogTable = ReadOnlyTable<u64, &'static [u8]>;

/// A log entry as a part reads it: its sequence number and its bytes.
pub(super) type Entry<'t> = (u64, redb::AccessGuard<'t, &'static [u8]>);

/// The ranges of sequence numbers the threads of a pass over a log of `len` entries, from
/// `first` to `last`, read: at most `threads`, at least [`MIN_PART`] entries each on
/// average, together every sequence number (the first from 0, the last open-ended), in order.
pub(super) fn split(first: u64, last: u64, len: u64, threads: usize) -> Vec<Range<u64>> {
    let parts = (len / MIN_PART).clamp(1, threads.max(1) as u64);
    let width = u128::from(last.saturating_sub(first)) + 1;
    let bound = |i: u64| first + (width * u128::from(i) / u128::from(parts)) as u64;
    (0..parts)
        .map(|i| {
            let from = if i == 0 { 0 } else { bound(i) };
            let to = if i + 1 == parts {
                u64::MAX
            } else {
                bound(i + 1)
            };
            from..to
        })
        .collect()
}

/// Threads a pass may use on this machine.
fn threads() -> usize {
    if cfg!(test) {
        // Split even on one core, so that the tests exercise the joining.
        return 3;
    }
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_PARTS)
}

/// Runs `part` over every range of the log ([`split`]): the ranges after the first on scoped
/// threads of their own, joined before this returns (a range whose thread cannot be started
/// is read on this one). The parts' results, in the order of their ranges; the error of the
/// first range that failed. A part reads `log.range(range.start..)` and stops at `range.end`
/// ([`entries`]); it counts its entries into `pass` through its [`Tally`].
pub(super) fn over_log<T: Send>(
    log: &LogTable,
    pass: &LogPass,
    read_error: fn(redb::StorageError) -> Error,
    part: impl Fn(Range<u64>, &mut Tally<'_>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let (Some(first), Some(last)) = (
        log.first().map_err(read_error)?.map(|(k, _)| k.value()),
        log.last().map_err(read_error)?.map(|(k, _)| k.value()),
    ) else {
        return Ok(Vec::new());
    };
    let len = log.len().map_err(read_error)?;
    let ranges = split(first, last, len, threads());
    let run = |range: Range<u64>| part(range, &mut pass.tally());
    let run = &run;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let later: Vec<_> = ranges[1..]
            .iter()
            .map(|range| {
                let spawned = std::thread::Builder::new()
                    .name("idemstore-open".into())
                    .spawn_scoped(s, {
                        let range = range.clone();
                        move || run(range)
                    });
                (range.clone(), spawned.ok())
            })
            .collect();
        let mut results = vec![run(ranges[0].clone())];
        for (range, handle) in later {
            results.push(match handle {
                Some(h) => h
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                None => run(range),
            });
        }
        results
    });
    results.into_iter().collect()
}

/// The entries of `range`, as a part reads them: sequence number and bytes.
pub(super) fn entries<'t>(
    log: &'t LogTable,
    range: Range<u64>,
    read_error: fn(redb::StorageError) -> Error,
) -> Result<impl Iterator<Item = Result<Entry<'t>>> + 't> {
    let end = range.end;
    Ok(log
        .range(range.start..)
        .map_err(read_error)?
        .map(move |item| {
            let (seq, entry) = item.map_err(read_error)?;
            Ok((seq.value(), entry))
        })
        .take_while(move |item| {
            item.as_ref()
                .map_or(true, |(seq, _)| *seq < end || end == u64::MAX)
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(ranges: &[Range<u64>]) -> bool {
        ranges.first().is_some_and(|r| r.start == 0)
            && ranges.last().is_some_and(|r| r.end == u64::MAX)
            && ranges
                .windows(2)
                .all(|w| w[0].end == w[1].start && w[0].start < w[0].end)
    }

    #[test]
    fn the_ranges_cover_every_sequence_number_in_order() {
        for (first, last, len, threads) in [
            (0, 0, 1, 8),
            (5, 9, 5, 3),
            (0, 99, 100, 3),
            (10, 1_000_000, 500_000, 2),
            (0, u64::MAX, 6, 3),
            (u64::MAX - 3, u64::MAX, 4, 2),
        ] {
            let ranges = split(first, last, len, threads);
            assert!(
                covered(&ranges),
                "{first} {last} {len} {threads}: {ranges:?}"
            );
            assert!(ranges.len() <= threads, "{ranges:?}");
        }
    }

    #[test]
    fn a_short_log_is_read_in_one_part_and_a_long_one_in_parts_of_equal_width() {
        assert_eq!(split(0, 0, 1, 4), vec![0..u64::MAX]);
        assert_eq!(
            split(1, 100, 100, 4),
            vec![0..26, 26..51, 51..76, 76..u64::MAX]
        );
        // At least MIN_PART entries a part on average.
        assert_eq!(split(0, 9, 5, 4).len(), 2);
        assert_eq!(split(0, 9, 10, 0).len(), 1);
    }
}
