//! Recording fakes of the host's effects that the supervisor drives — worker cgroups and the
//! launcher — so that its decisions (launch, stop, restart back-off, session lapse, OOM report,
//! what is freed) can be tested in milliseconds without root. Both share one [`FakeWorld`]: the
//! spawner starts a fake shim there, and a signal through the fake cgroups ends it the way the
//! real kernel and shim would. Every call is recorded in order ([`FakeWorld::events`]).
//!
//! A fake shim is honest about the contract the supervisor relies on: it writes its handshake
//! line (`ok <pid> <start µs>`) and closes it, and when its worker ends it writes `exit.json`
//! into the worker's directory and then closes the fd the supervisor waits on (a pipe here; a
//! pidfd for a real shim: both become readable when the shim is gone). Fake pids lie above the
//! kernel's largest (`pid_max` ≤ 2^22), so no signal or wait can reach a real process.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cgroup::{CgroupError, CgroupStats, CgroupVersion, Cgroups, Limits, WorkerCgroup};
use crate::launcher::{
    write_spec, ExitRecord, ShimHandle, ShimSpec, SpawnError, Spawner, EXIT_FILE,
};
use crate::store::{Op, RecordStore, Store, StoreError};

type Result<T> = std::result::Result<T, CgroupError>;

/// The first pid a fake shim gets: far above any real pid.
const FIRST_FAKE_PID: u32 = 1 << 30;

/// One thing the supervisor asked of the fakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeEvent {
    CgroupCreated(String),
    Spawned(String),
    Signalled(String, i32),
    Killed(String),
    CgroupRemoved(String),
    /// A worker's program ended with this exit code or signal.
    Exited {
        id: String,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// How a fake worker behaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// Ends with this code as soon as it starts (`None`: runs until told or signalled).
    pub exit_at_once: Option<i32>,
    /// Does not end on SIGTERM (only a kill of its cgroup ends it).
    pub ignores_sigterm: bool,
    /// Nothing ends it, not even a kill of its cgroup (a process in uninterruptible sleep);
    /// only [`FakeWorld::exit`] does.
    pub unkillable: bool,
    /// The kernel's OOM killer killed it: it ends by SIGKILL and its cgroup counts one OOM kill.
    pub oom: bool,
    /// Its shim fails to start it (`err <message>` on the handshake, no exit record).
    pub spawn_error: Option<String>,
}

/// A fake worker process and its shim.
#[derive(Debug)]
struct Running {
    dir: PathBuf,
    pid: u32,
    behaviour: Behaviour,
    /// Closing it tells the supervisor that the shim has exited.
    exited_w: Option<OwnedFd>,
}

#[derive(Debug, Default)]
struct World {
    next_pid: u32,
    /// How a worker started from now on behaves.
    behaviour: Behaviour,
    running: HashMap<String, Running>,
    cgroups: BTreeMap<String, CgroupStats>,
    events: Vec<FakeEvent>,
    /// When each worker's shim was started, in order.
    started: HashMap<String, Vec<Instant>>,
}

/// The shared state of [`FakeCgroups`] and [`FakeSpawner`], and the test's handle on them.
#[derive(Debug, Clone, Default)]
pub struct FakeWorld {
    inner: Arc<Mutex<World>>,
}

impl FakeWorld {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cgroups backed by this world.
    pub fn cgroups(&self) -> Arc<FakeCgroups> {
        Arc::new(FakeCgroups {
            world: self.clone(),
        })
    }

    /// A spawner that starts fake shims in this world.
    pub fn spawner(&self) -> Arc<FakeSpawner> {
        Arc::new(FakeSpawner {
            world: self.clone(),
        })
    }

    /// How workers started from now on behave.
    pub fn set_default(&self, b: Behaviour) {
        self.lock().behaviour = b;
    }

    /// Everything asked of the fakes so far, in order.
    pub fn events(&self) -> Vec<FakeEvent> {
        self.lock().events.clone()
    }

    /// Workers whose fake program runs now.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().running.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Worker cgroups that exist now.
    pub fn cgroup_ids(&self) -> Vec<String> {
        self.lock().cgroups.keys().cloned().collect()
    }

