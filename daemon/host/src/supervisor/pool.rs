//! The warm interpreter pool (`[kernels.python3] pool_size`, `preload`): interpreters started
//! ahead of need, each a worker-to-be with its own id, cgroup, network namespace (bridge mode,
//! address leased) and shim, waiting for a launch to take it (see `berth_sys::launcher::pool`
//! for the interpreter's side).
//!
//! A pooled worker holds, until a launch takes it, the id it will have: its cgroup, namespace,
//! address and directory are those of that worker already, so a launch that takes it changes
//! nothing of them but the cgroup's limits. Its memory is claimed on the host's ledger (no CPU),
//! so `HostInfo.allocated` counts it and launches cannot overcommit it. Its directory holds the
//! pool marker until it is taken: a daemon that starts removes what its predecessor's pool left
//! (`Inner::collect_pool_leftovers`), and a daemon that stops ends its idle pooled workers
//! ([`super::Host::stop_pool`]). Nothing of the pool is in the store or in `ListWorkers`.
//!
//! Which launches may take one is `berth_core::pool::cold_reason`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::unix::AsyncFd;

use berth_core::admission::Claim;
use berth_core::launch::KernelInvocation;
use berth_core::pool::{self as rules, Ask, Offer};
use berth_core::worker::WorkerRecord;
use berth_sys::cgroup::Limits;
use berth_sys::host as hostfs;
use berth_sys::launcher::pool::{self as interp, PoolClaim};
use berth_sys::launcher::{self, ShimHandle, ShimSpec};
use berth_sys::netns::WorkerNet;

use super::{Host, Inner};

/// Memory limit of a pooled worker's cgroup until its claim (its preload runs under it).
const PRELOAD_MEMORY_LIMIT: u64 = 4 << 30;
/// What a pooled worker is assumed to use before the first one has been measured.
const FIRST_ESTIMATE: u64 = 64 << 20;
/// How long the pool waits after a launch took from it before it refills, while it still holds
/// some: making a pooled worker is CPU work (a network, a cgroup, a spawn, an interpreter's
/// start), and on a small host it would share the CPUs with the launch's answer and with the
/// claimed worker's first lines (on 2 cores: pooled `print(1)` to its first line at a follower
/// in 6.9 ms with the refill at once, 3.9 ms with it after the launch).
const SETTLE: Duration = Duration::from_millis(10);
/// How long an interpreter may take to import its preload list.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The pool of one kernel.
pub(super) struct Pool {
    kernel: String,
    size: usize,
    preload: Vec<String>,
    inv: KernelInvocation,
    /// The variables read at start that the pooled interpreters start with (the workers' base
    /// environment's, see `berth_core::pool::start_env`).
    start_env: BTreeMap<String, String>,
    slots: Mutex<Slots>,
    wake: tokio::sync::Notify,
    /// Set by [`Host::stop_pool`]: no slot is made or kept any more.
    closed: AtomicBool,
    /// Slots being made now.
    making: AtomicUsize,
}

#[derive(Default)]
struct Slots {
    ready: Vec<Slot>,
    /// Taken from `ready` dead (their interpreter ended before a claim): to be cleaned up.
    dead: Vec<Slot>,
    /// What one idle pooled worker uses, as last measured (bytes).
    usage_bytes: u64,
    /// When a launch last took pooled workers.
    last_take: Option<std::time::Instant>,
}

/// A ready pooled worker.
pub(super) struct Slot {
    pub(super) id: String,
    shim_pid: u32,
    shim_starttime: Option<u64>,
    shim_pidfd: OwnedFd,
    /// The interpreter's pid (the worker's main process).
    pid: u32,
    /// The write end of its claim FIFO.
    fifo: OwnedFd,
    /// What it holds on the host's ledger (its memory use when it became ready).
    reserve: u64,
}

impl Slot {
    /// Whether its shim has ended (a pidfd turns readable then).
    fn is_dead(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.shim_pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents != 0
    }
}

