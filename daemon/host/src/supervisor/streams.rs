//! Output of workers as clients read it: from the files their shims write, from an offset,
//! following them until they end (woken by `follow` when there is something to read).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use berth_core::error::{Error, Result};
use berth_core::worker::Filter;
use berth_sys::output::{self, StreamKind};

use super::{follow, Host, Inner, OutputPiece, OutputRequest};

/// Largest piece of output sent in one chunk.
pub(super) const CHUNK: usize = 64 * 1024;

/// Sends the output of `ids` to `tx`; with `follow`, until every worker has ended. A follower
/// reads when the output watcher (see `follow`) says that a worker's files changed or that it
/// ended, and only that worker's: an idle follower does nothing at all.
pub(super) async fn pump_output(
    inner: Arc<Inner>,
    ids: Vec<String>,
    streams: Vec<StreamKind>,
    follow: bool,
    from_start: bool,
    tx: mpsc::Sender<Result<OutputPiece>>,
) {
    struct Cursor {
        id: String,
        /// Index of the worker in `ids`.
        worker: usize,
        stream: StreamKind,
        dir: PathBuf,
        offset: u64,
        done: bool,
    }
    let mut cursors: Vec<Cursor> = ids
        .iter()
        .enumerate()
        .flat_map(|(worker, id)| streams.iter().map(move |s| (worker, id, *s)))
        .map(|(worker, id, stream)| Cursor {
            id: id.clone(),
            worker,
            stream,
            dir: inner.worker_dir(id).join(stream.dir_name()),
            offset: 0,
            done: false,
        })
        .collect();
    // The first read does not wait for the watcher to take the follower (a thread hop, slow on
    // a busy host): what is there is sent at once, and every worker is read again once the
    // follower is registered, so that nothing written in between goes unnoticed.
    let mut registering = follow
        .then(|| inner.output_watch())
        .flatten()
        .map(|w| w.begin(ids.clone()));
    let mut following: Option<follow::Following> = None;
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
            let reads: Vec<(PathBuf, u64)> = todo
                .iter()
                .map(|&i| (cursors[i].dir.clone(), cursors[i].offset))
                .collect();
            let results = match tokio::task::spawn_blocking(move || {
                reads
                    .into_iter()
                    .map(|(d, o)| output::read_stream(&d, o, CHUNK))
                    .collect::<Vec<_>>()
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx
                        .send(Err(Error::Internal(format!("read output: {e}"))))
                        .await;
                    return;
                }
            };
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
        if cursors.iter().all(|c| c.done) {
            return;
        }
        if let Some(r) = registering.take() {
            let f = r.registered().await;
            crate::phase!("follow_registered");
            polls = f.unwatched;
            following = Some(f);
            news.fill(true);
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
        tokio::select! {
            got = woken => {
                for w in got {
                    news[w] = true;
                }
            }
            _ = tokio::time::sleep(follow::POLL), if polls => news.fill(true),
            _ = tx.closed() => return,
            _ = inner.shutdown.cancelled() => return,
        }
    }
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
                tx,
            ),
        );
        Ok(rx)
    }
}
