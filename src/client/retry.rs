//! [`RetryPolicy`]: exponential backoff with full jitter, and a helper that retries a send
//! closure with one key until it gets a final answer.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::{StdRng, SysRng};
use rand::{RngExt, SeedableRng};

/// How a retry loop backs off and when it gives up.
///
/// The delay before retry `n` (1 for the first retry) is drawn uniformly from
/// `[0, min(cap, base * 2^(n-1))]` ("full jitter"), so clients that failed together do not
/// retry together. A `Retry-After` from the server is a floor: the helper never waits less.
/// It gives up after `max_attempts` attempts, or when the next wait would take it past
/// `max_elapsed`.
///
/// | setting | default |
/// |---|---|
/// | [`base`](RetryPolicy::base) | 100 ms |
/// | [`cap`](RetryPolicy::cap) | 10 s |
/// | [`max_attempts`](RetryPolicy::max_attempts) | 8 |
/// | [`max_elapsed`](RetryPolicy::max_elapsed) | `Some(60 s)` |
/// | [`jitter_seed`](RetryPolicy::jitter_seed) | none: seeded from the OS for every run |
///
/// ```
/// use std::time::Duration;
/// use idemstore::client::{RetryOutcome, RetryPolicy, Sent};
///
/// let policy = RetryPolicy::new()
///     .base(Duration::from_millis(50))
///     .cap(Duration::from_secs(2))
///     .max_attempts(5)
///     .jitter_seed(42); // deterministic delays, for tests
///
/// let mut slept = Vec::new();
/// let outcome = policy.run_with("0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11", &mut |d| slept.push(d), |attempt| {
///     match attempt.number() {
///         1 => Sent::ConnectionFailed("connection refused".into()),
///         2 => Sent::response(409, ()).retry_after(Some(Duration::from_secs(1))),
///         _ => Sent::response(201, ()),
///     }
/// });
/// assert!(matches!(outcome, RetryOutcome::Succeeded { attempts: 3, .. }));
/// assert!(slept[0] <= Duration::from_millis(50));
/// assert!(slept[1] >= Duration::from_secs(1)); // Retry-After honoured
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    base: Duration,
    cap: Duration,
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            max_attempts: 8,
            max_elapsed: Some(Duration::from_secs(60)),
            seed: None,
        }
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("base", &self.base)
            .field("cap", &self.cap)
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("seed", &self.seed)
            .finish()
    }
}

/// How one attempt went, as told by your send closure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent<T> {
    /// A response arrived.
    Response {
        /// Its HTTP status code.
        status: u16,
        /// Its `Retry-After`, if any (see [`parse_retry_after`]).
        retry_after: Option<Duration>,
        /// Whether it is a replay (`Idempotent-Replayed: true`): the server's stored answer
        /// for this key, final whatever its status (see [`RetryPolicy::run`]).
        replayed: bool,
        /// Whatever you want back (the response, its body, ...).
        value: T,
    },
    /// No response within your timeout. The request may or may not have run: retried (with
    /// the same key, that is safe).
    Timeout,
    /// The connection failed (refused, reset, DNS). Retried.
    ConnectionFailed(String),
}

impl<T> Sent<T> {
    /// A response with `status`, no `Retry-After`, not a replay.
    pub fn response(status: u16, value: T) -> Sent<T> {
        Sent::Response {
            status,
            retry_after: None,
            replayed: false,
            value,
        }
    }

    /// Sets the `Retry-After` of a response (no effect on `Timeout`/`ConnectionFailed`).
    pub fn retry_after(mut self, after: Option<Duration>) -> Sent<T> {
        if let Sent::Response { retry_after, .. } = &mut self {
            *retry_after = after;
        }
        self
    }

