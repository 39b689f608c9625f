//! [`Outbox`]: the client's durable record of operations it has sent or is about to send.
//!
//! # Table and entry format
//!
//! One redb table, `idemstore_outbox` unless [`OutboxBuilder::table`] names another;
//! the outbox touches no other table of the file. Key: the operation id (UTF-8). Value,
//! version 1, `58 + n` bytes:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | format version, `1` |
//! | 1..9 | `created_at`, nanoseconds since the Unix epoch, `u64` big-endian |
//! | 9..17 | `expires_at` (`created_at + ttl`, computed when recorded), same encoding |
//! | 17..25 | `finished_at`, same encoding; `0` while the operation is pending |
//! | 25..57 | the request fingerprint, 32 bytes |
//! | 57 | `n`, the key's length, 1..=255 |
//! | 58..58+n | the idempotency key, printable ASCII |
//!
//! Anything else (another version, a wrong length, a bad key) decodes to
//! [`Error::Corrupt`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use crate::clock::{Clock, SystemClock, duration_nanos, from_nanos, to_nanos};
use crate::config::DEFAULT_TTL;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::{Key, MAX_KEY_PART_BYTES};
use crate::redb_file;

/// The table an [`Outbox`] uses unless told otherwise: `"idemstore_outbox"`.
pub(crate) const DEFAULT_OUTBOX_TABLE: &str = "idemstore_outbox";

/// The store's own table names: an outbox refuses a file that holds them.
use crate::storage::TABLE_NAMES as STORE_TABLES;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 58;

/// A durable, client-side list of operations and their idempotency keys, on redb.
///
/// Record an operation with [`record`](Outbox::record) *before* sending its request: the key
/// is fsync'd to disk when `record` returns. Mark it [`finish`](Outbox::finish)ed when it got
/// a final answer. After a crash or restart, [`pending`](Outbox::pending) lists the
/// unfinished ones, each with the key it was first sent with: resume them with that key.
///
/// Entries live for the outbox's TTL (default 24 hours, counted from `record`), then they
/// are treated as absent and deleted by [`purge`](Outbox::purge) (which [`Outbox::open`]
/// runs). Keep the TTL no longer than the server's: a request resent after the server forgot
/// its key would run again.
///
/// `Outbox` is cheap to clone (clones share the file) and `Send + Sync`.
///
/// # Which file
///
/// [`Outbox::open`] uses a file of its own. [`OutboxBuilder::open`] may also name a redb
/// file that holds other tables of yours (the outbox uses only its own table), and
/// [`OutboxBuilder::open_database`] shares a `redb::Database` you already have open. It
/// cannot live in a [`Store`](crate::Store)'s file: a redb file is locked by the process that
/// has it open, the store keeps its file open, and an outbox refuses a store's file anyway
/// (client and server state belong in different files).
///
/// ```
/// use idemstore::client::Outbox;
/// use idemstore::Fingerprint;
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("outbox.redb");
/// let fp = Fingerprint::of(b"POST /payments {\"amount\":5}");
///
/// let outbox = Outbox::open(&path)?;
/// let first = outbox.record("pay-invoice-17", &fp)?;
/// drop(outbox); // the process dies before it got an answer
///
/// let outbox = Outbox::open(&path)?;
/// let pending = outbox.pending()?;
/// assert_eq!(pending.len(), 1);
/// assert_eq!(pending[0].key(), first.key()); // resume with the same key
/// // Asking again for the same operation returns the same key, never a new one.
/// assert_eq!(outbox.record("pay-invoice-17", &fp)?.key(), first.key());
/// # Ok::<(), idemstore::Error>(())
/// ```
#[derive(Clone)]
pub struct Outbox {
    db: Arc<Database>,
    table: Arc<str>,
    ttl: Duration,
    clock: Arc<dyn Clock>,
}

/// One operation in an [`Outbox`].
#[derive(Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    operation: String,
    key: String,
    fingerprint: Fingerprint,
    created_at: u64,
    expires_at: u64,
    finished_at: Option<u64>,
}

