//! The daemon's durable state: worker and session records in an embedded redb database under the
//! state directory. redb is pure Rust (no C toolchain, no external service), ACID with
//! copy-on-write B-trees, crash-safe by default, and actively maintained.
//!
//! Writes go through one writer thread that commits everything queued since its last commit in a
//! single fsync'd transaction (group commit), so thousands of status changes cost a handful of
//! fsyncs. Two kinds of writes reach it:
//! - a **commit** is a request's record: its caller waits, and changes its memory only once the
//!   record is durable. A group commit that fails fails every commit in it, and their changes
//!   are dropped: the callers refuse their requests and leave their memory as it was.
//! - a **submit** is a fact that has happened already (a worker started, ended): its caller does
//!   not wait. A submit whose group commit fails is kept and written again with the next group
//!   commit, until one succeeds (the latest change of each record only, so what is kept never
//!   outgrows the records).
//!
//! A barrier (a commit of nothing) answers once everything queued before it is durable, and errs
//! while anything is not: after a failed group commit it proves the store writes again before it
//! answers Ok. The queue is bounded: when it is full, submitters wait for room (asynchronously),
//! so a store that falls behind slows its writers instead of growing memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process has the store open (a second daemon on the same state dir, or a tool).
    #[error("state store {path} is in use by {holder}")]
    InUse { path: PathBuf, holder: String },
    /// The file is not a store this daemon can read: damaged, or not a redb file at all.
    #[error("state store {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("state store {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("state store {path}: move the unreadable file aside: {source}")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A group commit failed: what it held is not durable. The text is the store's own error.
    #[error("not recorded in the state store: {0}")]
    NotRecorded(String),
    #[error("state store writer has stopped")]
    WriterGone,
}

/// Which table a record lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Workers,
    Sessions,
}

const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

fn def(t: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match t {
        Table::Workers => WORKERS,
        Table::Sessions => SESSIONS,
    }
}

/// What opening the store found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenReport {
    /// No store existed; a new one was made.
    Created,
    /// The existing store opened.
    Opened,
}

/// A record that could not be decoded, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub key: String,
    pub error: String,
}

/// Decoded records by key, and the records that did not decode.
pub type Loaded<T> = (Vec<(String, T)>, Vec<BadRecord>);

/// Where the writer's group commits go: the redb [`Store`], or a fake that fails on demand.
pub trait RecordStore: Send + Sync + 'static {
    /// Applies `ops` in one durable transaction, all or none.
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError>;
}

/// The embedded database.
#[derive(Debug)]
pub struct Store {
    /// `None` only between a failed reopen and the next one.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    /// An I/O error has failed the open database: redb then refuses everything until the file
    /// is opened again, which the next write does first.
    needs_reopen: AtomicBool,
}

/// Opens the database at `path`, making sure both tables exist and the file takes writes.
fn open_db(path: &Path) -> Result<Database, StoreError> {
    let db = Database::create(path).map_err(|e| classify(path, e.into()))?;
    let tx = db.begin_write().map_err(|e| classify(path, e.into()))?;
    tx.open_table(WORKERS)
        .map_err(|e| classify(path, e.into()))?;
    tx.open_table(SESSIONS)
        .map_err(|e| classify(path, e.into()))?;
    tx.commit().map_err(|e| classify(path, e.into()))?;
    Ok(db)
}

