//! The idempotency state machine as pure functions: a decoded record (or none) and `now` in,
//! the outcome and the record to write out. No I/O, so it is tested on its own and applied
//! many times inside one write transaction by the committer.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::outcome::{Completed, Recovered};
use crate::record::{Record, State};

/// What `begin` should do with a key, decided from its current record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BeginStep {
    /// Absent, dead, or in flight with an expired lease and the same fingerprint: a write is
    /// needed ([`claim`]). Holds the record to take over (`None`: a fresh claim).
    Claim(Option<Record>),
    /// No write: the answer as it is.
    Refuse(Refusal),
}

/// An answer of `begin` that writes nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Completed, alive, same fingerprint: its response.
    Replay(Completed),
    /// In flight under a live lease, same fingerprint; nanoseconds left on the lease.
    InFlight { retry_after: u64 },
    /// Alive with another fingerprint.
    Mismatch,
}

/// Decides `begin` (absent → claim; completed → replay or mismatch; in flight → 409,
/// takeover or mismatch) without changing anything.
pub(crate) fn decide_begin(record: Option<Record>, fp: &Fingerprint, now: u64) -> BeginStep {
    let Some(record) = record.filter(|r| !r.is_dead(now)) else {
        return BeginStep::Claim(None);
    };
    if !fp.ct_eq(&record.fingerprint) {
        return BeginStep::Refuse(Refusal::Mismatch);
    }
    match record.state {
        State::Completed {
            completed_at,
            expires_at,
            response,
        } => BeginStep::Refuse(Refusal::Replay(Completed {
            response,
            token: record.token,
            completed_at,
            expires_at,
        })),
        State::InFlight {
            lease_expires_at, ..
        } if now < lease_expires_at => BeginStep::Refuse(Refusal::InFlight {
            retry_after: lease_expires_at - now,
        }),
        State::InFlight { .. } => BeginStep::Claim(Some(record)),
    }
}

/// A granted claim: the record to store, and what the new holder learns.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    pub record: Record,
    pub token: u64,
    pub lease_expires_at: u64,
    /// For a takeover of an expired (or released) lease: the earlier attempt.
    pub recovered: Option<Recovered>,
}

/// Claims a key for which [`decide_begin`] said [`BeginStep::Claim`] with `current`, under
/// a fresh `token`.
pub(crate) fn claim(
    current: Option<Record>,
    fp: &Fingerprint,
    token: u64,
    now: u64,
    ttl: u64,
    lease: u64,
) -> Grant {
    let lease_expires_at = now.saturating_add(lease);
    let in_flight = |created_at, ttl_deadline, attempt, checkpoint| Record {
        fingerprint: *fp.as_bytes(),
        token,
        state: State::InFlight {
            created_at,
            ttl_deadline,
            lease_expires_at,
            attempt,
            checkpoint,
        },
    };
    match current.filter(|r| !r.is_dead(now)) {
        Some(Record {
            token: previous_token,
            state:
                State::InFlight {
                    created_at,
                    ttl_deadline,
                    attempt,
                    checkpoint,
                    ..
                },
            ..
        }) => {
            let attempt = attempt.saturating_add(1);
            let recovered = Recovered {
                previous_token,
                attempt,
                checkpoint: checkpoint.clone(),
            };
            Grant {
                record: in_flight(created_at, ttl_deadline, attempt, checkpoint),
                token,
                lease_expires_at,
                recovered: Some(recovered),
            }
        }
        _ => Grant {
            record: in_flight(now, now.saturating_add(ttl), 1, None),
            token,
            lease_expires_at,
            recovered: None,
        },
    }
}

/// A lease operation that keeps the record in flight.
#[derive(Clone, Debug)]
pub(crate) enum Hold {
    /// `lease_expires_at = now + nanos`.
    Extend(u64),
    /// Store a recovery point.
    Checkpoint(Vec<u8>),
    /// Best-effort release on drop: `lease_expires_at = now`.
    Release,
}

