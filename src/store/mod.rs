//! Crash-safe persistent metadata of pods, containers, images and IP
//! allocations: one embedded transactional database (redb) at
//! `<root>/metadata.redb`, one table per [`Kind`], values stored as JSON.
//!
//! What a reader must know before changing it:
//!
//! - Every call does blocking file I/O and a commit waits for `fsync`. Async
//!   code calls the store through `tokio::task::spawn_blocking`, never on a
//!   runtime worker.
//! - Only one write transaction exists at a time; [`Store::write`] waits for
//!   the one in progress. Calling a writing method of the store from inside
//!   a [`Store::write`] closure would wait for itself, so it is refused with
//!   [`StoreError::NestedWrite`]; use the [`Batch`] instead.
//! - The file is locked: a second [`Store::open`] of the same root, from this
//!   process or another, fails with [`StoreError::Locked`].
//! - Values are JSON so that a record written by a newer berth still decodes
//!   in an older one (unknown fields are ignored) and an operator can read
//!   the data. A change that old code cannot read bumps [`SCHEMA_VERSION`]
//!   and adds a step to `migrate`; never edit a step that has shipped.

use std::cell::Cell;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use redb::{
    Database, ReadableDatabase, ReadableTable, RepairSession, TableDefinition, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The schema this binary reads and writes. Bump it together with a new
/// step in `migrate`.
pub const SCHEMA_VERSION: u32 = 1;

/// File name of the database inside the root directory.
const DB_FILE: &str = "metadata.redb";

const META: TableDefinition<'static, &'static str, u32> = TableDefinition::new("meta");
const SCHEMA_VERSION_KEY: &str = "schema_version";

/// redb's default cache limit is 1 GiB. A node's metadata is a few MiB even
/// with hundreds of pods, and the cache only grows as pages are read, so a
/// small cap costs nothing and keeps the daemon's memory flat.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

type Records = TableDefinition<'static, &'static str, &'static [u8]>;

/// What a record is; each kind is its own table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Container,
    Image,
    Ipam,
    /// Node-wide settings the daemon keeps across restarts (the pod CIDRs
    /// kubelet sent).
    Runtime,
}

impl Kind {
    /// Every kind, so that open can create all tables up front: a read
    /// transaction fails on a table that was never created.
    const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::Container,
        Kind::Image,
        Kind::Ipam,
        Kind::Runtime,
    ];

    /// The redb table name. Part of the on-disk format: never rename.
    fn table_name(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Container => "containers",
            Kind::Image => "images",
            Kind::Ipam => "ipam",
            Kind::Runtime => "runtime",
        }
    }

    fn table(self) -> Records {
        TableDefinition::new(self.table_name())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Pod => "pod",
            Kind::Container => "container",
            Kind::Image => "image",
            Kind::Ipam => "ipam record",
            Kind::Runtime => "runtime setting",
        })
    }
}

/// Errors of the metadata store. Each displays as one line that names the
/// database file and what was being done; the cause is part of the message
/// rather than a separate `source()`, so it is printed exactly once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("create metadata directory {path}: {error}")]
    CreateDir { path: PathBuf, error: io::Error },
    #[error("create metadata database {path}: {error}")]
    CreateFile { path: PathBuf, error: io::Error },
    #[error(
        "metadata database {path} is locked: another berth (or another process) is using this root; stop it or use a different root"
    )]
    Locked { path: PathBuf },
    #[error("open metadata database {path}: {error}")]
    Open {
        path: PathBuf,
        error: redb::DatabaseError,
    },
    #[error(
        "metadata database {path} has schema version {found}, newer than version {supported} that this berth knows: upgrade berth to the release that wrote it"
    )]
    SchemaTooNew {
        found: u32,
        supported: u32,
        path: PathBuf,
    },
    #[error(
        "metadata database {path} has schema version {from}, and this berth has no migration from it"
    )]
    NoMigration { path: PathBuf, from: u32 },
    #[error("migrate metadata database {path} from schema version {from} to {}: {error}", from + 1)]
    Migration {
        path: PathBuf,
        from: u32,
        error: Box<StoreError>,
    },
    #[error("begin {op} transaction on {path}: {error}")]
    Transaction {
        path: PathBuf,
        op: &'static str,
        error: redb::TransactionError,
    },
    #[error("open table {table} in {path}: {error}")]
    Table {
        path: PathBuf,
        table: &'static str,
        // Boxed: redb's TableError alone would make every Result of the
        // store over 128 bytes.
        error: Box<redb::TableError>,
    },
    #[error("{op} in table {table} of {path}: {error}")]
    Storage {
        path: PathBuf,
        table: &'static str,
        op: String,
        error: redb::StorageError,
    },
    #[error("commit to {path}: {error}")]
    Commit {
        path: PathBuf,
        error: redb::CommitError,
    },
    #[error("encode {kind} {key:?} for {path}: {error}")]
    Encode {
        path: PathBuf,
        kind: Kind,
        key: String,
        error: serde_json::Error,
    },
    #[error("decode {kind} {key:?} from {path}: {error}")]
    Decode {
        path: PathBuf,
        kind: Kind,
        key: String,
        error: serde_json::Error,
    },
    #[error(
        "write transaction on {path} started inside another one on the same thread, which would wait for itself; use the batch"
    )]
    NestedWrite { path: PathBuf },
    #[error("metadata store task for {path} failed: {message}")]
    Task { path: PathBuf, message: String },
}