impl OutboxEntry {
    /// The operation id you chose.
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// The idempotency key: send it, unchanged, on every attempt of this operation.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fingerprint of the operation's request, as recorded.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// When the operation was recorded.
    pub fn created_at(&self) -> SystemTime {
        from_nanos(self.created_at)
    }

    /// When the entry expires (`created_at + ttl`, computed when it was recorded).
    pub fn expires_at(&self) -> SystemTime {
        from_nanos(self.expires_at)
    }

    /// When [`Outbox::finish`] marked it done; `None` while it is pending.
    pub fn finished_at(&self) -> Option<SystemTime> {
        self.finished_at.map(from_nanos)
    }

    /// Whether [`Outbox::finish`] marked it done.
    pub fn is_finished(&self) -> bool {
        self.finished_at.is_some()
    }

    fn is_dead(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.key.len());
        out.push(VERSION);
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.finished_at.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(self.fingerprint.as_bytes());
        // The key was validated (1..=255 bytes) before it got here.
        out.push(self.key.len() as u8);
        out.extend_from_slice(self.key.as_bytes());
        out
    }

    fn decode(operation: &str, bytes: &[u8]) -> Result<OutboxEntry> {
        let corrupt = |what: &str| Error::corrupt(format!("outbox entry {operation:?}: {what}"));
        if bytes.len() < HEADER_LEN {
            return Err(corrupt("shorter than its fixed header"));
        }
        if bytes[0] != VERSION {
            return Err(corrupt(&format!(
                "format version {} is not supported (this build reads {VERSION})",
                bytes[0]
            )));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut fp = [0u8; 32];
        fp.copy_from_slice(&bytes[25..57]);
        let key_len = usize::from(bytes[57]);
        if bytes.len() != HEADER_LEN + key_len {
            return Err(corrupt("its length does not match its key length"));
        }
        let key = std::str::from_utf8(&bytes[HEADER_LEN..])
            .ok()
            .filter(|k| Key::new("", k).is_ok())
            .ok_or_else(|| corrupt("the stored key is not a valid idempotency key"))?;
        let finished_at = u64_at(17);
        Ok(OutboxEntry {
            operation: operation.to_owned(),
            key: key.to_owned(),
            fingerprint: Fingerprint::from_bytes(fp),
            created_at: u64_at(1),
            expires_at: u64_at(9),
            finished_at: (finished_at != 0).then_some(finished_at),
        })
    }
}

impl fmt::Debug for OutboxEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxEntry")
            .field("operation", &self.operation)
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .field("created_at", &self.created_at())
            .field("expires_at", &self.expires_at())
            .field("finished_at", &self.finished_at())
            .finish()
    }
}

fn storage<E: std::error::Error + Send + Sync + 'static>(what: &str) -> impl FnOnce(E) -> Error {
    let context = format!("{what} (outbox)");
    move |e| Error::storage(context, e)
}

/// A failed commit of the outbox: its outcome is unknown.
fn commit_failed<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
) -> impl FnOnce(E) -> Error {
    let context = format!("{what} (outbox)");
    move |e| Error::write_failed(context, e)
}

/// The entry of `operation`, dead or alive.
fn read_entry(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    operation: &str,
) -> Result<Option<OutboxEntry>> {
    table
        .get(operation)
        .map_err(storage("reading an entry"))?
        .map(|v| OutboxEntry::decode(operation, v.value()))
        .transpose()
}

fn check_operation(operation: &str) -> Result<()> {
    if operation.is_empty() || operation.len() > MAX_KEY_PART_BYTES {
        return Err(Error::InvalidKey {
            reason: format!(
                "operation id is {} bytes long; an outbox operation id needs 1-{MAX_KEY_PART_BYTES} bytes",
                operation.len()
            ),
        });
    }
    Ok(())
}

