//! Every change of a worker goes out from here, once: into the store (in the order the changes
//! were made), to `WatchWorkers` streams (a broadcast of the record) and to everyone waiting for
//! a change (a counter awaits and stops watch).
//!
//! Two kinds of writes reach the store. A request (launch, stop, a session's open, renewal or
//! close) *commits* its records and changes memory only once they are durable: a commit that
//! fails refuses the request (`UNAVAILABLE` with the store's error) and leaves memory as it was.
//! A fact (a worker started, ended, is restarting) has happened already: memory follows it at
//! once, and its record is *submitted*, which the store's writer writes again until it is
//! durable (the shim's own exit record backs it meanwhile).

use tokio::sync::broadcast;

use berth_core::error::Error;
use berth_core::worker::WorkerRecord;
use berth_sys::store::{Op, Slot, StoreError, Table};

use super::{Host, Inner};

impl Host {
    /// A receiver of every worker change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkerRecord> {
        self.inner.events.subscribe()
    }
}

/// A request's records did not become durable: the request is refused with the store's error.
pub(super) fn unavailable(e: StoreError) -> Error {
    Error::Unavailable(e.to_string())
}

impl Inner {
    /// Room in the store's queue for one message (`None` without a store); waits while the queue
    /// is full. Take it before a lock, send through it under the lock.
    pub(super) async fn slot(&self) -> Option<Slot> {
        match &self.store {
            Some(s) => Some(s.reserve().await),
            None => None,
        }
    }

    /// Queues `ops` as facts (not waited for).
    pub(super) async fn submit(&self, ops: Vec<Op>) {
        if let Some(slot) = self.slot().await {
            slot.submit(ops);
        }
    }

    /// Records worker `id`'s state as it is now and tells everyone who follows the workers;
    /// `None` when the worker is not (or no longer) known.
    pub(super) async fn publish(&self, id: &str) -> Option<WorkerRecord> {
        self.update(id, |_| ()).await
    }

    /// Applies `f` to worker `id`, records the result (a fact) and tells watchers. The record is
    /// queued under the state lock, so the store gets each worker's changes in the order they
    /// were made: its last write of a worker is always the record as memory has it.
    pub(super) async fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut WorkerRecord),
    ) -> Option<WorkerRecord> {
        let slot = self.slot().await;
        let rec = {
            let mut st = self.lock();
            let e = st.workers.get_mut(id)?;
            f(&mut e.rec);
            if let Some(slot) = slot {
                slot.submit(vec![Op::put(Table::Workers, id, &e.rec)]);
            }
            e.rec.clone()
        };
        self.announce(rec.clone());
        Some(rec)
    }

    /// Tells watchers and waiters about `rec`, whose record is in the store already (or is
    /// forgotten).
    pub(super) fn announce(&self, rec: WorkerRecord) {
        if rec.status.is_terminal() {
            self.wake_followers(&rec.id);
        }
        let _ = self.events.send(rec);
        self.changed.send_modify(|v| *v += 1);
    }
}