/// Handle to the open database. Cloning is cheap; all clones share one file
/// lock, which is released when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only between dropping a database that hit an I/O error and
    /// opening it again (see [`Store::reopen`]).
    db: RwLock<Option<Database>>,
    path: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens `<root>/metadata.redb`, creating the directory and the database
    /// if missing, and brings its schema to [`SCHEMA_VERSION`].
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Self::open_with(root, SCHEMA_VERSION, &migrate)
    }

    /// [`Store::open`] with the supported version and the migration steps as
    /// parameters, so that tests can simulate a database written by an older
    /// berth and a binary that knows a newer schema.
    fn open_with(
        root: &Path,
        supported: u32,
        migrate: &dyn Fn(u32, &mut Batch<'_>) -> Result<(), StoreError>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(root).map_err(|error| StoreError::CreateDir {
            path: root.to_owned(),
            error,
        })?;
        let path = root.join(DB_FILE);

        // Pod and container records carry environment variables and other
        // values from pod specs, which may be secrets: create the file
        // private before redb initialises it (redb uses the default mode).
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|error| StoreError::CreateFile {
                path: path.clone(),
                error,
            })?;

        let db = open_database(&path)?;
        let store = Store {
            inner: Arc::new(Inner {
                db: RwLock::new(Some(db)),
                path,
            }),
        };
        store.check_schema(supported, migrate)?;
        Ok(store)
    }

    /// Checks the schema version and migrates, in one write transaction, so
    /// that a crash mid-migration leaves the database at the old version with
    /// the old data, and the next start runs the migration again.
    fn check_schema(
        &self,
        supported: u32,
        migrate: &dyn Fn(u32, &mut Batch<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let path = &self.inner.path;
        self.write(|batch| {
            let found = batch.schema_version()?;
            match found {
                None => {
                    tracing::info!(path = %path.display(), version = supported, "created metadata database");
                }
                Some(found) if found == supported => {}
                Some(found) if found > supported => {
                    return Err(StoreError::SchemaTooNew {
                        found,
                        supported,
                        path: path.clone(),
                    });
                }
                Some(found) => {
                    for from in found..supported {
                        migrate(from, batch).map_err(|error| StoreError::Migration {
                            path: path.clone(),
                            from,
                            error: Box::new(error),
                        })?;
                    }
                    tracing::info!(path = %path.display(), from = found, to = supported, "migrated metadata database");
                }
            }
            if found != Some(supported) {
                batch.set_schema_version(supported)?;
            }
            // Creating every table here, not on first write, lets reads of a
            // kind that was never written (or is new in this release) find an
            // empty table instead of failing.
            for kind in Kind::ALL {
                batch.open(kind)?;
            }
            Ok(())
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The record `key` of `kind`, if present.
    pub fn get<T: DeserializeOwned>(&self, kind: Kind, key: &str) -> Result<Option<T>, StoreError> {
        let path = &self.inner.path;
        let txn = self.begin_read()?;
        let table = txn
            .open_table(kind.table())
            .map_err(|error| table_error(path, kind.table_name(), error))?;
        get_record(&table, path, kind, key)
    }

    /// Every record of `kind`, in key order. One record that fails to decode
    /// fails the whole list; list `serde_json::Value` to skip bad records.
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<(String, T)>, StoreError> {
        let path = &self.inner.path;
        let txn = self.begin_read()?;
        let table = txn
            .open_table(kind.table())
            .map_err(|error| table_error(path, kind.table_name(), error))?;
        list_records(&table, path, kind)
    }

    /// Writes (or replaces) one record and commits.
    pub fn put<T: Serialize>(&self, kind: Kind, key: &str, value: &T) -> Result<(), StoreError> {
        self.write(|batch| batch.put(kind, key, value))
    }

    /// Deletes one record and commits. Returns whether it existed.
    pub fn delete(&self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        self.write(|batch| batch.delete(kind, key))
    }

    /// Runs `f` in one write transaction: everything it does is committed
    /// together if it returns `Ok`, and nothing is if it returns `Err` or
    /// panics. Waits while another write transaction is in progress.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let path = &self.inner.path;
        let _writing = WritingGuard::enter(path)?;
        let txn = match self.with_db(|db| db.begin_write()) {
            Err(error) if after_io_error(&error) => {
                self.reopen()?;
                self.with_db(|db| db.begin_write())
            }
            other => other,
        }
        .map_err(|error| StoreError::Transaction {
            path: path.clone(),
            op: "write",
            error,
        })?;
        let mut batch = Batch { txn: &txn, path };
        match f(&mut batch) {
            Ok(result) => {
                txn.commit().map_err(|error| StoreError::Commit {
                    path: path.clone(),
                    error,
                })?;
                Ok(result)
            }
            Err(error) => {
                // The caller's error is the one that matters; a failed abort
                // only means redb repairs the file on the next open.
                if let Err(abort) = txn.abort() {
                    tracing::warn!(path = %path.display(), error = %abort, "abort metadata transaction");
                }
                Err(error)
            }
        }
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        match self.with_db(|db| db.begin_read()) {
            Err(error) if after_io_error(&error) => {
                self.reopen()?;
                self.with_db(|db| db.begin_read())
            }
            other => other,
        }
        .map_err(|error| StoreError::Transaction {
            path: self.inner.path.clone(),
            op: "read",
            error,
        })
    }

    /// Runs `f` on the open database; a database that could not be opened
    /// again after an I/O error answers as one that had the error.
    fn with_db<R>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, redb::TransactionError>,
    ) -> Result<R, redb::TransactionError> {
        let db = self.inner.db.read().unwrap_or_else(|p| p.into_inner());
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(redb::TransactionError::Storage(
                redb::StorageError::PreviousIo,
            )),
        }
    }

    /// After an I/O error (a full disk, say) redb refuses every later
    /// transaction until the database is closed and opened again; without
    /// this one ENOSPC would break the daemon's writes until a restart.
    /// Opening repairs the file from its last committed state.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.inner.db.write().unwrap_or_else(|p| p.into_inner());
        // The file lock is per open file: the old handle must be closed
        // before the new one can take it.
        *db = None;
        tracing::warn!(path = %self.inner.path.display(), "reopening the metadata database after an I/O error");
        *db = Some(open_database(&self.inner.path)?);
        Ok(())
    }
}

