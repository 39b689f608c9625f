//! The client side: `new_key`, the durable `Outbox`, and `RetryPolicy`.
#![cfg(feature = "client")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use idemstore::client::{
    GiveUp, Outbox, RetryOutcome, RetryPolicy, Sent, StatusClass, classify_status, new_key,
};
use idemstore::{Error, Fingerprint, ManualClock, Store};

fn clock() -> ManualClock {
    ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s)
}

// ---------------------------------------------------------------- keys

#[test]
fn new_keys_are_distinct_v4_uuids() {
    let mut seen = HashSet::new();
    for _ in 0..10_000 {
        let key = new_key();
        let b = key.as_bytes();
        assert_eq!(b.len(), 36);
        for (i, c) in b.iter().enumerate() {
            match i {
                8 | 13 | 18 | 23 => assert_eq!(*c, b'-'),
                14 => assert_eq!(*c, b'4', "version nibble of {key}"),
                19 => assert!(b"89ab".contains(c), "variant nibble of {key}"),
                _ => assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            }
        }
        assert!(seen.insert(key), "a key repeated");
    }
}

// ---------------------------------------------------------------- outbox

#[test]
fn recorded_operations_survive_a_restart_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let clock = clock();
    let open = || {
        Outbox::builder()
            .clock(clock.clone())
            .open(&path)
            .expect("opens")
    };
    let outbox = open();
    let a = outbox.record("a", &fp("A")).unwrap();
    clock.advance(Duration::from_secs(1));
    let b = outbox.record("b", &fp("B")).unwrap();
    clock.advance(Duration::from_secs(1));
    let c = outbox.record("c", &fp("C")).unwrap();
    assert_ne!(a.key(), b.key());
    assert!(outbox.finish("b").unwrap());
    drop(outbox);

    let outbox = open();
    let pending = outbox.pending().unwrap();
    let ops: Vec<_> = pending.iter().map(|e| e.operation()).collect();
    assert_eq!(ops, ["a", "c"], "oldest first, finished ones left out");
    assert_eq!(pending[0].key(), a.key());
    assert_eq!(pending[1].key(), c.key());
    assert_eq!(pending[1].fingerprint(), &fp("C"));
    assert_eq!(pending[0].created_at(), a.created_at());
    assert_eq!(
        pending[0].expires_at(),
        a.created_at() + Duration::from_secs(24 * 3600)
    );
    let b_again = outbox.get("b").unwrap().expect("finished entries are kept");
    assert!(b_again.is_finished());
    assert_eq!(b_again.key(), b.key());
}

#[test]
fn recording_an_operation_again_never_makes_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path().join("o.redb")).unwrap();
    let first = outbox.record("pay-17", &fp("body")).unwrap();
    let again = outbox.record("pay-17", &fp("body")).unwrap();
    assert_eq!(first, again);
    // Even with a key of the caller's own, the first key wins.
    let mine = outbox
        .record_with_key("pay-17", "my-own-key", &fp("body"))
        .unwrap();
    assert_eq!(mine.key(), first.key());
    // Finished: record returns the finished entry, not a fresh operation.
    assert!(outbox.finish("pay-17").unwrap());
    assert!(!outbox.finish("pay-17").unwrap(), "already finished");
    let after = outbox.record("pay-17", &fp("body")).unwrap();
    assert!(after.is_finished());
    assert_eq!(after.key(), first.key());
    assert!(outbox.pending().unwrap().is_empty());
    assert!(!outbox.finish("never-recorded").unwrap());
}

#[test]
fn an_operation_id_reused_for_another_request_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path().join("o.redb")).unwrap();
    let first = outbox.record("pay-17", &fp("amount=5")).unwrap();
    let err = outbox.record("pay-17", &fp("amount=6")).unwrap_err();
    assert!(
        matches!(&err, Error::OperationConflict { operation } if operation == "pay-17"),
        "{err:?}"
    );
    assert!(err.to_string().contains("new operation id"));
    assert_eq!(outbox.get("pay-17").unwrap().unwrap(), first, "unchanged");
}