    /// Marks a response as a replay (the server sent `Idempotent-Replayed: true`), or not (no
    /// effect on `Timeout`/`ConnectionFailed`). [`Sent::from_http`] reads the header itself.
    ///
    /// ```
    /// use idemstore::client::{RetryOutcome, RetryPolicy, Sent};
    /// // A stored 503 is the server's final answer for this key: no retry.
    /// let outcome = RetryPolicy::new().run("k", |_| Sent::response(503, ()).replayed(true));
    /// assert!(matches!(outcome, RetryOutcome::Rejected { status: 503, attempts: 1, .. }));
    /// ```
    pub fn replayed(mut self, is_replay: bool) -> Sent<T> {
        if let Sent::Response { replayed, .. } = &mut self {
            *replayed = is_replay;
        }
        self
    }
}

#[cfg(feature = "http")]
impl<B> Sent<http::Response<B>> {
    /// Wraps a response of the `http` crate (as `ureq` 3 returns them), reading its status,
    /// its `Retry-After` header (see [`parse_retry_after`]; dates are taken relative to the
    /// system clock) and whether it is a replay (`Idempotent-Replayed: true`, the value
    /// compared without regard to case).
    pub fn from_http(response: http::Response<B>) -> Sent<http::Response<B>> {
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let replayed = response
            .headers()
            .get(crate::http::IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"));
        Sent::Response {
            status: response.status().as_u16(),
            retry_after,
            replayed,
            value: response,
        }
    }
}

/// What a status code means to the retry helper; see [`classify_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatusClass {
    /// 2xx: done.
    Success,
    /// Try again with the same key: 408, 409, 429, 5xx.
    Retry,
    /// 422: the key was used for another request. Never retried.
    Mismatch,
    /// Any other status (1xx, 3xx, other 4xx): a final refusal. Never retried.
    Rejected,
}

/// Classifies a status code:
///
/// | status | class | why |
/// |---|---|---|
/// | 200–299 | [`Success`](StatusClass::Success) | done |
/// | 408 | [`Retry`](StatusClass::Retry) | the server timed out reading the request: a timeout |
/// | 409 | [`Retry`](StatusClass::Retry) | the same key is in flight: wait `Retry-After`, then get the replay |
/// | 429 | [`Retry`](StatusClass::Retry) | rate limited: wait `Retry-After` |
/// | 500–599 | [`Retry`](StatusClass::Retry) | a server failure; safe to retry with the same key |
/// | 422 | [`Mismatch`](StatusClass::Mismatch) | the key was used for a different request: a client bug, stop and investigate |
/// | anything else | [`Rejected`](StatusClass::Rejected) | a final answer (400, 401, 403, 404, ...; also 1xx and 3xx, which a client library should have handled) |
///
/// ```
/// use idemstore::client::{classify_status, StatusClass};
/// assert_eq!(classify_status(201), StatusClass::Success);
/// assert_eq!(classify_status(409), StatusClass::Retry);
/// assert_eq!(classify_status(422), StatusClass::Mismatch);
/// assert_eq!(classify_status(404), StatusClass::Rejected);
/// ```
pub fn classify_status(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Success,
        408 | 409 | 429 | 500..=599 => StatusClass::Retry,
        422 => StatusClass::Mismatch,
        _ => StatusClass::Rejected,
    }
}

/// Why [`RetryPolicy::run`] gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUp {
    /// `max_attempts` attempts were made.
    MaxAttempts,
    /// The next wait would have gone past `max_elapsed`.
    MaxElapsed,
}

/// Why [`RetryPolicy::run`] stopped, with the last answer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "the outcome says whether the operation succeeded; finish the outbox entry only on a final answer"]
pub enum RetryOutcome<T> {
    /// A 2xx response.
    Succeeded {
        /// Its status.
        status: u16,
        /// Its value.
        value: T,
        /// Attempts made, this one included.
        attempts: u32,
    },
    /// A 422: the key was used for another request. A client bug: do not retry, investigate.
    Mismatch {
        /// The response's value.
        value: T,
        /// Attempts made.
        attempts: u32,
    },
    /// Another final status (400, 401, 403, 404, ...): the server refused the request. Also
    /// any replayed answer that is not 2xx (a stored 500, 409, 422, ...): the outcome the
    /// server stored for this key, which every retry would get again.
    Rejected {
        /// Its status.
        status: u16,
        /// Its value.
        value: T,
        /// Attempts made.
        attempts: u32,
    },
    /// Still failing when the policy ran out. The outcome is unknown (an attempt may have
    /// run on the server): keep the operation pending and resume it later **with the same
    /// key**.
    GaveUp {
        /// Which limit was reached.
        reason: GiveUp,
        /// Attempts made.
        attempts: u32,
        /// Time spent, as counted by the policy (see [`RetryPolicy::run_with`]).
        elapsed: Duration,
        /// The last attempt's result.
        last: Sent<T>,
    },
}