impl Pool {
    /// The pool of the first kernel configured with one, if the host can have it.
    pub(super) fn configure(inner: &Inner) -> Option<Pool> {
        let k = inner.opts.kernels.iter().find(|k| k.pool_size > 0)?;
        let Some(inv) = k.invocation.clone() else {
            tracing::warn!(kernel = %k.name, "no pool: the kernel's interpreter is not installed");
            return None;
        };
        if let Some(why) = inner.net.unavailable() {
            tracing::warn!(kernel = %k.name, reason = %why, "no pool: pooled workers need bridge networking");
            return None;
        }
        if !berth_sys::host::is_root() {
            tracing::warn!(kernel = %k.name, "no pool: pooled workers need a daemon that runs as root");
            return None;
        }
        Some(Pool {
            kernel: k.name.clone(),
            size: k.pool_size,
            preload: k.preload.clone(),
            inv,
            start_env: rules::start_env(&inner.opts.base_env),
            slots: Mutex::new(Slots::default()),
            wake: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            making: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready pooled workers now.
    pub(super) fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    /// The interpreter and its arguments, before the code or script.
    fn interpreter_args(&self) -> Vec<String> {
        let mut a = vec![self.inv.interpreter.to_string_lossy().into_owned()];
        a.extend(self.inv.args.iter().cloned());
        a
    }

    /// Up to `n` ready pooled workers for a launch described by `ask`; none (and the reason,
    /// logged at debug) when it must start cold.
    pub(super) fn take(&self, n: usize, ask: &Ask<'_>) -> Vec<Slot> {
        if self.closed.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let args = self.interpreter_args();
        let mut s = self.lock();
        let offer = Offer {
            kernel: &self.kernel,
            start_env: &self.start_env,
            usage_bytes: s.usage_bytes,
            interpreter_args: &args,
        };
        if let Some(why) = rules::cold_reason(ask, &offer) {
            tracing::debug!(reason = %why, "launch starts cold");
            return Vec::new();
        }
        let mut out = Vec::new();
        // The longest ready first.
        while out.len() < n && !s.ready.is_empty() {
            let slot = s.ready.remove(0);
            if slot.is_dead() {
                s.dead.push(slot);
                continue;
            }
            out.push(slot);
        }
        if !out.is_empty() {
            s.last_take = Some(std::time::Instant::now());
        }
        drop(s);
        self.wake.notify_one();
        out
    }

    /// Gives back slots a launch took but could not use (its admission was refused).
    pub(super) fn put_back(&self, slots: Vec<Slot>) {
        self.lock().ready.extend(slots);
        self.wake.notify_one();
    }

    /// The argv of a pooled interpreter whose claim FIFO is `fifo` and that starts with the
    /// variables named `given`.
    fn bootstrap_argv(&self, fifo: &std::path::Path, given: &[String]) -> Vec<String> {
        let mut argv = self.interpreter_args();
        argv.push(self.inv.code_flag.clone());
        argv.push(interp::BOOTSTRAP.to_owned());
        argv.push(fifo.to_string_lossy().into_owned());
        argv.push(self.preload.join(","));
        argv.push(given.join(","));
        argv
    }
}

/// The environment a pooled interpreter starts with: the start-time variables of the workers'
/// base environment, `PATH`, and a `HOME` that does not exist (no user site directory before the
/// claim; the user's is added at it).
fn start_environment(pool: &Pool, inner: &Inner) -> Vec<(String, String)> {
    let mut env = pool.start_env.clone();
    env.insert("PATH".into(), inner.opts.worker_path.clone());
    env.insert("HOME".into(), "/nonexistent".into());
    env.into_iter().collect()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Host {
    /// Starts the pool, where one is configured and the host can have it: a task makes pooled
    /// workers until `pool_size` are ready, and again after each is taken or dies.
    pub(super) fn start_pool(&self) {
        let Some(pool) = Pool::configure(&self.inner) else {
            return;
        };
        tracing::info!(kernel = %pool.kernel, size = pool.size, preload = ?pool.preload, "warm interpreter pool");
        if self.inner.pool.set(pool).is_err() {
            return;
        }
        let inner = self.inner.clone();
        berth_server::spawn_in(
            tracing::info_span!("pool"),
            async move { refill(inner).await },
        );
    }

    /// Ends every idle pooled worker and what it holds (at shutdown: they are no user's
    /// workers), and keeps the pool from making more.
    pub async fn stop_pool(&self) {
        let Some(pool) = self.inner.pool.get() else {
            return;
        };
        pool.closed.store(true, Ordering::SeqCst);
        pool.wake.notify_one();
        // A slot being made sees the shutdown and undoes itself.
        for _ in 0..1000 {
            if pool.making.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let slots: Vec<Slot> = {
            let mut s = pool.lock();
            let mut all: Vec<Slot> = s.ready.drain(..).collect();
            all.append(&mut s.dead);
            all
        };
        let n = slots.len();
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for s in slots {
                inner.discard_slot(s);
            }
        })
        .await;
        if n > 0 {
            tracing::info!(count = n, "idle pooled workers ended");
        }
    }

    /// Pooled workers ready now (0 without a pool).
    pub fn pool_ready(&self) -> usize {
        self.inner.pool.get().map_or(0, Pool::ready)
    }
}

/// Keeps the pool full until shutdown.
async fn refill(inner: Arc<Inner>) {
    let Some(pool) = inner.pool.get() else {
        return;
    };
    let mut failures = 0u32;
    loop {
        if pool.closed.load(Ordering::SeqCst) || inner.shutdown.is_cancelled() {
            return;
        }
        // Ready ones that died meanwhile (killed, OOM) are cleaned up and replaced.
        let dead: Vec<Slot> = {
            let mut s = pool.lock();
            let (live, dead): (Vec<Slot>, Vec<Slot>) =
                s.ready.drain(..).partition(|x| !x.is_dead());
            s.ready = live;
            let mut dead = dead;
            dead.append(&mut s.dead);
            dead
        };
        if !dead.is_empty() {
            tracing::warn!(
                count = dead.len(),
                "pooled workers ended before a launch took them"
            );
            let i = inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for s in dead {
                    i.discard_slot(s);
                }
            })
            .await;
        }
        if pool.ready() < pool.size {
            // A refill waits until launches leave the CPUs to their workers for a moment (see
            // SETTLE), unless the pool is empty: launches start cold then anyway.
            loop {
                let quiet = pool.lock().last_take.map(|t| t.elapsed());
                match quiet {
                    Some(q) if q < SETTLE && pool.ready() > 0 => {
                        tokio::select! {
                            _ = tokio::time::sleep(SETTLE - q) => {}
                            _ = inner.shutdown.cancelled() => return,
                        }
                    }
                    _ => break,
                }
            }
            // Several at once, one per CPU (up to 4): an interpreter's start and its imports are
            // CPU work, and back-to-back launches outran a refill of one at a time.
            let want = (pool.size - pool.ready()).min(hostfs::work_lanes());
            pool.making.fetch_add(want, Ordering::SeqCst);
            let made = futures::future::join_all((0..want).map(|_| make_slot(&inner, pool))).await;
            pool.making.fetch_sub(want, Ordering::SeqCst);
            for made in made {
                match made {
                    Ok(slot) => {
                        failures = 0;
                        pool.lock().ready.push(slot);
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(20) {
                            tracing::warn!(error = %e, failures, "pooled worker not made");
                        }
                    }
                }
            }
            if failures > 0 {
                let backoff = Duration::from_millis((100u64 << failures.min(9)).min(30_000));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = inner.shutdown.cancelled() => return,
                }
            }
            continue;
        }
        tokio::select! {
            _ = pool.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = inner.shutdown.cancelled() => return,
        }
    }
}

