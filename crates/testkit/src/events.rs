//! A `tracing` subscriber that captures every event idemstore emits, with its level, target
//! and fields, installed once as the process-wide default (the committer and the other
//! threads of a store emit from their own threads, which a thread-local default would miss).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One captured event.
#[derive(Clone, Debug)]
pub struct Captured {
    pub level: Level,
    pub target: String,
    /// (name, value), the message included.
    pub fields: Vec<(String, String)>,
}

impl Captured {
    /// The value of field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The event's message (empty without one).
    pub fn message(&self) -> &str {
        self.field("message").unwrap_or("")
    }

    /// Every field value, message included, as one string.
    pub fn text(&self) -> String {
        self.fields
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

/// The events captured so far.
#[derive(Default)]
pub struct Capture {
    events: Mutex<Vec<Captured>>,
    next_span: AtomicU64,
}

impl Capture {
    /// Every event captured since the last [`Capture::clear`].
    pub fn events(&self) -> Vec<Captured> {
        self.events.lock().unwrap().clone()
    }

    /// Forgets the events captured so far.
    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }

    /// The latest event whose message contains `message`.
    pub fn latest(&self, message: &str) -> Option<Captured> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .rev()
            .find(|e| e.message().contains(message))
            .cloned()
    }
}

impl Subscriber for &'static Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, SeqCst) + 1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.events.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// The process-wide capture, installed at the first call.
///
/// # Panics
/// If another process-wide subscriber was installed first.
pub fn installed() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::default());
        tracing::subscriber::set_global_default(capture).expect("no other global subscriber");
        capture
    })
}

/// The process-wide capture, emptied, and a guard that serializes the tests that read it
/// (they share it).
pub fn serial() -> (&'static Capture, MutexGuard<'static, ()>) {
    static SERIAL: Mutex<()> = Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let capture = installed();
    capture.clear();
    (capture, guard)
}
