//! Session leases on the boot clock, with the supervisor's clock injected (a
//! [`FakeClock`]): a step of the wall clock changes nothing, time that really passes ends a
//! lease, also while no daemon ran, and after a reboot the wall clock decides. A real `Host`
//! over the recording fakes, no root.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_core::admission::Capacity;
use berth_core::error::Error;
use berth_core::launch::{self, LaunchRequest, NetworkMode};
use berth_core::worker::WorkerStatus;
use berth_host::supervisor::{Host, HostOptions, LaunchAs};
use berth_sys::clock::FakeClock;
use berth_sys::fake::FakeWorld;
use berth_sys::store::StoreWriter;

const DAY: Duration = Duration::from_secs(24 * 3600);
const TTL: u32 = 30;

fn host(
    dir: &std::path::Path,
    world: &FakeWorld,
    clock: &Arc<FakeClock>,
    store: Option<StoreWriter>,
) -> Host {
    let mut opts = HostOptions::with_defaults(
        "fake",
        dir,
        Capacity {
            cpu: 4.0,
            memory_bytes: 8 << 30,
            workers: 10,
        },
    );
    opts.stop_grace = Duration::from_millis(200);
    opts.kill_limit = Duration::from_secs(1);
    opts.clock = clock.clone();
    Host::new(opts, world.cgroups(), world.spawner(), store)
}

fn request(session: &str) -> LaunchRequest {
    LaunchRequest {
        n: 1,
        cpu: 1.0,
        memory_gb: 1.0,
        command: vec!["/bin/true".into()],
        network: NetworkMode::Host,
        session_id: session.to_owned(),
        ..Default::default()
    }
}

async fn launch(h: &Host, session: &str) -> String {
    let spec = launch::validate(&request(session), |_| false).unwrap();
    let id = h.launch(spec, LaunchAs::default()).await.unwrap()[0]
        .id
        .clone();
    let out = h
        .await_workers(vec![id.clone()], None, false, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(out.reached.len(), 1, "not running: {:?}", out.failures);
    id
}

/// The status and reason of worker `id` once it has ended (within 5 s), or now.
async fn end_of(h: &Host, id: &str) -> (WorkerStatus, String) {
    let out = h
        .await_workers(
            vec![id.to_owned()],
            None,
            true,
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    let w = out.reached.into_iter().chain(out.failures).next().unwrap();
    (w.status, w.reason)
}

/// The expiry task looks at the leases at least every second: this is long enough for it to
/// have seen what the clock says now.
async fn let_expiry_look() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

#[tokio::test]
async fn a_wall_clock_step_keeps_sessions_and_real_time_ends_them() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::new();
    let clock = Arc::new(FakeClock::new("boot-a", Duration::from_secs(100)));
    let h = host(dir.path(), &world, &clock, None);
    h.start_background();
    let s = h
        .open_session(TTL, BTreeMap::new(), None, "")
        .await
        .unwrap();
    let id = launch(&h, &s.id).await;

    // A day forward, then a day back: the session and its worker stay.
    clock.step_wall(DAY, false);
    let_expiry_look().await;
    assert_eq!(world.running(), vec![id.clone()], "a +1 day step ended it");
    h.keep_alive(&s.id).await.unwrap();
    clock.step_wall(2 * DAY, true);
    let_expiry_look().await;
    assert_eq!(world.running(), vec![id.clone()], "a -1 day step ended it");
    h.keep_alive(&s.id).await.unwrap();

    // Time that really passes (the boot clock with it) ends the lease as ever.
    clock.advance(Duration::from_secs(u64::from(TTL) + 1));
    assert_eq!(
        end_of(&h, &id).await,
        (WorkerStatus::Stopped, "session ended".to_owned())
    );
    assert!(matches!(h.keep_alive(&s.id).await, Err(Error::NotFound(_))));
}

/// A daemon that was down longer than a lease ends that session when it starts again; one that
/// was down a moment, while the wall clock jumped a day, keeps it. After a reboot (another boot
/// id), the boot clock of the record means nothing, and the wall clock decides.
#[test]
fn leases_count_while_no_daemon_runs() {
    use berth_host::supervisor::open_store;

    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::new();
    let clock = Arc::new(FakeClock::new("boot-a", Duration::from_secs(100)));
    let (store, origin) = open_store(dir.path(), false).unwrap();
    let store = Arc::new(store);
    let (writer, _writer_thread) = StoreWriter::start_shared(store.clone());
    let daemon = |rt: &tokio::runtime::Runtime| {
        let _enter = rt.enter();
        host(dir.path(), &world, &clock, Some(writer.clone()))
    };

    // The first daemon opens three sessions with a worker each, then dies.
    let first = tokio::runtime::Runtime::new().unwrap();
    let h1 = daemon(&first);
    let (short, long, wall) = first.block_on(async {
        let short = h1
            .open_session(TTL, BTreeMap::new(), None, "")
            .await
            .unwrap();
        let long = h1
            .open_session(10 * TTL, BTreeMap::new(), None, "")
            .await
            .unwrap();
        let wall = h1
            .open_session(20 * TTL, BTreeMap::new(), None, "")
            .await
            .unwrap();
        let ws = (
            launch(&h1, &short.id).await,
            launch(&h1, &long.id).await,
            launch(&h1, &wall.id).await,
        );
        writer.commit(Vec::new()).await.unwrap();
        ws
    });
    drop(h1);
    first.shutdown_background();

    // Down 2 TTLs of real time while the wall clock went back a day: the short lease lapsed
    // (the wall clock alone would say it has a day left), the others did not.
    clock.advance(Duration::from_secs(2 * u64::from(TTL)));
    clock.step_wall(DAY, true);
    let second = tokio::runtime::Runtime::new().unwrap();
    let h2 = daemon(&second);
    second.block_on(async {
        h2.recover(&store, &origin).await.unwrap();
        h2.start_background();
        assert_eq!(
            end_of(&h2, &short).await,
            (WorkerStatus::Stopped, "session ended".to_owned())
        );
        let_expiry_look().await;
        let mut running = world.running();
        running.sort();
        let mut want = vec![long.clone(), wall.clone()];
        want.sort();
        assert_eq!(running, want);
        writer.commit(Vec::new()).await.unwrap();
    });
    drop(h2);
    second.shutdown_background();

    // A reboot: boot clock from 0 under a new boot id; by the wall clock (put right again)
    // 3 TTLs have passed since the launch: the 10-TTL lease holds, the wall-clock lease too.
    clock.step_wall(DAY, false);
    clock.reboot("boot-b", Duration::from_secs(5));
    let third = tokio::runtime::Runtime::new().unwrap();
    let h3 = daemon(&third);
    third.block_on(async {
        h3.recover(&store, &origin).await.unwrap();
        h3.start_background();
        let_expiry_look().await;
        let mut running = world.running();
        running.sort();
        let mut want = vec![long.clone(), wall.clone()];
        want.sort();
        assert_eq!(running, want, "within their leases by the wall clock");
        // Past 10 TTLs by the wall clock (the boot clock of boot-b says 5 s): the long lease
        // ends, the 20-TTL one holds.
        clock.step_wall(Duration::from_secs(8 * u64::from(TTL)), false);
        assert_eq!(
            end_of(&h3, &long).await,
            (WorkerStatus::Stopped, "session ended".to_owned())
        );
        assert_eq!(world.running(), vec![wall.clone()]);
    });
    third.shutdown_background();
}
