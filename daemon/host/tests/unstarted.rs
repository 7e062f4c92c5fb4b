//! A launch whose records were durable when berthd died, before it forked every shim: the next
//! daemon starts each worker whose spec was written, and fails (never leaves LOST, never
//! forgets) each whose spec was not; one whose shim did start (it marked so) and vanished
//! without a trace is LOST, never run twice. A real `Host` over the recording fakes, no root.

use std::sync::Arc;
use std::time::Duration;

use berth_core::admission::Capacity;
use berth_core::launch::{self, LaunchRequest, NetworkMode};
use berth_core::worker::WorkerStatus;
use berth_host::supervisor::{open_store, Host, HostOptions, LaunchAs};
use berth_sys::fake::FakeWorld;
use berth_sys::launcher::{SPEC_FILE, STARTED_FILE};
use berth_sys::store::{Op, StoreWriter, Table};

#[test]
fn a_durable_launch_cut_off_before_its_spawns_is_finished_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::new();
    let (store, origin) = open_store(dir.path(), false).unwrap();
    let store = Arc::new(store);
    let (writer, _writer_thread) = StoreWriter::start_shared(store.clone());
    let daemon = |rt: &tokio::runtime::Runtime| {
        let _enter = rt.enter();
        let opts = HostOptions::with_defaults(
            "fake",
            dir.path(),
            Capacity {
                cpu: 4.0,
                memory_bytes: 8 << 30,
                workers: 10,
            },
        );
        Host::new(opts, world.cgroups(), world.spawner(), Some(writer.clone()))
    };

    // A first daemon launches two workers and dies.
    let first = tokio::runtime::Runtime::new().unwrap();
    let h1 = daemon(&first);
    let recs = first.block_on(async {
        let req = LaunchRequest {
            n: 3,
            cpu: 1.0,
            memory_gb: 1.0,
            command: vec!["/bin/true".into()],
            network: NetworkMode::Host,
            ..Default::default()
        };
        let spec = launch::validate(&req, |_| false).unwrap();
        let ids: Vec<String> = h1
            .launch(spec, LaunchAs::default())
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.id)
            .collect();
        let out = h1
            .await_workers(ids, None, false, Some(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(out.reached.len(), 3);
        writer.commit(Vec::new()).await.unwrap();
        out.reached
    });
    drop(h1);
    first.shutdown_background();
    // As if it had died between the launch's commit and these spawns: no shim, no process, no
    // exit record; the records say PENDING (the updates after the commit were not durable yet).
    // The first has its spec, the second none, the third's shim had started (and vanished).
    let (spawned, unwritten, vanished) = (&recs[0], &recs[1], &recs[2]);
    for r in &recs {
        assert!(world.vanish(&r.id));
    }
    let wdir = |id: &str| dir.path().join("workers").join(id);
    for r in [spawned, unwritten] {
        std::fs::remove_file(wdir(&r.id).join(STARTED_FILE)).unwrap();
    }
    std::fs::remove_file(wdir(&unwritten.id).join(SPEC_FILE)).unwrap();
    let pending: Vec<Op> = recs
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.status = WorkerStatus::Pending;
            r.pid = None;
            r.shim_pid = None;
            r.shim_starttime = None;
            r.started_at = None;
            Op::put(Table::Workers, &r.id, &r)
        })
        .collect();

    let second = tokio::runtime::Runtime::new().unwrap();
    let h2 = daemon(&second);
    second.block_on(async {
        writer.commit(pending).await.unwrap();
        h2.recover(&store, &origin).await.unwrap();
        let out = h2
            .await_workers(
                vec![spawned.id.clone()],
                None,
                false,
                Some(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        assert_eq!(out.reached.len(), 1, "not started: {:?}", out.failures);
        assert_eq!(world.running(), vec![spawned.id.clone()]);
        assert_eq!(world.starts(&spawned.id).len(), 2, "started again");
        let out = h2
            .await_workers(
                vec![unwritten.id.clone()],
                None,
                true,
                Some(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        let w = &out.failures[0];
        assert_eq!(w.status, WorkerStatus::Failed, "{w:?}");
        assert!(
            w.reason
                .contains("berthd stopped before it started the worker"),
            "{}",
            w.reason
        );
        assert_eq!(world.starts(&unwritten.id).len(), 1, "never started again");
        let out = h2
            .await_workers(
                vec![vanished.id.clone()],
                None,
                true,
                Some(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        assert_eq!(out.failures[0].status, WorkerStatus::Lost, "{out:?}");
        assert_eq!(world.starts(&vanished.id).len(), 1, "never run twice");
    });
    second.shutdown_background();
}