/// The fields of an in-flight record, as the holder of its lease finds them.
struct Held<'r> {
    record: &'r Record,
    created_at: u64,
    ttl_deadline: u64,
    lease_expires_at: u64,
    attempt: u32,
    checkpoint: &'r Option<Vec<u8>>,
}

/// The record as the holder of `token` sees it: in flight and alive under that token, or
/// [`Error::LeaseLost`] (absent, dead, completed, or carrying another token).
fn held(record: Option<&Record>, token: u64, now: u64) -> Result<Held<'_>> {
    let lost = Error::LeaseLost { token };
    let Some(record) = record.filter(|r| !r.is_dead(now) && r.token == token) else {
        return Err(lost);
    };
    match &record.state {
        State::InFlight {
            created_at,
            ttl_deadline,
            lease_expires_at,
            attempt,
            checkpoint,
        } => Ok(Held {
            record,
            created_at: *created_at,
            ttl_deadline: *ttl_deadline,
            lease_expires_at: *lease_expires_at,
            attempt: *attempt,
            checkpoint,
        }),
        State::Completed { .. } => Err(lost),
    }
}

/// In flight → completed with `response`, for the holder of `token`: the record to write
/// and the answer, which share the response bytes.
///
/// # Errors
/// [`Error::LeaseLost`] as for every lease operation.
pub(crate) fn complete(
    record: Option<&Record>,
    token: u64,
    response: Vec<u8>,
    now: u64,
    ttl: u64,
) -> Result<(Record, Completed)> {
    let held = held(record, token, now)?;
    let response = Arc::new(response);
    let expires_at = now.saturating_add(ttl);
    let done = Completed {
        response: Arc::clone(&response),
        token,
        completed_at: now,
        expires_at,
    };
    let record = Record {
        fingerprint: held.record.fingerprint,
        token,
        state: State::Completed {
            completed_at: now,
            expires_at,
            response,
        },
    };
    Ok((record, done))
}

/// Applies `hold` for the holder of `token`: the record to write, still in flight, and the
/// lease's end in it.
///
/// # Errors
/// [`Error::LeaseLost`] as for every lease operation.
pub(crate) fn hold(
    record: Option<&Record>,
    token: u64,
    hold: Hold,
    now: u64,
) -> Result<(Record, u64)> {
    let held = held(record, token, now)?;
    let (lease_expires_at, checkpoint) = match hold {
        Hold::Extend(by) => (now.saturating_add(by), held.checkpoint.clone()),
        Hold::Checkpoint(bytes) => (held.lease_expires_at, Some(bytes)),
        Hold::Release => (now, held.checkpoint.clone()),
    };
    let record = Record {
        fingerprint: held.record.fingerprint,
        token,
        state: State::InFlight {
            created_at: held.created_at,
            ttl_deadline: held.ttl_deadline,
            lease_expires_at,
            attempt: held.attempt,
            checkpoint,
        },
    };
    Ok((record, lease_expires_at))
}

