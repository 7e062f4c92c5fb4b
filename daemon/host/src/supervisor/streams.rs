//! Output of workers as clients read it: from the files their shims write, from an offset,
//! following them until they end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use berth_core::error::{Error, Result};
use berth_core::worker::Filter;
use berth_sys::output::{self, StreamKind};

use super::{Host, Inner, OutputPiece, OutputRequest};

/// Largest piece of output sent in one chunk.
pub(super) const CHUNK: usize = 64 * 1024;

/// Sends the output of `ids` to `tx`; with `follow`, until every worker has ended.
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
        stream: StreamKind,
        dir: PathBuf,
        offset: u64,
        done: bool,
    }
    let mut cursors: Vec<Cursor> = ids
        .iter()
        .flat_map(|id| {
            streams.iter().map(|s| Cursor {
                id: id.clone(),
                stream: *s,
                dir: inner.worker_dir(id).join(s.dir_name()),
                offset: 0,
                done: false,
            })
        })
        .collect();
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
    let mut idle = Duration::from_millis(10);
    loop {
        // Status first, then read: a worker seen ended has written its last byte already.
        let ended: Vec<bool> = cursors
            .iter()
            .map(|c| inner.status(&c.id).is_none_or(|s| s.is_terminal()))
            .collect();
        let reads: Vec<(PathBuf, u64)> =
            cursors.iter().map(|c| (c.dir.clone(), c.offset)).collect();
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
        let mut progressed = false;
        for (i, res) in results.into_iter().enumerate() {
            let c = &mut cursors[i];
            if c.done {
                continue;
            }
            match res {
                Ok(r) if !r.data.is_empty() => {
                    progressed = true;
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
                    if !follow || ended[i] {
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
        if cursors.iter().all(|c| c.done) {
            return;
        }
        if progressed {
            idle = Duration::from_millis(10);
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(idle) => {}
            _ = tx.closed() => return,
            _ = inner.shutdown.cancelled() => return,
        }
        idle = (idle * 2).min(Duration::from_millis(100));
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