/// Makes one pooled worker and waits until its interpreter is ready.
async fn make_slot(inner: &Arc<Inner>, pool: &Pool) -> Result<Slot, String> {
    let id = berth_core::new_id();
    let estimate = match pool.lock().usage_bytes {
        0 => FIRST_ESTIMATE,
        u => u,
    };
    let ip = {
        let mut st = inner.lock();
        let claim = Claim {
            cpu: 0.0,
            memory_bytes: estimate,
        };
        st.ledger
            .admit(std::slice::from_ref(&id), claim)
            .map_err(|e| format!("no room for a pooled worker: {e}"))?;
        match st.ips.allocate(std::slice::from_ref(&id)) {
            Ok(v) if v.len() == 1 => v[0],
            other => {
                st.ledger.release(&id);
                st.ips.release(&id);
                return Err(format!("no address for a pooled worker: {other:?}"));
            }
        }
    };
    let env = start_environment(pool, inner);
    let given: Vec<String> = env.iter().map(|(k, _)| k.clone()).collect();
    let dir = inner.worker_dir(&id);
    let spec = ShimSpec {
        worker_id: id.clone(),
        program: pool.inv.interpreter.clone(),
        argv: pool.bootstrap_argv(&dir.join(interp::CLAIM_FIFO), &given),
        env,
        workdir: PathBuf::from("/"),
        cgroup: inner.cgroups.worker(&id),
        netns: Some(inner.net.path(&id)),
        rotation: inner.opts.rotation,
        meta: serde_json::Value::Null,
        creds: Some(interp::pool_creds(inner.opts.privileges.rlimits.clone())),
        source: None,
        source_file: false,
    };
    let started = {
        let inner = inner.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || inner.start_slot(&id, ip, spec))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    let handle = match started {
        Ok(h) => h,
        Err(e) => {
            let mut st = inner.lock();
            st.ledger.release(&id);
            st.ips.release(&id);
            return Err(e);
        }
    };
    let ShimHandle {
        pid: shim_pid,
        starttime: shim_starttime,
        pidfd,
        handshake,
    } = handle;
    let watch = pidfd.try_clone().map_err(|e| e.to_string())?;
    // SAFETY: the AsyncFd owns `watch`, a pidfd of its own (a dup), until it is dropped.
    let watch = unsafe { AsyncFd::register_with_interest(watch, tokio::io::Interest::READABLE) }
        .map_err(|e| e.to_string())?;
    let opening = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || interp::await_ready(&dir))
    };
    tokio::pin!(opening);
    enum Outcome {
        Ready(std::io::Result<OwnedFd>),
        Died,
        Stop(&'static str),
    }
    let outcome = tokio::select! {
        r = &mut opening => Outcome::Ready(r.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))),
        _ = watch.readable() => Outcome::Died,
        _ = tokio::time::sleep(READY_TIMEOUT) => Outcome::Stop("preload took too long"),
        _ = inner.shutdown.cancelled() => Outcome::Stop("shutting down"),
    };
    let shim_fd = &pidfd;
    let fail = |why: String| {
        let inner = inner.clone();
        let id = id.clone();
        let dir = dir.clone();
        async move {
            let _ = launcher::pidfd_kill(shim_fd.as_fd(), libc::SIGKILL);
            let tail = tokio::task::spawn_blocking(move || {
                interp::release_opener(&dir);
                let tail = stderr_tail(&inner, &id);
                inner.undo_slot(&id, true);
                tail
            })
            .await
            .unwrap_or_default();
            if tail.is_empty() {
                why
            } else {
                format!("{why}: {tail}")
            }
        }
    };
    let fifo = match outcome {
        Outcome::Ready(Ok(fifo)) => fifo,
        Outcome::Ready(Err(e)) => return Err(fail(format!("claim FIFO: {e}")).await),
        Outcome::Died => {
            let _ = opening.await;
            return Err(fail("interpreter ended before it was ready".into()).await);
        }
        Outcome::Stop(why) => {
            let r = fail(why.into()).await;
            let _ = opening.await;
            return Err(r);
        }
    };
    let readback = {
        let inner = inner.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(std::fs::File::from(handshake)).read_line(&mut line);
            (
                launcher::parse_handshake(&line),
                inner.cgroups.stats(&id).memory_current_bytes,
            )
        })
        .await
    };
    let (pid, usage) = match readback {
        Ok((Ok(hs), usage)) => (hs.pid, usage),
        Ok((Err(e), _)) => return Err(fail(format!("handshake: {e}")).await),
        Err(e) => return Err(fail(format!("handshake: {e}")).await),
    };
    // What it really uses, rounded up to a MiB, is what it holds from now on.
    let reserve = usage.div_ceil(1 << 20).max(1) << 20;
    {
        let mut st = inner.lock();
        st.ledger.release(&id);
        st.ledger.restore(
            &id,
            Claim {
                cpu: 0.0,
                memory_bytes: reserve,
            },
        );
    }
    {
        let mut s = pool.lock();
        s.usage_bytes = s.usage_bytes.max(usage);
    }
    if pool.closed.load(Ordering::SeqCst) {
        return Err(fail("pool stopped".into()).await);
    }
    drop(watch);
    Ok(Slot {
        id,
        shim_pid,
        shim_starttime,
        shim_pidfd: pidfd,
        pid,
        fifo,
        reserve,
    })
}

