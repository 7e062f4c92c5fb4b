//! Every change of a worker goes out from here, once: into the store (durably, in order), to
//! `WatchWorkers` streams (a broadcast of the record) and to everyone waiting for a change (a
//! counter awaits and stops watch).

use tokio::sync::broadcast;

use berth_core::worker::WorkerRecord;
use berth_sys::store::{Op, Table};

use super::{Host, Inner};

impl Host {
    /// A receiver of every worker change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkerRecord> {
        self.inner.events.subscribe()
    }
}

impl Inner {
    /// Records `rec` as worker `rec.id`'s state and tells everyone who follows the workers.
    pub(super) fn publish(&self, rec: WorkerRecord) {
        if let Some(store) = &self.store {
            store.submit(vec![Op::put(Table::Workers, &rec.id, &rec)]);
        }
        if rec.status.is_terminal() {
            self.wake_followers(&rec.id);
        }
        let _ = self.events.send(rec);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Applies `f` to worker `id` and tells watchers.
    pub(super) fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut WorkerRecord),
    ) -> Option<WorkerRecord> {
        let rec = {
            let mut st = self.lock();
            let e = st.workers.get_mut(id)?;
            f(&mut e.rec);
            e.rec.clone()
        };
        self.publish(rec.clone());
        Some(rec)
    }
}