    /// When worker `id`'s shim was started, every time it was.
    pub fn starts(&self, id: &str) -> Vec<Instant> {
        self.lock().started.get(id).cloned().unwrap_or_default()
    }

    /// Ends worker `id`'s program with `code`, as if it exited by itself.
    pub fn exit(&self, id: &str, code: i32) -> bool {
        self.end(id, Some(code), None)
    }

    /// Takes worker `id`'s program and shim away without a trace (no exit record), as a reboot
    /// or a `kill -9` of both would.
    pub fn vanish(&self, id: &str) -> bool {
        let r = self.lock().running.remove(id);
        r.is_some()
    }

    /// Ends a running worker: its shim records the end and exits.
    fn end(&self, id: &str, code: Option<i32>, signal: Option<i32>) -> bool {
        let mut w = self.lock();
        let Some(mut r) = w.running.remove(id) else {
            return false;
        };
        w.events.push(FakeEvent::Exited {
            id: id.to_owned(),
            code,
            signal,
        });
        drop(w);
        let now = now_us();
        let rec = ExitRecord {
            pid: r.pid,
            exit_code: code,
            signal,
            spawn_error: None,
            started_at_us: Some(now),
            finished_at_us: Some(now),
            finished_at_ms: now / 1000,
        };
        let _ = std::fs::write(
            r.dir.join(EXIT_FILE),
            serde_json::to_vec(&rec).unwrap_or_default(),
        );
        // The shim is gone: what the supervisor waits on becomes readable.
        r.exited_w.take();
        true
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((r.into(), w.into()))
}

/// Worker cgroups that exist only in a [`FakeWorld`].
#[derive(Debug)]
pub struct FakeCgroups {
    world: FakeWorld,
}

impl Cgroups for FakeCgroups {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn create(&self, id: &str, _limits: &Limits) -> Result<WorkerCgroup> {
        let mut w = self.world.lock();
        w.cgroups.insert(id.to_owned(), CgroupStats::default());
        w.events.push(FakeEvent::CgroupCreated(id.to_owned()));
        Ok(self.worker(id))
    }

    fn worker(&self, id: &str) -> WorkerCgroup {
        WorkerCgroup {
            version: CgroupVersion::V2,
            dirs: vec![(
                crate::cgroup::Controller::Unified,
                PathBuf::from("/nonexistent/berth-fake").join(id),
            )],
        }
    }

    fn list(&self) -> Vec<String> {
        self.world.cgroup_ids()
    }

    fn remove_subtree(&self) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "fake cgroups".into()
    }

    fn pids(&self, id: &str) -> Vec<i32> {
        let w = self.world.lock();
        w.running
            .get(id)
            .map(|r| vec![r.pid as i32])
            .unwrap_or_default()
    }

    fn signal_all(&self, id: &str, signal: i32) {
        let behaviour = {
            let mut w = self.world.lock();
            w.events.push(FakeEvent::Signalled(id.to_owned(), signal));
            w.running.get(id).map(|r| r.behaviour.clone())
        };
        let Some(b) = behaviour else { return };
        if !b.unkillable && (!b.ignores_sigterm || signal == libc::SIGKILL) {
            self.world.end(id, None, Some(signal));
        }
    }

    fn kill_all(&self, id: &str, timeout: Duration) -> Result<()> {
        let unkillable = {
            let mut w = self.world.lock();
            let live = w.running.get(id).map(|r| r.behaviour.unkillable);
            if live.is_some() {
                w.events.push(FakeEvent::Killed(id.to_owned()));
            }
            live
        };
        match unkillable {
            Some(false) => {
                self.world.end(id, None, Some(libc::SIGKILL));
                Ok(())
            }
            Some(true) => Err(CgroupError::Busy {
                path: self.worker(id).dirs[0].1.clone(),
                left: 1,
                waited: timeout,
            }),
            None => Ok(()),
        }
    }