/// Sorts an error of opening the store into in use, corrupt, or anything else (an I/O error:
/// permissions, a full disk), which moving the file aside would not mend.
fn classify(path: &Path, e: redb::Error) -> StoreError {
    let path = path.to_path_buf();
    match e {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            let holders = crate::host::processes_with_open(&path);
            let holder = if holders.is_empty() {
                "another process".to_owned()
            } else {
                holders
                    .iter()
                    .map(|(pid, comm)| format!("{comm} pid {pid}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            StoreError::InUse { path, holder }
        }
        // Not a redb file (its magic number), or one cut short.
        redb::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Corrupt {
                path,
                source: Box::new(redb::Error::Io(io)),
            }
        }
        e @ (redb::Error::Corrupted(_) | redb::Error::UpgradeRequired(_)) => StoreError::Corrupt {
            path,
            source: Box::new(e),
        },
        e => StoreError::Db {
            path,
            source: Box::new(e),
        },
    }
}

impl Store {
    /// Opens (or creates) the store at `path`. Nothing is moved or replaced here: a store that
    /// cannot be opened is the caller's to report (see [`Store::move_aside`]).
    pub fn open(path: &Path) -> Result<(Self, OpenReport), StoreError> {
        let existed = path.exists();
        let db = open_db(path)?;
        let report = if existed {
            OpenReport::Opened
        } else {
            OpenReport::Created
        };
        Ok((
            Self {
                db: RwLock::new(Some(db)),
                path: path.to_path_buf(),
                needs_reopen: AtomicBool::new(false),
            },
            report,
        ))
    }

    /// Moves the store file at `path` aside (to `<name>.corrupt-<unix seconds>`), so that a new
    /// one can be made; returns where it went.
    pub fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let moved_to = path.with_extension(format!("corrupt-{stamp}"));
        std::fs::rename(path, &moved_to).map_err(|source| StoreError::MoveAside {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(moved_to)
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        let e = e.into();
        if matches!(
            e,
            redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
        ) {
            self.needs_reopen.store(true, Ordering::Release);
        }
        StoreError::Db {
            path: self.path.clone(),
            source: Box::new(e),
        }
    }

    fn closed(&self) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: Box::new(redb::Error::DatabaseClosed),
        }
    }

    /// Opens the file again after an I/O error failed the open database.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The old handle goes first: it holds the file's locks.
        drop(db.take());
        let fresh = open_db(&self.path)?;
        *db = Some(fresh);
        self.needs_reopen.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "state store reopened after an I/O error");
        Ok(())
    }

    /// Every record of `table`; records that do not decode are returned apart.
    pub fn load<T: DeserializeOwned>(&self, table: Table) -> Result<Loaded<T>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or_else(|| self.closed())?;
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(def(table)).map_err(|e| self.err(e))?;
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let key = k.value().to_owned();
            match serde_json::from_slice::<T>(v.value()) {
                Ok(r) => good.push((key, r)),
                Err(e) => bad.push(BadRecord {
                    key,
                    error: e.to_string(),
                }),
            }
        }
        Ok((good, bad))
    }

    /// Applies `ops` in one durable transaction (an empty one still commits: it proves the file
    /// takes writes).
    pub fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        if self.needs_reopen.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or_else(|| self.closed())?;
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut workers = tx.open_table(WORKERS).map_err(|e| self.err(e))?;
            let mut sessions = tx.open_table(SESSIONS).map_err(|e| self.err(e))?;
            for op in ops {
                let t = match op.table() {
                    Table::Workers => &mut workers,
                    Table::Sessions => &mut sessions,
                };
                match op {
                    Op::Put { key, value, .. } => {
                        t.insert(key.as_str(), value.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    Op::Delete { key, .. } => {
                        t.remove(key.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

impl RecordStore for Store {
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        Store::apply(self, ops)
    }
}

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        table: Table,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: String,
    },
}

impl Op {
    /// A put of `value` as JSON.
    pub fn put<T: Serialize>(table: Table, key: &str, value: &T) -> Self {
        Op::Put {
            table,
            key: key.to_owned(),
            value: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub fn delete(table: Table, key: &str) -> Self {
        Op::Delete {
            table,
            key: key.to_owned(),
        }
    }

    pub fn table(&self) -> Table {
        match self {
            Op::Put { table, .. } | Op::Delete { table, .. } => *table,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

enum Msg {
    /// Ops and, for a commit, who waits for them; the permit is the message's room in the
    /// queue, given back when the writer takes the message out.
    Ops(Vec<Op>, Option<Ack>, Option<OwnedSemaphorePermit>),
    Stop,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// Messages the writer's queue holds at most, by default: a launch of any size is one.
pub const DEFAULT_QUEUE: usize = 1024;

/// How soon submits kept from a failed group commit are tried again, at first and at most
/// (doubling in between); anything queued meanwhile tries at once.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Handle to the writer thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Msg>,
    room: Arc<Semaphore>,
}

/// Room for one message in the writer's queue, taken with [`StoreWriter::reserve`]. Sending
/// through it never waits, so a caller can send under a lock: the records of one key then reach
/// the writer in the order they changed in memory.
#[derive(Debug)]
pub struct Slot {
    tx: mpsc::Sender<Msg>,
    permit: Option<OwnedSemaphorePermit>,
}

/// A commit on its way: [`Committed::durable`] waits for its group commit.
#[derive(Debug)]
pub struct Committed {
    done: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
}

impl Slot {
    /// Queues `ops`; they become durable with the next group commit that succeeds.
    pub fn submit(self, ops: Vec<Op>) {
        let _ = self.tx.send(Msg::Ops(ops, None, self.permit));
    }

    /// Queues `ops` as a commit; wait on the answer with [`Committed::durable`].
    pub fn commit(self, ops: Vec<Op>) -> Committed {
        let (ack, done) = tokio::sync::oneshot::channel();
        let sent = self.tx.send(Msg::Ops(ops, Some(ack), self.permit)).is_ok();
        Committed {
            done: sent.then_some(done),
        }
    }
}

impl Committed {
    /// Ok once the commit's ops are durable; the store's error when its group commit failed
    /// (then none of them is).
    pub async fn durable(self) -> Result<(), StoreError> {
        let done = self.done.ok_or(StoreError::WriterGone)?;
        done.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(StoreError::NotRecorded)
    }
}

impl StoreWriter {
    /// Starts the writer thread over `store`.
    pub fn start(store: Store) -> (Self, std::thread::JoinHandle<()>) {
        Self::start_shared(Arc::new(store))
    }

    /// Starts the writer thread over a store that others also read.
    pub fn start_shared<S: RecordStore>(store: Arc<S>) -> (Self, std::thread::JoinHandle<()>) {
        Self::with_queue(store, DEFAULT_QUEUE)
    }

    /// Starts the writer thread with a queue of at most `queue` messages.
    pub fn with_queue<S: RecordStore>(
        store: Arc<S>,
        queue: usize,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Msg>();
        let handle = std::thread::Builder::new()
            .name("berth-store".into())
            .spawn(move || writer_loop(store, rx))
            .expect("spawn store writer thread");
        let room = Arc::new(Semaphore::new(queue.max(1)));
        (Self { tx, room }, handle)
    }

    /// Room for one message in the queue: waits (without blocking the thread) while it is full.
    pub async fn reserve(&self) -> Slot {
        Slot {
            tx: self.tx.clone(),
            // The semaphore is never closed.
            permit: self.room.clone().acquire_owned().await.ok(),
        }
    }

    /// Queues `ops` (waiting for room); they become durable with the next group commit that
    /// succeeds.
    pub async fn submit(&self, ops: Vec<Op>) {
        self.reserve().await.submit(ops);
    }

    /// Queues `ops` and waits until they are durable; the store's error if their group commit
    /// failed (then none of them is, and none will be). With no ops, a barrier: Ok once
    /// everything queued before it is durable.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.reserve().await.commit(ops).durable().await
    }

    /// Commits what is queued and stops the thread.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

/// Submits of failed group commits, waiting to be written again: the latest op of each record.
#[derive(Default)]
struct Kept(HashMap<(Table, String), Op>);

impl Kept {
    fn keep(&mut self, op: Op) {
        self.0.insert((op.table(), op.key().to_owned()), op);
    }
}

/// What one group commit holds: ops in the order they were queued, whether each is a submit's
/// (kept when the commit fails), and who waits for the answer.
#[derive(Default)]
struct Batch {
    ops: Vec<Op>,
    keep_on_failure: Vec<bool>,
    acks: Vec<Ack>,
    stop: bool,
}

impl Batch {
    fn take(&mut self, m: Msg) {
        match m {
            Msg::Ops(ops, ack, _permit) => {
                let submitted = ack.is_none();
                self.keep_on_failure
                    .extend(std::iter::repeat_n(submitted, ops.len()));
                self.ops.extend(ops);
                self.acks.extend(ack);
            }
            Msg::Stop => self.stop = true,
        }
    }
}

fn writer_loop<S: RecordStore>(store: Arc<S>, rx: mpsc::Receiver<Msg>) {
    let mut kept = Kept::default();
    // The error of the last group commit, while none has succeeded since.
    let mut failed: Option<String> = None;
    let mut retry = RETRY_FIRST;
    loop {
        let mut batch = Batch::default();
        // Kept ops are tried again after a while even if nothing else comes.
        let first = if kept.0.is_empty() {
            rx.recv().ok()
        } else {
            match rx.recv_timeout(retry) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    batch.stop = true;
                    None
                }
            }
        };
        let retrying = first.is_none() && !batch.stop;
        match first {
            Some(m) => batch.take(m),
            None if kept.0.is_empty() => return,
            None => {}
        }
        while let Ok(m) = rx.try_recv() {
            batch.take(m);
        }
        // Kept ops are older than anything queued since: they go first, so that a later op of
        // the same record wins.
        let n_kept = kept.0.len();
        let mut ops: Vec<Op> = kept.0.drain().map(|(_, op)| op).collect();
        let mut keep_on_failure = vec![true; n_kept];
        ops.append(&mut batch.ops);
        keep_on_failure.append(&mut batch.keep_on_failure);
        // Nothing to write and nothing failed: a barrier over what is durable already. After a
        // failure even an empty commit is made, so that Ok means the store writes again.
        let res = if ops.is_empty() && failed.is_none() {
            Ok(())
        } else {
            store.apply(&ops).map_err(|e| e.to_string())
        };
        match &res {
            Ok(()) => {
                if failed.take().is_some() {
                    tracing::info!(ops = ops.len(), "state store commits again");
                }
                retry = RETRY_FIRST;
            }
            Err(e) => {
                for (op, keep) in ops.into_iter().zip(keep_on_failure) {
                    if keep {
                        kept.keep(op);
                    }
                }
                if failed.as_deref() != Some(e.as_str()) || !retrying {
                    tracing::error!(
                        error = %e,
                        waiting = batch.acks.len(),
                        kept = kept.0.len(),
                        "state store commit failed: its requests are refused; its facts are kept \
                         and written again"
                    );
                }
                failed = Some(e.clone());
                if retrying {
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
        for a in batch.acks {
            let _ = a.send(res.clone());
        }
        if batch.stop {
            if !kept.0.is_empty() {
                tracing::error!(
                    records = kept.0.len(),
                    "state store writer stops with records not written"
                );
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeStore;

    #[test]
    fn put_load_delete_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.redb");
        let (s, r) = Store::open(&path).unwrap();
        assert_eq!(r, OpenReport::Created);
        s.apply(&[
            Op::put(Table::Workers, "a", &vec![1, 2]),
            Op::put(Table::Workers, "b", &vec![3]),
            Op::put(Table::Sessions, "s", &"x"),
        ])
        .unwrap();
        s.apply(&[Op::delete(Table::Workers, "a")]).unwrap();
        drop(s);
        let (s, r) = Store::open(&path).unwrap();
        assert_eq!(r, OpenReport::Opened);
        let (w, bad): (Vec<(String, Vec<i32>)>, _) = s.load(Table::Workers).unwrap();
        assert_eq!(w, vec![("b".to_string(), vec![3])]);
        assert!(bad.is_empty());
        let (sess, _): (Vec<(String, String)>, _) = s.load(Table::Sessions).unwrap();
        assert_eq!(sess, vec![("s".to_string(), "x".to_string())]);
    }

    #[test]
    fn undecodable_records_are_reported_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&d.path().join("s.redb")).unwrap();
        s.apply(&[
            Op::Put {
                table: Table::Workers,
                key: "bad".into(),
                value: b"{not json".to_vec(),
            },
            Op::put(Table::Workers, "ok", &7u32),
        ])
        .unwrap();
        let (good, bad): (Vec<(String, u32)>, _) = s.load(Table::Workers).unwrap();
        assert_eq!(good, vec![("ok".to_string(), 7)]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, "bad");
    }

    #[test]
    fn a_corrupt_file_is_reported_and_left_alone_until_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.redb");
        let garbage = vec![0xa5u8; 64 * 1024];
        std::fs::write(&path, &garbage).unwrap();
        match Store::open(&path) {
            Err(StoreError::Corrupt { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), garbage, "not touched");
        let moved_to = Store::move_aside(&path).unwrap();
        assert_eq!(std::fs::read(&moved_to).unwrap(), garbage);
        let (s, r) = Store::open(&path).unwrap();
        assert_eq!(r, OpenReport::Created);
        let (w, _): (Vec<(String, u32)>, _) = s.load(Table::Workers).unwrap();
        assert!(w.is_empty());
    }

    #[test]
    fn a_store_open_elsewhere_is_in_use_and_says_by_whom() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.redb");
        let (first, _) = Store::open(&path).unwrap();
        first.apply(&[Op::put(Table::Workers, "w", &1u32)]).unwrap();
        match Store::open(&path) {
            Err(e @ StoreError::InUse { .. }) => {
                let me = format!("pid {}", std::process::id());
                assert!(e.to_string().contains(&me), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // Refused, not replaced: the first handle's records are all there.
        drop(first);
        let (s, _) = Store::open(&path).unwrap();
        let (w, _): (Vec<(String, u32)>, _) = s.load(Table::Workers).unwrap();
        assert_eq!(w, vec![("w".to_string(), 1)]);
    }

    /// What queues while a group commit is under way goes into the next one together (a
    /// hundred submits and a commit: one write), and a commit is answered only once its group
    /// is in the store: not while the store is still writing, and readable when it is.
    #[tokio::test]
    async fn writer_groups_and_acks() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.redb");
        let f = Arc::new(FakeStore::open(&path));
        let (w, h) = StoreWriter::start_shared(f.clone());
        f.hold();
        let commit = |key: &'static str, value: u32| {
            let w = w.clone();
            tokio::spawn(async move { w.commit(vec![Op::put(Table::Workers, key, &value)]).await })
        };
        let first = commit("first", 0);
        until_applied(&f, 1).await;
        for i in 0..100u32 {
            w.submit(vec![Op::put(Table::Workers, &format!("k{i}"), &i)])
                .await;
        }
        let last = commit("last", 100);
        // The store is still writing the first group: nobody has an answer, nothing is there.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished(), "acknowledged before the store wrote");
        assert!(!last.is_finished(), "acknowledged before the store wrote");
        assert!(keys(f.store()).is_empty());
        f.release();
        first.await.unwrap().unwrap();
        assert!(keys(f.store()).contains(&"first".to_string()));
        last.await.unwrap().unwrap();
        assert_eq!(
            keys(f.store()).len(),
            102,
            "acknowledged but not in the store"
        );
        assert_eq!(
            f.attempts(),
            2,
            "the submits and the last commit were one group commit"
        );
        w.stop();
        h.join().unwrap();
        drop(f);
        let (s, _) = Store::open(&path).unwrap();
        let (all, _): (Vec<(String, u32)>, _) = s.load(Table::Workers).unwrap();
        assert_eq!(all.len(), 102);
    }

    fn keys(s: &Store) -> Vec<String> {
        let (all, _): (Vec<(String, serde_json::Value)>, _) = s.load(Table::Workers).unwrap();
        all.into_iter().map(|(k, _)| k).collect()
    }

    /// Waits until the writer has taken `n` group commits to the store.
    async fn until_applied(f: &FakeStore, n: usize) {
        let t = std::time::Instant::now();
        while f.attempts() < n {
            assert!(t.elapsed() < Duration::from_secs(5), "writer stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_group_commit_fails_every_waiter_and_writes_none_of_them() {
        let d = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeStore::open(&d.path().join("s.redb")));
        let (w, h) = StoreWriter::start_shared(f.clone());
        // The writer takes the first commit and stalls in it; three more queue behind it and
        // go into the next group commit together.
        f.hold();
        let first = tokio::spawn({
            let w = w.clone();
            async move { w.commit(vec![Op::put(Table::Workers, "a", &1u32)]).await }
        });
        until_applied(&f, 1).await;
        let mut rest = Vec::new();
        for k in ["b", "c", "d"] {
            let slot = w.reserve().await;
            rest.push(slot.commit(vec![Op::put(Table::Workers, k, &1u32)]));
        }
        f.fail(Some("disk on fire"));
        f.release();
        let e = first.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
        for c in rest {
            let e = c.durable().await.unwrap_err();
            assert!(matches!(e, StoreError::NotRecorded(_)), "{e:?}");
        }
        assert_eq!(f.attempts(), 2, "b, c and d were one group commit");
        // A failed commit's ops are dropped, not kept: once the store writes again, none of
        // them appears.
        f.fail(None);
        w.commit(vec![Op::put(Table::Workers, "e", &1u32)])
            .await
            .unwrap();
        assert_eq!(keys(f.store()), vec!["e".to_string()]);
        w.stop();
        h.join().unwrap();
    }

    #[tokio::test]
    async fn a_barrier_after_a_failed_commit_errs_until_the_store_writes_again() {
        let d = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeStore::open(&d.path().join("s.redb")));
        let (w, h) = StoreWriter::start_shared(f.clone());
        f.fail(Some("EIO"));
        // A commit fails: a barrier after it, with nothing queued, still errs.
        assert!(w
            .commit(vec![Op::put(Table::Workers, "asked", &1u32)])
            .await
            .is_err());
        assert!(
            w.commit(Vec::new()).await.is_err(),
            "the failure is not lost"
        );
        // A submit (a fact) fails too: it is kept, and the barrier says it is not durable.
        w.submit(vec![Op::put(Table::Workers, "fact", &1u32)]).await;
        assert!(w.commit(Vec::new()).await.is_err());
        f.fail(None);
        w.commit(Vec::new()).await.unwrap();
        assert_eq!(
            keys(f.store()),
            vec!["fact".to_string()],
            "the kept fact is written; the refused request is not"
        );
        w.commit(Vec::new()).await.unwrap();
        w.stop();
        h.join().unwrap();
    }

    #[tokio::test]
    async fn kept_facts_are_written_again_without_being_asked_and_the_latest_wins() {
        let d = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeStore::open(&d.path().join("s.redb")));
        let (w, h) = StoreWriter::start_shared(f.clone());
        f.fail(Some("ENOSPC"));
        w.submit(vec![Op::put(Table::Workers, "w", &1u32)]).await;
        w.submit(vec![Op::put(Table::Workers, "w", &2u32)]).await;
        w.submit(vec![Op::put(Table::Workers, "gone", &1u32)]).await;
        w.submit(vec![Op::delete(Table::Workers, "gone")]).await;
        until_applied(&f, 2).await;
        f.fail(None);
        // No barrier: the writer retries on its own.
        let t = std::time::Instant::now();
        while keys(f.store()).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "kept ops not retried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (all, _): (Vec<(String, u32)>, _) = f.store().load(Table::Workers).unwrap();
        assert_eq!(all, vec![("w".to_string(), 2)]);
        w.stop();
        h.join().unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_makes_submitters_wait() {
        let d = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeStore::open(&d.path().join("s.redb")));
        let (w, h) = StoreWriter::with_queue(f.clone(), 4);
        f.hold();
        w.submit(vec![Op::put(Table::Workers, "k0", &0u32)]).await;
        until_applied(&f, 1).await;
        // The writer is stuck in a commit: four messages fit in the queue...
        for i in 1..=4u32 {
            tokio::time::timeout(
                Duration::from_secs(1),
                w.submit(vec![Op::put(Table::Workers, &format!("k{i}"), &i)]),
            )
            .await
            .expect("room in the queue");
        }
        // ...the fifth waits, without blocking its thread (this test's runtime has one).
        let fifth = tokio::spawn({
            let w = w.clone();
            async move { w.submit(vec![Op::put(Table::Workers, "k5", &5u32)]).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !fifth.is_finished(),
            "a full queue must make the submitter wait"
        );
        f.release();
        tokio::time::timeout(Duration::from_secs(5), fifth)
            .await
            .expect("room once the writer goes on")
            .unwrap();
        w.commit(Vec::new()).await.unwrap();
        assert_eq!(keys(f.store()).len(), 6);
        w.stop();
        h.join().unwrap();
    }

    /// A real store on a real full filesystem: the commit that needs room fails with the
    /// kernel's error, nothing of it is written, and the store writes again once room is made
    /// (the file is opened again: redb refuses everything after an I/O error).
    #[tokio::test]
    async fn a_store_on_a_full_filesystem_fails_its_commit_and_recovers_with_room() {
        if !crate::host::is_root() {
            eprintln!("skipped: needs root (mounts a tmpfs)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mnt = d.path().join("small");
        std::fs::create_dir(&mnt).unwrap();
        let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings; a tmpfs of 1 MiB on a directory of our own.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=1m".as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        struct Unmount(std::ffi::CString);
        impl Drop for Unmount {
            fn drop(&mut self) {
                // SAFETY: a valid NUL-terminated path that this test mounted.
                unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _unmount = Unmount(c);
        let path = mnt.join("state.redb");
        let (s, _) = Store::open(&path).unwrap();
        let (w, h) = StoreWriter::start(s);
        w.commit(vec![Op::put(Table::Workers, "before", &1u32)])
            .await
            .unwrap();
        // Pages written and freed again: room inside the file for some commits to come.
        for i in 0..32 {
            let k = format!("old{i}");
            w.commit(vec![Op::put(Table::Workers, &k, &"o".repeat(2048))])
                .await
                .unwrap();
            w.commit(vec![Op::delete(Table::Workers, &k)])
                .await
                .unwrap();
        }
        let filler = fill(&mnt.join("filler"));
        let mut told_ok = vec!["before".to_string()];
        let mut refused = Vec::new();
        // Small records fit in what the file has free, larger ones need it to grow.
        for i in 0..64 {
            let k = format!("k{i}");
            let value = "x".repeat(64 << (i % 8));
            match w.commit(vec![Op::put(Table::Workers, &k, &value)]).await {
                Ok(()) => told_ok.push(k),
                Err(e) => {
                    assert!(e.to_string().contains("No space left"), "{e}");
                    refused.push(k);
                }
            }
        }
        assert!(
            !refused.is_empty(),
            "the full filesystem never refused a commit"
        );
        std::fs::remove_file(&filler).unwrap();
        w.commit(Vec::new())
            .await
            .expect("writes again once there is room");
        w.commit(vec![Op::put(Table::Workers, "after", &1u32)])
            .await
            .unwrap();
        told_ok.push("after".into());
        w.stop();
        h.join().unwrap();
        let (s, _) = Store::open(&path).unwrap();
        let mut have = keys(&s);
        have.sort();
        told_ok.sort();
        assert_eq!(have, told_ok, "exactly what was told durable");
    }

    /// Writes `path` until its filesystem has not one byte left; returns it.
    fn fill(path: &Path) -> PathBuf {
        use std::io::Write;
        let mut f = std::fs::File::create(path).unwrap();
        let mut chunk = 64 << 10;
        while chunk > 0 {
            match f.write(&vec![0u8; chunk]) {
                Ok(n) if n == chunk => {}
                Ok(_) => chunk /= 2,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => chunk /= 2,
                Err(e) => panic!("fill: {e}"),
            }
        }
        path.to_path_buf()
    }
}
