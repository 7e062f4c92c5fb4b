//! Output of workers as clients read it: from the files their shims write, from an offset,
//! following them until they end (woken by `follow` when there is something to read).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use berth_core::error::{Error, Result};
use berth_core::worker::{Filter, WorkerRecord};
use berth_sys::output::{self, StreamKind};

use super::{follow, Host, Inner, OutputPiece, OutputRequest};

/// Largest piece of output sent in one chunk.
pub(super) const CHUNK: usize = 64 * 1024;

/// The workers a session follower takes on while it runs (`StreamOutputRequest.new_workers`):
/// those its session launches after the call, each from its first byte, until the session
/// has ended and they with it.
pub(super) struct NewWorkers {
    pub(super) session: String,
    /// Subscribed before the call's workers were selected, so that none falls in between.
    pub(super) events: broadcast::Receiver<WorkerRecord>,
    pub(super) session_ends: watch::Receiver<u64>,
}

/// Where a follower is in one stream of one worker.
struct Cursor {
    id: String,
    /// Index of the worker in the follower's list (`ids`, then the new workers).
    worker: usize,
    stream: StreamKind,
    dir: PathBuf,
    offset: u64,
    done: bool,
    /// The stream's last segment, held open from the last read that reached it (see [`Held`]):
    /// new bytes are read from it on the async thread, from the page cache, without a hop to a
    /// blocking thread and back (0.2 ms of a first line here).
    tail: Option<Held>,
}

/// How many streams' last segments one follower holds open (see [`Cursor::tail`]); the others
/// are read on a blocking thread each time.
const HELD_TAILS: usize = 16;

/// How many all followers together hold open: each is a file descriptor of the daemon's, and
/// ten thousand idle follows must not take the daemon's descriptors from its workers.
const HELD_MAX: usize = 128;

/// Segments held open now, by every follower (at most [`HELD_MAX`]).
static HELD: AtomicUsize = AtomicUsize::new(0);

/// A stream's last segment held open by a follower, counted in [`HELD`] while it lives.
struct Held(output::Tail);