#[test]
fn bad_operation_ids_and_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path().join("o.redb")).unwrap();
    assert!(matches!(
        outbox.record("", &fp("x")),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        outbox.record(&"o".repeat(256), &fp("x")),
        Err(Error::InvalidKey { .. })
    ));
    assert!(outbox.record(&"o".repeat(255), &fp("x")).is_ok());
    assert!(matches!(
        outbox.record_with_key("op", "bad\nkey", &fp("x")),
        Err(Error::InvalidKey { .. })
    ));
    assert!(outbox.get("op").unwrap().is_none());
    let e = outbox.record_with_key("op2", "order-1", &fp("x")).unwrap();
    assert_eq!(e.key(), "order-1");
}

#[test]
fn entries_expire_after_the_ttl_lazily_and_are_purged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.redb");
    let clock = clock();
    let builder = || {
        Outbox::builder()
            .ttl(Duration::from_secs(3600))
            .clock(clock.clone())
    };
    let outbox = builder().open(&path).unwrap();
    let old = outbox.record("old", &fp("1")).unwrap();
    outbox.record("old-done", &fp("2")).unwrap();
    outbox.finish("old-done").unwrap();
    clock.advance(Duration::from_secs(1800));
    let young = outbox.record("young", &fp("3")).unwrap();
    clock.advance(Duration::from_secs(1800));

    // Exactly at created_at + ttl the old entries are dead, before any purge.
    assert!(outbox.get("old").unwrap().is_none());
    let pending = outbox.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key(), young.key());
    drop(outbox);

    // purge_on_open(false) leaves them for purge(), which returns what it deleted.
    let outbox = builder().purge_on_open(false).open(&path).unwrap();
    let purged = outbox.purge().unwrap();
    let ops: Vec<_> = purged
        .iter()
        .map(|e| (e.operation(), e.is_finished()))
        .collect();
    assert_eq!(ops, [("old", false), ("old-done", true)]);
    assert_eq!(purged[0].key(), old.key());
    assert!(outbox.purge().unwrap().is_empty());

    // An expired operation id is free again: a new key.
    let renewed = outbox.record("old", &fp("other request")).unwrap();
    assert_ne!(renewed.key(), old.key());
    drop(outbox);

    // Opening purges by default.
    clock.advance(Duration::from_secs(3600));
    let outbox = builder().purge_on_open(false).open(&path).unwrap();
    assert_eq!(outbox.purge().unwrap().len(), 2);
    drop(outbox);
    let outbox = builder().open(&path).unwrap();
    outbox.record("x", &fp("x")).unwrap();
    clock.advance(Duration::from_secs(3600));
    drop(outbox);
    let outbox = builder().open(&path).unwrap();
    assert!(outbox.get("x").unwrap().is_none());
    assert!(outbox.purge().unwrap().is_empty(), "open already purged");
}

/// An operation recorded and never finished whose entry expired is not recorded again
/// (a second key would let the server run it twice) until `purge` has handed it over for
/// reconciling; a finished one's expired entry counts as absent.
#[test]
fn an_operation_that_expired_unfinished_is_not_recorded_again_until_purged() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let outbox = Outbox::builder()
        .ttl(Duration::from_secs(60))
        .clock(clock.clone())
        .purge_on_open(false)
        .open(dir.path().join("o.redb"))
        .unwrap();
    let pending = outbox.record("pay-17", &fp("pay 17")).unwrap();
    outbox.record("pay-18", &fp("pay 18")).unwrap();
    outbox.finish("pay-18").unwrap();
    clock.advance(Duration::from_secs(61));

    match outbox.record("pay-17", &fp("pay 17")) {
        Err(Error::OperationExpired { operation, key }) => {
            assert_eq!(
                (operation.as_str(), key.as_str()),
                ("pay-17", pending.key())
            );
        }
        other => panic!("expected OperationExpired, got {other:?}"),
    }
    assert!(matches!(
        outbox.record("pay-17", &fp("another request")),
        Err(Error::OperationConflict { .. })
    ));
    let finished_again = outbox.record("pay-18", &fp("pay 18 again")).unwrap();
    assert!(!finished_again.is_finished());

    let purged = outbox.purge().unwrap();
    assert_eq!(purged.len(), 1);
    assert_eq!(purged[0].key(), pending.key());
    let renewed = outbox.record("pay-17", &fp("pay 17")).unwrap();
    assert_ne!(renewed.key(), pending.key());
}