/// The last line a pooled interpreter wrote to its stderr (why its preload failed).
fn stderr_tail(inner: &Inner, id: &str) -> String {
    let dir = inner.worker_dir(id).join("stderr");
    let mut text = String::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            text.push_str(&String::from_utf8_lossy(
                &std::fs::read(f).unwrap_or_default(),
            ));
        }
    }
    text.lines()
        .last()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}

impl Inner {
    /// Makes pooled worker `id`'s network, cgroup and directory and starts its shim (blocking).
    fn start_slot(&self, id: &str, ip: Ipv4Addr, mut spec: ShimSpec) -> Result<ShimHandle, String> {
        self.net
            .create(id, WorkerNet::Routed { ip })
            .map_err(|e| e.to_string())?;
        let limits = Limits {
            cpu: 1.0,
            memory_bytes: PRELOAD_MEMORY_LIMIT.min(self.opts.capacity.memory_bytes.max(1 << 30)),
            pids_max: self.opts.pids_max,
            denied_devices: Vec::new(),
        };
        let cg = match self.cgroups.create(id, &limits) {
            Ok(cg) => cg,
            Err(e) => {
                let _ = self.net.remove(id);
                return Err(e.to_string());
            }
        };
        spec.cgroup = cg;
        let dir = self.worker_dir(id);
        let started = interp::prepare_dir(&dir)
            .map_err(|e| format!("pool directory {}: {e}", dir.display()))
            .and_then(|()| self.spawner.spawn(&dir, &spec).map_err(|e| e.to_string()));
        if started.is_err() {
            self.undo_slot(id, false);
        }
        started
    }

