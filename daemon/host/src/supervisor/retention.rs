//! Retention of ended workers: how long and how many are kept before they are forgotten.

use std::path::PathBuf;
use std::time::SystemTime;

use berth_sys::store::{Op, Table};

use super::Host;

impl Host {
    pub(super) async fn sweep_finished(&self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.inner.opts.retention_sweep) => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            self.forget_finished().await;
        }
    }

    /// Forgets ended workers past their retention, with their records and files.
    pub async fn forget_finished(&self) -> usize {
        let now = SystemTime::now();
        let doomed: Vec<String> = {
            let mut st = self.inner.lock();
            let mut ended: Vec<(u64, String, Option<SystemTime>)> = st
                .workers
                .values()
                .filter(|e| e.rec.status.is_terminal())
                .map(|e| (e.seq, e.rec.id.clone(), e.rec.finished_at))
                .collect();
            ended.sort();
            let excess = ended
                .len()
                .saturating_sub(self.inner.opts.retain_finished_max);
            let doomed: Vec<String> = ended
                .iter()
                .enumerate()
                .filter(|(i, (_, _, fin))| {
                    *i < excess
                        || fin.is_some_and(|f| {
                            now.duration_since(f).unwrap_or_default()
                                >= self.inner.opts.retain_finished_for
                        })
                })
                .map(|(_, (_, id, _))| id.clone())
                .collect();
            for id in &doomed {
                st.workers.remove(id);
            }
            doomed
        };
        let forgotten_sessions = self.forget_ended_sessions(now);
        let ops: Vec<Op> = doomed
            .iter()
            .map(|id| Op::delete(Table::Workers, id))
            .chain(
                forgotten_sessions
                    .iter()
                    .map(|id| Op::delete(Table::Sessions, id)),
            )
            .collect();
        if !ops.is_empty() {
            self.inner.submit(ops).await;
        }
        if doomed.is_empty() {
            return 0;
        }
        let dirs: Vec<PathBuf> = doomed.iter().map(|id| self.inner.worker_dir(id)).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for d in dirs {
                let _ = std::fs::remove_dir_all(d);
            }
        })
        .await;
        tracing::info!(count = doomed.len(), "forgot ended workers past retention");
        doomed.len()
    }
}