impl Outbox {
    /// Opens (or creates) an outbox in its own file at `path`, with the default settings
    /// (TTL 24 hours, table `idemstore_outbox`), and purges expired entries.
    ///
    /// # Errors
    /// As [`OutboxBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Outbox> {
        Outbox::builder().open(path)
    }

    /// A builder to choose the TTL, the table, the clock.
    pub fn builder() -> OutboxBuilder {
        OutboxBuilder::default()
    }

    fn def(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.table)
    }

    fn now(&self) -> u64 {
        to_nanos(self.clock.now())
    }

    /// Records the operation `operation` (an id you choose, 1–255 bytes, unique per logical
    /// operation) with a fresh key from [`new_key`](crate::client::new_key), durably, and
    /// returns its entry. Send the request only after this returned.
    ///
    /// Asked again about an operation it already has (alive, pending or finished), it returns
    /// the entry it has, with its original key: a restart or a retry never gets a new key.
    /// Check [`OutboxEntry::is_finished`] before sending again.
    ///
    /// # Errors
    /// * [`Error::OperationConflict`]: the operation id is recorded for a request with
    ///   another fingerprint (one operation id, one request).
    /// * [`Error::OperationExpired`]: the operation was recorded, never finished, and its
    ///   entry expired: its outcome is unknown and it is not recorded again (a new key could
    ///   run it twice) until [`purge`](Outbox::purge) has handed the entry over for
    ///   reconciling. A finished operation's expired entry counts as absent.
    /// * [`Error::InvalidKey`]: the operation id is empty or longer than 255 bytes.
    /// * [`Error::Storage`]: the write failed; its outcome is unknown, so call `record`
    ///   again (it returns the entry if the write did land) before sending.
    pub fn record(&self, operation: &str, fingerprint: &Fingerprint) -> Result<OutboxEntry> {
        self.record_inner(operation, None, fingerprint)
    }

    /// As [`record`](Outbox::record), with a key you generated yourself (it must pass
    /// [`Key::new`](crate::Key::new)'s rules). If the operation is already recorded, the key
    /// stored first wins and the returned entry carries it: always send the returned entry's
    /// key.
    ///
    /// # Errors
    /// As [`record`](Outbox::record), and [`Error::InvalidKey`] for a key that breaks the
    /// rules.
    pub fn record_with_key(
        &self,
        operation: &str,
        key: &str,
        fingerprint: &Fingerprint,
    ) -> Result<OutboxEntry> {
        Key::new("", key)?;
        self.record_inner(operation, Some(key), fingerprint)
    }

    fn record_inner(
        &self,
        operation: &str,
        key: Option<&str>,
        fingerprint: &Fingerprint,
    ) -> Result<OutboxEntry> {
        check_operation(operation)?;
        let now = self.now();
        let txn = self.db.begin_write().map_err(storage("starting a write"))?;
        let entry = {
            let mut table = txn
                .open_table(self.def())
                .map_err(storage("opening the table"))?;
            // An expired entry counts as absent once finished; an unfinished one stays until
            // `purge` hands it over for reconciling, and the operation is not recorded again
            // (a second key would let the server run it twice).
            let existing = read_entry(&table, operation)?
                .filter(|e| !e.is_dead(now) || e.finished_at.is_none());
            if let Some(existing) = existing {
                if existing.fingerprint != *fingerprint {
                    return Err(Error::OperationConflict {
                        operation: operation.to_owned(),
                    });
                }
                if existing.is_dead(now) {
                    return Err(Error::OperationExpired {
                        operation: operation.to_owned(),
                        key: existing.key,
                    });
                }
                return Ok(existing);
            }
            let entry = OutboxEntry {
                operation: operation.to_owned(),
                key: key.map_or_else(crate::client::new_key, str::to_owned),
                fingerprint: *fingerprint,
                created_at: now,
                expires_at: now.saturating_add(duration_nanos(self.ttl)),
                finished_at: None,
            };
            table
                .insert(operation, entry.encode().as_slice())
                .map_err(storage("writing an entry"))?;
            entry
        };
        txn.commit().map_err(commit_failed("committing an entry"))?;
        Ok(entry)
    }

    /// The live entry of `operation`, pending or finished; `None` when absent or expired.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged entry; [`Error::Storage`].
    pub fn get(&self, operation: &str) -> Result<Option<OutboxEntry>> {
        let now = self.now();
        let txn = self.db.begin_read().map_err(storage("starting a read"))?;
        let table = match txn.open_table(self.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(Error::storage("opening the outbox table", e)),
        };
        Ok(read_entry(&table, operation)?.filter(|e| !e.is_dead(now)))
    }

    /// Every live entry, oldest first.
    fn live(&self) -> Result<Vec<OutboxEntry>> {
        let now = self.now();
        let txn = self.db.begin_read().map_err(storage("starting a read"))?;
        let table = match txn.open_table(self.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(Error::storage("opening the outbox table", e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(storage("listing entries"))? {
            let (k, v) = item.map_err(storage("listing entries"))?;
            let entry = OutboxEntry::decode(k.value(), v.value())?;
            if !entry.is_dead(now) {
                out.push(entry);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.operation).cmp(&(b.created_at, &b.operation)));
        Ok(out)
    }

    /// The unfinished, unexpired operations, oldest first: after a restart, resume each with
    /// its [`key`](OutboxEntry::key).
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged entry; [`Error::Storage`].
    pub fn pending(&self) -> Result<Vec<OutboxEntry>> {
        let mut live = self.live()?;
        live.retain(|e| !e.is_finished());
        Ok(live)
    }

    /// Marks `operation` done, durably. Call it once the operation got a final answer
    /// (success, 422, another 4xx), not after a [`GaveUp`](crate::client::RetryOutcome::GaveUp).
    /// The entry stays until it expires, so `record` of the same operation id keeps returning
    /// it (finished) instead of starting the operation again.
    ///
    /// Returns `true` when the operation was pending, `false` when it was already finished,
    /// absent or expired.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged entry; [`Error::Storage`].
    pub fn finish(&self, operation: &str) -> Result<bool> {
        let now = self.now();
        let txn = self.db.begin_write().map_err(storage("starting a write"))?;
        let changed = {
            let mut table = txn
                .open_table(self.def())
                .map_err(storage("opening the table"))?;
            let existing = read_entry(&table, operation)?;
            match existing {
                Some(mut entry) if !entry.is_dead(now) && !entry.is_finished() => {
                    // 0 means "pending" in the encoding: a finish at the epoch is stored as 1 ns.
                    entry.finished_at = Some(now.max(1));
                    table
                        .insert(operation, entry.encode().as_slice())
                        .map_err(storage("writing an entry"))?;
                    true
                }
                _ => false,
            }
        };
        if changed {
            txn.commit().map_err(commit_failed("committing an entry"))?;
        } else {
            txn.abort().map_err(storage("ending a write"))?;
        }
        Ok(changed)
    }

    /// Deletes every expired entry (pending or finished) and returns them, oldest first. The
    /// pending ones among them are operations whose outcome this client never learned and
    /// can no longer safely resend: reconcile them another way (ask the server).
    ///
    /// The work is a scan of the outbox table (client outboxes are small).
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged entry; [`Error::Storage`].
    pub fn purge(&self) -> Result<Vec<OutboxEntry>> {
        let now = self.now();
        let txn = self.db.begin_write().map_err(storage("starting a write"))?;
        let mut dead = Vec::new();
        {
            let mut table = txn
                .open_table(self.def())
                .map_err(storage("opening the table"))?;
            for item in table.iter().map_err(storage("listing entries"))? {
                let (k, v) = item.map_err(storage("listing entries"))?;
                let entry = OutboxEntry::decode(k.value(), v.value())?;
                if entry.is_dead(now) {
                    dead.push(entry);
                }
            }
            for entry in &dead {
                table
                    .remove(entry.operation.as_str())
                    .map_err(storage("deleting an entry"))?;
            }
        }
        if dead.is_empty() {
            txn.abort().map_err(storage("ending a write"))?;
        } else {
            txn.commit().map_err(commit_failed("committing a purge"))?;
        }
        dead.sort_by(|a, b| (a.created_at, &a.operation).cmp(&(b.created_at, &b.operation)));
        Ok(dead)
    }

    /// The outbox's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The name of the outbox's table.
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("table", &self.table)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Chooses an [`Outbox`]'s settings; made by [`Outbox::builder`].
#[must_use = "call open(path) or open_database(db)"]
pub struct OutboxBuilder {
    ttl: Duration,
    table: String,
    clock: Arc<dyn Clock>,
    purge_on_open: bool,
}

impl Default for OutboxBuilder {
    fn default() -> OutboxBuilder {
        OutboxBuilder {
            ttl: DEFAULT_TTL,
            table: DEFAULT_OUTBOX_TABLE.to_owned(),
            clock: Arc::new(SystemClock),
            purge_on_open: true,
        }
    }
}

impl fmt::Debug for OutboxBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxBuilder")
            .field("ttl", &self.ttl)
            .field("table", &self.table)
            .field("purge_on_open", &self.purge_on_open)
            .finish()
    }
}

impl OutboxBuilder {
    /// How long an entry lives, counted from `record`. Default 24 hours (the store's default
    /// TTL). Must be greater than zero; keep it no longer than the server's key TTL.
    pub fn ttl(mut self, ttl: Duration) -> OutboxBuilder {
        self.ttl = ttl;
        self
    }

    /// The table to use. Default `idemstore_outbox`. Several outboxes can share one
    /// file under different table names (through [`open_database`](OutboxBuilder::open_database)).
    pub fn table(mut self, name: impl Into<String>) -> OutboxBuilder {
        self.table = name.into();
        self
    }

    /// Where time comes from. Default the system clock; a
    /// [`ManualClock`](crate::ManualClock) tests expiry without sleeping.
    pub fn clock(mut self, clock: impl Clock) -> OutboxBuilder {
        self.clock = Arc::new(clock);
        self
    }

    /// Whether opening deletes expired entries. Default `true`, and each expired pending
    /// operation is then a warning event (target `idemstore::client::outbox`). Turn it off to
    /// call [`Outbox::purge`] yourself and look at the expired pending operations it returns.
    pub fn purge_on_open(mut self, purge: bool) -> OutboxBuilder {
        self.purge_on_open = purge;
        self
    }

    fn check(&self) -> Result<()> {
        if self.ttl.is_zero() {
            return Err(Error::config("outbox ttl must be greater than zero"));
        }
        if self.table.is_empty() || STORE_TABLES.contains(&self.table.as_str()) {
            return Err(Error::config(format!(
                "outbox table name {:?} is empty or one of the store's own tables; choose another",
                self.table
            )));
        }
        Ok(())
    }

    /// Opens (or creates, mode 0600 on Unix) the redb file at `path` and the outbox table in
    /// it. The file may hold other tables of yours; the outbox touches only its own.
    ///
    /// # Errors
    /// * [`Error::InvalidConfig`]: zero TTL, or an empty or reserved table name.
    /// * [`Error::AlreadyOpen`]: the file is open (in this process, for example by a
    ///   [`Store`](crate::Store), or in another one).
    /// * [`Error::IncompatibleFormat`]: the file is not a redb file, or it is an idemstore
    ///   store's file (use a separate file for the outbox). The file is not modified.
    /// * [`Error::Corrupt`] / [`Error::Storage`]: a damaged entry, an I/O failure.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Outbox> {
        self.check()?;
        let path = path.as_ref();
        let db = open_file(path)?;
        self.open_database(Arc::new(db))
    }

    /// Uses a redb database you already have open (for example your application's own
    /// file), creating the outbox table in it. The outbox touches only its own table. Note
    /// that this ties your code to the redb major version idemstore uses.
    ///
    /// # Errors
    /// As [`open`](OutboxBuilder::open), without the file errors.
    pub fn open_database(self, db: Arc<Database>) -> Result<Outbox> {
        self.check()?;
        refuse_store_file(db.as_ref())?;
        let outbox = Outbox {
            db,
            table: Arc::from(self.table.as_str()),
            ttl: self.ttl,
            clock: self.clock,
        };
        let txn = outbox
            .db
            .begin_write()
            .map_err(storage("starting a write"))?;
        txn.open_table(outbox.def()).map_err(|e| match e {
            redb::TableError::TableTypeMismatch { .. }
            | redb::TableError::TableIsMultimap(_)
            | redb::TableError::TypeDefinitionChanged { .. } => Error::IncompatibleFormat {
                reason: format!(
                    "table {:?} exists but is not an outbox table; choose another table name",
                    outbox.table
                ),
            },
            other => Error::storage("creating the outbox table", other),
        })?;
        txn.commit().map_err(storage("creating the outbox table"))?;
        if self.purge_on_open {
            for entry in outbox.purge()? {
                if !entry.is_finished() {
                    tracing::warn!(
                        operation = entry.operation(),
                        key = entry.key(),
                        "idemstore: an outbox operation expired unfinished and was purged: \
                         whether the server ran it is unknown; reconcile it with the server"
                    );
                }
            }
        }
        Ok(outbox)
    }
}