fn after_io_error(error: &redb::TransactionError) -> bool {
    matches!(
        error,
        redb::TransactionError::Storage(redb::StorageError::PreviousIo)
    )
}

/// The operations of one write transaction, handed to [`Store::write`]'s
/// closure. Reads see the batch's own earlier writes.
pub struct Batch<'a> {
    txn: &'a WriteTransaction,
    path: &'a Path,
}

impl Batch<'_> {
    /// The record `key` of `kind`, if present.
    pub fn get<T: DeserializeOwned>(&self, kind: Kind, key: &str) -> Result<Option<T>, StoreError> {
        get_record(&self.open(kind)?, self.path, kind, key)
    }

    /// Every record of `kind`, in key order.
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<(String, T)>, StoreError> {
        list_records(&self.open(kind)?, self.path, kind)
    }

    /// Writes (or replaces) one record.
    pub fn put<T: Serialize>(
        &mut self,
        kind: Kind,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|error| StoreError::Encode {
            path: self.path.to_owned(),
            kind,
            key: key.to_owned(),
            error,
        })?;
        let mut table = self.open(kind)?;
        table.insert(key, bytes.as_slice()).map_err(|error| {
            storage_error(
                self.path,
                kind.table_name(),
                || format!("put {key:?}"),
                error,
            )
        })?;
        Ok(())
    }

    /// Deletes one record. Returns whether it existed.
    pub fn delete(&mut self, kind: Kind, key: &str) -> Result<bool, StoreError> {
        let mut table = self.open(kind)?;
        let old = table.remove(key).map_err(|error| {
            storage_error(
                self.path,
                kind.table_name(),
                || format!("delete {key:?}"),
                error,
            )
        })?;
        Ok(old.is_some())
    }

    // Tables are opened per operation rather than kept in the batch: redb
    // refuses to open a table twice in one transaction, and a table must be
    // dropped before commit, so short-lived handles keep both rules trivially.
    fn open(&self, kind: Kind) -> Result<redb::Table<'_, &'static str, &'static [u8]>, StoreError> {
        self.txn
            .open_table(kind.table())
            .map_err(|error| table_error(self.path, kind.table_name(), error))
    }

    fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        let table = self.open_meta()?;
        let version = table.get(SCHEMA_VERSION_KEY).map_err(|error| {
            storage_error(
                self.path,
                META_NAME,
                || "read schema version".to_owned(),
                error,
            )
        })?;
        Ok(version.map(|guard| guard.value()))
    }

    fn set_schema_version(&mut self, version: u32) -> Result<(), StoreError> {
        let mut table = self.open_meta()?;
        table.insert(SCHEMA_VERSION_KEY, version).map_err(|error| {
            storage_error(
                self.path,
                META_NAME,
                || "write schema version".to_owned(),
                error,
            )
        })?;
        Ok(())
    }

    fn open_meta(&self) -> Result<redb::Table<'_, &'static str, u32>, StoreError> {
        self.txn
            .open_table(META)
            .map_err(|error| table_error(self.path, META_NAME, error))
    }
}