#[test]
fn the_outbox_refuses_store_files_and_foreign_files_without_touching_them() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.redb");
    let store = Store::open(&store_path).unwrap();
    assert!(matches!(
        Outbox::open(&store_path),
        Err(Error::AlreadyOpen { .. })
    ));
    store.close().unwrap();
    let before = std::fs::read(&store_path).unwrap();
    let err = Outbox::open(&store_path).unwrap_err();
    assert!(matches!(err, Error::IncompatibleFormat { .. }), "{err:?}");
    assert!(err.to_string().contains("file of its own"));
    assert_eq!(std::fs::read(&store_path).unwrap(), before);
    Store::open(&store_path).unwrap().close().unwrap();

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"not a database").unwrap();
    assert!(matches!(
        Outbox::open(&text),
        Err(Error::IncompatibleFormat { .. })
    ));
    assert_eq!(std::fs::read(&text).unwrap(), b"not a database");

    assert!(matches!(
        Outbox::open(dir.path()),
        Err(Error::Storage { .. })
    ));
}

#[test]
fn an_outbox_file_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.redb");
    let outbox = Outbox::open(&path).unwrap();
    assert!(matches!(
        Outbox::open(&path),
        Err(Error::AlreadyOpen { .. })
    ));
    drop(outbox);
    assert!(Outbox::open(&path).is_ok());
}

#[test]
fn outboxes_in_a_shared_database_use_only_their_own_tables() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("app.redb")).unwrap());
    let mine: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("app_orders");
    let txn = db.begin_write().unwrap();
    txn.open_table(mine).unwrap().insert("o-1", 7).unwrap();
    txn.commit().unwrap();

    let payments = Outbox::builder()
        .table("payments_outbox")
        .open_database(db.clone())
        .unwrap();
    let refunds = Outbox::builder()
        .table("refunds_outbox")
        .open_database(db.clone())
        .unwrap();
    payments.record("op", &fp("pay")).unwrap();
    assert!(refunds.get("op").unwrap().is_none());
    refunds.record("op", &fp("refund")).unwrap();
    assert_ne!(
        payments.get("op").unwrap().unwrap().key(),
        refunds.get("op").unwrap().unwrap().key()
    );
    assert_eq!(payments.table(), "payments_outbox");

    let txn = redb::ReadableDatabase::begin_read(db.as_ref()).unwrap();
    let table = txn.open_table(mine).unwrap();
    assert_eq!(table.get("o-1").unwrap().unwrap().value(), 7);

    // A table of another shape under the outbox's name is refused.
    assert!(matches!(
        Outbox::builder()
            .table("app_orders")
            .open_database(db.clone()),
        Err(Error::IncompatibleFormat { .. })
    ));
    for reserved in ["", "idemstore_records", "idemstore_log"] {
        assert!(matches!(
            Outbox::builder().table(reserved).open_database(db.clone()),
            Err(Error::InvalidConfig { .. })
        ));
    }
    assert!(matches!(
        Outbox::builder()
            .ttl(Duration::ZERO)
            .open_database(db.clone()),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn a_damaged_entry_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("o.redb")).unwrap());
    let outbox = Outbox::builder().open_database(db.clone()).unwrap();
    outbox.record("good", &fp("x")).unwrap();
    let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("idemstore_outbox"); // the default table
    let txn = db.begin_write().unwrap();
    txn.open_table(table)
        .unwrap()
        .insert("bad", &[1u8, 2, 3][..])
        .unwrap();
    txn.commit().unwrap();
    assert!(matches!(outbox.get("bad"), Err(Error::Corrupt { .. })));
    assert!(matches!(outbox.pending(), Err(Error::Corrupt { .. })));
    assert!(outbox.get("good").unwrap().is_some());
}