/// Refuses a database that holds an idemstore store's tables.
fn refuse_store_file(db: &impl ReadableDatabase) -> Result<()> {
    let txn = db.begin_read().map_err(storage("starting a read"))?;
    let tables = txn.list_tables().map_err(storage("listing tables"))?;
    for table in tables {
        if STORE_TABLES.contains(&table.name()) {
            return Err(Error::IncompatibleFormat {
                reason: "this is an idemstore Store's file; give the outbox a file of its own"
                    .into(),
            });
        }
    }
    Ok(())
}

fn open_file(path: &Path) -> Result<Database> {
    let open_err = |e| redb_file::open_error(path, e);
    if redb_file::existing_len(path)?.is_some_and(|len| len > 0) {
        // Check read-only first: a file that is not ours to write is not modified.
        redb_file::require_redb(path, "; give the outbox a file of its own")?;
        match redb::Builder::new().open_read_only(path) {
            Ok(ro) => {
                let checked = refuse_store_file(&ro);
                let _ = ro.close();
                checked?;
            }
            // Needs crash recovery: checked after the read-write open (open_database).
            Err(redb::DatabaseError::RepairAborted) => {}
            Err(e) => return Err(open_err(e)),
        }
    }
    let file = redb_file::private_file_options()
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| redb_file::io_error(path, "opening", e))?;
    let backend = redb::backends::FileBackend::new(file).map_err(open_err)?;
    redb::Builder::new()
        .set_cache_size(1 << 20)
        .create_with_backend(backend)
        .map_err(open_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> OutboxEntry {
        OutboxEntry {
            operation: "op".into(),
            key: "0f8c1e8e-1c59-4c36-9d51-5c0d4b1a8f11".into(),
            fingerprint: Fingerprint::of(b"x"),
            created_at: 5,
            expires_at: 10,
            finished_at: None,
        }
    }

    #[test]
    fn entry_round_trips_byte_for_byte() {
        let mut e = entry();
        let bytes = e.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 36);
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[1..9], &5u64.to_be_bytes());
        assert_eq!(&bytes[9..17], &10u64.to_be_bytes());
        assert_eq!(&bytes[17..25], &[0; 8]);
        assert_eq!(&bytes[25..57], Fingerprint::of(b"x").as_bytes());
        assert_eq!(bytes[57], 36);
        assert_eq!(OutboxEntry::decode("op", &bytes).unwrap(), e);
        e.finished_at = Some(7);
        assert_eq!(OutboxEntry::decode("op", &e.encode()).unwrap(), e);
    }

    #[test]
    fn bad_entries_are_corrupt_not_panics() {
        let good = entry().encode();
        for len in 0..good.len() {
            assert!(matches!(
                OutboxEntry::decode("op", &good[..len]),
                Err(Error::Corrupt { .. })
            ));
        }
        let mut v2 = good.clone();
        v2[0] = 2;
        assert!(OutboxEntry::decode("op", &v2).is_err());
        let mut long = good.clone();
        long.push(b'x');
        assert!(OutboxEntry::decode("op", &long).is_err());
        let mut bad_key = good;
        bad_key[HEADER_LEN] = b'\n';
        assert!(OutboxEntry::decode("op", &bad_key).is_err());
    }
}