impl<T> RetryOutcome<T> {
    /// How many attempts were made.
    pub fn attempts(&self) -> u32 {
        match self {
            RetryOutcome::Succeeded { attempts, .. }
            | RetryOutcome::Mismatch { attempts, .. }
            | RetryOutcome::Rejected { attempts, .. }
            | RetryOutcome::GaveUp { attempts, .. } => *attempts,
        }
    }

    /// Whether the server gave a final answer (success, 422 or another refusal): the
    /// operation can be marked finished in the outbox. `false` only for `GaveUp`.
    pub fn is_final(&self) -> bool {
        !matches!(self, RetryOutcome::GaveUp { .. })
    }
}

/// What the send closure is told about the attempt it makes.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    key: &'a str,
    number: u32,
    elapsed: Duration,
}

impl Attempt<'_> {
    /// The operation's idempotency key: send it unchanged in `Idempotency-Key`.
    pub fn key(&self) -> &str {
        self.key
    }

    /// This attempt's number, 1 for the first.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Time spent so far, as counted by the policy.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

/// Waits between attempts. Implemented by [`ThreadSleeper`] and by every `FnMut(Duration)`
/// (a test can record the delays instead of sleeping).
pub trait Sleeper {
    /// Waits for `duration`.
    fn sleep(&mut self, duration: Duration);
}

/// Sleeps the calling thread (`std::thread::sleep`); what [`RetryPolicy::run`] uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadSleeper;

impl Sleeper for ThreadSleeper {
    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

impl<F: FnMut(Duration)> Sleeper for F {
    fn sleep(&mut self, duration: Duration) {
        self(duration)
    }
}

/// The jittered delays of a policy, one per retry; made by [`RetryPolicy::delays`].
pub struct Delays {
    policy: RetryPolicy,
    rng: StdRng,
    retry: u32,
}

impl Iterator for Delays {
    type Item = Duration;

    /// The delay before the next retry, drawn from `[0, min(cap, base * 2^(n-1))]`.
    fn next(&mut self) -> Option<Duration> {
        self.retry = self.retry.saturating_add(1);
        let ceiling = self.policy.ceiling(self.retry);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(self.rng.random_range(0..=nanos)))
    }
}

impl fmt::Debug for Delays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delays")
            .field("policy", &self.policy)
            .field("retry", &self.retry)
            .finish()
    }
}

impl RetryPolicy {
    /// The default policy (see the table above).
    pub fn new() -> RetryPolicy {
        RetryPolicy::default()
    }

    /// The first retry's delay ceiling; it doubles with each retry. Default 100 ms.
    pub fn base(mut self, base: Duration) -> RetryPolicy {
        self.base = base;
        self
    }

    /// The largest delay ceiling. Default 10 s. A `Retry-After` may still ask for more.
    pub fn cap(mut self, cap: Duration) -> RetryPolicy {
        self.cap = cap;
        self
    }