impl Held {
    /// Holds `tail` if the daemon-wide count allows one more.
    fn new(tail: output::Tail) -> Option<Self> {
        if HELD.fetch_add(1, Ordering::Relaxed) >= HELD_MAX {
            HELD.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Self(tail))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends the output of `ids` to `tx`; with `follow`, until every worker has ended (and with
/// `later`, the workers of its session launched meanwhile too, until the session has ended). A
/// follower reads when the output watcher (see `follow`) says that a worker's files changed or
/// that it ended, and only that worker's: an idle follower does nothing at all.
pub(super) async fn pump_output(
    inner: Arc<Inner>,
    ids: Vec<String>,
    streams: Vec<StreamKind>,
    follow: bool,
    from_start: bool,
    mut later: Option<NewWorkers>,
    tx: mpsc::Sender<Result<OutputPiece>>,
) {
    let cursor = |worker: usize, id: &str, stream: StreamKind| Cursor {
        id: id.to_owned(),
        worker,
        stream,
        dir: inner.worker_dir(id).join(stream.dir_name()),
        offset: 0,
        done: false,
        tail: None,
    };
    let mut cursors: Vec<Cursor> = ids
        .iter()
        .enumerate()
        .flat_map(|(worker, id)| streams.iter().map(move |s| (worker, id, *s)))
        .map(|(worker, id, stream)| cursor(worker, id, stream))
        .collect();
    let mut known: HashSet<String> = ids.iter().cloned().collect();
    // The first read does not wait for the watcher to take the follower (a thread hop, slow on
    // a busy host): what is there is sent at once, and every worker is read again once the
    // follower is registered, so that nothing written in between goes unnoticed. New workers
    // are taken on the same way.
    let mut registering = follow
        .then(|| inner.output_watch())
        .flatten()
        .map(|w| w.begin(ids.clone()));
    let mut following: Option<follow::Following> = None;
    let mut adding: Vec<(std::ops::Range<usize>, oneshot::Receiver<()>)> = Vec::new();
    // Without a watcher a follower looks every POLL, as polling did.
    let mut polls = follow && registering.is_none();
    if !from_start {
        let dirs: Vec<PathBuf> = cursors.iter().map(|c| c.dir.clone()).collect();
        let ends = tokio::task::spawn_blocking(move || {
            dirs.iter()
                .map(|d| output::stream_end(d).unwrap_or(0))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (c, e) in cursors.iter_mut().zip(ends) {
            c.offset = e;
        }
    }
    // Workers whose cursors are to be read: all at first, then those with news.
    let mut news = vec![true; ids.len()];
    // Workers no more watched for this follower (all their streams done).
    let mut released = vec![false; ids.len()];
    loop {
        let todo: Vec<usize> = (0..cursors.len())
            .filter(|&i| !cursors[i].done && news[cursors[i].worker])
            .collect();
        news.fill(false);
        // Nothing to do when woken with nothing new (news that came while it was reading).
        if !todo.is_empty() {
            // Status first, then read: a worker seen ended has written its last byte already.
            let ended: Vec<bool> = todo
                .iter()
                .map(|&i| inner.status(&cursors[i].id).is_none_or(|s| s.is_terminal()))
                .collect();
            // New bytes in a held segment's page cache first; the rest on a blocking thread.
            let mut results: Vec<Option<std::io::Result<output::ReadResult>>> = todo
                .iter()
                .map(|&i| {
                    let c = &cursors[i];
                    let t = c.tail.as_ref()?;
                    t.0.read_cached(c.offset, CHUNK).map(Ok)
                })
                .collect();
            let slow: Vec<usize> = (0..todo.len()).filter(|&k| results[k].is_none()).collect();
            if !slow.is_empty() {
                let reads: Vec<(PathBuf, u64)> = slow
                    .iter()
                    .map(|&k| (cursors[todo[k]].dir.clone(), cursors[todo[k]].offset))
                    .collect();
                let read = tokio::task::spawn_blocking(move || {
                    reads
                        .into_iter()
                        .map(|(d, o)| output::read_stream_tail(&d, o, CHUNK))
                        .collect::<Vec<_>>()
                })
                .await;
                let read = match read {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Error::Internal(format!("read output: {e}"))))
                            .await;
                        return;
                    }
                };
                let mut held = cursors.iter().filter(|c| c.tail.is_some()).count();
                for (&k, res) in slow.iter().zip(read) {
                    let c = &mut cursors[todo[k]];
                    held -= usize::from(c.tail.is_some());
                    c.tail = None;
                    results[k] = Some(res.map(|(r, tail)| {
                        if held < HELD_TAILS {
                            c.tail = tail.and_then(Held::new);
                            held += usize::from(c.tail.is_some());
                        }
                        r
                    }));
                }
            }
            let results = results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(std::io::Error::other("output not read"))));
            for ((&i, res), ended) in todo.iter().zip(results).zip(ended) {
                let c = &mut cursors[i];
                match res {
                    Ok(r) if !r.data.is_empty() => {
                        crate::phase!("output_read", c.id);
                        // There may be more: read this worker again before waiting.
                        news[c.worker] = true;
                        c.offset = r.offset + r.data.len() as u64;
                        let piece = OutputPiece {
                            worker_id: c.id.clone(),
                            stream: c.stream,
                            offset: r.offset,
                            data: r.data,
                        };
                        if tx.send(Ok(piece)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {
                        if !follow || ended {
                            c.done = true;
                            c.tail = None;
                            // A session follower learns that this stream is whole: a chunk
                            // with no data, at its end.
                            let end = OutputPiece {
                                worker_id: c.id.clone(),
                                stream: c.stream,
                                offset: c.offset,
                                data: Vec::new(),
                            };
                            if later.is_some() && tx.send(Ok(end)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Error::Internal(format!(
                                "read output of worker {}: {e}",
                                c.id
                            ))))
                            .await;
                        return;
                    }
                }
            }
        }
        // A worker whose streams are all done is no more watched for this follower (a session's
        // follower would otherwise hold every worker its session ever had).
        if let Some(f) = following.as_ref() {
            for &i in &todo {
                release_if_done(f, &cursors, &mut released, cursors[i].worker);
            }
        }
        // A session follower goes on while its session is open: it may launch more.
        let session_over = later
            .as_ref()
            .is_none_or(|l| !inner.session_open(&l.session));
        if session_over && cursors.iter().all(|c| c.done) {
            return;
        }
        if let Some(r) = registering.take() {
            let f = r.registered().await;
            crate::phase!("follow_registered");
            for w in 0..released.len() {
                release_if_done(&f, &cursors, &mut released, w);
            }
            polls = f.unwatched;
            following = Some(f);
            news.fill(true);
            continue;
        }
        if !adding.is_empty() {
            for (workers, registered) in adding.drain(..) {
                polls |= registered.await.is_err();
                news[workers].fill(true);
            }
            continue;
        }
        if news.iter().any(|n| *n) {
            continue;
        }
        let woken = async {
            match &following {
                Some(f) if !f.unwatched => {
                    f.wake.notified().await;
                    f.wake.take()
                }
                _ => std::future::pending().await,
            }
        };
        let session_news = async {
            match later.as_mut() {
                Some(l) => tokio::select! {
                    ev = l.events.recv() => SessionNews::Event(ev.map(Box::new)),
                    _ = l.session_ends.changed() => SessionNews::Ended,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = woken => {
                for w in got {
                    if let Some(n) = news.get_mut(w) {
                        *n = true;
                    }
                }
            }
            got = session_news => {
                let Some(l) = later.as_ref() else { continue };
                let fresh: Vec<String> = match got {
                    // The loop looks at the session again.
                    SessionNews::Ended => continue,
                    SessionNews::Event(Ok(rec)) => (rec.session_id.as_deref()
                        == Some(l.session.as_str())
                        && !known.contains(&rec.id))
                    .then_some(rec.id)
                    .into_iter()
                    .collect(),
                    // Too slow for the broadcast: the session's workers, as they are now.
                    SessionNews::Event(Err(broadcast::error::RecvError::Lagged(_))) => {
                        let filter = Filter {
                            session_id: Some(l.session.clone()),
                            ..Default::default()
                        };
                        inner
                            .select(&filter)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|r| r.id)
                            .filter(|id| !known.contains(id))
                            .collect()
                    }
                    // The host is going away.
                    SessionNews::Event(Err(broadcast::error::RecvError::Closed)) => return,
                };
                if fresh.is_empty() {
                    continue;
                }
                let first = news.len();
                for id in &fresh {
                    known.insert(id.clone());
                    let worker = news.len();
                    news.push(true);
                    released.push(false);
                    cursors.extend(streams.iter().map(|s| cursor(worker, id, *s)));
                }
                if let Some(f) = following.as_ref().filter(|f| !f.unwatched) {
                    adding.push((first..news.len(), f.add(first, fresh)));
                }
            }
            _ = tokio::time::sleep(follow::POLL), if polls => news.fill(true),
            _ = tx.closed() => return,
            _ = inner.shutdown.cancelled() => return,
        }
    }
}

/// Releases worker `w` from `f` once all its streams are done. A worker's cursors are
/// consecutive: one per stream asked for, in the order the workers were taken on.
fn release_if_done(f: &follow::Following, cursors: &[Cursor], released: &mut [bool], w: usize) {
    let per_worker = cursors.len() / released.len().max(1);
    let Some(mine) = cursors.get(w * per_worker..(w + 1) * per_worker) else {
        return;
    };
    if !released[w] && mine.iter().all(|c| c.done) {
        released[w] = true;
        if let Some(c) = mine.first() {
            f.release(&c.id);
        }
    }
}

enum SessionNews {
    Event(std::result::Result<Box<WorkerRecord>, broadcast::error::RecvError>),
    Ended,
}

impl Host {
    /// Streams output of the selected workers into a channel; see [`OutputRequest`].
    pub fn output(&self, req: OutputRequest) -> Result<mpsc::Receiver<Result<OutputPiece>>> {
        if req.ids.is_empty() && req.session_id.is_none() {
            return Err(Error::invalid("ids", "name workers by ids or session_id"));
        }
        let filter = Filter {
            ids: req.ids.clone(),
            session_id: req.session_id.clone(),
            ..Default::default()
        };
        // Subscribed first: a worker the session launches meanwhile is in one or the other.
        let later = (req.new_workers && req.follow)
            .then_some(req.session_id.as_ref())
            .flatten()
            .map(|s| NewWorkers {
                session: s.clone(),
                events: self.inner.events.subscribe(),
                session_ends: self.inner.session_ends.subscribe(),
            });
        let ids: Vec<String> = self
            .inner
            .select(&filter)?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let streams = if req.streams.is_empty() {
            StreamKind::BOTH.to_vec()
        } else {
            req.streams.clone()
        };
        crate::phase!("follow_opened");
        let (tx, rx) = mpsc::channel(16);
        berth_server::spawn_in(
            tracing::info_span!("output"),
            pump_output(
                self.inner.clone(),
                ids,
                streams,
                req.follow,
                req.from_start,
                later,
                tx,
            ),
        );
        Ok(rx)
    }
}