const META_NAME: &str = "meta";

/// Turns a database written by schema `from` into one of schema `from + 1`.
/// Runs inside the open's write transaction, once per step, oldest first.
/// Versions start at 1, which is where every database begins today, so
/// there is no step yet; the first one becomes the arm `1 => ...`.
#[allow(clippy::match_single_binding)] // the arms for future versions go here
fn migrate(from: u32, batch: &mut Batch<'_>) -> Result<(), StoreError> {
    match from {
        _ => Err(StoreError::NoMigration {
            path: batch.path.to_owned(),
            from,
        }),
    }
}

fn open_database(path: &Path) -> Result<Database, StoreError> {
    // After a crash redb rebuilds its allocator state on open (a walk over
    // the whole file, fast at our size); say so once, since an operator
    // looking at a slow start wants to know.
    let warned = AtomicBool::new(false);
    let repair_path = path.to_owned();
    let mut builder = Database::builder();
    builder
        .set_cache_size(CACHE_BYTES)
        .set_repair_callback(move |_: &mut RepairSession| {
            if !warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(path = %repair_path.display(), "metadata database was not closed cleanly; repairing");
            }
        });
    builder.create(path).map_err(|error| match error {
        // Later 4.x releases add LockProtocolMismatch (the holder uses
        // another generation of redb's locking). It is left to the generic
        // arm, whose message says as much, so that this builds with 4.1,
        // the newest redb that the crate's rust-version 1.89 resolves to.
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.to_owned(),
        },
        error => StoreError::Open {
            path: path.to_owned(),
            error,
        },
    })
}

fn get_record<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    kind: Kind,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let found = table.get(key).map_err(|error| {
        storage_error(path, kind.table_name(), || format!("get {key:?}"), error)
    })?;
    match found {
        None => Ok(None),
        Some(bytes) => decode(path, kind, key, bytes.value()).map(Some),
    }
}

fn list_records<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    kind: Kind,
) -> Result<Vec<(String, T)>, StoreError> {
    let list_error = |error| storage_error(path, kind.table_name(), || "list".to_owned(), error);
    let mut records = Vec::new();
    for entry in table.iter().map_err(list_error)? {
        let (key, bytes) = entry.map_err(list_error)?;
        let key = key.value();
        records.push((key.to_owned(), decode(path, kind, key, bytes.value())?));
    }
    Ok(records)
}

fn decode<T: DeserializeOwned>(
    path: &Path,
    kind: Kind,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Decode {
        path: path.to_owned(),
        kind,
        key: key.to_owned(),
        error,
    })
}

fn table_error(path: &Path, table: &'static str, error: redb::TableError) -> StoreError {
    StoreError::Table {
        path: path.to_owned(),
        table,
        error: Box::new(error),
    }
}

fn storage_error(
    path: &Path,
    table: &'static str,
    op: impl FnOnce() -> String,
    error: redb::StorageError,
) -> StoreError {
    StoreError::Storage {
        path: path.to_owned(),
        table,
        op: op(),
        error,
    }
}

thread_local! {
    static WRITING: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a write transaction, so that a nested
/// [`Store::write`] fails instead of waiting forever for itself.
struct WritingGuard;

impl WritingGuard {
    fn enter(path: &Path) -> Result<WritingGuard, StoreError> {
        if WRITING.replace(true) {
            return Err(StoreError::NestedWrite {
                path: path.to_owned(),
            });
        }
        Ok(WritingGuard)
    }
}

impl Drop for WritingGuard {
    fn drop(&mut self) {
        WRITING.set(false);
    }
}

#[cfg(test)]
mod tests;

mod cached;
pub use cached::{Cached, CachedWrite};