// ---------------------------------------------------------------- retry

/// Runs `policy` against scripted answers, recording keys and sleeps.
fn scripted(
    policy: &RetryPolicy,
    answers: Vec<Sent<&'static str>>,
) -> (RetryOutcome<&'static str>, Vec<String>, Vec<Duration>) {
    let mut answers = answers.into_iter();
    let mut keys = Vec::new();
    let mut sleeps = Vec::new();
    let outcome = policy.run_with("k-1", &mut |d: Duration| sleeps.push(d), |attempt| {
        assert_eq!(attempt.number() as usize, keys.len() + 1);
        keys.push(attempt.key().to_owned());
        answers.next().unwrap_or(Sent::Timeout)
    });
    (outcome, keys, sleeps)
}

fn policy() -> RetryPolicy {
    RetryPolicy::new()
        .base(Duration::from_millis(100))
        .cap(Duration::from_secs(2))
        .max_attempts(10)
        .max_elapsed(None)
        .jitter_seed(1)
}

#[test]
fn every_retryable_failure_is_retried_with_the_same_key() {
    let answers = vec![
        Sent::Timeout,
        Sent::ConnectionFailed("reset".into()),
        Sent::response(409, "in flight"),
        Sent::response(429, "slow down"),
        Sent::response(500, "oops"),
        Sent::response(503, "unavailable"),
        Sent::response(408, "request timeout"),
        Sent::response(201, "created"),
    ];
    let (outcome, keys, sleeps) = scripted(&policy(), answers);
    assert_eq!(
        outcome,
        RetryOutcome::Succeeded {
            status: 201,
            value: "created",
            attempts: 8
        }
    );
    assert_eq!(keys, vec!["k-1"; 8]);
    assert_eq!(sleeps.len(), 7);
}

#[test]
fn a_422_stops_at_once_as_a_mismatch() {
    let (outcome, keys, sleeps) = scripted(
        &policy(),
        vec![Sent::Timeout, Sent::response(422, "reused")],
    );
    assert_eq!(
        outcome,
        RetryOutcome::Mismatch {
            value: "reused",
            attempts: 2
        }
    );
    assert_eq!(keys.len(), 2);
    assert_eq!(sleeps.len(), 1);
    assert!(outcome.is_final());
}

#[test]
fn other_client_errors_and_odd_statuses_are_final_rejections() {
    for status in [400, 401, 403, 404, 410, 301, 304, 100] {
        let (outcome, keys, sleeps) = scripted(&policy(), vec![Sent::response(status, "no")]);
        assert_eq!(
            outcome,
            RetryOutcome::Rejected {
                status,
                value: "no",
                attempts: 1
            }
        );
        assert_eq!((keys.len(), sleeps.len()), (1, 0));
    }
    assert_eq!(classify_status(204), StatusClass::Success);
    assert_eq!(classify_status(599), StatusClass::Retry);
    assert_eq!(classify_status(600), StatusClass::Rejected);
}

#[test]
fn retry_after_is_a_floor_for_the_wait() {
    let (outcome, _, sleeps) = scripted(
        &policy(),
        vec![
            Sent::response(409, "").retry_after(Some(Duration::from_secs(3))),
            Sent::response(429, "").retry_after(Some(Duration::ZERO)),
            Sent::response(200, "ok"),
        ],
    );
    assert!(matches!(
        outcome,
        RetryOutcome::Succeeded { attempts: 3, .. }
    ));
    assert_eq!(sleeps[0], Duration::from_secs(3), "jitter <= 100 ms < 3 s");
    assert!(
        sleeps[1] <= Duration::from_millis(200),
        "backoff still applies"
    );
}