    /// Attempts in all, the first included. Default 8; `0` counts as 1.
    pub fn max_attempts(mut self, attempts: u32) -> RetryPolicy {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The time budget: no wait is started that would end past it. Default `Some(60 s)`;
    /// `None` for no limit but `max_attempts`.
    pub fn max_elapsed(mut self, budget: Option<Duration>) -> RetryPolicy {
        self.max_elapsed = budget;
        self
    }

    /// Seeds the jitter: every run then draws the same delays. For tests and demos; in
    /// production leave it unset so that clients do not retry in lockstep.
    pub fn jitter_seed(mut self, seed: u64) -> RetryPolicy {
        self.seed = Some(seed);
        self
    }

    /// The delay ceiling before retry `retry` (1 for the first): `min(cap, base * 2^(retry-1))`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The jittered delays, one per retry (without `Retry-After`): for an async loop that
    /// sleeps with its runtime's timer.
    pub fn delays(&self) -> Delays {
        let rng = match self.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            // Jitter needs no secrecy: if the OS has no entropy, the time is seed enough.
            None => StdRng::try_from_rng(&mut SysRng).unwrap_or_else(|_| {
                let t = crate::clock::to_nanos(SystemTime::now());
                StdRng::seed_from_u64(t ^ u64::from(std::process::id()))
            }),
        };
        Delays {
            policy: self.clone(),
            rng,
            retry: 0,
        }
    }