    fn stats(&self, id: &str) -> CgroupStats {
        self.world
            .lock()
            .cgroups
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn remove(&self, id: &str) -> Result<()> {
        let mut w = self.world.lock();
        if w.cgroups.remove(id).is_some() {
            w.events.push(FakeEvent::CgroupRemoved(id.to_owned()));
        }
        Ok(())
    }
}

/// Starts fake shims in a [`FakeWorld`].
#[derive(Debug)]
pub struct FakeSpawner {
    world: FakeWorld,
}

impl Spawner for FakeSpawner {
    fn spawn(&self, dir: &Path, spec: &ShimSpec) -> std::result::Result<ShimHandle, SpawnError> {
        write_spec(dir, spec)?;
        // As a real shim does first.
        let _ = crate::launcher::mark_started(dir);
        let io = |source| SpawnError::Shim {
            shim: PathBuf::from("fake"),
            source,
        };
        let (hs_r, hs_w) = pipe().map_err(io)?;
        let (exited_r, exited_w) = pipe().map_err(io)?;
        let id = spec.worker_id.clone();
        let handle = |pid: u32| ShimHandle {
            pid,
            starttime: Some(u64::from(pid)),
            pidfd: exited_r,
            handshake: hs_r,
        };
        let mut w = self.world.lock();
        // Two pids a start: the shim's, and its worker's just above.
        w.next_pid += 2;
        let pid = FIRST_FAKE_PID + w.next_pid;
        w.started
            .entry(id.clone())
            .or_default()
            .push(Instant::now());
        let behaviour = w.behaviour.clone();
        w.events.push(FakeEvent::Spawned(id.clone()));
        let mut hs = std::fs::File::from(hs_w);
        if let Some(msg) = &behaviour.spawn_error {
            let _ = writeln!(hs, "err {msg}");
            return Ok(handle(pid));
        }
        let _ = writeln!(hs, "ok {} {}", pid + 1, now_us());
        drop(hs);
        if behaviour.oom {
            if let Some(s) = w.cgroups.get_mut(&id) {
                s.oom_kills += 1;
            }
        }
        let at_once = behaviour
            .exit_at_once
            .map(|c| (Some(c), None))
            .or(behaviour.oom.then_some((None, Some(libc::SIGKILL))));
        w.running.insert(
            id.clone(),
            Running {
                dir: dir.to_path_buf(),
                pid: pid + 1,
                behaviour,
                exited_w: Some(exited_w),
            },
        );
        drop(w);
        if let Some((code, signal)) = at_once {
            self.world.end(&id, code, signal);
        }
        Ok(handle(pid))
    }
}

/// A state store that fails or stalls on demand, over a real [`Store`] (whose records a test
/// reads back): what the store's writer and the supervisor do when a commit fails.
#[derive(Debug)]
pub struct FakeStore {
    store: Store,
    /// The error every group commit fails with, while set.
    failure: Mutex<Option<String>>,
    /// While held, group commits wait (the writer is stuck in a slow fsync).
    held: Mutex<bool>,
    released: Condvar,
    attempts: std::sync::atomic::AtomicUsize,
}

impl FakeStore {
    /// Over a real store at `path`.
    pub fn open(path: &Path) -> Self {
        let (store, _) = Store::open(path).expect("open the fake's store");
        Self {
            store,
            failure: Mutex::new(None),
            held: Mutex::new(false),
            released: Condvar::new(),
            attempts: Default::default(),
        }
    }

    /// Makes every group commit fail with `why` (from the next one on), or succeed again.
    pub fn fail(&self, why: Option<&str>) {
        *self.failure.lock().unwrap() = why.map(str::to_owned);
    }

    /// Makes group commits wait until [`FakeStore::release`].
    pub fn hold(&self) {
        *self.held.lock().unwrap() = true;
    }

    pub fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.released.notify_all();
    }

    /// Group commits the writer has begun (counted before one waits or fails).
    pub fn attempts(&self) -> usize {
        self.attempts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The real store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl RecordStore for FakeStore {
    fn apply(&self, ops: &[Op]) -> std::result::Result<(), StoreError> {
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.released.wait(held).unwrap();
        }
        drop(held);
        if let Some(why) = self.failure.lock().unwrap().clone() {
            return Err(StoreError::Db {
                path: self.store.path().to_path_buf(),
                source: Box::new(redb::Error::Io(std::io::Error::other(why))),
            });
        }
        self.store.apply(ops)
    }
}