/// Checks that the holder of `token` may abandon the record (which is then deleted).
///
/// # Errors
/// [`Error::LeaseLost`] as for every lease operation.
pub(crate) fn abandon(record: Option<&Record>, token: u64, now: u64) -> Result<()> {
    held(record, token, now).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 1_000;
    const LEASE: u64 = 100;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    fn started(now: u64, token: u64) -> Record {
        claim(None, &fp(1), token, now, TTL, LEASE).record
    }

    fn decide(record: &Record, fp: &Fingerprint, now: u64) -> BeginStep {
        decide_begin(Some(record.clone()), fp, now)
    }

    fn claims(step: BeginStep) -> bool {
        matches!(step, BeginStep::Claim(_))
    }

    #[test]
    fn absent_claims_fresh() {
        assert_eq!(decide_begin(None, &fp(1), 0), BeginStep::Claim(None));
        let g = claim(None, &fp(1), 1, 10, TTL, LEASE);
        assert!(g.recovered.is_none());
        assert_eq!(g.record.dies_at(), 10 + TTL);
        assert_eq!(g.lease_expires_at, 10 + LEASE);
    }

    #[test]
    fn in_flight_rows() {
        let r = started(0, 1);
        assert_eq!(decide(&r, &fp(2), 5), BeginStep::Refuse(Refusal::Mismatch));
        assert_eq!(
            decide(&r, &fp(1), 5),
            BeginStep::Refuse(Refusal::InFlight { retry_after: 95 })
        );
        assert_eq!(decide(&r, &fp(1), LEASE), BeginStep::Claim(Some(r.clone())));
        assert_eq!(
            decide(&r, &fp(2), LEASE),
            BeginStep::Refuse(Refusal::Mismatch)
        );
        let g = claim(Some(r.clone()), &fp(1), 2, LEASE, TTL, LEASE);
        let t = g.recovered.expect("takeover");
        assert_eq!((t.previous_token, t.attempt, t.checkpoint), (1, 2, None));
        assert_eq!(g.record.token, 2);
        assert_eq!(g.record.dies_at(), TTL, "created_at + ttl is kept");
    }

    #[test]
    fn completed_rows() {
        let r = started(0, 1);
        let (done, answer) = complete(Some(&r), 1, b"ok".to_vec(), 50, TTL).unwrap();
        assert_eq!((answer.response(), answer.completed_at), (&b"ok"[..], 50));
        match decide(&done, &fp(1), 60) {
            BeginStep::Refuse(Refusal::Replay(c)) => {
                assert_eq!(
                    (c.response(), c.token(), c.completed_at),
                    (&b"ok"[..], 1, 50)
                )
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(
            decide(&done, &fp(2), 60),
            BeginStep::Refuse(Refusal::Mismatch)
        );
        assert_eq!(decide(&done, &fp(1), 50 + TTL), BeginStep::Claim(None));
    }

    #[test]
    fn fencing() {
        let r = started(0, 1);
        let r2 = claim(Some(r.clone()), &fp(1), 2, LEASE, TTL, LEASE).record;
        let lost = |r: Result<()>| matches!(r, Err(Error::LeaseLost { token: 1 }));
        for record in [Some(&r2), None] {
            let now = LEASE;
            assert!(lost(complete(record, 1, vec![], now, TTL).map(|_| ())));
            for action in [Hold::Extend(5), Hold::Checkpoint(vec![]), Hold::Release] {
                assert!(lost(hold(record, 1, action, now).map(|_| ())));
            }
            assert!(lost(abandon(record, 1, now)));
        }
    }

    #[test]
    fn complete_after_lease_ran_out_but_not_taken_over() {
        let r = started(0, 1);
        assert!(complete(Some(&r), 1, vec![], LEASE * 5, TTL).is_ok());
        assert!(complete(Some(&r), 1, vec![], TTL, TTL).is_err());
    }

    #[test]
    fn release_keeps_checkpoint_and_allows_takeover() {
        let r = started(0, 1);
        let (r, _) = hold(Some(&r), 1, Hold::Checkpoint(b"cp".to_vec()), 1).unwrap();
        let (r, end) = hold(Some(&r), 1, Hold::Release, 2).unwrap();
        assert_eq!(end, 2);
        assert!(claims(decide(&r, &fp(1), 2)));
        let g = claim(Some(r), &fp(1), 2, 2, TTL, LEASE);
        assert_eq!(g.recovered.unwrap().checkpoint(), Some(&b"cp"[..]));
    }

    #[test]
    fn extend_moves_death() {
        let r = started(0, 1);
        let (r, end) = hold(Some(&r), 1, Hold::Extend(5 * TTL), 1).unwrap();
        assert_eq!(end, 1 + 5 * TTL);
        assert_eq!(r.dies_at(), 1 + 5 * TTL);
        assert!(!r.is_dead(TTL));
    }
}