    /// Runs `send` until it gets a final answer or the policy runs out, sleeping the thread
    /// between attempts. Every attempt gets the same `key` (in [`Attempt::key`]).
    ///
    /// Classification ([`classify_status`]): 2xx → [`RetryOutcome::Succeeded`]; 422 →
    /// [`RetryOutcome::Mismatch`] at once; other final statuses → [`RetryOutcome::Rejected`];
    /// [`Sent::Timeout`], [`Sent::ConnectionFailed`], 408, 409, 429 and 5xx are retried,
    /// waiting at least their `Retry-After`.
    ///
    /// A *replayed* response (`replayed: true`, from `Idempotent-Replayed: true`) is the
    /// answer the server stored for this key, and every retry would get it again: it ends the
    /// run whatever its status, as [`RetryOutcome::Succeeded`] for a 2xx and
    /// [`RetryOutcome::Rejected`] for anything else (a stored 422 is the handler's own answer,
    /// not a reused key).
    pub fn run<T>(&self, key: &str, send: impl FnMut(&Attempt<'_>) -> Sent<T>) -> RetryOutcome<T> {
        self.run_with(key, &mut ThreadSleeper, send)
    }

    /// As [`run`](RetryPolicy::run), waiting with `sleeper` (inject one in tests).
    ///
    /// Elapsed time, for `max_elapsed`, is the time spent inside `send` (measured) plus the
    /// delays handed to `sleeper` (as asked, not measured): with [`ThreadSleeper`] that is
    /// wall-clock time, and with a recording sleeper it is deterministic.
    pub fn run_with<T>(
        &self,
        key: &str,
        sleeper: &mut impl Sleeper,
        mut send: impl FnMut(&Attempt<'_>) -> Sent<T>,
    ) -> RetryOutcome<T> {
        let mut delays = self.delays();
        let mut elapsed = Duration::ZERO;
        let mut number = 0u32;
        loop {
            number = number.saturating_add(1);
            let started = Instant::now();
            let sent = send(&Attempt {
                key,
                number,
                elapsed,
            });
            elapsed = elapsed.saturating_add(started.elapsed());
            let retry_after = match sent {
                // A replay is the outcome the server stored for this key: asking again
                // gets the same bytes, so it is final whatever its status.
                Sent::Response {
                    status,
                    replayed: true,
                    value,
                    ..
                } if !(200..=299).contains(&status) => {
                    return RetryOutcome::Rejected {
                        status,
                        value,
                        attempts: number,
                    };
                }
                Sent::Response {
                    status,
                    retry_after,
                    replayed,
                    value,
                } => match classify_status(status) {
                    StatusClass::Success => {
                        return RetryOutcome::Succeeded {
                            status,
                            value,
                            attempts: number,
                        };
                    }
                    StatusClass::Mismatch => {
                        return RetryOutcome::Mismatch {
                            value,
                            attempts: number,
                        };
                    }
                    StatusClass::Rejected => {
                        return RetryOutcome::Rejected {
                            status,
                            value,
                            attempts: number,
                        };
                    }
                    StatusClass::Retry => {
                        let last = Sent::Response {
                            status,
                            retry_after,
                            replayed,
                            value,
                        };
                        (retry_after, last)
                    }
                },
                other => (None, other),
            };
            let (retry_after, last) = retry_after;
            if number >= self.max_attempts {
                return RetryOutcome::GaveUp {
                    reason: GiveUp::MaxAttempts,
                    attempts: number,
                    elapsed,
                    last,
                };
            }
            let jitter = delays.next().unwrap_or(Duration::ZERO);
            let wait = retry_after.map_or(jitter, |after| after.max(jitter));
            if self
                .max_elapsed
                .is_some_and(|budget| elapsed.saturating_add(wait) > budget)
            {
                return RetryOutcome::GaveUp {
                    reason: GiveUp::MaxElapsed,
                    attempts: number,
                    elapsed,
                    last,
                };
            }
            sleeper.sleep(wait);
            elapsed = elapsed.saturating_add(wait);
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds (`"120"`) or an HTTP-date (relative to
/// `now`; a date in the past is zero), in any of the three forms that RFC 9110 (section 5.6.7) asks
/// recipients to accept: IMF-fixdate (`"Sun, 06 Nov 1994 08:49:37 GMT"`), the obsolete
/// RFC 850 form (`"Sunday, 06-Nov-94 08:49:37 GMT"`, its two-digit year read as the latest
/// year with those digits that is not more than 50 years after `now`) and asctime
/// (`"Sun Nov  6 08:49:37 1994"`). A date must exist and carry its own day name. `None` for
/// anything else; the retry helper then uses its backoff alone.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use idemstore::client::parse_retry_after;
/// let now = UNIX_EPOCH + Duration::from_secs(784_111_717); // 06 Nov 1994 08:48:37
/// assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
/// let minute = Some(Duration::from_secs(60));
/// assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), minute);
/// assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now), minute);
/// assert_eq!(parse_retry_after("Sun Nov  6 08:49:37 1994", now), minute);
/// assert_eq!(parse_retry_after("soon", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long numbers saturate rather than fail: the server means "a long time".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = parse_http_date(value, now)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An HTTP-date in any of its three forms (RFC 9110, section 5.6.7), read by `httpdate`, which also
/// checks that the date exists and that its day name is the right one. An RFC 850 date is
/// first rewritten as an IMF-fixdate with its two-digit year placed relative to `now` (the
/// latest year with those digits not more than 50 years after `now`), as RFC 9110 asks;
/// `httpdate` alone would read it in the fixed window 1970-2069.
fn parse_http_date(s: &str, now: SystemTime) -> Option<SystemTime> {
    match rfc850_as_imf_fixdate(s, now) {
        Some(fixdate) => httpdate::parse_http_date(&fixdate).ok(),
        None => httpdate::parse_http_date(s).ok(),
    }
}

const LONG_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// An RFC 850 date (`Sunday, 06-Nov-94 08:49:37 GMT`: a full day name, `DD-Mon-YY`, the
/// time) rewritten as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), its year placed
/// relative to `now`; `None` if `s` does not start so (`httpdate` then refuses it as an
/// RFC 850 date too, and reads it in its other forms). `httpdate` checks every other field.
fn rfc850_as_imf_fixdate(s: &str, now: SystemTime) -> Option<String> {
    let (name, rest) = s.split_once(", ")?;
    let b = rest.as_bytes();
    if !LONG_DAYS.contains(&name)
        || !rest.is_ascii()
        || b.len() != 22
        || b[2] != b'-'
        || b[6] != b'-'
    {
        return None;
    }
    let yy: u32 = rest
        .get(7..9)
        .filter(|y| y.bytes().all(|c| c.is_ascii_digit()))?
        .parse()
        .ok()?;
    let this_year = year_of(now);
    let mut year = this_year - this_year % 100 + yy;
    if year > this_year + 50 {
        year -= 100;
    }
    let (day, month, time) = (&rest[..2], &rest[3..6], &rest[9..]);
    Some(format!("{}, {day} {month} {year}{time}", &name[..3]))
}

/// The civil year (UTC) of `t`: 1970 for times before the epoch, 9999 for times after it.
fn year_of(t: SystemTime) -> u32 {
    // The last second `httpdate` formats: 9999-12-31T23:59:59Z.
    let last = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let t = t.clamp(SystemTime::UNIX_EPOCH, last);
    // `Sun, 06 Nov 1994 08:49:37 GMT`: the year is at bytes 12..16.
    httpdate::fmt_http_date(t)
        .get(12..16)
        .and_then(|y| y.parse().ok())
        .unwrap_or(1970)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn ceiling_doubles_and_caps() {
        let p = RetryPolicy::new()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(1));
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(4), Duration::from_millis(800));
        assert_eq!(p.ceiling(5), Duration::from_secs(1));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn seeded_delays_repeat_and_stay_under_the_ceiling() {
        let p = RetryPolicy::new().jitter_seed(9);
        let a: Vec<_> = p.delays().take(20).collect();
        let b: Vec<_> = p.delays().take(20).collect();
        assert_eq!(a, b);
        for (i, d) in a.iter().enumerate() {
            assert!(*d <= p.ceiling(i as u32 + 1));
        }
        let c: Vec<_> = RetryPolicy::new()
            .jitter_seed(10)
            .delays()
            .take(20)
            .collect();
        assert_ne!(a, c);
    }

    #[test]
    fn imf_fixdate() {
        let now = UNIX_EPOCH;
        let parse = |s| parse_http_date(s, now);
        let t = parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs(784_111_777));
        let t = parse("Thu, 01 Jan 1970 00:00:00 GMT").unwrap();
        assert_eq!(t, UNIX_EPOCH);
        let t = parse("Tue, 29 Feb 2028 23:59:59 GMT").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs(1_835_481_599));
        for bad in [
            "",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 19944 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:3 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT ",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, +6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "Sün, 06 Nov 1994 08:49:37 GMT",
            // Checked by httpdate: the day name must be the date's, the date must exist.
            "Mon, 06 Nov 1994 08:49:37 GMT",
            "Thu, 31 Feb 2028 00:00:00 GMT",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn obsolete_date_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let parse = |s| parse_http_date(s, now);
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse("Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(
            parse("Tue Feb 29 23:59:59 2028"),
            Some(UNIX_EPOCH + Duration::from_secs(1_835_481_599))
        );
        // Two-digit years: at most 50 years ahead of `now`, else the century before.
        let in_2026 = UNIX_EPOCH + Duration::from_secs(1_795_824_000); // 2026-11-28
        assert_eq!(year_of(in_2026), 2026);
        let year = |s| parse_http_date(s, in_2026).map(year_of);
        assert_eq!(year("Wednesday, 01-Jan-76 00:00:00 GMT"), Some(2076));
        assert_eq!(year("Saturday, 01-Jan-77 00:00:00 GMT"), Some(1977));
        assert_eq!(year("Wednesday, 01-Jan-70 00:00:00 GMT"), Some(2070));
        // The day name is checked against the year so placed (2070-01-01 is a Wednesday).
        assert_eq!(year("Thursday, 01-Jan-70 00:00:00 GMT"), None);
        assert_eq!(year_of(UNIX_EPOCH - Duration::from_secs(1)), 1970);
        for bad in [
            "Sun, 06-Nov-94 08:49:37 GMT",
            "Sunday, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 UTC",
            "Sunday, 06-Xyz-94 08:49:37 GMT",
            "Sunday, 06-Nov-9x 08:49:37 GMT",
            "Sunday, 06-Nov-é4 08:49:37 GMT",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        for bad in [
            "Sun Nov 6 08:49:37 1994",
            "Sun Nov 06 08:49:37 94",
            "Sunday Nov  6 08:49:37 1994",
            "Sun Nov  6 08:49:37 1994 GMT",
            "Sun Nov  x 08:49:37 1994",
            "Sun Nov 32 08:49:37 1994",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:30 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
    }
}