    /// Removes what pooled worker `id` held: processes, cgroup, namespace, directory and its
    /// claims (`books`: its ledger claim and address too). Blocking.
    fn undo_slot(&self, id: &str, books: bool) {
        if let Err(e) = self.cgroups.kill_all(id, Duration::from_secs(5)) {
            tracing::warn!(worker = %id, error = %e, "pooled worker's processes survived the kill");
        }
        let _ = self.cgroups.remove(id);
        let _ = self.net.remove(id);
        let _ = std::fs::remove_dir_all(self.worker_dir(id));
        if books {
            let mut st = self.lock();
            st.ledger.release(id);
            st.ips.release(id);
        }
    }

    /// Ends an idle pooled worker: its shim first (so that it writes nothing more), then all
    /// it held. Blocking.
    pub(super) fn discard_slot(&self, slot: Slot) {
        let _ = launcher::pidfd_kill(slot.shim_pidfd.as_fd(), libc::SIGKILL);
        drop(slot.fifo);
        self.undo_slot(&slot.id, true);
    }

    /// Readies pooled worker `slot` for the launch of `rec`, while the launch's records are being
    /// made durable: the request's limits on its cgroup and the worker's spec (what a restart
    /// or a daemon that lost its store reads) in its directory. Nothing of the launch runs yet,
    /// and the pool marker stays until [`Inner::claim_slot`]: a daemon that dies before then
    /// removes the worker as an idle pooled one. Blocking. On failure the pooled worker is ended.
    pub(super) fn ready_slot(
        &self,
        slot: &Slot,
        shim: &ShimSpec,
        rec: &WorkerRecord,
    ) -> Result<(), String> {
        crate::phase!("claim_readied", slot.id);
        let res = self
            .cgroups
            .update_limits(&slot.id, rec.cpu, rec.memory_bytes)
            .map_err(|e| format!("pooled worker's limits: {e}"))
            .and_then(|()| {
                launcher::write_spec(&self.worker_dir(&slot.id), shim).map_err(|e| e.to_string())
            });
        if res.is_err() {
            self.end_pooled(&slot.id, slot.shim_pidfd.as_fd());
        }
        res
    }

    /// Gives pooled worker `slot`, readied by [`Inner::ready_slot`], its claim, once the launch's
    /// records are durable: it leaves the pool, takes the workers' priority, and runs the
    /// launch's code as its user. Returns a handle as a shim's spawn does, whose handshake says
    /// it runs from now. Blocking. On failure the pooled worker is ended.
    pub(super) fn claim_slot(&self, slot: Slot, claim: &PoolClaim) -> Result<ShimHandle, String> {
        let Slot {
            id,
            shim_pid,
            shim_starttime,
            shim_pidfd,
            pid,
            fifo,
            ..
        } = slot;
        let end = |e: String| {
            self.end_pooled(&id, shim_pidfd.as_fd());
            Err(e)
        };
        let dir = self.worker_dir(&id);
        if let Err(e) = std::fs::remove_file(dir.join(interp::POOL_MARKER)) {
            return end(format!("pool marker: {e}"));
        }
        if let Err(e) = interp::restore_priority(pid) {
            tracing::warn!(worker = %id, error = %e, "a pooled worker keeps the pool's low priority");
        }
        let (r, mut w) = match std::io::pipe() {
            Ok(p) => p,
            Err(e) => return end(format!("handshake pipe: {e}")),
        };
        let _ = writeln!(w, "ok {pid} {}", now_us());
        drop(w);
        if let Err(e) = interp::send_claim(fifo, claim) {
            return end(format!("claim of the pooled worker: {e}"));
        }
        crate::phase!("claimed", id);
        let _ = std::fs::remove_file(dir.join(interp::CLAIM_FIFO));
        Ok(ShimHandle {
            pid: shim_pid,
            starttime: shim_starttime,
            pidfd: shim_pidfd,
            handshake: OwnedFd::from(r),
        })
    }