#[test]
fn backoff_is_full_jitter_under_a_doubling_capped_ceiling_and_seeded() {
    let p = policy().max_attempts(12);
    let (outcome, _, sleeps) = scripted(&p, Vec::new());
    let (again, _, sleeps_again) = scripted(&p, Vec::new());
    assert_eq!(sleeps, sleeps_again, "a seed makes runs repeat");
    assert_eq!(outcome.attempts(), again.attempts());
    assert_eq!(sleeps.len(), 11);
    for (i, d) in sleeps.iter().enumerate() {
        let ceiling = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(2));
        assert!(*d <= ceiling, "retry {}: {d:?} > {ceiling:?}", i + 1);
    }
    let (_, _, other_seed) = scripted(&p.clone().jitter_seed(2), Vec::new());
    assert_ne!(sleeps, other_seed);
    // Full jitter: across many draws at the cap, some fall in the lower half.
    let low = policy()
        .delays()
        .skip(5)
        .take(200)
        .filter(|d| *d < Duration::from_secs(1))
        .count();
    assert!((40..=160).contains(&low), "{low} of 200 below half the cap");
}

#[test]
fn it_gives_up_after_max_attempts_with_the_last_answer() {
    let (outcome, keys, sleeps) = scripted(
        &policy().max_attempts(3),
        vec![
            Sent::Timeout,
            Sent::Timeout,
            Sent::response(503, "down"),
            Sent::response(200, "too late"),
        ],
    );
    match outcome {
        RetryOutcome::GaveUp {
            reason,
            attempts,
            last,
            ..
        } => {
            assert_eq!(reason, GiveUp::MaxAttempts);
            assert_eq!(attempts, 3);
            assert_eq!(last, Sent::response(503, "down"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((keys.len(), sleeps.len()), (3, 2));
    // Zero attempts counts as one.
    let (outcome, keys, _) = scripted(&policy().max_attempts(0), Vec::new());
    assert_eq!(outcome.attempts(), 1);
    assert_eq!(keys.len(), 1);
}

#[test]
fn it_gives_up_before_a_wait_that_would_pass_max_elapsed() {
    let p = policy().max_elapsed(Some(Duration::from_secs(5)));
    let (outcome, keys, sleeps) = scripted(
        &p,
        vec![
            Sent::response(503, "").retry_after(Some(Duration::from_secs(2))),
            Sent::response(503, "").retry_after(Some(Duration::from_secs(2))),
            Sent::response(503, "").retry_after(Some(Duration::from_secs(2))),
        ],
    );
    match outcome {
        RetryOutcome::GaveUp {
            reason,
            attempts,
            elapsed,
            ..
        } => {
            assert_eq!(reason, GiveUp::MaxElapsed);
            assert_eq!(attempts, 3);
            assert!(elapsed >= Duration::from_secs(4) && elapsed < Duration::from_secs(5));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(keys.len(), 3);
    assert_eq!(sleeps, vec![Duration::from_secs(2); 2]);
}

#[test]
fn attempts_see_the_elapsed_time() {
    let mut seen = Vec::new();
    let p = policy().max_attempts(3);
    let _ = p.run_with("k", &mut |_: Duration| {}, |a| {
        seen.push(a.elapsed());
        Sent::<()>::response(503, ()).retry_after(Some(Duration::from_secs(1)))
    });
    assert_eq!(seen[0], Duration::ZERO);
    assert!(seen[1] >= Duration::from_secs(1));
    assert!(seen[2] >= Duration::from_secs(2));
}

#[cfg(feature = "http")]
#[test]
fn sent_from_http_reads_status_and_retry_after() {
    let response = http::Response::builder()
        .status(409)
        .header("retry-after", "7")
        .body("x")
        .unwrap();
    match Sent::from_http(response) {
        Sent::Response {
            status,
            retry_after,
            replayed,
            value,
        } => {
            assert_eq!(status, 409);
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
            assert!(!replayed);
            assert_eq!(*value.body(), "x");
        }
        other => panic!("{other:?}"),
    }
    let plain = http::Response::builder().status(201).body(()).unwrap();
    assert!(matches!(
        Sent::from_http(plain),
        Sent::Response {
            status: 201,
            retry_after: None,
            ..
        }
    ));
}

#[test]
fn a_replayed_answer_is_final_whatever_its_status() {
    for status in [500, 503, 408, 409, 429] {
        let (outcome, keys, sleeps) = scripted(
            &policy(),
            vec![
                Sent::Timeout,
                Sent::response(status, "stored")
                    .retry_after(Some(Duration::from_secs(1)))
                    .replayed(true),
                Sent::response(201, "never asked for"),
            ],
        );
        assert_eq!(
            outcome,
            RetryOutcome::Rejected {
                status,
                value: "stored",
                attempts: 2
            },
            "a replayed {status}"
        );
        assert!(outcome.is_final());
        assert_eq!((keys.len(), sleeps.len()), (2, 1));
    }
    // A stored 422 is the handler's own answer, not a reused key.
    let (outcome, _, _) = scripted(&policy(), vec![Sent::response(422, "x").replayed(true)]);
    assert!(matches!(
        outcome,
        RetryOutcome::Rejected { status: 422, .. }
    ));
    // A replayed 2xx still succeeds; an unmarked 503 is still retried.
    let (outcome, _, _) = scripted(&policy(), vec![Sent::response(201, "ok").replayed(true)]);
    assert!(matches!(
        outcome,
        RetryOutcome::Succeeded { status: 201, .. }
    ));
    let (outcome, keys, _) = scripted(
        &policy().max_attempts(2),
        vec![
            Sent::response(503, "a").replayed(false),
            Sent::response(503, "b"),
        ],
    );
    assert!(matches!(outcome, RetryOutcome::GaveUp { .. }));
    assert_eq!(keys.len(), 2);
    // The builder touches responses only.
    assert_eq!(Sent::<()>::Timeout.replayed(true), Sent::Timeout);
}

#[cfg(feature = "http")]
#[test]
fn sent_from_http_reads_idempotent_replayed() {
    let replay = |value: Option<&str>| {
        let mut b = http::Response::builder().status(500);
        if let Some(v) = value {
            b = b.header("idempotent-replayed", v);
        }
        Sent::from_http(b.body(()).unwrap())
    };
    let is_replay =
        |s: Sent<http::Response<()>>| matches!(s, Sent::Response { replayed: true, .. });
    assert!(is_replay(replay(Some("true"))));
    assert!(is_replay(replay(Some("TRUE"))));
    assert!(!is_replay(replay(Some("false"))));
    assert!(!is_replay(replay(None)));
    // And `run` stops at the replayed 500.
    let outcome = policy().run_with("k", &mut |_: Duration| {}, |_| replay(Some("true")));
    assert!(matches!(
        outcome,
        RetryOutcome::Rejected {
            status: 500,
            attempts: 1,
            ..
        }
    ));
}

// ---------------------------------------------------------------- the client example

/// The client example (Outbox + retry, injected failures, a restart) keeps its promise:
/// every payment charged exactly once, counted by the server. Run as the built example
/// program (cargo builds it before this test); its exit code is its verdict.
#[cfg(feature = "http")]
#[test]
fn the_payment_client_example_charges_each_payment_once() {
    let output = std::process::Command::new(idemstore_testkit::programs::example("payment_client"))
        .output()
        .expect("the example runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("VERDICT: every payment charged exactly once"),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
