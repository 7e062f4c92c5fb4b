//! The daemon's durable state: worker and session records in an embedded redb database under the
//! state directory. redb is pure Rust (no C toolchain, no external service), ACID with
//! copy-on-write B-trees, crash-safe by default, and actively maintained.
//!
//! Writes go through one writer thread that commits everything queued since its last commit in a
//! single fsync'd transaction (group commit), so thousands of status changes cost a handful of
//! fsyncs, and a caller that must not answer before its record is durable waits for the ack.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("state store {path}: move aside the unreadable file: {source}")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store writer has stopped")]
    WriterGone,
}

/// Which table a record lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// The store could not be read; it was moved aside and a new one made.
    Replaced { moved_to: PathBuf, error: String },
}

/// A record that could not be decoded, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub key: String,
    pub error: String,
}

/// Decoded records by key, and the records that did not decode.
pub type Loaded<T> = (Vec<(String, T)>, Vec<BadRecord>);

/// The embedded database.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store at `path`. An unreadable store is moved aside and replaced
    /// by an empty one, so the daemon still starts; the caller logs the report and recovers
    /// what it can from the workers' own files.
    pub fn open(path: &Path) -> Result<(Self, OpenReport), StoreError> {
        let existed = path.exists();
        let err = |e: redb::Error| StoreError::Db {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let attempt = Database::create(path)
            .map_err(|e| err(e.into()))
            .and_then(|db| {
                // Make sure both tables exist and the file is usable for writing.
                let tx = db.begin_write().map_err(|e| err(e.into()))?;
                tx.open_table(WORKERS).map_err(|e| err(e.into()))?;
                tx.open_table(SESSIONS).map_err(|e| err(e.into()))?;
                tx.commit().map_err(|e| err(e.into()))?;
                Ok(db)
            });
        match attempt {
            Ok(db) => {
                let report = if existed {
                    OpenReport::Opened
                } else {
                    OpenReport::Created
                };
                Ok((
                    Self {
                        db,
                        path: path.to_path_buf(),
                    },
                    report,
                ))
            }
            Err(e) if existed => {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let moved_to = path.with_extension(format!("corrupt-{stamp}"));
                std::fs::rename(path, &moved_to).map_err(|source| StoreError::MoveAside {
                    path: path.to_path_buf(),
                    source,
                })?;
                let (store, _) = Self::open(path)?;
                Ok((
                    store,
                    OpenReport::Replaced {
                        moved_to,
                        error: e.to_string(),
                    },
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    /// Every record of `table`; records that do not decode are returned apart.
    pub fn load<T: DeserializeOwned>(&self, table: Table) -> Result<Loaded<T>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
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

    /// Applies `ops` in one durable transaction.
    pub fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut workers = tx.open_table(WORKERS).map_err(|e| self.err(e))?;
            let mut sessions = tx.open_table(SESSIONS).map_err(|e| self.err(e))?;
            for op in ops {
                let (table, key) = match op {
                    Op::Put { table, key, .. } | Op::Delete { table, key } => {
                        (*table, key.as_str())
                    }
                };
                let t = match table {
                    Table::Workers => &mut workers,
                    Table::Sessions => &mut sessions,
                };
                match op {
                    Op::Put { value, .. } => {
                        t.insert(key, value.as_slice()).map_err(|e| self.err(e))?;
                    }
                    Op::Delete { .. } => {
                        t.remove(key).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
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
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

enum Msg {
    Ops(Vec<Op>, Option<Ack>),
    Stop,
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl StoreWriter {
    /// Starts the writer thread over `store`.
    pub fn start(store: Store) -> (Self, std::thread::JoinHandle<()>) {
        Self::start_shared(std::sync::Arc::new(store))
    }

    /// Starts the writer thread over a store that others also read.
    pub fn start_shared(store: std::sync::Arc<Store>) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Msg>();
        let handle = std::thread::Builder::new()
            .name("berth-store".into())
            .spawn(move || writer_loop(store, rx))
            .expect("spawn store writer thread");
        (Self { tx }, handle)
    }

    /// Queues `ops`; they become durable with the next group commit.
    pub fn submit(&self, ops: Vec<Op>) {
        let _ = self.tx.send(Msg::Ops(ops, None));
    }

    /// Queues `ops` and waits until they are durable.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), String> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Ops(ops, Some(ack)))
            .map_err(|_| StoreError::WriterGone.to_string())?;
        done.await.map_err(|_| StoreError::WriterGone.to_string())?
    }

    /// Commits what is queued and stops the thread.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

fn writer_loop(store: std::sync::Arc<Store>, rx: mpsc::Receiver<Msg>) {
    let mut stop = false;
    while !stop {
        let Ok(first) = rx.recv() else { return };
        let mut ops = Vec::new();
        let mut acks = Vec::new();
        let take = |m: Msg, ops: &mut Vec<Op>, acks: &mut Vec<Ack>| match m {
            Msg::Ops(o, a) => {
                ops.extend(o);
                acks.extend(a);
                false
            }
            Msg::Stop => true,
        };
        stop |= take(first, &mut ops, &mut acks);
        while let Ok(m) = rx.try_recv() {
            stop |= take(m, &mut ops, &mut acks);
        }
        // An empty batch is a barrier: everything queued before it is already durable.
        let res = if ops.is_empty() {
            Ok(())
        } else {
            store.apply(&ops).map_err(|e| e.to_string())
        };
        if let Err(e) = &res {
            tracing::error!(error = %e, ops = ops.len(), "state store commit failed");
        }
        for a in acks {
            let _ = a.send(res.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_corrupt_file_is_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.redb");
        std::fs::write(&path, b"this is not a redb file at all, just garbage bytes").unwrap();
        let (s, r) = Store::open(&path).unwrap();
        match r {
            OpenReport::Replaced { moved_to, .. } => assert!(moved_to.exists()),
            other => panic!("{other:?}"),
        }
        let (w, _): (Vec<(String, u32)>, _) = s.load(Table::Workers).unwrap();
        assert!(w.is_empty());
    }

    #[tokio::test]
    async fn writer_groups_and_acks() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.redb");
        let (s, _) = Store::open(&path).unwrap();
        let (w, h) = StoreWriter::start(s);
        for i in 0..100u32 {
            w.submit(vec![Op::put(Table::Workers, &format!("k{i}"), &i)]);
        }
        w.commit(vec![Op::put(Table::Workers, "last", &100u32)])
            .await
            .unwrap();
        w.stop();
        h.join().unwrap();
        let (s, _) = Store::open(&path).unwrap();
        let (all, _): (Vec<(String, u32)>, _) = s.load(Table::Workers).unwrap();
        assert_eq!(all.len(), 101);
    }
}