    /// Ends a pooled worker a launch took: its shim, then every process of its cgroup.
    fn end_pooled(&self, id: &str, shim_pidfd: std::os::fd::BorrowedFd<'_>) {
        let _ = launcher::pidfd_kill(shim_pidfd, libc::SIGKILL);
        let _ = self.cgroups.kill_all(id, Duration::from_secs(5));
    }

    /// Before a launch's admission: the ledger claims of the pooled workers it took go (the
    /// launch claims their ids again with its own size); their addresses stay theirs.
    pub(super) fn release_slot_reserves(st: &mut super::State, slots: &[Slot]) {
        for s in slots {
            st.ledger.release(&s.id);
        }
    }

    /// After a refused admission: the pooled workers hold their reserves again.
    pub(super) fn restore_slot_reserves(st: &mut super::State, slots: &[Slot]) {
        for s in slots {
            st.ledger.restore(
                &s.id,
                Claim {
                    cpu: 0.0,
                    memory_bytes: s.reserve,
                },
            );
        }
    }

    /// At start-up, before recovery plans anything: ends and removes every pooled worker a
    /// predecessor left idle (a directory with the pool marker and no record), with its shim,
    /// processes, cgroup and namespace. Returns their ids, which recovery then ignores. Blocking.
    pub(super) fn collect_pool_leftovers(
        &self,
        known: &std::collections::HashMap<String, WorkerRecord>,
        shims: &std::collections::HashMap<String, (u32, Option<u64>)>,
    ) -> std::collections::HashSet<String> {
        let workers_dir = self.opts.state_dir.join("workers");
        let mut gone = std::collections::HashSet::new();
        let Ok(rd) = std::fs::read_dir(&workers_dir) else {
            return gone;
        };
        for e in rd.flatten() {
            let Some(id) = e.file_name().into_string().ok() else {
                continue;
            };
            if known.contains_key(&id)
                || !berth_core::is_valid_id(&id)
                || !e.path().join(interp::POOL_MARKER).exists()
            {
                continue;
            }
            if let Some((pid, starttime)) = shims.get(&id) {
                if berth_sys::host::process_starttime(*pid) == *starttime {
                    if let Ok(fd) = launcher::pidfd_open(*pid as i32) {
                        let _ = launcher::pidfd_kill(fd.as_fd(), libc::SIGKILL);
                    }
                }
            }
            self.undo_slot(&id, false);
            gone.insert(id);
        }
        if !gone.is_empty() {
            tracing::info!(
                count = gone.len(),
                "removed idle pooled workers of a previous run"
            );
        }
        gone
    }
}

/// The claim of a pooled worker for a launch whose cold argv would be `cold_argv` (interpreter,
/// its arguments, then `-c CODE` or the script).
pub(super) fn claim_of(
    creds: &berth_sys::launcher::WorkerCreds,
    env: Vec<(String, String)>,
    cwd: &std::path::Path,
    cold_argv: &[String],
    interpreter_args: usize,
    code: Option<&str>,
    script: Option<&std::path::Path>,
) -> PoolClaim {
    let rest = &cold_argv[interpreter_args.min(cold_argv.len())..];
    let argv = match code {
        // `-c CODE`: Python's sys.argv is ["-c"].
        Some(_) => rest.iter().take(1).cloned().collect(),
        None => rest.to_vec(),
    };
    PoolClaim {
        uid: creds.uid,
        gid: creds.gid,
        groups: creds.groups.clone(),
        umask: creds.umask,
        env,
        cwd: cwd.to_string_lossy().into_owned(),
        argv,
        orig_argv: cold_argv.to_vec(),
        code: code.map(str::to_owned),
        script: script.map(|p| p.to_string_lossy().into_owned()),
    }
}
